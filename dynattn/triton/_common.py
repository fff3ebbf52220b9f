"""Shared pieces of the Triton kernels: region geometry and launch parameters.

Regions. Region ``r`` (row-major over ``(S0, S1, S2)``; 1-D and 2-D grids are padded with extents of 1)
spans, per dim, ``[floor(i*L/S), floor((i+1)*L/S))``, and its tokens are numbered row-major inside it.
Every region is padded to ``MP`` token slots, the next power of two >= the largest region's size, so a
kernel walks a virtual "padded region-major" sequence of ``R * MP`` slots: a tile of ``BLOCK`` slots holds
part of one region (``BLOCK < MP``) or ``BLOCK // MP`` whole regions (``BLOCK >= MP``, the packing used
for tiny regions), with the same code for both.

Slot table. ``slot_table`` maps slot ``r * MP + t`` to the row-major grid index of that token (-1 for
the padding past a smaller region). The kernels look token addresses up in it instead of deriving grid
coordinates from the floor formula in the inner loop: the formula costs ~12 integer divisions per key
column per step (runtime divisors: region sizes vary), and in SASS compiled for sm90 (bf16, 64x64 tiles,
d=64) that was ~2,700 instructions per loop iteration, 80% integer, against ~480 with the table lookup,
which is one L1/L2-resident int32 load per column (the table holds ``R * MP`` entries, e.g. 16 KB for a
64x64 grid). The table depends only on the geometry, so it is built once per (L, S, device) by a tiny
kernel and cached (rebuilt, not cached, while a CUDA graph is being captured).

Token strides. With a grid index ``n``, a token's address is ``base + n * s_tok``; that holds when the
spatial dims of a tensor "collapse" (``s0 = L1*s1``, ``s1 = L2*s2``), as for contiguous tensors and for
q/k/v views of a fused qkv projection. ``token_strides`` returns ``(s_batch, s_tok, s_head)``; the rare
tensor whose spatial dims don't collapse (e.g. a spatially sliced view) is copied first (``collapse``).
"""

from __future__ import annotations

import math
import os
from typing import Dict, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

# The interpreter runs kernels on CPU tensors with numpy. Two consequences: autotuning is pointless
# there (one fixed config per kernel), and numpy has no bfloat16, so tl.dot on bf16 operands returns
# garbage (triton-lang/triton#11584). Kernels upcast bf16 tiles to fp32 right after loading when
# UPCAST is set, so the interpreter exercises exactly the GPU code paths.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

LOG2E = 1.4426950408889634  # kernels take scale * LOG2E and work with exp2


# --------------------------------------------------------------------------------------------------
# device helpers
# --------------------------------------------------------------------------------------------------


@triton.jit
def region_token(r, t, L0, L1, L2, S0, S1, S2):
    """Grid coordinates of token ``t`` (a padded slot in ``[0, MP)``) of region ``r``, and whether it
    exists. Region sizes are never 0 (L >= S), so the divisions are safe on masked lanes too."""
    r0 = r // (S1 * S2)
    r1 = (r // S2) % S1
    r2 = r % S2
    a0 = r0 * L0 // S0
    a1 = r1 * L1 // S1
    a2 = r2 * L2 // S2
    n0 = (r0 + 1) * L0 // S0 - a0
    n1 = (r1 + 1) * L1 // S1 - a1
    n2 = (r2 + 1) * L2 // S2 - a2
    x2 = t % n2
    x1 = (t // n2) % n1
    x0 = t // (n1 * n2)
    valid = (r < S0 * S1 * S2) & (t < n0 * n1 * n2)
    return a0 + x0, a1 + x1, a2 + x2, valid


@triton.jit
def _slot_table_kernel(TAB, L0, L1, L2, S0, S1, S2, total, MP: tl.constexpr, BLOCK: tl.constexpr):
    g = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x0, x1, x2, valid = region_token(g // MP, g % MP, L0, L1, L2, S0, S1, S2)
    tl.store(TAB + g, tl.where(valid, (x0 * L1 + x1) * L2 + x2, -1), mask=g < total)


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


def token_strides(t: torch.Tensor, n_spatial: int) -> Optional[Tuple[int, int, int]]:
    """``(s_batch, s_tok, s_head)`` of a ``(B, *spatial, H[, D])`` tensor whose spatial dims collapse into
    one token dim of stride ``s_tok`` (size-1 dims may have any stride); None if they don't."""
    shape, st = t.shape[1:1 + n_spatial], t.stride()[1:1 + n_spatial]
    dims = [(n, s) for n, s in zip(shape, st) if n > 1]
    s_tok = dims[-1][1] if dims else 0
    expected = s_tok
    for n, s in reversed(dims):
        if s != expected:
            return None
        expected *= n
    return t.stride(0), s_tok, t.stride(1 + n_spatial)


def collapse(t: torch.Tensor, n_spatial: int) -> torch.Tensor:
    """``t`` itself when its spatial dims collapse (see token_strides), else a contiguous copy."""
    return t if token_strides(t, n_spatial) is not None else t.contiguous()


_TABLES: Dict[tuple, torch.Tensor] = {}


def slot_table(geo: Geometry, device: torch.device) -> torch.Tensor:
    """int32 ``(R * MP,)``: grid index of token ``t`` of region ``r`` at ``r * MP + t``, or -1."""
    key = (geo.L, geo.S, geo.MP, str(device))
    tab = _TABLES.get(key)
    if tab is not None:
        return tab
    total = geo.R * geo.MP
    tab = torch.empty(total, dtype=torch.int32, device=device)
    _slot_table_kernel[(triton.cdiv(total, 1024),)](tab, *geo.L, *geo.S, total, MP=geo.MP, BLOCK=1024)
    # while capturing a CUDA graph the build kernel only runs at replay: caching it would hand eager
    # callers an unwritten table
    if not (tab.is_cuda and torch.cuda.is_current_stream_capturing()):
        _TABLES[key] = tab
    return tab


def head_block(d: int) -> int:
    """Head-dim tile: a power of two >= d, at least 16 (the K dimension of a 16-bit tl.dot)."""
    return max(16, next_pow2(d))


def dot_precision(dtype: torch.dtype):
    """``input_precision`` of every tl.dot: exact fp32 products ("ieee") for fp32 inputs, the default
    (None) for 16-bit inputs, where the setting does not apply.

    TF32 would cost ~1e-3 relative error and break the ~1e-5 agreement with the float32 reference that
    the tests demand; "ieee" makes Triton use FMA instead of tensor cores for fp32, so fp32 is exact but
    several times slower than bf16 (train in bf16; "tf32x3" is the candidate to measure if fp32 speed
    ever matters: near-fp32 accuracy on tensor cores, NVIDIA only).
    """
    return "ieee" if dtype == torch.float32 else None


def upcast(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------------
# launch configurations
# --------------------------------------------------------------------------------------------------

# (own, streamed, num_warps, num_stages). "own" is the tile of rows a program keeps (queries in the forward
# and dQ kernels: BLOCK_M; keys in the dK/dV kernel: BLOCK_N), "streamed" the slots its loop walks per step.
# All are valid on Ampere (sm80/86/89) and Hopper (sm90): 4 or 8 warps; a config whose shared memory
# exceeds a device's limit (e.g. 99 KB on sm86/89) fails to launch and the autotuner skips it.
CONFIGS = [
    (16, 16, 4, 2), (16, 32, 4, 2), (16, 64, 4, 2), (16, 128, 4, 2),
    (32, 32, 4, 2), (32, 64, 4, 2), (32, 64, 4, 3),
    (64, 32, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 8, 2),
    (128, 32, 8, 2), (128, 64, 8, 2), (128, 64, 8, 3),
]

# Register budgets per kernel: (max own*D, max streamed*D, max own*streamed) with D the larger padded head
# dim, for 16-bit inputs. Read off ptxas reports of every config cross-compiled for sm80 and sm90 (Triton
# 3.9, d = 32..256): beyond these the kernels spill (dK/dV keeps two fp32 accumulators, hence the
# tighter limits, and at D >= 128 its own*streamed product must stay <= 1024).
_BUDGET = {"fwd": (16384, 8192, 8192), "dq": (8192, 8192, 4096), "dkv": (4096, 8192, 4096)}
# fp32 inputs take Triton's FMA path ("ieee" dots), which holds whole operand tiles in registers: at
# D >= 128 only the fallback 16x16 tile fits.
_BUDGET_FP32 = {"fwd": (2048, 2048, 1024), "dq": (1024, 2048, 512), "dkv": (1024, 2048, 512)}


def keep_config(kernel: str, own: int, other: int, stages: int, mp: int, topk: int, block_d: int,
                fp32: bool = False) -> bool:
    """Whether the autotuner should try config (own, other, stages) of ``kernel`` ("fwd", "dq", "dkv")."""
    if own > max(16, mp):  # packing past 16 rows only multiplies the block-diagonal waste
        return False
    pack = max(1, own // mp)
    if other < pack or other // pack > max(16, next_pow2(topk * mp)):  # steps mostly past the slot list
        return False
    max_own, max_other, max_prod = (_BUDGET_FP32 if fp32 else _BUDGET)[kernel]
    if kernel == "dkv" and not fp32 and block_d >= 128:
        max_prod = 1024
    if fp32 and stages > 2:
        return False
    return own * block_d <= max_own and other * block_d <= max_other and own * other <= max_prod


def autotuned(kernel_fn, kind: str):
    """``triton.autotune`` over CONFIGS for ``kind`` ("fwd", "dq": own = BLOCK_M; "dkv": own = BLOCK_N),
    keyed on the padded region size, head dims and topk (and, implicitly, the tensors' dtypes)."""
    swap = kind == "dkv"

    def config(own, other, warps, stages):
        meta = {"BLOCK_M": other, "BLOCK_N": own} if swap else {"BLOCK_M": own, "BLOCK_N": other}
        return triton.Config(meta, num_warps=warps, num_stages=stages)

    def prune(configs, named_args, **kwargs):
        a = {**named_args, **kwargs}
        block_d = max(a["BLOCK_DQK"], a["BLOCK_DV"])
        fp32 = a["Q"].dtype == torch.float32

        def own_other(c):
            m, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            return (n, m) if swap else (m, n)

        kept = [c for c in configs if keep_config(kind, *own_other(c), c.num_stages, a["MP"], a["TOPK"], block_d, fp32)]
        # never empty: the smallest tile (16x16) runs everywhere without spilling, fp32 at D = 256 included
        return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]

    return triton.autotune(
        configs=[config(*c) for c in CONFIGS],
        key=["MP", "BLOCK_DQK", "BLOCK_DV", "TOPK"],
        prune_configs_by={"early_config_prune": prune},
    )(kernel_fn)


def interpreter_config(mp: int, topk: int) -> dict:
    """Fixed tiles for the CPU interpreter (forward / dQ meaning of BLOCK_M and BLOCK_N): big enough that
    few programs run (the interpreter's cost is per program and per op), small enough for tiny numpy
    temporaries."""
    bm = min(64, max(16, mp))
    pack = max(1, bm // mp)
    bn = pack * min(64, max(16, next_pow2(topk * mp)))
    return {"BLOCK_M": bm, "BLOCK_N": min(bn, 128)}
