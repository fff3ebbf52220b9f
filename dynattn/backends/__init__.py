"""Backend registry: which kernels can run on given tensors, and which one ``"auto"`` picks.

Every backend module exposes the same functions (tensors arrive validated by ``dynattn.ops``)::

    is_available() -> bool
    route(q, k, num_regions, topk, per_head, scale) -> idx
    fwd(q, k, v, idx, num_regions, scale) -> (out, lse)
    bwd(dout, dlse, q, k, v, out, lse, idx, num_regions, scale) -> (dq, dk, dv)

``"auto"`` prefers compiled kernels, then Triton, then the reference: cpu tensors -> cpu, reference;
cuda tensors -> triton, reference (cuda first once ``backends.cuda.PREFERRED_BY_AUTO`` is set, i.e. once
its kernels are measured faster than Triton on a GPU). ``DYNATTN_BACKEND`` overrides ``"auto"``. Skipped backends and
the reason are logged at DEBUG level on the ``dynattn`` logger, and :func:`explain` returns them.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import List, Optional, Tuple

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


def why_not(name: str, t: torch.Tensor, v: Optional[torch.Tensor] = None) -> str:
    """Empty string if backend ``name`` can run on ``q``-like ``t`` (and ``v``), else the reason it cannot."""
    return _why_not(name, *_signature(t, v))


def _signature(t: torch.Tensor, v: Optional[torch.Tensor]):
    """What backend choice depends on, as hashable constants (so torch.compile can treat it as constant)."""
    dv = int(v.shape[-1]) if v is not None else int(t.shape[-1])
    return t.device.type, t.dtype, tuple(int(s) for s in t.shape), dv


def _why_not(name: str, device_type: str, dtype: torch.dtype, q_shape: Tuple[int, ...], dv: int) -> str:
    if name == "reference":
        return ""
    if not _is_available(name):
        hint = {
            "cpu": "dynattn._C is not built (reinstall with `pip install .`)",
            "cuda": "dynattn._C_cuda is not built with attention kernels, or no CUDA device is visible",
            "triton": "triton is not installed, or no GPU is visible (set TRITON_INTERPRET=1 to run it on CPU)",
        }[name]
        if name == "cuda":  # say what exactly: not built, no kernels, driver older than the runtime, no GPU
            hint = get_backend("cuda")._module_problem() or "no CUDA device is visible"
        return f"backend {name!r} is unavailable: {hint}"
    if name == "cpu" and device_type != "cpu":
        return f"backend 'cpu' needs CPU tensors, got device {device_type}"
    if name == "cuda" and device_type != "cuda":
        return f"backend 'cuda' needs CUDA tensors, got device {device_type}"
    if name == "triton":
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        if device_type != "cuda" and not (interpret and device_type == "cpu"):
            return f"backend 'triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device_type}"
        if dtype == torch.float64:
            return "backend 'triton' does not support float64"
    big = [d for d in (q_shape[-1], dv) if d > MAX_HEAD_DIM]
    if big:
        return f"backend {name!r} supports head dims up to {MAX_HEAD_DIM}, got {big[0]}"
    if name == "cuda":
        return get_backend("cuda").why_unsupported_shape(dtype, q_shape, dv)
    return ""


def _auto_order(device_type: str) -> Tuple[str, ...]:
    if device_type == "cuda":
        # The CUDA kernels join "auto" once they have been measured against Triton on a GPU.
        if getattr(get_backend("cuda"), "PREFERRED_BY_AUTO", False):
            return ("cuda", "triton", "reference")
        return ("triton", "reference")
    if device_type == "cpu":
        return ("cpu", "reference")
    return ("reference",)


def explain(t: torch.Tensor, v: Optional[torch.Tensor] = None) -> List[Tuple[str, str]]:
    """``[(backend, reason_skipped or "")...]`` in the order ``"auto"`` tries them for ``q``-like ``t``."""
    sig = _signature(t, v)
    return [(name, _why_not(name, *sig)) for name in _auto_order(sig[0])]


def resolve_backend(backend: str, t: torch.Tensor, v: Optional[torch.Tensor] = None) -> str:
    """Turn a user's ``backend`` argument into a concrete backend name, or raise ``ValueError``."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    return _resolve(backend, *_signature(t, v))


def _constant_under_compile(fn):
    """torch.compile runs ``fn`` once while tracing and bakes its result into the graph (it imports
    modules and reads the environment, which dynamo cannot trace)."""
    mark = getattr(torch.compiler, "assume_constant_result", None)
    return mark(fn) if mark is not None else fn


@_constant_under_compile
def _resolve(backend: str, device_type: str, dtype: torch.dtype, q_shape: Tuple[int, ...], dv: int) -> str:
    if backend not in BACKENDS + ("auto",):
        raise ValueError(f"backend={backend!r} is not one of {('auto',) + BACKENDS}")
    if backend == "auto":
        env = os.environ.get("DYNATTN_BACKEND", "auto")
        if env not in BACKENDS + ("auto",):
            raise ValueError(f"DYNATTN_BACKEND={env!r} is not one of {('auto',) + BACKENDS}")
        backend = env
    if backend != "auto":
        reason = _why_not(backend, device_type, dtype, q_shape, dv)
        if reason:
            raise ValueError(reason)
        return backend
    for name in _auto_order(device_type):
        reason = _why_not(name, device_type, dtype, q_shape, dv)
        if not reason:
            return name
        logger.debug("dynattn: auto skipped %s: %s", name, reason)
    return "reference"
