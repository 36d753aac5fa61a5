#include "checks.hpp"

#include <algorithm>
#include <cstddef>
#include <limits>
#include <vector>

namespace ubc::detail {
namespace {

constexpr int64_t kSizeMultiple = 32;  // five 2x down-samplings in the U-Net encoder
// Farthest element offset of a view, in elements of at most 8 bytes: its byte offset fits a
// pointer difference.
constexpr int64_t kMaxExtent = std::numeric_limits<std::ptrdiff_t>::max() / 8;

[[noreturn]] void fail(const std::ostringstream& os) { throw std::invalid_argument(os.str()); }

void check_extent(const std::array<int64_t, 3>& shape, const std::array<int64_t, 3>& strides,
                  const char* what) {
    int64_t extent = 0;
    for (size_t a = 0; a < 3; ++a) {
        const int64_t s = strides[a];
        if (s < -kMaxExtent || s > kMaxExtent ||
            (shape[a] > 1 && std::llabs(s) > (kMaxExtent - extent) / (shape[a] - 1))) {
            std::ostringstream os;
            os << what << " strides (" << strides[0] << ", " << strides[1] << ", " << strides[2]
               << ") reach beyond any addressable buffer for shape " << shape_text(shape);
            fail(os);
        }
        extent += (shape[a] - 1) * std::llabs(s);
    }
}

}  // namespace

int64_t checked_product(int64_t a, int64_t b, int64_t limit, const char* what) {
    if (a < 0 || b < 0 || (a != 0 && b > limit / a)) {
        std::ostringstream os;
        os << what << " (" << a << " x " << b << ") exceeds the limit of " << limit;
        fail(os);
    }
    return a * b;
}

std::string shape_text(const std::array<int64_t, 3>& s) {
    std::ostringstream os;
    os << "(" << s[0] << ", " << s[1] << ", " << s[2] << ")";
    return os.str();
}

void check_shape(const std::array<int64_t, 3>& shape, const char* what) {
    for (int64_t n : shape)
        if (n <= 0) {
            std::ostringstream os;
            os << what << " has an empty axis, shape " << shape_text(shape);
            fail(os);
        }
    const bool small_axes = std::all_of(shape.begin(), shape.end(),
                                        [](int64_t n) { return n <= kMaxAxis; });
    if (small_axes && shape[0] * shape[1] <= kMaxSliceVoxels &&
        shape[0] * shape[1] <= kMaxVoxels / shape[2])
        return;
    std::ostringstream os;
    os << what << " shape " << shape_text(shape) << " is beyond the native core's limits: at most "
       << kMaxAxis << " voxels per axis, " << kMaxSliceVoxels << " per axial slice and "
       << kMaxVoxels << " in all";
    fail(os);
}

void check_volume(const VolumeView& v, const char* what) {
    if (v.data == nullptr) throw std::invalid_argument(std::string(what) + " has no data");
    check_shape(v.shape, what);
    check_extent(v.shape, v.strides, what);
}

void check_disjoint(const std::array<int64_t, 3>& shape, const std::array<int64_t, 3>& strides,
                    const char* what) {
    check_extent(shape, strides, what);
    std::vector<size_t> axes;  // axes that have more than one element, by increasing |stride|
    for (size_t a = 0; a < 3; ++a)
        if (shape[a] > 1) axes.push_back(a);
    std::sort(axes.begin(), axes.end(), [&](size_t a, size_t b) {
        return std::llabs(strides[a]) < std::llabs(strides[b]);
    });
    int64_t span = 1;  // elements covered by the faster axes; the next stride must step over them
    for (size_t a : axes) {
        if (std::llabs(strides[a]) < span) {
            std::ostringstream os;
            os << what << " strides (" << strides[0] << ", " << strides[1] << ", " << strides[2]
               << ") for shape " << shape_text(shape) << " make several elements share memory; "
               << "pass an array that owns its elements (np.zeros(shape, np.float32))";
            fail(os);
        }
        span = std::llabs(strides[a]) * shape[a];
    }
}

void check_ratio(const std::array<double, 3>& spacing, const std::array<double, 2>& target_spacing) {
    for (size_t a = 0; a < 2; ++a) {
        const double ratio = target_spacing[a] / spacing[a];
        if (!(ratio >= 1.0 / kMaxRatio && ratio <= kMaxRatio)) {  // NaN fails it too
            std::ostringstream os;
            os << "target_spacing / spacing along " << (a == 0 ? "x" : "y") << " ("
               << target_spacing[a] << " / " << spacing[a] << ") is outside [" << 1.0 / kMaxRatio
               << ", " << kMaxRatio << "]; give both spacings in mm";
            fail(os);
        }
    }
}

void check_size(const std::array<int64_t, 2>& size) {
    for (int64_t n : size)
        if (n < kSizeMultiple || n > kMaxSide) {
            std::ostringstream os;
            os << "output size (" << size[0] << ", " << size[1] << ") is out of range: each side "
               << "must be between " << kSizeMultiple << " and " << kMaxSide;
            fail(os);
        }
    if (size[0] % kSizeMultiple == 0 && size[1] % kSizeMultiple == 0) return;
    auto nearest = [](int64_t n) {
        return std::max(kSizeMultiple, (n + kSizeMultiple / 2) / kSizeMultiple * kSizeMultiple);
    };
    std::ostringstream os;
    os << "output size (" << size[0] << ", " << size[1] << ") is not a multiple of "
       << kSizeMultiple << " (the U-Net down-samples 5 times); use (" << nearest(size[0]) << ", "
       << nearest(size[1]) << ")";
    fail(os);
}

void check_model_grid(const std::array<int64_t, 2>& size) {
    for (int64_t n : size)
        if (n < 1 || n > kMaxSide) {
            std::ostringstream os;
            os << "model-grid slices of " << size[0] << " x " << size[1] << " pixels are out of "
               << "range: each side must be between 1 and " << kMaxSide;
            fail(os);
        }
}

void check_indices(const int64_t* indices, int64_t n, int64_t n_slices) {
    if (n < 0 || (n > 0 && indices == nullptr))
        throw std::invalid_argument("slice indices: no data for a non-empty list");
    for (int64_t i = 0; i < n; ++i)
        if (indices[i] < 0 || indices[i] >= n_slices) {
            std::ostringstream os;
            os << "slice index " << indices[i] << " is out of range for a volume with "
               << n_slices << " axial slices";
            fail(os);
        }
}

void check_unique(const int64_t* indices, int64_t n, int64_t n_slices) {
    std::vector<bool> seen(static_cast<size_t>(n_slices), false);
    for (int64_t i = 0; i < n; ++i) {
        const auto k = static_cast<size_t>(indices[i]);
        if (seen[k]) {
            std::ostringstream os;
            os << "slice index " << indices[i] << " appears more than once; each output slice "
               << "is written once, so pass each slice once";
            fail(os);
        }
        seen[k] = true;
    }
}

void check_geometry(const VolumeView& v, const SliceGeometry& g, const int64_t* indices,
                    int64_t n_indices, const char* what) {
    check_volume(v, what);
    check_spacing(g.spacing, "spacing");
    check_spacing(g.target_spacing, "target_spacing");
    check_ratio(g.spacing, g.target_spacing);
    check_size(g.size);
    check_indices(indices, n_indices, v.shape[2]);
}

}  // namespace ubc::detail
