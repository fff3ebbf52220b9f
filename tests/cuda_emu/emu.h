// CPU emulation of the CUDA features the dynattn kernels use, for testing without a GPU.
// Threads of a block run as cooperative fibers (ucontext) on one OS thread; warp collectives (shuffles,
// ldmatrix, mma) exchange data through per-warp slots between two warp barriers. PTX semantics written from the
// PTX ISA / CUTLASS SM80 traits, independently of the kernel code.
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __align__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

namespace emu {

[[noreturn]] void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void warp_barrier();
void block_barrier();
int cur_thread();
unsigned char* smem_base();
size_t smem_size();
void check_smem(const void* p, size_t n, const char* what);
void check_global(const void* p, size_t n, const char* what);

struct Copy {
  void* dst;
  const void* src;
  int size;
  int fill;
};
void cp_async(void* dst, const void* src, int size, int fill);
void cp_commit();
void cp_wait(int n);

// Per-warp exchange slots.
struct Slot {
  uint64_t v[12];
};
Slot* slots();  // [warp*32 + lane]

}  // namespace emu

inline uint3 threadIdx;
inline uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

inline void __syncthreads() { emu::block_barrier(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::warp_barrier(); }

template <typename T>
inline T emu_shfl(T v, int src) {
  static_assert(sizeof(T) <= 8, "shfl of at most 8 bytes");
  const int t = emu::cur_thread();
  const int w = t / 32;
  emu::Slot* s = emu::slots();
  s[t].v[0] = 0;
  memcpy(&s[t].v[0], &v, sizeof(T));
  emu::warp_barrier();
  T r;
  memcpy(&r, &s[w * 32 + (src & 31)].v[0], sizeof(T));
  emu::warp_barrier();
  return r;
}
template <typename T>
inline T __shfl_sync(unsigned, T v, int src) {
  return emu_shfl(v, src);
}
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int m) {
  return emu_shfl(v, (emu::cur_thread() % 32) ^ m);
}

inline size_t __cvta_generic_to_shared(const void* p) { return reinterpret_cast<size_t>(p); }
inline unsigned __float_as_uint(float f) {
  unsigned u;
  memcpy(&u, &f, 4);
  return u;
}
