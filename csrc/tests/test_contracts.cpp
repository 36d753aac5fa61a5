// The core's own contracts (issue 9, "the native core: memory safety and its own contracts"):
// every size product bounded, NaN-proof range checks, bounded to_original, no write races, and
// the exact 128-bit arithmetic that replaced __int128. Views are laid over exactly sized
// buffers, so that a sanitizer build catches any read or write past them.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "check.hpp"
#include "preprocess.hpp"
#include "wide_int.hpp"

using ubc_test::check;
using ubc_test::check_throws;

namespace {

const std::vector<int64_t> kOneIndex{0};

// 1. Huge in-plane views of a one-byte buffer (zero strides): refused before any allocation.
void bounded_views() {
    const uint8_t voxel = 7;
    const ubc::SliceGeometry g{{1.0, 1.0, 1.0}, {32, 32}, {1.0, 1.0}};
    std::vector<float> out(32 * 32);
    const int64_t side = int64_t{1} << 30;
    const ubc::VolumeView huge{&voxel, ubc::DType::u8, {side, side, 1}, {0, 0, 0}};
    check_throws([&] { ubc::slices(huge, g, ubc::Norm::none, kOneIndex.data(), 1, 1, out.data()); },
                 "a 2^30 x 2^30 zero-stride view is refused", "limits");
    const ubc::VolumeView wide{&voxel, ubc::DType::u8, {4097, 4096, 1}, {0, 0, 0}};
    check_throws([&] { ubc::slices(wide, g, ubc::Norm::none, kOneIndex.data(), 1, 1, out.data()); },
                 "an axial slice over 2^24 voxels is refused", "per axial slice");
    const ubc::VolumeView deep{&voxel, ubc::DType::u8, {1024, 1024, 1025}, {0, 0, 0}};
    check_throws([&] { ubc::volume_stats(deep, ubc::Norm::zscore, 1); },
                 "a volume over 2^30 voxels is refused", "in all");
    const ubc::VolumeView far{&voxel, ubc::DType::u8, {4, 4, 1}, {int64_t{1} << 62, 1, 1}};
    check_throws([&] { ubc::slices(far, g, ubc::Norm::none, kOneIndex.data(), 1, 1, out.data()); },
                 "strides past any addressable buffer are refused", "strides");
    // Within the limits a zero-stride view works and its block buffer stays bounded: z fastest,
    // 1 MiB slices, so fewer than 16 are read at once.
    std::vector<uint8_t> column(20);
    for (size_t k = 0; k < column.size(); ++k) column[k] = static_cast<uint8_t>(k + 1);
    const ubc::VolumeView tall{column.data(), ubc::DType::u8, {1024, 1024, 20}, {0, 0, 1}};
    std::vector<int64_t> all(20);
    for (size_t k = 0; k < all.size(); ++k) all[k] = static_cast<int64_t>(k);
    std::vector<float> slabs(20 * 32 * 32);
    ubc::slices(tall, g, ubc::Norm::none, all.data(), 20, 2, slabs.data());
    check(slabs[5 * 32 * 32 + 100] == 6.0f && slabs[19 * 32 * 32] == 20.0f,
          "a zero-stride 1024 x 1024 x 20 view resamples in bounded blocks");
}

// 2. A spacing ratio that overflows to infinity (or is merely absurd) is refused; the largest
// allowed one gives finite values.
void finite_ratios() {
    std::vector<float> values(32 * 32, 1.0f), out(9 * 9 * 1, -1.0f);
    const std::array<int64_t, 2> size{32, 32};
    check_throws([&] {
        ubc::to_original(values.data(), size, {9, 9, 1}, {1, 9, 81}, {1e300, 1e300, 1.0},
                         {1e-300, 1e-300}, kOneIndex.data(), 1, 1, out.data());
    }, "to_original: spacing / target_spacing = inf is refused", "outside [0.001, 1000]");
    const uint8_t voxel = 1;
    const ubc::VolumeView one{&voxel, ubc::DType::u8, {1, 1, 1}, {1, 1, 1}};
    std::vector<float> model(32 * 32);
    check_throws([&] {
        ubc::slices(one, {{1e-300, 1e-300, 1.0}, {32, 32}, {1e300, 1e300}}, ubc::Norm::none,
                    kOneIndex.data(), 1, 1, model.data());
    }, "slices: target_spacing / spacing = inf is refused", "outside");
    check_throws([&] {
        ubc::to_original(values.data(), size, {9, 9, 1}, {1, 9, 81}, {1e200, 1e200, 1.0},
                         {1e-100, 1e-100}, kOneIndex.data(), 1, 1, out.data());
    }, "a finite but absurd ratio (1e300) is refused", "outside");
    ubc::to_original(values.data(), size, {9, 9, 1}, {1, 9, 81}, {1000.0, 1000.0, 1.0},
                     {1.0, 1.0}, kOneIndex.data(), 1, 1, out.data());
    bool finite = true;
    for (float v : out) finite = finite && std::isfinite(v);
    // One original pixel of 1000 model pixels: the 32 x 32 ones inside weigh about (32/1000)^2.
    check(finite && out[4 * 9 + 4] > 0.0f && out[4 * 9 + 4] < 0.01f && out[0] == 0.0f,
          "the largest allowed ratio averages over the footprint, never NaN");
}

// 3. The model grid is bounded; nothing to do allocates nothing and writes nothing.
void bounded_model_grid() {
    float value = 0.0f, out = -1.0f;
    const std::vector<int64_t> none;
    check_throws([&] {
        ubc::to_original(&value, {100000, 100000}, {1, 1, 1}, {1, 1, 1}, {1, 1, 1}, {1, 1},
                         none.data(), 0, 1, &out);
    }, "a 100000 x 100000 model grid is refused", "between 1 and 4096");
    check_throws([&] {
        ubc::to_original(&value, {3000000000, 3000000000}, {1, 1, 1}, {1, 1, 1}, {1, 1, 1},
                         {1, 1}, none.data(), 0, 1, &out);
    }, "a 3e9 x 3e9 model grid is invalid_argument, not length_error", "model-grid");
    check_throws([&] {
        ubc::to_original(&value, {32, 32}, {1, 1, int64_t{1} << 40}, {1, 1, 1}, {1, 1, 1},
                         {1, 1}, none.data(), 0, 1, &out);
    }, "an original shape beyond the limits is refused", "limits");
    ubc::to_original(&value, {4096, 4096}, {1, 1, 1}, {1, 1, 1}, {1, 1, 1}, {1, 1}, none.data(),
                     0, 1, &out);
    check(out == -1.0f, "no slices: to_original returns at once and writes nothing");
}

// 4. Duplicate indices and aliased outputs would race; unique ones are thread-count-proof.
void no_write_races() {
    const int64_t h = 32, w = 32, nx = 23, ny = 19, nz = 6;
    std::vector<float> values(static_cast<size_t>(4 * h * w));
    for (size_t i = 0; i < values.size(); ++i) values[i] = static_cast<float>((i * 7919) % 1000) / 999.0f;
    std::vector<float> out(static_cast<size_t>(nx * ny * nz), 0.0f);
    const std::array<int64_t, 3> shape{nx, ny, nz}, fortran{1, nx, nx * ny};
    const std::vector<int64_t> twice{1, 4, 1, 2};
    check_throws([&] {
        ubc::to_original(values.data(), {h, w}, shape, fortran, {0.9, 1.1, 1.0}, {1.0, 1.0},
                         twice.data(), 4, 2, out.data());
    }, "a slice index given twice is refused", "more than once");
    std::vector<float> flat(static_cast<size_t>(nx * ny), 0.0f);
    const std::vector<int64_t> unique{0, 3, 5, 2};
    check_throws([&] {
        ubc::to_original(values.data(), {h, w}, shape, {1, nx, 0}, {0.9, 1.1, 1.0}, {1.0, 1.0},
                         unique.data(), 4, 2, flat.data());
    }, "an output with z-stride 0 is refused", "share memory");
    std::vector<float> serial(out.size(), 0.0f), threaded(out.size(), 0.0f);
    ubc::to_original(values.data(), {h, w}, shape, fortran, {0.9, 1.1, 1.0}, {1.0, 1.0},
                     unique.data(), 4, 1, serial.data());
    ubc::to_original(values.data(), {h, w}, shape, fortran, {0.9, 1.1, 1.0}, {1.0, 1.0},
                     unique.data(), 4, 3, threaded.data());
    check(std::memcmp(serial.data(), threaded.data(), serial.size() * sizeof(float)) == 0,
          "to_original: 1 and 3 threads give identical bytes");
    // A flipped (negative-stride) output is disjoint and accepted.
    std::vector<float> flipped(out.size(), 0.0f);
    ubc::to_original(values.data(), {h, w}, shape, {-1, nx, nx * ny}, {0.9, 1.1, 1.0}, {1.0, 1.0},
                     unique.data(), 4, 2, flipped.data() + (nx - 1));
    check(flipped[static_cast<size_t>(nx - 1 + 3 * nx * ny)] == serial[static_cast<size_t>(3 * nx * ny)],
          "a flipped output view receives the same values, mirrored");
}

// 5. Standard C++17 arithmetic gives the __int128 results: exact products, correct rounding.
void exact_wide_arithmetic() {
    using ubc::detail::U128;
    const U128 p = ubc::detail::multiply(~uint64_t{0}, ~uint64_t{0});  // (2^64 - 1)^2
    check(p.hi == ~uint64_t{0} - 1 && p.lo == 1, "64 x 64 -> 128-bit product is exact");
    const U128 d = ubc::detail::subtract({1, 0}, {0, 1});
    check(d.hi == 0 && d.lo == ~uint64_t{0}, "128-bit subtraction borrows");
    const uint64_t odd = (uint64_t{1} << 53) + 1;  // 54 bits: a tie when its last bit is dropped
    check(ubc::detail::to_double({odd, 0}) == std::ldexp(static_cast<double>(odd - 1), 64),
          "an exact tie rounds to even");
    check(ubc::detail::to_double({odd, 1}) == std::ldexp(static_cast<double>(odd + 1), 64),
          "just above a tie rounds up (the sticky bit)");
    check(ubc::detail::to_double({0, 12345}) == 12345.0, "small values convert exactly");
    // The histogram's variance: int16 voxels {-30000, 30000} x 2^20 each: exact std 30000.
    std::vector<int16_t> voxels(size_t{1} << 21);
    for (size_t i = 0; i < voxels.size(); ++i) voxels[i] = i % 2 ? int16_t{30000} : int16_t{-30000};
    const ubc::VolumeView v{voxels.data(), ubc::DType::i16, {1024, 1024, 2}, {1, 1024, 1 << 20}};
    const ubc::NormStats stats = ubc::volume_stats(v, ubc::Norm::zscore, 2);
    check(stats.offset == 0.0 && stats.scale == 1.0 / 30000.0, "int16 z-score statistics are exact");
}

}  // namespace

void contract_tests() {
    bounded_views();
    finite_ratios();
    bounded_model_grid();
    no_write_races();
    exact_wide_arithmetic();
}
