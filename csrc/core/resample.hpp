// In-plane resampling of one zero-padded slice (see the geometry in preprocess.hpp).
//
// Upsampling (and equal spacing) is bilinear. Downsampling along an axis (target spacing
// coarser than the source: ratio t / s > 1) integrates over the output pixel's footprint: a
// triangle of half-width `ratio` input pixels, the antialiased bilinear of Pillow's resize and
// torch's interpolate(antialias=True), normalised to sum 1 over the whole line with pixels
// outside the input counting as zeros, so that decimation never happens.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace ubc::detail {

double source_coord(int64_t o, int64_t n_out, int64_t n_in, double spacing_in, double spacing_out);

// Linear-interpolation taps along one axis. Index i0 refers to a buffer padded with one zero
// on each side (stored index = input index + 1), so both taps are always readable and samples
// outside the input read zeros.
struct Taps {
    std::vector<int64_t> i0;
    std::vector<float> w0, w1;
};

Taps linear_taps(int64_t n_out, int64_t n_in, double spacing_in, double spacing_out);

// Input index of the nearest pixel centre (ties round up), or -1 outside the input.
std::vector<int64_t> nearest_taps(int64_t n_out, int64_t n_in, double spacing_in, double spacing_out);

// General weights along one axis: output o reads the padded buffer's entries
// start[o] + 1 .. start[o] + count[o] (input indices start[o] ..) with weight[offset[o] ..].
struct Kernel {
    std::vector<int64_t> start, count;
    std::vector<std::size_t> offset;
    std::vector<float> weight;
};

// Resamples zero-padded [n_in_x + 2, n_in_y + 2] slices to [size[0], size[1]] outputs.
class PlaneResampler {
public:
    PlaneResampler(const std::array<int64_t, 2>& size, const std::array<int64_t, 2>& n_in,
                   const std::array<double, 2>& spacing_in, const std::array<double, 2>& spacing_out);

    // True when neither axis downsamples: the result is the plain bilinear one.
    bool bilinear() const { return bilinear_; }
    const Taps& row_taps() const { return rows_.taps; }
    const Taps& col_taps() const { return cols_.taps; }

    // out[h * row_stride + w * col_stride] for the padded slice; scratch is per-thread memory.
    void run(const float* padded, int64_t row_len, float* out, int64_t row_stride,
             int64_t col_stride, std::vector<float>& scratch) const;

    // The same values for output rows [rows[0], rows[1]) and columns [cols[0], cols[1])
    // only, at out[(h - rows[0]) * row_stride + (w - cols[0]) * col_stride].
    void run(const float* padded, int64_t row_len, const std::array<int64_t, 2>& rows,
             const std::array<int64_t, 2>& cols, float* out, int64_t row_stride,
             int64_t col_stride, std::vector<float>& scratch) const;

    // [begin, end): the outputs along `axis` (0: rows, 1: columns) from the first to the last
    // that gives a non-zero weight to an input index in [first, last] (begin == end: none).
    std::array<int64_t, 2> outputs_reading(int axis, int64_t first, int64_t last) const;

    // [first, end): the input indices along `axis` that some output reads, whatever its weight
    // (first >= end: none); may reach past the input by one (the padding's zeros).
    std::array<int64_t, 2> inputs_read(int axis) const;

private:
    struct Axis {
        Taps taps;      // bilinear, always
        Kernel kernel;  // when some axis downsamples: bilinear or footprint weights
    };
    static Axis make_axis(int64_t n_out, int64_t n_in, double spacing_in, double spacing_out,
                          bool need_kernel);
    // The input indices [first, last] output o of `a` reads, whatever their weights (first >
    // last: none).
    std::array<int64_t, 2> inputs_of(const Axis& a, size_t o) const;
    bool bilinear_;
    Axis rows_, cols_;
};

}  // namespace ubc::detail
