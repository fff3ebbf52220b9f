// The interface between the host drivers (baseline x86-64 code: validation, scratch, threads) and the kernels,
// which are compiled once per ISA (kernels_scalar.cpp, kernels_avx2.cpp, kernels_avx512.cpp). Each ISA unit
// exports one KernelTable; isa.cpp picks the table at first use.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include "common/geometry.h"
#include "common/macros.h"
#include "common/params.h"

namespace dynattn {
namespace cpu {

// Tile sizes shared by every ISA.
// kBlockRows: rows per work item (query tokens in the forward / dQ pass, key tokens in the dK/dV pass).
// Regions larger than this are split into near-equal blocks so big regions still spread over the threads.
// kChunkCols: keys (forward / dQ) or queries (dK/dV) per inner tile; routed regions are concatenated into
// chunks of this size, so tiny regions (BiFormer stage 3: 2x2 tokens) still fill whole SIMD vectors.
// 64 x 64 fp32 tiles with d = 32 keep Q, K^T, V, scores and the accumulator (~48 KiB) in L1/L2.
constexpr int64_t kBlockRows = 64;
constexpr int64_t kChunkCols = 64;

// Work items per region: ceil(largest region / kBlockRows) blocks.
DYNATTN_FN int64_t blocks_per_region(const Geometry& g) {
  return (max_region_tokens(g) + kBlockRows - 1) / kBlockRows;
}

// Rows [begin, end) of block `blk` of a region of `count` tokens (same split rule as the regions themselves).
DYNATTN_FN void block_rows(int64_t count, int64_t blocks, int64_t blk, int64_t* begin, int64_t* end) {
  *begin = blk * count / blocks;
  *end = (blk + 1) * count / blocks;
}

// Items per task handed to a thread (fewer hand-outs for tiny items), capped so that dynamic scheduling still
// has >= 16 tasks per thread to balance.
DYNATTN_FN int64_t items_per_task(int64_t items, int threads) {
  int64_t n = items / (16 * (int64_t)(threads < 1 ? 1 : threads));
  return n < 1 ? 1 : n > 16 ? 16 : n;
}

struct KernelTable {
  const char* name;

  // Routing. route_pool: item = b*R + r; writes the means of q and k over region r, all heads, into
  // pooled_q / pooled_k (compute type, (B, R, H*D)). route_logits: item = (b*G + h)*R + r with G = H (per
  // head) or 1; writes the R logits of that row (compute type). route_scratch_bytes: per thread.
  size_t (*route_scratch_bytes)(const RouteParams&);
  void (*route_pool)(const RouteParams&, int64_t item, void* pooled_q, void* pooled_k, void* scratch);
  void (*route_logits)(const RouteParams&, const void* pooled_q, const void* pooled_k, int64_t item, void* logits);

  // Forward of items [begin, end), item = ((b*R + r)*blocks_per_region + block)*H + h.
  size_t (*fwd_scratch_bytes)(const FwdParams&);
  void (*fwd_items)(const FwdParams&, int64_t begin, int64_t end, void* scratch);

  // Backward: bwd_dq_items (same items as the forward; also writes delta) must finish for every item before
  // bwd_dkv_items runs (item = ((b*R + key region)*blocks_per_region + block)*H + h).
  size_t (*bwd_scratch_bytes)(const BwdParams&);
  void (*bwd_dq_items)(const BwdParams&, int64_t begin, int64_t end, void* scratch);
  void (*bwd_dkv_items)(const BwdParams&, int64_t begin, int64_t end, void* scratch);
  // Both passes in one (same items as bwd_dkv_items, no delta buffer), valid when topk == 1 and
  // blocks_per_region == 1 (see bwd_kernel.h).
  void (*bwd_fused_items)(const BwdParams&, int64_t begin, int64_t end, void* scratch);
};

// Tables of the ISA units; null when the unit was compiled without its instruction set (non-x86 builds).
const KernelTable* kernels_scalar();
const KernelTable* kernels_avx2();
const KernelTable* kernels_avx512();

// The table chosen for this process: DYNATTN_CPU_ISA=scalar|avx2|avx512 if set (an error if that ISA is not
// built or the CPU lacks it), else the best the CPU supports.
const KernelTable& kernels();

}  // namespace cpu
}  // namespace dynattn
