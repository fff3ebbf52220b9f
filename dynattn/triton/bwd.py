"""Fused routed attention, backward: a dQ kernel per query tile and a dK/dV kernel per key tile.

Both recompute the probabilities from the saved lse (``P = exp(scale * q.k - lse)``) instead of storing
them, exactly as FlashAttention-2 does, and both use the tiles of the forward (``_common``):

* ``_dq_kernel`` (one program per query tile, as the forward) first computes
  ``delta = rowsum(dO * O) - dlse`` for its rows and stores it, then walks the routed key regions:
  ``dS = P * (dO V^T - delta)``, ``dQ += dS K``. Subtracting ``dlse`` makes gradients flow through a
  returned lse: ``d lse / d s = P``, so ``dS`` gains ``P * dlse``.
* ``_dkv_kernel`` (one program per key tile) needs, for each key region, the query regions that routed to
  it. The forward index is inverted once per call into CSR form with torch ops on the device
  (a stable sort of the flattened index and a ``searchsorted`` for the row offsets: no host sync, no
  data-dependent allocation, CUDA-graph safe). Each program then owns its dK/dV rows and sums the
  contributions of its query regions in a fixed (ascending) order, which is why no float atomics are
  needed and the result is bitwise deterministic. Packed tiny key regions each have their own query list;
  the loop runs to the longest list of the tile and masks the rest.

The dQ kernel runs first: the dK/dV kernel reads the ``delta`` it stored (same stream, so ordered).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backends._routing import inverse_routing_index

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
def _dq_kernel(
    Q, K, V, DO, O, LSE, DLSE, IDX, TAB, DQ, DELTA,
    # element strides (batch, token, head); dlse may be 0-strided (an expanded gradient)
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sdo_b, sdo_t, sdo_h, so_b, so_t, so_h,
    sl_b, sl_t, sl_h, sdl_b, sdl_t, sdl_h, sdq_b, sdq_t, sdq_h, sd_b, sd_t, sd_h,
    si_b, si_h, si_r,
    R, DQK, DV, TOPK, scale, qk_scale,
    MP: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_DLSE: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    PACK: tl.constexpr = (BLOCK_M + MP - 1) // MP
    NB: tl.constexpr = BLOCK_N // PACK
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)

    offs_m = tl.arange(0, BLOCK_M)
    g = pid_m * BLOCK_M + offs_m
    qtok = tl.load(TAB + g, mask=g < R * MP, other=-1)
    q_valid = qtok >= 0
    qtok = qtok.to(tl.int64)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_qk = q_valid[:, None] & (offs_dqk < DQK)[None, :]
    mask_v = q_valid[:, None] & (offs_dv < DV)[None, :]
    q = tl.load((Q + b * sq_b + h * sq_h + qtok * sq_t)[:, None] + offs_dqk[None, :], mask=mask_qk, other=0.0)
    do = tl.load((DO + b * sdo_b + h * sdo_h + qtok * sdo_t)[:, None] + offs_dv[None, :], mask=mask_v, other=0.0)
    o = tl.load((O + b * so_b + h * so_h + qtok * so_t)[:, None] + offs_dv[None, :], mask=mask_v, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + b * sdl_b + h * sdl_h + qtok * sdl_t, mask=q_valid, other=0.0).to(tl.float32)
    tl.store(DELTA + b * sd_b + h * sd_h + qtok * sd_t, delta, mask=q_valid)
    lse2 = tl.load(LSE + b * sl_b + h * sl_h + qtok * sl_t, mask=q_valid, other=0.0) * 1.4426950408889634
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)

    offs_n = tl.arange(0, BLOCK_N)
    rq_n = (pid_m * BLOCK_M) // MP + offs_n // NB
    rq_n_ok = rq_n < R
    idx_row = IDX + b * si_b + h * si_h + rq_n.to(tl.int64) * si_r
    k_base = K + b * sk_b + h * sk_h
    v_base = V + b * sv_b + h * sv_h
    if PACK > 1:
        same_region = (offs_m // MP)[:, None] == (offs_n // NB)[None, :]

    dq = tl.zeros([BLOCK_M, BLOCK_DQK], tl.float32)
    for n0 in range(0, TOPK * MP, NB):
        nk = n0 + offs_n % NB
        j = nk // MP
        col_ok = rq_n_ok & (j < TOPK)
        rk = tl.load(idx_row + j, mask=col_ok, other=0)
        ktok = tl.load(TAB + rk * MP + nk % MP, mask=col_ok, other=-1)
        k_valid = ktok >= 0
        ktok = ktok.to(tl.int64)
        k = tl.load((k_base + ktok * sk_t)[:, None] + offs_dqk[None, :],
                    mask=k_valid[:, None] & (offs_dqk < DQK)[None, :], other=0.0)
        v = tl.load((v_base + ktok * sv_t)[:, None] + offs_dv[None, :],
                    mask=k_valid[:, None] & (offs_dv < DV)[None, :], other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        mask = q_valid[:, None] & k_valid[None, :]
        if PACK > 1:
            mask = mask & same_region
        p = tl.where(mask, tl.math.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)

    dq *= scale
    tl.store((DQ + b * sdq_b + h * sdq_h + qtok * sdq_t)[:, None] + offs_dqk[None, :],
             dq.to(DQ.dtype.element_ty), mask=mask_qk)


@triton.jit
def _dkv_kernel(
    Q, K, V, DO, LSE, DELTA, QLIST, QOFFS, TAB, DK, DV_,
    sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h, sdo_b, sdo_t, sdo_h,
    sl_b, sl_t, sl_h, sd_b, sd_t, sd_h, sdk_b, sdk_t, sdk_h, sdv_b, sdv_t, sdv_h,
    H, R, DQK, DV, TOPK, scale, qk_scale,
    MP: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    PER_HEAD: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # Here the tile's own rows are KEY slots (BLOCK_N of them) and the streamed columns are QUERY slots.
    PACK: tl.constexpr = (BLOCK_N + MP - 1) // MP  # key regions per tile
    NB: tl.constexpr = BLOCK_M // PACK  # query slots per packed key region per step
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)

    offs_n = tl.arange(0, BLOCK_N)
    g = pid_n * BLOCK_N + offs_n
    ktok = tl.load(TAB + g, mask=g < R * MP, other=-1)
    k_valid = ktok >= 0
    ktok = ktok.to(tl.int64)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_k = k_valid[:, None] & (offs_dqk < DQK)[None, :]
    mask_v = k_valid[:, None] & (offs_dv < DV)[None, :]
    k = tl.load((K + b * sk_b + h * sk_h + ktok * sk_t)[:, None] + offs_dqk[None, :], mask=mask_k, other=0.0)
    v = tl.load((V + b * sv_b + h * sv_h + ktok * sv_t)[:, None] + offs_dv[None, :], mask=mask_v, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)

    # CSR of the inverse routing index: for key region rk, the query regions that picked it are
    # QLIST[grp, QOFFS[grp, rk] : QOFFS[grp, rk + 1]], ascending.
    offs_m = tl.arange(0, BLOCK_M)
    rk_m = (pid_n * BLOCK_N) // MP + offs_m // NB  # the key region whose queries column c holds
    rk_m_ok = rk_m < R
    if PER_HEAD:
        grp = b * H + h
    else:
        grp = b
    qoffs = QOFFS + grp * (R + 1)
    qlist = QLIST + grp * (R * TOPK)
    start = tl.load(qoffs + rk_m, mask=rk_m_ok, other=0)
    count = tl.load(qoffs + rk_m + 1, mask=rk_m_ok, other=0) - start
    longest = tl.max(count, 0)
    q_base = Q + b * sq_b + h * sq_h
    do_base = DO + b * sdo_b + h * sdo_h
    lse_base = LSE + b * sl_b + h * sl_h
    delta_base = DELTA + b * sd_b + h * sd_h
    if PACK > 1:
        same_region = (offs_n // MP)[:, None] == (offs_m // NB)[None, :]

    dk = tl.zeros([BLOCK_N, BLOCK_DQK], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for m0 in range(0, longest * MP, NB):
        nq = m0 + offs_m % NB
        i = nq // MP  # position in the key region's query list
        col_ok = rk_m_ok & (i < count)
        rq = tl.load(qlist + start + i, mask=col_ok, other=0)
        qtok = tl.load(TAB + rq * MP + nq % MP, mask=col_ok, other=-1)
        q_valid = qtok >= 0
        qtok = qtok.to(tl.int64)
        q = tl.load((q_base + qtok * sq_t)[:, None] + offs_dqk[None, :],
                    mask=q_valid[:, None] & (offs_dqk < DQK)[None, :], other=0.0)
        do = tl.load((do_base + qtok * sdo_t)[:, None] + offs_dv[None, :],
                     mask=q_valid[:, None] & (offs_dv < DV)[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse2 = tl.load(lse_base + qtok * sl_t, mask=q_valid, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_base + qtok * sd_t, mask=q_valid, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # (keys, queries)
        mask = k_valid[:, None] & q_valid[None, :]
        if PACK > 1:
            mask = mask & same_region
        pt = tl.where(mask, tl.math.exp2(st - lse2[None, :]), 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=DOT_PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=DOT_PREC)

    dk *= scale
    tl.store((DK + b * sdk_b + h * sdk_h + ktok * sdk_t)[:, None] + offs_dqk[None, :],
             dk.to(DK.dtype.element_ty), mask=mask_k)
    tl.store((DV_ + b * sdv_b + h * sdv_h + ktok * sdv_t)[:, None] + offs_dv[None, :],
             dv.to(DV_.dtype.element_ty), mask=mask_v)


# --------------------------------------------------------------------------------------------------
# launch
# --------------------------------------------------------------------------------------------------


_autotuned = {}


def _get(kind, config):
    """(kernel, launch kwargs) for "dq" / "dkv": the forced config, or the autotuned wrapper (built lazily)."""
    kernel = _dq_kernel if kind == "dq" else _dkv_kernel
    if config is not None:
        return kernel, config
    if kind not in _autotuned:
        _autotuned[kind] = autotuned(kernel, kind)
    return _autotuned[kind], {}


def bwd(dout, dlse, q, k, v, out, lse, idx, num_regions, scale, *, _config=None, _config_dkv=None):
    """(dq, dk, dv), contiguous, in the dtypes of q, k, v. ``dlse`` may be None.

    ``_config`` / ``_config_dkv`` (tests only) force ``{"BLOCK_M": .., "BLOCK_N": ..}`` for the dQ and the
    dK/dV kernel; in the dK/dV kernel BLOCK_N tiles the keys and BLOCK_M streams the queries.
    """
    B, H, dqk, dv_ = q.shape[0], q.shape[-2], q.shape[-1], v.shape[-1]
    nsp = q.dim() - 3
    geo = geometry(q.shape, num_regions)
    q, k, v, dout, out = (collapse(t, nsp) for t in (q, k, v, dout, out))
    lse = collapse(lse.unsqueeze(-1), nsp)
    dlse = collapse(dlse.unsqueeze(-1), nsp) if dlse is not None else None
    topk = idx.shape[-1]
    per_head = idx.dim() == 4
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)  # (B, *spatial, H, 1)
    tab = slot_table(geo, q.device)
    if INTERPRET:
        cfg = interpreter_config(geo.MP, topk)
        _config = _config or cfg
        _config_dkv = _config_dkv or {"BLOCK_M": cfg["BLOCK_N"], "BLOCK_N": cfg["BLOCK_M"]}
    common = dict(MP=geo.MP, BLOCK_DQK=head_block(dqk), BLOCK_DV=head_block(dv_),
                  UPCAST=upcast(q.dtype), DOT_PREC=dot_precision(q.dtype))
    st = lambda t: token_strides(t, nsp)  # noqa: E731
    has_dlse = dlse is not None

    kernel, cfg = _get("dq", _config)
    kernel[lambda meta: (triton.cdiv(geo.R * geo.MP, meta["BLOCK_M"]), H, B)](
        q, k, v, dout, out, lse, dlse if has_dlse else lse, idx, tab, dq, delta,
        *st(q), *st(k), *st(v), *st(dout), *st(out), *st(lse), *st(dlse if has_dlse else lse), *st(dq), *st(delta),
        idx.stride(0), idx.stride(1) if per_head else 0, idx.stride(-2),
        geo.R, dqk, dv_, topk, float(scale), float(scale) * LOG2E,
        HAS_DLSE=has_dlse, **common, **cfg,
    )

    qoffs, qlist = inverse_routing_index(idx, geo.R)
    kernel, cfg = _get("dkv", _config_dkv)
    kernel[lambda meta: (triton.cdiv(geo.R * geo.MP, meta["BLOCK_N"]), H, B)](
        q, k, v, dout, lse, delta, qlist, qoffs, tab, dk, dv,
        *st(q), *st(k), *st(v), *st(dout), *st(lse), *st(delta), *st(dk), *st(dv),
        H, geo.R, dqk, dv_, topk, float(scale), float(scale) * LOG2E,
        PER_HEAD=per_head, **common, **cfg,
    )
    return dq, dk, dv
