#pragma once
#include <cstdint>

namespace dynattn {
namespace cuda {

int runtime_version();  // CUDA runtime this module was linked with, e.g. 13000
int driver_version();   // highest CUDA version the installed driver supports (0 without a driver)
// Writes 0..n-1 into the int64 device buffer `out` on `stream` (a cudaStream_t as an integer).
void probe_iota(std::uintptr_t out, int64_t n, std::uintptr_t stream);

}  // namespace cuda
}  // namespace dynattn
