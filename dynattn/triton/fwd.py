"""Fused routed attention, forward: flash-style online softmax over the routed key regions.

Grid ``(query tiles, H, B)``. One program computes a tile of BLOCK_M query slots of one (batch, head).
Query slots are the padded region-major sequence of ``_common``: a tile is part of one region (regions
larger than BLOCK_M) or ``PACK = BLOCK_M // MP`` whole regions (tiny regions, e.g. BiFormer's 2x2 stage-3
regions: tensor-core dots work on >= 16 rows, so packing fills the tile with real queries, not padding).

The program then walks its query region's key list, the ``TOPK * MP`` padded key slots of the regions
``idx[b, (h), r, :]``, ``NB = BLOCK_N // PACK`` slots per step. K and V rows are read in place: a key
column reads its region from ``idx`` and its token from the slot table, so gathered K/V and the score
matrix never exist in memory. With packed query regions, column block ``p`` of the key tile belongs to
query region ``p`` of the tile (each region has its own routed keys) and a block-diagonal mask keeps
them apart. The products wasted by packing (a fraction ``1 - 1/PACK``) equal those of padding one tiny
region to 16 rows, but a packed tile needs PACK times fewer programs and loads its queries once; the
autotuner therefore never packs beyond 16 rows (``_common.keep_config``).

Numerics: logits in the log2 domain (``qk_scale = scale * log2(e)``), fp32 running max / sum / output,
P cast to V's dtype for the second product (as FlashAttention), fp32 inputs multiplied exactly
(``input_precision="ieee"``, see ``_common.dot_precision``). A row whose keys are all masked in a step
keeps a finite reference max, so ``inf - inf`` never occurs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    INTERPRET,
    LOG2E,
    autotuned,
    collapse,
    dot_precision,
    geometry,
    head_block,
    interpreter_config,
    slot_table,
    token_strides,
    upcast,
)


@triton.jit
def _fwd_kernel(
    Q, K, V, IDX, TAB, OUT, LSE,
    # element strides (batch, token, head) of q, k, v, out, lse; the head dim is contiguous
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, so_b, so_t, so_h, sl_b, sl_t, sl_h,
    si_b, si_h, si_r,  # idx strides: batch, head (0 for shared routing), query region; topk is contiguous
    R, DQK, DV, TOPK, qk_scale,
    MP: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    PACK: tl.constexpr = (BLOCK_M + MP - 1) // MP  # query regions per tile (1 when a region spans tiles)
    NB: tl.constexpr = BLOCK_N // PACK  # key slots per packed query region per step
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)

    # ---- query rows: slot g of the padded region-major sequence -> grid index (or -1: padding)
    offs_m = tl.arange(0, BLOCK_M)
    g = pid_m * BLOCK_M + offs_m
    qtok = tl.load(TAB + g, mask=g < R * MP, other=-1)
    q_valid = qtok >= 0
    qtok = qtok.to(tl.int64)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load((Q + b * sq_b + h * sq_h + qtok * sq_t)[:, None] + offs_dqk[None, :],
                mask=q_valid[:, None] & (offs_dqk < DQK)[None, :], other=0.0)
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
        col_ok = rq_n_ok & (j < TOPK)
        rk = tl.load(idx_row + j, mask=col_ok, other=0)
        ktok = tl.load(TAB + rk * MP + nk % MP, mask=col_ok, other=-1)
        k_valid = ktok >= 0
        ktok = ktok.to(tl.int64)
        k = tl.load((k_base + ktok * sk_t)[:, None] + offs_dqk[None, :],
                    mask=k_valid[:, None] & (offs_dqk < DQK)[None, :], other=0.0)
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
        v = tl.load((v_base + ktok * sv_t)[:, None] + offs_dv[None, :],
                    mask=k_valid[:, None] & (offs_dv < DV)[None, :], other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    # every valid query has >= 1 key (each routed region is non-empty); l_i == 0 only on masked rows
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = (m_i + tl.math.log2(l_safe)) * 0.6931471805599453  # natural log
    tl.store((OUT + b * so_b + h * so_h + qtok * so_t)[:, None] + offs_dv[None, :], out.to(OUT.dtype.element_ty),
             mask=q_valid[:, None] & (offs_dv < DV)[None, :])
    tl.store(LSE + b * sl_b + h * sl_h + qtok * sl_t, lse, mask=q_valid)


_autotuned = None


def _kernel_and_config(config):
    """(kernel, launch kwargs). The autotuned wrapper is built on first use (nothing runs at import)."""
    global _autotuned
    if config is not None:
        return _fwd_kernel, config
    if _autotuned is None:
        _autotuned = autotuned(_fwd_kernel, "fwd")
    return _autotuned, {}


def fwd(q, k, v, idx, num_regions, scale, *, _config=None):
    """out ``(B, *spatial, H, Dv)`` in q's dtype (contiguous) and lse float32 ``(B, *spatial, H)``.

    ``_config`` (tests only) forces ``{"BLOCK_M": .., "BLOCK_N": ..}`` instead of autotuning.
    """
    B, H, dqk, dv = q.shape[0], q.shape[-2], q.shape[-1], v.shape[-1]
    nsp = q.dim() - 3
    geo = geometry(q.shape, num_regions)
    q, k, v = (collapse(t, nsp) for t in (q, k, v))
    topk = idx.shape[-1]
    out = torch.empty((*q.shape[:-1], dv), dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    si_h = idx.stride(1) if idx.dim() == 4 else 0
    if _config is None and INTERPRET:
        _config = interpreter_config(geo.MP, topk)
    kernel, cfg = _kernel_and_config(_config)

    def grid(meta):
        return (triton.cdiv(geo.R * geo.MP, meta["BLOCK_M"]), H, B)

    kernel[grid](
        q, k, v, idx, slot_table(geo, q.device), out, lse,
        *token_strides(q, nsp), *token_strides(k, nsp), *token_strides(v, nsp), *token_strides(out, nsp),
        *token_strides(lse.unsqueeze(-1), nsp),
        idx.stride(0), si_h, idx.stride(-2),
        geo.R, dqk, dv, topk, float(scale) * LOG2E,
        MP=geo.MP, BLOCK_DQK=head_block(dqk), BLOCK_DV=head_block(dv),
        UPCAST=upcast(q.dtype), DOT_PREC=dot_precision(q.dtype),
        **cfg,
    )
    return out, lse
