"""Shared pieces of the Triton kernels: region geometry (device side) and launch parameters (host side).

Every kernel sees its tensors as ``(B, L0, L1, L2, H, D)`` with five element strides
``(batch, d0, d1, d2, head)``: a 1-D or 2-D grid is padded with extents of 1 (stride 0), so one kernel
covers 1-D, 2-D and 3-D. Region ``r`` (row-major over ``(S0, S1, S2)``) spans, per dim,
``[floor(i*L/S), floor((i+1)*L/S))``; a token inside a region is numbered row-major over the region's own
extents, so token ``t`` of region ``r`` is found with a few integer divisions instead of a lookup table,
and regions of different sizes (non-divisible extents) need no padding in memory, only a mask.

Tiles: every region is padded to ``MP`` token slots, the next power of two at least as large as the
largest region. A kernel walks a virtual "padded region-major" sequence of ``R * MP`` slots, so a tile
of ``BLOCK`` slots holds either a part of one region (``BLOCK < MP``) or ``BLOCK // MP`` whole regions
(``BLOCK >= MP``, the packing used for tiny regions); the same code handles both.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple, Tuple

import torch
import triton
import triton.language as tl

# The interpreter runs kernels on CPU tensors with numpy. Two consequences: autotuning is pointless
# there (one fixed config per kernel), and numpy has no bfloat16, so tl.dot on bf16 operands returns
# garbage (triton-lang/triton#11584). Kernels upcast bf16 tiles to fp32 right after loading when
# UPCAST is set, so the interpreter exercises exactly the GPU code paths.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


# --------------------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------------------


@triton.jit
def region_box(r, L0, L1, L2, S0, S1, S2):
    """Start and size, per dim, of region ``r`` (any int tensor; row-major over (S0, S1, S2))."""
    r0 = r // (S1 * S2)
    r1 = (r // S2) % S1
    r2 = r % S2
    a0 = r0 * L0 // S0
    a1 = r1 * L1 // S1
    a2 = r2 * L2 // S2
    n0 = (r0 + 1) * L0 // S0 - a0
    n1 = (r1 + 1) * L1 // S1 - a1
    n2 = (r2 + 1) * L2 // S2 - a2
    return a0, a1, a2, n0, n1, n2


@triton.jit
def region_token(r, t, L0, L1, L2, S0, S1, S2):
    """Grid coordinates of token ``t`` of region ``r`` and whether that token exists.

    ``t`` runs over the padded slots ``[0, MP)``; slots past the region's size, and regions ``r >= R``
    (tail of the last tile), are reported invalid. Region sizes are never 0 (L >= S), so the divisions
    are safe even on masked lanes.
    """
    a0, a1, a2, n0, n1, n2 = region_box(r, L0, L1, L2, S0, S1, S2)
    x2 = t % n2
    x1 = (t // n2) % n1
    x0 = t // (n1 * n2)
    valid = (r < S0 * S1 * S2) & (t < n0 * n1 * n2)
    return a0 + x0, a1 + x1, a2 + x2, valid


@triton.jit
def token_offset(x0, x1, x2, s0, s1, s2):
    """Element offset of grid point (x0, x1, x2), in int64 (large batches overflow int32)."""
    return x0.to(tl.int64) * s0 + x1.to(tl.int64) * s1 + x2.to(tl.int64) * s2


# --------------------------------------------------------------------------------------------------
# host helpers
# --------------------------------------------------------------------------------------------------


class Geometry(NamedTuple):
    L: Tuple[int, int, int]  # extents, padded with 1s to three dims
    S: Tuple[int, int, int]  # regions per dim, padded with 1s
    R: int  # number of regions
    MP: int  # padded region size: next power of two >= the largest region's token count


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def geometry(shape, num_regions) -> Geometry:
    """Geometry of a ``(B, *spatial, H, D)`` tensor cut into ``num_regions`` (one int per spatial dim)."""
    spatial = tuple(int(s) for s in shape[1:-2])
    regions = tuple(int(s) for s in num_regions)
    pad = 3 - len(spatial)
    L = spatial + (1,) * pad
    S = regions + (1,) * pad
    largest = math.prod(-(-length // s) for length, s in zip(L, S))  # region sizes are floor or ceil(L/S)
    return Geometry(L, S, math.prod(S), next_pow2(largest))


def grid_strides(t: torch.Tensor, n_spatial: int) -> Tuple[int, int, int, int, int]:
    """(batch, d0, d1, d2, head) element strides of a tensor whose dims are (B, *spatial[n_spatial], H, ...)."""
    st = t.stride()
    spatial = list(st[1:1 + n_spatial]) + [0] * (3 - n_spatial)
    return (st[0], spatial[0], spatial[1], spatial[2], st[1 + n_spatial])


def head_block(d: int) -> int:
    """Head-dim tile: a power of two >= d, at least 16 (the K dimension of a 16-bit tl.dot)."""
    return max(16, next_pow2(d))


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs use exact fp32 products ("ieee"): TF32 would cost ~1e-3 relative error and break
    # the ~1e-5 agreement with the float32 reference. 16-bit inputs ignore the setting.
    return "ieee"


def upcast(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype == torch.bfloat16
