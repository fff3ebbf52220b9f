// Routing: which key regions each query region attends to (DESIGN.md "Route"), in two launches.
//
// 1. region_means_kernel: the fp32 mean of q and of k over each region's tokens, (B, R, H, D) each. One block
//    per (region, batch, q-or-k); threads run over the H*D channels (consecutive threads read consecutive
//    elements of a token row) and each sums its channel over the region's tokens in row-major order, so the
//    result does not depend on the launch shape.
// 2. topk_kernel: one block per (query region, routing group, batch). It computes the row of logits
//    scale * qr[r] . kr[j] for every key region j into shared memory (one warp per j), then selects the top
//    k with k rounds of a block-wide argmax. Each candidate is a 64-bit key (order-preserving float bits,
//    then the complemented index), so one unsigned max picks the largest logit and, among equal logits, the
//    lowest region index, which is torch.topk's order. k rounds of O(R / threads) work are cheap for the
//    small k routing uses; the row of R logits must fit in shared memory (R up to about 12k regions within
//    the 48 KB default, more with the opt-in).
// Shared routing concatenates the heads (a group is the whole H*D row); per-head routing has H groups of D.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "cuda/device.cuh"
#include "cuda/kernels.h"

namespace dynattn {
namespace cuda {

namespace {

__device__ __forceinline__ float load_float(const float* p) { return *p; }
__device__ __forceinline__ float load_float(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ float load_float(const __nv_bfloat16* p) { return __bfloat162float(*p); }

// ----------------------------------------------------------------------------------------------------------
// 1. region means
// ----------------------------------------------------------------------------------------------------------

struct MeansParams {
  GridGeom g;
  int H, D;
  Strided x[2];  // q, k
  float* mean[2];  // qr, kr: contiguous (B, R, H, D)
};

constexpr int kMeansThreads = 128;

template <typename T>
__global__ void __launch_bounds__(kMeansThreads) region_means_kernel(const MeansParams p) {
  const int r = blockIdx.x, b = blockIdx.y, which = blockIdx.z;
  const Strided x = which ? p.x[1] : p.x[0];
  const Box bx = region_box(p.g, r);
  const int C = p.H * p.D;
  float* dst = p.mean[which] + (static_cast<int64_t>(b) * p.g.R + r) * C;
  const int lo[3] = {bx.lo[0], bx.lo[1], bx.lo[2]};
  for (int c = threadIdx.x; c < C; c += kMeansThreads) {
    const T* base = head_base<T>(x, b, c / p.D) + c % p.D + spatial_offset(x, lo);
    float acc = 0.f;
    for (int i0 = 0; i0 < bx.len[0]; ++i0) {
      for (int i1 = 0; i1 < bx.len[1]; ++i1) {
        const T* line = base + i0 * x.s[0] + i1 * x.s[1];
        for (int i2 = 0; i2 < bx.len[2]; ++i2) acc += load_float(line + i2 * x.s[2]);
      }
    }
    dst[c] = acc / static_cast<float>(bx.count);
  }
}

// ----------------------------------------------------------------------------------------------------------
// 2. logits + top-k
// ----------------------------------------------------------------------------------------------------------

struct TopkParams {
  int R, C;   // regions; channels of a mean row (H * D)
  int width;  // channels per routing group: C (shared) or D (per head)
  int groups;  // 1 (shared) or H (per head)
  int topk;
  float scale;
  const float* qr;
  const float* kr;
  int64_t* idx;  // contiguous (B, groups, R, topk) == (B, R, topk) when groups == 1
};

constexpr int kTopkThreads = 256;
constexpr int kTopkWarps = kTopkThreads / 32;
constexpr uint32_t kTaken = 0xffffffffu;  // a negative-NaN bit pattern, never produced by canonical()

// Logit bits with -0 folded into +0 (torch.topk treats them as equal) and every NaN made the positive quiet
// NaN (torch.topk ranks NaN above everything), so kTaken cannot collide with a real logit.
__device__ __forceinline__ uint32_t canonical(float x) {
  if (x != x) return 0x7fc00000u;
  if (x == 0.f) return 0u;
  return __float_as_uint(x);
}

// Larger key = larger logit; among equal logits, the lower index. Every real key is > 0.
__device__ __forceinline__ unsigned long long topk_key(uint32_t bits, int j) {
  const uint32_t ordered = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (static_cast<unsigned long long>(ordered) << 32) | (0xffffffffu - static_cast<uint32_t>(j));
}

__device__ __forceinline__ unsigned long long warp_max(unsigned long long v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) {
    const unsigned long long w = __shfl_xor_sync(kFullMask, v, o);
    v = w > v ? w : v;
  }
  return v;
}

__global__ void __launch_bounds__(kTopkThreads) topk_kernel(const TopkParams p) {
  extern __shared__ __align__(16) float smem_f[];
  __shared__ unsigned long long warp_best[kTopkWarps];
  const int r = blockIdx.x, grp = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* sq = smem_f;                                          // [width]: the query region's mean
  uint32_t* sbits = reinterpret_cast<uint32_t*>(smem_f + p.width);  // [R]: canonical logit bits

  const int64_t row_b = static_cast<int64_t>(b) * p.R;
  const float* qrow = p.qr + (row_b + r) * p.C + grp * p.width;
  for (int c = threadIdx.x; c < p.width; c += kTopkThreads) sq[c] = qrow[c];
  __syncthreads();

  for (int j = warp; j < p.R; j += kTopkWarps) {
    const float* krow = p.kr + (row_b + j) * p.C + grp * p.width;
    float acc = 0.f;
    for (int c = lane; c < p.width; c += 32) acc += sq[c] * krow[c];
#pragma unroll
    for (int o = 16; o > 0; o /= 2) acc += __shfl_xor_sync(kFullMask, acc, o);
    if (lane == 0) sbits[j] = canonical(acc * p.scale);
  }
  __syncthreads();

  int64_t* out = p.idx + ((static_cast<int64_t>(b) * p.groups + grp) * p.R + r) * p.topk;
  for (int t = 0; t < p.topk; ++t) {
    unsigned long long best = 0ull;
    for (int j = threadIdx.x; j < p.R; j += kTopkThreads) {
      const uint32_t bits = sbits[j];
      if (bits != kTaken) {
        const unsigned long long key = topk_key(bits, j);
        best = key > best ? key : best;
      }
    }
    best = warp_max(best);
    if (lane == 0) warp_best[warp] = best;
    __syncthreads();
    if (warp == 0) {
      best = warp_max(lane < kTopkWarps ? warp_best[lane] : 0ull);
      if (lane == 0) {
        const int j = static_cast<int>(0xffffffffu - static_cast<uint32_t>(best & 0xffffffffull));
        out[t] = j;
        sbits[j] = kTaken;
      }
    }
    __syncthreads();  // the winner is marked (and warp_best read) before the next round
  }
}

template <typename T>
void launch_means(const MeansParams& mp, int B, cudaStream_t stream, int device) {
  prepare_launch(device, reinterpret_cast<const void*>(&region_means_kernel<T>), 0, "route (region means)");
  const dim3 grid(static_cast<unsigned>(mp.g.R), static_cast<unsigned>(B), 2);
  region_means_kernel<T><<<grid, kMeansThreads, 0, stream>>>(mp);
  check_cuda(cudaGetLastError(), "route (region means) launch");
}

}  // namespace

void route(const RouteArgs& a, const Launch& launch) {
  const Geometry& geo = a.shape.g;
  const GridGeom gg = make_grid_geom(geo.L, geo.S);
  const int H = static_cast<int>(geo.H), D = static_cast<int>(a.shape.Dqk);
  if (geo.B == 0 || gg.N == 0 || a.topk == 0) return;
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(launch.stream);

  MeansParams mp;
  mp.g = gg;
  mp.H = H;
  mp.D = D;
  mp.x[0] = strided(a.q);
  mp.x[1] = strided(a.k);
  mp.mean[0] = a.qr;
  mp.mean[1] = a.kr;
  switch (a.dtype) {
    case DType::Float32: launch_means<float>(mp, static_cast<int>(geo.B), stream, launch.device); break;
    case DType::Float16: launch_means<__half>(mp, static_cast<int>(geo.B), stream, launch.device); break;
    case DType::BFloat16: launch_means<__nv_bfloat16>(mp, static_cast<int>(geo.B), stream, launch.device); break;
    default: throw std::invalid_argument("dynattn._C_cuda.route: dtype must be float32, float16 or bfloat16");
  }

  TopkParams tp;
  tp.R = gg.R;
  tp.C = H * D;
  tp.groups = a.per_head ? H : 1;
  tp.width = a.per_head ? D : H * D;
  tp.topk = static_cast<int>(a.topk);
  tp.scale = a.scale;
  tp.qr = a.qr;
  tp.kr = a.kr;
  tp.idx = a.idx_out;
  const size_t smem = (static_cast<size_t>(tp.width) + static_cast<size_t>(tp.R)) * sizeof(float);
  prepare_launch(launch.device, reinterpret_cast<const void*>(&topk_kernel), smem, "route (top-k)");
  const dim3 grid(static_cast<unsigned>(tp.R), static_cast<unsigned>(tp.groups), static_cast<unsigned>(geo.B));
  topk_kernel<<<grid, kTopkThreads, smem, stream>>>(tp);
  check_cuda(cudaGetLastError(), "route (top-k) launch");
}

}  // namespace cuda
}  // namespace dynattn
