// Kernels for AVX-512 (F, BW, VL, DQ) CPUs (built with -mavx512*; chosen at run time by isa.cpp).
#include "cpu/kernels.h"

#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 warns inside its own avx512fintrin.h (_mm512_undefined_* placeholders, GCC bug 105593).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#if !defined(DYNATTN_NO_X86_SIMD) && (defined(__x86_64__) || defined(_M_X64))
#define DYNATTN_ISA_AVX512
#define DYNATTN_ISA_NS avx512
#define DYNATTN_ISA_NAME "avx512"
#define DYNATTN_ISA_TABLE kernels_avx512
#include "cpu/kernels_impl.h"
#else
const dynattn::cpu::KernelTable* dynattn::cpu::kernels_avx512() { return nullptr; }
#endif
