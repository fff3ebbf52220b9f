// Portability macros shared by the CPU and (future) CUDA kernels.
#pragma once

#if defined(__CUDACC__)
#define DYNATTN_HOST_DEVICE __host__ __device__
#else
#define DYNATTN_HOST_DEVICE
#endif

// Every function defined in csrc/common/ has internal linkage. These headers are compiled into translation
// units built with different -m flags (scalar, AVX2, AVX-512); an `inline` (COMDAT) definition would let the
// linker keep, say, the AVX-512 copy and hand it to the scalar path, which then dies with SIGILL on older CPUs.
#define DYNATTN_FN static inline DYNATTN_HOST_DEVICE
