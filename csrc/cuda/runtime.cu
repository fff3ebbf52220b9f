// CUDA runtime plumbing for dynattn._C_cuda: version queries, the launch preparation every kernel goes
// through (current device, large shared-memory opt-in, error reporting) and a probe kernel that proves the
// build, the launch path and torch's stream hand-off work.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/device.cuh"
#include "cuda/runtime.h"

namespace dynattn {
namespace cuda {

namespace {

__global__ void iota_kernel(int64_t* out, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = i;
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("dynattn._C_cuda: ") + what + ": " + cudaGetErrorString(err));
  }
}

}  // namespace

void check_cuda(cudaError_t err, const char* what) { check(err, what); }

void prepare_launch(int device, const void* kernel, size_t smem_bytes, const char* what) {
  // This module links the CUDA runtime statically, so its "current device" is its own and not torch's:
  // set it on every call, or a tensor on cuda:1 would be launched on cuda:0.
  int current = -1;
  check(cudaGetDevice(&current), "cudaGetDevice");
  if (current != device) check(cudaSetDevice(device), "cudaSetDevice");
  // Dynamic shared memory above 48 KB (less the kernel's few static bytes) needs an explicit opt-in.
  constexpr size_t kDefaultLimit = 47 * 1024;
  if (smem_bytes <= kDefaultLimit) return;
  int optin = 0;
  check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
        "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  if (smem_bytes > static_cast<size_t>(optin)) {
    throw std::runtime_error(std::string("dynattn._C_cuda: ") + what + " needs " + std::to_string(smem_bytes) +
                             " bytes of shared memory per block, but the device allows " + std::to_string(optin));
  }
  // Host-side attribute, not a stream operation: allowed while a CUDA graph is being captured.
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes)),
        "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
}

int runtime_version() {
  int v = 0;
  check(cudaRuntimeGetVersion(&v), "cudaRuntimeGetVersion");
  return v;
}

int driver_version() {
  int v = 0;
  check(cudaDriverGetVersion(&v), "cudaDriverGetVersion");
  return v;
}

void probe_iota(std::uintptr_t out, int64_t n, std::uintptr_t stream) {
  if (n <= 0) return;
  const int threads = 256;
  const int64_t blocks = (n + threads - 1) / threads;
  iota_kernel<<<static_cast<unsigned>(blocks), threads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<int64_t*>(out), n);
  check(cudaGetLastError(), "probe_iota launch");
}

}  // namespace cuda
}  // namespace dynattn
