// Storage dtypes and their exact conversions to/from float (round-to-nearest-even on the way down).
#pragma once

#include <stdint.h>
#include <string.h>

#include "common/macros.h"

namespace dynattn {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3 };

// Distinct 16-bit storage types, so kernels can be templated on the element type.
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

DYNATTN_FN uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

DYNATTN_FN float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// IEEE binary16 -> binary32, exact for every input (subnormals, inf, NaN).
DYNATTN_FN float half_to_float(uint16_t h) {
  const uint32_t shifted_exp = 0x7c00u << 13;  // exponent mask after the shift
  uint32_t o = (uint32_t)(h & 0x7fffu) << 13;  // exponent + mantissa
  const uint32_t exp = o & shifted_exp;
  o += (127u - 15u) << 23;  // rebias
  float f;
  if (exp == shifted_exp) {  // inf / NaN: finish the rebias to 255
    o += (128u - 16u) << 23;
    f = bits_float(o);
  } else if (exp == 0) {  // zero / subnormal: renormalise through one float subtraction (exact)
    o += 1u << 23;
    f = bits_float(o) - bits_float(113u << 23);
  } else {
    f = bits_float(o);
  }
  return bits_float(float_bits(f) | ((uint32_t)(h & 0x8000u) << 16));
}

// binary32 -> binary16, round to nearest even; overflow gives inf, NaN stays a (quiet) NaN.
DYNATTN_FN uint16_t float_to_half(float x) {
  const uint32_t f32infty = 255u << 23;
  const uint32_t f16max = (127u + 16u) << 23;          // 65536.0f: first value that rounds to inf
  const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;  // 0.5f
  uint32_t f = float_bits(x);
  const uint32_t sign = f & 0x80000000u;
  f ^= sign;
  uint16_t o;
  if (f >= f16max) {
    o = (f > f32infty) ? 0x7e00 : 0x7c00;
  } else if (f < (113u << 23)) {  // result is subnormal or zero: let the FPU round (default mode is RNE)
    const float r = bits_float(f) + bits_float(denorm_magic);
    o = (uint16_t)(float_bits(r) - denorm_magic);
  } else {
    const uint32_t mant_odd = (f >> 13) & 1u;
    f += ((uint32_t)(15 - 127) << 23) + 0xfffu;
    f += mant_odd;
    o = (uint16_t)(f >> 13);
  }
  return (uint16_t)(o | (sign >> 16));
}

DYNATTN_FN float bf16_to_float(uint16_t b) { return bits_float((uint32_t)b << 16); }

// binary32 -> bfloat16, round to nearest even; NaN stays a quiet NaN.
DYNATTN_FN uint16_t float_to_bf16(float x) {
  const uint32_t u = float_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
  return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Storage element -> compute type, and back. The compute type is float, or double for float64 storage.
DYNATTN_FN float to_compute(float x) { return x; }
DYNATTN_FN double to_compute(double x) { return x; }
DYNATTN_FN float to_compute(Half x) { return half_to_float(x.bits); }
DYNATTN_FN float to_compute(BFloat16 x) { return bf16_to_float(x.bits); }

DYNATTN_FN void from_compute(float x, float* dst) { *dst = x; }
DYNATTN_FN void from_compute(double x, double* dst) { *dst = x; }
DYNATTN_FN void from_compute(float x, Half* dst) { dst->bits = float_to_half(x); }
DYNATTN_FN void from_compute(float x, BFloat16* dst) { dst->bits = float_to_bf16(x); }

DYNATTN_FN int dtype_size(DType t) { return t == DType::Float64 ? 8 : t == DType::Float32 ? 4 : 2; }

}  // namespace dynattn
