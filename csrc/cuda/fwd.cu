// Routed attention, forward: out = softmax(scale * q k^T over the routed key tokens) v, and lse.
//
// One thread block per (query-region tile, head, batch). The block's rows are 16 * warps consecutive tokens
// of one query region (a region larger than 64 tokens takes several blocks). It streams the key/value tokens
// of that region's routed key regions, in tiles of Tile<D>::kN "slots", straight from the strided k/v
// tensors: each row's address is computed from its grid coordinates (decode_slot), so the gathered K/V is
// never materialised. Tiles are double-buffered with cp.async (the load of tile i+1 overlaps the MMAs on
// tile i); QK^T and PV run on tensor cores (mma.sync m16n8k16, fp32 accumulate); the softmax is the online
// one of FlashAttention-2 in registers, in base 2 (scores pre-multiplied by scale * log2 e).
//
// Why tiny regions are not packed several to a tile: the 16 rows of an MMA share its B operand, so rows of
// different query regions in one MMA would need the union of their routed key sets, each row masking the
// keys it did not route to. With independent (or per-head) routing the union grows towards (regions per
// tile) x topk regions, so the MMA work grows by about the same factor that packing removes from the row
// padding, and the K/V traffic grows with it. Packing across heads does not help either: every head has its
// own K. So the block keeps one query region and sizes itself to it: one warp (16 rows) for regions of up to
// 16 tokens. BiFormer's 2x2 regions then fill 4 of 16 MMA rows, which costs tensor-core issue slots, but
// that stage is bound by K/V loads (64 keys per 4 queries), not by MMAs, and a one-warp block needs only
// ~12 KB of shared memory (D = 32, one K/V stage), so many regions are in flight per SM. The key side is
// packed: a 64-slot tile holds sixteen 2x2 key regions.
//
// Head dims: the kernel is instantiated per (dtype, D) with D = max(d_qk, d_v) in {32, 64, 128}; the smaller
// of q/k and v is zero-filled up to D and its MMAs are skipped where they would only add zeros.
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

struct FwdParams {
  GridGeom g;
  int H, dqk, dv, topk, per_head;
  int warps;    // 16 * warps query rows per block
  int q_tiles;  // blocks per query region: ceil(M / (16 * warps))
  int stages;   // K/V buffers: 2, or 1 when a single tile covers every routed key
  Strided q, k, v;
  const int64_t* idx;
  void* out;   // contiguous (B, N, H, dv)
  float* lse;  // contiguous (B, N, H)
  float scale_log2;
};

// Shared memory: Q rows (reused to stage the output), then per stage a K tile, a V tile, and the tile's
// additive key mask (0 for a real key, -inf for a padding slot).
template <int D>
size_t fwd_smem_bytes(int warps, int stages, size_t elem) {
  using C = Tile<D>;
  return (static_cast<size_t>(16 * warps) * C::kLds + static_cast<size_t>(stages) * 2 * C::kN * C::kLds) * elem +
         static_cast<size_t>(stages) * C::kN * sizeof(float);
}

template <typename T, int D>
__global__ void __launch_bounds__(32 * kMaxWarps) fwd_kernel(const FwdParams p) {
  using C = Tile<D>;
  constexpr int BN = C::kN, LDS = C::kLds;
  extern __shared__ __align__(16) unsigned char smem_raw[];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, tig = lane % 4;
  const int BM = 16 * p.warps;
  const int b = blockIdx.z, h = blockIdx.y;
  const int r = blockIdx.x / p.q_tiles;
  const int m0 = (blockIdx.x % p.q_tiles) * BM;
  const Box qbox = region_box(p.g, r);
  if (m0 >= qbox.count) return;  // a smaller region needs fewer tiles; uniform over the block, before any barrier

  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sKV = sQ + BM * LDS;
  float* sBias = reinterpret_cast<float*>(sKV + p.stages * 2 * BN * LDS);
  T* sQw = sQ + warp * 16 * LDS;  // this warp's 16 query rows

  const int64_t* route =
      p.idx + ((static_cast<int64_t>(b) * (p.per_head ? p.H : 1) + (p.per_head ? h : 0)) * p.g.R + r) * p.topk;
  const int n_tiles = (p.topk * p.g.M + BN - 1) / BN;
  const T* qbh = head_base<T>(p.q, b, h);
  const T* kbh = head_base<T>(p.k, b, h);
  const T* vbh = head_base<T>(p.v, b, h);

  // Each warp loads its own 16 query rows.
  {
    const int m = m0 + warp * 16 + lane;
    int c[3] = {0, 0, 0};
    const bool ok = lane < 16 && m < qbox.count;
    if (ok) box_token(qbox, m, c);
    copy_rows16<D, LDS>(sQw, qbh, ok ? spatial_offset(p.q, c) : 0, ok, p.dqk);
  }

  // K/V tile `tile` into buffer `stage`: the block's warps take 16-row groups round-robin.
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
  cp_async_commit();  // group 0: Q and K/V tile 0

  // Per lane: rows g and g + 8 of the warp's 16. m_run is the running max (base-2 units), l_run this
  // lane's share of the running denominator (the quad's four shares are summed at the end).
  float o[D / 8][4];
#pragma unroll
  for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m_run[2] = {-INFINITY, -INFINITY};
  float l_run[2] = {0.f, 0.f};
  const int qk_steps = p.dqk / 16, v_tiles = p.dv / 8;

  for (int it = 0; it < n_tiles; ++it) {
    const int stage = it & 1;
    // Prefetch the next tile into the other buffer; it was last read in iteration it-1, which ended in a
    // barrier. The commit is unconditional so that "all but the newest group" below always means tile it.
    if (it + 1 < n_tiles) load_kv(it + 1, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    const T* sK = sKV + stage * 2 * BN * LDS;
    const T* sV = sK + BN * LDS;
    const float* bias = sBias + stage * BN;

    // S = Q K^T (16 x BN per warp)
    float s[BN / 8][4];
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
    gemm_abt<T, BN / 8, D / 16, LDS>(s, sQw, sK, qk_steps);

    // Scale to base-2 logits, mask padding slots, and take the row max of this tile.
    float mx[2] = {m_run[0], m_run[1]};
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      const float b0 = bias[j * 8 + 2 * tig], b1 = bias[j * 8 + 2 * tig + 1];
      s[j][0] = s[j][0] * p.scale_log2 + b0;
      s[j][1] = s[j][1] * p.scale_log2 + b1;
      s[j][2] = s[j][2] * p.scale_log2 + b0;
      s[j][3] = s[j][3] * p.scale_log2 + b1;
      mx[0] = fmaxf(mx[0], fmaxf(s[j][0], s[j][1]));
      mx[1] = fmaxf(mx[1], fmaxf(s[j][2], s[j][3]));
    }
    float base[2], alpha[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      mx[i] = quad_max(mx[i]);
      // A row that has seen only padding so far keeps max -inf; subtracting 0 instead keeps exp2 at 0
      // rather than NaN (-inf - -inf). Real query rows always end with a finite max: every routed region
      // has at least one token.
      base[i] = mx[i] == -INFINITY ? 0.f : mx[i];
      alpha[i] = exp2f(m_run[i] - base[i]);  // 0 on the first tile with a real key (m_run = -inf)
      m_run[i] = mx[i];
    }
    float rowsum[2] = {0.f, 0.f};
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      s[j][0] = exp2f(s[j][0] - base[0]);
      s[j][1] = exp2f(s[j][1] - base[0]);
      s[j][2] = exp2f(s[j][2] - base[1]);
      s[j][3] = exp2f(s[j][3] - base[1]);
      rowsum[0] += s[j][0] + s[j][1];
      rowsum[1] += s[j][2] + s[j][3];
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) l_run[i] = l_run[i] * alpha[i] + rowsum[i];
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      o[j][0] *= alpha[0];
      o[j][1] *= alpha[0];
      o[j][2] *= alpha[1];
      o[j][3] *= alpha[1];
    }

    // O += P V, with P rounded to the input type as the MMA operand (l keeps the fp32 sum).
    uint32_t pa[BN / 16][4];
    c_to_a<T, BN / 16>(pa, s);
    gemm_ab<T, BN / 16, D / 8, LDS>(o, pa, sV, v_tiles);

    __syncthreads();  // every warp is done with this stage before the next iteration refills it
  }
  cp_async_wait<0>();  // retire the trailing empty group (the loop's barriers already published every tile)
  __syncwarp();

  // Epilogue: normalise, stage the warp's rows as T in its own Q rows (no other warp reads them), then
  // write 16-byte chunks of the contiguous output. lse = ln(sum exp(logits)) = (m + log2 l) * ln 2.
  float inv[2], lse[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const float l = quad_sum(l_run[i]);
    inv[i] = l > 0.f ? 1.f / l : 0.f;
    lse[i] = (m_run[i] + log2f(l)) * kLn2;
  }
  stage_c<T, D / 8, LDS>(sQw, o, inv[0], inv[1], v_tiles);
  __syncwarp();

  // Lane i < 16 decodes output row i of the warp: its flat token, or -1 for a padding row.
  int n_tok = -1;
  {
    const int m = m0 + warp * 16 + lane;
    if (lane < 16 && m < qbox.count) {
      int c[3];
      box_token(qbox, m, c);
      n_tok = flat_token(p.g, c);
    }
  }
  const int64_t row0 = (static_cast<int64_t>(b) * p.g.N) * p.H + h;  // (b, n=0, h) in (B, N, H)
  store_rows16<D, LDS>(static_cast<T*>(p.out), sQw, (row0 + static_cast<int64_t>(n_tok) * p.H) * p.dv,
                       n_tok >= 0, p.dv);
  // lse of rows g and g + 8, written by the first lane of each quad; padding rows are never written.
  const int n_lo = __shfl_sync(kFullMask, n_tok, g);
  const int n_hi = __shfl_sync(kFullMask, n_tok, g + 8);
  if (tig == 0) {
    if (n_lo >= 0) p.lse[row0 + static_cast<int64_t>(n_lo) * p.H] = lse[0];
    if (n_hi >= 0) p.lse[row0 + static_cast<int64_t>(n_hi) * p.H] = lse[1];
  }
}

template <typename T, int D>
void launch_fwd(const FwdParams& p, dim3 grid, const Launch& launch) {
  const size_t smem = fwd_smem_bytes<D>(p.warps, p.stages, sizeof(T));
  const void* kernel = reinterpret_cast<const void*>(&fwd_kernel<T, D>);
  prepare_launch(launch.device, kernel, smem, "routed attention forward");
  fwd_kernel<T, D><<<grid, 32 * p.warps, smem, reinterpret_cast<cudaStream_t>(launch.stream)>>>(p);
  check_cuda(cudaGetLastError(), "routed attention forward launch");
}

template <typename T>
void dispatch_fwd(const FwdParams& p, int D, dim3 grid, const Launch& launch) {
  switch (D) {
    case 32: return launch_fwd<T, 32>(p, grid, launch);
    case 64: return launch_fwd<T, 64>(p, grid, launch);
    case 128: return launch_fwd<T, 128>(p, grid, launch);
    default: throw std::invalid_argument("dynattn._C_cuda.fwd: unsupported head dim " + std::to_string(D));
  }
}

}  // namespace

bool head_dim_supported(int64_t d) { return d == 32 || d == 64 || d == 128; }

void fwd(const FwdArgs& a, const Launch& launch) {
  const Geometry& geo = a.shape.g;
  FwdParams p;
  p.g = make_grid_geom(geo.L, geo.S);
  p.H = static_cast<int>(geo.H);
  p.dqk = static_cast<int>(a.shape.Dqk);
  p.dv = static_cast<int>(a.shape.Dv);
  p.topk = static_cast<int>(a.idx.topk);
  p.per_head = a.idx.per_head ? 1 : 0;
  p.warps = warps_for_region(p.g.M);
  p.q_tiles = (p.g.M + 16 * p.warps - 1) / (16 * p.warps);
  p.q = strided(a.q);
  p.k = strided(a.k);
  p.v = strided(a.v);
  p.idx = a.idx.data;
  p.out = a.out;
  p.lse = a.lse;
  p.scale_log2 = a.scale * kLog2e;
  const int D = padded_head_dim(a.shape.Dqk, a.shape.Dv);
  const int BN = streamed_tile_rows(D);
  p.stages = (p.topk * p.g.M + BN - 1) / BN > 1 ? 2 : 1;
  if (geo.B == 0 || p.g.N == 0 || p.H == 0) return;
  const dim3 grid(static_cast<unsigned>(p.g.R * p.q_tiles), static_cast<unsigned>(p.H), static_cast<unsigned>(geo.B));
  if (a.dtype == DType::Float16) {
    dispatch_fwd<__half>(p, D, grid, launch);
  } else if (a.dtype == DType::BFloat16) {
    dispatch_fwd<__nv_bfloat16>(p, D, grid, launch);
  } else {
    throw std::invalid_argument("dynattn._C_cuda.fwd: only float16 and bfloat16 run on the tensor-core kernels");
  }
}

}  // namespace cuda
}  // namespace dynattn
