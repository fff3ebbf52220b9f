// Host driver of the attention forward: one parallel_for over (b, h, query region, row block).
#include "cpu/api.h"
#include "cpu/driver.h"
#include "cpu/thread_pool.h"

namespace dynattn {
namespace cpu {

void attention_fwd(FwdParams p, int num_threads) {
  check_geometry(p.g);
  check_head_dim("d_qk", p.Dqk);
  check_head_dim("d_v", p.Dv);
  check_route_index(p.idx, p.g);
  if (p.g.B == 0) return;
  const KernelTable& kt = kernels();
  const std::vector<Region> regions = region_table(p.g);
  p.regions = regions.data();
  ThreadScratch scratch(kt.fwd_scratch_bytes(p), num_threads);
  auto item = [&](int64_t i, int thread) { kt.fwd_item(p, i, scratch.of(thread)); };
  parallel_for(p.g.B * p.g.H * num_regions(p.g) * blocks_per_region(p.g), num_threads, item);
}

}  // namespace cpu
}  // namespace dynattn
