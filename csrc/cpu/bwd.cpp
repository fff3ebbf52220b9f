// Host driver of the attention backward: builds the inverse routing index, then runs the dQ pass and the
// dK/dV pass (the second needs every delta from the first).
#include <vector>

#include "cpu/api.h"
#include "cpu/driver.h"
#include "cpu/thread_pool.h"

namespace dynattn {
namespace cpu {

void attention_bwd(BwdParams p, int num_threads) {
  const Geometry& g = p.g;
  check_geometry(g);
  check_head_dim("d_qk", p.Dqk);
  check_head_dim("d_v", p.Dv);
  check_route_index(p.idx, g);
  if (g.B == 0) return;
  const KernelTable& kt = kernels();
  const int64_t R = num_regions(g), topk = p.idx.topk, groups = g.B * (p.idx.per_head ? g.H : 1);

  // Inverse routing (CSR): for each group and key region, the query regions that picked it, ascending
  // (filled in query-region order). It makes dK/dV a gather per key region instead of a scatter with atomics.
  std::vector<int64_t> offsets(groups * (R + 1) + 1, 0), regions(groups * R * topk);
  for (int64_t grp = 0; grp < groups; ++grp) {
    const int64_t* rows = p.idx.data + grp * R * topk;
    int64_t* off = offsets.data() + grp * (R + 1);
    for (int64_t i = 0; i < R * topk; ++i) ++off[rows[i] + 1];
    off[0] = grp * R * topk;
    for (int64_t r = 0; r < R; ++r) off[r + 1] += off[r];
    std::vector<int64_t> fill(off, off + R);
    for (int64_t qr = 0; qr < R; ++qr)
      for (int64_t s = 0; s < topk; ++s) regions[fill[rows[qr * topk + s]]++] = qr;
  }
  const std::vector<Region> region_boxes = region_table(g);
  p.regions = region_boxes.data();
  p.inv_offsets = offsets.data();
  p.inv_regions = regions.data();

  AlignedBuffer delta(dtype_size(p.dtype == DType::Float64 ? DType::Float64 : DType::Float32) * g.B *
                      num_tokens(g) * g.H);
  p.delta = delta.data();

  ThreadScratch scratch(kt.bwd_scratch_bytes(p), num_threads);
  const int64_t items = g.B * g.H * R * blocks_per_region(g);
  auto dq = [&](int64_t i, int thread) { kt.bwd_dq_item(p, i, scratch.of(thread)); };
  parallel_for(items, num_threads, dq);
  auto dkv = [&](int64_t i, int thread) { kt.bwd_dkv_item(p, i, scratch.of(thread)); };
  parallel_for(items, num_threads, dkv);
}

}  // namespace cpu
}  // namespace dynattn
