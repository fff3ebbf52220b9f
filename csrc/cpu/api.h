// Host entry points of the CPU backend, called by bindings.cpp with the GIL released. They validate what
// could cause out-of-bounds accesses (geometry, idx values; the Python layer checks everything else), set up
// scratch and run the kernels of the selected ISA on the thread pool. Errors: std::invalid_argument.
#pragma once

#include <stdint.h>

#include <string>

#include "common/params.h"

namespace dynattn {
namespace cpu {

// Writes idx (B, R, topk) or (B, H, R, topk) int64, rows sorted by descending logit, ties to the lower region.
void route(const RouteParams& p, int64_t* idx, int num_threads);

// Writes p.out and p.lse.
void attention_fwd(FwdParams p, int num_threads);

// Writes p.dq, p.dk, p.dv; the inverse routing index and delta scratch are set up here.
void attention_bwd(BwdParams p, int num_threads);

std::string isa_name();                // "avx512" | "avx2" | "scalar"
void set_isa(const std::string& name);  // testing hook: switch ISA in-process

}  // namespace cpu
}  // namespace dynattn
