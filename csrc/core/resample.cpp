#include "resample.hpp"

#include "kernels.hpp"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>

namespace ubc::detail {
namespace {

// Weights of all outputs, at most this many (a bounded ratio keeps real geometries far below).
constexpr int64_t kMaxWeights = int64_t{1} << 26;

void push_weights(Kernel& kernel, int64_t start, const std::vector<float>& weights) {
    kernel.start.push_back(start);
    kernel.count.push_back(static_cast<int64_t>(weights.size()));
    kernel.offset.push_back(kernel.weight.size());
    kernel.weight.insert(kernel.weight.end(), weights.begin(), weights.end());
    if (static_cast<int64_t>(kernel.weight.size()) > kMaxWeights)
        throw std::invalid_argument("resampling kernel too large: target_spacing / spacing "
                                    "and the output size ask for over 2^26 weights");
}

// The bilinear taps as a two-weight kernel (start -1 reads the padding's zero).
Kernel bilinear_kernel(const Taps& taps) {
    Kernel kernel;
    for (size_t o = 0; o < taps.i0.size(); ++o)
        push_weights(kernel, taps.i0[o] - 1, {taps.w0[o], taps.w1[o]});
    return kernel;
}

// A triangle of half-width `ratio` input pixels around each output's source coordinate,
// normalised by its sum over every integer position (inside the input or not).
Kernel footprint_kernel(int64_t n_out, int64_t n_in, double spacing_in, double spacing_out) {
    const double ratio = spacing_out / spacing_in;
    Kernel kernel;
    std::vector<float> weights;
    for (int64_t o = 0; o < n_out; ++o) {
        const double centre = source_coord(o, n_out, n_in, spacing_in, spacing_out);
        const double first = std::ceil(centre - ratio), last = std::floor(centre + ratio);
        double sum = 0.0;  // at most 2 ratio + 1 terms: check_ratio bounds the ratio
        for (double j = first; j <= last; j += 1.0) sum += 1.0 - std::fabs(j - centre) / ratio;
        const double lo = std::max(first, 0.0), hi = std::min(last, static_cast<double>(n_in - 1));
        weights.clear();
        for (double j = lo; j <= hi; j += 1.0)
            weights.push_back(static_cast<float>((1.0 - std::fabs(j - centre) / ratio) / sum));
        push_weights(kernel, weights.empty() ? 0 : static_cast<int64_t>(lo), weights);
    }
    return kernel;
}

}  // namespace

double source_coord(int64_t o, int64_t n_out, int64_t n_in, double spacing_in, double spacing_out) {
    return (static_cast<double>(o) - static_cast<double>(n_out - 1) * 0.5) *
               (spacing_out / spacing_in) +
           static_cast<double>(n_in - 1) * 0.5;
}

Taps linear_taps(int64_t n_out, int64_t n_in, double spacing_in, double spacing_out) {
    Taps taps;
    for (int64_t o = 0; o < n_out; ++o) {
        const double src = source_coord(o, n_out, n_in, spacing_in, spacing_out);
        const double lower = std::floor(src);
        const double frac = src - lower;
        // Written so that NaN fails it: the cast below needs lower in [-1, n_in - 1].
        if (!(lower >= -1.0 && lower <= static_cast<double>(n_in - 1))) {
            taps.i0.push_back(0);  // wholly outside: both weights zero
            taps.w0.push_back(0.0f);
            taps.w1.push_back(0.0f);
            continue;
        }
        taps.i0.push_back(static_cast<int64_t>(lower) + 1);
        taps.w0.push_back(static_cast<float>(1.0 - frac));
        taps.w1.push_back(static_cast<float>(frac));
    }
    return taps;
}

std::vector<int64_t> nearest_taps(int64_t n_out, int64_t n_in, double spacing_in,
                                  double spacing_out) {
    std::vector<int64_t> index;
    for (int64_t o = 0; o < n_out; ++o) {
        const double nearest = std::floor(source_coord(o, n_out, n_in, spacing_in, spacing_out) + 0.5);
        const bool inside = nearest >= 0.0 && nearest <= static_cast<double>(n_in - 1);
        index.push_back(inside ? static_cast<int64_t>(nearest) : -1);
    }
    return index;
}

PlaneResampler::Axis PlaneResampler::make_axis(int64_t n_out, int64_t n_in, double spacing_in,
                                               double spacing_out, bool need_kernel) {
    Axis axis;
    axis.taps = linear_taps(n_out, n_in, spacing_in, spacing_out);
    if (need_kernel)
        axis.kernel = spacing_out / spacing_in > 1.0
                          ? footprint_kernel(n_out, n_in, spacing_in, spacing_out)
                          : bilinear_kernel(axis.taps);
    return axis;
}

PlaneResampler::PlaneResampler(const std::array<int64_t, 2>& size,
                               const std::array<int64_t, 2>& n_in,
                               const std::array<double, 2>& spacing_in,
                               const std::array<double, 2>& spacing_out)
    : bilinear_(!(spacing_out[0] / spacing_in[0] > 1.0 || spacing_out[1] / spacing_in[1] > 1.0)),
      rows_(make_axis(size[0], n_in[0], spacing_in[0], spacing_out[0], !bilinear_)),
      cols_(make_axis(size[1], n_in[1], spacing_in[1], spacing_out[1], !bilinear_)) {}

namespace {

// out[h - h0, w - w0] = bilinear sample of a zero-padded [n_rows + 2, row_len] buffer for h in
// [h0, h1) = rows_out and w in [w0, w1) = cols_out.
void interpolate(const float* padded, int64_t row_len, const Taps& rows, const Taps& cols,
                 const std::array<int64_t, 2>& rows_out, const std::array<int64_t, 2>& cols_out,
                 float* out, int64_t out_row_stride, int64_t out_col_stride) {
    for (int64_t h = rows_out[0]; h < rows_out[1]; ++h) {
        const float* r0 = padded + rows.i0[static_cast<size_t>(h)] * row_len;
        const float* r1 = r0 + row_len;
        const float a = rows.w0[static_cast<size_t>(h)], b = rows.w1[static_cast<size_t>(h)];
        float* dst = out + (h - rows_out[0]) * out_row_stride;
        for (int64_t w = cols_out[0]; w < cols_out[1]; ++w) {
            const size_t c = static_cast<size_t>(w);
            const int64_t j = cols.i0[c];
            const float top = cols.w0[c] * r0[j] + cols.w1[c] * r0[j + 1];
            const float bottom = cols.w0[c] * r1[j] + cols.w1[c] * r1[j + 1];
            dst[(w - cols_out[0]) * out_col_stride] = a * top + b * bottom;
        }
    }
}

// [first, end) of the outputs in `range` that read some input (the others are 0).
std::array<int64_t, 2> reading(const Kernel& kernel, const std::array<int64_t, 2>& range) {
    int64_t first = range[1], end = range[0];
    for (int64_t o = range[0]; o < range[1]; ++o)
        if (kernel.count[static_cast<size_t>(o)] > 0) {
            first = std::min(first, o);
            end = o + 1;
        }
    return {first, std::max(first, end)};
}

// Separable weighted sums: each output row first combines its input rows into one padded
// row (contiguous, so it vectorises); those rows, transposed, are combined the same way into
// each output column: every pixel's sum in the same order as one pixel at a time would take
// (the same bits). Only the outputs that read an input are summed, over the padded columns
// they read; the others are 0, as their sums of nothing were.
void convolve(const float* padded, int64_t row_len, const Kernel& rows, const Kernel& cols,
              const std::array<int64_t, 2>& rows_out, const std::array<int64_t, 2>& cols_out,
              float* out, int64_t out_row_stride, int64_t out_col_stride,
              std::vector<float>& scratch) {
    const auto at = [&](int64_t h, int64_t c) -> float& {
        return out[(h - rows_out[0]) * out_row_stride + (c - cols_out[0]) * out_col_stride];
    };
    const std::array<int64_t, 2> active_rows = reading(rows, rows_out),
                                 active_cols = reading(cols, cols_out);
    const auto zero = [&](int64_t h, int64_t first, int64_t end) {
        for (int64_t c = first; c < end; ++c) at(h, c) = 0.0f;
    };
    for (int64_t h = rows_out[0]; h < rows_out[1]; ++h) {
        if (h < active_rows[0] || h >= active_rows[1]) {
            zero(h, cols_out[0], cols_out[1]);
        } else {
            zero(h, cols_out[0], active_cols[0]);
            zero(h, active_cols[1], cols_out[1]);
        }
    }
    const int64_t n_rows = active_rows[1] - active_rows[0], n_cols = active_cols[1] - active_cols[0];
    if (n_rows == 0 || n_cols == 0) return;
    int64_t y0 = row_len, y1 = 0;  // the padded columns the active outputs read
    for (int64_t c = active_cols[0]; c < active_cols[1]; ++c) {
        const auto k = static_cast<size_t>(c);
        if (cols.count[k] == 0) continue;
        y0 = std::min(y0, cols.start[k] + 1);
        y1 = std::max(y1, cols.start[k] + 1 + cols.count[k]);
    }
    const int64_t width = y1 - y0;
    const auto plane = static_cast<size_t>(n_rows * width);
    const auto n_sums = static_cast<size_t>(n_cols * n_rows);
    scratch.resize(2 * plane + n_sums);
    float* combined = scratch.data();     // [n_rows][width]
    float* sums = combined + plane;       // [n_cols][n_rows]
    float* by_column = sums + n_sums;     // [width][n_rows], all written by the transpose
    std::fill(combined, by_column, 0.0f);
    for (int64_t i = 0; i < n_rows; ++i) {
        const auto h = static_cast<size_t>(active_rows[0] + i);
        float* row = combined + i * width;
        const float* weight = rows.weight.data() + rows.offset[h];
        for (int64_t t = 0; t < rows.count[h]; ++t) {
            const float* src = padded + (rows.start[h] + t + 1) * row_len + y0;
            const float w = weight[t];
            for (int64_t y = 0; y < width; ++y) row[y] += w * src[y];
        }
    }
    transpose(combined, n_rows, width, width, 1, by_column, n_rows);
    for (int64_t j = 0; j < n_cols; ++j) {
        const auto c = static_cast<size_t>(active_cols[0] + j);
        float* sum = sums + j * n_rows;
        const float* weight = cols.weight.data() + cols.offset[c];
        for (int64_t t = 0; t < cols.count[c]; ++t) {
            const float* src = by_column + (cols.start[c] + t + 1 - y0) * n_rows;
            const float w = weight[t];
            for (int64_t i = 0; i < n_rows; ++i) sum[i] += w * src[i];
        }
    }
    if (out_col_stride == 1) {
        transpose(sums, n_cols, n_rows, n_rows, 1, &at(active_rows[0], active_cols[0]),
                  out_row_stride);
        return;
    }
    for (int64_t j = 0; j < n_cols; ++j)
        for (int64_t i = 0; i < n_rows; ++i)
            at(active_rows[0] + i, active_cols[0] + j) = sums[j * n_rows + i];
}

}  // namespace

void PlaneResampler::run(const float* padded, int64_t row_len, float* out, int64_t row_stride,
                         int64_t col_stride, std::vector<float>& scratch) const {
    const auto all = [](const Taps& taps) {
        return std::array<int64_t, 2>{0, static_cast<int64_t>(taps.i0.size())};
    };
    run(padded, row_len, all(rows_.taps), all(cols_.taps), out, row_stride, col_stride, scratch);
}

void PlaneResampler::run(const float* padded, int64_t row_len, const std::array<int64_t, 2>& rows,
                         const std::array<int64_t, 2>& cols, float* out, int64_t row_stride,
                         int64_t col_stride, std::vector<float>& scratch) const {
    if (bilinear_)
        interpolate(padded, row_len, rows_.taps, cols_.taps, rows, cols, out, row_stride,
                    col_stride);
    else
        convolve(padded, row_len, rows_.kernel, cols_.kernel, rows, cols, out, row_stride,
                 col_stride, scratch);
}

std::array<int64_t, 2> PlaneResampler::inputs_of(const Axis& a, size_t o) const {
    if (bilinear_) return {a.taps.i0[o] - 1, a.taps.i0[o]};  // i0 is padded: inputs i0 - 1, i0
    return {a.kernel.start[o], a.kernel.start[o] + a.kernel.count[o] - 1};
}

std::array<int64_t, 2> PlaneResampler::outputs_reading(int axis, int64_t first,
                                                       int64_t last) const {
    const Axis& a = axis == 0 ? rows_ : cols_;
    const auto n = static_cast<int64_t>(a.taps.i0.size());
    int64_t begin = n, end = 0;
    for (int64_t o = 0; o < n; ++o) {
        const auto i = static_cast<size_t>(o);
        const std::array<int64_t, 2> read = inputs_of(a, i);
        const bool weighs =
            bilinear_ ? a.taps.w0[i] != 0.0f || a.taps.w1[i] != 0.0f : read[0] <= read[1];
        if (weighs && read[0] <= last && read[1] >= first) {
            begin = std::min(begin, o);
            end = o + 1;
        }
    }
    return {std::min(begin, end), end};
}

std::array<int64_t, 2> PlaneResampler::inputs_read(int axis) const {
    const Axis& a = axis == 0 ? rows_ : cols_;
    int64_t first = std::numeric_limits<int64_t>::max(), last = std::numeric_limits<int64_t>::min();
    for (size_t o = 0; o < a.taps.i0.size(); ++o) {
        const std::array<int64_t, 2> read = inputs_of(a, o);
        if (read[0] > read[1]) continue;
        first = std::min(first, read[0]);
        last = std::max(last, read[1]);
    }
    return first > last ? std::array<int64_t, 2>{0, 0} : std::array<int64_t, 2>{first, last + 1};
}

}  // namespace ubc::detail
