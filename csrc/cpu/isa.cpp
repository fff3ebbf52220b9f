// Run-time ISA selection: the best kernel table the CPU supports, or the one DYNATTN_CPU_ISA names.
#include <stdlib.h>

#include <atomic>
#include <stdexcept>
#include <string>

#include "cpu/api.h"
#include "cpu/kernels.h"

namespace dynattn {
namespace cpu {
namespace {

bool cpu_has_avx2() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && cpu_has_avx2();
#else
  return false;
#endif
}

// The table for an ISA name, or an explanation of why it cannot run here.
const KernelTable* table_for(const std::string& name, std::string* why) {
  if (name == "scalar") return kernels_scalar();
  if (name == "avx2") {
    if (kernels_avx2() == nullptr) *why = "this build has no AVX2 kernels (not an x86-64 build)";
    else if (!cpu_has_avx2()) *why = "this CPU lacks AVX2/FMA/F16C";
    else return kernels_avx2();
    return nullptr;
  }
  if (name == "avx512") {
    if (kernels_avx512() == nullptr) *why = "this build has no AVX-512 kernels (not an x86-64 build)";
    else if (!cpu_has_avx512()) *why = "this CPU lacks AVX-512 F/BW/VL/DQ";
    else return kernels_avx512();
    return nullptr;
  }
  *why = "expected one of scalar, avx2, avx512";
  return nullptr;
}

const KernelTable* select_from_env() {
  const char* env = getenv("DYNATTN_CPU_ISA");
  if (env != nullptr && env[0] != '\0') {
    std::string why;
    const KernelTable* t = table_for(env, &why);
    if (t == nullptr) throw std::invalid_argument(std::string("DYNATTN_CPU_ISA=") + env + ": " + why);
    return t;
  }
  if (cpu_has_avx512() && kernels_avx512() != nullptr) return kernels_avx512();
  if (cpu_has_avx2() && kernels_avx2() != nullptr) return kernels_avx2();
  return kernels_scalar();
}

std::atomic<const KernelTable*> g_table{nullptr};

}  // namespace

const KernelTable& kernels() {
  const KernelTable* t = g_table.load(std::memory_order_acquire);
  if (t == nullptr) {
    t = select_from_env();
    g_table.store(t, std::memory_order_release);
  }
  return *t;
}

std::string isa_name() { return kernels().name; }

void set_isa(const std::string& name) {
  std::string why;
  const KernelTable* t = table_for(name, &why);
  if (t == nullptr) throw std::invalid_argument("cpu ISA '" + name + "': " + why);
  g_table.store(t, std::memory_order_release);
}

}  // namespace cpu
}  // namespace dynattn
