"""CUDA backend: kernels in ``csrc/cuda`` built into ``dynattn._C_cuda`` where nvcc is present.

The module currently carries the build and runtime plumbing only (``has_attention_kernels`` is False), so
``is_available()`` is False and ``"auto"`` picks Triton or the reference on GPUs.
"""

from __future__ import annotations

try:
    from .. import _C_cuda as _ext
except ImportError:  # not built (no nvcc at install time) or no CUDA runtime usable: never fatal
    _ext = None


def is_built() -> bool:
    return _ext is not None


def is_available() -> bool:
    if _ext is None or not getattr(_ext, "has_attention_kernels", False):
        return False
    import torch

    return torch.cuda.is_available()


def _missing(*args, **kwargs):
    raise NotImplementedError("the CUDA attention kernels are not implemented yet; use backend='triton'")


route = fwd = bwd = _missing
