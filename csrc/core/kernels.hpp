// The hot loops: normalisation of contiguous voxels to float, transposition of tiles of voxels,
// the exact moments of 8/16-bit volumes, and the lesion pixels and float16 probabilities of mask
// logits. kernels.cpp compiles each for AVX-512, AVX2 and baseline x86-64 and picks one at run
// time; every version computes the same bits (normalisation: those of normalise_value).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>

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

// out[b * out_row + a] = in[a * in_row + b * step] for a < na, b < nb, by kTile x kTile tiles
// (partial ones and steps other than +-1 element by element).
template <typename T>
inline void transpose(const T* in, int64_t na, int64_t nb, int64_t in_row, int64_t step,
                      T* out, int64_t out_row) {
    const int64_t whole = std::llabs(step) == 1 ? na / kTile : 0;  // whole tiles along a
    for (int64_t b0 = 0; b0 < nb; b0 += kTile) {
        const int64_t nb1 = std::min(kTile, nb - b0);
        const T* src = in + b0 * step;
        T* dst = out + b0 * out_row;
        int64_t a0 = 0;
        if (nb1 == kTile && whole > 0) {
            if (step == 1)
                transpose_tiles(src, in_row, whole, dst, out_row);
            else  // read the runs forwards, and write the rows bottom up
                transpose_tiles(src - (kTile - 1), in_row, whole, dst + (kTile - 1) * out_row,
                                -out_row);
            a0 = whole * kTile;
        }
        for (int64_t b = 0; b < nb1; ++b)
            for (int64_t a = a0; a < na; ++a) dst[b * out_row + a] = src[a * in_row + b * step];
    }
}

// Exact sums over the non-zero values of 8/16-bit data: |v| <= 2^16 and at most 2^30 values
// (kMaxVoxels), so sum fits 47 bits and sum_sq 62. For T in uint8_t, int16_t, uint16_t.
struct IntMoments {
    int64_t count = 0;
    int64_t sum = 0;
    uint64_t sum_sq = 0;
};

template <typename T>
void add_moments(const T* in, int64_t n, IntMoments& m);

// out[i] = the float value of the IEEE binary16 bits in[i] (exact) for i < n.
void from_half(const uint16_t* in, int64_t n, float* out);

// Logits of at most this magnitude give a lesion probability; larger ones are clamped to it
// (and background pixels take -kLogitBound: certain no lesion).
inline constexpr float kLogitBound = 60.0f;

// Of n mask logits and the engine input's pixels under them: the number of lesion pixels
// (image != 0 and logit > 0), and, where probs is not null, probs[i] = the binary16 bits of
// the lesion probability 1 / (1 + exp(-x)), x = logits[i] clamped to +-kLogitBound, or
// -kLogitBound where images[i] == 0. The probability is computed in double (relative error
// under 1e-14), rounded to float and then to binary16: the same bits on every CPU. (A float
// sigmoid gives those bits wherever its error bound cannot change them, 99 % of pixels;
// checked identical for all 2^32 logits on each ISA.) Where image_halves is not null, also
// image_halves[i] = the binary16 bits of images[i], as NumPy's astype(float16) gives them.
int64_t lesion_pixels(const float* logits, const float* images, int64_t n, uint16_t* probs,
                      uint16_t* image_halves);

}  // namespace ubc::detail
