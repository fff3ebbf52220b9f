// Parallel loops of the CPU kernels: on torch's OpenMP team when the process has loaded one (found at run time;
// dynattn links no OpenMP runtime of its own, two runtimes would oversubscribe the cores), else on a persistent
// pool of dynattn's own.
#pragma once

#include <stdint.h>

namespace dynattn {
namespace cpu {

using ItemFn = void (*)(void* ctx, int64_t item, int thread);

// Runs fn(ctx, item, thread) for every item in [0, n_items) on the calling thread plus num_threads - 1 workers
// (OpenMP team or pool); items are handed out one at a time from an atomic counter, `thread` is in [0, num_threads) and
// identifies the caller's scratch. Returns when all items are done. A call from inside a parallel region runs
// on the calling thread alone (thread = 0), and so does a call that finds dynattn's own pool busy (a concurrent
// call from another Python thread); on OpenMP, concurrent callers each get a team of their own.
void parallel_for(int64_t n_items, int num_threads, ItemFn fn, void* ctx);

// "openmp" (the process's OpenMP team) or "pool" (dynattn's own threads; DYNATTN_CPU_THREADS=pool forces it).
const char* threading_backend();

template <class F>
void parallel_for(int64_t n_items, int num_threads, F& f) {
  parallel_for(
      n_items, num_threads, [](void* ctx, int64_t item, int thread) { (*static_cast<F*>(ctx))(item, thread); }, &f);
}

}  // namespace cpu
}  // namespace dynattn
