// Region geometry (DESIGN.md "The operation"): how a grid of up to 3 spatial dims is cut into regions.
//
// Region i of an extent L cut into S regions spans [floor(i*L/S), floor((i+1)*L/S)), so sizes differ by at most
// one token and no padding token exists. Regions are numbered row-major over the spatial dims, and the tokens
// of a region are enumerated row-major too. Unused spatial dims have L = S = 1.
#pragma once

#include <stdint.h>

#include "common/macros.h"

namespace dynattn {

struct Geometry {
  int64_t B;     // batch
  int64_t L[3];  // spatial extents
  int64_t S[3];  // regions per spatial dim (1 <= S[d] <= L[d])
  int64_t H;     // heads
};

// One region: its box on the grid.
struct Region {
  int64_t lo[3];
  int64_t len[3];
  int64_t count;  // len[0] * len[1] * len[2]
};

DYNATTN_FN int64_t num_regions(const Geometry& g) { return g.S[0] * g.S[1] * g.S[2]; }
DYNATTN_FN int64_t num_tokens(const Geometry& g) { return g.L[0] * g.L[1] * g.L[2]; }

DYNATTN_FN int64_t span_begin(int64_t L, int64_t S, int64_t i) { return i * L / S; }

DYNATTN_FN Region region_of(const Geometry& g, int64_t r) {
  Region reg;
  int64_t rest = r;
  for (int d = 2; d >= 0; --d) {
    const int64_t i = rest % g.S[d];
    rest /= g.S[d];
    reg.lo[d] = span_begin(g.L[d], g.S[d], i);
    reg.len[d] = span_begin(g.L[d], g.S[d], i + 1) - reg.lo[d];
  }
  reg.count = reg.len[0] * reg.len[1] * reg.len[2];
  return reg;
}

// Largest token count over all regions: each dim's span is at most ceil(L/S).
DYNATTN_FN int64_t max_region_tokens(const Geometry& g) {
  int64_t m = 1;
  for (int d = 0; d < 3; ++d) m *= (g.L[d] + g.S[d] - 1) / g.S[d];
  return m;
}

// Grid coordinates of the t-th token (row-major) of a region.
DYNATTN_FN void region_token(const Region& reg, int64_t t, int64_t c[3]) {
  c[2] = reg.lo[2] + t % reg.len[2];
  t /= reg.len[2];
  c[1] = reg.lo[1] + t % reg.len[1];
  c[0] = reg.lo[0] + t / reg.len[1];
}

// Coordinates of tokens t0 .. t0+n-1 of a region into coords[3*i .. 3*i+3): divisions only to locate t0 > 0,
// then an odometer (kernels call this per chunk, and divisions are ~20x dearer than adds).
DYNATTN_FN void region_tokens(const Region& reg, int64_t t0, int64_t n, int64_t* coords) {
  if (n <= 0) return;
  int64_t c[3] = {reg.lo[0], reg.lo[1], reg.lo[2]};
  if (t0 > 0) region_token(reg, t0, c);
  const int64_t end1 = reg.lo[1] + reg.len[1], end2 = reg.lo[2] + reg.len[2];
  for (int64_t i = 0; i < n; ++i) {
    coords[3 * i] = c[0];
    coords[3 * i + 1] = c[1];
    coords[3 * i + 2] = c[2];
    if (++c[2] == end2) {
      c[2] = reg.lo[2];
      if (++c[1] == end1) {
        c[1] = reg.lo[1];
        ++c[0];
      }
    }
  }
}

// Row-major flat index of a grid position (the token order of contiguous outputs).
DYNATTN_FN int64_t flat_token(const Geometry& g, const int64_t c[3]) { return (c[0] * g.L[1] + c[1]) * g.L[2] + c[2]; }

}  // namespace dynattn
