// Exact unsigned 128-bit products in standard C++17 (two 64-bit halves), for the histogram's
// n * sum(v^2) - sum(v)^2, whose terms reach 2^92. Replaces the compiler extension __int128,
// with the same result: to_double rounds to nearest, ties to even, like a conversion would.
#pragma once

#include <cmath>
#include <cstdint>

namespace ubc::detail {

struct U128 {
    uint64_t hi = 0, lo = 0;
};

inline U128 multiply(uint64_t a, uint64_t b) {
    constexpr uint64_t kLow = 0xffffffffu;
    const uint64_t a0 = a & kLow, a1 = a >> 32, b0 = b & kLow, b1 = b >> 32;
    const uint64_t p00 = a0 * b0, p01 = a0 * b1, p10 = a1 * b0, p11 = a1 * b1;
    const uint64_t middle = (p00 >> 32) + (p01 & kLow) + (p10 & kLow);
    return {p11 + (p01 >> 32) + (p10 >> 32) + (middle >> 32), (middle << 32) | (p00 & kLow)};
}

// a - b for a >= b.
inline U128 subtract(const U128& a, const U128& b) {
    return {a.hi - b.hi - (a.lo < b.lo ? 1u : 0u), a.lo - b.lo};
}

inline double to_double(const U128& v) {
    if (v.hi == 0) return static_cast<double>(v.lo);
    int shift = 0;  // bits of hi: the top 64 bits of v are hi:lo >> shift
    for (uint64_t h = v.hi; h != 0; h >>= 1) ++shift;
    const uint64_t dropped_mask = shift == 64 ? ~uint64_t{0} : (uint64_t{1} << shift) - 1;
    uint64_t top = shift == 64 ? v.hi : (v.hi << (64 - shift)) | (v.lo >> shift);
    // A sticky bit keeps "something was dropped below" for the rounding of top to 53 bits.
    if ((v.lo & dropped_mask) != 0) top |= 1u;
    return std::ldexp(static_cast<double>(top), shift);
}

}  // namespace ubc::detail
