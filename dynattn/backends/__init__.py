"""Backend registry: which kernels can run on given tensors, and which one ``"auto"`` picks.

Every backend module exposes the same functions (tensors arrive validated by ``dynattn.ops``)::

    is_available() -> bool
    route(q, k, num_regions, topk, per_head, scale) -> idx
    fwd(q, k, v, idx, num_regions, scale) -> (out, lse)
    bwd(dout, dlse, q, k, v, out, lse, idx, num_regions, scale) -> (dq, dk, dv)

``"auto"`` prefers compiled kernels, then Triton, then the reference: cpu tensors -> cpu, reference;
cuda tensors -> cuda, triton, reference. ``DYNATTN_BACKEND`` overrides ``"auto"``. Skipped backends and
the reason are logged at DEBUG level on the ``dynattn`` logger, and :func:`explain` returns them.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import List, Sequence, Tuple

import torch

logger = logging.getLogger("dynattn")

BACKENDS = ("cpu", "cuda", "triton", "reference")
_MODULES = {
    "cpu": "dynattn.backends.cpu",
    "cuda": "dynattn.backends.cuda",
    "triton": "dynattn.triton",
    "reference": "dynattn.backends.reference",
}
MAX_HEAD_DIM = 256


def get_backend(name: str):
    """The module implementing backend ``name``."""
    return importlib.import_module(_MODULES[name])


def _is_available(name: str) -> bool:
    try:
        return bool(get_backend(name).is_available())
    except Exception:  # a broken optional dependency must not break dispatch
        return False


def available_backends() -> List[str]:
    """Backends usable in this process (built and with a device to run on), best first per device."""
    return [name for name in BACKENDS if _is_available(name)]


def why_not(name: str, t: torch.Tensor, head_dims: Sequence[int] = ()) -> str:
    """Empty string if backend ``name`` can run on tensors like ``t``, else the reason it cannot."""
    if name == "reference":
        return ""
    if not _is_available(name):
        hint = {
            "cpu": "dynattn._C is not built (reinstall with `pip install .`)",
            "cuda": "dynattn._C_cuda is not built with attention kernels, or no CUDA device is visible",
            "triton": "triton is not installed, or no GPU is visible (set TRITON_INTERPRET=1 to run it on CPU)",
        }[name]
        return f"backend {name!r} is unavailable: {hint}"
    if name == "cpu" and t.device.type != "cpu":
        return f"backend 'cpu' needs CPU tensors, got device {t.device}"
    if name == "cuda" and t.device.type != "cuda":
        return f"backend 'cuda' needs CUDA tensors, got device {t.device}"
    if name == "triton":
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        if t.device.type != "cuda" and not (interpret and t.device.type == "cpu"):
            return f"backend 'triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {t.device}"
        if t.dtype == torch.float64:
            return "backend 'triton' does not support float64"
    if name == "cuda" and t.dtype == torch.float64:
        return "backend 'cuda' does not support float64"
    big = [d for d in head_dims if d > MAX_HEAD_DIM]
    if big:
        return f"backend {name!r} supports head dims up to {MAX_HEAD_DIM}, got {big[0]}"
    return ""


def _auto_order(t: torch.Tensor) -> Tuple[str, ...]:
    if t.device.type == "cuda":
        return ("cuda", "triton", "reference")
    if t.device.type == "cpu":
        return ("cpu", "reference")
    return ("reference",)


def explain(t: torch.Tensor, head_dims: Sequence[int] = ()) -> List[Tuple[str, str]]:
    """``[(backend, reason_skipped or "")...]`` in the order ``"auto"`` tries them for tensors like ``t``."""
    return [(name, why_not(name, t, head_dims)) for name in _auto_order(t)]


def resolve_backend(backend: str, t: torch.Tensor, head_dims: Sequence[int] = ()) -> str:
    """Turn a user's ``backend`` argument into a concrete backend name, or raise ``ValueError``."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"backend={backend!r} is not one of {('auto',) + BACKENDS}")
    if backend == "auto":
        env = os.environ.get("DYNATTN_BACKEND", "auto")
        if env not in BACKENDS + ("auto",):
            raise ValueError(f"DYNATTN_BACKEND={env!r} is not one of {('auto',) + BACKENDS}")
        backend = env
    if backend != "auto":
        reason = why_not(backend, t, head_dims)
        if reason:
            raise ValueError(reason)
        return backend
    for name in _auto_order(t):
        reason = why_not(name, t, head_dims)
        if not reason:
            return name
        logger.debug("dynattn: auto skipped %s: %s", name, reason)
    return "reference"
