#include "preprocess.hpp"

#include "checks.hpp"
#include "kernels.hpp"
#include "resample.hpp"
#include "wide_int.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <exception>
#include <limits>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <thread>
#include <type_traits>
#include <vector>

namespace ubc {
namespace {

using detail::check_geometry;
using detail::check_indices;
using detail::check_spacing;
using detail::check_volume;
using detail::checked_product;
using detail::Affine;
using detail::IntMoments;
using detail::normalise_value;
using detail::PlaneResampler;
using detail::Taps;

// Padded slices read at once when z is the fastest axis: at most 16, at most 32 MiB of them.
constexpr int64_t kMaxBlock = 16;
constexpr int64_t kBlockFloats = int64_t{8} << 20;
// A zero-padded axial slice: (nx + 2) (ny + 2) < 2 kMaxSliceVoxels within the limits.
constexpr int64_t kMaxPadded = 2 * kMaxSliceVoxels;
// Floats a caller's buffer can hold, so that their byte offsets fit a pointer difference.
constexpr int64_t kMaxFloats = std::numeric_limits<std::ptrdiff_t>::max() / 4;

// Runs body(begin, end) over [0, n) split into contiguous chunks, one per thread. Each output
// element is computed by exactly one chunk, so results do not depend on the thread count.
template <typename Body>
void parallel_for(int64_t n, int threads, Body&& body) {
    int64_t workers = threads > 0 ? threads : static_cast<int64_t>(std::thread::hardware_concurrency());
    workers = std::max<int64_t>(1, std::min(workers, n));
    if (workers == 1) {
        body(int64_t{0}, n);
        return;
    }
    const int64_t chunk = (n + workers - 1) / workers;
    std::vector<std::exception_ptr> errors(static_cast<size_t>(workers));
    std::vector<std::thread> pool;
    for (int64_t w = 0; w < workers; ++w) {
        const int64_t begin = w * chunk;
        const int64_t end = std::min(n, begin + chunk);
        pool.emplace_back([&body, &errors, w, begin, end] {
            try {
                body(begin, end);
            } catch (...) {
                errors[static_cast<size_t>(w)] = std::current_exception();
            }
        });
    }
    for (auto& t : pool) t.join();
    for (auto& e : errors)
        if (e) std::rethrow_exception(e);
}

template <typename Fn>
auto dispatch(DType dtype, Fn&& fn) {
    switch (dtype) {
        case DType::u8: return fn(uint8_t{});
        case DType::i16: return fn(int16_t{});
        case DType::u16: return fn(uint16_t{});
        case DType::i32: return fn(int32_t{});
        case DType::f32: return fn(float{});
        case DType::f64: return fn(double{});
    }
    throw std::invalid_argument("unsupported dtype");
}

// Calls fn(x, y, value) for every voxel of axial slice k. When y is the faster axis it is
// walked innermost; when x is (Fortran order, as nibabel gives), x runs of kTile voxels are
// walked innermost, y by y, so that writes to an x-major buffer stay within kTile cache lines.
template <typename T, typename Fn>
void for_each_voxel(const VolumeView& v, int64_t k, Fn&& fn) {
    constexpr int64_t kTile = 32;
    const T* base = static_cast<const T*>(v.data) + k * v.strides[2];
    const int64_t nx = v.shape[0], ny = v.shape[1], sx = v.strides[0], sy = v.strides[1];
    if (std::llabs(sy) <= std::llabs(sx)) {
        for (int64_t x = 0; x < nx; ++x)
            for (int64_t y = 0; y < ny; ++y) fn(x, y, base[x * sx + y * sy]);
        return;
    }
    for (int64_t x0 = 0; x0 < nx; x0 += kTile) {
        const int64_t x1 = std::min(nx, x0 + kTile);
        for (int64_t y = 0; y < ny; ++y)
            for (int64_t x = x0; x < x1; ++x) fn(x, y, base[x * sx + y * sy]);
    }
}

// Axes ordered from the largest stride to the smallest: loops in this order stream memory.
std::array<size_t, 3> memory_order(const VolumeView& v) {
    std::array<size_t, 3> axes{0, 1, 2};
    std::sort(axes.begin(), axes.end(), [&](size_t a, size_t b) {
        return std::llabs(v.strides[a]) > std::llabs(v.strides[b]);
    });
    return axes;
}

struct Partial {
    int64_t count = 0;
    double mean = 0.0;
    double m2 = 0.0;  // sum of squared deviations from mean
    int64_t nonfinite = 0;
};

template <typename T>
Partial slice_partial(const VolumeView& v, int64_t k, bool want_moments) {
    Partial p;
    double sum = 0.0;
    for_each_voxel<T>(v, k, [&](int64_t, int64_t, T value) {
        if constexpr (std::is_floating_point_v<T>) {
            if (!std::isfinite(value)) {
                ++p.nonfinite;
                return;
            }
        }
        if (value != T(0)) {
            ++p.count;
            sum += static_cast<double>(value);
        }
    });
    if (!want_moments || p.count == 0 || p.nonfinite > 0) return p;
    p.mean = sum / static_cast<double>(p.count);
    for_each_voxel<T>(v, k, [&](int64_t, int64_t, T value) {
        if (value != T(0)) {
            const double d = static_cast<double>(value) - p.mean;
            p.m2 += d * d;
        }
    });
    return p;
}

// Chan et al.'s pairwise combination, applied in slice order so the result is deterministic.
Partial combine(const Partial& a, const Partial& b) {
    Partial r;
    r.nonfinite = a.nonfinite + b.nonfinite;
    r.count = a.count + b.count;
    if (r.count == 0) return r;
    const double na = static_cast<double>(a.count), nb = static_cast<double>(b.count);
    const double delta = b.mean - a.mean;
    r.mean = a.mean + delta * nb / (na + nb);
    r.m2 = a.m2 + b.m2 + delta * delta * na * nb / (na + nb);
    return r;
}

// Linear-interpolated quantile (NumPy's default method) of values, reordered in place.
double quantile(std::vector<double>& values, double q) {
    const double position = q * static_cast<double>(values.size() - 1);
    const auto lower = static_cast<std::ptrdiff_t>(std::floor(position));
    auto it = values.begin() + lower;
    std::nth_element(values.begin(), it, values.end());
    const double low = *it;
    if (it + 1 == values.end()) return low;
    const double high = *std::min_element(it + 1, values.end());
    return low + (high - low) * (position - static_cast<double>(lower));
}

template <typename T>
std::vector<double> gather_foreground(const VolumeView& v, const std::vector<Partial>& parts,
                                      int threads) {
    std::vector<int64_t> offsets(parts.size() + 1, 0);
    for (size_t k = 0; k < parts.size(); ++k) offsets[k + 1] = offsets[k] + parts[k].count;
    std::vector<double> values(static_cast<size_t>(offsets.back()));
    parallel_for(v.shape[2], threads, [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
            double* dst = values.data() + offsets[static_cast<size_t>(k)];
            for_each_voxel<T>(v, k, [&](int64_t, int64_t, T value) {
                if (value != T(0)) *dst++ = static_cast<double>(value);
            });
        }
    });
    return values;
}

template <typename T>
constexpr bool kHistogrammable = std::is_integral_v<T> && sizeof(T) <= 2;

void throw_if_nonfinite(int64_t nonfinite) {
    if (nonfinite == 0) return;
    std::ostringstream os;
    os << "volume contains " << nonfinite << " NaN/Inf voxels; they are rejected, not "
       << "treated as background: repair the scan or replace them (np.nan_to_num)";
    throw std::invalid_argument(os.str());
}

NormStats finish_stats(Norm norm, int64_t count, double mean, double variance, double low,
                       double high) {
    NormStats stats;
    stats.foreground = count;
    if (norm == Norm::none) return stats;
    if (count == 0)
        throw std::invalid_argument("volume has no foreground (every voxel is 0): empty scan");
    if (norm == Norm::zscore) {
        if (!(variance > 0.0))
            throw std::invalid_argument("volume foreground is constant (std = 0): nothing to normalise");
        stats.offset = mean;
        stats.scale = 1.0 / std::sqrt(variance);
        return stats;
    }
    if (!(high > low))
        throw std::invalid_argument("volume foreground is constant (0.5 and 99.5 percentiles are equal)");
    stats.offset = low;
    stats.scale = 1.0 / (high - low);
    return stats;
}

// 8/16-bit integers, z-score: exact count, sum and sum of squares of the foreground (so the
// order in which threads add them up cannot change the result), in one vectorised pass.
template <typename T>
IntMoments int_moments(const VolumeView& v, int threads) {
    const std::array<size_t, 3> order = memory_order(v);  // order is irrelevant to sums
    const size_t outer = order[0], middle = order[1], inner = order[2];
    const int64_t n_mid = v.shape[middle], n_in = v.shape[inner];
    const int64_t s_mid = v.strides[middle], s_in = v.strides[inner];
    // Rows of unit stride are read as contiguous runs (from their lowest address), and a plane
    // of such rows one after the other as one run.
    const bool unit = std::llabs(s_in) == 1;
    const bool dense_plane = unit && std::llabs(s_mid) == n_in;
    IntMoments total;
    std::mutex merge;
    parallel_for(v.shape[outer], threads, [&](int64_t begin, int64_t end) {
        IntMoments m;
        for (int64_t i = begin; i < end; ++i) {
            const T* plane = static_cast<const T*>(v.data) + i * v.strides[outer];
            if (dense_plane) {
                const T* first = plane + std::min<int64_t>(0, (n_mid - 1) * s_mid) +
                                 std::min<int64_t>(0, (n_in - 1) * s_in);
                detail::add_moments(first, n_mid * n_in, m);
                continue;
            }
            for (int64_t j = 0; j < n_mid; ++j) {
                const T* row = plane + j * s_mid;
                if (unit) {
                    detail::add_moments(s_in == 1 ? row : row - (n_in - 1), n_in, m);
                } else {
                    for (int64_t k = 0; k < n_in; ++k) detail::add_moments(row + k * s_in, 1, m);
                }
            }
        }
        std::lock_guard<std::mutex> lock(merge);
        total.count += m.count;
        total.sum += m.sum;
        total.sum_sq += m.sum_sq;
    });
    return total;
}

NormStats zscore_stats(const IntMoments& m) {
    if (m.count == 0) return finish_stats(Norm::zscore, 0, 0.0, 0.0, 0.0, 0.0);
    const double n = static_cast<double>(m.count);
    const double mean = static_cast<double>(m.sum) / n;
    const auto abs_sum = static_cast<uint64_t>(m.sum < 0 ? -m.sum : m.sum);
    const detail::U128 numerator = detail::subtract(
        detail::multiply(m.sum_sq, static_cast<uint64_t>(m.count)), detail::multiply(abs_sum, abs_sum));
    const double variance = detail::to_double(numerator) / (n * n);
    return finish_stats(Norm::zscore, m.count, mean, variance, 0.0, 0.0);
}

// 8/16-bit integers, percentiles: one pass building a histogram per thread (exact integer
// counts, so the merge order cannot change the result); percentiles are read off it exactly.
template <typename T>
NormStats percentile_stats(const VolumeView& v, int threads) {
    constexpr int64_t kOffset = -static_cast<int64_t>(std::numeric_limits<T>::min());
    constexpr size_t kBins = size_t{1} << (8 * sizeof(T));
    std::vector<std::vector<int64_t>> partial;
    std::mutex merge;
    const std::array<size_t, 3> order = memory_order(v);  // order is irrelevant to a histogram
    const size_t outer = order[0], middle = order[1], inner = order[2];
    parallel_for(v.shape[outer], threads, [&](int64_t begin, int64_t end) {
        std::vector<int64_t> hist(kBins, 0);
        for (int64_t i = begin; i < end; ++i)
            for (int64_t j = 0; j < v.shape[middle]; ++j) {
                const T* row = static_cast<const T*>(v.data) + i * v.strides[outer] + j * v.strides[middle];
                // Skipping background avoids a chain of increments of one counter.
                auto count = [&](T value) {
                    if (value != T(0)) ++hist[static_cast<size_t>(static_cast<int64_t>(value) + kOffset)];
                };
                const int64_t step = v.strides[inner], n = v.shape[inner];
                if (step == 1) {
                    for (const T* p = row; p != row + n; ++p) count(*p);
                } else {
                    for (int64_t k = 0; k < n; ++k) count(row[k * step]);
                }
            }
        std::lock_guard<std::mutex> lock(merge);
        partial.push_back(std::move(hist));
    });
    std::vector<int64_t> hist(kBins, 0);
    for (const auto& h : partial)
        for (size_t b = 0; b < kBins; ++b) hist[b] += h[b];
    int64_t count = 0;
    for (size_t b = 0; b < kBins; ++b) count += hist[b];
    if (count == 0) return finish_stats(Norm::percentile, 0, 0.0, 0.0, 0.0, 0.0);
    // NumPy's linear percentile: the value of rank floor(q (n - 1)) and the next one.
    auto value_at_rank = [&](int64_t rank) {
        int64_t seen = 0;
        for (size_t b = 0; b < kBins; ++b) {
            seen += hist[b];
            if (seen > rank) return static_cast<double>(static_cast<int64_t>(b) - kOffset);
        }
        return 0.0;
    };
    auto percentile = [&](double q) {
        const double position = q * static_cast<double>(count - 1);
        const auto rank = static_cast<int64_t>(std::floor(position));
        const double low = value_at_rank(rank);
        const double high = rank + 1 < count ? value_at_rank(rank + 1) : low;
        return low + (high - low) * (position - static_cast<double>(rank));
    };
    return finish_stats(Norm::percentile, count, 0.0, 0.0, percentile(0.005), percentile(0.995));
}

// Wider integers and floats: per-slice mean and squared deviations (two passes over a slice
// in cache), combined in slice order; percentiles by selection on the gathered foreground.
template <typename T>
NormStats moment_stats(const VolumeView& v, Norm norm, int threads) {
    std::vector<Partial> parts(static_cast<size_t>(v.shape[2]));
    parallel_for(v.shape[2], threads, [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k)
            parts[static_cast<size_t>(k)] = slice_partial<T>(v, k, norm == Norm::zscore);
    });
    Partial total;
    for (const Partial& p : parts) total = combine(total, p);
    throw_if_nonfinite(total.nonfinite);
    double low = 0.0, high = 0.0;
    if (norm == Norm::percentile && total.count > 0) {
        std::vector<double> values = gather_foreground<T>(v, parts, threads);
        low = quantile(values, 0.005);
        high = quantile(values, 0.995);
    }
    const double variance = total.count > 0 ? total.m2 / static_cast<double>(total.count) : 0.0;
    return finish_stats(norm, total.count, total.mean, variance, low, high);
}

template <typename T>
NormStats typed_stats(const VolumeView& v, Norm norm, int threads) {
    if constexpr (kHistogrammable<T>) {
        if (norm == Norm::none) return {};
        if (norm == Norm::zscore) return zscore_stats(int_moments<T>(v, threads));
        return percentile_stats<T>(v, threads);
    } else {
        return moment_stats<T>(v, norm, threads);
    }
}

bool z_is_fastest(const VolumeView& v) {
    const int64_t sz = std::llabs(v.strides[2]);
    return sz < std::llabs(v.strides[0]) && sz < std::llabs(v.strides[1]);
}

// Normalises voxels (x0 + x, y0 + y), x < nx, y < ny, of slices indices[0..count) into
// out[s * out_plane + x * out_row + y]. Rows along y are normalised in place when y is the
// faster in-plane axis, else from a buffer that tiles transpose them into: blocks of rows of
// a slice when x is fastest (Fortran order), and when z is (a C-ordered (x, y, z) array)
// runs of up to kTile consecutive slices of a few rows, so that each cache line of the input
// is read once and the output is written in runs of rows.
template <typename T>
void normalise_slices(const VolumeView& v, const int64_t* indices, int64_t count, int64_t x0,
                      int64_t nx, int64_t y0, int64_t ny, float* out, int64_t out_plane,
                      int64_t out_row, const Affine& f) {
    constexpr int64_t kTile = detail::kTile;
    const int64_t sx = v.strides[0], sy = v.strides[1], sz = v.strides[2];
    const T* data = static_cast<const T*>(v.data) + x0 * sx + y0 * sy;
    const bool z_fast = z_is_fastest(v);
    if (!z_fast && std::llabs(sy) <= std::llabs(sx)) {
        for (int64_t s = 0; s < count; ++s)
            for (int64_t x = 0; x < nx; ++x) {
                const T* src = data + indices[s] * sz + x * sx;
                float* dst = out + s * out_plane + x * out_row;
                if (sy == 1) {
                    detail::normalise_row(src, ny, dst, f);
                } else {
                    for (int64_t y = 0; y < ny; ++y)
                        dst[y] = normalise_value(static_cast<double>(src[y * sy]), f);
                }
            }
        return;
    }
    if (!z_fast) {
        std::vector<T> rows(static_cast<size_t>(kTile * ny));
        for (int64_t s = 0; s < count; ++s)
            for (int64_t xa = 0; xa < nx; xa += kTile) {
                const int64_t xb = std::min(kTile, nx - xa);
                detail::transpose(data + indices[s] * sz + xa * sx, ny, xb, sy, sx, rows.data(),
                                  ny);
                for (int64_t x = 0; x < xb; ++x)
                    detail::normalise_row(rows.data() + x * ny, ny,
                                          out + s * out_plane + (xa + x) * out_row, f);
            }
        return;
    }
    // Maximal runs of consecutive slices (start, length, direction +-1), read kTile at a time
    // (the remainder first, so that it can still read a whole tile when the run goes on).
    std::vector<std::array<int64_t, 3>> runs;
    for (int64_t s = 0; s < count;) {
        const int64_t d = s + 1 < count && indices[s + 1] == indices[s] - 1 ? -1 : 1;
        int64_t length = 1;
        while (s + length < count && indices[s + length] == indices[s] + length * d) ++length;
        runs.push_back({s, length, d});
        s += length;
    }
    const int64_t block = std::clamp(int64_t{32768} / ny, int64_t{1}, int64_t{8});  // rows of x
    std::vector<T> rows(static_cast<size_t>(kTile * block * ny));  // [slice][x][y]
    for (int64_t xa = 0; xa < nx; xa += block) {
        const int64_t xb = std::min(block, nx - xa);
        for (const auto& [first, length, d] : runs)
            for (int64_t s = first; s < first + length;) {
                const int64_t n = s == first && length % kTile != 0 ? length % kTile : kTile;
                const int64_t read = std::min(kTile, first + length - s);
                for (int64_t x = 0; x < xb; ++x)
                    detail::transpose(data + indices[s] * sz + (xa + x) * sx, ny, read, sy,
                                      d * sz, rows.data() + x * ny, xb * ny);
                for (int64_t j = 0; j < n; ++j)
                    for (int64_t x = 0; x < xb; ++x)
                        detail::normalise_row(rows.data() + (j * xb + x) * ny, ny,
                                              out + (s + j) * out_plane + (xa + x) * out_row, f);
                s += n;
            }
    }
}

// Input index of each output pixel when the taps fall exactly on input pixel centres (same
// spacing, integer offset: BraTS 1 mm data cropped to 224), with -1 outside; empty otherwise.
std::vector<int64_t> aligned_index(const Taps& taps, int64_t n_in) {
    std::vector<int64_t> index;
    for (size_t o = 0; o < taps.i0.size(); ++o) {
        if (taps.w1[o] != 0.0f) return {};
        const int64_t i = taps.i0[o] - 1;
        index.push_back(taps.w0[o] != 0.0f && i >= 0 && i < n_in ? i : -1);
    }
    return index;
}

// The output pixels [lo, hi) of an aligned index that lie inside the input, which read the
// consecutive input pixels first, first + 1, ...; false if the index is not of that form.
struct AlignedAxis {
    int64_t lo = 0, hi = 0, first = 0;
};

bool aligned_axis(const std::vector<int64_t>& index, AlignedAxis& axis) {
    const auto n = static_cast<int64_t>(index.size());
    auto at = [&](int64_t o) { return index[static_cast<size_t>(o)]; };
    while (axis.lo < n && at(axis.lo) < 0) ++axis.lo;
    axis.hi = axis.lo;
    if (axis.lo < n) axis.first = at(axis.lo);
    while (axis.hi < n && at(axis.hi) == axis.first + (axis.hi - axis.lo)) ++axis.hi;
    for (int64_t o = axis.hi; o < n; ++o)
        if (at(o) >= 0) return false;
    return n > 0;
}

// Zero outside rows [rows.lo, rows.hi) and columns [cols.lo, cols.hi) of an output slice.
void zero_borders(const AlignedAxis& rows, const AlignedAxis& cols, int64_t n_rows,
                  int64_t n_cols, float* out) {
    std::fill(out, out + rows.lo * n_cols, 0.0f);
    std::fill(out + rows.hi * n_cols, out + n_rows * n_cols, 0.0f);
    for (int64_t h = rows.lo; h < rows.hi; ++h) {
        std::fill(out + h * n_cols, out + h * n_cols + cols.lo, 0.0f);
        std::fill(out + h * n_cols + cols.hi, out + (h + 1) * n_cols, 0.0f);
    }
}

std::array<int64_t, 2> clamped(const std::array<int64_t, 2>& range, int64_t n) {
    return {std::clamp<int64_t>(range[0], 0, n), std::clamp<int64_t>(range[1], 0, n)};
}

}  // namespace

Norm parse_norm(const std::string& name) {
    if (name == "zscore") return Norm::zscore;
    if (name == "percentile") return Norm::percentile;
    if (name == "none") return Norm::none;
    throw std::invalid_argument("norm must be one of zscore, percentile, none; got '" + name + "'");
}

NormStats volume_stats(const VolumeView& volume, Norm norm, int threads) {
    check_volume(volume, "volume");
    return dispatch(volume.dtype, [&](auto tag) {
        return typed_stats<decltype(tag)>(volume, norm, threads);
    });
}

void slices(const VolumeView& volume, const SliceGeometry& g, Norm norm,
            const int64_t* slice_indices, int64_t n_indices, int threads, float* out) {
    check_geometry(volume, g, slice_indices, n_indices, "volume");
    const NormStats stats = volume_stats(volume, norm, threads);
    const int64_t nx = volume.shape[0], ny = volume.shape[1];
    const PlaneResampler resampler(g.size, {nx, ny}, {g.spacing[0], g.spacing[1]}, g.target_spacing);
    // check_geometry bounded nx, ny, H and W: these products are checked once more, so that a
    // change of a limit cannot make them wrap silently.
    const int64_t row_len = ny + 2;
    const int64_t padded_plane = checked_product(nx + 2, row_len, kMaxPadded, "padded slice");
    const int64_t plane = checked_product(g.size[0], g.size[1], kMaxSide * kMaxSide, "output slice");
    checked_product(n_indices, plane, kMaxFloats, "output size");
    const bool z_fast = z_is_fastest(volume);
    const int64_t block = z_fast ? std::clamp(kBlockFloats / padded_plane, int64_t{1}, kMaxBlock) : 1;
    const auto block_floats = static_cast<size_t>(checked_product(block, padded_plane, kMaxPadded, "slice block"));
    // Copying without interpolation is exact only when no axis downsamples (a 2x downsampling
    // would align too, and decimate).
    AlignedAxis rows, cols;
    const bool aligned_geometry =
        resampler.bilinear() && aligned_axis(aligned_index(resampler.row_taps(), nx), rows) &&
        aligned_axis(aligned_index(resampler.col_taps(), ny), cols);
    const Affine f{stats.offset, stats.scale, norm == Norm::percentile};
    dispatch(volume.dtype, [&](auto tag) {
        using T = decltype(tag);
        // The bilinear path gives a copy's bits (1 x + 0 y = x) but for a -0 (an underflow of a
        // float voxel's normalisation), so float volumes with z fastest keep interpolating.
        if (aligned_geometry && (!z_fast || std::is_integral_v<T>)) {
            parallel_for(n_indices, threads, [&](int64_t begin, int64_t end) {
                for (int64_t s = begin; s < end; ++s)
                    zero_borders(rows, cols, g.size[0], g.size[1], out + s * plane);
                if (end > begin && rows.hi > rows.lo && cols.hi > cols.lo)
                    normalise_slices<T>(volume, slice_indices + begin, end - begin, rows.first,
                                        rows.hi - rows.lo, cols.first, cols.hi - cols.lo,
                                        out + begin * plane + rows.lo * g.size[1] + cols.lo,
                                        plane, g.size[1], f);
            });
            return;
        }
        // only the voxels that some output reads (a small model grid reads the centre)
        const std::array<int64_t, 2> xs = clamped(resampler.inputs_read(0), nx),
                                     ys = clamped(resampler.inputs_read(1), ny);
        parallel_for(n_indices, threads, [&](int64_t begin, int64_t end) {
            std::vector<float> padded(block_floats, 0.0f), scratch;  // zeros where not read
            for (int64_t s = begin; s < end; s += block) {
                const int64_t count = std::min(block, end - s);
                if (xs[1] > xs[0] && ys[1] > ys[0])
                    normalise_slices<T>(volume, slice_indices + s, count, xs[0], xs[1] - xs[0],
                                        ys[0], ys[1] - ys[0],
                                        padded.data() + (xs[0] + 1) * row_len + ys[0] + 1,
                                        padded_plane, row_len, f);
                for (int64_t j = 0; j < count; ++j)
                    resampler.run(padded.data() + j * padded_plane, row_len,
                                  out + (s + j) * plane, g.size[1], 1, scratch);
            }
        });
    });
}

void mask_slices(const VolumeView& labels, const SliceGeometry& g, const int64_t* slice_indices,
                 int64_t n_indices, int threads, uint8_t* out) {
    check_geometry(labels, g, slice_indices, n_indices, "labels");
    const auto ix = detail::nearest_taps(g.size[0], labels.shape[0], g.spacing[0], g.target_spacing[0]);
    const auto iy = detail::nearest_taps(g.size[1], labels.shape[1], g.spacing[1], g.target_spacing[1]);
    const int64_t plane = checked_product(g.size[0], g.size[1], kMaxSide * kMaxSide, "output slice");
    checked_product(n_indices, plane, kMaxFloats, "output size");
    dispatch(labels.dtype, [&](auto tag) {
        using T = decltype(tag);
        parallel_for(n_indices, threads, [&](int64_t begin, int64_t end) {
            for (int64_t s = begin; s < end; ++s) {
                const T* base = static_cast<const T*>(labels.data) + slice_indices[s] * labels.strides[2];
                uint8_t* dst = out + s * plane;
                for (size_t h = 0; h < ix.size(); ++h)
                    for (size_t w = 0; w < iy.size(); ++w) {
                        const bool inside = ix[h] >= 0 && iy[w] >= 0;
                        *dst++ = inside && base[ix[h] * labels.strides[0] + iy[w] * labels.strides[1]] > T(0);
                    }
            }
        });
    });
}

void lesion_areas(const VolumeView& labels, const std::array<double, 3>& spacing,
                  const int64_t* slice_indices, int64_t n_indices, int threads, double* out) {
    check_volume(labels, "labels");
    check_spacing(spacing, "spacing");
    check_indices(slice_indices, n_indices, labels.shape[2]);
    const double pixel_area = spacing[0] * spacing[1];
    if (!std::isfinite(pixel_area))
        throw std::invalid_argument("spacing: the in-plane pixel area (mm2) overflows a double");
    dispatch(labels.dtype, [&](auto tag) {
        using T = decltype(tag);
        parallel_for(n_indices, threads, [&](int64_t begin, int64_t end) {
            for (int64_t s = begin; s < end; ++s) {
                int64_t count = 0;
                for_each_voxel<T>(labels, slice_indices[s],
                                  [&](int64_t, int64_t, T value) { count += value > T(0); });
                out[s] = static_cast<double>(count) * pixel_area;
            }
        });
    });
}

void foreground_counts(const VolumeView& volume, int threads, int64_t* out) {
    check_volume(volume, "volume");
    dispatch(volume.dtype, [&](auto tag) {
        using T = decltype(tag);
        const int64_t nx = volume.shape[0], ny = volume.shape[1], sy = volume.strides[1];
        parallel_for(volume.shape[2], threads, [&](int64_t begin, int64_t end) {
            for (int64_t k = begin; k < end; ++k) {
                int64_t count = 0;
                if (volume.strides[0] == 1) {  // rows of contiguous voxels (Fortran order):
                    const T* plane = static_cast<const T*>(volume.data) + k * volume.strides[2];
                    for (int64_t y = 0; y < ny; ++y) {  // a loop the compiler vectorises
                        const T* row = plane + y * sy;
                        int32_t in_row = 0;  // nx <= kMaxAxis: narrow lanes, more per vector
                        for (int64_t x = 0; x < nx; ++x) in_row += row[x] != T(0);
                        count += in_row;
                    }
                } else {
                    for_each_voxel<T>(volume, k,
                                      [&](int64_t, int64_t, T value) { count += value != T(0); });
                }
                out[k] = count;
            }
        });
    });
}

namespace {

// {first row, last row, first column, last column} of a zero-padded model-grid slice's values
// at or above `bound` (first > last: none), in the unpadded slice's indices.
std::array<int64_t, 4> reaching(const float* padded, int64_t row_len,
                                const std::array<int64_t, 2>& size, float bound) {
    std::array<int64_t, 4> box{size[0], -1, size[1], -1};
    for (int64_t h = 0; h < size[0]; ++h) {
        const float* row = padded + (h + 1) * row_len + 1;
        int64_t first = size[1], last = -1;
        for (int64_t w = 0; w < size[1]; ++w)
            if (row[w] >= bound) {
                first = std::min(first, w);
                last = w;
            }
        if (last < 0) continue;
        box = {std::min(box[0], h), h, std::min(box[2], first), std::max(box[3], last)};
    }
    return box;
}

// The checks and the slice loop shared by to_original and to_original_mask: each listed slice,
// zero-padded, goes to write(s, padded, row_len, resampler, scratch) on one of the threads.
template <typename V, typename Write>
void for_each_original_slice(const V* values, const std::array<int64_t, 2>& size,
                             const std::array<int64_t, 3>& out_shape,
                             const std::array<int64_t, 3>& out_strides,
                             const std::array<double, 3>& spacing,
                             const std::array<double, 2>& target_spacing,
                             const int64_t* slice_indices, int64_t n_indices, int threads,
                             Write&& write) {
    detail::check_model_grid(size);
    detail::check_shape(out_shape, "original grid");
    detail::check_disjoint(out_shape, out_strides, "original-grid output");
    check_spacing(spacing, "spacing");
    check_spacing(target_spacing, "target_spacing");
    detail::check_ratio(spacing, target_spacing);
    check_indices(slice_indices, n_indices, out_shape[2]);
    detail::check_unique(slice_indices, n_indices, out_shape[2]);
    if (n_indices == 0) return;  // nothing to write: allocate nothing
    // The inverse map: original pixels sample the model grid (spacing target_spacing).
    const PlaneResampler resampler({out_shape[0], out_shape[1]}, size, target_spacing,
                                   {spacing[0], spacing[1]});
    const int64_t row_len = size[1] + 2;
    const int64_t plane = checked_product(size[0], size[1], kMaxSide * kMaxSide, "model-grid slice");
    checked_product(n_indices, plane, kMaxFloats, "model-grid values");
    const auto padded_floats = static_cast<size_t>(
        checked_product(size[0] + 2, row_len, (kMaxSide + 2) * (kMaxSide + 2), "padded slice"));
    parallel_for(n_indices, threads, [&](int64_t begin, int64_t end) {
        std::vector<float> padded(padded_floats, 0.0f), scratch;
        for (int64_t s = begin; s < end; ++s) {
            for (int64_t h = 0; h < size[0]; ++h) {
                const V* row = values + s * plane + h * size[1];
                float* to = padded.data() + (h + 1) * row_len + 1;
                if constexpr (std::is_same_v<V, uint16_t>)
                    detail::from_half(row, size[1], to);
                else
                    std::copy_n(row, size[1], to);
            }
            write(s, padded.data(), row_len, resampler, scratch);
        }
    });
}

}  // namespace

void lesion_pixels(const float* logits, const float* images, int64_t n_slices,
                   int64_t slice_len, int64_t* counts, uint16_t* probs,
                   uint16_t* image_halves) {
    if (n_slices < 0 || slice_len < 0 ||
        (n_slices > 0 && (logits == nullptr || images == nullptr || counts == nullptr)))
        throw std::invalid_argument("lesion_pixels: no data");
    for (int64_t s = 0; s < n_slices; ++s) {
        const int64_t first = s * slice_len;
        counts[s] = detail::lesion_pixels(logits + first, images + first, slice_len,
                                          probs == nullptr ? nullptr : probs + first,
                                          image_halves == nullptr ? nullptr : image_halves + first);
    }
}

void to_original(const float* values, const std::array<int64_t, 2>& size,
                 const std::array<int64_t, 3>& out_shape,
                 const std::array<int64_t, 3>& out_strides,
                 const std::array<double, 3>& spacing,
                 const std::array<double, 2>& target_spacing, const int64_t* slice_indices,
                 int64_t n_indices, int threads, float* out) {
    if (values == nullptr || out == nullptr) throw std::invalid_argument("to_original: no data");
    for_each_original_slice(
        values, size, out_shape, out_strides, spacing, target_spacing, slice_indices, n_indices,
        threads, [&](int64_t s, const float* padded, int64_t row_len,
                     const PlaneResampler& resampler, std::vector<float>& scratch) {
            resampler.run(padded, row_len, out + slice_indices[s] * out_strides[2],
                          out_strides[0], out_strides[1], scratch);
        });
}

template <typename V>
void to_original_mask(const V* values, const std::array<int64_t, 2>& size,
                      const std::array<int64_t, 3>& out_shape,
                      const std::array<int64_t, 3>& out_strides,
                      const std::array<double, 3>& spacing,
                      const std::array<double, 2>& target_spacing, const int64_t* slice_indices,
                      int64_t n_indices, float threshold, int threads, uint8_t* out) {
    if (values == nullptr || out == nullptr)
        throw std::invalid_argument("to_original_mask: no data");
    if (!(threshold > 0.0f) || !std::isfinite(threshold))
        throw std::invalid_argument("to_original_mask: threshold must be a finite number > 0");
    const int64_t nx = out_shape[0], ny = out_shape[1];
    // Resampled values are non-negative-weighted sums of the inputs and zeros, weights summing
    // to at most 1: none exceeds max(0, the largest input it weighs). Outputs that weigh no
    // input at or above the threshold (with room for the rounding of those sums) are zero,
    // so only the window of outputs around the slice's inputs that reach it is resampled.
    const float skip_below = threshold * (1.0f - 1e-5f);
    for_each_original_slice(
        values, size, out_shape, out_strides, spacing, target_spacing, slice_indices, n_indices,
        threads, [&](int64_t s, const float* padded, int64_t row_len,
                     const PlaneResampler& resampler, std::vector<float>& scratch) {
            uint8_t* dst = out + slice_indices[s] * out_strides[2];
            const int64_t sx = out_strides[0], sy = out_strides[1];
            for (int64_t y = 0; y < ny; ++y) {
                if (sx == 1 || sx == -1)  // rows of contiguous bytes: Fortran order, or the
                    // file's own layout flipped along x (Volume.stored_layout of LPS files)
                    std::memset(dst + y * sy + (sx < 0 ? 1 - nx : 0), 0, static_cast<size_t>(nx));
                else
                    for (int64_t x = 0; x < nx; ++x) dst[x * sx + y * sy] = 0;
            }
            const std::array<int64_t, 4> box = reaching(padded, row_len, size, skip_below);
            if (box[0] > box[1]) return;  // no input reaches the threshold
            const auto rows = resampler.outputs_reading(0, box[0], box[1]);
            const auto cols = resampler.outputs_reading(1, box[2], box[3]);
            const int64_t n_rows = rows[1] - rows[0], n_cols = cols[1] - cols[0];
            if (n_rows == 0 || n_cols == 0) return;  // those inputs lie outside every output
            thread_local std::vector<float> resampled;
            resampled.resize(static_cast<size_t>(n_rows * n_cols));
            resampler.run(padded, row_len, rows, cols, resampled.data(), 1, n_rows, scratch);
            for (int64_t c = 0; c < n_cols; ++c) {
                uint8_t* row = dst + rows[0] * sx + (cols[0] + c) * sy;
                const float* in = resampled.data() + c * n_rows;
                if (sx == 1)  // Fortran order, the usual case: a loop the compiler vectorises
                    for (int64_t x = 0; x < n_rows; ++x) row[x] = in[x] > threshold;
                else
                    for (int64_t x = 0; x < n_rows; ++x) row[x * sx] = in[x] > threshold;
            }
        });
}

template void to_original_mask<float>(const float*, const std::array<int64_t, 2>&,
                                      const std::array<int64_t, 3>&,
                                      const std::array<int64_t, 3>&,
                                      const std::array<double, 3>&,
                                      const std::array<double, 2>&, const int64_t*, int64_t,
                                      float, int, uint8_t*);
template void to_original_mask<uint16_t>(const uint16_t*, const std::array<int64_t, 2>&,
                                         const std::array<int64_t, 3>&,
                                         const std::array<int64_t, 3>&,
                                         const std::array<double, 3>&,
                                         const std::array<double, 2>&, const int64_t*, int64_t,
                                         float, int, uint8_t*);

}  // namespace ubc
