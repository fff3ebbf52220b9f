"""The CUDA kernels (csrc/cuda) on CPU, through the emulator in tests/cuda_emu, against dynattn.reference.

The emulated module is csrc/cuda compiled as C++ with the PTX wrappers replaced by spec implementations of
cp.async / ldmatrix / mma.sync and every block's threads run as fibers (tests/cuda_emu/README.md). The real
``dynattn.backends.cuda`` drives it on CPU tensors: its module handle, device checks and stream lookup are
monkeypatched for the duration of each test; its output and scratch buffers are poisoned (NaN / -7777) so an
element a kernel fails to write shows up, and every tensor handed to the kernels is registered so a cp.async
that reads outside all of them fails the test (a Python RuntimeError, never a crash).

No GPU or nvcc is needed: g++, pybind11 and the CUDA headers (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h) are;
the tests skip with the reason when one is missing. The default run covers every kernel code path; the rest
of the shapes are ``slow`` (``pytest tests/test_cuda_emulated.py -m slow``).
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import zlib
from pathlib import Path

import pytest
import torch

from dynattn import reference
from _utils import Case, assert_close, make_qkv, random_idx

_BUILD_PY = Path(__file__).resolve().parent / "cuda_emu" / "build.py"
_spec = importlib.util.spec_from_file_location("_dynattn_cuda_emu_build", _BUILD_PY)
emu_build = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))
if not hasattr(emu_build, "build"):
    _spec.loader.exec_module(emu_build)

HALF = (torch.float16, torch.bfloat16)
slow = pytest.mark.slow

# (case, what it adds). Default cases together reach: 1/2/3 spatial dims, non-divisible extents, 1-token and
# 2x2 regions, per-head routing, d_qk < d_v and d_qk > d_v, padded head dim D = 32/64/128, blocks of 1..4
# warps, strided views of a fused qkv, and the 64/65-token regions whose second query tile exits early.
DEFAULT = [
    (Case((19,), (5,), 1, heads=1, d=32, dv=64, per_head=True), "1-D non-divisible, per-head, dqk<dv, D=64"),
    (Case((8, 8), (4, 4), 2, heads=4, d=32, dv=32, layout="qkv"), "2x2 regions, strided qkv views, D=32"),
    (Case((4, 6, 5), (2, 3, 2), 3, heads=2, d=32, dv=32), "3-D, non-divisible"),
    (Case((33,), (33,), 5, heads=1, d=128, dv=32), "one-token regions, dqk>dv, D=128 (32-row tiles)"),
    (Case((10, 12), (2, 2), 2, heads=3, d=64, dv=32, batch=2), "30-token regions: 2 warps, dqk>dv, batch 2"),
    (Case((12, 13), (2, 2), 2, heads=1, d=128, dv=128, layout="qkv"), "42-token regions: 3 warps, D=128, qkv"),
    (Case((129,), (2,), 2, heads=1, d=32, dv=32), "regions of 64 and 65: 4 warps, 2 query tiles, early exit"),
]
SLOW = [
    Case((16,), (4,), 2, heads=2, d=32, dv=32),
    Case((8, 8), (2, 2), 4, heads=2, d=32, dv=32),
    Case((16, 16), (4, 4), 3, heads=2, d=64, dv=64, batch=2, per_head=True),
    Case((7, 9), (3, 4), 5, heads=3, d=32, dv=128),
    Case((10, 6), (4, 3), 1, heads=2, d=128, dv=64),
    Case((6, 6), (6, 6), 4, heads=2, d=32, dv=32),
    Case((14, 14), (7, 7), 16, heads=1, d=32, dv=32, batch=2),
    Case((16, 16), (2, 2), 2, heads=1, d=64, dv=64),
    Case((20, 10), (2, 1), 2, heads=1, d=32, dv=32),
    Case((40,), (5,), 5, heads=2, d=64, dv=128),
    Case((9, 9, 4), (3, 3, 2), 7, heads=2, d=32, dv=32, per_head=True),
]
CASES = [pytest.param(c, id=str(c)) for c, _ in DEFAULT] + [pytest.param(c, id=str(c), marks=slow) for c in SLOW]


# --------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def emu_module(tmp_path_factory):
    """The emulated _C_cuda, built once per session into a temporary folder."""
    try:
        toolchain = emu_build.find_toolchain()
    except emu_build.Unavailable as e:
        pytest.skip(f"CUDA emulator unavailable: {e}")
    extra = os.environ.get("DYNATTN_EMU_CXXFLAGS", "").split()  # e.g. "-O0 -g" to debug a kernel in gdb
    so = emu_build.build(tmp_path_factory.mktemp("cuda_emu"), toolchain=toolchain, extra_flags=extra)
    return emu_build.load(so)


class _PoisoningTorch:
    """Stands in for ``torch`` inside dynattn.backends.cuda: the buffers it allocates come back filled with
    NaN (floats) or -7777 (integers) and registered as valid memory for the emulator's bounds checks."""

    def __init__(self, register):
        self._register = register

    def __getattr__(self, name):
        return getattr(torch, name)

    def _poison(self, t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype in (torch.int64, torch.int32):
            t.fill_(-7777)
        self._register(t)
        return t

    def empty(self, *args, **kwargs):
        return self._poison(torch.empty(*args, **kwargs))

    def empty_like(self, *args, **kwargs):
        return self._poison(torch.empty_like(*args, **kwargs))


class Emulated:
    """dynattn.backends.cuda running on the emulator; ``register`` marks tensors as valid cp.async sources."""

    def __init__(self, cuda, module):
        self.cuda = cuda
        self.module = module

    def register(self, *tensors):
        for t in tensors:
            if t is not None:
                s = t.untyped_storage()
                self.module.emu_register(s.data_ptr(), s.nbytes())

    def __getattr__(self, name):  # route, fwd, bwd
        return getattr(self.cuda, name)


@pytest.fixture
def emu(emu_module, monkeypatch):
    from dynattn.backends import cuda

    h = Emulated(cuda, emu_module)

    def require(q, v, num_regions, topk):  # cuda._require without the device check: same support limits
        reason = cuda.why_unsupported_shape(q.dtype, tuple(q.shape), int(v.shape[-1])) if v is not None else ""
        reason = reason or cuda._size_problem(tuple(q.shape), num_regions, topk)
        if reason:
            raise ValueError(reason)

    tensor_arg = cuda._tensor
    inverse = cuda.inverse_routing_index

    def registered_tensor(t):  # every strided tensor argument, including copies made by _aligned
        h.register(t)
        return tensor_arg(t)

    def registered_inverse(idx, R):
        offsets, regions = inverse(idx, R)
        h.register(offsets, regions)
        return offsets, regions

    monkeypatch.setattr(cuda, "_ext", emu_module)
    monkeypatch.setattr(cuda, "_module_problem", lambda: "")
    monkeypatch.setattr(cuda, "_require", require)
    monkeypatch.setattr(cuda, "_launch", lambda t: (0, 0))
    monkeypatch.setattr(cuda, "_tensor", registered_tensor)
    monkeypatch.setattr(cuda, "inverse_routing_index", registered_inverse)
    monkeypatch.setattr(cuda, "torch", _PoisoningTorch(lambda t: h.register(t)))
    emu_module.emu_clear()
    yield h
    emu_module.emu_clear()


def _seed(*key):
    torch.manual_seed(zlib.crc32(repr(key).encode()) % 1000)


# --------------------------------------------------------------------------------------------------
# attention forward / backward
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_forward_backward(emu, case, dtype):
    """out and lse, then dq/dk/dv: with the lse gradient for float16, without it for bfloat16 (each shape runs
    both), the backward repeated to check that it is bitwise deterministic."""
    _seed(str(case))
    with_dlse = dtype == torch.float16
    q, k, v = make_qkv(case, dtype, "cpu")
    idx = random_idx(case, "cpu")
    emu.register(q, k, v, idx)
    scale = case.d ** -0.5

    out, lse = emu.fwd(q, k, v, idx, case.regions, scale)
    assert out.shape == (case.batch, *case.spatial, case.heads, case.dv) and out.dtype == dtype
    assert lse.shape == (case.batch, *case.spatial, case.heads) and lse.dtype == torch.float32
    g_out = torch.randn(out.shape).to(dtype)
    g_lse = torch.randn(lse.shape) if with_dlse else None
    emu.register(out, lse, g_out, g_lse)
    grads = emu.bwd(g_out, g_lse, q, k, v, out, lse, idx, case.regions, scale)
    again = emu.bwd(g_out, g_lse, q, k, v, out, lse, idx, case.regions, scale)

    leaves = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
    ref_out, ref_lse = reference.routed_attention(*leaves, idx, case.regions, scale=scale, return_lse=True)
    assert_close(out, ref_out, dtype, "out")
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-4, msg=lambda m: f"lse: {m}")
    outs, seeds = ([ref_out, ref_lse], [g_out.float(), g_lse]) if with_dlse else ([ref_out], [g_out.float()])
    expected = torch.autograd.grad(outs, leaves, seeds)
    for name, a, e, src in zip(("dq", "dk", "dv"), grads, expected, (q, k, v)):
        assert a.shape == src.shape and a.dtype == dtype, (name, a.shape, a.dtype)
        assert_close(a, e, dtype, name)
    for name, a, b in zip(("dq", "dk", "dv"), grads, again):
        assert torch.equal(a, b), f"{name}: backward is not bitwise repeatable"


def test_expanded_inputs(emu):
    """A stride-0 (expanded) batch dim on q and an expanded, non-contiguous output gradient: read in place."""
    case = Case((8, 8), (2, 2), 2, heads=2, d=32, dv=32, batch=3)
    dtype = torch.float16
    _seed("expanded")
    q1, k1, v1 = make_qkv(Case((8, 8), (2, 2), 2, heads=2, d=32, dv=32, batch=1), dtype, "cpu")
    q = q1.expand(3, *q1.shape[1:])
    k = k1.expand(3, *k1.shape[1:]).contiguous()
    v = v1.expand(3, *v1.shape[1:]).contiguous()
    idx = random_idx(case, "cpu")
    emu.register(q, k, v, idx)
    out, lse = emu.fwd(q, k, v, idx, case.regions, 0.2)
    g = torch.randn(1, 1, 1, 2, 32).to(dtype).expand(out.shape)
    emu.register(out, lse, g)
    dq, dk, dv = emu.bwd(g, None, q, k, v, out, lse, idx, case.regions, 0.2)

    leaves = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
    ref = reference.routed_attention(*leaves, idx, case.regions, scale=0.2)
    rq, rk, rv = torch.autograd.grad(ref, leaves, g.float())
    for name, a, e in (("out", out, ref), ("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        assert_close(a, e, dtype, name)


# --------------------------------------------------------------------------------------------------
# routing
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, *HALF], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_route(emu, case, dtype):
    _seed("route", str(case))
    q, k, _ = make_qkv(case, dtype, "cpu")
    emu.register(q, k)
    scale = case.d ** -0.5 if case.per_head else (case.heads * case.d) ** -0.5
    idx = emu.route(q, k, case.regions, case.topk, case.per_head, scale)
    expected = reference.route(q, k, case.regions, case.topk, per_head=case.per_head)
    assert torch.equal(idx, expected), f"route mismatch:\n{idx}\nexpected\n{expected}"


# --------------------------------------------------------------------------------------------------
# the emulator itself
# --------------------------------------------------------------------------------------------------


def test_emulator_reports_out_of_bounds_reads(emu, monkeypatch):
    """A cp.async outside every registered tensor raises (not aborts), and the emulator keeps working."""
    case = DEFAULT[1][0]
    q, k, v = make_qkv(case, torch.float16, "cpu")
    idx = random_idx(case, "cpu")
    sentinel = torch.zeros(8)
    emu.register(sentinel)  # checks on, but nothing the kernels read is registered
    with monkeypatch.context() as m:
        m.setattr(emu, "register", lambda *tensors: None)
        with pytest.raises(RuntimeError, match="outside every registered tensor"):
            emu.fwd(q, k, v, idx, case.regions, 0.2)
    emu.module.emu_clear()
    out, _ = emu.fwd(q, k, v, idx, case.regions, 0.2)
    assert torch.isfinite(out).all()


def test_default_cases_cover_every_path():
    """The default (not slow) shapes keep reaching every kernel configuration the comment above DEFAULT lists."""
    cases = [c for c, _ in DEFAULT]

    def region_sizes(c):  # token counts of the smallest and largest region
        lo = [length // s for length, s in zip(c.spatial, c.regions)]
        hi = [-(-length // s) for length, s in zip(c.spatial, c.regions)]
        return math.prod(lo), math.prod(hi)

    warps = {min(4, max(1, -(-region_sizes(c)[1] // 16))) for c in cases}
    assert warps == {1, 2, 3, 4}, warps
    assert {max(c.d, c.dv) for c in cases} == {32, 64, 128}
    assert {len(c.spatial) for c in cases} == {1, 2, 3}
    assert any(c.d < c.dv for c in cases) and any(c.d > c.dv for c in cases)
    assert any(c.per_head for c in cases) and any(not c.per_head for c in cases)
    assert any(c.layout == "qkv" for c in cases) and any(c.batch > 1 for c in cases)
    assert any(any(length % s for length, s in zip(c.spatial, c.regions)) for c in cases), "non-divisible"
    assert any(region_sizes(c)[1] == 1 for c in cases), "one-token regions"
    assert any(region_sizes(c)[1] == 4 and len(c.spatial) == 2 for c in cases), "2x2 regions"
    assert any(region_sizes(c) == (64, 65) for c in cases), "a 64-token region next to a 65-token one"
