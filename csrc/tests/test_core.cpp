// A Python-free check of the preprocessing core: it links against the C++ library alone.
// Build and run (any C++17 compiler; tests/test_native_core.py also builds it with clang++
// and under AddressSanitizer + UndefinedBehaviorSanitizer and ThreadSanitizer):
//   g++ -std=c++17 -O2 -pthread -Icsrc/core csrc/tests/*.cpp csrc/core/*.cpp -o test_core
//   ./test_core
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "check.hpp"
#include "kernels.hpp"
#include "preprocess.hpp"

void contract_tests();  // test_contracts.cpp: the core's own contracts (issue 9)

using ubc_test::check;
using ubc_test::check_throws;

// A model-grid pixel over the threshold that no output weighs (outside the original grid's
// field of view along one axis; a libFuzzer finding): nothing is resampled, the mask is 0.
void mask_outside_tests() {
    std::vector<float> values(16 * 16, 0.0f);
    values[7 * 16 + 0] = 0.9f;  // row 7 is weighed by an output, column 0 by none
    std::vector<uint8_t> mask(4 * 4, 7);
    const int64_t index = 0;
    ubc::to_original_mask(values.data(), {16, 16}, {4, 4, 1}, {1, 4, 16}, {1.0, 1.0, 1.0},
                          {1.0, 1.0}, &index, 1, 0.5f, 1, mask.data());
    check(std::all_of(mask.begin(), mask.end(), [](uint8_t v) { return v == 0; }),
          "to_original_mask: inputs outside every output leave the slice at 0");
}

// Every binary16 bit pattern read as the float it denotes (ldexp of its fields): exact, NaN
// payloads and signs kept.
void half_tests() {
    std::vector<uint16_t> halves(65536);
    for (size_t i = 0; i < halves.size(); ++i) halves[i] = static_cast<uint16_t>(i);
    std::vector<float> got(halves.size());
    ubc::detail::from_half(halves.data(), static_cast<int64_t>(halves.size()), got.data());
    int wrong = 0;
    for (uint32_t h = 0; h < 65536; ++h) {
        const uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu;
        float want;
        if (exponent == 0x1fu) {
            const uint32_t bits = ((h & 0x8000u) << 16) | 0x7f800000u | (mantissa << 13);
            std::memcpy(&want, &bits, sizeof want);
        } else {
            want = exponent == 0 ? std::ldexp(static_cast<float>(mantissa), -24)
                                 : std::ldexp(static_cast<float>(1024 + mantissa),
                                              static_cast<int>(exponent) - 25);
            if (h & 0x8000u) want = -want;
        }
        uint32_t a, b;
        std::memcpy(&a, &got[h], sizeof a);
        std::memcpy(&b, &want, sizeof b);
        wrong += a != b;
    }
    check(wrong == 0, "from_half reads every binary16 pattern as its float");
}

int main() {
    // A 32 x 32 x 3 Fortran-ordered int16 volume: background border, ramp inside (its mean, 147.5, is no voxel value, so no voxel normalises to 0).
    const int64_t nx = 32, ny = 32, nz = 3;
    std::vector<int16_t> voxels(static_cast<size_t>(nx * ny * nz), 0);
    for (int64_t z = 0; z < nz; ++z)
        for (int64_t y = 4; y < 28; ++y)
            for (int64_t x = 4; x < 28; ++x)
                voxels[static_cast<size_t>(x + nx * (y + ny * z))] = static_cast<int16_t>(100 + x + 2 * y + z);
    ubc::VolumeView view{voxels.data(), ubc::DType::i16, {nx, ny, nz}, {1, nx, nx * ny}};
    ubc::SliceGeometry geometry{{1.0, 1.0, 1.0}, {32, 32}, {1.0, 1.0}};
    std::vector<int64_t> indices{0, 1, 2};

    std::vector<float> out(static_cast<size_t>(nz * 32 * 32));
    ubc::slices(view, geometry, ubc::Norm::zscore, indices.data(), 3, 1, out.data());
    double sum = 0.0, sum_sq = 0.0;
    int64_t count = 0;
    for (float v : out)
        if (v != 0.0f) {
            sum += v;
            sum_sq += static_cast<double>(v) * v;
            ++count;
        }
    const double mean = sum / static_cast<double>(count);
    check(count == 24 * 24 * 3, "identity geometry keeps every foreground voxel");
    check(std::fabs(mean) < 1e-5, "z-scored foreground has mean 0");
    check(std::fabs(sum_sq / static_cast<double>(count) - mean * mean - 1.0) < 1e-4,
          "z-scored foreground has std 1");
    check(out[0] == 0.0f, "background stays exactly 0");

    std::vector<float> threaded(out.size());
    ubc::slices(view, geometry, ubc::Norm::zscore, indices.data(), 3, 3, threaded.data());
    check(threaded == out, "three threads give the same result as one");

    std::vector<double> areas(3);
    ubc::lesion_areas(view, {0.5, 2.0, 1.0}, indices.data(), 3, 0, areas.data());
    check(areas[0] == 24.0 * 24.0, "lesion area in mm2 uses the in-plane spacing");

    geometry.size = {40, 32};
    check_throws([&] { ubc::slices(view, geometry, ubc::Norm::zscore, indices.data(), 3, 1, out.data()); },
                 "a size that is not a multiple of 32 is rejected");
    geometry.size = {32, 32};
    std::vector<int16_t> blank(voxels.size(), 0);
    ubc::VolumeView empty{blank.data(), ubc::DType::i16, {nx, ny, nz}, {1, nx, nx * ny}};
    check_throws([&] { ubc::slices(empty, geometry, ubc::Norm::zscore, indices.data(), 3, 1, out.data()); },
                 "an empty volume is rejected");
    std::vector<int64_t> bad_index{5};
    check_throws([&] { ubc::slices(view, geometry, ubc::Norm::zscore, bad_index.data(), 1, 1, out.data()); },
                 "an out-of-range slice index is rejected");
    check_throws([] { ubc::parse_norm("minmax"); }, "an unknown norm is rejected");

    // Downsampling integrates over the footprint: a Nyquist checkerboard (1, 3) taken from 1 mm
    // to 3 mm is near 2 everywhere inside (decimation would keep 1 or 3), on 1 and 2 threads.
    std::vector<float> board(96 * 96 * 2);
    for (size_t i = 0; i < board.size(); ++i) board[i] = ((i % 96 + (i / 96) % 96) % 2) ? 1.0f : 3.0f;
    ubc::VolumeView checkerboard{board.data(), ubc::DType::f32, {96, 96, 2}, {1, 96, 96 * 96}};
    ubc::SliceGeometry coarse{{1.0, 1.0, 1.0}, {32, 32}, {3.0, 3.0}};
    std::vector<float> smooth(2 * 32 * 32), smooth2(smooth.size());
    ubc::slices(checkerboard, coarse, ubc::Norm::none, indices.data(), 2, 1, smooth.data());
    ubc::slices(checkerboard, coarse, ubc::Norm::none, indices.data(), 2, 2, smooth2.data());
    float worst = 0.0f;
    for (int64_t h = 2; h < 30; ++h)
        for (int64_t w = 2; w < 30; ++w) worst = std::max(worst, std::fabs(smooth[static_cast<size_t>(h * 32 + w)] - 2.0f));
    check(worst < 0.02f, "a checkerboard downsampled 3x is near constant (anti-aliasing)");
    check(smooth == smooth2, "anti-aliased downsampling: 2 threads give the result of one");

    contract_tests();
    half_tests();
    mask_outside_tests();
    std::printf("%d failure(s)\n", ubc_test::failures());
    return ubc_test::failures() == 0 ? 0 : 1;
}
