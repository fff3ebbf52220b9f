// Parameter structs handed from the host drivers to the kernels. Plain aggregates, no member functions (see
// macros.h for why nothing here may carry inline code).
#pragma once

#include <stdint.h>

#include "common/dtype.h"
#include "common/geometry.h"
#include "common/macros.h"

namespace dynattn {

// A strided (B, L0, L1, L2, H, D) tensor with a contiguous last dim; strides in elements.
struct TensorArg {
  const void* data;
  int64_t stride[5];  // B, L0, L1, L2, H
};

// Element offset of row (b, c, h) of a TensorArg.
DYNATTN_FN int64_t row_offset(const TensorArg& t, int64_t b, const int64_t c[3], int64_t h) {
  return b * t.stride[0] + c[0] * t.stride[1] + c[1] * t.stride[2] + c[2] * t.stride[3] + h * t.stride[4];
}

// Routing indices: idx[b, (h,) r, :] lists the topk key regions of query region r.
struct RouteIndex {
  const int64_t* data;
  int64_t topk;
  bool per_head;  // (B, H, R, topk) instead of (B, R, topk)
};

DYNATTN_FN const int64_t* route_row(const RouteIndex& ix, const Geometry& g, int64_t b, int64_t h, int64_t r) {
  const int64_t groups = ix.per_head ? g.H : 1;
  return ix.data + ((b * groups + (ix.per_head ? h : 0)) * num_regions(g) + r) * ix.topk;
}

struct RouteParams {
  Geometry g;
  const Region* regions;  // region_of(g, r) for every r, precomputed by the driver
  int64_t D;  // head dim of q and k
  DType dtype;
  TensorArg q, k;
  int64_t topk;
  bool per_head;
  double scale;
};

struct FwdParams {
  Geometry g;
  const Region* regions;  // region_of(g, r) for every r, precomputed by the driver
  int64_t Dqk, Dv;
  DType dtype;
  double scale;
  TensorArg q, k, v;
  RouteIndex idx;
  void* out;  // contiguous (B, L0, L1, L2, H, Dv), storage dtype
  void* lse;  // contiguous (B, L0, L1, L2, H), float32 (float64 for float64 inputs)
  bool stream_out;  // write out with non-temporal stores (set by the driver for outputs larger than a cache)
};

struct BwdParams {
  Geometry g;
  const Region* regions;  // region_of(g, r) for every r, precomputed by the driver
  int64_t Dqk, Dv;
  DType dtype;
  double scale;
  TensorArg q, k, v, out, dout;
  RouteIndex idx;
  const void* lse;   // contiguous (B, L0, L1, L2, H), compute-type float
  const void* dlse;  // same layout, or null
  void* delta;       // scratch, same layout: rowsum(dout * out) - dlse, written by the dQ pass
  // Inverse routing (CSR), one table per routing group grp = b (shared) or b*H + h (per head): the query
  // regions that picked key region r are inv_regions[inv_offsets[grp*(R+1) + r] .. inv_offsets[grp*(R+1) + r + 1]),
  // ascending. Offsets index into the whole inv_regions array. Built by the driver.
  const int64_t* inv_offsets;
  const int64_t* inv_regions;
  void* dq;  // contiguous, same shapes as q / k / v, storage dtype
  void* dk;
  void* dv;
  bool stream_out;  // write dq/dk/dv with non-temporal stores (set by the driver for large outputs)
};

}  // namespace dynattn
