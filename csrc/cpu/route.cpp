// Host driver of routing: region means (parallel over regions), then logits and top-k per row (parallel
// over rows). The selection lives here, not in the ISA units, because it uses std::partial_sort.
#include <math.h>
#include <string.h>

#include <algorithm>
#include <functional>
#include <vector>

#include "cpu/api.h"
#include "cpu/driver.h"
#include "cpu/thread_pool.h"

namespace dynattn {
namespace cpu {
namespace {

// The topk best of logits[0..R) into out, best first: larger logit first, ties to the lower region index.
// NaN ranks above everything (as in torch.topk), and -0 ties with +0.
void select_topk(const double* logits, int64_t R, int64_t topk, int64_t* order, int64_t* out) {
  for (int64_t j = 0; j < R; ++j) order[j] = j;
  auto better = [logits](int64_t a, int64_t b) {
    const double va = logits[a], vb = logits[b];
    const bool na = isnan(va), nb = isnan(vb);
    if (na || nb) return na && nb ? a < b : na;
    return va != vb ? va > vb : a < b;
  };
  std::partial_sort(order, order + topk, order + R, better);
  std::copy(order, order + topk, out);
}

// float logits: the same order through one integer key per region, (order-preserving bits of the logit) << 32 |
// (~index), so the selection compares plain integers (3-4x faster than the comparator above on 49 regions).
void select_topk(const float* logits, int64_t R, int64_t topk, int64_t* order, int64_t* out) {
  uint64_t* keys = reinterpret_cast<uint64_t*>(order);
  for (int64_t j = 0; j < R; ++j) {
    const float x = logits[j];
    uint32_t bits;
    if (isnan(x)) {
      bits = 0xffffffffu;
    } else {
      const float y = x == 0.0f ? 0.0f : x;  // -0 -> +0
      memcpy(&bits, &y, sizeof(bits));
      bits = (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;  // monotone: a < b <=> bits(a) < bits(b)
    }
    keys[j] = (uint64_t)bits << 32 | (uint32_t)~(uint32_t)j;
  }
  std::partial_sort(keys, keys + topk, keys + R, std::greater<uint64_t>());
  for (int64_t s = 0; s < topk; ++s) out[s] = (int64_t)(uint32_t)~(uint32_t)keys[s];
}

template <class T>
void route_t(RouteParams p, int64_t* idx, int num_threads) {
  const KernelTable& kt = kernels();
  const Geometry& g = p.g;
  const std::vector<Region> regions = region_table(g);
  p.regions = regions.data();
  const int64_t R = num_regions(g), HD = g.H * p.D, G = p.per_head ? g.H : 1;
  AlignedBuffer pooled_q(sizeof(T) * g.B * R * HD), pooled_k(sizeof(T) * g.B * R * HD);

  ThreadScratch pool_scratch(kt.route_scratch_bytes(p), num_threads);
  auto pool = [&](int64_t item, int thread) {
    kt.route_pool(p, item, pooled_q.data(), pooled_k.data(), pool_scratch.of(thread));
  };
  parallel_for(g.B * R, num_threads, pool);

  ThreadScratch row_scratch(R * (sizeof(int64_t) + sizeof(T)), num_threads);
  auto select = [&](int64_t item, int thread) {
    int64_t* order = static_cast<int64_t*>(row_scratch.of(thread));
    T* logits = reinterpret_cast<T*>(order + R);
    kt.route_logits(p, pooled_q.data(), pooled_k.data(), item, logits);
    select_topk(logits, R, p.topk, order, idx + item * p.topk);
  };
  parallel_for(g.B * G * R, num_threads, select);
}

}  // namespace

void route(const RouteParams& p, int64_t* idx, int num_threads) {
  check_geometry(p.g);
  check_head_dim("head dim", p.D);
  const int64_t R = num_regions(p.g);
  require(p.topk >= 1 && p.topk <= R, "topk=" + std::to_string(p.topk) + " must be in [1, R=" + std::to_string(R) + "]");
  if (p.g.B == 0) return;
  if (p.dtype == DType::Float64)
    route_t<double>(p, idx, num_threads);
  else
    route_t<float>(p, idx, num_threads);
}

}  // namespace cpu
}  // namespace dynattn
