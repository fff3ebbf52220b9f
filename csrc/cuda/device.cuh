// Device building blocks shared by route.cu, fwd.cu and bwd.cu: int32 region geometry, the tile shapes,
// PTX wrappers (cp.async, ldmatrix, mma.sync m16n8k16) and the two warp-level GEMMs every attention kernel
// is written in. Included only by .cu files.
//
// Conventions used throughout:
// * A warp owns 16 rows of its tile (the M of one m16n8k16 MMA); a block has 1 to 4 warps.
// * Shared-memory tiles are row-major with a pitch of D + 8 elements: the 16-byte stagger puts the 8 rows
//   one ldmatrix reads into 8 different bank groups (conflict-free without a swizzle), and keeps every row
//   16-byte aligned for cp.async.
// * Register fragments follow the PTX layouts of mma.m16n8k16 (lane = 4 * group + tig):
//     A (16x16, 4 x b32): {row g, cols 2tig..+1}, {row g+8, same}, {row g, cols 2tig+8..+9}, {row g+8, same}
//     B (16x8,  2 x b32): {rows(k) 2tig..+1, col g}, {rows 2tig+8..+9, col g}
//     C (16x8,  4 x f32): (g, 2tig), (g, 2tig+1), (g+8, 2tig), (g+8, 2tig+1)
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include <cstring>
#include <stdexcept>
#include <string>

#include "common/params.h"

namespace dynattn {
namespace cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr unsigned kFullMask = 0xffffffffu;

// Throws std::runtime_error naming `what` if err is not cudaSuccess (defined in runtime.cu).
void check_cuda(cudaError_t err, const char* what);
// Makes `device` current for this runtime, and opts `kernel` into `smem_bytes` of dynamic shared memory when
// that exceeds the 48 KB default (with a clear error if the device cannot provide it).
void prepare_launch(int device, const void* kernel, size_t smem_bytes, const char* what);

// ----------------------------------------------------------------------------------------------------------
// Geometry (DESIGN.md "The operation"), in int32: the Python side checks that every extent, token count and
// slot count fits. Region i of an extent L cut into S spans [floor(i*L/S), floor((i+1)*L/S)); regions and
// the tokens inside a region are numbered row-major.
// ----------------------------------------------------------------------------------------------------------

struct GridGeom {
  int L[3];  // spatial extents (unused dims: 1)
  int S[3];  // regions per dim (unused dims: 1)
  int R;     // S0 * S1 * S2
  int M;     // slots per region: prod ceil(L/S), the largest region's token count
  int N;     // tokens per image: L0 * L1 * L2
};

struct Box {
  int lo[3];
  int len[3];
  int count;
};

__device__ __forceinline__ Box region_box(const GridGeom& g, int r) {
  Box bx;
#pragma unroll
  for (int d = 2; d >= 0; --d) {
    const int i = r % g.S[d];
    r /= g.S[d];
    // i * L can pass 2^31 for long 1-D extents: multiply in 64 bits.
    bx.lo[d] = static_cast<int>(static_cast<int64_t>(i) * g.L[d] / g.S[d]);
    bx.len[d] = static_cast<int>(static_cast<int64_t>(i + 1) * g.L[d] / g.S[d]) - bx.lo[d];
  }
  bx.count = bx.len[0] * bx.len[1] * bx.len[2];
  return bx;
}

// Grid coordinates of the t-th token (row-major) of a box; t < bx.count.
__device__ __forceinline__ void box_token(const Box& bx, int t, int c[3]) {
  c[2] = bx.lo[2] + t % bx.len[2];
  t /= bx.len[2];
  c[1] = bx.lo[1] + t % bx.len[1];
  c[0] = bx.lo[0] + t / bx.len[1];
}

// Row-major index of a grid point: the token order of the contiguous outputs (out, lse, delta, dq, dk, dv).
__device__ __forceinline__ int flat_token(const GridGeom& g, const int c[3]) {
  return (c[0] * g.L[1] + c[1]) * g.L[2] + c[2];
}

// A strided (B, L0, L1, L2, H, D) tensor, last dim contiguous; strides in elements.
struct Strided {
  const void* data;
  int64_t b, s[3], h;
};

// Element offset of grid point c, relative to the (b, h) base.
__device__ __forceinline__ int64_t spatial_offset(const Strided& t, const int c[3]) {
  return c[0] * t.s[0] + c[1] * t.s[1] + c[2] * t.s[2];
}

template <typename T>
__device__ __forceinline__ const T* head_base(const Strided& t, int b, int h) {
  return static_cast<const T*>(t.data) + b * t.b + h * t.h;
}

// ----------------------------------------------------------------------------------------------------------
// Tile shapes. D is the padded head dim (32, 64 or 128): max(d_qk, d_v), the smaller one zero-filled, so one
// instantiation per (dtype, D) serves every (d_qk, d_v) pair.
// ----------------------------------------------------------------------------------------------------------

template <int D>
struct Tile {
  static_assert(D == 32 || D == 64 || D == 128, "head dim tile must be 32, 64 or 128");
  static constexpr int kD = D;
  static constexpr int kLds = D + 8;  // smem pitch in elements (see the header comment)
  // Streamed tile (keys in the forward and dQ pass, queries in the dK/dV pass). 64 keeps the two stages of
  // K and V under 48 KB for D <= 64; at D = 128 a 32-row tile halves the S/dP fragments, which keeps the
  // dK/dV pass (two 16 x 128 fp32 accumulators per warp) out of local-memory spills.
  static constexpr int kN = D <= 64 ? 64 : 32;
  static constexpr int kChunks = D / 8;  // 16-byte chunks per row
};

constexpr int kMaxWarps = 4;

// Rows of the block's own tile: 16 per warp, as many warps as the largest region needs (up to 4). Tiny
// regions (BiFormer-T stage 3: 2x2 tokens) then run one-warp blocks: see fwd.cu for why regions are not packed.
inline int warps_for_region(int M) {
  const int w = (M + 15) / 16;
  return w < 1 ? 1 : (w > kMaxWarps ? kMaxWarps : w);
}

// ----------------------------------------------------------------------------------------------------------
// PTX wrappers (sm_80+)
// ----------------------------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; with fill == false nothing is read and the 16 bytes are zeroed.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool fill) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(fill ? 16 : 0)
               : "memory");
}

// 4-byte variant (lse / delta rows of the dK/dV pass).
__device__ __forceinline__ void cp_async_4(void* dst, const void* src, bool fill) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(fill ? 4 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
}

__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p))
               : "memory");
}

template <typename T>
struct Mma;

template <>
struct Mma<__half> {
  __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  // Two floats -> one b32 register, the first in the low half (the lower column of a fragment pair).
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &v, sizeof(u));
    return u;
  }
};

template <>
struct Mma<__nv_bfloat16> {
  __device__ __forceinline__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &v, sizeof(u));
    return u;
  }
};

// ----------------------------------------------------------------------------------------------------------
// Warp GEMMs on one warp's 16 rows
// ----------------------------------------------------------------------------------------------------------

// acc (16 x 8NT, fp32 C fragments) += A * B^T, where A is 16 rows of sA and B is 8NT rows of sB, both row-major
// in smem with pitch LDS, reducing over the first 16 * ksteps columns (ksteps <= KMAX, uniform over the warp).
// Used for S = Q K^T, dP = dO V^T and their transposes in the dK/dV pass.
template <typename T, int NT, int KMAX, int LDS>
__device__ __forceinline__ void gemm_abt(float (&acc)[NT][4], const T* sA, const T* sB, int ksteps) {
  static_assert(NT % 2 == 0, "n tiles come in pairs (one ldmatrix.x4 feeds two MMAs)");
  const int lane = threadIdx.x & 31;
  // ldmatrix.x4 row addresses: lanes 8i..8i+7 address the rows of matrix i.
  //   A: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15) -> a0..a3
  //   B: matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15) -> b0,b1 of two n tiles
  const T* a_row = sA + (lane % 16) * LDS + (lane / 16) * 8;
  const T* b_row = sB + ((lane % 8) + (lane / 16) * 8) * LDS + ((lane / 8) % 2) * 8;
#pragma unroll
  for (int ks = 0; ks < KMAX; ++ks) {
    if (ks < ksteps) {
      uint32_t a[4];
      ldsm_x4(a, a_row + ks * 16);
#pragma unroll
      for (int j = 0; j < NT / 2; ++j) {
        uint32_t b[4];
        ldsm_x4(b, b_row + j * 16 * LDS + ks * 16);
        Mma<T>::run(acc[2 * j], a, b[0], b[1]);
        Mma<T>::run(acc[2 * j + 1], a, b[2], b[3]);
      }
    }
  }
}

// acc (16 x 8NT) += A * B, where A (16 x 16KT) is in registers as A fragments and B is 16KT rows of sB
// (row-major, pitch LDS) whose columns are the output columns; only the first `ntiles` (even, uniform) column
// tiles are computed. Used for O += P V, dQ += dS K, dV += P^T dO and dK += dS^T Q.
template <typename T, int KT, int NT, int LDS>
__device__ __forceinline__ void gemm_ab(float (&acc)[NT][4], const uint32_t (&a)[KT][4], const T* sB,
                                        int ntiles) {
  static_assert(NT % 2 == 0, "n tiles come in pairs");
  const int lane = threadIdx.x & 31;
  // ldmatrix.x4.trans: matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15); the
  // transpose hands each lane B[k = 2tig..+1][n = g], the B fragment layout.
  const T* b_row = sB + (lane % 16) * LDS + (lane / 16) * 8;
#pragma unroll
  for (int j = 0; j < NT / 2; ++j) {
    if (2 * j < ntiles) {
#pragma unroll
      for (int kk = 0; kk < KT; ++kk) {
        uint32_t b[4];
        ldsm_x4_trans(b, b_row + kk * 16 * LDS + j * 16);
        Mma<T>::run(acc[2 * j], a[kk], b[0], b[1]);
        Mma<T>::run(acc[2 * j + 1], a[kk], b[2], b[3]);
      }
    }
  }
}

// C fragments of a 16 x 16KT fp32 tile -> A fragments (rounded to T) for the next MMA: the C layout of two
// adjacent n tiles is exactly the A layout of one k step.
template <typename T, int KT>
__device__ __forceinline__ void c_to_a(uint32_t (&a)[KT][4], const float (&c)[2 * KT][4]) {
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
    a[kk][0] = Mma<T>::pack(c[2 * kk][0], c[2 * kk][1]);
    a[kk][1] = Mma<T>::pack(c[2 * kk][2], c[2 * kk][3]);
    a[kk][2] = Mma<T>::pack(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[kk][3] = Mma<T>::pack(c[2 * kk + 1][2], c[2 * kk + 1][3]);
  }
}

// Reductions over the 4 lanes (one "quad") that share a fragment row.
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(kFullMask, x, 1));
  return fmaxf(x, __shfl_xor_sync(kFullMask, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(kFullMask, x, 1);
  return x + __shfl_xor_sync(kFullMask, x, 2);
}

// ----------------------------------------------------------------------------------------------------------
// Row copies: global (strided, gathered through the region geometry) -> shared, 16 rows per warp call
// ----------------------------------------------------------------------------------------------------------

// The calling warp copies 16 rows into dst (pitch LDS). Lane i < 16 has decoded row i: `ok` says whether the
// row exists and `off` is its element offset from `src`. Each lane decodes one row once; the offsets are then
// shuffled to the lanes that copy that row's 16-byte chunks, so consecutive lanes read consecutive chunks of a
// row (coalesced) without every lane redoing the integer divisions of the geometry. Missing rows and chunks at
// or past `width` are zero-filled: padding never carries stale (possibly NaN) bits into an MMA.
template <int D, int LDS, typename T>
__device__ __forceinline__ void copy_rows16(T* dst, const T* src, int64_t off, bool ok, int width) {
  constexpr int CH = D / 8;
  static_assert((16 * CH) % 32 == 0, "every lane copies the same number of chunks");
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int i0 = 0; i0 < 16 * CH; i0 += 32) {
    const int i = i0 + lane;
    const int row = i / CH, ch = i % CH;
    const int64_t o = __shfl_sync(kFullMask, off, row);
    const bool live = __shfl_sync(kFullMask, static_cast<int>(ok), row) != 0 && ch * 8 < width;
    cp_async_16(dst + row * LDS + ch * 8, live ? src + o + ch * 8 : src, live);
  }
}

// The reverse for the epilogue: the warp's 16 result rows (already converted, in smem with pitch LDS) go to
// a contiguous (B, N, H, width) output. Lane i < 16 holds row i's element offset `off` (ok = row exists).
template <int D, int LDS, typename T>
__device__ __forceinline__ void store_rows16(T* dst, const T* src, int64_t off, bool ok, int width) {
  constexpr int CH = D / 8;
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int i0 = 0; i0 < 16 * CH; i0 += 32) {
    const int i = i0 + lane;
    const int row = i / CH, ch = i % CH;
    const int64_t o = __shfl_sync(kFullMask, off, row);
    const bool live = __shfl_sync(kFullMask, static_cast<int>(ok), row) != 0 && ch * 8 < width;
    if (live) *reinterpret_cast<uint4*>(dst + o + ch * 8) = *reinterpret_cast<const uint4*>(src + row * LDS + ch * 8);
  }
}

// Writes the warp's 16 x 8NT fp32 C fragments, times `mul`, as T into its smem rows (pitch LDS): the staging
// step before store_rows16 turns 4-byte fragment pieces into 16-byte row chunks.
template <typename T, int NT, int LDS>
__device__ __forceinline__ void stage_c(T* sRows, const float (&c)[NT][4], float mul0, float mul1, int ntiles) {
  const int lane = threadIdx.x & 31;
  const int g = lane / 4, tig = lane % 4;
#pragma unroll
  for (int j = 0; j < NT; ++j) {
    if (j < ntiles) {
      const uint32_t lo = Mma<T>::pack(c[j][0] * mul0, c[j][1] * mul0);
      const uint32_t hi = Mma<T>::pack(c[j][2] * mul1, c[j][3] * mul1);
      *reinterpret_cast<uint32_t*>(sRows + g * LDS + j * 8 + 2 * tig) = lo;
      *reinterpret_cast<uint32_t*>(sRows + (g + 8) * LDS + j * 8 + 2 * tig) = hi;
    }
  }
}

// Per-lane decode of a "routed slot": the tiles streamed by the forward and dQ pass (keys) and by the dK/dV
// pass (queries) walk a list of regions, each padded to M slots: slot j is token j % M of region
// list[j / M]; it exists if j / M < len and j % M < that region's token count. Padding slots cost MMA work
// only where region sizes differ (non-divisible extents), at most one token per dim.
template <typename I>
__device__ __forceinline__ bool decode_slot(const GridGeom& g, const I* list, int len, int slot, int c[3]) {
  const int t = slot / g.M;
  if (t >= len) return false;
  const Box bx = region_box(g, static_cast<int>(list[t]));
  const int tok = slot - t * g.M;
  if (tok >= bx.count) return false;
  box_token(bx, tok, c);
  return true;
}

// ----------------------------------------------------------------------------------------------------------
// Host-side helpers of the launchers
// ----------------------------------------------------------------------------------------------------------

inline Strided strided(const TensorArg& t) {
  return Strided{t.data, t.stride[0], {t.stride[1], t.stride[2], t.stride[3]}, t.stride[4]};
}

// The instantiated tile D for a (d_qk, d_v) pair; each must be 32, 64 or 128 (Python checks first).
inline int padded_head_dim(int64_t dqk, int64_t dv) {
  auto ok = [](int64_t d) { return d == 32 || d == 64 || d == 128; };
  if (!ok(dqk) || !ok(dv)) {
    throw std::invalid_argument("dynattn._C_cuda: head dims must be 32, 64 or 128, got d_qk=" + std::to_string(dqk) +
                                ", d_v=" + std::to_string(dv));
  }
  return static_cast<int>(dqk > dv ? dqk : dv);
}

inline int streamed_tile_rows(int D) { return D <= 64 ? Tile<64>::kN : Tile<128>::kN; }

// Host-side mirror of GridGeom, built from the launch arguments.
inline GridGeom make_grid_geom(const int64_t L[3], const int64_t S[3]) {
  GridGeom g;
  g.R = 1;
  g.M = 1;
  g.N = 1;
  for (int d = 0; d < 3; ++d) {
    g.L[d] = static_cast<int>(L[d]);
    g.S[d] = static_cast<int>(S[d]);
    g.R *= g.S[d];
    g.M *= (g.L[d] + g.S[d] - 1) / g.S[d];
    g.N *= g.L[d];
  }
  return g;
}

}  // namespace cuda
}  // namespace dynattn
