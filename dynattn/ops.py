"""torch.library custom ops, autograd, input checks and backend dispatch.

Three custom ops carry every backend:

* ``dynattn::route(q, k, num_regions, topk, per_head, backend) -> idx``
* ``dynattn::routed_attention_fwd(q, k, v, idx, num_regions, scale, backend) -> (out, lse)``
* ``dynattn::routed_attention_bwd(dout, dlse, q, k, v, out, lse, idx, num_regions, scale, backend)
  -> (dq, dk, dv)``

Each has a fake kernel (so ``torch.compile`` traces through it with ``fullgraph=True``), the forward has
autograd registered (gradients for q, k, v, and through lse when it is used), and both attention ops report
FLOPs to ``torch.utils.flop_counter``. The backend is resolved in Python before the op is called and passed
in as a string, so a compiled graph bakes in one backend.

Input checks live here and run before any kernel: errors are ``TypeError`` for wrong types/dtypes and
``ValueError`` for wrong shapes/values, and always name the argument.
"""

from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Tuple, Union

import torch

from . import reference
from .backends import get_backend, resolve_backend

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# --------------------------------------------------------------------------------------------------
# input checks
# --------------------------------------------------------------------------------------------------


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_qkv(q, k, v=None) -> None:
    """Types, dtypes, devices, ranks and shapes of q/k/v (v optional)."""
    named = [("q", q), ("k", k)] + ([("v", v)] if v is not None else [])
    for name, t in named:
        _check_tensor(name, t)
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name}.dtype={t.dtype} is not supported; expected one of {SUPPORTED_DTYPES}")
    for name, t in named[1:]:
        if t.dtype != q.dtype:
            raise TypeError(f"{name}.dtype={t.dtype} does not match q.dtype={q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all inputs must share a device")
    if not 4 <= q.dim() <= 6:
        raise ValueError(
            f"q must have shape (B, *spatial, H, D) with 1 to 3 spatial dims (4 to 6 dims), got q.dim()={q.dim()}"
        )
    for name, t in named[1:]:
        if t.dim() != q.dim():
            raise ValueError(f"{name}.dim()={t.dim()} must equal q.dim()={q.dim()} (same grid rank)")
        if t.shape[:-1] != q.shape[:-1]:
            raise ValueError(
                f"{name}.shape={tuple(t.shape)} and q.shape={tuple(q.shape)} must agree in batch, grid and heads"
            )
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k.shape[-1]={k.shape[-1]} must equal q.shape[-1]={q.shape[-1]} (d_qk)")
    for name, t in named:
        if t.numel() == 0:
            raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); every dim must be >= 1")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim, got {name}.stride(-1)={t.stride(-1)}")


def _check_num_regions(num_regions, spatial: Sequence[int]) -> Tuple[int, ...]:
    if isinstance(num_regions, bool) or not isinstance(num_regions, (int, tuple, list, torch.Size)):
        raise TypeError(f"num_regions must be an int or a sequence of ints, got {type(num_regions).__name__}")
    if isinstance(num_regions, int):
        regions = (num_regions,) * len(spatial)
    else:
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in num_regions):
            raise TypeError(f"num_regions must hold ints, got {num_regions!r}")
        regions = tuple(num_regions)
        if len(regions) != len(spatial):
            raise ValueError(
                f"num_regions={regions!r} has {len(regions)} entries but the grid has {len(spatial)} spatial dims "
                f"{tuple(spatial)}"
            )
    for d, (s, length) in enumerate(zip(regions, spatial)):
        if s < 1:
            raise ValueError(f"num_regions[{d}]={s} must be >= 1")
        if s > length:
            raise ValueError(
                f"num_regions[{d}]={s} is larger than the grid extent {length} (every region needs a token)"
            )
    return regions


def _check_topk(topk, num_regions_total: int) -> None:
    if isinstance(topk, bool) or not isinstance(topk, int):
        raise TypeError(f"topk must be an int, got {type(topk).__name__}")
    if not 1 <= topk <= num_regions_total:
        raise ValueError(f"topk={topk} must be in [1, R={num_regions_total}] (R = number of regions)")


def _check_idx(idx, q: torch.Tensor, num_regions_total: int, check_values: bool) -> None:
    _check_tensor("idx", idx)
    if idx.dtype != torch.int64:
        raise TypeError(f"idx must be int64, got idx.dtype={idx.dtype}")
    if idx.device != q.device:
        raise ValueError(f"idx is on {idx.device} but q is on {q.device}")
    B, H, R = q.shape[0], q.shape[-2], num_regions_total
    ok = (idx.dim() == 3 and tuple(idx.shape[:2]) == (B, R)) or (
        idx.dim() == 4 and tuple(idx.shape[:3]) == (B, H, R)
    )
    if not ok or not 1 <= idx.shape[-1] <= R:
        raise ValueError(
            f"idx must have shape (B, R, topk)=({B}, {R}, topk) or (B, H, R, topk)=({B}, {H}, {R}, topk) with "
            f"1 <= topk <= {R}, got idx.shape={tuple(idx.shape)}"
        )
    if not check_values:
        return
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= R:
        raise ValueError(f"idx values must lie in [0, R={R}), got values in [{lo}, {hi}]")
    if idx.shape[-1] > 1:
        s = idx.sort(dim=-1).values
        if bool((s[..., 1:] == s[..., :-1]).any()):
            raise ValueError("idx rows must hold distinct regions; found a region repeated within a row")


def _can_check_values(t: torch.Tensor) -> bool:
    """Data-dependent checks need a host sync: skip them while compiling or capturing a CUDA graph."""
    if torch.compiler.is_compiling():
        return False
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    return True


def _check_scale(scale, d: int) -> float:
    if scale is None:
        return d ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


# --------------------------------------------------------------------------------------------------
# custom ops
# --------------------------------------------------------------------------------------------------


def _region_total(num_regions: Sequence[int]) -> int:
    return math.prod(num_regions)


@torch.library.custom_op("dynattn::route", mutates_args=())
def _route_op(
    q: torch.Tensor, k: torch.Tensor, num_regions: List[int], topk: int, per_head: bool, backend: str
) -> torch.Tensor:
    H, D = q.shape[-2], q.shape[-1]
    scale = D ** -0.5 if per_head else (H * D) ** -0.5
    return get_backend(backend).route(q, k, tuple(num_regions), topk, per_head, scale)


@_route_op.register_fake
def _(q, k, num_regions, topk, per_head, backend):
    B, H, R = q.shape[0], q.shape[-2], _region_total(num_regions)
    shape = (B, H, R, topk) if per_head else (B, R, topk)
    return q.new_empty(shape, dtype=torch.int64)


@torch.library.custom_op("dynattn::routed_attention_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    num_regions: List[int],
    scale: float,
    backend: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return get_backend(backend).fwd(q, k, v, idx, tuple(num_regions), scale)


@_fwd_op.register_fake
def _(q, k, v, idx, num_regions, scale, backend):
    out = q.new_empty((*q.shape[:-1], v.shape[-1]))
    lse = q.new_empty(q.shape[:-1], dtype=torch.float64 if q.dtype == torch.float64 else torch.float32)
    return out, lse


@torch.library.custom_op("dynattn::routed_attention_bwd", mutates_args=())
def _bwd_op(
    dout: torch.Tensor,
    dlse: Optional[torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    idx: torch.Tensor,
    num_regions: List[int],
    scale: float,
    backend: str,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return get_backend(backend).bwd(dout, dlse, q, k, v, out, lse, idx, tuple(num_regions), scale)


@_bwd_op.register_fake
def _(dout, dlse, q, k, v, out, lse, idx, num_regions, scale, backend):
    return torch.empty_like(q, memory_format=torch.contiguous_format), torch.empty_like(
        k, memory_format=torch.contiguous_format
    ), torch.empty_like(v, memory_format=torch.contiguous_format)


def _fwd_setup_context(ctx, inputs, output):
    q, k, v, idx, num_regions, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, idx)
    ctx.num_regions, ctx.scale, ctx.backend = num_regions, scale, backend


def _fwd_backward(ctx, dout, dlse):
    q, k, v, out, lse, idx = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv = _bwd_op(dout, dlse, q, k, v, out, lse, idx, ctx.num_regions, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None, None, None


torch.library.register_autograd("dynattn::routed_attention_fwd", _fwd_backward, setup_context=_fwd_setup_context)


# --------------------------------------------------------------------------------------------------
# FLOP formulas (FlopCounterMode)
# --------------------------------------------------------------------------------------------------


def _attention_flops(q_shape, v_shape, idx_shape, num_regions) -> int:
    """4 * d * keys_attended per query token per head (2 for QK^T, 2 for PV, split as d_qk + d_v)."""
    B, H, dqk, dv = q_shape[0], q_shape[-2], q_shape[-1], v_shape[-1]
    n = math.prod(q_shape[1:-2])
    keys = idx_shape[-1] * n / _region_total(num_regions)  # topk regions of n/R tokens on average
    return int(round(2 * B * H * n * keys * (dqk + dv)))


def _route_flops(q_shape, num_regions, per_head) -> int:
    B, H, d = q_shape[0], q_shape[-2], q_shape[-1]
    n, r = math.prod(q_shape[1:-2]), _region_total(num_regions)
    pooling = 2 * B * n * H * d  # q and k means
    logits = 2 * B * r * r * H * d  # shared and per-head routing do the same multiply-adds
    return pooling + logits


try:
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.dynattn.route)
    def _route_flop_formula(q_shape, k_shape, num_regions, topk, per_head, backend, *args, out_shape=None, **kw):
        return _route_flops(q_shape, num_regions, per_head)

    @register_flop_formula(torch.ops.dynattn.routed_attention_fwd)
    def _fwd_flop_formula(q_shape, k_shape, v_shape, idx_shape, num_regions, *args, out_shape=None, **kw):
        return _attention_flops(q_shape, v_shape, idx_shape, num_regions)

    @register_flop_formula(torch.ops.dynattn.routed_attention_bwd)
    def _bwd_flop_formula(dout_shape, dlse_shape, q_shape, k_shape, v_shape, out_shape_, lse_shape, idx_shape,
                          num_regions, *args, out_shape=None, **kw):
        # dQ, dK, dV and dP: twice the forward's matmul work (as torch counts SDPA's backward)
        return 2 * _attention_flops(q_shape, v_shape, idx_shape, num_regions)

except ImportError:  # torch without register_flop_formula: counting is simply unavailable
    pass


# --------------------------------------------------------------------------------------------------
# public functions
# --------------------------------------------------------------------------------------------------

NumRegions = Union[int, Sequence[int]]


def route(
    q: torch.Tensor,
    k: torch.Tensor,
    num_regions: NumRegions,
    topk: int,
    *,
    per_head: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Pick the ``topk`` key regions of every query region (BiFormer's region-to-region routing).

    Args:
        q, k: ``(B, *spatial, H, Dqk)`` with 1 to 3 spatial dims; float32/float16/bfloat16 (float64 on
            the cpu and reference backends); last dim contiguous.
        num_regions: regions per spatial dim (an int for all dims, or one int each); each at most the
            extent. Region ``i`` of an extent ``L`` cut into ``S`` spans ``[floor(i*L/S), floor((i+1)*L/S))``.
        topk: regions kept per query region, ``1 <= topk <= R`` with ``R = prod(num_regions)``.
        per_head: route each head on its own slice instead of all heads together.
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"reference"``.

    Returns:
        int64 ``(B, R, topk)`` (or ``(B, H, R, topk)`` with ``per_head``): the chosen key regions, by
        descending logit ``scale * mean(q_r) . mean(k_r)`` computed in float32. Not differentiable.
    """
    _check_qkv(q, k)
    regions = _check_num_regions(num_regions, q.shape[1:-2])
    _check_topk(topk, _region_total(regions))
    if not isinstance(per_head, bool):
        raise TypeError(f"per_head must be a bool, got {type(per_head).__name__}")
    name = resolve_backend(backend, q)
    return _route_op(q.detach(), k.detach(), list(regions), topk, per_head, name)


def routed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    num_regions: NumRegions,
    *,
    scale: Optional[float] = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Exact attention of every query token over the tokens of its routed key regions.

    Args:
        q, k: ``(B, *spatial, H, Dqk)``; v: ``(B, *spatial, H, Dv)``; 1 to 3 spatial dims, any strides
            with a contiguous last dim (views of one fused qkv projection are fine); same dtype
            (float32/float16/bfloat16; float64 on cpu/reference) and device.
        idx: int64 ``(B, R, T)`` (shared by all heads) or ``(B, H, R, T)``; each row lists ``T`` distinct
            key regions in ``[0, R)``, e.g. the output of :func:`route`.
        num_regions: as in :func:`route`.
        scale: softmax scale, default ``Dqk ** -0.5``.
        return_lse: also return the log-sum-exp of each query's logits.
        backend: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"triton"`` or ``"reference"``
            (``DYNATTN_BACKEND`` overrides ``"auto"``).

    Returns:
        ``out`` ``(B, *spatial, H, Dv)`` in q's dtype, or ``(out, lse)`` with lse float32 (float64 for float64
        inputs) ``(B, *spatial, H)``. Differentiable in q, k, v (and through lse); backward is deterministic.
    """
    _check_qkv(q, k, v)
    regions = _check_num_regions(num_regions, q.shape[1:-2])
    _check_idx(idx, q, _region_total(regions), check_values=_can_check_values(q))
    return _attend(q, k, v, idx, regions, scale, return_lse, backend)


def _attend(q, k, v, idx, regions, scale, return_lse, backend):
    scale = _check_scale(scale, q.shape[-1])
    name = resolve_backend(backend, q, v)
    out, lse = _fwd_op(q, k, v, idx.contiguous(), list(regions), scale, name)
    return (out, lse) if return_lse else out


def bi_level_routing_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_regions: NumRegions,
    topk: int,
    *,
    scale: Optional[float] = None,
    per_head: bool = False,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Route and attend in one call: :func:`route` then :func:`routed_attention`.

    Shapes and arguments as in those two. Routing uses the detached region means (as BiFormer), so
    gradients flow only through the attention. Returns ``out`` ``(B, *spatial, H, Dv)`` (or
    ``(out, lse)``).
    """
    _check_qkv(q, k, v)
    regions = _check_num_regions(num_regions, q.shape[1:-2])
    _check_topk(topk, _region_total(regions))
    idx = route(q, k, regions, topk, per_head=per_head, backend=backend)
    return _attend(q, k, v, idx, regions, scale, return_lse, backend)  # idx is valid by construction
