#include "preprocess.hpp"

#include "checks.hpp"
#include "resample.hpp"
#include "wide_int.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
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

// 8/16-bit integers: one pass building a histogram per thread (exact integer counts, so the
// merge order cannot change the result); moments and percentiles are read off it exactly.
template <typename T>
NormStats histogram_stats(const VolumeView& v, Norm norm, int threads) {
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
    // Exact sums: |v| <= 2^16 and count <= kMaxVoxels = 2^30, so sum fits 47 bits, sum_sq 62.
    int64_t count = 0, sum = 0;
    uint64_t sum_sq = 0;
    for (size_t b = 0; b < kBins; ++b) {
        const int64_t value = static_cast<int64_t>(b) - kOffset;
        count += hist[b];
        sum += value * hist[b];
        sum_sq += static_cast<uint64_t>(value * value) * static_cast<uint64_t>(hist[b]);
    }
    if (count == 0 || norm == Norm::none) return finish_stats(norm, count, 0.0, 0.0, 0.0, 0.0);
    const double n = static_cast<double>(count);
    const double mean = static_cast<double>(sum) / n;
    const auto abs_sum = static_cast<uint64_t>(sum < 0 ? -sum : sum);
    const detail::U128 numerator = detail::subtract(
        detail::multiply(sum_sq, static_cast<uint64_t>(count)), detail::multiply(abs_sum, abs_sum));
    const double variance = detail::to_double(numerator) / (n * n);
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
    const double low = norm == Norm::percentile ? percentile(0.005) : 0.0;
    const double high = norm == Norm::percentile ? percentile(0.995) : 0.0;
    return finish_stats(norm, count, mean, variance, low, high);
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
        return histogram_stats<T>(v, norm, threads);
    } else {
        return moment_stats<T>(v, norm, threads);
    }
}

float normalise_value(double value, const NormStats& stats, bool clip) {
    if (value == 0.0) return 0.0f;  // background stays exactly 0
    double n = (value - stats.offset) * stats.scale;
    if (clip) n = std::clamp(n, 0.0, 1.0);
    return static_cast<float>(n);
}

// Maps a voxel value to its normalised float. 8/16-bit inputs go through a table of every
// representable value (at most 256 KiB, built once per volume), so a voxel costs one lookup.
template <typename T>
class Normaliser {
public:
    Normaliser(const NormStats& stats, Norm norm) : stats_(stats), clip_(norm == Norm::percentile) {
        if constexpr (kHistogrammable<T>) {
            table_.resize(size_t{1} << (8 * sizeof(T)));
            for (size_t b = 0; b < table_.size(); ++b)
                table_[b] = normalise_value(static_cast<double>(static_cast<int64_t>(b) + kMin), stats_, clip_);
        }
    }
    float operator()(T value) const {
        if constexpr (kHistogrammable<T>)
            return table_[static_cast<size_t>(static_cast<int64_t>(value) - kMin)];
        else
            return normalise_value(static_cast<double>(value), stats_, clip_);
    }

private:
    static constexpr int64_t kMin = static_cast<int64_t>(std::numeric_limits<T>::min());
    NormStats stats_;
    bool clip_;
    std::vector<float> table_;
};

// Normalises slices indices[0..count) into zero-padded [nx + 2, ny + 2] buffers. When z is the
// volume's fastest axis (a C-ordered (x, y, z) array, or a sagittal file reoriented), the block
// is read along z so that each cache line is used once, not once per slice.
template <typename T>
void normalise_block(const VolumeView& v, const int64_t* indices, int64_t count,
                     const Normaliser<T>& normalise, std::vector<float>& padded, int64_t row_len) {
    const int64_t plane = (v.shape[0] + 2) * row_len;
    const T* data = static_cast<const T*>(v.data);
    if (count == 1) {
        for_each_voxel<T>(v, indices[0], [&](int64_t x, int64_t y, T value) {
            padded[static_cast<size_t>((x + 1) * row_len + (y + 1))] = normalise(value);
        });
        return;
    }
    for (int64_t x = 0; x < v.shape[0]; ++x)
        for (int64_t y = 0; y < v.shape[1]; ++y) {
            const T* column = data + x * v.strides[0] + y * v.strides[1];
            float* dst = padded.data() + (x + 1) * row_len + (y + 1);
            for (int64_t j = 0; j < count; ++j)
                dst[j * plane] = normalise(column[indices[j] * v.strides[2]]);
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

// Offsets (elements) of the valid entries of an aligned index, and the valid range [lo, hi):
// the index is monotonic, so the pixels inside the input form one run.
struct AlignedAxis {
    int64_t lo = 0, hi = 0;
    std::vector<int64_t> offset;  // offset[o] = index[o] * stride, for o in [lo, hi)
};

AlignedAxis aligned_axis(const std::vector<int64_t>& index, int64_t stride) {
    AlignedAxis axis;
    axis.offset.resize(index.size(), 0);
    while (axis.lo < static_cast<int64_t>(index.size()) && index[static_cast<size_t>(axis.lo)] < 0) ++axis.lo;
    axis.hi = axis.lo;
    while (axis.hi < static_cast<int64_t>(index.size()) && index[static_cast<size_t>(axis.hi)] >= 0) {
        axis.offset[static_cast<size_t>(axis.hi)] = index[static_cast<size_t>(axis.hi)] * stride;
        ++axis.hi;
    }
    return axis;
}

// The aligned case needs no interpolation: each output pixel is one normalised input voxel.
// With x the faster input axis, kTile output rows are filled column by column (see
// for_each_voxel) so that reads run along x and writes stay within kTile cache lines.
template <typename T>
void copy_aligned_slice(const VolumeView& v, int64_t k, const Normaliser<T>& normalise,
                        const AlignedAxis& rows, const AlignedAxis& cols, int64_t n_rows,
                        int64_t n_cols, float* out) {
    constexpr int64_t kTile = 32;
    const T* base = static_cast<const T*>(v.data) + k * v.strides[2];
    std::fill(out, out + rows.lo * n_cols, 0.0f);
    std::fill(out + rows.hi * n_cols, out + n_rows * n_cols, 0.0f);
    for (int64_t h = rows.lo; h < rows.hi; ++h) {
        std::fill(out + h * n_cols, out + h * n_cols + cols.lo, 0.0f);
        std::fill(out + h * n_cols + cols.hi, out + (h + 1) * n_cols, 0.0f);
    }
    const int64_t* row_offset = rows.offset.data();
    const int64_t* col_offset = cols.offset.data();
    if (std::llabs(v.strides[1]) <= std::llabs(v.strides[0])) {
        for (int64_t h = rows.lo; h < rows.hi; ++h) {
            const T* src = base + row_offset[h];
            float* dst = out + h * n_cols;
            for (int64_t w = cols.lo; w < cols.hi; ++w) dst[w] = normalise(src[col_offset[w]]);
        }
        return;
    }
    for (int64_t h0 = rows.lo; h0 < rows.hi; h0 += kTile) {
        const int64_t h1 = std::min(rows.hi, h0 + kTile);
        for (int64_t w = cols.lo; w < cols.hi; ++w) {
            const T* src = base + col_offset[w];
            for (int64_t h = h0; h < h1; ++h) out[h * n_cols + w] = normalise(src[row_offset[h]]);
        }
    }
}

bool z_is_fastest(const VolumeView& v) {
    const int64_t sz = std::llabs(v.strides[2]);
    return sz < std::llabs(v.strides[0]) && sz < std::llabs(v.strides[1]);
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
    const auto ix = resampler.bilinear() ? aligned_index(resampler.row_taps(), nx) : std::vector<int64_t>{};
    const auto iy = resampler.bilinear() ? aligned_index(resampler.col_taps(), ny) : std::vector<int64_t>{};
    const bool aligned = !ix.empty() && !iy.empty() && !z_fast;
    const AlignedAxis aligned_rows = aligned_axis(ix, volume.strides[0]);
    const AlignedAxis aligned_cols = aligned_axis(iy, volume.strides[1]);
    dispatch(volume.dtype, [&](auto tag) {
        using T = decltype(tag);
        const Normaliser<T> normalise(stats, norm);
        if (aligned) {
            parallel_for(n_indices, threads, [&](int64_t begin, int64_t end) {
                for (int64_t s = begin; s < end; ++s)
                    copy_aligned_slice<T>(volume, slice_indices[s], normalise, aligned_rows,
                                          aligned_cols, g.size[0], g.size[1], out + s * plane);
            });
            return;
        }
        parallel_for(n_indices, threads, [&](int64_t begin, int64_t end) {
            std::vector<float> padded(block_floats, 0.0f), scratch;
            for (int64_t s = begin; s < end; s += block) {
                const int64_t count = std::min(block, end - s);
                normalise_block<T>(volume, slice_indices + s, count, normalise, padded, row_len);
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
        parallel_for(volume.shape[2], threads, [&](int64_t begin, int64_t end) {
            for (int64_t k = begin; k < end; ++k) {
                int64_t count = 0;
                for_each_voxel<T>(volume, k, [&](int64_t, int64_t, T value) { count += value != T(0); });
                out[k] = count;
            }
        });
    });
}

void to_original(const float* values, const std::array<int64_t, 2>& size,
                 const std::array<int64_t, 3>& out_shape,
                 const std::array<int64_t, 3>& out_strides,
                 const std::array<double, 3>& spacing,
                 const std::array<double, 2>& target_spacing, const int64_t* slice_indices,
                 int64_t n_indices, int threads, float* out) {
    if (values == nullptr || out == nullptr) throw std::invalid_argument("to_original: no data");
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
            for (int64_t h = 0; h < size[0]; ++h)
                std::copy_n(values + s * plane + h * size[1], size[1],
                            padded.data() + (h + 1) * row_len + 1);
            resampler.run(padded.data(), row_len, out + slice_indices[s] * out_strides[2],
                          out_strides[0], out_strides[1], scratch);
        }
    });
}

}  // namespace ubc
