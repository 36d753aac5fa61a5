// Plain loops over contiguous arrays for the compiler's auto-vectoriser (no table lookups, only
// selects it can turn into blends), each compiled for baseline x86-64, AVX2 and AVX-512
// (target attributes) and picked at run time for the CPU, so the build assumes no ISA. Every
// version does the same IEEE double arithmetic, (v - offset) * scale with nothing to contract
// into a fused multiply-add, hence the same bits on every CPU. CMakeLists.txt compiles this
// file with -fno-trapping-math, without which GCC does not vectorise the selects, and with
// -ffp-contract=off, so that no version fuses a multiply and an add (which rounds once
// instead of twice: other bits); no value changes.
#include "kernels.hpp"

#include <cstring>

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define UBC_X86 1
#define UBC_AVX2 __attribute__((target("avx2")))
#define UBC_AVX512 __attribute__((target("avx2,avx512f,avx512bw,avx512dq,avx512vl")))
#else
#define UBC_AVX2
#define UBC_AVX512
#endif
#if defined(__clang__) || !defined(__GNUC__)
#define UBC_SCALAR __attribute__((noinline))
#else
#define UBC_SCALAR __attribute__((noinline, optimize("no-tree-vectorize")))
#endif

namespace ubc::detail {
namespace {

enum class Isa { baseline, avx2, avx512 };

Isa detect_isa() {
#ifdef UBC_X86
    __builtin_cpu_init();  // the checks also ask the OS for the AVX / AVX-512 registers
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
        return Isa::avx512;
    if (__builtin_cpu_supports("avx2")) return Isa::avx2;
#endif
    return Isa::baseline;
}

Isa isa() {
    static const Isa detected = detect_isa();
    return detected;
}

// The bodies are inlined into each ISA's version, and so compiled for it.

template <bool kClip, typename T>
[[gnu::always_inline]] inline void normalise_lanes(const T* __restrict in, int64_t n,
                                                   float* __restrict out, const Affine& f) {
    const Affine g{f.offset, f.scale, kClip};
    for (int64_t i = 0; i < n; ++i) out[i] = normalise_value(static_cast<double>(in[i]), g);
}

template <typename T>
[[gnu::always_inline]] inline void row_body(const T* in, int64_t n, float* out, const Affine& f) {
    if (f.clip)
        normalise_lanes<true>(in, n, out, f);
    else
        normalise_lanes<false>(in, n, out, f);
}

// out[2 i] = in[i], out[2 i + 1] = in[i + half]: an interleave, which vectorises.
template <typename T>
[[gnu::always_inline]] inline void perfect_shuffle(const T* __restrict in, T* __restrict out) {
    constexpr int64_t kHalf = kTile * kTile / 2;
    for (int64_t i = 0; i < kHalf; ++i) {
        out[2 * i] = in[i];
        out[2 * i + 1] = in[i + kHalf];
    }
}

template <typename T>
[[gnu::always_inline]] inline void transpose_body(const T* in, int64_t in_row, T* out,
                                                  int64_t out_row) {
    alignas(64) T a[kTile * kTile];
    alignas(64) T b[kTile * kTile];
    for (int64_t r = 0; r < kTile; ++r)
        for (int64_t c = 0; c < kTile; ++c) a[r * kTile + c] = in[r * in_row + c];
    // A perfect shuffle rotates the 8 bits of an entry's index (row, column) left by one, so
    // four of them swap row and column: a transpose made of interleaves.
    perfect_shuffle(a, b);
    perfect_shuffle(b, a);
    perfect_shuffle(a, b);
    perfect_shuffle(b, a);
    for (int64_t r = 0; r < kTile; ++r)
        std::memcpy(out + r * out_row, a + r * kTile, sizeof(T) * kTile);
}

// Blocks of 2^15 values keep the count and sum of a block within int32 lanes (|v| < 2^16).
template <typename T>
[[gnu::always_inline]] inline void moments_body(const T* __restrict in, int64_t n, IntMoments& m) {
    constexpr int64_t kBlock = int64_t{1} << 15;
    for (int64_t start = 0; start < n; start += kBlock) {
        const int64_t stop = std::min(n, start + kBlock);
        int32_t count = 0, sum = 0;
        uint64_t sum_sq = 0;
        for (int64_t i = start; i < stop; ++i) {
            const int32_t v = in[i];
            const auto u = static_cast<uint32_t>(v);  // u * u = v^2 < 2^32, exact modulo 2^32
            count += v != 0;
            sum += v;
            sum_sq += u * u;
        }
        m.count += count;
        m.sum += sum;
        m.sum_sq += sum_sq;
    }
}

template <typename T>
UBC_AVX2 void row_avx2(const T* in, int64_t n, float* out, const Affine& f) {
    row_body(in, n, out, f);
}
template <typename T>
UBC_AVX512 void row_avx512(const T* in, int64_t n, float* out, const Affine& f) {
    row_body(in, n, out, f);
}

template <typename T>
[[gnu::always_inline]] inline void tiles_body(const T* in, int64_t in_row, int64_t count, T* out,
                                              int64_t out_row) {
    for (int64_t t = 0; t < count; ++t)
        transpose_body(in + t * kTile * in_row, in_row, out + t * kTile, out_row);
}

template <typename T>
UBC_AVX2 void tiles_avx2(const T* in, int64_t in_row, int64_t count, T* out, int64_t out_row) {
    tiles_body(in, in_row, count, out, out_row);
}
template <typename T>
UBC_AVX512 void tiles_avx512(const T* in, int64_t in_row, int64_t count, T* out, int64_t out_row) {
    tiles_body(in, in_row, count, out, out_row);
}

template <typename T>
UBC_AVX2 void moments_avx2(const T* in, int64_t n, IntMoments& m) { moments_body(in, n, m); }
template <typename T>
UBC_AVX512 void moments_avx512(const T* in, int64_t n, IntMoments& m) { moments_body(in, n, m); }

// One float's IEEE binary16 bits, rounded to nearest even (subnormals, overflow to infinity
// and NaN payloads as NumPy's astype(float16) gives them), as selects the vectoriser turns
// into blends.
[[gnu::always_inline]] inline uint16_t half_bits(float value) {
    uint32_t x;
    std::memcpy(&x, &value, sizeof x);
    const uint32_t a = x & 0x7fffffffu;
    // normal halves: rebias the exponent (127 - 15), round the 13 dropped bits to even
    const uint32_t normal = (a - 0x38000000u + 0x0fffu + ((a >> 13) & 1u)) >> 13;
    // halves below 2^-14 are multiples of 2^-24: adding 0.5 (whose ulp is 2^-24) rounds |value|
    // to one, to nearest even, and leaves the multiple in the low bits
    float magnitude;
    std::memcpy(&magnitude, &a, sizeof magnitude);
    const float shifted = magnitude + 0.5f;
    uint32_t shifted_bits;
    std::memcpy(&shifted_bits, &shifted, sizeof shifted_bits);
    // the choices as masks (all ones or zero): GCC does not if-convert the selects here
    const auto when = [](bool c) { return 0u - static_cast<uint32_t>(c); };
    const uint32_t small = when(a < 0x38800000u), huge = when(a >= 0x47800000u);
    const uint32_t nan = when(a > 0x7f800000u), payload = (a & 0x007fffffu) >> 13;
    uint32_t h = ((shifted_bits - 0x3f000000u) & small) | (normal & ~small);
    h = (0x7c00u & huge) | (h & ~huge);  // 2^16 and above (and infinity): infinity
    h = ((0x7c00u | payload | static_cast<uint32_t>(payload == 0)) & nan) | (h & ~nan);  // NaN stays NaN
    return static_cast<uint16_t>(((x >> 16) & 0x8000u) | h);
}

// The float of binary16 bits (exact): normal halves rebias the exponent (127 - 15),
// subnormals are a multiple of 2^-24, infinities and NaN payloads keep their bits.
[[gnu::always_inline]] inline float half_value(uint16_t half) {
    const uint32_t h = half, sign = (h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu;
    const uint32_t mantissa = h & 0x3ffu;
    const auto when = [](bool c) { return 0u - static_cast<uint32_t>(c); };
    const float tiny = static_cast<float>(mantissa) * 5.9604644775390625e-8f;  // 2^-24
    uint32_t tiny_bits;
    std::memcpy(&tiny_bits, &tiny, sizeof tiny_bits);
    const uint32_t subnormal = when(exponent == 0), special = when(exponent == 0x1fu);
    uint32_t bits = ((exponent + 112u) << 23) | (mantissa << 13);
    bits = (tiny_bits & subnormal) | (bits & ~subnormal);
    bits = ((0x7f800000u | (mantissa << 13)) & special) | (bits & ~special);
    float value;
    bits |= sign;
    std::memcpy(&value, &bits, sizeof value);
    return value;
}

[[gnu::always_inline]] inline void from_half_body(const uint16_t* __restrict in, int64_t n,
                                                  float* __restrict out) {
    for (int64_t i = 0; i < n; ++i) out[i] = half_value(in[i]);
}

UBC_AVX2 void from_half_avx2(const uint16_t* in, int64_t n, float* out) {
    from_half_body(in, n, out);
}
UBC_AVX512 void from_half_avx512(const uint16_t* in, int64_t n, float* out) {
    from_half_body(in, n, out);
}

// 2^k, k the integer that shifted = y + shift holds in its low mantissa bits (shift =
// 1.5 * 2^kMantissa rounds y to it): k plus the exponent bias, moved into the exponent field.
template <typename F, typename U, int kMantissa, U kBias>
[[gnu::always_inline]] inline F power_of_two(F shifted, F shift) {
    U shifted_bits, shift_bits;
    std::memcpy(&shifted_bits, &shifted, sizeof shifted_bits);
    std::memcpy(&shift_bits, &shift, sizeof shift_bits);
    const U scale_bits = static_cast<U>((shifted_bits - shift_bits + kBias) << kMantissa);
    F scale;
    std::memcpy(&scale, &scale_bits, sizeof scale);
    return scale;
}

// exp(x) for |x| <= kLogitBound in double: x = k ln2 + r with |r| <= ln2 / 2 (ln2 in two parts,
// the first with trailing zeros so that k * kLn2Hi is exact), exp(r) by its Taylor series to
// r^11 (truncation under 7e-15 relative), times 2^k built in the exponent bits. Rounding k
// by adding and subtracting 1.5 * 2^52 leaves k in the low bits of the sum.
[[gnu::always_inline]] inline double bounded_exp(double x) {
    constexpr double kLog2e = 1.4426950408889634, kShift = 6755399441055744.0;
    constexpr double kLn2Hi = 6.93147180369123816490e-01, kLn2Lo = 1.90821492927058770002e-10;
    const double shifted = x * kLog2e + kShift;
    const double k = shifted - kShift;
    const double r = (x - k * kLn2Hi) - k * kLn2Lo;
    // Estrin's scheme: pairs, then pairs of pairs, a short chain of dependent operations
    const double r2 = r * r, r4 = r2 * r2, r8 = r4 * r4;
    const double q0 = 1.0 + r, q1 = 0.5 + r * (1.0 / 6), q2 = 1.0 / 24 + r * (1.0 / 120),
                 q3 = 1.0 / 720 + r * (1.0 / 5040), q4 = 1.0 / 40320 + r * (1.0 / 362880),
                 q5 = 1.0 / 3628800 + r * (1.0 / 39916800);
    const double s0 = q0 + q1 * r2, s1 = q2 + q3 * r2, s2 = q4 + q5 * r2;
    const double sum = (s0 + s1 * r4) + s2 * r8;
    return sum * power_of_two<double, uint64_t, 52, 1023u>(shifted, kShift);
}

// exp(-x) then 1 / (1 + exp(-x)) in float for |x| <= kLogitBound, the same way as
// bounded_exp (ln2 split so that k * kLn2Hi is exact for |k| < 2^9; Taylor series to r^7,
// truncation under 1e-8 relative): relative error under 6e-7 (Horner's 7 roundings,
// 1 + e and the division), below kFastError with a margin of 3.
constexpr float kFastError = 1.9073486328125e-06f;  // 2^-19

[[gnu::always_inline]] inline float fast_sigmoid(float x) {
    constexpr float kLog2e = 1.44269504f, kShift = 12582912.0f;  // 1.5 * 2^23
    constexpr float kLn2Hi = 0.693145751953125f, kLn2Lo = 1.42860682030941723e-06f;
    const float y = -x;
    const float shifted = y * kLog2e + kShift;
    const float k = shifted - kShift;
    const float r = (y - k * kLn2Hi) - k * kLn2Lo;
    float sum = 1.0f / 5040;
    sum = sum * r + 1.0f / 720;
    sum = sum * r + 1.0f / 120;
    sum = sum * r + 1.0f / 24;
    sum = sum * r + 1.0f / 6;
    sum = sum * r + 0.5f;
    sum = sum * r + 1.0f;
    sum = sum * r + 1.0f;
    return 1.0f / (1.0f + sum * power_of_two<float, uint32_t, 23, 127u>(shifted, kShift));
}

// Where a whole block of pixels is background or has logits <= kCertainlyNone, their
// probabilities (under 1.6e-8 < 2^-25) round to float16 zero: the block skips the sigmoid.
// Most pixels of a head are such blocks (the air around it, the brain away from a lesion).
constexpr int64_t kBlock = 64;
constexpr float kCertainlyNone = -18.0f;

[[gnu::always_inline]] inline float bounded_logit(float logit, bool head) {
    // NaN fails both comparisons and stays NaN
    float x = logit > kLogitBound ? kLogitBound : logit;
    x = x < -kLogitBound ? -kLogitBound : x;
    return head ? x : -kLogitBound;
}

[[gnu::always_inline]] inline uint16_t lesion_probability(float x) {
    return half_bits(static_cast<float>(1.0 / (1.0 + bounded_exp(-static_cast<double>(x)))));
}

// lesion_probability where unsure[i] (a few pixels a block): kept scalar, since vectorised it
// would compute the double sigmoid of every pixel under a mask.
UBC_SCALAR void settle_unsure(const float* logits, const float* images, int64_t n,
                              const uint8_t* unsure, uint16_t* probs) {
#ifdef __clang__
#pragma clang loop vectorize(disable)
#endif
    for (int64_t i = 0; i < n; ++i)
        if (unsure[i]) probs[i] = lesion_probability(bounded_logit(logits[i], images[i] != 0.0f));
}

// The float16 bits of a block's probabilities: the float sigmoid p where every value within
// kFastError of it (so the double one too) rounds, through float, to the same float16 (the
// rounding is monotonic: p - kFastError p and p + kFastError p agree); the double one where
// they do not (about 1 pixel in 100: within kFastError of a float16 rounding boundary) and
// for NaN. The same bits as lesion_probability everywhere, at float speed.
[[gnu::always_inline]] inline void block_probabilities(const float* __restrict logits,
                                                       const float* __restrict images,
                                                       int64_t n, uint16_t* __restrict probs) {
    uint8_t unsure[kBlock];
    int32_t any = 0;
    for (int64_t i = 0; i < n; ++i) {
        const float x = bounded_logit(logits[i], images[i] != 0.0f);
        const float p = fast_sigmoid(x), margin = p * kFastError;
        const uint16_t low = half_bits(p - margin), high = half_bits(p + margin);
        probs[i] = low;
        unsure[i] = static_cast<uint8_t>((low != high) | (x != x));
        any += unsure[i];
    }
    if (any) settle_unsure(logits, images, n, unsure, probs);
}

[[gnu::always_inline]] inline int64_t lesion_body(const float* __restrict logits,
                                                  const float* __restrict images, int64_t n,
                                                  uint16_t* __restrict probs,
                                                  uint16_t* __restrict image_halves) {
    int64_t pixels = 0;
    for (int64_t start = 0; start < n; start += kBlock) {
        const int64_t stop = std::min(n, start + kBlock);
        if (image_halves != nullptr)
            for (int64_t i = start; i < stop; ++i) image_halves[i] = half_bits(images[i]);
        // the images alone settle most blocks (all background: no lesion, probabilities 0),
        // whose logits are then not read at all
        int32_t head_pixels = 0;
        for (int64_t i = start; i < stop; ++i) head_pixels += images[i] != 0.0f;
        if (head_pixels == 0) {
            if (probs != nullptr) std::fill(probs + start, probs + stop, uint16_t{0});
            continue;
        }
        int32_t lesion = 0, live = 0;
        for (int64_t i = start; i < stop; ++i) {
            // & rather than &&: the logit is read either way, so the loop vectorises
            const bool head = images[i] != 0.0f;
            lesion += head & (logits[i] > 0.0f);
            live += head & !(logits[i] <= kCertainlyNone);
        }
        pixels += lesion;
        if (probs == nullptr) continue;
        if (live == 0)
            std::fill(probs + start, probs + stop, uint16_t{0});
        else
            block_probabilities(logits + start, images + start, stop - start, probs + start);
    }
    return pixels;
}

UBC_AVX2 int64_t lesion_avx2(const float* logits, const float* images, int64_t n,
                             uint16_t* probs, uint16_t* image_halves) {
    return lesion_body(logits, images, n, probs, image_halves);
}
UBC_AVX512 int64_t lesion_avx512(const float* logits, const float* images, int64_t n,
                                 uint16_t* probs, uint16_t* image_halves) {
    return lesion_body(logits, images, n, probs, image_halves);
}

}  // namespace

void from_half(const uint16_t* in, int64_t n, float* out) {
    switch (isa()) {
        case Isa::avx512: return from_half_avx512(in, n, out);
        case Isa::avx2: return from_half_avx2(in, n, out);
        case Isa::baseline: break;
    }
    from_half_body(in, n, out);
}

int64_t lesion_pixels(const float* logits, const float* images, int64_t n, uint16_t* probs,
                      uint16_t* image_halves) {
    switch (isa()) {
        case Isa::avx512: return lesion_avx512(logits, images, n, probs, image_halves);
        case Isa::avx2: return lesion_avx2(logits, images, n, probs, image_halves);
        case Isa::baseline: break;
    }
    return lesion_body(logits, images, n, probs, image_halves);
}

template <typename T>
void normalise_row(const T* in, int64_t n, float* out, const Affine& f) {
    switch (isa()) {
        case Isa::avx512: return row_avx512(in, n, out, f);
        case Isa::avx2: return row_avx2(in, n, out, f);
        case Isa::baseline: break;
    }
    row_body(in, n, out, f);
}

template <typename T>
void transpose_tiles(const T* in, int64_t in_row, int64_t count, T* out, int64_t out_row) {
    switch (isa()) {
        case Isa::avx512: return tiles_avx512(in, in_row, count, out, out_row);
        case Isa::avx2: return tiles_avx2(in, in_row, count, out, out_row);
        case Isa::baseline: break;
    }
    tiles_body(in, in_row, count, out, out_row);
}

template <typename T>
void add_moments(const T* in, int64_t n, IntMoments& m) {
    switch (isa()) {
        case Isa::avx512: return moments_avx512(in, n, m);
        case Isa::avx2: return moments_avx2(in, n, m);
        case Isa::baseline: break;
    }
    moments_body(in, n, m);
}

#define UBC_INSTANTIATE(T)                                                \
    template void normalise_row<T>(const T*, int64_t, float*, const Affine&); \
    template void transpose_tiles<T>(const T*, int64_t, int64_t, T*, int64_t);
UBC_INSTANTIATE(uint8_t)
UBC_INSTANTIATE(int16_t)
UBC_INSTANTIATE(uint16_t)
UBC_INSTANTIATE(int32_t)
UBC_INSTANTIATE(float)
UBC_INSTANTIATE(double)
template void add_moments<uint8_t>(const uint8_t*, int64_t, IntMoments&);
template void add_moments<int16_t>(const int16_t*, int64_t, IntMoments&);
template void add_moments<uint16_t>(const uint16_t*, int64_t, IntMoments&);

}  // namespace ubc::detail
