"""Triton backend: routing, fused routed-attention forward and backward.

Tensors live on a CUDA/ROCm device, or on the CPU under ``TRITON_INTERPRET=1`` (how CI tests the
kernels). Inputs arrive validated by ``dynattn.ops``; shapes as in DESIGN.md:

* ``q, k``: ``(B, *spatial, H, Dqk)``, ``v``: ``(B, *spatial, H, Dv)``, 1-3 spatial dims, float32 /
  float16 / bfloat16, any strides with a contiguous last dim, ``Dqk, Dv <= 256``.
* ``idx``: int64 contiguous ``(B, R, topk)`` (shared routing) or ``(B, H, R, topk)`` (per head).
* ``num_regions``: one int per spatial dim.

Kernels launch on torch's current stream, never synchronise the host and allocate only static-shape
outputs, so they can be captured in a CUDA graph (after a first, autotuning, call outside the capture).

Importing this package never fails: without Triton, ``is_available()`` is False and the entry points
raise ``RuntimeError``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Optional, Tuple

import torch

try:
    from . import bwd as _bwd
    from . import fwd as _fwd
    from . import route as _route

    _IMPORT_ERROR: Optional[BaseException] = None
except Exception as e:  # triton missing or broken: the backend is simply unavailable
    _IMPORT_ERROR = e

__all__ = ["is_available", "route", "fwd", "bwd"]


def is_available() -> bool:
    """True when Triton imports and can run: a CUDA/ROCm device is visible, or TRITON_INTERPRET=1."""
    try:
        if _IMPORT_ERROR is not None:
            return False
        if os.environ.get("TRITON_INTERPRET") == "1":
            return True
        return bool(torch.cuda.is_available())
    except Exception:
        return False


def _on(t: torch.Tensor):
    """Triton launches on the current CUDA device and its current stream: make t's device current."""
    _require()
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _require() -> None:
    if _IMPORT_ERROR is not None:
        raise RuntimeError(f"the triton backend is unavailable: importing triton failed ({_IMPORT_ERROR!r})")


def route(q: torch.Tensor, k: torch.Tensor, num_regions: Tuple[int, ...], topk: int, per_head: bool,
          scale: float) -> torch.Tensor:
    """Top-k routing. q, k ``(B, *spatial, H, Dqk)`` -> int64 contiguous ``(B, R, topk)``
    (``(B, H, R, topk)`` with ``per_head``), rows sorted by descending logit, ties to the lower index."""
    with _on(q):
        return _route.route(q, k, tuple(num_regions), topk, per_head, scale)


def fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, num_regions: Tuple[int, ...],
        scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward. Returns ``out`` ``(B, *spatial, H, Dv)`` contiguous in q's dtype and ``lse`` float32
    ``(B, *spatial, H)`` (natural log)."""
    with _on(q):
        return _fwd.fwd(q, k, v, idx.contiguous(), tuple(num_regions), scale)


def bwd(dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        out: torch.Tensor, lse: torch.Tensor, idx: torch.Tensor, num_regions: Tuple[int, ...],
        scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backward. dout ``(B, *spatial, H, Dv)`` (any strides, contiguous last dim), dlse float32
    ``(B, *spatial, H)`` or None. Returns contiguous ``(dq, dk, dv)`` in the dtypes of q, k, v;
    deterministic (no atomics)."""
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()  # e.g. an expanded zero gradient
    out = out if out.stride(-1) == 1 else out.contiguous()
    with _on(q):
        return _bwd.bwd(dout, dlse, q, k, v, out, lse, idx.contiguous(), tuple(num_regions), scale)
