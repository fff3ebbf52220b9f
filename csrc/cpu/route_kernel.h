// Routing: region means of q and k, then the region-to-region logits. The top-k selection runs in the host
// driver (route.cpp), which may use the standard library.
#pragma once

#include "cpu/kernels.h"
#include "cpu/tile.h"

namespace dynattn {
namespace cpu {
namespace DYNATTN_ISA_NS {

template <class T>
size_t route_scratch_bytes_t(const RouteParams& p) {
  return (size_t)p.D * sizeof(T);
}

// item = b*R + r: means over the region's tokens (summed in row-major token order, then divided), all heads.
template <class S, class T>
void route_pool_t(const RouteParams& p, int64_t item, void* pooled_q, void* pooled_k, void* scratch) {
  using V = typename VecOf<T>::type;
  constexpr int W = V::W;
  const Geometry& g = p.g;
  const int64_t R = num_regions(g), b = item / R, HD = g.H * p.D;
  const Region& reg = p.regions[item % R];
  T* tmp = static_cast<T*>(scratch);
  const TensorArg* src[2] = {&p.q, &p.k};
  T* dst[2] = {static_cast<T*>(pooled_q) + item * HD, static_cast<T*>(pooled_k) + item * HD};
  for (int which = 0; which < 2; ++which) {
    const S* base = static_cast<const S*>(src[which]->data);
    T* acc = dst[which];
    zero(acc, HD);
    int64_t c[3];
    for (c[0] = reg.lo[0]; c[0] < reg.lo[0] + reg.len[0]; ++c[0]) {
      for (c[1] = reg.lo[1]; c[1] < reg.lo[1] + reg.len[1]; ++c[1]) {
        for (c[2] = reg.lo[2]; c[2] < reg.lo[2] + reg.len[2]; ++c[2]) {
          for (int64_t h = 0; h < g.H; ++h) {
            load_row(base + row_offset(*src[which], b, c, h), p.D, tmp);
            T* a = acc + h * p.D;
            int64_t d = 0;
            for (; d + W <= p.D; d += W) vstore(a + d, vadd(vload(a + d), vload(tmp + d)));
            for (; d < p.D; ++d) a[d] += tmp[d];
          }
        }
      }
    }
    const T count = (T)reg.count;
    for (int64_t d = 0; d < HD; ++d) acc[d] /= count;
  }
}

// item = (b*G + h)*R + r with G = H (per head) or 1: logits[j] = scale * q_r . k_j over the routing width.
template <class T>
void route_logits_t(const RouteParams& p, const void* pooled_q, const void* pooled_k, int64_t item, void* logits) {
  const Geometry& g = p.g;
  const int64_t R = num_regions(g), G = p.per_head ? g.H : 1, HD = g.H * p.D;
  const int64_t r = item % R, h = (item / R) % G, b = item / R / G;
  const int64_t width = p.per_head ? p.D : HD, off = p.per_head ? h * p.D : 0;
  const T* q = static_cast<const T*>(pooled_q) + (b * R + r) * HD + off;
  const T* k = static_cast<const T*>(pooled_k) + b * R * HD + off;
  T* out = static_cast<T*>(logits);
  for (int64_t j = 0; j < R; ++j) out[j] = (T)p.scale * dot_row(q, k + j * HD, width);
}

}  // namespace DYNATTN_ISA_NS
}  // namespace cpu
}  // namespace dynattn
