// Host driver of the attention backward: builds the inverse routing index, then runs the dQ pass and the
// dK/dV pass (the second needs every delta from the first).
#include <vector>

#include "cpu/api.h"
#include "cpu/driver.h"
#include "cpu/thread_pool.h"

namespace dynattn {
namespace cpu {
namespace {

// Inverse routing (CSR), one table per routing group (b, or (b, h) for per-head idx): for key region r of group
// grp, the query regions that picked it are regions[offsets[grp*(R+1) + r] .. offsets[grp*(R+1) + r + 1]),
// ascending because they are filled in query-region order. It turns dK/dV into a gather per key region, so the
// backward needs no atomics and sums in a fixed order. O(B * groups * R * topk).
struct InverseRouting {
  std::vector<int64_t> offsets, regions;
};

InverseRouting invert_routing(const RouteIndex& ix, const Geometry& g) {
  const int64_t R = num_regions(g), topk = ix.topk, groups = g.B * (ix.per_head ? g.H : 1);
  InverseRouting inv{std::vector<int64_t>(groups * (R + 1), 0), std::vector<int64_t>(groups * R * topk)};
  std::vector<int64_t> fill(R);
  for (int64_t grp = 0; grp < groups; ++grp) {
    const int64_t* rows = ix.data + grp * R * topk;
    int64_t* off = inv.offsets.data() + grp * (R + 1);
    for (int64_t i = 0; i < R * topk; ++i) ++off[rows[i] + 1];
    off[0] = grp * R * topk;
    for (int64_t r = 0; r < R; ++r) off[r + 1] += off[r];
    for (int64_t r = 0; r < R; ++r) fill[r] = off[r];
    for (int64_t qr = 0; qr < R; ++qr)
      for (int64_t s = 0; s < topk; ++s) inv.regions[fill[rows[qr * topk + s]]++] = qr;
  }
  return inv;
}

}  // namespace

void attention_bwd(BwdParams p, int num_threads) {
  const Geometry& g = p.g;
  check_geometry(g);
  check_head_dim("d_qk", p.Dqk);
  check_head_dim("d_v", p.Dv);
  check_route_index(p.idx, g);
  if (g.B == 0) return;
  const KernelTable& kt = kernels();

  const InverseRouting inv = invert_routing(p.idx, g);
  const std::vector<Region> regions = region_table(g);
  // topk == 1 with one block per region: every query row's dQ terms meet in one dK/dV item, so one pass does it.
  const bool fused = p.idx.topk == 1 && blocks_per_region(g) == 1;
  AlignedBuffer delta(fused ? 0 : dtype_size(p.dtype == DType::Float64 ? DType::Float64 : DType::Float32) * g.B *
                                      num_tokens(g) * g.H);
  p.regions = regions.data();
  p.inv_offsets = inv.offsets.data();
  p.inv_regions = inv.regions.data();
  p.delta = delta.data();
  p.stream_out = g.B * num_tokens(g) * g.H * p.Dv * dtype_size(p.dtype) >= kStreamingStoreBytes;

  ThreadScratch scratch(kt.bwd_scratch_bytes(p), num_threads);
  const int64_t items = g.B * g.H * num_regions(g) * blocks_per_region(g);
  if (fused) {
    run_items(items, num_threads,
              [&](int64_t begin, int64_t end, int thread) { kt.bwd_fused_items(p, begin, end, scratch.of(thread)); });
    return;
  }
  run_items(items, num_threads,
            [&](int64_t begin, int64_t end, int thread) { kt.bwd_dq_items(p, begin, end, scratch.of(thread)); });
  run_items(items, num_threads,
            [&](int64_t begin, int64_t end, int thread) { kt.bwd_dkv_items(p, begin, end, scratch.of(thread)); });
}

}  // namespace cpu
}  // namespace dynattn
