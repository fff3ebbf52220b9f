// Routed attention, backward: dq, dk, dv from dout (and dlse), recomputing the probabilities from the saved
// lse (P = exp(scale * q.k - lse)) as FlashAttention-2 does, in three launches on one stream:
//
// 1. delta_kernel: delta = rowsum(dout * out) - dlse per (token, head). Subtracting dlse is how a gradient
//    through the returned lse enters: d lse / d s = P, so dS gains P * dlse.
// 2. dq_kernel, tiled exactly like the forward (one block per query-region tile, head, batch; K/V tiles of the
//    routed key regions streamed through cp.async double buffering):
//      S = Q K^T, P = exp2(S * scale log2e - lse log2e), dP = dO V^T, dS = P (dP - delta), dQ += dS K.
// 3. dkv_kernel, one block per key-region tile, head, batch. The block needs the query regions that routed
//    to its key region: the inverse routing index (CSR, ascending query region, built on the device by
//    dynattn/backends/cuda.py) lists them, and the block streams their query tokens in tiles:
//      S^T = K Q^T, P^T, dV += P^T dO, dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q.
//    Every dk/dv row is owned by exactly one block, which sums its query regions in a fixed order: no float
//    atomics, and the result is bitwise reproducible.
//
// dS is rounded to the input type for its MMA (as P is in the forward); all accumulators are fp32. Tile
// shapes, padding and the choice not to pack query regions are those of the forward (see fwd.cu).
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

// ----------------------------------------------------------------------------------------------------------
// 1. delta
// ----------------------------------------------------------------------------------------------------------

struct DeltaParams {
  GridGeom g;
  int H, dv;
  int64_t rows;  // B * N * H
  Strided out, dout;
  const float* dlse;  // contiguous (B, N, H) or nullptr
  float* delta;       // contiguous (B, N, H)
};

template <typename T>
__device__ __forceinline__ float2 to_float2(uint32_t u);
template <>
__device__ __forceinline__ float2 to_float2<__half>(uint32_t u) {
  __half2 v;
  memcpy(&v, &u, sizeof(v));
  return __half22float2(v);
}
template <>
__device__ __forceinline__ float2 to_float2<__nv_bfloat16>(uint32_t u) {
  __nv_bfloat162 v;
  memcpy(&v, &u, sizeof(v));
  return __bfloat1622float2(v);
}

// Dot product of 8 packed 16-bit elements, in fp32.
template <typename T>
__device__ __forceinline__ float dot8(const uint4& a, const uint4& b) {
  const float2 a0 = to_float2<T>(a.x), a1 = to_float2<T>(a.y), a2 = to_float2<T>(a.z), a3 = to_float2<T>(a.w);
  const float2 b0 = to_float2<T>(b.x), b1 = to_float2<T>(b.y), b2 = to_float2<T>(b.z), b3 = to_float2<T>(b.w);
  return a0.x * b0.x + a0.y * b0.y + a1.x * b1.x + a1.y * b1.y + a2.x * b2.x + a2.y * b2.y + a3.x * b3.x +
         a3.y * b3.y;
}

// 8 lanes per (b, n, h) row, each reading 16-byte chunks of out and dout; rows are enumerated in the
// (B, N, H) order of delta itself.
constexpr int kDeltaThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kDeltaThreads) delta_kernel(const DeltaParams p) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * kDeltaThreads + threadIdx.x) / 8;
  const int sub = threadIdx.x % 8;
  float acc = 0.f;
  if (row < p.rows) {
    const int h = static_cast<int>(row % p.H);
    const int64_t bn = row / p.H;
    const int n = static_cast<int>(bn % p.g.N);
    const int b = static_cast<int>(bn / p.g.N);
    const int c[3] = {n / (p.g.L[1] * p.g.L[2]), (n / p.g.L[2]) % p.g.L[1], n % p.g.L[2]};
    const T* o = head_base<T>(p.out, b, h) + spatial_offset(p.out, c);
    const T* d = head_base<T>(p.dout, b, h) + spatial_offset(p.dout, c);
    for (int ch = sub; ch < p.dv / 8; ch += 8) {
      acc += dot8<T>(*reinterpret_cast<const uint4*>(o + ch * 8), *reinterpret_cast<const uint4*>(d + ch * 8));
    }
  }
  acc += __shfl_xor_sync(kFullMask, acc, 4);
  acc += __shfl_xor_sync(kFullMask, acc, 2);
  acc += __shfl_xor_sync(kFullMask, acc, 1);
  if (row < p.rows && sub == 0) p.delta[row] = acc - (p.dlse != nullptr ? p.dlse[row] : 0.f);
}

// ----------------------------------------------------------------------------------------------------------
// 2. and 3. dQ, dK/dV
// ----------------------------------------------------------------------------------------------------------

struct BwdParams {
  GridGeom g;
  int H, dqk, dv, topk, per_head;
  int warps;      // 16 * warps own rows per block (query rows in dQ, key rows in dK/dV)
  int row_tiles;  // blocks per region: ceil(M / (16 * warps))
  int dq_stages;  // K/V buffers of the dQ pass: 2, or 1 when one tile covers every routed key
  Strided q, k, v, dout;
  const int64_t* idx;
  const float* lse;    // contiguous (B, N, H)
  const float* delta;  // contiguous (B, N, H)
  const int32_t* inv_offsets;
  const int32_t* inv_regions;
  void* dq_out;  // contiguous (B, N, H, dqk)
  void* dk_out;  // contiguous (B, N, H, dqk)
  void* dv_out;  // contiguous (B, N, H, dv)
  float scale, scale_log2;
};

// dQ smem: own Q and dO rows, then per stage K, V tiles and the additive key mask.
template <int D>
size_t dq_smem_bytes(int warps, int stages, size_t elem) {
  using C = Tile<D>;
  return (static_cast<size_t>(2 * 16 * warps) * C::kLds + static_cast<size_t>(stages) * 2 * C::kN * C::kLds) * elem +
         static_cast<size_t>(stages) * C::kN * sizeof(float);
}

// dK/dV smem: own K and V rows, then per stage Q, dO tiles and the lse and delta of their rows.
template <int D>
size_t dkv_smem_bytes(int warps, size_t elem) {
  using C = Tile<D>;
  return (static_cast<size_t>(2 * 16 * warps) * C::kLds + static_cast<size_t>(2) * 2 * C::kN * C::kLds) * elem +
         static_cast<size_t>(2) * 2 * C::kN * sizeof(float);
}

// The explicit "at least 1 block per SM" lets ptxas use more than 128 registers: without it, sm_90 capped
// the D = 128 instantiation at 128 and spilled.
template <typename T, int D>
__global__ void __launch_bounds__(32 * kMaxWarps, 1) dq_kernel(const BwdParams p) {
  using C = Tile<D>;
  constexpr int BN = C::kN, LDS = C::kLds;
  extern __shared__ __align__(16) unsigned char smem_raw[];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, tig = lane % 4;
  const int BM = 16 * p.warps;
  const int b = blockIdx.z, h = blockIdx.y;
  const int r = blockIdx.x / p.row_tiles;
  const int m0 = (blockIdx.x % p.row_tiles) * BM;
  const Box qbox = region_box(p.g, r);
  if (m0 >= qbox.count) return;  // uniform over the block, before any barrier

  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sdO = sQ + BM * LDS;
  T* sKV = sdO + BM * LDS;
  float* sBias = reinterpret_cast<float*>(sKV + p.dq_stages * 2 * BN * LDS);
  T* sQw = sQ + warp * 16 * LDS;
  T* sdOw = sdO + warp * 16 * LDS;

  const int64_t* route =
      p.idx + ((static_cast<int64_t>(b) * (p.per_head ? p.H : 1) + (p.per_head ? h : 0)) * p.g.R + r) * p.topk;
  const int n_tiles = (p.topk * p.g.M + BN - 1) / BN;
  const T* kbh = head_base<T>(p.k, b, h);
  const T* vbh = head_base<T>(p.v, b, h);
  const int64_t row0 = static_cast<int64_t>(b) * p.g.N * p.H + h;  // (b, n = 0, h) in (B, N, H)

  // Own rows: lane i < 16 decodes query row i of the warp (n_tok = -1 for padding rows).
  int n_tok = -1;
  {
    const int m = m0 + warp * 16 + lane;
    int c[3] = {0, 0, 0};
    const bool ok = lane < 16 && m < qbox.count;
    if (ok) {
      box_token(qbox, m, c);
      n_tok = flat_token(p.g, c);
    }
    copy_rows16<D, LDS>(sQw, head_base<T>(p.q, b, h), ok ? spatial_offset(p.q, c) : 0, ok, p.dqk);
    copy_rows16<D, LDS>(sdOw, head_base<T>(p.dout, b, h), ok ? spatial_offset(p.dout, c) : 0, ok, p.dv);
  }
  // lse (base 2) and delta of this lane's fragment rows g and g + 8. A padding row gets lse = +inf, which
  // makes its P exactly 0 (it is never written, but this keeps it free of inf/NaN arithmetic).
  float lse2[2], dlt[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int n = __shfl_sync(kFullMask, n_tok, g + 8 * i);
    lse2[i] = n >= 0 ? p.lse[row0 + static_cast<int64_t>(n) * p.H] * kLog2e : INFINITY;
    dlt[i] = n >= 0 ? p.delta[row0 + static_cast<int64_t>(n) * p.H] : 0.f;
  }

  auto load_kv = [&](int tile, int stage) {
    T* sK = sKV + stage * 2 * BN * LDS;
    T* sV = sK + BN * LDS;
    for (int r0 = warp * 16; r0 < BN; r0 += p.warps * 16) {
      int c[3] = {0, 0, 0};
      const bool ok = lane < 16 && decode_slot(p.g, route, p.topk, tile * BN + r0 + lane, c);
      if (lane < 16) sBias[stage * BN + r0 + lane] = ok ? 0.f : -INFINITY;
      copy_rows16<D, LDS>(sK + r0 * LDS, kbh, ok ? spatial_offset(p.k, c) : 0, ok, p.dqk);
      copy_rows16<D, LDS>(sV + r0 * LDS, vbh, ok ? spatial_offset(p.v, c) : 0, ok, p.dv);
    }
  };

  load_kv(0, 0);
  cp_async_commit();  // group 0: own Q, dO and K/V tile 0

  float dq[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) dq[j][0] = dq[j][1] = dq[j][2] = dq[j][3] = 0.f;
  const int qk_steps = p.dqk / 16, v_steps = p.dv / 16, qk_tiles = p.dqk / 8;

  for (int it = 0; it < n_tiles; ++it) {
    const int stage = it & 1;
    if (it + 1 < n_tiles) load_kv(it + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const T* sK = sKV + stage * 2 * BN * LDS;
    const T* sV = sK + BN * LDS;
    const float* bias = sBias + stage * BN;

    float s[BN / 8][4], dp[BN / 8][4];
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
      dp[j][0] = dp[j][1] = dp[j][2] = dp[j][3] = 0.f;
    }
    gemm_abt<T, BN / 8, D / 16, LDS>(s, sQw, sK, qk_steps);    // S = Q K^T
    gemm_abt<T, BN / 8, D / 16, LDS>(dp, sdOw, sV, v_steps);   // dP = dO V^T
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = e / 2;  // fragment row g (e = 0, 1) or g + 8 (e = 2, 3)
        const float pr = exp2f(s[j][e] * p.scale_log2 + bias[j * 8 + 2 * tig + (e & 1)] - lse2[i]);
        s[j][e] = pr * (dp[j][e] - dlt[i]);  // dS, in place
      }
    }
    uint32_t da[BN / 16][4];
    c_to_a<T, BN / 16>(da, s);
    gemm_ab<T, BN / 16, D / 8, LDS>(dq, da, sK, qk_tiles);  // dQ += dS K

    __syncthreads();
  }
  cp_async_wait<0>();  // only the trailing empty group is left; the sync keeps the epilogue order explicit
  __syncwarp();

  // dq = scale * dS K, staged through the warp's own Q rows.
  stage_c<T, D / 8, LDS>(sQw, dq, p.scale, p.scale, qk_tiles);
  __syncwarp();
  store_rows16<D, LDS>(static_cast<T*>(p.dq_out), sQw, (row0 + static_cast<int64_t>(n_tok) * p.H) * p.dqk, n_tok >= 0,
                       p.dqk);
}

template <typename T, int D>
__global__ void __launch_bounds__(32 * kMaxWarps) dkv_kernel(const BwdParams p) {
  using C = Tile<D>;
  constexpr int BN = C::kN, LDS = C::kLds;
  extern __shared__ __align__(16) unsigned char smem_raw[];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int tig = lane % 4;
  const int BM = 16 * p.warps;
  const int b = blockIdx.z, h = blockIdx.y;
  const int rk = blockIdx.x / p.row_tiles;
  const int n0 = (blockIdx.x % p.row_tiles) * BM;
  const Box kbox = region_box(p.g, rk);
  if (n0 >= kbox.count) return;  // uniform over the block, before any barrier

  T* sK = reinterpret_cast<T*>(smem_raw);
  T* sV = sK + BM * LDS;
  T* sQdO = sV + BM * LDS;  // [2 stages][Q | dO][BN][LDS]
  float* sLse = reinterpret_cast<float*>(sQdO + 2 * 2 * BN * LDS);
  float* sDelta = sLse + 2 * BN;
  T* sKw = sK + warp * 16 * LDS;
  T* sVw = sV + warp * 16 * LDS;

  // The query regions that routed to rk, ascending (empty: dk = dv = 0 for these rows, still written).
  const int64_t grp = p.per_head ? static_cast<int64_t>(b) * p.H + h : b;
  const int32_t* offs = p.inv_offsets + grp * (p.g.R + 1);
  const int beg = offs[rk];
  const int cnt = offs[rk + 1] - beg;
  const int32_t* list = p.inv_regions + grp * p.g.R * p.topk + beg;
  const int n_tiles = (cnt * p.g.M + BN - 1) / BN;
  const T* qbh = head_base<T>(p.q, b, h);
  const T* dobh = head_base<T>(p.dout, b, h);
  const int64_t row0 = static_cast<int64_t>(b) * p.g.N * p.H + h;

  // Own rows: lane i < 16 decodes key row i of the warp.
  int n_tok = -1;
  {
    const int m = n0 + warp * 16 + lane;
    int c[3] = {0, 0, 0};
    const bool ok = lane < 16 && m < kbox.count;
    if (ok) {
      box_token(kbox, m, c);
      n_tok = flat_token(p.g, c);
    }
    copy_rows16<D, LDS>(sKw, head_base<T>(p.k, b, h), ok ? spatial_offset(p.k, c) : 0, ok, p.dqk);
    copy_rows16<D, LDS>(sVw, head_base<T>(p.v, b, h), ok ? spatial_offset(p.v, c) : 0, ok, p.dv);
  }

  // Query tile `tile` (slots of the listed query regions) into buffer `stage`, with each row's lse and delta.
  // A padding slot gets lse = +inf (P = 0) and delta = 0, so it adds exactly nothing to dK and dV.
  auto load_q = [&](int tile, int stage) {
    T* sQs = sQdO + stage * 2 * BN * LDS;
    T* sdOs = sQs + BN * LDS;
    for (int r0 = warp * 16; r0 < BN; r0 += p.warps * 16) {
      int c[3] = {0, 0, 0};
      const bool ok = lane < 16 && decode_slot(p.g, list, cnt, tile * BN + r0 + lane, c);
      if (lane < 16) {
        float* lse_dst = sLse + stage * BN + r0 + lane;
        float* delta_dst = sDelta + stage * BN + r0 + lane;
        if (ok) {
          const int64_t at = row0 + static_cast<int64_t>(flat_token(p.g, c)) * p.H;
          cp_async_4(lse_dst, p.lse + at, true);
          cp_async_4(delta_dst, p.delta + at, true);
        } else {
          *lse_dst = INFINITY;
          *delta_dst = 0.f;
        }
      }
      copy_rows16<D, LDS>(sQs + r0 * LDS, qbh, ok ? spatial_offset(p.q, c) : 0, ok, p.dqk);
      copy_rows16<D, LDS>(sdOs + r0 * LDS, dobh, ok ? spatial_offset(p.dout, c) : 0, ok, p.dv);
    }
  };

  if (n_tiles > 0) load_q(0, 0);
  cp_async_commit();  // group 0: own K, V and query tile 0

  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
    dk[j][0] = dk[j][1] = dk[j][2] = dk[j][3] = 0.f;
    dv[j][0] = dv[j][1] = dv[j][2] = dv[j][3] = 0.f;
  }
  const int qk_steps = p.dqk / 16, v_steps = p.dv / 16, qk_tiles = p.dqk / 8, v_tiles = p.dv / 8;

  for (int it = 0; it < n_tiles; ++it) {
    const int stage = it & 1;
    if (it + 1 < n_tiles) load_q(it + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const T* sQs = sQdO + stage * 2 * BN * LDS;
    const T* sdOs = sQs + BN * LDS;
    const float* lse = sLse + stage * BN;
    const float* delta = sDelta + stage * BN;

    // Rows are this warp's 16 keys, columns the BN query slots of the tile.
    float s[BN / 8][4], dp[BN / 8][4];
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
      dp[j][0] = dp[j][1] = dp[j][2] = dp[j][3] = 0.f;
    }
    gemm_abt<T, BN / 8, D / 16, LDS>(s, sKw, sQs, qk_steps);   // S^T = K Q^T
    gemm_abt<T, BN / 8, D / 16, LDS>(dp, sVw, sdOs, v_steps);  // dP^T = V dO^T
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = j * 8 + 2 * tig + (e & 1);
        s[j][e] = exp2f(s[j][e] * p.scale_log2 - lse[col] * kLog2e);  // P^T
        dp[j][e] = s[j][e] * (dp[j][e] - delta[col]);                 // dS^T
      }
    }
    uint32_t a[BN / 16][4];
    c_to_a<T, BN / 16>(a, s);
    gemm_ab<T, BN / 16, D / 8, LDS>(dv, a, sdOs, v_tiles);  // dV += P^T dO
    c_to_a<T, BN / 16>(a, dp);
    gemm_ab<T, BN / 16, D / 8, LDS>(dk, a, sQs, qk_tiles);  // dK += dS^T Q

    __syncthreads();
  }
  // With no query region routed here the own-row copies are first waited for now. wait_group covers only
  // the calling lane's copies, so the warp syncs before any lane overwrites those rows with its results.
  cp_async_wait<0>();
  __syncwarp();

  stage_c<T, D / 8, LDS>(sKw, dk, p.scale, p.scale, qk_tiles);
  stage_c<T, D / 8, LDS>(sVw, dv, 1.f, 1.f, v_tiles);
  __syncwarp();
  const int64_t at = row0 + static_cast<int64_t>(n_tok) * p.H;
  store_rows16<D, LDS>(static_cast<T*>(p.dk_out), sKw, at * p.dqk, n_tok >= 0, p.dqk);
  store_rows16<D, LDS>(static_cast<T*>(p.dv_out), sVw, at * p.dv, n_tok >= 0, p.dv);
}

// ----------------------------------------------------------------------------------------------------------
// launch
// ----------------------------------------------------------------------------------------------------------

template <typename T, int D>
void launch_grads(const BwdParams& p, dim3 grid, const Launch& launch) {
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(launch.stream);
  const size_t smem_dq = dq_smem_bytes<D>(p.warps, p.dq_stages, sizeof(T));
  const void* kdq = reinterpret_cast<const void*>(&dq_kernel<T, D>);
  prepare_launch(launch.device, kdq, smem_dq, "routed attention backward (dq)");
  dq_kernel<T, D><<<grid, 32 * p.warps, smem_dq, stream>>>(p);
  check_cuda(cudaGetLastError(), "routed attention backward (dq) launch");

  const size_t smem_dkv = dkv_smem_bytes<D>(p.warps, sizeof(T));
  const void* kdkv = reinterpret_cast<const void*>(&dkv_kernel<T, D>);
  prepare_launch(launch.device, kdkv, smem_dkv, "routed attention backward (dk, dv)");
  dkv_kernel<T, D><<<grid, 32 * p.warps, smem_dkv, stream>>>(p);
  check_cuda(cudaGetLastError(), "routed attention backward (dk, dv) launch");
}

template <typename T>
void run_bwd(const DeltaParams& dp, const BwdParams& p, int D, dim3 grid, const Launch& launch) {
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(launch.stream);
  const int64_t blocks = (dp.rows * 8 + kDeltaThreads - 1) / kDeltaThreads;
  prepare_launch(launch.device, reinterpret_cast<const void*>(&delta_kernel<T>), 0, "routed attention delta");
  delta_kernel<T><<<static_cast<unsigned>(blocks), kDeltaThreads, 0, stream>>>(dp);
  check_cuda(cudaGetLastError(), "routed attention delta launch");
  switch (D) {
    case 32: return launch_grads<T, 32>(p, grid, launch);
    case 64: return launch_grads<T, 64>(p, grid, launch);
    case 128: return launch_grads<T, 128>(p, grid, launch);
    default: throw std::invalid_argument("dynattn._C_cuda.bwd: unsupported head dim " + std::to_string(D));
  }
}

}  // namespace

void bwd(const BwdArgs& a, const Launch& launch) {
  const Geometry& geo = a.shape.g;
  const GridGeom gg = make_grid_geom(geo.L, geo.S);
  const int D = padded_head_dim(a.shape.Dqk, a.shape.Dv);
  if (geo.B == 0 || gg.N == 0 || geo.H == 0) return;

  DeltaParams dp;
  dp.g = gg;
  dp.H = static_cast<int>(geo.H);
  dp.dv = static_cast<int>(a.shape.Dv);
  dp.rows = geo.B * static_cast<int64_t>(gg.N) * geo.H;
  dp.out = strided(a.out);
  dp.dout = strided(a.dout);
  dp.dlse = a.dlse;
  dp.delta = a.delta;

  BwdParams p;
  p.g = gg;
  p.H = static_cast<int>(geo.H);
  p.dqk = static_cast<int>(a.shape.Dqk);
  p.dv = static_cast<int>(a.shape.Dv);
  p.topk = static_cast<int>(a.idx.topk);
  p.per_head = a.idx.per_head ? 1 : 0;
  p.warps = warps_for_region(gg.M);
  p.row_tiles = (gg.M + 16 * p.warps - 1) / (16 * p.warps);
  p.dq_stages = (p.topk * gg.M + streamed_tile_rows(D) - 1) / streamed_tile_rows(D) > 1 ? 2 : 1;
  p.q = strided(a.q);
  p.k = strided(a.k);
  p.v = strided(a.v);
  p.dout = strided(a.dout);
  p.idx = a.idx.data;
  p.lse = a.lse;
  p.delta = a.delta;
  p.inv_offsets = a.inv_offsets;
  p.inv_regions = a.inv_regions;
  p.dq_out = a.dq;
  p.dk_out = a.dk;
  p.dv_out = a.dv;
  p.scale = a.scale;
  p.scale_log2 = a.scale * kLog2e;

  const dim3 grid(static_cast<unsigned>(gg.R * p.row_tiles), static_cast<unsigned>(p.H),
                  static_cast<unsigned>(geo.B));
  if (a.dtype == DType::Float16) {
    run_bwd<__half>(dp, p, D, grid, launch);
  } else if (a.dtype == DType::BFloat16) {
    run_bwd<__nv_bfloat16>(dp, p, D, grid, launch);
  } else {
    throw std::invalid_argument("dynattn._C_cuda.bwd: only float16 and bfloat16 run on the tensor-core kernels");
  }
}

}  // namespace cuda
}  // namespace dynattn
