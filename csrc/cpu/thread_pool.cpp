#include "cpu/thread_pool.h"

#include <pthread.h>

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

  void run(int64_t n_items, ItemFn fn, void* ctx) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = fn;
      ctx_ = ctx;
      n_items_ = n_items;
      next_.store(0, std::memory_order_relaxed);
      pending_ = (int)threads_.size();
      ++generation_;
    }
    wake_.notify_all();
    run_items(0);
    std::unique_lock<std::mutex> lk(mu_);
    done_.wait(lk, [this] { return pending_ == 0; });
  }

 private:
  void run_items(int thread) {
    for (;;) {
      const int64_t item = next_.fetch_add(1, std::memory_order_relaxed);
      if (item >= n_items_) return;
      fn_(ctx_, item, thread);
    }
  }

  void worker_loop(int thread) {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lk(mu_);
        wake_.wait(lk, [&] { return stop_ || generation_ != seen; });
        if (stop_) return;
        seen = generation_;
      }
      run_items(thread);
      std::lock_guard<std::mutex> lk(mu_);
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable wake_, done_;
  bool stop_ = false;
  uint64_t generation_ = 0;
  int pending_ = 0;
  ItemFn fn_ = nullptr;
  void* ctx_ = nullptr;
  int64_t n_items_ = 0;
  std::atomic<int64_t> next_{0};
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

}  // namespace

void parallel_for(int64_t n_items, int num_threads, ItemFn fn, void* ctx) {
  (void)g_atfork_registered;
  if (n_items <= 0) return;
  // Not clamped to n_items: a small call must not shrink (and so rebuild) the pool.
  if (num_threads <= 1 || n_items == 1) return run_inline(n_items, fn, ctx);
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
