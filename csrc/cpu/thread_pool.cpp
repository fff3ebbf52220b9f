#include "cpu/thread_pool.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

namespace dynattn {
namespace cpu {
namespace {

class Pool {
 public:
  explicit Pool(int workers) {
    for (int i = 0; i < workers; ++i) threads_.emplace_back([this, i] { worker_loop(i + 1); });
  }

  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    wake_.notify_all();
    for (auto& t : threads_) t.join();
  }

  int workers() const { return (int)threads_.size(); }

  // Items are claimed as (generation, index) tickets from one atomic, and the caller waits for the items that
  // were claimed to finish, not for the workers to wake up: a worker that is slow to get a core (e.g. torch's
  // OpenMP threads still spinning after the previous op) finds nothing left to claim, and the caller, which
  // took the items itself meanwhile, does not wait for it. The generation keeps a worker that wakes late from
  // claiming items of a later run with the arguments of an earlier one.
  void run(int64_t n_items, ItemFn fn, void* ctx) {
    uint32_t gen;
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = fn;
      ctx_ = ctx;
      n_items_ = n_items;
      gen = ++generation_;
      done_items_.store(0, std::memory_order_relaxed);
      ticket_.store((uint64_t)gen << 32, std::memory_order_release);
    }
    wake_.notify_all();
    work(gen, fn, ctx, n_items, 0);
    if (done_items_.load(std::memory_order_acquire) < n_items) {
      std::unique_lock<std::mutex> lk(mu_);
      done_.wait(lk, [&] { return done_items_.load(std::memory_order_acquire) >= n_items; });
    }
  }

 private:
  void work(uint32_t gen, ItemFn fn, void* ctx, int64_t n_items, int thread) {
    uint64_t t = ticket_.load(std::memory_order_acquire);
    for (;;) {
      const int64_t item = (int64_t)(t & 0xffffffffu);
      if ((uint32_t)(t >> 32) != gen || item >= n_items) return;
      if (!ticket_.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel, std::memory_order_acquire)) continue;
      fn(ctx, item, thread);
      if (done_items_.fetch_add(1, std::memory_order_acq_rel) + 1 == n_items) {
        std::lock_guard<std::mutex> lk(mu_);
        done_.notify_one();
      }
      t = ticket_.load(std::memory_order_acquire);
    }
  }

  void worker_loop(int thread) {
    uint32_t seen = 0;
    for (;;) {
      ItemFn fn;
      void* ctx;
      int64_t n_items;
      {
        std::unique_lock<std::mutex> lk(mu_);
        wake_.wait(lk, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
        fn = fn_;
        ctx = ctx_;
        n_items = n_items_;
      }
      work(seen, fn, ctx, n_items, thread);
    }
  }

  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable wake_, done_;
  bool stop_ = false;
  uint32_t generation_ = 0;
  ItemFn fn_ = nullptr;
  void* ctx_ = nullptr;
  int64_t n_items_ = 0;
  std::atomic<uint64_t> ticket_{0};  // (generation << 32) | next item
  std::atomic<int64_t> done_items_{0};
};

// Heap-allocated and never destroyed at exit (joining threads during interpreter shutdown can deadlock).
// `g_busy` gives one caller at a time exclusive use of the pool, including resizing it.
std::mutex* g_busy = new std::mutex;
Pool* g_pool = nullptr;

// A forked child has no pool threads: forget the parent's pool (leaking it) and start afresh on demand.
void after_fork_in_child() {
  g_busy = new std::mutex;
  g_pool = nullptr;
}
const int g_atfork_registered = pthread_atfork(nullptr, nullptr, after_fork_in_child);

void run_inline(int64_t n_items, ItemFn fn, void* ctx) {
  for (int64_t i = 0; i < n_items; ++i) fn(ctx, i, 0);
}

// torch's own OpenMP team, when the process has one. torch runs its CPU ops on an OpenMP team whose threads spin
// for a while after each op; a second pool's threads then fight them for the cores (measured: a fused forward
// followed by a gelu took 1-2 ms longer than the two alone, on 2 cores). So when an OpenMP runtime is already
// loaded (torch's libgomp, or Intel's libiomp5, which exports the same GOMP entry points), the items run on its
// team through the GCC OpenMP ABI, looked up at run time: nothing links against an OpenMP runtime, so importing
// dynattn never brings a second one. DYNATTN_CPU_THREADS=pool forces dynattn's own pool.
struct OpenMP {
  void (*parallel)(void (*)(void*), void*, unsigned, unsigned) = nullptr;  // GOMP_parallel(fn, data, threads, flags)
  int (*thread_num)() = nullptr;                                            // omp_get_thread_num
  bool usable() const { return parallel != nullptr && thread_num != nullptr; }
};

OpenMP find_openmp() {
  OpenMP omp;
  const char* env = getenv("DYNATTN_CPU_THREADS");
  if (env != nullptr && strcmp(env, "pool") == 0) return omp;
  omp.parallel = reinterpret_cast<decltype(omp.parallel)>(dlsym(RTLD_DEFAULT, "GOMP_parallel"));
  omp.thread_num = reinterpret_cast<decltype(omp.thread_num)>(dlsym(RTLD_DEFAULT, "omp_get_thread_num"));
  return omp;
}

struct OpenMPJob {
  ItemFn fn;
  void* ctx;
  int64_t n_items;
  int (*thread_num)();
  std::atomic<int64_t> next{0};
};

void openmp_body(void* data) {
  OpenMPJob& job = *static_cast<OpenMPJob*>(data);
  const int thread = job.thread_num();
  for (;;) {
    const int64_t item = job.next.fetch_add(1, std::memory_order_relaxed);
    if (item >= job.n_items) return;
    job.fn(job.ctx, item, thread);
  }
}

}  // namespace

const char* threading_backend() { return find_openmp().usable() ? "openmp" : "pool"; }

void parallel_for(int64_t n_items, int num_threads, ItemFn fn, void* ctx) {
  (void)g_atfork_registered;
  if (n_items <= 0) return;
  if (num_threads > 1 && n_items > 1) {
    static const OpenMP omp = find_openmp();
    if (omp.usable()) {
      // thread numbers stay below num_threads: the team has at most that many (1 inside a parallel region)
      OpenMPJob job{fn, ctx, n_items, omp.thread_num};
      omp.parallel(openmp_body, &job, (unsigned)num_threads, 0);
      return;
    }
  }
  // Not clamped to n_items: a small call must not shrink (and so rebuild) the pool.
  // (Item indices live in 32 bits of a ticket; no kernel comes near 2^32 work items.)
  if (num_threads <= 1 || n_items == 1 || n_items > (int64_t)0xffffffffu) return run_inline(n_items, fn, ctx);
  std::unique_lock<std::mutex> lk(*g_busy, std::try_to_lock);
  if (!lk.owns_lock()) return run_inline(n_items, fn, ctx);
  if (g_pool == nullptr || g_pool->workers() != num_threads - 1) {
    delete g_pool;
    g_pool = nullptr;
    g_pool = new Pool(num_threads - 1);
  }
  g_pool->run(n_items, fn, ctx);
}

}  // namespace cpu
}  // namespace dynattn
