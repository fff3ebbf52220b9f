// Backward of routed attention, in two passes so that no two work items ever write the same output row
// (deterministic, no atomics). Probabilities are recomputed from the saved lse: P = exp(scale q.k - lse).
//
// Pass 1, item = (b, h, query region, block of query rows), keys stream through like in the forward:
//   delta = rowsum(dO * O) - dlse   (stored for pass 2)
//   per key chunk: S = Qs K^T, dP = dO V^T, dS = P (dP - delta), dQ += dS K
//   dQ *= scale
// Pass 2, item = (b, h, key region, block of key rows); the queries of every query region that routed to this
// key region (inverse routing index, ascending region order) stream through in chunks, and the roles of
// queries and keys swap so that the chunk's queries fill the SIMD lanes:
//   per query chunk: S^T = K Qs^T, dP^T = V dO^T, P^T = exp(S^T - lse), dS^T = P^T (dP^T - delta)
//                    dV += P^T dO, dK += dS^T Qs      (Qs = scale q, so dK needs no final scale)
//
// One pass instead, when topk == 1 and a region is one block of rows: then each query region's keys are exactly
// one key region, and all of a query row's dQ terms meet in that key region's pass-2 item. The fused item runs
// pass 2 and also computes delta (from dO and O) and dQ = dS Qs-free: dQ = scale * dS K, with dS transposed from
// the dS^T tile it already has. S, dP and the exponentials are then computed once instead of twice, and no
// delta buffer is written and read back. Still one writer per output row, so still deterministic.
#pragma once

#include "cpu/kernels.h"
#include "cpu/tile.h"

namespace dynattn {
namespace cpu {
namespace DYNATTN_ISA_NS {

// Scratch of one thread; pass 1 and pass 2 carve different tiles from the same block.
template <class T>
struct DqTiles {
  T* q;                    // [kBlockRows][Dqk] scaled queries
  T* dout;                 // [kBlockRows][Dv]
  T* lse;                  // [kBlockRows]
  T* delta;                // [kBlockRows]
  T* dq;                   // [kBlockRows][Dqkp] accumulator
  T* k;                    // [kChunkCols][Dqkp]
  T* kt;                   // panels [kChunkCols/W][Dqk][W]
  T* v;                    // [kChunkCols][Dv] value rows, on their way into the panels
  T* vt;                   // panels [kChunkCols/W][Dv][W]
  T* s;                    // [kBlockRows][kChunkCols] scores -> dS
  T* dp;                   // [kBlockRows][kChunkCols]
  T* out;                  // [Dv] one output row (for delta)
  int64_t* coords;         // [kBlockRows][3] query rows
  int64_t* key_coords[2];  // [kChunkCols][3] current and next key chunk
  int64_t* tok;            // [kBlockRows]
};

template <class T>
struct DkvTiles {
  T* k;                      // [kBlockRows][Dqkp]
  T* v;                      // [kBlockRows][Dv]
  T* dk;                     // [kBlockRows][Dqkp] accumulator
  T* dv;                     // [kBlockRows][Dvp] accumulator
  T* q;                      // [kChunkCols][Dqkp] scaled queries
  T* qt;                     // panels [kChunkCols/W][Dqk][W] scaled queries
  T* dout;                   // [kChunkCols][Dvp]
  T* dot;                    // panels [kChunkCols/W][Dv][W]
  T* lse;                    // [kChunkCols]
  T* delta;                  // [kChunkCols]
  T* s;                      // [kBlockRows][kChunkCols] scores^T -> P^T
  T* dp;                     // [kBlockRows][kChunkCols] dP^T -> dS^T
  int64_t* coords;           // [kBlockRows][3] key rows
  int64_t* query_coords[2];  // [kChunkCols][3] current and next query chunk
  int64_t* tok;              // [kBlockRows]
};

// Extra tiles of the fused single pass (after a DkvTiles carve).
template <class T>
struct FusedTiles {
  DkvTiles<T> kv;
  T* ds;   // [kChunkCols][kBlockRows] dS, transposed from kv.dp
  T* dq;   // [kChunkCols][Dqkp]
  T* out;  // [Dv] one output row (for delta)
};

template <class T>
inline DqTiles<T> dq_tiles(const BwdParams& p, Carver& c) {
  constexpr int W = width<T>();
  const int64_t Dqkp = round_up(p.Dqk, W);
  DqTiles<T> t;
  t.q = c.take<T>(kBlockRows * p.Dqk);
  t.dout = c.take<T>(kBlockRows * p.Dv);
  t.lse = c.take<T>(kBlockRows);
  t.delta = c.take<T>(kBlockRows);
  t.dq = c.take<T>(kBlockRows * Dqkp);
  t.k = c.take<T>(kChunkCols * Dqkp);
  t.kt = c.take<T>(kChunkCols * p.Dqk);
  t.v = c.take<T>(kChunkCols * p.Dv);
  t.vt = c.take<T>(kChunkCols * p.Dv);
  t.s = c.take<T>(kBlockRows * kChunkCols);
  t.dp = c.take<T>(kBlockRows * kChunkCols);
  t.out = c.take<T>(p.Dv);
  t.coords = c.take<int64_t>(3 * kBlockRows);
  t.key_coords[0] = c.take<int64_t>(3 * kChunkCols);
  t.key_coords[1] = c.take<int64_t>(3 * kChunkCols);
  t.tok = c.take<int64_t>(kBlockRows);
  return t;
}

template <class T>
inline DkvTiles<T> dkv_tiles(const BwdParams& p, Carver& c) {
  constexpr int W = width<T>();
  const int64_t Dqkp = round_up(p.Dqk, W), Dvp = round_up(p.Dv, W);
  DkvTiles<T> t;
  t.k = c.take<T>(kBlockRows * Dqkp);
  t.v = c.take<T>(kBlockRows * p.Dv);
  t.dk = c.take<T>(kBlockRows * Dqkp);
  t.dv = c.take<T>(kBlockRows * Dvp);
  t.q = c.take<T>(kChunkCols * Dqkp);
  t.qt = c.take<T>(kChunkCols * p.Dqk);
  t.dout = c.take<T>(kChunkCols * Dvp);
  t.dot = c.take<T>(kChunkCols * p.Dv);
  t.lse = c.take<T>(kChunkCols);
  t.delta = c.take<T>(kChunkCols);
  t.s = c.take<T>(kBlockRows * kChunkCols);
  t.dp = c.take<T>(kBlockRows * kChunkCols);
  t.coords = c.take<int64_t>(3 * kBlockRows);
  t.query_coords[0] = c.take<int64_t>(3 * kChunkCols);
  t.query_coords[1] = c.take<int64_t>(3 * kChunkCols);
  t.tok = c.take<int64_t>(kBlockRows);
  return t;
}

template <class T>
inline FusedTiles<T> fused_tiles(const BwdParams& p, Carver& c) {
  constexpr int W = width<T>();
  FusedTiles<T> t;
  t.kv = dkv_tiles<T>(p, c);
  t.ds = c.take<T>(kChunkCols * kBlockRows);
  t.dq = c.take<T>(kChunkCols * round_up(p.Dqk, W));
  t.out = c.take<T>(p.Dv);
  return t;
}

template <class T>
size_t bwd_scratch_bytes_t(const BwdParams& p) {
  Carver a{0, 0}, b{0, 0};
  dq_tiles<T>(p, a);
  fused_tiles<T>(p, b);  // a superset of dkv_tiles
  return smax(a.used, b.used);
}

// Pass 1 for one block of query rows.
template <class S, class T>
void bwd_dq_item(const BwdParams& p, const DqTiles<T>& t, int64_t item) {
  using V = typename VecOf<T>::type;
  constexpr int W = V::W;
  const Geometry& g = p.g;
  const BlockItem it = decode_block_item(g, p.regions, item);
  const int64_t M = it.t1 - it.t0, b = it.b, h = it.h, N = num_tokens(g);
  if (M <= 0) return;
  const int64_t Dqk = p.Dqk, Dv = p.Dv, Dqkp = round_up(Dqk, W);

  region_tokens(it.reg, it.t0, M, t.coords);
  for (int64_t i = 0; i < M; ++i) t.tok[i] = flat_token(g, t.coords + 3 * i);
  prefetch_tokens<S>(p.q, b, h, t.coords, M, Dqk);
  prefetch_tokens<S>(p.dout, b, h, t.coords, M, Dv);
  prefetch_tokens<S>(p.out, b, h, t.coords, M, Dv);
  if (!p.stream_out) prefetch_out_rows<S>(g, p.dq, b, h, t.coords, M, Dqk);
  TokenStream keys = token_stream(p.regions, route_row(p.idx, g, b, h, it.r), p.idx.topk);
  int64_t* coords = t.key_coords[0];
  int64_t n = stream_fill(keys, kChunkCols, coords);
  prefetch_tokens<S>(p.k, b, h, coords, n, Dqk);
  prefetch_tokens<S>(p.v, b, h, coords, n, Dv);

  pack_tokens<S, T>(p.q, b, h, t.coords, M, Dqk, (T)p.scale, t.q, Dqk, nullptr);
  pack_tokens<S, T>(p.dout, b, h, t.coords, M, Dv, T(1), t.dout, Dv, nullptr);
  const S* out = static_cast<const S*>(p.out.data);
  const T* lse = static_cast<const T*>(p.lse);
  const T* dlse = static_cast<const T*>(p.dlse);
  T* delta = static_cast<T*>(p.delta);
  for (int64_t i = 0; i < M; ++i) {
    const int64_t row = (b * N + t.tok[i]) * g.H + h;
    load_row(out + row_offset(p.out, b, t.coords + 3 * i, h), Dv, t.out);
    t.delta[i] = dot_row(t.dout + i * Dv, t.out, Dv) - (dlse != nullptr ? dlse[row] : T(0));
    t.lse[i] = lse[row];
    delta[row] = t.delta[i];
  }
  zero(t.dq, M * Dqkp);

  for (int c = 0; n > 0; c ^= 1) {
    int64_t* next = t.key_coords[c ^ 1];
    const int64_t n_next = stream_fill(keys, kChunkCols, next);
    prefetch_tokens<S>(p.k, b, h, next, n_next, Dqk);
    prefetch_tokens<S>(p.v, b, h, next, n_next, Dv);

    const int64_t npanel = (n + W - 1) / W;
    pack_tokens<S, T>(p.k, b, h, coords, n, Dqk, T(1), t.k, Dqkp, t.kt);
    pack_tokens<S, T>(p.v, b, h, coords, n, Dv, T(1), t.v, Dv, t.vt);
    gemm_nt(M, npanel, Dqk, t.q, Dqk, t.kt, Dqk * W, t.s, kChunkCols);
    gemm_nt(M, npanel, Dv, t.dout, Dv, t.vt, Dv * W, t.dp, kChunkCols);
    // dS = P (dP - delta). Padding columns hold junk; gemm_nn reads only the n valid ones.
    for (int64_t i = 0; i < M; ++i) {
      T* s = t.s + i * kChunkCols;
      const T* dp = t.dp + i * kChunkCols;
      const V lse_i = vset1(t.lse[i]), delta_i = vset1(t.delta[i]);
      for (int64_t j = 0; j < npanel * W; j += W) {
        const V prob = vexp(vsub(vload(s + j), lse_i));
        vstore(s + j, vmul(prob, vsub(vload(dp + j), delta_i)));
      }
    }
    gemm_nn(M, Dqkp / W, n, t.s, kChunkCols, t.k, Dqkp, t.dq, Dqkp, static_cast<const T*>(nullptr));
    coords = next;
    n = n_next;
  }

  S* dq = static_cast<S*>(p.dq);
  for (int64_t i = 0; i < M; ++i) {
    T* row = t.dq + i * Dqkp;
    scale_row(row, Dqk, (T)p.scale);
    store_out_row(row, Dqk, dq + ((b * N + t.tok[i]) * g.H + h) * Dqk, p.stream_out);
  }
}

// Pass 2 for one block of key rows. With `fused` (topk == 1, one block per region: see the top of the file) it
// also computes delta from dO and O, and the final dQ of the chunk's query rows, which get no other dQ terms.
template <class S, class T>
void bwd_dkv_item(const BwdParams& p, const DkvTiles<T>& t, const FusedTiles<T>* fused, int64_t item) {
  using V = typename VecOf<T>::type;
  constexpr int W = V::W;
  const Geometry& g = p.g;
  const BlockItem it = decode_block_item(g, p.regions, item);
  const int64_t M = it.t1 - it.t0, b = it.b, h = it.h, R = num_regions(g), N = num_tokens(g);
  if (M <= 0) return;
  const int64_t Dqk = p.Dqk, Dv = p.Dv, Dqkp = round_up(Dqk, W), Dvp = round_up(Dv, W);

  region_tokens(it.reg, it.t0, M, t.coords);
  for (int64_t i = 0; i < M; ++i) t.tok[i] = flat_token(g, t.coords + 3 * i);
  prefetch_tokens<S>(p.k, b, h, t.coords, M, Dqk);
  prefetch_tokens<S>(p.v, b, h, t.coords, M, Dv);
  if (!p.stream_out) {
    prefetch_out_rows<S>(g, p.dk, b, h, t.coords, M, Dqk);
    prefetch_out_rows<S>(g, p.dv, b, h, t.coords, M, Dv);
  }
  const int64_t group = p.idx.per_head ? b * g.H + h : b;
  const int64_t* offsets = p.inv_offsets + group * (R + 1) + it.r;
  TokenStream queries = token_stream(p.regions, p.inv_regions + offsets[0], offsets[1] - offsets[0]);
  int64_t* coords = t.query_coords[0];
  int64_t n = stream_fill(queries, kChunkCols, coords);
  auto prefetch_queries = [&](const int64_t* c, int64_t count) {
    prefetch_tokens<S>(p.q, b, h, c, count, Dqk);
    prefetch_tokens<S>(p.dout, b, h, c, count, Dv);
    if (fused) prefetch_tokens<S>(p.out, b, h, c, count, Dv);
  };
  prefetch_queries(coords, n);

  // K rows padded to Dqkp: the A operand of S^T, and the B operand of the fused dQ.
  pack_tokens<S, T>(p.k, b, h, t.coords, M, Dqk, T(1), t.k, Dqkp, nullptr);
  pack_tokens<S, T>(p.v, b, h, t.coords, M, Dv, T(1), t.v, Dv, nullptr);
  zero(t.dk, M * Dqkp);
  zero(t.dv, M * Dvp);

  const S* out = static_cast<const S*>(p.out.data);
  const T* lse = static_cast<const T*>(p.lse);
  const T* dlse = static_cast<const T*>(p.dlse);
  const T* delta = static_cast<const T*>(p.delta);
  S* dq = static_cast<S*>(p.dq);
  for (int c = 0; n > 0; c ^= 1) {
    int64_t* next = t.query_coords[c ^ 1];
    const int64_t n_next = stream_fill(queries, kChunkCols, next);
    prefetch_queries(next, n_next);

    const int64_t npanel = (n + W - 1) / W;
    pack_tokens<S, T>(p.q, b, h, coords, n, Dqk, (T)p.scale, t.q, Dqkp, t.qt);
    pack_tokens<S, T>(p.dout, b, h, coords, n, Dv, T(1), t.dout, Dvp, t.dot);
    for (int64_t j = 0; j < npanel * W; ++j) {
      if (j >= n) {  // padding lanes: finite values, never read back
        t.lse[j] = t.delta[j] = T(0);
        continue;
      }
      const int64_t row = (b * N + flat_token(g, coords + 3 * j)) * g.H + h;
      t.lse[j] = lse[row];
      if (fused) {
        load_row(out + row_offset(p.out, b, coords + 3 * j, h), Dv, fused->out);
        t.delta[j] = dot_row(t.dout + j * Dvp, fused->out, Dv) - (dlse != nullptr ? dlse[row] : T(0));
      } else {
        t.delta[j] = delta[row];
      }
    }
    gemm_nt(M, npanel, Dqk, t.k, Dqkp, t.qt, Dqk * W, t.s, kChunkCols);
    gemm_nt(M, npanel, Dv, t.v, Dv, t.dot, Dv * W, t.dp, kChunkCols);
    for (int64_t i = 0; i < M; ++i) {
      T* s = t.s + i * kChunkCols;
      T* dp = t.dp + i * kChunkCols;
      for (int64_t j = 0; j < npanel * W; j += W) {
        const V prob = vexp(vsub(vload(s + j), vload(t.lse + j)));
        vstore(s + j, prob);
        vstore(dp + j, vmul(prob, vsub(vload(dp + j), vload(t.delta + j))));
      }
    }
    gemm_nn(M, Dvp / W, n, t.s, kChunkCols, t.dout, Dvp, t.dv, Dvp, static_cast<const T*>(nullptr));
    gemm_nn(M, Dqkp / W, n, t.dp, kChunkCols, t.q, Dqkp, t.dk, Dqkp, static_cast<const T*>(nullptr));
    if (fused) {  // dQ = scale * dS K, dS transposed from the dS^T tile
      transpose_tile(t.dp, kChunkCols, M, n, fused->ds, kBlockRows);
      zero(fused->dq, n * Dqkp);
      gemm_nn(n, Dqkp / W, M, fused->ds, kBlockRows, t.k, Dqkp, fused->dq, Dqkp, static_cast<const T*>(nullptr));
      for (int64_t j = 0; j < n; ++j) {
        T* row = fused->dq + j * Dqkp;
        scale_row(row, Dqk, (T)p.scale);
        store_out_row(row, Dqk, dq + ((b * N + flat_token(g, coords + 3 * j)) * g.H + h) * Dqk, p.stream_out);
      }
    }
    coords = next;
    n = n_next;
  }

  S* dk = static_cast<S*>(p.dk);
  S* dv = static_cast<S*>(p.dv);
  for (int64_t i = 0; i < M; ++i) {
    const int64_t row = (b * N + t.tok[i]) * g.H + h;
    store_out_row(t.dk + i * Dqkp, Dqk, dk + row * Dqk, p.stream_out);
    store_out_row(t.dv + i * Dvp, Dv, dv + row * Dv, p.stream_out);
  }
}

template <class S, class T>
void bwd_dq_items_t(const BwdParams& p, int64_t begin, int64_t end, void* scratch) {
  Carver carver{reinterpret_cast<uintptr_t>(scratch), 0};
  const DqTiles<T> t = dq_tiles<T>(p, carver);
  for (int64_t item = begin; item < end; ++item) bwd_dq_item<S, T>(p, t, item);
  stream_fence();
}

template <class S, class T>
void bwd_dkv_items_t(const BwdParams& p, int64_t begin, int64_t end, void* scratch) {
  Carver carver{reinterpret_cast<uintptr_t>(scratch), 0};
  const DkvTiles<T> t = dkv_tiles<T>(p, carver);
  for (int64_t item = begin; item < end; ++item) bwd_dkv_item<S, T>(p, t, nullptr, item);
  stream_fence();
}

template <class S, class T>
void bwd_fused_items_t(const BwdParams& p, int64_t begin, int64_t end, void* scratch) {
  Carver carver{reinterpret_cast<uintptr_t>(scratch), 0};
  const FusedTiles<T> t = fused_tiles<T>(p, carver);
  for (int64_t item = begin; item < end; ++item) bwd_dkv_item<S, T>(p, t.kv, &t, item);
  stream_fence();
}

}  // namespace DYNATTN_ISA_NS
}  // namespace cpu
}  // namespace dynattn
