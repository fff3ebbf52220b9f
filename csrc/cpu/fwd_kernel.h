// Forward of routed attention: one work item = (b, h, query region, block of <= kBlockRows query rows).
//
//   Q  <- the block's queries, times scale                       row tile   [M][Dqk]
//   for each chunk of <= kChunkCols keys of the routed regions (concatenated in idx order):
//     K^T, V <- the chunk's keys and values                       panel tile, row tile [n][Dvp]
//     S = Q K^T                                                   gemm_nt, [M][npad]
//     online softmax: m_new = max(m, rowmax S); P = exp(S - m_new); l = alpha l + rowsum P
//     O = alpha O + P V                                           gemm_nn (alpha = exp(m - m_new))
//   out = O / l, lse = m + log l
// Nothing larger than one chunk is ever materialised, and each item owns its output rows, so results do not
// depend on the thread count.
#pragma once

#include "cpu/kernels.h"
#include "cpu/tile.h"

namespace dynattn {
namespace cpu {
namespace DYNATTN_ISA_NS {

template <class T>
struct FwdTiles {
  T* q;                    // [kBlockRows][Dqk] scaled queries
  T* k;                    // [kChunkCols][Dqk] key rows, on their way into the panels
  T* kt;                   // panels [kChunkCols/W][Dqk][W]
  T* v;                    // [kChunkCols][Dvp]
  T* s;                    // [kBlockRows][kChunkCols] scores -> probabilities
  T* o;                    // [kBlockRows][Dvp] output accumulator
  T* m;                    // [kBlockRows] running max
  T* l;                    // [kBlockRows] running sum
  T* m_new;                // [kBlockRows] max after this chunk
  T* alpha;                // [kBlockRows] exp(m - m_new): rescale of l and O
  int64_t* coords;         // [kBlockRows][3] query rows
  int64_t* key_coords[2];  // [kChunkCols][3] current and next key chunk
  int64_t* tok;            // [kBlockRows] flat token index of each query row
};

template <class T>
inline FwdTiles<T> fwd_tiles(const FwdParams& p, Carver& c) {
  const int64_t Dvp = round_up(p.Dv, width<T>());
  FwdTiles<T> t;
  t.q = c.take<T>(kBlockRows * p.Dqk);
  t.k = c.take<T>(kChunkCols * p.Dqk);
  t.kt = c.take<T>(kChunkCols * p.Dqk);
  t.v = c.take<T>(kChunkCols * Dvp);
  t.s = c.take<T>(kBlockRows * kChunkCols);
  t.o = c.take<T>(kBlockRows * Dvp);
  t.m = c.take<T>(kBlockRows);
  t.l = c.take<T>(kBlockRows);
  t.m_new = c.take<T>(kBlockRows);
  t.alpha = c.take<T>(kBlockRows);
  t.coords = c.take<int64_t>(3 * kBlockRows);
  t.key_coords[0] = c.take<int64_t>(3 * kChunkCols);
  t.key_coords[1] = c.take<int64_t>(3 * kChunkCols);
  t.tok = c.take<int64_t>(kBlockRows);
  return t;
}

template <class T>
size_t fwd_scratch_bytes_t(const FwdParams& p) {
  Carver c{0, 0};
  fwd_tiles<T>(p, c);
  return c.used;
}

// Online-softmax update of rows [0, M) for a score tile with n valid columns (padded to npad): leaves
// P = exp(S - m_new) in the tile and alpha = exp(m - m_new). Each step runs over all rows before the next, so
// the rows' independent latency chains (horizontal max, exp, horizontal sum) overlap.
template <class T>
inline void softmax_update(const FwdTiles<T>& t, int64_t M, int64_t n, int64_t npad) {
  using V = typename VecOf<T>::type;
  constexpr int W = V::W;
  const T neg_inf = -(T)INFINITY;
  for (int64_t i = 0; i < M; ++i) {
    T* s = t.s + i * kChunkCols;
    for (int64_t j = n; j < npad; ++j) s[j] = neg_inf;  // padding keys get zero probability
    V mx = vload(s);
    for (int64_t j = W; j < npad; j += W) mx = vmax(mx, vload(s + j));
    t.m_new[i] = smax(t.m[i], vreduce_max(mx));
  }
  int64_t i = 0;
  for (; i + W <= M; i += W) vstore(t.alpha + i, vexp(vsub(vload(t.m + i), vload(t.m_new + i))));
  for (; i < M; ++i) t.alpha[i] = sexp(t.m[i] - t.m_new[i]);
  for (i = 0; i < M; ++i) {
    T* s = t.s + i * kChunkCols;
    const V mv = vset1(t.m_new[i]);
    V sum = vset1(T(0));
    for (int64_t j = 0; j < npad; j += W) {
      const V e = vexp(vsub(vload(s + j), mv));
      vstore(s + j, e);
      sum = vadd(sum, e);
    }
    t.l[i] = t.l[i] * t.alpha[i] + vreduce_add(sum);
    t.m[i] = t.m_new[i];
  }
}

template <class S, class T>
void fwd_item(const FwdParams& p, const FwdTiles<T>& t, int64_t item) {
  constexpr int W = width<T>();
  const Geometry& g = p.g;
  const BlockItem it = decode_block_item(g, p.regions, item);
  const int64_t M = it.t1 - it.t0, b = it.b, h = it.h;
  if (M <= 0) return;
  const int64_t Dqk = p.Dqk, Dv = p.Dv, Dvp = round_up(Dv, W), nvec = Dvp / W;

  region_tokens(it.reg, it.t0, M, t.coords);
  for (int64_t i = 0; i < M; ++i) t.tok[i] = flat_token(g, t.coords + 3 * i);
  prefetch_tokens<S>(p.q, b, h, t.coords, M, Dqk);
  if (!p.stream_out) prefetch_out_rows<S>(g, p.out, b, h, t.coords, M, Dv);
  // Key chunks are double-buffered: chunk c+1's coordinates are known (and its rows prefetched) while c computes.
  TokenStream keys = token_stream(p.regions, route_row(p.idx, g, b, h, it.r), p.idx.topk);
  int64_t* coords = t.key_coords[0];
  int64_t n = stream_fill(keys, kChunkCols, coords);
  prefetch_tokens<S>(p.k, b, h, coords, n, Dqk);
  prefetch_tokens<S>(p.v, b, h, coords, n, Dv);

  // Queries, pre-scaled so that scores are plain dot products.
  pack_tokens<S, T>(p.q, b, h, t.coords, M, Dqk, (T)p.scale, t.q, Dqk, nullptr);
  zero(t.o, M * Dvp);
  for (int64_t i = 0; i < M; ++i) {
    t.m[i] = -(T)INFINITY;
    t.l[i] = T(0);
  }

  for (int c = 0; n > 0; c ^= 1) {
    int64_t* next = t.key_coords[c ^ 1];
    const int64_t n_next = stream_fill(keys, kChunkCols, next);
    prefetch_tokens<S>(p.k, b, h, next, n_next, Dqk);
    prefetch_tokens<S>(p.v, b, h, next, n_next, Dv);

    const int64_t npanel = (n + W - 1) / W;
    pack_tokens<S, T>(p.k, b, h, coords, n, Dqk, T(1), t.k, Dqk, t.kt);
    pack_tokens<S, T>(p.v, b, h, coords, n, Dv, T(1), t.v, Dvp, nullptr);
    gemm_nt(M, npanel, Dqk, t.q, Dqk, t.kt, Dqk * W, t.s, kChunkCols);
    softmax_update(t, M, n, npanel * W);
    gemm_nn(M, nvec, n, t.s, kChunkCols, t.v, Dvp, t.o, Dvp, t.alpha);
    coords = next;
    n = n_next;
  }

  S* out = static_cast<S*>(p.out);
  T* lse = static_cast<T*>(p.lse);
  for (int64_t i = 0; i < M; ++i) {
    T* o = t.o + i * Dvp;
    scale_row(o, Dv, T(1) / t.l[i]);
    const int64_t row = (b * num_tokens(g) + t.tok[i]) * g.H + h;
    store_out_row(o, Dv, out + row * Dv, p.stream_out);
    lse[row] = t.m[i] + slog(t.l[i]);
  }
}

template <class S, class T>
void fwd_items_t(const FwdParams& p, int64_t begin, int64_t end, void* scratch) {
  Carver carver{reinterpret_cast<uintptr_t>(scratch), 0};
  const FwdTiles<T> t = fwd_tiles<T>(p, carver);
  for (int64_t item = begin; item < end; ++item) fwd_item<S, T>(p, t, item);
  stream_fence();
}

}  // namespace DYNATTN_ISA_NS
}  // namespace cpu
}  // namespace dynattn
