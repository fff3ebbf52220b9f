// Host-side entry points of the CUDA kernels (route.cu, fwd.cu, bwd.cu), as bindings_cuda.cpp calls them.
//
// Plain C++ with no CUDA headers, so the pybind11 translation unit is built by the host compiler alone. Every
// tensor arrives as a raw device pointer plus element strides, every call carries the CUDA device and stream
// torch handed out; nothing here allocates, synchronises the host or reads device data, so the calls can be
// captured in a CUDA graph.
#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "common/geometry.h"
#include "common/params.h"

namespace dynattn {
namespace cuda {

// Where and on what to run: the device index (our statically linked runtime keeps its own current device,
// separate from torch's, so it is set on every call) and a cudaStream_t as an integer.
struct Launch {
  int device;
  std::uintptr_t stream;
};

// Problem shape of one call. Geometry holds B, L[3], S[3], H (unused spatial dims: L = S = 1).
struct Shape {
  Geometry g;
  int64_t Dqk, Dv;
};

// Routing index: int64 contiguous (B, R, topk), or (B, H, R, topk) when per_head.
struct Index {
  const int64_t* data;
  int64_t topk;
  bool per_head;
};

// route(): region means of q and k into the fp32 scratch buffers qr, kr (contiguous (B, R, H, Dqk)), then
// logits scale * qr @ kr^T per (batch[, head]) and the top-k per row into idx_out (int64, layout of Index).
struct RouteArgs {
  Shape shape;  // Dv unused
  DType dtype;  // Float32, Float16 or BFloat16
  TensorArg q, k;
  float* qr;
  float* kr;
  int64_t* idx_out;
  int64_t topk;
  bool per_head;
  float scale;
};

// fwd(): out (contiguous (B, *spatial, H, Dv), q's dtype) and lse (contiguous (B, *spatial, H), float32).
struct FwdArgs {
  Shape shape;
  DType dtype;  // Float16 or BFloat16
  TensorArg q, k, v;
  Index idx;
  float scale;
  void* out;
  float* lse;
};

// bwd(): dq, dk, dv (contiguous, input dtype). delta is an fp32 scratch of lse's layout. inv_offsets /
// inv_regions is the inverse routing index in CSR form, one table per routing group G (= B, or B*H when
// per_head): the query regions that picked key region r in group g are
// inv_regions[g*R*topk + inv_offsets[g*(R+1) + r] ... g*R*topk + inv_offsets[g*(R+1) + r + 1]), ascending.
struct BwdArgs {
  Shape shape;
  DType dtype;  // Float16 or BFloat16
  TensorArg q, k, v, out, dout;
  const float* lse;   // contiguous (B, *spatial, H)
  const float* dlse;  // same layout, or nullptr
  float* delta;       // scratch, same layout
  Index idx;
  const int32_t* inv_offsets;  // (G, R + 1)
  const int32_t* inv_regions;  // (G, R * topk)
  float scale;
  void* dq;
  void* dk;
  void* dv;
};

void route(const RouteArgs& a, const Launch& launch);
void fwd(const FwdArgs& a, const Launch& launch);
void bwd(const BwdArgs& a, const Launch& launch);

// Head dims with compiled attention kernels; d_qk and d_v may differ, each must be one of these.
bool head_dim_supported(int64_t d);

}  // namespace cuda
}  // namespace dynattn
