"""Fused routed attention, forward: flash-style online softmax over the routed key regions.

One program computes one tile of BLOCK_M query slots for one (batch, head). Query slots are the padded
region-major sequence of ``_common``: a tile is part of one region (regions larger than BLOCK_M) or
``PACK = BLOCK_M // MP`` whole regions (tiny regions, e.g. BiFormer's 2x2 stage-3 regions; a tl.dot
needs at least 16 rows, so packing fills the tile with real queries instead of padding).

The program then walks its query region's key list, the ``TOPK * MP`` padded key slots of regions
``idx[b, (h), r, :]``, ``NB = BLOCK_N // PACK`` slots at a time. K and V rows are loaded in place
through the routing index: each key column computes its region from ``idx`` and its grid coordinates
from the region geometry, so the gathered K/V and the score matrix never exist in memory. With packed
query regions, column block ``p`` of the key tile belongs to query region ``p`` of the tile (each region
has its own routed keys), and the block-diagonal mask keeps the regions apart. The wasted products of
packing (a fraction ``1 - 1/PACK``) equal those of padding a lone tiny region to 16 rows, but a packed
tile needs PACK times fewer programs and loads its queries once.

Numerics: logits in the log2 domain (``qk_scale = scale * log2(e)``), fp32 running max / sum / output,
P cast to V's dtype for the second product (as in FlashAttention), fp32 dots with
``input_precision="ieee"``. Rows whose keys are all masked in a step keep a finite reference max, so
no ``inf - inf`` ever occurs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET,
    LOG2E,
    dot_precision,
    geometry,
    grid_strides,
    head_block,
    next_pow2,
    region_token,
    token_offset,
    upcast,
)


@triton.jit
def _fwd_kernel(
    Q, K, V, IDX, OUT, LSE,
    # element strides (batch, d0, d1, d2, head); the head dim is contiguous
    sq_b, sq_0, sq_1, sq_2, sq_h,
    sk_b, sk_0, sk_1, sk_2, sk_h,
    sv_b, sv_0, sv_1, sv_2, sv_h,
    so_b, so_0, so_1, so_2, so_h,
    sl_b, sl_0, sl_1, sl_2, sl_h,
    si_b, si_h, si_r,  # idx strides: batch, head (0 for shared routing), query region; topk is contiguous
    # geometry
    L0, L1, L2, S0, S1, S2,
    DQK, DV, TOPK, qk_scale,
    MP: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    PACK: tl.constexpr = (BLOCK_M + MP - 1) // MP  # query regions per tile (1 when a region spans tiles)
    NB: tl.constexpr = BLOCK_N // PACK  # key slots per packed query region per step
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    R = S0 * S1 * S2

    # ---- query rows: slot g of the padded region-major sequence -> region rq, token tq
    offs_m = tl.arange(0, BLOCK_M)
    g = pid_m * BLOCK_M + offs_m
    rq = g // MP
    tq = g % MP
    x0, x1, x2, q_valid = region_token(rq, tq, L0, L1, L2, S0, S1, S2)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ptrs = Q + b * sq_b + h * sq_h + token_offset(x0, x1, x2, sq_0, sq_1, sq_2)
    q = tl.load(q_ptrs[:, None] + offs_dqk[None, :], mask=q_valid[:, None] & (offs_dqk < DQK)[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    # ---- key columns: column c serves packed query region c // NB, at key slot n0 + c % NB
    offs_n = tl.arange(0, BLOCK_N)
    rq_n = (pid_m * BLOCK_M) // MP + offs_n // NB  # the query region whose keys column c holds
    rq_n_ok = rq_n < R
    idx_row = IDX + b * si_b + h * si_h + rq_n.to(tl.int64) * si_r
    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h
    if PACK > 1:
        same_region = (offs_m // MP)[:, None] == (offs_n // NB)[None, :]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for n0 in range(0, TOPK * MP, NB):
        nk = n0 + offs_n % NB
        j = nk // MP  # which routed region
        tk = nk % MP  # which token of it
        col_ok = rq_n_ok & (j < TOPK)
        rk = tl.load(idx_row + j, mask=col_ok, other=0).to(tl.int32)
        y0, y1, y2, k_valid = region_token(rk, tk, L0, L1, L2, S0, S1, S2)
        k_valid = k_valid & col_ok
        k = tl.load(
            (k_base + token_offset(y0, y1, y2, sk_0, sk_1, sk_2))[:, None] + offs_dqk[None, :],
            mask=k_valid[:, None] & (offs_dqk < DQK)[None, :],
            other=0.0,
        )
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        mask = k_valid[None, :]
        if PACK > 1:
            mask = mask & same_region
        s = tl.where(mask, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet: avoid -inf - -inf
        alpha = tl.math.exp2(m_i - m_ref)
        p = tl.math.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            (v_base + token_offset(y0, y1, y2, sv_0, sv_1, sv_2))[:, None] + offs_dv[None, :],
            mask=k_valid[:, None] & (offs_dv < DV)[None, :],
            other=0.0,
        )
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    # every valid query has >= 1 key (each routed region is non-empty); l_i == 0 only on masked rows
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = (m_i + tl.math.log2(l_safe)) * 0.6931471805599453  # natural log
    o_ptrs = OUT + b * so_b + h * so_h + token_offset(x0, x1, x2, so_0, so_1, so_2)
    tl.store(o_ptrs[:, None] + offs_dv[None, :], out.to(OUT.dtype.element_ty),
             mask=q_valid[:, None] & (offs_dv < DV)[None, :])
    tl.store(LSE + b * sl_b + h * sl_h + token_offset(x0, x1, x2, sl_0, sl_1, sl_2), lse, mask=q_valid)


# --------------------------------------------------------------------------------------------------
# launch configuration
# --------------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages), all valid on Ampere (sm80/86/89) and Hopper (sm90):
# <= 8 warps, shared memory for 2-3 K/V stages of BLOCK_N x 256 x 2 B stays under ~100 KB after pruning.
_CONFIGS = [
    (16, 32, 4, 2), (16, 64, 4, 2), (16, 128, 4, 2),
    (32, 32, 4, 2), (32, 64, 4, 2), (32, 64, 4, 3),
    (64, 32, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 8, 2),
    (128, 32, 8, 2), (128, 64, 8, 2), (128, 64, 8, 3),
]


def keep_config(bm: int, bn: int, stages: int, mp: int, topk: int, block_d: int) -> bool:
    """Shared pruning rule for tiles of ``bm`` "own" slots (queries in fwd/dQ, keys in dK/dV) against
    ``bn`` "other" slots streamed ``topk * mp`` (or more) at a time."""
    if bm > max(16, mp):  # packing past 16 rows only multiplies the block-diagonal waste
        return False
    pack = max(1, bm // mp)
    if bn < pack or bn // pack > max(16, next_pow2(topk * mp)):  # steps mostly past the key list
        return False
    if block_d >= 256 and (bm > 64 or bn > 32 or stages > 2):  # registers / shared memory
        return False
    if block_d >= 128 and bn > 64:
        return False
    return True


def _prune(configs, named_args, **kwargs):
    a = {**named_args, **kwargs}
    block_d = max(a["BLOCK_DQK"], a["BLOCK_DV"])
    kept = [c for c in configs if keep_config(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages,
                                              a["MP"], a["TOPK"], block_d)]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def interpreter_config(mp: int, topk: int) -> dict:
    """Fixed tile sizes for the CPU interpreter: big enough that few programs run (the interpreter's
    cost is per program and per op), small enough to keep numpy temporaries tiny."""
    bm = min(64, max(16, mp))
    pack = max(1, bm // mp)
    bn = pack * min(64, max(16, next_pow2(topk * mp)))
    return {"BLOCK_M": bm, "BLOCK_N": min(bn, 128)}


_fwd_autotuned = None


def _kernel_and_config(config):
    """(kernel, launch kwargs). The autotuned wrapper is built on first use (nothing runs at import)."""
    global _fwd_autotuned
    if config is not None:
        return _fwd_kernel, config
    if _fwd_autotuned is None:
        _fwd_autotuned = triton.autotune(
            configs=[triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                     for bm, bn, w, s in _CONFIGS],
            key=["MP", "BLOCK_DQK", "BLOCK_DV", "TOPK"],
            prune_configs_by={"early_config_prune": _prune},
        )(_fwd_kernel)
    return _fwd_autotuned, {}


def fwd(q, k, v, idx, num_regions, scale, *, _config=None):
    """out ``(B, *spatial, H, Dv)`` in q's dtype (contiguous) and lse float32 ``(B, *spatial, H)``.

    ``_config`` (tests only) forces ``{"BLOCK_M": .., "BLOCK_N": ..}`` instead of autotuning.
    """
    B, H, dqk, dv = q.shape[0], q.shape[-2], q.shape[-1], v.shape[-1]
    nsp = q.dim() - 3
    geo = geometry(q.shape, num_regions)
    topk = idx.shape[-1]
    out = torch.empty((*q.shape[:-1], dv), dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    lse_st = grid_strides(lse.unsqueeze(-1), nsp)
    if idx.dim() == 4:
        si_b, si_h, si_r = idx.stride(0), idx.stride(1), idx.stride(2)
    else:
        si_b, si_h, si_r = idx.stride(0), 0, idx.stride(1)
    if _config is None and INTERPRET:
        _config = interpreter_config(geo.MP, topk)
    kernel, cfg = _kernel_and_config(_config)

    def grid(meta):
        return (triton.cdiv(geo.R * geo.MP, meta["BLOCK_M"]), H, B)

    kernel[grid](
        q, k, v, idx, out, lse,
        *grid_strides(q, nsp), *grid_strides(k, nsp), *grid_strides(v, nsp), *grid_strides(out, nsp), *lse_st,
        si_b, si_h, si_r,
        *geo.L, *geo.S,
        dqk, dv, topk, float(scale) * LOG2E,
        MP=geo.MP, BLOCK_DQK=head_block(dqk), BLOCK_DV=head_block(dv),
        UPCAST=upcast(q.dtype), DOT_PREC=dot_precision(q.dtype),
        **cfg,
    )
    return out, lse
