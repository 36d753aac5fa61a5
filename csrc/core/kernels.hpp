// The preprocessing's hot loops: normalisation of contiguous voxels to float, transposition of
// tiles of voxels, the exact moments of 8/16-bit volumes, and float32 to float16. kernels.cpp compiles each for
// AVX-512, AVX2 and baseline x86-64 and picks one at run time; every version computes the same
// bits as normalise_value.
#pragma once

#include <algorithm>
#include <cstdint>

namespace ubc::detail {

// A foreground voxel v maps to float((v - offset) * scale), clamped to [0, 1] when clip;
// background (v == 0) stays exactly 0.
struct Affine {
    double offset = 0.0;
    double scale = 1.0;
    bool clip = false;
};

inline float normalise_value(double value, const Affine& f) {
    if (value == 0.0) return 0.0f;
    double n = (value - f.offset) * f.scale;
    if (f.clip) n = std::clamp(n, 0.0, 1.0);
    return static_cast<float>(n);
}

// Side of the square tiles that transpose_tiles transposes.
inline constexpr int64_t kTile = 16;

// The kernels exist for T in uint8_t, int16_t, uint16_t, int32_t, float, double.

// out[i] = normalise_value(in[i]) for i < n.
template <typename T>
void normalise_row(const T* in, int64_t n, float* out, const Affine& f);

// out[b * out_row + a] = in[a * in_row + b] for a < count * kTile, b < kTile: count tiles of
// kTile x kTile, side by side.
template <typename T>
void transpose_tiles(const T* in, int64_t in_row, int64_t count, T* out, int64_t out_row);

// Exact sums over the non-zero values of 8/16-bit data: |v| <= 2^16 and at most 2^30 values
// (kMaxVoxels), so sum fits 47 bits and sum_sq 62. For T in uint8_t, int16_t, uint16_t.
struct IntMoments {
    int64_t count = 0;
    int64_t sum = 0;
    uint64_t sum_sq = 0;
};

template <typename T>
void add_moments(const T* in, int64_t n, IntMoments& m);

// out[i] = the IEEE binary16 bits of in[i], rounded to nearest even (subnormals, overflow to
// infinity and NaN payloads as NumPy's astype(float16) gives them) for i < n.
void to_half(const float* in, int64_t n, uint16_t* out);

}  // namespace ubc::detail
