// Kernels for AVX2 + FMA + F16C CPUs (built with -mavx2 -mfma -mf16c; chosen at run time by isa.cpp).
#include "cpu/kernels.h"

#if !defined(DYNATTN_NO_X86_SIMD) && (defined(__x86_64__) || defined(_M_X64))
#define DYNATTN_ISA_AVX2
#define DYNATTN_ISA_NS avx2
#define DYNATTN_ISA_NAME "avx2"
#define DYNATTN_ISA_TABLE kernels_avx2
#include "cpu/kernels_impl.h"
#else
const dynattn::cpu::KernelTable* dynattn::cpu::kernels_avx2() { return nullptr; }
#endif
