// Instantiates every kernel for one ISA and exports its KernelTable. Included once by each ISA unit
// (kernels_scalar.cpp, kernels_avx2.cpp, kernels_avx512.cpp) after it defines DYNATTN_ISA_NS and
// DYNATTN_ISA_TABLE (the name of the exported getter).
#pragma once

#include "cpu/bwd_kernel.h"
#include "cpu/fwd_kernel.h"
#include "cpu/kernels.h"
#include "cpu/route_kernel.h"

namespace dynattn {
namespace cpu {
namespace DYNATTN_ISA_NS {

// Storage dtype -> (storage type S, compute type T): float32/float16/bfloat16 compute in float, float64 in double.
#define DYNATTN_DISPATCH_DTYPE(dtype, ...)   \
  switch (dtype) {                           \
    case DType::Float32: {                   \
      using S = float;                       \
      using T = float;                       \
      __VA_ARGS__;                           \
    }                                        \
    case DType::Float16: {                   \
      using S = Half;                        \
      using T = float;                       \
      __VA_ARGS__;                           \
    }                                        \
    case DType::BFloat16: {                  \
      using S = BFloat16;                    \
      using T = float;                       \
      __VA_ARGS__;                           \
    }                                        \
    case DType::Float64: {                   \
      using S = double;                      \
      using T = double;                      \
      __VA_ARGS__;                           \
    }                                        \
  }                                          \
  __builtin_unreachable();

size_t route_scratch_bytes(const RouteParams& p) {
  DYNATTN_DISPATCH_DTYPE(p.dtype, (void)sizeof(S); return route_scratch_bytes_t<T>(p))
}
void route_pool(const RouteParams& p, int64_t item, void* pq, void* pk, void* scratch) {
  DYNATTN_DISPATCH_DTYPE(p.dtype, return route_pool_t<S, T>(p, item, pq, pk, scratch))
}
void route_logits(const RouteParams& p, const void* pq, const void* pk, int64_t item, void* logits) {
  DYNATTN_DISPATCH_DTYPE(p.dtype, (void)sizeof(S); return route_logits_t<T>(p, pq, pk, item, logits))
}
size_t fwd_scratch_bytes(const FwdParams& p) {
  DYNATTN_DISPATCH_DTYPE(p.dtype, (void)sizeof(S); return fwd_scratch_bytes_t<T>(p))
}
void fwd_items(const FwdParams& p, int64_t begin, int64_t end, void* scratch) {
  DYNATTN_DISPATCH_DTYPE(p.dtype, return fwd_items_t<S, T>(p, begin, end, scratch))
}
size_t bwd_scratch_bytes(const BwdParams& p) {
  DYNATTN_DISPATCH_DTYPE(p.dtype, (void)sizeof(S); return bwd_scratch_bytes_t<T>(p))
}
void bwd_dq_items(const BwdParams& p, int64_t begin, int64_t end, void* scratch) {
  DYNATTN_DISPATCH_DTYPE(p.dtype, return bwd_dq_items_t<S, T>(p, begin, end, scratch))
}
void bwd_dkv_items(const BwdParams& p, int64_t begin, int64_t end, void* scratch) {
  DYNATTN_DISPATCH_DTYPE(p.dtype, return bwd_dkv_items_t<S, T>(p, begin, end, scratch))
}
void bwd_fused_items(const BwdParams& p, int64_t begin, int64_t end, void* scratch) {
  DYNATTN_DISPATCH_DTYPE(p.dtype, return bwd_fused_items_t<S, T>(p, begin, end, scratch))
}

#undef DYNATTN_DISPATCH_DTYPE

}  // namespace DYNATTN_ISA_NS

const KernelTable* DYNATTN_ISA_TABLE() {
  using namespace DYNATTN_ISA_NS;
  static const KernelTable table = {DYNATTN_ISA_NAME, route_scratch_bytes, route_pool,    route_logits,
                                    fwd_scratch_bytes, fwd_items,          bwd_scratch_bytes, bwd_dq_items,
                                    bwd_dkv_items,     bwd_fused_items};
  return &table;
}

}  // namespace cpu
}  // namespace dynattn
