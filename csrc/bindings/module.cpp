// Python bindings of the preprocessing core: convert and check arguments, release the GIL,
// call the core. No logic of its own lives here.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "preprocess.hpp"

namespace py = pybind11;

namespace {

ubc::DType dtype_of(const py::array& a) {
    if (a.dtype().byteorder() == '>')  // our hosts are little-endian
        throw py::type_error("array is not in native byte order; convert it with "
                             "array.astype(array.dtype.newbyteorder('='))");
    switch (a.dtype().num()) {
        case py::detail::npy_api::NPY_UBYTE_: return ubc::DType::u8;
        case py::detail::npy_api::NPY_BOOL_: return ubc::DType::u8;
        case py::detail::npy_api::NPY_SHORT_: return ubc::DType::i16;
        case py::detail::npy_api::NPY_USHORT_: return ubc::DType::u16;
        case py::detail::npy_api::NPY_INT_: return ubc::DType::i32;
        case py::detail::npy_api::NPY_FLOAT_: return ubc::DType::f32;
        case py::detail::npy_api::NPY_DOUBLE_: return ubc::DType::f64;
        default: break;
    }
    throw py::type_error("unsupported volume dtype " + std::string(py::str(a.dtype())) +
                         "; supported: uint8, int16, uint16, int32, float32, float64 "
                         "(cast with volume.astype(np.float32))");
}

ubc::VolumeView view_of(const py::array& a, const char* what) {
    if (a.ndim() != 3)
        throw py::value_error(std::string(what) + " must be 3-D (x, y, z), got " +
                              std::to_string(a.ndim()) + " dimensions");
    ubc::VolumeView v;
    v.dtype = dtype_of(a);
    v.data = a.data();
    const auto itemsize = static_cast<int64_t>(a.itemsize());
    for (py::ssize_t i = 0; i < 3; ++i) {
        const auto stride = static_cast<int64_t>(a.strides(i));
        if (stride % itemsize != 0)
            throw py::value_error(std::string(what) + " has unaligned strides; pass "
                                  "np.ascontiguousarray(" + what + ")");
        v.shape[static_cast<size_t>(i)] = static_cast<int64_t>(a.shape(i));
        v.strides[static_cast<size_t>(i)] = stride / itemsize;
    }
    return v;
}

using Indices = py::array_t<int64_t, py::array::c_style>;

// The core reads threads <= 0 as "all cores"; a negative count is a caller's mistake.
void check_threads(int threads) {
    if (threads < 0) throw py::value_error("threads must be >= 0 (0 = all cores)");
}

template <typename T>
T* checked_out(py::array_t<T, py::array::c_style>& out, py::ssize_t n, const std::array<int64_t, 2>& size) {
    if (out.ndim() != 4 || out.shape(0) != n || out.shape(1) != 1 || out.shape(2) != size[0] ||
        out.shape(3) != size[1])
        throw py::value_error("out has the wrong shape for these slices");
    return out.mutable_data();
}

void slices(const py::array& volume, std::array<double, 3> spacing, std::array<int64_t, 2> size,
            std::array<double, 2> target_spacing, const std::string& norm, const Indices& indices,
            int threads, py::array_t<float, py::array::c_style> out) {
    check_threads(threads);
    const ubc::VolumeView v = view_of(volume, "volume");
    const ubc::SliceGeometry g{spacing, size, target_spacing};
    const ubc::Norm parsed = ubc::parse_norm(norm);
    float* dst = checked_out(out, indices.size(), size);
    py::gil_scoped_release release;
    ubc::slices(v, g, parsed, indices.data(), indices.size(), threads, dst);
}

void mask_slices(const py::array& labels, std::array<double, 3> spacing, std::array<int64_t, 2> size,
                 std::array<double, 2> target_spacing, const Indices& indices, int threads,
                 py::array_t<uint8_t, py::array::c_style> out) {
    check_threads(threads);
    const ubc::VolumeView v = view_of(labels, "labels");
    const ubc::SliceGeometry g{spacing, size, target_spacing};
    uint8_t* dst = checked_out(out, indices.size(), size);
    py::gil_scoped_release release;
    ubc::mask_slices(v, g, indices.data(), indices.size(), threads, dst);
}

void lesion_areas(const py::array& labels, std::array<double, 3> spacing, const Indices& indices,
                  int threads, py::array_t<double, py::array::c_style> out) {
    check_threads(threads);
    const ubc::VolumeView v = view_of(labels, "labels");
    if (out.size() != indices.size()) throw py::value_error("out must have one entry per slice");
    double* dst = out.mutable_data();
    py::gil_scoped_release release;
    ubc::lesion_areas(v, spacing, indices.data(), indices.size(), threads, dst);
}

void foreground_counts(const py::array& volume, int threads,
                       py::array_t<int64_t, py::array::c_style> out) {
    check_threads(threads);
    const ubc::VolumeView v = view_of(volume, "volume");
    if (out.size() != v.shape[2]) throw py::value_error("out must have one entry per axial slice");
    int64_t* dst = out.mutable_data();
    py::gil_scoped_release release;
    ubc::foreground_counts(v, threads, dst);
}

void to_original(const py::array_t<float, py::array::c_style>& values, std::array<double, 3> spacing,
                 std::array<double, 2> target_spacing, const Indices& indices, int threads,
                 py::array_t<float> out) {
    check_threads(threads);
    if (values.ndim() != 3) throw py::value_error("values must be [S, H, W]");
    if (values.shape(0) != indices.size())
        throw py::value_error("values must have one slice per slice index");
    if (out.ndim() != 3) throw py::value_error("out must be a 3-D volume");
    const std::array<int64_t, 2> size{values.shape(1), values.shape(2)};
    std::array<int64_t, 3> shape{}, strides{};
    for (py::ssize_t i = 0; i < 3; ++i) {
        shape[static_cast<size_t>(i)] = out.shape(i);
        strides[static_cast<size_t>(i)] = out.strides(i) / static_cast<py::ssize_t>(sizeof(float));
    }
    const float* src = values.data();
    float* dst = out.mutable_data();
    py::gil_scoped_release release;
    ubc::to_original(src, size, shape, strides, spacing, target_spacing, indices.data(),
                     indices.size(), threads, dst);
}

}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "Native slice preprocessing for UBC (see ubc.preprocess for the documented API)";
    m.def("slices", &slices);
    m.def("mask_slices", &mask_slices);
    m.def("lesion_areas", &lesion_areas);
    m.def("foreground_counts", &foreground_counts);
    m.def("to_original", &to_original);
}
