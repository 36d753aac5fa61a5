// Argument checks of the core, run before any buffer is allocated or any voxel is read. Every
// size the core allocates or indexes by is a product of factors bounded here (see the limits
// in preprocess.hpp). All throw std::invalid_argument with a message that names the problem.
#pragma once

#include <array>
#include <cmath>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

#include "preprocess.hpp"

namespace ubc::detail {

// a * b for 0 <= a, b, or invalid_argument naming `what` when the product exceeds `limit`
// (tested by division, so it never overflows).
int64_t checked_product(int64_t a, int64_t b, int64_t limit, const char* what);

std::string shape_text(const std::array<int64_t, 3>& s);

// Each axis in [1, kMaxAxis], an axial slice <= kMaxSliceVoxels, the whole <= kMaxVoxels.
void check_shape(const std::array<int64_t, 3>& shape, const char* what);

// Non-null data, a bounded shape, and strides whose farthest element offset fits a pointer
// difference (so index * stride sums cannot overflow).
void check_volume(const VolumeView& v, const char* what);

// An output layout in which no two elements share an address (a z-stride of 0, for
// example, would make threads race on the same memory).
void check_disjoint(const std::array<int64_t, 3>& shape, const std::array<int64_t, 3>& strides,
                    const char* what);

template <size_t N>
void check_spacing(const std::array<double, N>& spacing, const char* what) {
    for (double s : spacing)
        if (!(std::isfinite(s) && s > 0.0)) {
            std::ostringstream os;
            os << what << " must be finite and positive (mm), got " << s;
            throw std::invalid_argument(os.str());
        }
}

// target_spacing / spacing, per in-plane axis, within [1 / kMaxRatio, kMaxRatio] (a ratio can
// overflow to infinity or underflow to 0 even when both spacings are finite and positive; the
// bound also bounds the downsampling kernel's width).
void check_ratio(const std::array<double, 3>& spacing, const std::array<double, 2>& target_spacing);

// Output size of slices(): each side a multiple of 32 in [32, kMaxSide].
void check_size(const std::array<int64_t, 2>& size);

// Model-grid size read by to_original(): each side in [1, kMaxSide].
void check_model_grid(const std::array<int64_t, 2>& size);

void check_indices(const int64_t* indices, int64_t n, int64_t n_slices);

// Indices already in range (check_indices); throws on the first one that appears twice.
void check_unique(const int64_t* indices, int64_t n, int64_t n_slices);

void check_geometry(const VolumeView& v, const SliceGeometry& g, const int64_t* indices,
                    int64_t n_indices, const char* what);

}  // namespace ubc::detail
