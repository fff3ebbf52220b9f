// Small SIMD abstraction the kernels are written against, one definition per ISA.
//
// Included only by the ISA translation units (kernels_scalar.cpp, kernels_avx2.cpp, kernels_avx512.cpp), after
// they define DYNATTN_ISA_NS (and DYNATTN_ISA_AVX2 / DYNATTN_ISA_AVX512). Everything here lives in
// dynattn::cpu::DYNATTN_ISA_NS, so each ISA's inline functions and template instantiations get their own symbol
// names: the linker can never substitute an AVX-512 copy into the scalar path. For the same reason these files
// use no std:: templates or inline functions; C library calls (expf, memcpy) are fine.
//
// VecF: W floats (16 AVX-512, 8 AVX2, 4 in the portable "scalar" unit through GCC/Clang vector extensions, 1 with
// other compilers). VecD: one double (float64 exists for gradcheck, not for speed).
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "common/dtype.h"

#if defined(DYNATTN_ISA_AVX2) || defined(DYNATTN_ISA_AVX512)
#include <immintrin.h>
#endif

#if defined(__GNUC__)
#define DYNATTN_VINLINE inline __attribute__((always_inline))
#define DYNATTN_UNROLL _Pragma("GCC unroll 16")
#else
#define DYNATTN_VINLINE inline
#define DYNATTN_UNROLL
#endif

namespace dynattn {
namespace cpu {
namespace DYNATTN_ISA_NS {

// ------------------------------------------------------------------------------------------------ scalars
DYNATTN_VINLINE float sexp(float x) { return expf(x); }
DYNATTN_VINLINE double sexp(double x) { return exp(x); }
DYNATTN_VINLINE float slog(float x) { return logf(x); }
DYNATTN_VINLINE double slog(double x) { return log(x); }
template <class T>
DYNATTN_VINLINE T smax(T a, T b) { return a > b ? a : b; }
template <class T>
DYNATTN_VINLINE T smin(T a, T b) { return a < b ? a : b; }

// ------------------------------------------------------------------------------------------------ VecD
struct VecD {
  static constexpr int W = 1;
  double v;
};
DYNATTN_VINLINE VecD vload(const double* p) { return {*p}; }
DYNATTN_VINLINE void vstore(double* p, VecD a) { *p = a.v; }
DYNATTN_VINLINE VecD vset1(double x) { return {x}; }
DYNATTN_VINLINE VecD vadd(VecD a, VecD b) { return {a.v + b.v}; }
DYNATTN_VINLINE VecD vsub(VecD a, VecD b) { return {a.v - b.v}; }
DYNATTN_VINLINE VecD vmul(VecD a, VecD b) { return {a.v * b.v}; }
DYNATTN_VINLINE VecD vfma(VecD a, VecD b, VecD c) { return {a.v * b.v + c.v}; }
DYNATTN_VINLINE VecD vmax(VecD a, VecD b) { return {a.v > b.v ? a.v : b.v}; }
DYNATTN_VINLINE VecD vexp(VecD a) { return {exp(a.v)}; }
DYNATTN_VINLINE double vreduce_add(VecD a) { return a.v; }
DYNATTN_VINLINE double vreduce_max(VecD a) { return a.v; }

// ------------------------------------------------------------------------------------------------ VecF
// exp for the SIMD paths: Cephes expf (range reduction by ln 2 split in two constants, degree-5 polynomial
// on [-ln2/2, ln2/2]), about 1 ulp. Inputs below -87.33 (where the result would be subnormal) give exactly 0,
// so exp(-inf) = 0 for masked keys; NaN propagates.
constexpr float kExpHi = 88.3762626647949f;
constexpr float kExpLo = -87.3365447504f;
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kExpC1 = 0.693359375f;
constexpr float kExpC2 = -2.12194440e-4f;
constexpr float kExpP0 = 1.9875691500E-4f;
constexpr float kExpP1 = 1.3981999507E-3f;
constexpr float kExpP2 = 8.3334519073E-3f;
constexpr float kExpP3 = 4.1665795894E-2f;
constexpr float kExpP4 = 1.6666665459E-1f;
constexpr float kExpP5 = 5.0000001201E-1f;

#if defined(DYNATTN_ISA_AVX512)

struct VecF {
  static constexpr int W = 16;
  __m512 v;
};
DYNATTN_VINLINE VecF vload(const float* p) { return {_mm512_loadu_ps(p)}; }
DYNATTN_VINLINE void vstore(float* p, VecF a) { _mm512_storeu_ps(p, a.v); }
DYNATTN_VINLINE VecF vset1(float x) { return {_mm512_set1_ps(x)}; }
DYNATTN_VINLINE VecF vadd(VecF a, VecF b) { return {_mm512_add_ps(a.v, b.v)}; }
DYNATTN_VINLINE VecF vsub(VecF a, VecF b) { return {_mm512_sub_ps(a.v, b.v)}; }
DYNATTN_VINLINE VecF vmul(VecF a, VecF b) { return {_mm512_mul_ps(a.v, b.v)}; }
DYNATTN_VINLINE VecF vfma(VecF a, VecF b, VecF c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
DYNATTN_VINLINE VecF vmax(VecF a, VecF b) { return {_mm512_max_ps(a.v, b.v)}; }
DYNATTN_VINLINE float vreduce_add(VecF a) { return _mm512_reduce_add_ps(a.v); }
DYNATTN_VINLINE float vreduce_max(VecF a) { return _mm512_reduce_max_ps(a.v); }

DYNATTN_VINLINE VecF vexp(VecF a) {
  const __mmask16 keep = _mm512_cmp_ps_mask(a.v, _mm512_set1_ps(kExpLo), _CMP_NLT_UQ);  // x >= lo, or NaN
  // x as the second operand: min/max return it when it is NaN, so NaN survives the clamp.
  __m512 x = _mm512_max_ps(_mm512_set1_ps(kExpLo), _mm512_min_ps(_mm512_set1_ps(kExpHi), a.v));
  const __m512 fx = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(kExpC1), x);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(kExpC2), x);
  __m512 y = _mm512_set1_ps(kExpP0);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(kExpP1));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(kExpP2));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(kExpP3));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(kExpP4));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(kExpP5));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
  return {_mm512_maskz_mov_ps(keep, _mm512_scalef_ps(y, fx))};
}

// dst[d*16 + j] = src[j*lds + d] for a 16x16 block: four rounds of shuffles instead of 256 scalar moves.
DYNATTN_VINLINE void transpose_block(const float* src, int64_t lds, float* dst) {
  __m512 r[16], t[16];
  DYNATTN_UNROLL for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
  DYNATTN_UNROLL for (int i = 0; i < 8; ++i) {  // 32-bit interleave of row pairs
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  DYNATTN_UNROLL for (int i = 0; i < 4; ++i) {  // 64-bit interleave: r[4i+c] lane L = column 4L+c of rows 4i..4i+3
    const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * i + 2]), d = _mm512_castps_pd(t[4 * i + 3]);
    r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  DYNATTN_UNROLL for (int c = 0; c < 4; ++c) {  // gather 128-bit lanes: two rounds
    t[c] = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88);
    t[4 + c] = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xdd);
    t[8 + c] = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
    t[12 + c] = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xdd);
  }
  DYNATTN_UNROLL for (int c = 0; c < 4; ++c) {
    _mm512_storeu_ps(dst + 16 * c, _mm512_shuffle_f32x4(t[c], t[8 + c], 0x88));
    _mm512_storeu_ps(dst + 16 * (8 + c), _mm512_shuffle_f32x4(t[c], t[8 + c], 0xdd));
    _mm512_storeu_ps(dst + 16 * (4 + c), _mm512_shuffle_f32x4(t[4 + c], t[12 + c], 0x88));
    _mm512_storeu_ps(dst + 16 * (12 + c), _mm512_shuffle_f32x4(t[4 + c], t[12 + c], 0xdd));
  }
}

// Row conversions storage <-> float, W elements at a time, scalar tail.
DYNATTN_VINLINE int64_t load_bulk(const float* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, _mm512_loadu_ps(src + i));
  return i;
}
DYNATTN_VINLINE int64_t load_bulk(const Half* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(src + i))));
  return i;
}
DYNATTN_VINLINE int64_t load_bulk(const BFloat16* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(src + i)));
    _mm512_storeu_ps(dst + i, _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)));
  }
  return i;
}
DYNATTN_VINLINE int64_t store_bulk(const float* src, int64_t n, float* dst) { return load_bulk(src, n, dst); }
DYNATTN_VINLINE int64_t store_bulk(const float* src, int64_t n, Half* dst) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm256_storeu_si256((__m256i*)(dst + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  return i;
}
DYNATTN_VINLINE int64_t store_bulk(const float* src, int64_t n, BFloat16* dst) {
  int64_t i = 0;
  const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7fff), quiet = _mm512_set1_epi32(0x40);
  for (; i + 16 <= n; i += 16) {
    const __m512 f = _mm512_loadu_ps(src + i);
    const __m512i u = _mm512_castps_si512(f);
    const __m512i rounded =
        _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(u, 16), one))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
    const __m512i r = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), quiet));
    _mm256_storeu_si256((__m256i*)(dst + i), _mm512_cvtepi32_epi16(r));
  }
  return i;
}

// Non-temporal stores of whole cache lines (dst 64-byte aligned, n a multiple of the line): output rows are
// written once, so skipping the read-for-ownership halves their memory traffic.
DYNATTN_VINLINE int64_t stream_bulk(const float* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; i += 16) _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
  return n;
}
DYNATTN_VINLINE int64_t stream_bulk(const float* src, int64_t n, Half* dst) {
  for (int64_t i = 0; i < n; i += 16)
    _mm256_stream_si256((__m256i*)(dst + i),
                        _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  return n;
}
DYNATTN_VINLINE int64_t stream_bulk(const float* src, int64_t n, BFloat16* dst) {
  alignas(64) BFloat16 line[32];
  for (int64_t i = 0; i < n; i += 32) {
    store_bulk(src + i, 32, line);
    _mm512_stream_si512((__m512i*)(dst + i), _mm512_load_si512((const __m512i*)line));
  }
  return n;
}
DYNATTN_VINLINE void stream_fence() { _mm_sfence(); }
constexpr bool kHasStreamingStores = true;

#elif defined(DYNATTN_ISA_AVX2)

struct VecF {
  static constexpr int W = 8;
  __m256 v;
};
DYNATTN_VINLINE VecF vload(const float* p) { return {_mm256_loadu_ps(p)}; }
DYNATTN_VINLINE void vstore(float* p, VecF a) { _mm256_storeu_ps(p, a.v); }
DYNATTN_VINLINE VecF vset1(float x) { return {_mm256_set1_ps(x)}; }
DYNATTN_VINLINE VecF vadd(VecF a, VecF b) { return {_mm256_add_ps(a.v, b.v)}; }
DYNATTN_VINLINE VecF vsub(VecF a, VecF b) { return {_mm256_sub_ps(a.v, b.v)}; }
DYNATTN_VINLINE VecF vmul(VecF a, VecF b) { return {_mm256_mul_ps(a.v, b.v)}; }
DYNATTN_VINLINE VecF vfma(VecF a, VecF b, VecF c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
DYNATTN_VINLINE VecF vmax(VecF a, VecF b) { return {_mm256_max_ps(a.v, b.v)}; }
DYNATTN_VINLINE float vreduce_add(VecF a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
DYNATTN_VINLINE float vreduce_max(VecF a) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

DYNATTN_VINLINE VecF vexp(VecF a) {
  const __m256 keep = _mm256_cmp_ps(a.v, _mm256_set1_ps(kExpLo), _CMP_NLT_UQ);  // x >= lo, or NaN
  __m256 x = _mm256_max_ps(_mm256_set1_ps(kExpLo), _mm256_min_ps(_mm256_set1_ps(kExpHi), a.v));
  const __m256 fx =
      _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(kExpC1), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(kExpC2), x);
  __m256 y = _mm256_set1_ps(kExpP0);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(kExpP1));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(kExpP2));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(kExpP3));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(kExpP4));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(kExpP5));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  // 2^fx through the exponent field: fx is in [-126, 127] after the clamp.
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return {_mm256_and_ps(keep, _mm256_mul_ps(y, _mm256_castsi256_ps(e)))};
}

// dst[d*8 + j] = src[j*lds + d] for an 8x8 block.
DYNATTN_VINLINE void transpose_block(const float* src, int64_t lds, float* dst) {
  __m256 r[8], t[8];
  DYNATTN_UNROLL for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  DYNATTN_UNROLL for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  DYNATTN_UNROLL for (int i = 0; i < 2; ++i) {  // r[4i+c] lane L = column 4L+c of rows 4i..4i+3
    r[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
    r[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xee);
    r[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
    r[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xee);
  }
  DYNATTN_UNROLL for (int c = 0; c < 4; ++c) {
    _mm256_storeu_ps(dst + 8 * c, _mm256_permute2f128_ps(r[c], r[4 + c], 0x20));
    _mm256_storeu_ps(dst + 8 * (4 + c), _mm256_permute2f128_ps(r[c], r[4 + c], 0x31));
  }
}

DYNATTN_VINLINE int64_t load_bulk(const float* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_loadu_ps(src + i));
  return i;
}
DYNATTN_VINLINE int64_t load_bulk(const Half* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(src + i))));
  return i;
}
DYNATTN_VINLINE int64_t load_bulk(const BFloat16* src, int64_t n, float* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(src + i)));
    _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
  }
  return i;
}
DYNATTN_VINLINE int64_t store_bulk(const float* src, int64_t n, float* dst) { return load_bulk(src, n, dst); }
DYNATTN_VINLINE int64_t store_bulk(const float* src, int64_t n, Half* dst) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128((__m128i*)(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  return i;
}
DYNATTN_VINLINE int64_t store_bulk(const float* src, int64_t n, BFloat16* dst) {
  int64_t i = 0;
  const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7fff), quiet = _mm256_set1_epi32(0x40);
  for (; i + 8 <= n; i += 8) {
    const __m256 f = _mm256_loadu_ps(src + i);
    const __m256i u = _mm256_castps_si256(f);
    const __m256i rounded = _mm256_srli_epi32(
        _mm256_add_epi32(u, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(u, 16), one))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
    const __m256i r = _mm256_blendv_epi8(rounded, _mm256_or_si256(_mm256_srli_epi32(u, 16), quiet), nan);
    // Narrow 8 x u32 (< 2^16) to 8 x u16: packus works per 128-bit lane, so gather the two halves after it.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128((__m128i*)(dst + i), _mm256_castsi256_si128(packed));
  }
  return i;
}

DYNATTN_VINLINE int64_t stream_bulk(const float* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
  return n;
}
DYNATTN_VINLINE int64_t stream_bulk(const float* src, int64_t n, Half* dst) {
  for (int64_t i = 0; i < n; i += 8)
    _mm_stream_si128((__m128i*)(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  return n;
}
DYNATTN_VINLINE int64_t stream_bulk(const float* src, int64_t n, BFloat16* dst) {
  alignas(32) BFloat16 part[16];
  for (int64_t i = 0; i < n; i += 16) {
    store_bulk(src + i, 16, part);
    _mm256_stream_si256((__m256i*)(dst + i), _mm256_load_si256((const __m256i*)part));
  }
  return n;
}
DYNATTN_VINLINE void stream_fence() { _mm_sfence(); }
constexpr bool kHasStreamingStores = true;

#elif defined(__GNUC__)  // portable: GCC/Clang generic 4-wide vectors (SSE2 on baseline x86-64, NEON on arm64)

typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));

struct VecF {
  static constexpr int W = 4;
  v4f v;
};
DYNATTN_VINLINE VecF vload(const float* p) {
  VecF r;
  memcpy(&r.v, p, sizeof(r.v));
  return r;
}
DYNATTN_VINLINE void vstore(float* p, VecF a) { memcpy(p, &a.v, sizeof(a.v)); }
DYNATTN_VINLINE VecF vset1(float x) { return {v4f{x, x, x, x}}; }
DYNATTN_VINLINE VecF vadd(VecF a, VecF b) { return {a.v + b.v}; }
DYNATTN_VINLINE VecF vsub(VecF a, VecF b) { return {a.v - b.v}; }
DYNATTN_VINLINE VecF vmul(VecF a, VecF b) { return {a.v * b.v}; }
DYNATTN_VINLINE VecF vfma(VecF a, VecF b, VecF c) { return {a.v * b.v + c.v}; }
DYNATTN_VINLINE v4f vselect(v4i mask, v4f a, v4f b) { return (v4f)((mask & (v4i)a) | (~mask & (v4i)b)); }
DYNATTN_VINLINE VecF vmax(VecF a, VecF b) { return {vselect(a.v > b.v, a.v, b.v)}; }
DYNATTN_VINLINE float vreduce_add(VecF a) { return (a.v[0] + a.v[1]) + (a.v[2] + a.v[3]); }
DYNATTN_VINLINE float vreduce_max(VecF a) { return smax(smax(a.v[0], a.v[1]), smax(a.v[2], a.v[3])); }

DYNATTN_VINLINE VecF vexp(VecF a) {
  const v4f lo = vset1(kExpLo).v, hi = vset1(kExpHi).v;
  const v4i keep = (a.v >= lo) | (a.v != a.v);  // x >= lo, or NaN
  v4f x = vselect(a.v > hi, hi, vselect(a.v < lo, lo, a.v));
  const v4f magic = vset1(12582912.0f).v;  // 1.5 * 2^23: adding and subtracting it rounds to nearest even
  const v4f fx = (x * vset1(kLog2e).v + magic) - magic;
  x = x - fx * vset1(kExpC1).v;
  x = x - fx * vset1(kExpC2).v;
  v4f y = vset1(kExpP0).v;
  y = y * x + vset1(kExpP1).v;
  y = y * x + vset1(kExpP2).v;
  y = y * x + vset1(kExpP3).v;
  y = y * x + vset1(kExpP4).v;
  y = y * x + vset1(kExpP5).v;
  y = y * (x * x) + (x + vset1(1.0f).v);
  const v4i e = (__builtin_convertvector(fx, v4i) + 127) << 23;  // 2^fx, fx in [-126, 127]
  return {(v4f)((v4i)(y * (v4f)e) & keep)};
}

DYNATTN_VINLINE void transpose_block(const float* src, int64_t lds, float* dst) {
  for (int d = 0; d < 4; ++d)
    for (int j = 0; j < 4; ++j) dst[d * 4 + j] = src[j * lds + d];
}

template <class S>
DYNATTN_VINLINE int64_t load_bulk(const S*, int64_t, float*) { return 0; }
template <class S>
DYNATTN_VINLINE int64_t store_bulk(const float*, int64_t, S*) { return 0; }
template <class S>
DYNATTN_VINLINE int64_t stream_bulk(const float*, int64_t, S*) { return 0; }
DYNATTN_VINLINE void stream_fence() {}
constexpr bool kHasStreamingStores = false;

#else  // plain scalar code for other compilers

struct VecF {
  static constexpr int W = 1;
  float v;
};
DYNATTN_VINLINE VecF vload(const float* p) { return {*p}; }
DYNATTN_VINLINE void vstore(float* p, VecF a) { *p = a.v; }
DYNATTN_VINLINE VecF vset1(float x) { return {x}; }
DYNATTN_VINLINE VecF vadd(VecF a, VecF b) { return {a.v + b.v}; }
DYNATTN_VINLINE VecF vsub(VecF a, VecF b) { return {a.v - b.v}; }
DYNATTN_VINLINE VecF vmul(VecF a, VecF b) { return {a.v * b.v}; }
DYNATTN_VINLINE VecF vfma(VecF a, VecF b, VecF c) { return {a.v * b.v + c.v}; }
DYNATTN_VINLINE VecF vmax(VecF a, VecF b) { return {a.v > b.v ? a.v : b.v}; }
DYNATTN_VINLINE VecF vexp(VecF a) { return {expf(a.v)}; }
DYNATTN_VINLINE float vreduce_add(VecF a) { return a.v; }
DYNATTN_VINLINE float vreduce_max(VecF a) { return a.v; }

DYNATTN_VINLINE void transpose_block(const float* src, int64_t, float* dst) { *dst = *src; }

template <class S>
DYNATTN_VINLINE int64_t load_bulk(const S*, int64_t, float*) { return 0; }
template <class S>
DYNATTN_VINLINE int64_t store_bulk(const float*, int64_t, S*) { return 0; }
template <class S>
DYNATTN_VINLINE int64_t stream_bulk(const float*, int64_t, S*) { return 0; }
DYNATTN_VINLINE void stream_fence() {}
constexpr bool kHasStreamingStores = false;

#endif

DYNATTN_VINLINE void transpose_block(const double* src, int64_t, double* dst) { *dst = *src; }
DYNATTN_VINLINE int64_t load_bulk(const double*, int64_t, double*) { return 0; }
DYNATTN_VINLINE int64_t store_bulk(const double*, int64_t, double*) { return 0; }
DYNATTN_VINLINE int64_t stream_bulk(const double*, int64_t, double*) { return 0; }

// Vector type and width of a compute type.
template <class T>
struct VecOf;
template <>
struct VecOf<float> {
  using type = VecF;
};
template <>
struct VecOf<double> {
  using type = VecD;
};

// dst[0..n) = src[0..n) converted to the compute type T.
template <class S, class T>
DYNATTN_VINLINE void load_row(const S* src, int64_t n, T* dst) {
  for (int64_t i = load_bulk(src, n, dst); i < n; ++i) dst[i] = to_compute(src[i]);
}

// dst[0..n) = src[0..n) rounded to the storage type S.
template <class T, class S>
DYNATTN_VINLINE void store_row(const T* src, int64_t n, S* dst) {
  for (int64_t i = store_bulk(src, n, dst); i < n; ++i) from_compute(src[i], dst + i);
}

// store_row for an output row, with non-temporal stores if `stream` and the row is whole 64-byte lines.
// Callers run stream_fence() before their results are used.
template <class T, class S>
DYNATTN_VINLINE void store_out_row(const T* src, int64_t n, S* dst, bool stream) {
  if (kHasStreamingStores && stream && (reinterpret_cast<uintptr_t>(dst) & 63) == 0 && (n * sizeof(S)) % 64 == 0 &&
      stream_bulk(src, n, dst) == n)
    return;
  store_row(src, n, dst);
}

}  // namespace DYNATTN_ISA_NS
}  // namespace cpu
}  // namespace dynattn
