// CUDA runtime plumbing for dynattn._C_cuda: version queries and a probe kernel that proves the build,
// the launch path and torch's stream hand-off work. The attention kernels arrive with the CUDA backend issue.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

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
