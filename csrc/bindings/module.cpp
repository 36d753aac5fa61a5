// Python bindings of the preprocessing core: convert and check arguments, release the GIL,
// call the core. No logic of its own lives here.
//
// Inputs may be any layout but must be aligned (the core reads them through typed pointers);
// outputs are refused, never converted, unless they are exactly what the core writes: a
// converted copy would take the result and leave the caller's array unchanged.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "dicom_walk.hpp"
#include "preprocess.hpp"

namespace py = pybind11;

namespace {

using npy = py::detail::npy_api;

bool aligned(const py::array& a) { return (a.flags() & npy::NPY_ARRAY_ALIGNED_) != 0; }

ubc::DType dtype_of(const py::array& a) {
    if (a.dtype().byteorder() == '>')  // our hosts are little-endian
        throw py::type_error("array is not in native byte order; convert it with "
                             "array.astype(array.dtype.newbyteorder('='))");
    switch (a.dtype().num()) {
        case npy::NPY_UBYTE_: return ubc::DType::u8;
        case npy::NPY_BOOL_: return ubc::DType::u8;
        case npy::NPY_SHORT_: return ubc::DType::i16;
        case npy::NPY_USHORT_: return ubc::DType::u16;
        case npy::NPY_INT_: return ubc::DType::i32;
        case npy::NPY_FLOAT_: return ubc::DType::f32;
        case npy::NPY_DOUBLE_: return ubc::DType::f64;
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
    if (!aligned(a))
        throw py::value_error(std::string(what) + " is not aligned in memory for its dtype; "
                              "pass an aligned copy (" + what + ".copy())");
    return v;
}

// Inputs of a fixed dtype: converted if need be (a copy of an input loses nothing), then
// refused if still misaligned (array_t passes a misaligned array of the right dtype through).
using Indices = py::array_t<int64_t, py::array::c_style>;
using Values = py::array_t<float, py::array::c_style>;

template <typename A>
const A& checked_input(const A& a, const char* what) {
    if (!aligned(a))
        throw py::value_error(std::string(what) + " is not aligned in memory; pass a copy");
    return a;
}

// The core reads threads <= 0 as "all cores"; a negative count is a caller's mistake.
void check_threads(int threads) {
    if (threads < 0) throw py::value_error("threads must be >= 0 (0 = all cores)");
}

std::string shape_text(const std::vector<py::ssize_t>& shape) {
    std::ostringstream os;
    os << "(";
    for (size_t i = 0; i < shape.size(); ++i) os << (i ? ", " : "") << shape[i];
    os << (shape.size() == 1 ? ",)" : ")");
    return os.str();
}

// What is wrong with `out` as a buffer of T (empty when nothing is): dtype (native order
// included), writability and alignment, then, when `shape` is given, C-contiguity and shape.
template <typename T>
std::string out_problem(const py::array& out, const std::vector<py::ssize_t>* shape) {
    if (!py::dtype::of<T>().equal(out.dtype()))
        return "its dtype is " + std::string(py::str(out.dtype()));
    if (!out.writeable()) return "it is read-only";
    if (!aligned(out)) return "it is not aligned in memory";
    if (shape == nullptr) return {};
    const std::vector<py::ssize_t> got(out.shape(), out.shape() + out.ndim());
    if (got != *shape) return "its shape is " + shape_text(got);
    if ((out.flags() & npy::NPY_ARRAY_C_CONTIGUOUS_) == 0) return "it is not C-contiguous";
    return {};
}

template <typename T>
T* checked_out(py::array& out, const std::vector<py::ssize_t>& shape) {
    const std::string problem = out_problem<T>(out, &shape);
    if (!problem.empty())
        throw py::value_error("out must be a C-contiguous, writeable, aligned " +
                              std::string(py::str(py::dtype::of<T>())) + " array of shape " +
                              shape_text(shape) + " in native byte order, but " + problem);
    return static_cast<T*>(out.mutable_data());
}

// Byte range [first, last) spanned by an array's elements (empty for an empty array).
std::pair<uintptr_t, uintptr_t> byte_span(const py::array& a) {
    const auto base = reinterpret_cast<uintptr_t>(a.data());
    if (a.size() == 0) return {base, base};
    intptr_t low = 0, high = 0;
    for (py::ssize_t i = 0; i < a.ndim(); ++i) {
        const intptr_t reach = static_cast<intptr_t>(a.shape(i) - 1) * a.strides(i);
        (reach < 0 ? low : high) += reach;
    }
    return {base + static_cast<uintptr_t>(low), base + static_cast<uintptr_t>(high) + static_cast<uintptr_t>(a.itemsize())};
}

// Threads write out while they read `source`: shared memory would race.
void check_disjoint(const py::array& out, const py::array& source, const char* what) {
    const auto a = byte_span(out), b = byte_span(source);
    if (a.first < b.second && b.first < a.second)
        throw py::value_error(std::string("out shares memory with ") + what +
                              "; pass a separate output array");
}

py::ssize_t count(const Indices& indices) { return indices.size(); }

void slices(const py::array& volume, std::array<double, 3> spacing, std::array<int64_t, 2> size,
            std::array<double, 2> target_spacing, const std::string& norm, const Indices& indices,
            int threads, py::array out) {
    check_threads(threads);
    const ubc::VolumeView v = view_of(volume, "volume");
    const ubc::SliceGeometry g{spacing, size, target_spacing};
    const ubc::Norm parsed = ubc::parse_norm(norm);
    float* dst = checked_out<float>(out, {count(indices), 1, size[0], size[1]});
    check_disjoint(out, volume, "the volume");
    const int64_t* index = checked_input(indices, "slice indices").data();
    py::gil_scoped_release release;
    ubc::slices(v, g, parsed, index, count(indices), threads, dst);
}

void mask_slices(const py::array& labels, std::array<double, 3> spacing, std::array<int64_t, 2> size,
                 std::array<double, 2> target_spacing, const Indices& indices, int threads,
                 py::array out) {
    check_threads(threads);
    const ubc::VolumeView v = view_of(labels, "labels");
    const ubc::SliceGeometry g{spacing, size, target_spacing};
    uint8_t* dst = checked_out<uint8_t>(out, {count(indices), 1, size[0], size[1]});
    check_disjoint(out, labels, "the labels");
    const int64_t* index = checked_input(indices, "slice indices").data();
    py::gil_scoped_release release;
    ubc::mask_slices(v, g, index, count(indices), threads, dst);
}

void lesion_areas(const py::array& labels, std::array<double, 3> spacing, const Indices& indices,
                  int threads, py::array out) {
    check_threads(threads);
    const ubc::VolumeView v = view_of(labels, "labels");
    double* dst = checked_out<double>(out, {count(indices)});
    const int64_t* index = checked_input(indices, "slice indices").data();
    py::gil_scoped_release release;
    ubc::lesion_areas(v, spacing, index, count(indices), threads, dst);
}

void foreground_counts(const py::array& volume, int threads, py::array out) {
    check_threads(threads);
    const ubc::VolumeView v = view_of(volume, "volume");
    int64_t* dst = checked_out<int64_t>(out, {static_cast<py::ssize_t>(v.shape[2])});
    py::gil_scoped_release release;
    ubc::foreground_counts(v, threads, dst);
}

// out: any layout whose strides are whole T elements (the core checks that no two elements
// share memory); refused, not converted, otherwise.
template <typename T>
T* checked_volume_out(py::array& out, std::array<int64_t, 3>& shape, std::array<int64_t, 3>& strides) {
    const std::string type = py::str(py::dtype::of<T>());
    std::string problem = out_problem<T>(out, nullptr);
    if (problem.empty() && out.ndim() != 3) problem = "it has " + std::to_string(out.ndim()) + " dimensions";
    for (py::ssize_t i = 0; problem.empty() && i < 3; ++i) {
        const auto a = static_cast<size_t>(i);
        shape[a] = static_cast<int64_t>(out.shape(i));
        strides[a] = static_cast<int64_t>(out.strides(i)) / static_cast<int64_t>(sizeof(T));
        if (out.strides(i) % static_cast<py::ssize_t>(sizeof(T)) != 0)
            problem = "its strides are not whole " + type + " elements";
    }
    if (!problem.empty())
        throw py::value_error("out must be a writeable, aligned 3-D " + type + " volume in "
                              "native byte order, but " + problem);
    return static_cast<T*>(out.mutable_data());
}

// What both to_original bindings check, then run(values, size, shape, strides, indices, n, out)
// without the GIL.
template <typename T, typename V, typename Run>
void on_original_grid(const py::array_t<V, py::array::c_style>& values, const Indices& indices,
                      int threads, py::array& out, Run&& run) {
    check_threads(threads);
    if (values.ndim() != 3) throw py::value_error("values must be [S, H, W]");
    if (values.shape(0) != count(indices))
        throw py::value_error("values must have one slice per slice index");
    const std::array<int64_t, 2> size{values.shape(1), values.shape(2)};
    std::array<int64_t, 3> shape{}, strides{};
    T* dst = checked_volume_out<T>(out, shape, strides);
    check_disjoint(out, values, "the values");
    const V* src = checked_input(values, "values").data();
    const int64_t* index = checked_input(indices, "slice indices").data();
    const int64_t n = count(indices);
    py::gil_scoped_release release;
    run(src, size, shape, strides, index, n, dst);
}

void to_original(const Values& values, std::array<double, 3> spacing,
                 std::array<double, 2> target_spacing, const Indices& indices, int threads,
                 py::array out) {
    on_original_grid<float>(values, indices, threads, out,
        [&](const float* src, const auto& size, const auto& shape, const auto& strides,
            const int64_t* index, int64_t n, float* dst) {
            ubc::to_original(src, size, shape, strides, spacing, target_spacing, index, n,
                             threads, dst);
        });
}

// values: float32 (converted as needed), or uint16 read as IEEE binary16 bits (a view of the
// caller's float16 array)
void to_original_mask(const py::array& values, std::array<double, 3> spacing,
                      std::array<double, 2> target_spacing, const Indices& indices,
                      float threshold, int threads, py::array out) {
    const auto mask = [&](const auto& typed) {
        on_original_grid<uint8_t>(typed, indices, threads, out,
            [&](const auto* src, const auto& size, const auto& shape, const auto& strides,
                const int64_t* index, int64_t n, uint8_t* dst) {
                ubc::to_original_mask(src, size, shape, strides, spacing, target_spacing, index,
                                      n, threshold, threads, dst);
            });
    };
    if (py::dtype::of<uint16_t>().equal(values.dtype()))
        mask(py::array_t<uint16_t, py::array::c_style>::ensure(values));
    else
        mask(Values::ensure(values));
}

void lesion_pixels(const Values& logits, const Values& images, py::array counts,
                   std::optional<py::array> probs, std::optional<py::array> image_halves) {
    if (logits.ndim() < 1) throw py::value_error("logits must be [S, ...]");
    const std::vector<py::ssize_t> shape(logits.shape(), logits.shape() + logits.ndim());
    if (std::vector<py::ssize_t>(images.shape(), images.shape() + images.ndim()) != shape)
        throw py::value_error("images must have the logits' shape " + shape_text(shape));
    const int64_t n = shape[0];
    const int64_t slice_len = n == 0 ? 0 : static_cast<int64_t>(logits.size()) / n;
    auto* per_slice = checked_out<int64_t>(counts, {shape[0]});
    uint16_t* dst = nullptr;
    if (probs) {
        dst = checked_out<uint16_t>(*probs, shape);
        check_disjoint(*probs, logits, "the logits");
        check_disjoint(*probs, images, "the images");
    }
    uint16_t* halves = nullptr;
    if (image_halves) {
        halves = checked_out<uint16_t>(*image_halves, shape);
        check_disjoint(*image_halves, logits, "the logits");
        check_disjoint(*image_halves, images, "the images");
        if (probs) check_disjoint(*image_halves, *probs, "probs");
    }
    const float* src = checked_input(logits, "logits").data();
    const float* image = checked_input(images, "images").data();
    py::gil_scoped_release release;
    ubc::lesion_pixels(src, image, n, slice_len, per_slice, dst, halves);
}

py::tuple dicom_walk(const py::buffer& buffer, int64_t pos, bool explicit_vr, bool complete,
                     const std::vector<uint32_t>& wanted) {
    const py::buffer_info info = buffer.request();
    if (info.ndim != 1 || info.itemsize != 1)
        throw py::type_error("dicom_walk reads a buffer of bytes");
    if (!std::is_sorted(wanted.begin(), wanted.end()))
        throw py::value_error("wanted tags must be sorted");
    const auto* data = static_cast<const uint8_t*>(info.ptr);
    const auto size = static_cast<int64_t>(info.size);
    ubc::Walk walk;
    {
        py::gil_scoped_release release;
        walk = ubc::walk_elements(data, size, pos, explicit_vr, complete, wanted.data(),
                                  static_cast<int64_t>(wanted.size()));
    }
    static const char* const names[] = {"ok", "short", "unusual"};
    py::list kept;
    for (const auto& e : walk.kept) {
        const char vr[2] = {static_cast<char>(e.vr & 0xFF), static_cast<char>(e.vr >> 8)};
        kept.append(py::make_tuple(e.tag, py::bytes(vr, e.vr == 0 ? 0 : 2), e.offset,
                                   e.length));
    }
    py::object pixels = walk.pixel_offset < 0
        ? py::object(py::none())
        : py::object(py::make_tuple(walk.pixel_offset, walk.pixel_length));
    return py::make_tuple(names[static_cast<int>(walk.status)], kept, pixels);
}

}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "Native slice preprocessing for UBC (see ubc.preprocess for the documented API)";
    // out is noconvert: pybind11 must hand over the caller's own array, never a converted copy.
    m.def("slices", &slices, py::arg("volume"), py::arg("spacing"), py::arg("size"),
          py::arg("target_spacing"), py::arg("norm"), py::arg("indices"), py::arg("threads"),
          py::arg("out").noconvert());
    m.def("mask_slices", &mask_slices, py::arg("labels"), py::arg("spacing"), py::arg("size"),
          py::arg("target_spacing"), py::arg("indices"), py::arg("threads"),
          py::arg("out").noconvert());
    m.def("lesion_areas", &lesion_areas, py::arg("labels"), py::arg("spacing"), py::arg("indices"),
          py::arg("threads"), py::arg("out").noconvert());
    m.def("foreground_counts", &foreground_counts, py::arg("volume"), py::arg("threads"),
          py::arg("out").noconvert());
    m.def("to_original", &to_original, py::arg("values"), py::arg("spacing"),
          py::arg("target_spacing"), py::arg("indices"), py::arg("threads"),
          py::arg("out").noconvert());
    m.def("lesion_pixels", &lesion_pixels, py::arg("logits"), py::arg("images"),
          py::arg("counts").noconvert(), py::arg("probs").noconvert() = py::none(),
          py::arg("image_halves").noconvert() = py::none());
    m.def("to_original_mask", &to_original_mask, py::arg("values"), py::arg("spacing"),
          py::arg("target_spacing"), py::arg("indices"), py::arg("threshold"),
          py::arg("threads"), py::arg("out").noconvert());
    m.def("dicom_walk", &dicom_walk, py::arg("buffer"), py::arg("pos"), py::arg("explicit_vr"),
          py::arg("complete"), py::arg("wanted"));
    m.attr("MAX_AXIS") = ubc::kMaxAxis;
    m.attr("MAX_SLICE_VOXELS") = ubc::kMaxSliceVoxels;
    m.attr("MAX_VOXELS") = ubc::kMaxVoxels;
    m.attr("MAX_SIDE") = ubc::kMaxSide;
    m.attr("MAX_RATIO") = ubc::kMaxRatio;
}
