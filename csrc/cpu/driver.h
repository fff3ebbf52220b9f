// Helpers shared by the host drivers (baseline code only, never included by the ISA units).
#pragma once

#include <stdlib.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "common/params.h"
#include "cpu/kernels.h"
#include "cpu/thread_pool.h"

namespace dynattn {
namespace cpu {

// A 64-byte aligned heap block.
class AlignedBuffer {
 public:
  explicit AlignedBuffer(size_t bytes) {
    if (bytes == 0) bytes = 64;
    ptr_ = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (ptr_ == nullptr) throw std::bad_alloc();
  }
  ~AlignedBuffer() { free(ptr_); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
  char* data() const { return static_cast<char*>(ptr_); }

 private:
  void* ptr_;
};

// One scratch block per thread of a parallel_for.
struct ThreadScratch {
  ThreadScratch(size_t per_thread, int threads)
      : stride((per_thread + 63) / 64 * 64), buffer(stride * (size_t)(threads < 1 ? 1 : threads)) {}
  void* of(int thread) const { return buffer.data() + stride * (size_t)thread; }
  size_t stride;
  AlignedBuffer buffer;
};

// region_of for every region, so kernels never divide to find a region's box.
inline std::vector<Region> region_table(const Geometry& g) {
  std::vector<Region> t(num_regions(g));
  for (int64_t r = 0; r < (int64_t)t.size(); ++r) t[r] = region_of(g, r);
  return t;
}

// Runs fn(begin, end, thread) over [0, items) in tasks of items_per_task consecutive items.
template <class F>
void run_items(int64_t items, int threads, F&& fn) {
  const int64_t per = items_per_task(items, threads), tasks = (items + per - 1) / per;
  auto task = [&](int64_t i, int thread) { fn(i * per, i * per + per < items ? i * per + per : items, thread); };
  parallel_for(tasks, threads, task);
}

// Outputs at least this large are written with non-temporal stores: they will not stay in cache anyway, and
// skipping the read-for-ownership of every line measured 10-20% faster. Smaller ones stay cached for the next op.
constexpr int64_t kStreamingStoreBytes = 2 << 20;

inline void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

inline void check_geometry(const Geometry& g) {
  require(g.B >= 0, "batch size must be >= 0, got " + std::to_string(g.B));
  require(g.H >= 1, "number of heads must be >= 1, got " + std::to_string(g.H));
  for (int d = 0; d < 3; ++d) {
    require(g.L[d] >= 1, "spatial extent " + std::to_string(d) + " must be >= 1, got " + std::to_string(g.L[d]));
    require(g.S[d] >= 1 && g.S[d] <= g.L[d], "num_regions[" + std::to_string(d) + "]=" + std::to_string(g.S[d]) +
                                                 " must be in [1, " + std::to_string(g.L[d]) + "]");
  }
}

inline void check_head_dim(const char* name, int64_t d) {
  require(d >= 1, std::string(name) + " must be >= 1, got " + std::to_string(d));
}

// idx values index regions: out-of-range values would read outside q/k/v.
inline void check_route_index(const RouteIndex& ix, const Geometry& g) {
  const int64_t R = num_regions(g);
  require(ix.topk >= 1 && ix.topk <= R,
          "topk=" + std::to_string(ix.topk) + " must be in [1, R=" + std::to_string(R) + "]");
  const int64_t n = g.B * (ix.per_head ? g.H : 1) * R * ix.topk;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t v = ix.data[i];
    if (v < 0 || v >= R)
      throw std::invalid_argument("idx values must lie in [0, R=" + std::to_string(R) + "), found " + std::to_string(v));
  }
}

}  // namespace cpu
}  // namespace dynattn
