// Building blocks of the attention kernels: the two register-blocked microkernels, packing of token rows
// into fp32 tiles, and the stream that concatenates the tokens of a list of regions.
//
// Tiles (W = SIMD width in floats):
//   row tile    [rows][ld]        one token per row, ld >= D (padding columns are zero where a kernel reads them)
//   panel tile  [n/W][D][W]       tokens transposed in groups of W, so a vector load gets W tokens' element d
// gemm_nt multiplies a row tile by a panel tile (C = A B^T, vectorised over the panel's tokens);
// gemm_nn multiplies a matrix by a row tile (C += A B, vectorised over B's columns).
#pragma once

#include "common/params.h"
#include "cpu/kernels.h"
#include "cpu/vec.h"

namespace dynattn {
namespace cpu {
namespace DYNATTN_ISA_NS {

// Register blocking. gemm_nt: kNtRows rows x kNtPanels panels of accumulators; gemm_nn: kNnRows rows x
// kNnVecs vectors. Accumulators + operands fit the register file (32 zmm / 16 ymm), >= 8 independent
// accumulators hide the FMA latency, and the shapes were picked by measuring 64x64 tiles with d = 32 and 64
// (AVX-512 8x2 runs at ~90% of FMA peak, 10-15% faster than 4x4 / 6x4).
#if defined(DYNATTN_ISA_AVX512)
constexpr int kNtRows = 8, kNtPanels = 2;  // 16 accumulators + 2 operands + broadcast
constexpr int kNnRows = 8, kNnVecs = 2;    // 16 accumulators; wider rows take several passes
#elif defined(DYNATTN_ISA_AVX2)
constexpr int kNtRows = 4, kNtPanels = 3;  // 12 accumulators + 3 operands + broadcast
constexpr int kNnRows = 6, kNnVecs = 2;    // 12 accumulators + 2 operands + broadcast
#else  // 4-wide portable vectors: 16 registers on baseline x86-64
constexpr int kNtRows = 4, kNtPanels = 2;
constexpr int kNnRows = 4, kNnVecs = 2;
#endif

template <class T>
constexpr int width() {
  return VecOf<T>::type::W;
}

DYNATTN_VINLINE int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// --------------------------------------------------------------------------------------------- gemm_nt
// C[i][p*W + l] = sum_{d<K} A[i*lda + d] * B[p*pstride + d*W + l]   for i < MR, p < NP, l < W.
template <class T, int MR, int NP>
inline void nt_tile(int64_t K, const T* A, int64_t lda, const T* B, int64_t pstride, T* C, int64_t ldc) {
  using V = typename VecOf<T>::type;
  constexpr int W = V::W;
  V acc[MR][NP];
  DYNATTN_UNROLL for (int i = 0; i < MR; ++i) {
    DYNATTN_UNROLL for (int p = 0; p < NP; ++p) acc[i][p] = vset1(T(0));
  }
  for (int64_t d = 0; d < K; ++d) {
    V b[NP];
    DYNATTN_UNROLL for (int p = 0; p < NP; ++p) b[p] = vload(B + p * pstride + d * W);
    DYNATTN_UNROLL for (int i = 0; i < MR; ++i) {
      const V a = vset1(A[i * lda + d]);
      DYNATTN_UNROLL for (int p = 0; p < NP; ++p) acc[i][p] = vfma(a, b[p], acc[i][p]);
    }
  }
  DYNATTN_UNROLL for (int i = 0; i < MR; ++i) {
    DYNATTN_UNROLL for (int p = 0; p < NP; ++p) vstore(C + i * ldc + p * W, acc[i][p]);
  }
}

// Picks the instantiation for a remainder block (mr <= MR rows, np <= NP panels).
template <class T, int MR, int NP>
DYNATTN_VINLINE void nt_dispatch(int64_t mr, int64_t np, int64_t K, const T* A, int64_t lda, const T* B,
                                 int64_t pstride, T* C, int64_t ldc) {
  if constexpr (MR > 1) {
    if (mr < MR) return nt_dispatch<T, MR - 1, NP>(mr, np, K, A, lda, B, pstride, C, ldc);
  }
  if constexpr (NP > 1) {
    if (np < NP) return nt_dispatch<T, MR, NP - 1>(mr, np, K, A, lda, B, pstride, C, ldc);
  }
  nt_tile<T, MR, NP>(K, A, lda, B, pstride, C, ldc);
}

// C[M][npanels*W] = A[M][K] * (panel tile B)^T; B's panels are pstride elements apart.
template <class T>
inline void gemm_nt(int64_t M, int64_t npanels, int64_t K, const T* A, int64_t lda, const T* B, int64_t pstride,
                    T* C, int64_t ldc) {
  constexpr int W = width<T>();
  for (int64_t i = 0; i < M; i += kNtRows) {
    const int64_t mr = smin<int64_t>(kNtRows, M - i);
    for (int64_t p = 0; p < npanels; p += kNtPanels) {
      const int64_t np = smin<int64_t>(kNtPanels, npanels - p);
      nt_dispatch<T, kNtRows, kNtPanels>(mr, np, K, A + i * lda, lda, B + p * pstride, pstride, C + i * ldc + p * W,
                                         ldc);
    }
  }
}

// --------------------------------------------------------------------------------------------- gemm_nn
// C[i][v*W + l] = s_i * C[i][v*W + l] + sum_{j<n} A[i*lda + j] * B[j*ldb + v*W + l]   for i < MR, v < NV,
// with s_i = alpha[i] if kScale else 1 (the online-softmax rescale folded into the accumulator load).
template <class T, int MR, int NV, bool kScale>
inline void nn_tile(int64_t n, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc,
                    const T* alpha) {
  using V = typename VecOf<T>::type;
  constexpr int W = V::W;
  V acc[MR][NV];
  DYNATTN_UNROLL for (int i = 0; i < MR; ++i) {
    DYNATTN_UNROLL for (int v = 0; v < NV; ++v) {
      acc[i][v] = vload(C + i * ldc + v * W);
      if constexpr (kScale) acc[i][v] = vmul(acc[i][v], vset1(alpha[i]));
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    V b[NV];
    DYNATTN_UNROLL for (int v = 0; v < NV; ++v) b[v] = vload(B + j * ldb + v * W);
    DYNATTN_UNROLL for (int i = 0; i < MR; ++i) {
      const V a = vset1(A[i * lda + j]);
      DYNATTN_UNROLL for (int v = 0; v < NV; ++v) acc[i][v] = vfma(a, b[v], acc[i][v]);
    }
  }
  DYNATTN_UNROLL for (int i = 0; i < MR; ++i) {
    DYNATTN_UNROLL for (int v = 0; v < NV; ++v) vstore(C + i * ldc + v * W, acc[i][v]);
  }
}

template <class T, int MR, int NV, bool kScale>
DYNATTN_VINLINE void nn_dispatch(int64_t mr, int64_t nv, int64_t n, const T* A, int64_t lda, const T* B, int64_t ldb,
                                 T* C, int64_t ldc, const T* alpha) {
  if constexpr (MR > 1) {
    if (mr < MR) return nn_dispatch<T, MR - 1, NV, kScale>(mr, nv, n, A, lda, B, ldb, C, ldc, alpha);
  }
  if constexpr (NV > 1) {
    if (nv < NV) return nn_dispatch<T, MR, NV - 1, kScale>(mr, nv, n, A, lda, B, ldb, C, ldc, alpha);
  }
  nn_tile<T, MR, NV, kScale>(n, A, lda, B, ldb, C, ldc, alpha);
}

// C[M][nvec*W] = diag(alpha) C + A[M][n] B[n][nvec*W]  (alpha == nullptr: no rescale).
template <class T>
inline void gemm_nn(int64_t M, int64_t nvec, int64_t n, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                    int64_t ldc, const T* alpha) {
  constexpr int W = width<T>();
  for (int64_t i = 0; i < M; i += kNnRows) {
    const int64_t mr = smin<int64_t>(kNnRows, M - i);
    for (int64_t v = 0; v < nvec; v += kNnVecs) {
      const int64_t nv = smin<int64_t>(kNnVecs, nvec - v);
      T* c = C + i * ldc + v * W;
      if (alpha != nullptr)
        nn_dispatch<T, kNnRows, kNnVecs, true>(mr, nv, n, A + i * lda, lda, B + v * W, ldb, c, ldc, alpha + i);
      else
        nn_dispatch<T, kNnRows, kNnVecs, false>(mr, nv, n, A + i * lda, lda, B + v * W, ldb, c, ldc, nullptr);
    }
  }
}

// --------------------------------------------------------------------------------------------- rows
template <class T>
inline T dot_row(const T* a, const T* b, int64_t n) {
  using V = typename VecOf<T>::type;
  constexpr int W = V::W;
  V acc = vset1(T(0));
  int64_t i = 0;
  for (; i + W <= n; i += W) acc = vfma(vload(a + i), vload(b + i), acc);
  T s = vreduce_add(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

template <class T>
inline void scale_row(T* x, int64_t n, T s) {
  using V = typename VecOf<T>::type;
  constexpr int W = V::W;
  int64_t i = 0;
  for (; i + W <= n; i += W) vstore(x + i, vmul(vload(x + i), vset1(s)));
  for (; i < n; ++i) x[i] *= s;
}

template <class T>
inline void zero(T* x, int64_t n) {
  using V = typename VecOf<T>::type;
  constexpr int W = V::W;
  int64_t i = 0;
  for (; i + W <= n; i += W) vstore(x + i, vset1(T(0)));
  for (; i < n; ++i) x[i] = T(0);
}

// --------------------------------------------------------------------------------------------- items
// Work item = ((b*R + r)*blocks + blk)*H + h: block blk of region r (rows [t0, t1) of its tokens), batch b,
// head h. Heads vary fastest so that one thread's consecutive items read the same token rows: each token's
// heads share cache lines and DRAM pages (+20% on a 128x128 grid over head-major order).
struct BlockItem {
  int64_t b, h, r, t0, t1;
  Region reg;
};

inline BlockItem decode_block_item(const Geometry& g, const Region* regions, int64_t item) {
  const int64_t R = num_regions(g), nblk = blocks_per_region(g);
  BlockItem it;
  it.h = item % g.H;
  const int64_t blk = (item / g.H) % nblk;
  it.r = (item / g.H / nblk) % R;
  it.b = item / g.H / nblk / R;
  it.reg = regions[it.r];
  block_rows(it.reg.count, nblk, blk, &it.t0, &it.t1);
  return it;
}

// --------------------------------------------------------------------------------------------- tokens
// The tokens of a list of regions, concatenated in list order (row-major inside each region), handed out
// in chunks. Used for the routed key regions of a query region (forward, dQ) and for the query regions
// that routed to a key region (dK/dV).
struct TokenStream {
  const Region* table;     // region geometry, indexed by region id
  const int64_t* regions;  // the list
  int64_t count;           // regions in the list
  int64_t pos;             // current region
  int64_t t;               // next token inside it
};

DYNATTN_VINLINE TokenStream token_stream(const Region* table, const int64_t* regions, int64_t count) {
  return TokenStream{table, regions, count, 0, 0};
}

// Writes the grid coordinates of the next (up to) cap tokens to coords[j*3 .. j*3+3); returns how many.
inline int64_t stream_fill(TokenStream& s, int64_t cap, int64_t* coords) {
  int64_t n = 0;
  while (n < cap && s.pos < s.count) {
    const Region& reg = s.table[s.regions[s.pos]];
    const int64_t take = smin(cap - n, reg.count - s.t);
    region_tokens(reg, s.t, take, coords + 3 * n);
    n += take;
    s.t += take;
    if (s.t == reg.count) {
      ++s.pos;
      s.t = 0;
    }
  }
  return n;
}

// Software prefetches. Routed rows are scattered over the grid, which defeats the hardware prefetcher, so the
// kernels ask for the next chunk's rows before computing the current chunk (and for an item's query and output
// rows when it starts). Worth ~5% on large grids; prefetching whole items ahead measured slower.
DYNATTN_VINLINE void prefetch_bytes(const void* p, int64_t bytes, bool write) {
  const char* c = static_cast<const char*>(p);
  for (int64_t off = 0; off < bytes + 63; off += 64) {  // + 63: rows need not start on a cache line
    const char* line = c + (off < bytes ? off : bytes - 1);
#if defined(__GNUC__)
    if (write) __builtin_prefetch(line, 1);
    else __builtin_prefetch(line, 0);
#else
    (void)line;
    (void)write;
#endif
  }
}

// Rows (b, coords[j], h), j < n, of tensor x (first D elements).
template <class S>
inline void prefetch_tokens(const TensorArg& x, int64_t b, int64_t h, const int64_t* coords, int64_t n, int64_t D) {
  const S* base = static_cast<const S*>(x.data);
  for (int64_t j = 0; j < n; ++j) prefetch_bytes(base + row_offset(x, b, coords + 3 * j, h), D * (int64_t)sizeof(S), false);
}

// Rows (b, coords[j], h) of a contiguous (B, N, H, D) output.
template <class S>
inline void prefetch_out_rows(const Geometry& g, void* out, int64_t b, int64_t h, const int64_t* coords, int64_t n,
                              int64_t D) {
  S* base = static_cast<S*>(out);
  for (int64_t j = 0; j < n; ++j)
    prefetch_bytes(base + ((b * num_tokens(g) + flat_token(g, coords + 3 * j)) * g.H + h) * D, D * (int64_t)sizeof(S),
                   true);
}

// panels[(j/W)*D*W + d*W + j%W] = rows[j*ld + d] for j < n, d < D; lanes n..ceil(n/W)*W are zeroed.
template <class T>
inline void rows_to_panels(const T* rows, int64_t ld, int64_t n, int64_t D, T* panels) {
  constexpr int W = width<T>();
  for (int64_t j0 = 0; j0 < n; j0 += W) {
    const T* src = rows + j0 * ld;
    T* panel = panels + (j0 / W) * D * W;
    int64_t d = 0;
    if (j0 + W <= n) {
      for (; d + W <= D; d += W) transpose_block(src + d, ld, panel + d * W);
      for (; d < D; ++d)
        for (int64_t j = 0; j < W; ++j) panel[d * W + j] = src[j * ld + d];
    } else {
      for (; d < D; ++d)
        for (int64_t j = 0; j < W; ++j) panel[d * W + j] = j0 + j < n ? src[j * ld + d] : T(0);
    }
  }
}

// dst[j*ldd + i] = src[i*lds + j] for i < rows, j < cols, both rounded up to W (the padding is copied too, so
// callers must give rows/cols of that many readable elements; values in it are never used downstream).
template <class T>
inline void transpose_tile(const T* src, int64_t lds, int64_t rows, int64_t cols, T* dst, int64_t ldd) {
  using V = typename VecOf<T>::type;
  constexpr int W = V::W;
  alignas(64) T block[W * W];
  for (int64_t i0 = 0; i0 < rows; i0 += W)
    for (int64_t j0 = 0; j0 < cols; j0 += W) {
      transpose_block(src + i0 * lds + j0, lds, block);
      for (int64_t c = 0; c < W; ++c) vstore(dst + (j0 + c) * ldd + i0, vload(block + c * W));
    }
}

// Loads rows (b, coords[j], h), j < n, of tensor x (first D elements, converted to T and multiplied by
// `scale`) into the row tile rows[n][ldr] (columns D..ldr zeroed), and, if panels is not null, also into the
// panel tile panels[ceil(n/W)][D][W].
template <class S, class T>
inline void pack_tokens(const TensorArg& x, int64_t b, int64_t h, const int64_t* coords, int64_t n, int64_t D,
                        T scale, T* rows, int64_t ldr, T* panels) {
  const S* base = static_cast<const S*>(x.data);
  for (int64_t j = 0; j < n; ++j) {
    T* row = rows + j * ldr;
    load_row(base + row_offset(x, b, coords + 3 * j, h), D, row);
    if (scale != T(1)) scale_row(row, D, scale);
    zero(row + D, ldr - D);
  }
  if (panels != nullptr) rows_to_panels(rows, ldr, n, D, panels);
}

// --------------------------------------------------------------------------------------------- scratch
// Carves 64-byte aligned buffers out of a thread's scratch block. With base == 0 it only measures.
struct Carver {
  uintptr_t base;
  size_t used;
  template <class U>
  U* take(int64_t n) {
    used = (used + 63) & ~(size_t)63;
    U* p = reinterpret_cast<U*>(base + used);
    used += (size_t)n * sizeof(U);
    return p;
  }
};

}  // namespace DYNATTN_ISA_NS
}  // namespace cpu
}  // namespace dynattn
