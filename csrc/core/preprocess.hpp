// Slice extraction and normalisation for UBC: a pure C++17 core with no Python headers.
//
// Volumes are read through a pointer + shape + strides (in elements, any sign), so C order,
// Fortran order and flipped or transposed views are all read in place. Outputs go into
// caller-owned buffers. Bad arguments throw std::invalid_argument.
//
// Geometry: along an in-plane axis with n input pixels of spacing s and m output pixels of
// spacing t, output pixel o samples input index (o - (m - 1) / 2) * t / s + (n - 1) / 2:
// slice centre -> output centre, pixel centres at integer indices, zero outside the slice.
// s and t must be finite and positive, and t / s within [1 / kMaxRatio, kMaxRatio]. Upsampling
// is bilinear; downsampling (t > s) integrates over the output pixel's footprint (a triangle of
// half-width t / s input pixels, see resample.hpp), so it never decimates. Output rows (H) follow the volume's x axis, columns (W) its y axis.
//
// Every function is bit-identical for any thread count: each output element is written by
// exactly one thread (to_original refuses duplicate slice indices and self-overlapping outputs
// for that reason).
#pragma once

#include <array>
#include <cstdint>
#include <string>

namespace ubc {

// The core's limits (std::invalid_argument beyond them). They admit every MRI (a 1024 x 1024 x
// 1024 volume is at the total) and bound every buffer the core allocates, so that no size
// product can overflow, whatever strides a view has (zero strides can make a huge view of a
// small buffer).
inline constexpr int64_t kMaxAxis = 65536;                     // voxels along one axis
inline constexpr int64_t kMaxSliceVoxels = int64_t{1} << 24;   // in one axial slice (4096^2)
inline constexpr int64_t kMaxVoxels = int64_t{1} << 30;        // in one volume
inline constexpr int64_t kMaxSide = 4096;                      // output (model-grid) side
inline constexpr double kMaxRatio = 1000.0;  // target_spacing / spacing within [1/this, this]

enum class DType { u8, i16, u16, i32, f32, f64 };
enum class Norm { zscore, percentile, none };

struct VolumeView {
    const void* data = nullptr;
    DType dtype = DType::f32;
    std::array<int64_t, 3> shape{};    // (x, y, z)
    std::array<int64_t, 3> strides{};  // in elements, may be negative
};

struct SliceGeometry {
    std::array<double, 3> spacing{1.0, 1.0, 1.0};  // input voxel size (x, y, z), mm
    std::array<int64_t, 2> size{224, 224};         // output (H, W)
    std::array<double, 2> target_spacing{1.0, 1.0};  // output pixel size (H, W), mm
};

// A foreground voxel v normalises to (v - offset) * scale (clipped to [0, 1] for percentile);
// background (v == 0) stays 0.
struct NormStats {
    double offset = 0.0;
    double scale = 1.0;
    int64_t foreground = 0;
};

Norm parse_norm(const std::string& name);

// Statistics over the volume's foreground, in double precision; throws on NaN/Inf, on an
// empty or constant foreground (unless norm is none).
NormStats volume_stats(const VolumeView& volume, Norm norm, int threads);

// out: float32 [n_indices, H, W], C-contiguous.
void slices(const VolumeView& volume, const SliceGeometry& geometry, Norm norm,
            const int64_t* slice_indices, int64_t n_indices, int threads, float* out);

// out: uint8 [n_indices, H, W]: 1 where the nearest input voxel has a label > 0.
void mask_slices(const VolumeView& labels, const SliceGeometry& geometry,
                 const int64_t* slice_indices, int64_t n_indices, int threads, uint8_t* out);

// out: double [n_indices]: area (mm2) of labels > 0 in each axial slice.
void lesion_areas(const VolumeView& labels, const std::array<double, 3>& spacing,
                  const int64_t* slice_indices, int64_t n_indices, int threads, double* out);

// out: int64 [z]: number of non-zero voxels in each axial slice.
void foreground_counts(const VolumeView& volume, int threads, int64_t* out);

// values: float32 [n_indices, H, W] C-contiguous on the model grid (1 <= H, W <= kMaxSide);
// out: float32 volume of out_shape (x, y, z) with out_strides (elements, no two elements at
// the same address). Only the listed slices are written; each index may appear once.
void to_original(const float* values, const std::array<int64_t, 2>& size,
                 const std::array<int64_t, 3>& out_shape,
                 const std::array<int64_t, 3>& out_strides,
                 const std::array<double, 3>& spacing,
                 const std::array<double, 2>& target_spacing, const int64_t* slice_indices,
                 int64_t n_indices, int threads, float* out);

// The lesion pixels and probabilities of an engine's mask logits (ubc.scoring.aggregate):
// logits and images (the engine's input under them) are float32 [n_slices, slice_len];
// counts[s] = slice s's pixels with image != 0 and logit > 0, and where probs is not null,
// probs = the float16 bits of every pixel's lesion probability (background: none), as
// detail::lesion_pixels computes them, and where image_halves is not null, the images'
// float16 bits (what overlays draw).
void lesion_pixels(const float* logits, const float* images, int64_t n_slices,
                   int64_t slice_len, int64_t* counts, uint16_t* probs,
                   uint16_t* image_halves);

// to_original thresholded: out is a uint8 volume (strides in elements), 1 where the resampled
// value > threshold (> 0), else 0, written for every voxel of the listed slices. The same
// voxels as thresholding to_original's result, without its float volume. Values are float32,
// or IEEE binary16 bits (uint16_t: the float16 mask probabilities scoring keeps), read as
// their exact float values.
template <typename V>
void to_original_mask(const V* values, const std::array<int64_t, 2>& size,
                      const std::array<int64_t, 3>& out_shape,
                      const std::array<int64_t, 3>& out_strides,
                      const std::array<double, 3>& spacing,
                      const std::array<double, 2>& target_spacing, const int64_t* slice_indices,
                      int64_t n_indices, float threshold, int threads, uint8_t* out);

}  // namespace ubc
