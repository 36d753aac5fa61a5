// A fuzz target over every public function of the native core (csrc/core): the DICOM element
// walk over the raw input, then C, Fortran, permuted, padded, zero-stride and flipped views
// laid over exactly sized buffers (so that AddressSanitizer sees any access past them), huge
// zero-stride views, extreme spacings and sizes, duplicate and out-of-range indices, 1 to 3
// threads. A bad argument must be
// std::invalid_argument (any other exception escapes: a finding) and a result must not depend
// on the thread count (std::abort otherwise).
//
// With libFuzzer (clang; Debian: apt-get install clang libclang-rt-14-dev):
//   clang++ -std=c++17 -O1 -g -pthread -fsanitize=fuzzer,address,undefined -Icsrc/core
//       csrc/fuzz/fuzz_core.cpp csrc/core/*.cpp -o fuzz_core        (one command line)
//   mkdir -p fuzz-corpus && ./fuzz_core -max_total_time=600 -max_len=256 -len_control=0 fuzz-corpus
// Without libFuzzer (any compiler): N random inputs from a fixed seed, or the files named:
//   g++ -std=c++17 -O1 -g -pthread -fsanitize=address,undefined -DUBC_FUZZ_MAIN -Icsrc/core
//       csrc/fuzz/fuzz_core.cpp csrc/core/*.cpp -o fuzz_core        (one command line)
//   ./fuzz_core 20000
#include <algorithm>
#include <cmath>
#include <array>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <type_traits>
#include <vector>

#include "dicom_walk.hpp"
#include "kernels.hpp"
#include "preprocess.hpp"

namespace {

constexpr int64_t kMaxBufferElements = int64_t{1} << 16;  // of one fuzzed volume
constexpr int64_t kMaxWork = int64_t{1} << 16;            // voxels a call may read

class Input {
public:
    Input(const uint8_t* data, size_t size) : data_(data), size_(size) {}
    uint8_t byte() { return pos_ < size_ ? data_[pos_++] : uint8_t{0}; }
    template <typename T, size_t N>
    T pick(const std::array<T, N>& options) { return options[byte() % N]; }

private:
    const uint8_t* data_;
    size_t size_, pos_ = 0;
};

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();
constexpr std::array<double, 12> kSpacings{1.0, 0.5, 2.0, 0.9, 3.3, 1e-5, 1e-300, 1e300,
                                           0.0, -1.0, kInf, kNaN};
constexpr std::array<int64_t, 8> kSizes{32, 64, 96, 32, 33, 0, 4128, int64_t{1} << 40};
constexpr std::array<int64_t, 12> kSides{1, 2, 3, 5, 8, 17, 33, 40, 4097, 65537,
                                         int64_t{1} << 30, (int64_t{1} << 31) + 1};

struct Volume {
    std::vector<uint8_t> bytes;
    ubc::VolumeView view;
    bool beyond_limits = false;  // shape past the core's limits: every call must refuse it
    bool small = false;          // few enough voxels to read in every call
};

size_t itemsize(ubc::DType d) {
    switch (d) {
        case ubc::DType::u8: return 1;
        case ubc::DType::i16:
        case ubc::DType::u16: return 2;
        case ubc::DType::i32:
        case ubc::DType::f32: return 4;
        case ubc::DType::f64: return 8;
    }
    return 1;
}

template <typename T>
void store(uint8_t* dst, uint8_t seed) {
    // Zero (background) one time in four; a rare NaN for floats.
    T value = seed % 4 == 0 ? T(0) : static_cast<T>(seed);
    if constexpr (std::is_floating_point_v<T>)
        if (seed == 255) value = std::numeric_limits<T>::quiet_NaN();
    std::memcpy(dst, &value, sizeof(T));
}

void fill(Volume& v, Input& in) {
    const size_t size = itemsize(v.view.dtype);
    for (size_t i = 0; i < v.bytes.size() / size; ++i) {
        const auto seed = static_cast<uint8_t>(in.byte() + i * 37);
        uint8_t* dst = v.bytes.data() + i * size;
        switch (v.view.dtype) {
            case ubc::DType::u8: store<uint8_t>(dst, seed); break;
            case ubc::DType::i16: store<int16_t>(dst, seed); break;
            case ubc::DType::u16: store<uint16_t>(dst, seed); break;
            case ubc::DType::i32: store<int32_t>(dst, seed); break;
            case ubc::DType::f32: store<float>(dst, seed); break;
            case ubc::DType::f64: store<double>(dst, seed); break;
        }
    }
}

// A view in one of 6 axis orders, each axis padded, zero-stride or flipped at the input's
// choice, over a buffer of exactly the elements it reaches; false when that buffer is too big.
bool make_volume(Input& in, Volume& v) {
    v.view.dtype = static_cast<ubc::DType>(in.byte() % 6);
    for (auto& n : v.view.shape) n = in.byte() % 8 == 0 ? in.pick(kSides) : 1 + in.byte() % 40;
    constexpr std::array<std::array<size_t, 3>, 6> kOrders{
        {{0, 1, 2}, {2, 1, 0}, {1, 0, 2}, {0, 2, 1}, {2, 0, 1}, {1, 2, 0}}};
    const auto order = kOrders[in.byte() % 6];
    const uint8_t zero = in.byte(), flip = in.byte(), pad = in.byte();
    int64_t running = 1, first = 0;
    for (size_t a : order) {
        const int64_t n = v.view.shape[a];
        const bool zero_stride = (zero >> a) & 1;
        v.view.strides[a] = zero_stride ? 0 : running;
        if (!zero_stride && n > kMaxBufferElements / running) return false;
        if (!zero_stride) running *= n + ((pad >> (2 * a)) & 3);
        if (running > kMaxBufferElements) return false;
    }
    int64_t elements = 1;
    for (size_t a = 0; a < 3; ++a) {
        elements += (v.view.shape[a] - 1) * v.view.strides[a];
        if ((flip >> a) & 1) {
            first += (v.view.shape[a] - 1) * v.view.strides[a];
            v.view.strides[a] = -v.view.strides[a];
        }
    }
    v.bytes.resize(static_cast<size_t>(elements) * itemsize(v.view.dtype));
    fill(v, in);
    v.view.data = v.bytes.data() + static_cast<size_t>(first) * itemsize(v.view.dtype);
    const int64_t nx = v.view.shape[0], ny = v.view.shape[1], nz = v.view.shape[2];
    v.beyond_limits = nx > ubc::kMaxAxis || ny > ubc::kMaxAxis || nz > ubc::kMaxAxis ||
                      nx * ny > ubc::kMaxSliceVoxels || nx * ny > ubc::kMaxVoxels / nz;
    v.small = !v.beyond_limits && nx * ny * nz <= kMaxWork;
    return true;
}

// Runs call(threads) and call(1); both must throw invalid_argument, or both succeed with
// identical outputs (compared through the bytes that `result` returns).
template <typename Call, typename Result>
void same_for_any_thread_count(int threads, Call&& call, Result&& result) {
    std::vector<uint8_t> first;
    bool first_threw = false;
    try {
        call(threads);
        first = result();
    } catch (const std::invalid_argument&) {
        first_threw = true;
    }
    try {
        call(1);
    } catch (const std::invalid_argument&) {
        if (!first_threw) std::abort();
        return;
    }
    if (first_threw || result() != first) std::abort();
}

template <typename T>
std::vector<uint8_t> bytes_of(const std::vector<T>& values) {
    std::vector<uint8_t> out(values.size() * sizeof(T));
    if (!out.empty()) std::memcpy(out.data(), values.data(), out.size());
    return out;
}

std::vector<int64_t> make_indices(Input& in, int64_t nz) {
    std::vector<int64_t> indices(in.byte() % 6);
    for (auto& k : indices) k = static_cast<int64_t>(in.byte()) % (std::min<int64_t>(nz, 250) + 2) - 1;
    return indices;
}

void fuzz_slices(Input& in, const Volume& v, int threads) {
    const ubc::SliceGeometry g{{in.pick(kSpacings), in.pick(kSpacings), 1.0},
                               {in.pick(kSizes), in.pick(kSizes)},
                               {in.pick(kSpacings), in.pick(kSpacings)}};
    const auto norm = static_cast<ubc::Norm>(in.byte() % 3);
    const std::vector<int64_t> indices = make_indices(in, v.view.shape[2]);
    const auto n = static_cast<int64_t>(indices.size());
    const bool sized = g.size[0] > 0 && g.size[0] <= 4096 && g.size[1] > 0 && g.size[1] <= 4096;
    const auto plane = static_cast<size_t>(sized ? g.size[0] * g.size[1] : 1);
    std::vector<float> out(plane * indices.size());
    same_for_any_thread_count(threads, [&](int t) {
        ubc::slices(v.view, g, norm, indices.data(), n, t, out.data());
    }, [&] { return bytes_of(out); });
    std::vector<uint8_t> mask(plane * indices.size());
    same_for_any_thread_count(threads, [&](int t) {
        ubc::mask_slices(v.view, g, indices.data(), n, t, mask.data());
    }, [&] { return mask; });
    std::vector<double> areas(indices.size());
    same_for_any_thread_count(threads, [&](int t) {
        ubc::lesion_areas(v.view, g.spacing, indices.data(), n, t, areas.data());
    }, [&] { return bytes_of(areas); });
    std::vector<int64_t> counts(static_cast<size_t>(v.view.shape[2]));
    same_for_any_thread_count(threads, [&](int t) {
        ubc::foreground_counts(v.view, t, counts.data());
    }, [&] { return bytes_of(counts); });
}

// Model-grid values back onto the volume's grid, in a Fortran, C, flipped or aliased
// (z-stride 0) output laid over exactly the elements it reaches.
void fuzz_to_original(Input& in, const Volume& v, int threads) {
    const std::array<int64_t, 2> size{in.pick(kSizes), in.pick(kSizes)};
    const std::vector<int64_t> indices = make_indices(in, v.view.shape[2]);
    const bool sized = size[0] > 0 && size[0] <= 128 && size[1] > 0 && size[1] <= 128;
    std::vector<float> values(sized ? static_cast<size_t>(size[0] * size[1]) * indices.size() : 1);
    for (size_t i = 0; i < values.size(); ++i) values[i] = static_cast<float>(in.byte()) / 255.0f;
    const int64_t nx = v.view.shape[0], ny = v.view.shape[1], nz = v.view.shape[2];
    const uint8_t layout = in.byte() % 4;
    std::array<int64_t, 3> strides{1, nx, nx * ny};  // Fortran
    if (layout == 1) strides = {ny * nz, nz, 1};
    if (layout == 3) strides[2] = 0;
    std::vector<float> out(static_cast<size_t>(nx * ny * (layout == 3 ? 1 : nz)));
    float* origin = out.data();
    if (layout == 2) {  // x flipped
        origin += nx - 1;
        strides[0] = -1;
    }
    const std::array<double, 3> spacing{in.pick(kSpacings), in.pick(kSpacings), 1.0};
    const std::array<double, 2> target{in.pick(kSpacings), in.pick(kSpacings)};
    same_for_any_thread_count(threads, [&](int t) {
        std::fill(out.begin(), out.end(), 0.0f);
        ubc::to_original(values.data(), size, v.view.shape, strides, spacing, target,
                         indices.data(), static_cast<int64_t>(indices.size()), t, origin);
    }, [&] { return bytes_of(out); });
    // The thresholded mask, over the same layout: the voxels of out > threshold.
    std::vector<uint8_t> mask(out.size());
    uint8_t* mask_origin = mask.data() + (origin - out.data());
    const float threshold = 0.5f;
    same_for_any_thread_count(threads, [&](int t) {
        std::fill(mask.begin(), mask.end(), uint8_t{0});
        ubc::to_original_mask(values.data(), size, v.view.shape, strides, spacing, target,
                              indices.data(), static_cast<int64_t>(indices.size()), threshold,
                              t, mask_origin);
    }, [&] { return std::vector<uint8_t>(mask); });
    if (layout != 3)  // an aliased output keeps whichever slice came last: no voxel to compare
        for (size_t i = 0; i < out.size(); ++i)
            if (mask[i] != (out[i] > threshold)) __builtin_trap();
    // The same mask from binary16 values as from the floats they denote.
    std::vector<uint16_t> halves(values.size());
    for (size_t i = 0; i < halves.size(); ++i) halves[i] = static_cast<uint16_t>(in.byte() << 6);
    ubc::detail::from_half(halves.data(), static_cast<int64_t>(halves.size()), values.data());
    const auto mask_of = [&](const auto* source) {
        std::fill(mask.begin(), mask.end(), uint8_t{0});
        ubc::to_original_mask(source, size, v.view.shape, strides, spacing, target,
                              indices.data(), static_cast<int64_t>(indices.size()), threshold,
                              1, mask_origin);
        return mask;
    };
    try {
        if (layout != 3 && mask_of(halves.data()) != mask_of(values.data())) __builtin_trap();
    } catch (const std::invalid_argument&) {  // refused as the floats were, above
    }
}

// Lesion pixels and probabilities of the volume's bytes read as float logits and images (any
// bit pattern: NaN, infinity, subnormals): the count is the pixels with image != 0 and logit
// > 0, a probability is NaN exactly where its logit is, else in [0, 1], 0 on background; an
// image's float16 is NaN exactly where the image is, with the image's sign.
void fuzz_lesion_pixels(const Volume& v) {
    const size_t n = v.bytes.size() / (2 * sizeof(float));
    std::vector<float> logits(n), images(n);
    if (n == 0) return;
    std::memcpy(logits.data(), v.bytes.data(), n * sizeof(float));
    std::memcpy(images.data(), v.bytes.data() + n * sizeof(float), n * sizeof(float));
    const int64_t rows = n % 3 == 0 ? 3 : 1;
    std::vector<int64_t> counts(static_cast<size_t>(rows));
    std::vector<uint16_t> probs(n), halves(n);
    ubc::lesion_pixels(logits.data(), images.data(), rows, static_cast<int64_t>(n) / rows,
                       counts.data(), probs.data(), halves.data());
    int64_t expected = 0, total = 0;
    for (size_t i = 0; i < n; ++i) {
        const bool head = images[i] != 0.0f;
        expected += head && logits[i] > 0.0f;
        const uint16_t magnitude = probs[i] & 0x7fffu;
        const bool nan = magnitude > 0x7c00u;
        if (head && nan != std::isnan(logits[i])) __builtin_trap();
        if (!nan && (probs[i] > 0x3c00u || (!head && probs[i] != 0))) __builtin_trap();
        if (((halves[i] & 0x7fffu) > 0x7c00u) != std::isnan(images[i])) __builtin_trap();
        if (((halves[i] & 0x8000u) != 0) != std::signbit(images[i])) __builtin_trap();
    }
    for (const int64_t c : counts) total += c;
    if (total != expected) __builtin_trap();
}

// A view past the core's limits must be refused before anything is allocated or read.
void expect_refused(const Volume& v) {
    const std::vector<int64_t> index{0};
    float out = 0.0f;
    try {
        ubc::slices(v.view, {}, ubc::Norm::none, index.data(), 1, 1, &out);
    } catch (const std::invalid_argument&) {
        return;
    }
    std::abort();
}

// The DICOM element walk over the raw input, in both encodings, from its start and from an
// offset it names: every element kept lies inside the buffer, and a walk that ends without
// pixel data on a buffer said to be incomplete is short (std::abort otherwise).
void fuzz_dicom_walk(const uint8_t* data, size_t size) {
    static const uint32_t wanted[] = {0x00080016u, 0x00100020u, 0x00200032u, 0x00280010u};
    const auto n = static_cast<int64_t>(size);
    for (const int64_t pos : {int64_t{0}, n > 0 ? int64_t{data[0]} % (n + 1) : int64_t{0}})
        for (const bool explicit_vr : {false, true})
            for (const bool complete : {false, true}) {
                const ubc::Walk w = ubc::walk_elements(data, n, pos, explicit_vr, complete,
                                                        wanted, 4);
                for (const auto& e : w.kept)
                    if (e.offset < pos || e.offset + e.length > n) std::abort();
                if (w.status == ubc::WalkStatus::ok && !complete && w.pixel_offset < 0)
                    std::abort();
                if (w.pixel_offset > n) std::abort();
            }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    fuzz_dicom_walk(data, size);
    Input in(data, size);
    Volume v;
    if (!make_volume(in, v)) return 0;
    if (v.beyond_limits) {
        expect_refused(v);
        return 0;
    }
    if (!v.small) return 0;  // legal but slow to read: not what this target looks for
    const int threads = 1 + in.byte() % 3;
    fuzz_slices(in, v, threads);
    fuzz_to_original(in, v, threads);
    fuzz_lesion_pixels(v);
    return 0;
}

#ifdef UBC_FUZZ_MAIN
#include <fstream>
#include <iterator>
#include <random>
#include <string>

int main(int argc, char** argv) {
    long runs = argc > 1 ? std::strtol(argv[1], nullptr, 10) : 10000;
    for (int i = 2; i < argc; ++i) {  // replay files (a crash reproducer or a corpus entry)
        std::ifstream file(argv[i], std::ios::binary);
        const std::vector<uint8_t> bytes{std::istreambuf_iterator<char>(file), {}};
        LLVMFuzzerTestOneInput(bytes.data(), bytes.size());
    }
    std::mt19937_64 random(20261201);
    std::vector<uint8_t> bytes;
    for (long r = 0; r < runs; ++r) {
        bytes.resize(random() % 128);
        for (auto& b : bytes) b = static_cast<uint8_t>(random());
        LLVMFuzzerTestOneInput(bytes.data(), bytes.size());
    }
    std::printf("%ld random inputs, no findings\n", runs);
    return 0;
}
#endif
