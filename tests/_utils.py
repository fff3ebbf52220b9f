"""Shared helpers for the test matrix: cases, inputs, tolerances, backend availability."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Tuple

import torch

import dynattn
from dynattn import reference


def backend_skip_reason(name: str) -> str:
    if name in dynattn.available_backends():
        if name in ("cuda",) and not torch.cuda.is_available():
            return "no CUDA device visible"
        return ""
    why = {
        "cpu": "dynattn._C is not built",
        "cuda": "the CUDA backend needs dynattn._C_cuda with attention kernels and a CUDA device",
        "triton": "triton is not installed, or no GPU and TRITON_INTERPRET is not 1",
    }
    return f"backend {name!r} unavailable: {why.get(name, '')}"


def backend_device(name: str) -> str:
    if name == "cuda":
        return "cuda"
    if name == "triton":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


def skip_if_unsupported(backend: str, q, v=None) -> None:
    """Skip (with the backend's own reason) cases outside a backend's documented support, e.g. float32 or
    head dim 48 on the CUDA tensor-core kernels."""
    import pytest
    from dynattn.backends import why_not

    reason = why_not(backend, q, v)
    if reason:
        pytest.skip(reason)


def interpreted(backend: str) -> bool:
    """Triton under the CPU interpreter: slow, so it runs a reduced matrix."""
    return backend == "triton" and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class Case:
    spatial: Tuple[int, ...]
    regions: Tuple[int, ...]
    topk: int
    heads: int = 2
    d: int = 32
    dv: int = 32
    batch: int = 1
    per_head: bool = False
    layout: str = "contiguous"  # or "qkv": q/k/v are strided views of one fused projection
    small: bool = False  # part of the reduced matrix run under the Triton interpreter

    @property
    def R(self) -> int:
        return math.prod(self.regions)

    def __str__(self) -> str:
        grid = "x".join(map(str, self.spatial))
        reg = "x".join(map(str, self.regions))
        return (
            f"{grid}/{reg}-k{self.topk}-b{self.batch}h{self.heads}-d{self.d}v{self.dv}"
            f"{'-perhead' if self.per_head else ''}{'-qkv' if self.layout == 'qkv' else ''}"
        )


CASES = [
    Case((16,), (4,), 2, heads=2, d=16, dv=16, small=True),
    Case((19,), (5,), 1, heads=1, d=32, dv=16, per_head=True),
    Case((8, 8), (2, 2), 4, heads=2, d=32, dv=32, small=True),
    Case((16, 16), (4, 4), 3, heads=2, d=64, dv=64, batch=2, per_head=True),
    Case((7, 9), (3, 4), 5, heads=3, d=16, dv=24, small=True),
    Case((10, 6), (4, 3), 1, heads=2, d=128, dv=64),
    Case((4, 6, 5), (2, 3, 2), 3, heads=2, d=32, dv=16, small=True),
    Case((5, 5, 3), (2, 2, 1), 2, heads=2, d=16, dv=16, per_head=True, batch=2),
    Case((6, 6), (6, 6), 4, heads=2, d=16, dv=16),  # one-token regions
    Case((8, 8), (4, 4), 2, heads=4, d=32, dv=32, layout="qkv", small=True),
    Case((6, 7), (2, 3), 3, heads=2, d=48, dv=48, layout="qkv", per_head=True),
    Case((12, 12), (3, 3), 2, heads=2, d=48, dv=80, batch=3),
    Case((14, 14), (7, 7), 16, heads=1, d=32, dv=32, batch=2),  # BiFormer stage-3-like 2x2 regions
    # topk 1 with 64-token regions (BiFormer stage-1-like): the CPU backward's single-pass path; padded head dims
    Case((24, 16), (3, 2), 1, heads=2, d=24, dv=40, batch=2),
    Case((16, 16), (2, 2), 1, heads=2, d=32, dv=32, per_head=True, layout="qkv"),
]

# Absolute + relative tolerance per dtype, for outputs and gradients compared with the float32 reference
# evaluated on the same (rounded) inputs.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def make_qkv(case: Case, dtype=torch.float32, device="cpu", requires_grad=False):
    B, H = case.batch, case.heads
    if case.layout == "qkv":
        # one fused projection (B, *spatial, 3, H, Dmax); q/k/v are non-contiguous views of it
        dmax = max(case.d, case.dv)
        qkv = torch.randn(B, *case.spatial, 3, H, dmax, dtype=torch.float32, device=device).to(dtype)
        q, k, v = qkv[..., 0, :, : case.d], qkv[..., 1, :, : case.d], qkv[..., 2, :, : case.dv]
        assert not q.is_contiguous()
    else:
        q = torch.randn(B, *case.spatial, H, case.d, device=device).to(dtype)
        k = torch.randn(B, *case.spatial, H, case.d, device=device).to(dtype)
        v = torch.randn(B, *case.spatial, H, case.dv, device=device).to(dtype)
    if requires_grad:
        if case.layout == "qkv":
            q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))  # leaves that stay strided views
        else:
            for t in (q, k, v):
                t.requires_grad_(True)
    return q, k, v


def random_idx(case: Case, device="cpu") -> torch.Tensor:
    """Random routing: each row holds topk distinct regions in random order."""
    shape = (case.batch, case.heads, case.R) if case.per_head else (case.batch, case.R)
    return torch.rand(*shape, case.R, device=device).argsort(-1)[..., : case.topk].contiguous()


def assert_close(actual, expected, dtype, what=""):
    atol, rtol = TOL[dtype]
    # half-precision gradients grow with the tensor's scale: tolerate relative to its magnitude
    scale = max(1.0, expected.detach().float().abs().max().item())
    torch.testing.assert_close(
        actual.detach().float(), expected.detach().float(), atol=atol * scale, rtol=rtol, msg=lambda m: f"{what}: {m}"
    )


def reference_outputs(q, k, v, idx, regions, scale=None):
    """Reference out/lse and gradients of a fixed random loss, on float32 copies of the inputs."""
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    leaves = [t.detach().to(cdt).requires_grad_(True) for t in (q, k, v)]
    out, lse = reference.routed_attention(*leaves, idx, regions, scale=scale, return_lse=True)
    return leaves, out, lse
