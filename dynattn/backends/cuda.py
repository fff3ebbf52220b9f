"""CUDA backend: the kernels of ``csrc/cuda`` (route, forward, backward) in ``dynattn._C_cuda``.

The compiled module takes raw pointers, element strides, the device index and a stream, and never links
libtorch; this file is the torch side: it checks what the kernels support, allocates every output and
scratch buffer (shapes only, so calls can be captured in a CUDA graph or traced by ``torch.compile``), and
launches on ``torch.cuda.current_stream(device)``.

What the kernels support (:func:`why_unsupported` says why not otherwise):

* attention (:func:`fwd`, :func:`bwd`): float16 and bfloat16 on tensor cores (mma.sync, fp32 accumulation),
  head dims ``d_qk, d_v`` each in (32, 64, 128). float32 has no kernel (no SIMT path): use
  ``backend="triton"`` or cast. Deterministic backward (no float atomics).
* routing (:func:`route`): float32, float16 and bfloat16, any head dim.

Shapes (DESIGN.md): ``q, k: (B, *spatial, H, Dqk)``, ``v: (B, *spatial, H, Dv)``, 1-3 spatial dims, any
strides with a contiguous last dim; ``idx`` int64 contiguous ``(B, R, topk)`` or ``(B, H, R, topk)``;
``num_regions`` one int per spatial dim. Inputs arrive validated by ``dynattn.ops``.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Tuple

import torch

from ._routing import inverse_routing_index

try:
    from .. import _C_cuda as _ext

    _IMPORT_ERROR: Optional[BaseException] = None
except ImportError as e:  # not built (no nvcc at install time) or not loadable: never fatal
    _ext = None
    _IMPORT_ERROR = e

__all__ = ["is_built", "is_available", "why_unsupported", "why_unsupported_shape", "route", "fwd", "bwd"]

_HEAD_DIMS = (32, 64, 128)
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_INT32_LIMIT = 2**31 - 1
_GRID_YZ_LIMIT = 65535  # heads and batch are CUDA grid dims y and z


def is_built() -> bool:
    """True when ``dynattn._C_cuda`` was compiled and imports."""
    return _ext is not None


def _version(v: int) -> str:
    return f"{v // 1000}.{(v % 1000) // 10}"


@functools.lru_cache(maxsize=None)
def _module_problem() -> str:
    """Empty if the built module can run here, else why not (no kernels, or a driver older than the runtime)."""
    if _ext is None:
        return f"dynattn._C_cuda is not built or does not load ({_IMPORT_ERROR}); reinstall where nvcc is found"
    if not getattr(_ext, "has_attention_kernels", False):
        return "dynattn._C_cuda was built without the attention kernels"
    try:
        runtime, driver = int(_ext.runtime_version()), int(_ext.driver_version())
    except Exception as e:  # noqa: BLE001 - any runtime failure just means "not usable"
        return f"dynattn._C_cuda cannot query the CUDA driver: {e}"
    if driver == 0:
        return "no NVIDIA driver is installed"
    if driver < runtime:
        return (
            f"dynattn._C_cuda was built with CUDA {_version(runtime)} but the driver supports CUDA "
            f"{_version(driver)}; rebuild with a matching toolkit or update the driver"
        )
    return ""


def is_available() -> bool:
    """Built with the attention kernels, a driver new enough for them, and a visible CUDA device. Never raises."""
    try:
        return not _module_problem() and torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def why_unsupported(q: torch.Tensor, v: torch.Tensor) -> str:
    """``""`` if the attention kernels handle tensors like ``q`` (and ``k``) and ``v``, else the reason."""
    if q.device.type != "cuda":
        return f"backend 'cuda' needs CUDA tensors, got device {q.device}"
    return why_unsupported_shape(q.dtype, tuple(q.shape), int(v.shape[-1]))


def why_unsupported_shape(dtype: torch.dtype, q_shape: Tuple[int, ...], dv: int) -> str:
    """:func:`why_unsupported` from metadata alone (what dispatch has while torch.compile traces)."""
    problem = _module_problem()
    if problem:
        return problem
    if dtype not in (torch.float16, torch.bfloat16):
        return (
            f"dtype {dtype} has no CUDA kernel (tensor cores: float16 and bfloat16 only, no SIMT path); "
            "use backend='triton' or cast to float16/bfloat16"
        )
    for what, d in (("q/k", q_shape[-1]), ("v", dv)):
        if d not in _HEAD_DIMS:
            return f"{what} head dim {d} not in {_HEAD_DIMS}; use backend='triton'"
    return _size_problem(q_shape)


def _size_problem(q_shape: Sequence[int], num_regions: Optional[Sequence[int]] = None, topk: int = 1) -> str:
    """The kernels index tokens, regions and slots in int32, and put heads/batch on grid dims y/z."""
    B, H = q_shape[0], q_shape[-2]
    spatial = q_shape[1:-2]
    if B > _GRID_YZ_LIMIT or H > _GRID_YZ_LIMIT:
        return f"backend 'cuda' supports batch and heads up to {_GRID_YZ_LIMIT}, got B={B}, H={H}"
    if math.prod(spatial) > _INT32_LIMIT:
        return f"backend 'cuda' supports up to {_INT32_LIMIT} tokens per image, got {math.prod(spatial)}"
    if num_regions is not None:
        R = math.prod(num_regions)
        M = math.prod(-(-length // s) for length, s in zip(spatial, num_regions))
        if R * M > _INT32_LIMIT or R * topk > _INT32_LIMIT:
            return f"backend 'cuda': {R} regions of up to {M} tokens with topk={topk} overflow its int32 indexing"
    return ""


def _require(q: torch.Tensor, v: Optional[torch.Tensor], num_regions, topk: int) -> None:
    problem = _module_problem()
    if problem:
        raise RuntimeError(problem)
    if q.device.type != "cuda":
        raise ValueError(f"backend 'cuda' needs CUDA tensors, got device {q.device}")
    reason = why_unsupported(q, v) if v is not None else _size_problem(tuple(q.shape))
    reason = reason or _size_problem(tuple(q.shape), num_regions, topk)
    if reason:
        raise ValueError(reason)


# --------------------------------------------------------------------------------------------------
# argument marshalling
# --------------------------------------------------------------------------------------------------


def _geometry(q: torch.Tensor, num_regions: Sequence[int]) -> Tuple[int, ...]:
    """(B, L0, L1, L2, S0, S1, S2, H), unused spatial dims padded with 1."""
    spatial = tuple(int(s) for s in q.shape[1:-2])
    regions = tuple(int(s) for s in num_regions)
    pad = (1,) * (3 - len(spatial))
    return (q.shape[0], *spatial, *pad, *regions, *pad, q.shape[-2])


def _tensor(t: torch.Tensor) -> Tuple[int, ...]:
    """(data_ptr, stride_B, stride_L0, stride_L1, stride_L2, stride_H) in elements; unused dims stride 0."""
    st = t.stride()
    n_spatial = t.dim() - 3
    spatial = list(st[1:1 + n_spatial]) + [0] * (3 - n_spatial)
    return (t.data_ptr(), st[0], *spatial, st[1 + n_spatial])


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if the kernels can read it with 16-byte cp.async (contiguous last dim, 16-byte aligned
    base and row strides), else a contiguous copy. Views of a fused qkv projection pass unchanged."""
    per_chunk = 16 // t.element_size()
    ok = t.stride(-1) == 1 and t.data_ptr() % 16 == 0
    ok = ok and all(s % per_chunk == 0 for s, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1)
    if ok:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _launch(t: torch.Tensor) -> Tuple[int, int]:
    return t.device.index, torch.cuda.current_stream(t.device).cuda_stream


# --------------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------------


def route(q: torch.Tensor, k: torch.Tensor, num_regions: Tuple[int, ...], topk: int, per_head: bool,
          scale: float) -> torch.Tensor:
    """Top-k routing. q, k ``(B, *spatial, H, Dqk)`` float32/float16/bfloat16 -> int64 contiguous
    ``(B, R, topk)`` (``(B, H, R, topk)`` with ``per_head``), rows sorted by descending logit
    ``scale * mean_r(q) . mean_j(k)``, ties to the lower region index."""
    _require(q, None, num_regions, topk)
    if q.dtype not in _DTYPE_CODE:
        raise ValueError(f"backend 'cuda' routes float32/float16/bfloat16, got {q.dtype}")
    B, H, D = q.shape[0], q.shape[-2], q.shape[-1]
    R = math.prod(num_regions)
    idx = torch.empty((B, H, R, topk) if per_head else (B, R, topk), dtype=torch.int64, device=q.device)
    if idx.numel() == 0 or q.numel() == 0:
        return idx
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    qr = torch.empty((B, R, H, D), dtype=torch.float32, device=q.device)
    kr = torch.empty_like(qr)
    device, stream = _launch(q)
    _ext.route(_geometry(q, num_regions), D, _DTYPE_CODE[q.dtype], _tensor(q), _tensor(k), qr.data_ptr(),
               kr.data_ptr(), idx.data_ptr(), topk, bool(per_head), float(scale), device, stream)
    return idx


def fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, num_regions: Tuple[int, ...],
        scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward. Returns ``out`` ``(B, *spatial, H, Dv)`` contiguous in q's dtype and ``lse`` float32
    ``(B, *spatial, H)`` (natural log)."""
    topk = idx.shape[-1]
    _require(q, v, num_regions, topk)
    out = torch.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device=q.device)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    idx = idx.contiguous()
    device, stream = _launch(q)
    _ext.fwd(_geometry(q, num_regions), q.shape[-1], v.shape[-1], _DTYPE_CODE[q.dtype], _tensor(q), _tensor(k),
             _tensor(v), idx.data_ptr(), topk, idx.dim() == 4, float(scale), out.data_ptr(), lse.data_ptr(),
             device, stream)
    return out, lse


def bwd(dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        out: torch.Tensor, lse: torch.Tensor, idx: torch.Tensor, num_regions: Tuple[int, ...],
        scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward. dout ``(B, *spatial, H, Dv)`` (any strides), dlse float32 ``(B, *spatial, H)`` or None.
    Returns contiguous ``(dq, dk, dv)`` in the dtypes of q, k, v; deterministic (no atomics)."""
    topk = idx.shape[-1]
    _require(q, v, num_regions, topk)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if dq.numel() == 0:
        return dq, dk, dv
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    dout = _aligned(dout.to(q.dtype))  # also materialises an expanded (stride-0) gradient
    out = _aligned(out)
    lse = lse.to(torch.float32).contiguous()
    dlse = dlse.to(torch.float32).contiguous() if dlse is not None else None
    idx = idx.contiguous()
    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
    inv_offsets, inv_regions = inverse_routing_index(idx, math.prod(num_regions))
    device, stream = _launch(q)
    _ext.bwd(_geometry(q, num_regions), q.shape[-1], v.shape[-1], _DTYPE_CODE[q.dtype], _tensor(q), _tensor(k),
             _tensor(v), _tensor(out), _tensor(dout), lse.data_ptr(), 0 if dlse is None else dlse.data_ptr(),
             delta.data_ptr(), idx.data_ptr(), topk, idx.dim() == 4, inv_offsets.data_ptr(),
             inv_regions.data_ptr(), float(scale), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), device, stream)
    return dq, dk, dv
