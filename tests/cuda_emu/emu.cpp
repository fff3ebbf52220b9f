// Fiber scheduler, barriers, cp.async queues, shared memory and CUDA runtime stubs of the emulation.
//
// Failures (bounds, alignment, deadlock, unfinished cp.async groups) never abort the process: inside a fiber,
// fail() records the message and switches back to the scheduler, which abandons the block's fibers and throws
// std::runtime_error from launch(); pybind11 turns that into a Python RuntimeError.
#include "emu.h"

#include <ucontext.h>

#include <cstdarg>
#include <stdexcept>
#include <string>
#include <utility>

namespace emu {

namespace {

constexpr size_t kStack = 256 * 1024;
constexpr size_t kSmem = 227 * 1024;  // the H100 opt-in limit (what cudaDeviceGetAttribute reports below)
constexpr size_t kRedZone = 16 * 1024;

enum Wait { kNone = 0, kWarp = 1, kBlock = 2 };

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
  int wait = kNone;
  std::vector<std::vector<Copy>> groups;  // committed, oldest first
  std::vector<Copy> open;
};

struct State {
  std::vector<Fiber> fibers;
  ucontext_t main_ctx;
  int cur = 0;
  int n = 0;
  std::vector<int> warp_arrived;
  int block_arrived = 0;
  std::vector<Slot> slots;
  // The launch's dynamic shared memory [smem, smem + smem_bytes) between two red zones.
  alignas(128) unsigned char smem_buf[kRedZone + kSmem + kRedZone];
  unsigned char* const smem = smem_buf + kRedZone;
  size_t smem_bytes = 0;
  std::function<void()> body;
  std::vector<std::pair<uintptr_t, uintptr_t>> global_ranges;
  unsigned launches = 0;
  bool in_fiber = false;  // a fiber is running (fail() must leave it through the scheduler)
  std::string error;      // set by fail() inside a fiber
};

State* S = nullptr;

State& st() {
  if (!S) S = new State();
  return *S;
}

void trampoline() {
  State& s = st();
  std::string exc;  // fail() outside the handler: never leave a fiber from inside a catch block
  try {
    s.body();
  } catch (const std::exception& e) {
    exc = e.what();
  } catch (...) {
    exc = "unknown exception";
  }
  if (!exc.empty()) fail("exception in kernel code: %s", exc.c_str());
  Fiber& f = s.fibers[s.cur];
  if (!f.open.empty()) fail("thread exits with uncommitted cp.async copies");
  for (auto& g : f.groups)
    if (!g.empty()) fail("thread exits with cp.async copies never waited for");
  f.done = true;
  swapcontext(&f.ctx, &s.main_ctx);
}

void yield_to_main() {
  State& s = st();
  swapcontext(&s.fibers[s.cur].ctx, &s.main_ctx);
}

int mode_early() {
  static int m = getenv("EMU_CP_EARLY") ? atoi(getenv("EMU_CP_EARLY")) : 0;
  return m;
}

void do_copy(const Copy& c) {
  if (c.fill) {
    check_global(c.src, c.size, "cp.async source");
    memcpy(c.dst, c.src, c.fill);
  }
  if (c.fill < c.size) memset(static_cast<char*>(c.dst) + c.fill, 0, c.size - c.fill);
}

}  // namespace

void fail(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof(buf), fmt, ap);
  va_end(ap);
  State& s = st();
  char where[160];
  if (s.in_fiber)
    snprintf(where, sizeof(where), "EMU FAILURE (thread %d, block %u,%u,%u): ", s.cur, blockIdx.x, blockIdx.y,
             blockIdx.z);
  else
    snprintf(where, sizeof(where), "EMU FAILURE (block %u,%u,%u): ", blockIdx.x, blockIdx.y, blockIdx.z);
  if (!s.in_fiber) throw std::runtime_error(std::string(where) + buf);
  s.error = std::string(where) + buf;
  swapcontext(&s.fibers[s.cur].ctx, &s.main_ctx);  // never resumed: launch() abandons the block
  abort();
}

int cur_thread() { return st().cur; }
Slot* slots() { return st().slots.data(); }
unsigned char* smem_base() { return st().smem; }
size_t smem_size() { return st().smem_bytes; }

void check_smem(const void* p, size_t n, const char* what) {
  State& s = st();
  const auto a = reinterpret_cast<uintptr_t>(p), base = reinterpret_cast<uintptr_t>(s.smem);
  // The dynamic allocation of the launch is [base, base + smem_bytes); static shared lives elsewhere.
  if (a < base || a + n > base + s.smem_bytes) fail("%s out of dynamic smem: offset %ld size %zu of %zu", what,
                                                    static_cast<long>(a - base), n, s.smem_bytes);
}

void check_global(const void* p, size_t n, const char* what) {
  State& s = st();
  if (s.global_ranges.empty()) return;
  const auto a = reinterpret_cast<uintptr_t>(p);
  for (auto& r : s.global_ranges)
    if (a >= r.first && a + n <= r.second) return;
  fail("%s %p (+%zu) outside every registered tensor", what, p, n);
}

void register_global(uintptr_t p, size_t n) { st().global_ranges.emplace_back(p, p + n); }
void clear_global() { st().global_ranges.clear(); }

void warp_barrier() {
  State& s = st();
  const int w = s.cur / 32;
  if (++s.warp_arrived[w] == 32) {
    s.warp_arrived[w] = 0;
    for (int i = w * 32; i < w * 32 + 32; ++i)
      if (s.fibers[i].wait == kWarp) s.fibers[i].wait = kNone;
    return;
  }
  s.fibers[s.cur].wait = kWarp;
  yield_to_main();
}

void block_barrier() {
  State& s = st();
  if (s.warp_arrived[s.cur / 32] != 0) fail("__syncthreads while lanes of this warp are inside a warp collective");
  if (++s.block_arrived == s.n) {
    s.block_arrived = 0;
    for (auto& f : s.fibers)
      if (f.wait == kBlock) f.wait = kNone;
    return;
  }
  s.fibers[s.cur].wait = kBlock;
  yield_to_main();
}

void cp_async(void* dst, const void* src, int size, int fill) {
  check_smem(dst, size, "cp.async destination");
  if (reinterpret_cast<uintptr_t>(dst) % size) fail("cp.async destination misaligned");
  if (fill && reinterpret_cast<uintptr_t>(src) % size) fail("cp.async source misaligned");
  Copy c{dst, src, size, fill};
  if (mode_early()) {
    do_copy(c);
    return;
  }
  // The destination is undefined from issue until the wait_group that retires the copy: poison it now (a
  // thread still reading the old contents, i.e. a missing barrier before the refill, sees NaN) and write the
  // data at the wait (a read before the wait or before the barrier after it sees NaN too).
  if (fill) check_global(src, size, "cp.async source");
  memset(dst, 0xff, size);
  st().fibers[st().cur].open.push_back(c);
}

void cp_commit() {
  Fiber& f = st().fibers[st().cur];
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}

void cp_wait(int n) {
  Fiber& f = st().fibers[st().cur];
  while (static_cast<int>(f.groups.size()) > n) {
    for (auto& c : f.groups.front()) do_copy(c);
    f.groups.erase(f.groups.begin());
  }
}

namespace {
// Plain stores are not checked one by one: a store outside the dynamic allocation shows up as a changed byte in
// the red zones around it (stores further away corrupt the process like on any CPU).
void check_red_zones() {
  State& s = st();
  const unsigned char* zones[2] = {s.smem - kRedZone, s.smem + s.smem_bytes};
  for (int z = 0; z < 2; ++z)
    for (size_t i = 0; i < kRedZone; ++i)
      if (zones[z][i] != 0xff) {
        const long off = z == 0 ? -static_cast<long>(kRedZone - i) : static_cast<long>(s.smem_bytes + i);
        fail("a store to shared memory at byte offset %ld, outside the launch's %zu bytes of dynamic smem", off,
             s.smem_bytes);
      }
}
}  // namespace

void launch(dim3 grid, dim3 block, size_t smem, std::function<void()> body) {
  State& s = st();
  if (block.y != 1 || block.z != 1 || block.x % 32) fail("block shape unsupported by emulation");
  if (smem > kSmem) fail("dynamic smem %zu too large", smem);
  gridDim = grid;
  blockDim = block;
  s.n = block.x;
  s.fibers.resize(s.n);
  for (auto& f : s.fibers)
    if (f.stack.size() != kStack) f.stack.resize(kStack);
  s.slots.assign(s.n, Slot{});
  s.warp_arrived.assign(s.n / 32, 0);
  s.body = std::move(body);
  s.smem_bytes = smem;
  ++s.launches;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = {x, y, z};
        // Poison: NaN halves/floats wherever a kernel reads shared memory it never wrote (or past the end).
        memset(s.smem - kRedZone, 0xff, kRedZone + smem + kRedZone);
        s.block_arrived = 0;
        for (int i = 0; i < s.n; ++i) {
          Fiber& f = s.fibers[i];
          f.done = false;
          f.wait = kNone;
          f.groups.clear();
          f.open.clear();
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = f.stack.size();
          f.ctx.uc_link = &s.main_ctx;
          makecontext(&f.ctx, trampoline, 0);
        }
        // Schedule: always resume the first runnable thread in priority order, so the first warp runs as far
        // as it can (to a __syncthreads or its end) before the next one starts: maximal skew between warps,
        // which turns a missing barrier into a read of poisoned or stale shared memory. The order alternates
        // between ascending and descending thread index from block to block (and launch to launch), so both
        // "earlier warp runs ahead" and "later warp runs ahead" get exercised.
        const bool descending = ((x + grid.x * (y + grid.y * z)) + s.launches) & 1;
        for (;;) {
          int next = -1;
          bool all_done = true;
          for (int j = 0; j < s.n; ++j) {
            const int i = descending ? s.n - 1 - j : j;
            const Fiber& f = s.fibers[i];
            if (f.done) continue;
            all_done = false;
            if (f.wait == kNone) {
              next = i;
              break;
            }
          }
          if (all_done) break;
          if (next < 0) {
            int at_block = 0, at_warp = 0, done = 0;
            for (auto& f : s.fibers) {
              done += f.done;
              at_block += f.wait == kBlock;
              at_warp += f.wait == kWarp;
            }
            fail("deadlock: %d done, %d at __syncthreads, %d in warp collectives", done, at_block, at_warp);
          }
          s.cur = next;
          threadIdx = {static_cast<unsigned>(next), 0, 0};
          s.in_fiber = true;
          swapcontext(&s.main_ctx, &s.fibers[next].ctx);
          s.in_fiber = false;
          if (!s.error.empty()) {
            std::string msg;
            msg.swap(s.error);
            throw std::runtime_error(msg);
          }
        }
        check_red_zones();
      }
}

}  // namespace emu

// ---- CUDA runtime stubs (the launchers call these) ----
extern "C" {
cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int) { return cudaSuccess; }
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) {
  *v = 227 * 1024;
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int v) {
  if (v > 227 * 1024) return cudaErrorInvalidValue;
  return cudaSuccess;
}
cudaError_t cudaGetLastError() { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t) { return "emulated error"; }
cudaError_t cudaRuntimeGetVersion(int* v) {
  *v = 13000;
  return cudaSuccess;
}
cudaError_t cudaDriverGetVersion(int* v) {
  *v = 13000;
  return cudaSuccess;
}
}
