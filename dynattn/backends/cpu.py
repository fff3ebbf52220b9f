"""CPU backend: the fused C++ kernels of ``dynattn._C`` (``csrc/cpu``).

Tensors arrive validated by ``dynattn.ops`` (dtypes, devices, shapes, contiguous last dims, idx values).
This module only views them as 6-D ``(B, L0, L1, L2, H, D)`` (missing spatial dims inserted with size 1),
allocates contiguous outputs, and hands pointers, shapes and strides (in elements) to the kernels, which
run on ``torch.get_num_threads()`` threads with the GIL released.

The kernel ISA (``"avx512"``, ``"avx2"`` or ``"scalar"``) is chosen at first use from the CPU's features;
``DYNATTN_CPU_ISA`` forces one. Results are bitwise identical for any thread count.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

try:
    from .. import _C
except ImportError:  # not built: the backend is simply unavailable
    _C = None

_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
}


def is_available() -> bool:
    """True if the compiled CPU kernels (``dynattn._C``) could be imported."""
    return _C is not None


def threading() -> str:
    """Where the kernels' parallel loops run: ``"openmp"`` (torch's OpenMP team, found at run time, so dynattn's
    threads never compete with torch's), or ``"pool"`` (dynattn's own threads: no OpenMP runtime in the process,
    or ``DYNATTN_CPU_THREADS=pool``). Either way ``torch.get_num_threads()`` threads, bitwise the same results."""
    if _C is None:
        raise RuntimeError("dynattn._C is not built, so the CPU backend is unavailable")
    return _C.cpu_threading()


def isa() -> str:
    """The instruction set the kernels run with: ``"avx512"``, ``"avx2"`` or ``"scalar"``."""
    if _C is None:
        raise RuntimeError("dynattn._C is not built, so the CPU backend is unavailable")
    return _C.cpu_isa()


def _desc(t: torch.Tensor):
    """(data_ptr, shape, strides) of the 6-D view (B, L0, L1, L2, H, D) of a (B, *spatial, H, D) tensor."""
    for _ in range(6 - t.dim()):
        t = t.unsqueeze(t.dim() - 2)  # size-1 spatial dims go after the real ones
    return t.data_ptr(), tuple(t.shape), tuple(t.stride())


def _regions3(num_regions: Sequence[int]) -> Tuple[int, ...]:
    return tuple(int(s) for s in num_regions) + (1,) * (3 - len(num_regions))


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def route(q: torch.Tensor, k: torch.Tensor, num_regions: Tuple[int, ...], topk: int, per_head: bool,
          scale: float) -> torch.Tensor:
    """int64 ``(B, R, topk)`` (``(B, H, R, topk)`` if ``per_head``): top-k regions by ``scale * mean(q).mean(k)``."""
    B, H, R = q.shape[0], q.shape[-2], 1
    for s in num_regions:
        R *= int(s)
    idx = torch.empty((B, H, R, topk) if per_head else (B, R, topk), dtype=torch.int64)
    _C.route(_desc(q), _desc(k), _regions3(num_regions), int(topk), bool(per_head), float(scale),
             _DTYPE_NAMES[q.dtype], idx.data_ptr(), torch.get_num_threads())
    return idx


def fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, num_regions: Tuple[int, ...],
        scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)``: out ``(B, *spatial, H, Dv)`` in q's dtype, lse float32 (float64 for float64) ``(B, *spatial, H)``."""
    out = torch.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype)
    lse = torch.empty(q.shape[:-1], dtype=_lse_dtype(q.dtype))
    idx = idx.contiguous()
    _C.fwd(_desc(q), _desc(k), _desc(v), idx.data_ptr(), tuple(idx.shape), _regions3(num_regions), float(scale),
           _DTYPE_NAMES[q.dtype], out.data_ptr(), lse.data_ptr(), torch.get_num_threads())
    return out, lse


def bwd(dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        out: torch.Tensor, lse: torch.Tensor, idx: torch.Tensor, num_regions: Tuple[int, ...],
        scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)``, contiguous, shaped and typed like q, k, v. ``dlse`` (gradient of lse) may be None."""
    lse_dtype = _lse_dtype(q.dtype)
    lse = lse.to(lse_dtype).contiguous()
    dlse_ptr = 0
    if dlse is not None:
        dlse = dlse.to(lse_dtype).contiguous()
        dlse_ptr = dlse.data_ptr()
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    if out.stride(-1) != 1:
        out = out.contiguous()
    dout, out = dout.to(q.dtype), out.to(q.dtype)
    idx = idx.contiguous()
    dq = torch.empty(q.shape, dtype=q.dtype)
    dk = torch.empty(k.shape, dtype=k.dtype)
    dv = torch.empty(v.shape, dtype=v.dtype)
    _C.bwd(_desc(dout), dlse_ptr, _desc(q), _desc(k), _desc(v), _desc(out), lse.data_ptr(), idx.data_ptr(),
           tuple(idx.shape), _regions3(num_regions), float(scale), _DTYPE_NAMES[q.dtype], dq.data_ptr(),
           dk.data_ptr(), dv.data_ptr(), torch.get_num_threads())
    return dq, dk, dv
