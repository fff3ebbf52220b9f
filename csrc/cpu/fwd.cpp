// Host driver of the attention forward: one parallel_for over the (b, query region, row block, head) items.
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
  p.stream_out = p.g.B * num_tokens(p.g) * p.g.H * p.Dv * dtype_size(p.dtype) >= kStreamingStoreBytes;
  ThreadScratch scratch(kt.fwd_scratch_bytes(p), num_threads);
  run_items(p.g.B * p.g.H * num_regions(p.g) * blocks_per_region(p.g), num_threads,
            [&](int64_t begin, int64_t end, int thread) { kt.fwd_items(p, begin, end, scratch.of(thread)); });
}

}  // namespace cpu
}  // namespace dynattn
