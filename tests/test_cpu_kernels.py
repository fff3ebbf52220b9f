"""Developer tests of the CPU kernels (dynattn/backends/cpu.py + dynattn._C) against dynattn.reference.

The shared backend matrix lives in test_matrix.py; these cover kernel-specific corners: every ISA path,
odd head dims and region sizes (tails of the SIMD tiles, regions split across key chunks and row blocks),
strided views, bitwise determinism across thread counts, and the C++ argument checks.
"""

import math
import os
import subprocess
import sys

import pytest
import torch

from dynattn import reference as ref
from dynattn.backends import cpu

pytestmark = pytest.mark.skipif(not cpu.is_available(), reason="dynattn._C is not built")

if cpu.is_available():
    from dynattn import _C

ISAS = ["scalar", "avx2", "avx512"]
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def _supported(isa):
    try:
        _C.set_cpu_isa(isa)
        return True
    except ValueError:
        return False


@pytest.fixture(params=ISAS)
def isa(request):
    default = _C.cpu_isa()
    if not _supported(request.param):
        pytest.skip(f"{request.param} not supported by this CPU/build")
    yield request.param
    _C.set_cpu_isa(default)


def _inputs(spatial, H, D, Dv, dtype, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, *spatial, H, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    v = torch.randn(B, *spatial, H, Dv, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def _random_idx(B, H, R, topk, per_head, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = B * (H if per_head else 1) * R
    idx = torch.stack([torch.randperm(R, generator=g)[:topk] for _ in range(rows)])
    return idx.reshape((B, H, R, topk) if per_head else (B, R, topk))


def _err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1)).item()


CASES = [
    # spatial, num_regions, H, D, Dv, topk, per_head
    ((16, 16), (2, 2), 2, 32, 32, 2, False),
    ((17,), (4,), 3, 17, 9, 3, False),  # odd dims, non-divisible extent
    ((5, 7, 6), (2, 3, 2), 2, 16, 24, 5, False),  # 3-D, d_v != d_qk
    ((9, 10), (3, 3), 2, 8, 8, 4, True),  # per-head routing
    ((130,), (2,), 1, 40, 33, 1, False),  # regions of 65 tokens: two row blocks, chunk straddles regions
    ((7, 7), (7, 7), 2, 3, 5, 49, False),  # 1-token regions, topk = R (dense)
    ((12, 12), (6, 6), 4, 64, 64, 16, False),  # 2x2 regions concatenated into key chunks
    ((8, 8), (2, 2), 1, 256, 256, 2, False),  # largest head dim
    ((6, 6), (3, 3), 2, 1, 1, 4, False),  # head dim 1
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-H{c[2]}-d{c[3]}-{c[4]}-k{c[5]}-{'ph' if c[6] else 'sh'}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_fwd_bwd_match_reference(isa, case, dtype):
    spatial, regions, H, D, Dv, topk, per_head = case
    B, R = 2, math.prod(regions)
    q, k, v = _inputs(spatial, H, D, Dv, dtype)
    idx = _random_idx(B, H, R, topk, per_head)
    scale = D ** -0.5
    out, lse = cpu.fwd(q, k, v, idx, regions, scale)
    assert out.dtype == dtype and out.shape == (B, *spatial, H, Dv) and out.is_contiguous()
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    cd = torch.float64
    o_ref, l_ref = ref.routed_attention(q.to(cd), k.to(cd), v.to(cd), idx, regions, scale=scale, return_lse=True)
    tol = TOL[dtype]
    assert _err(out, o_ref) < tol
    assert _err(lse, l_ref) < max(tol, 1e-6)

    g = torch.Generator().manual_seed(1)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)
    dlse = torch.randn(lse.shape, generator=g, dtype=torch.float64).to(lse.dtype)
    for dl in (None, dlse):
        dq, dk, dv = cpu.bwd(dout, dl, q, k, v, out, lse, idx, regions, scale)
        rq, rk, rv = ref.routed_attention_backward(dout.to(cd), None if dl is None else dl.to(cd), q.to(cd), k.to(cd),
                                                   v.to(cd), idx, regions, scale=scale)
        for got, want in ((dq, rq), (dk, rk), (dv, rv)):
            assert got.dtype == dtype and got.shape == want.shape and got.is_contiguous()
            assert _err(got, want) < 4 * tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_outputs_use_streaming_stores(isa, dtype):
    # Outputs >= 2 MiB are written with non-temporal stores (fp32/fp16/bf16 rows of whole cache lines).
    spatial, regions, H, D = (64, 64), (8, 8), 4, 32
    q, k, v = _inputs(spatial, H, D, D, dtype)
    idx = _random_idx(2, H, 64, 3, False)
    out, lse = cpu.fwd(q, k, v, idx, regions, 0.2)
    assert out.numel() * out.element_size() >= 2 << 20
    o_ref = ref.routed_attention(q.double(), k.double(), v.double(), idx, regions, scale=0.2)
    assert _err(out, o_ref) < TOL[dtype]
    dout = torch.randn(out.shape, dtype=torch.float64).to(dtype)
    got = cpu.bwd(dout, None, q, k, v, out, lse, idx, regions, 0.2)
    want = ref.routed_attention_backward(dout.double(), None, q.double(), k.double(), v.double(), idx, regions,
                                         scale=0.2)
    for a, b in zip(got, want):
        assert _err(a, b) < 4 * TOL[dtype]


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3], CASES[6]], ids=str)
def test_route_matches_reference(isa, case):
    spatial, regions, H, D, _, topk, per_head = case
    q, k, _ = _inputs(spatial, H, D, 1, torch.float32)
    scale = (D if per_head else H * D) ** -0.5
    idx = cpu.route(q, k, regions, topk, per_head, scale)
    want = ref.route(q, k, regions, topk, per_head=per_head)
    assert idx.dtype == torch.int64 and idx.is_contiguous()
    assert torch.equal(idx, want)


def test_route_ties_prefer_lower_region():
    q = torch.ones(1, 8, 8, 2, 4)
    k = torch.ones(1, 8, 8, 2, 4)
    idx = cpu.route(q, k, (4, 4), 5, False, 0.5)
    assert torch.equal(idx, torch.arange(5).expand(1, 16, 5))


def test_fused_qkv_views_and_strided_dout():
    B, S, H, D = 2, 12, 3, 16
    qkv = torch.randn(B, S, S, 3 * H * D + 8)[..., : 3 * H * D].reshape(B, S, S, 3, H, D)
    q, k, v = qkv.unbind(3)  # non-contiguous views into one buffer
    idx = _random_idx(B, H, 9, 3, False)
    out, lse = cpu.fwd(q, k, v, idx, (3, 3), 0.25)
    o_ref = ref.routed_attention(q.contiguous(), k.contiguous(), v.contiguous(), idx, (3, 3), scale=0.25)
    assert _err(out, o_ref) < 2e-5
    dout = torch.randn(B, S, S, H, 2 * D)[..., ::2]  # strided last dim: the wrapper copies it
    dq, dk, dv = cpu.bwd(dout, None, q, k, v, out, lse, idx, (3, 3), 0.25)
    ones = torch.ones(()).expand_as(out)  # all strides 0, as autograd hands out for out.sum()
    dq1, _, _ = cpu.bwd(ones, None, q, k, v, out, lse, idx, (3, 3), 0.25)
    rq, rk, rv = ref.routed_attention_backward(dout.contiguous(), None, q.contiguous(), k.contiguous(),
                                               v.contiguous(), idx, (3, 3), scale=0.25)
    rq1, _, _ = ref.routed_attention_backward(ones.contiguous(), None, q.contiguous(), k.contiguous(),
                                              v.contiguous(), idx, (3, 3), scale=0.25)
    assert _err(dq, rq) < 1e-4 and _err(dk, rk) < 1e-4 and _err(dv, rv) < 1e-4 and _err(dq1, rq1) < 1e-4


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("topk", [6, 1])  # topk 1: the single-pass backward
def test_bitwise_deterministic_across_thread_counts(isa, per_head, topk):
    spatial, regions, H, D = (24, 20), (4, 5), 4, 32
    q, k, v = _inputs(spatial, H, D, D, torch.float32)
    idx = _random_idx(2, H, 20, topk, per_head)
    saved = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out, lse = cpu.fwd(q, k, v, idx, regions, 0.2)
            grads = cpu.bwd(torch.ones_like(out), lse, q, k, v, out, lse, idx, regions, 0.2)
            route = cpu.route(q, k, regions, topk, per_head, 0.1)
            results.append((out, lse, *grads, route))
    finally:
        torch.set_num_threads(saved)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("topk", [2, 1])  # topk 1: the single-pass backward
def test_gradcheck_float64(topk):
    from dynattn import routed_attention

    q, k, v = (t.requires_grad_() for t in _inputs((5, 4), 2, 3, 2, torch.float64, B=1))
    idx = _random_idx(1, 2, 4, topk, False)

    def f(q, k, v):
        out, lse = routed_attention(q, k, v, idx, (2, 2), return_lse=True, backend="cpu")
        return out, lse

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_cpp_rejects_out_of_range_idx():
    q, k, v = _inputs((8, 8), 2, 4, 4, torch.float32)
    idx = _random_idx(2, 2, 4, 2, False)
    idx[1, 3, 1] = 4
    with pytest.raises(ValueError, match=r"idx values must lie in \[0, R=4\)"):
        cpu.fwd(q, k, v, idx, (2, 2), 0.5)
    idx[1, 3, 1] = -1
    with pytest.raises(ValueError, match="idx values"):
        cpu.bwd(torch.ones(2, 8, 8, 2, 4), None, q, k, v, q, torch.zeros(2, 8, 8, 2), idx, (2, 2), 0.5)


def test_cpp_rejects_bad_shapes():
    q, k, v = _inputs((8, 8), 2, 4, 4, torch.float32)
    idx = _random_idx(2, 2, 4, 2, False)
    with pytest.raises(ValueError, match="num_regions"):
        cpu.fwd(q, k, v, idx, (9, 2), 0.5)
    with pytest.raises(ValueError, match="idx: expected shape"):
        cpu.fwd(q, k, v, idx[:, :3], (2, 2), 0.5)
    with pytest.raises(ValueError, match="k: batch/grid/head sizes differ"):
        cpu.fwd(q, k[:, :4], v, idx, (2, 2), 0.5)


def test_env_var_selects_isa(tmp_path):
    # run from an empty folder: the child imports the same dynattn as this process (installed, or PYTHONPATH)
    code = "from dynattn.backends import cpu; print(cpu.isa())"
    for name in ("scalar", "avx2", "avx512"):
        if not _supported(name):
            continue
        env = dict(os.environ, DYNATTN_CPU_ISA=name)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == name
    env = dict(os.environ, DYNATTN_CPU_ISA="sse9")
    code = "from dynattn.backends import cpu\ntry:\n    cpu.isa()\nexcept ValueError as e:\n    print(e)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "DYNATTN_CPU_ISA=sse9" in out.stdout


_THREADING_CHILD = """
import torch
from dynattn.backends import cpu
torch.manual_seed(0)
q, k, v = (torch.randn(2, 24, 20, 4, 32) for _ in range(3))
idx = cpu.route(q, k, (4, 5), 3, False, 0.1)
results = []
for threads in (1, 2, 3):
    torch.set_num_threads(threads)
    out, lse = cpu.fwd(q, k, v, idx, (4, 5), 0.2)
    results.append((out, lse) + cpu.bwd(torch.ones_like(out), lse, q, k, v, out, lse, idx, (4, 5), 0.2))
same = all(torch.equal(a, b) for other in results[1:] for a, b in zip(results[0], other))
torch.save(results[1], {path!r})
print(cpu.threading(), same)
"""


def test_threading_backends_give_bitwise_identical_results(tmp_path):
    """Loops run on torch's OpenMP team when one is loaded (the default with torch), else on dynattn's own pool
    (DYNATTN_CPU_THREADS=pool): the same results, bitwise, for every thread count."""
    saved = {}
    for mode in ("openmp", "pool"):
        path = str(tmp_path / f"{mode}.pt")
        env = dict(os.environ, DYNATTN_CPU_THREADS=mode if mode == "pool" else "")
        out = subprocess.run([sys.executable, "-c", _THREADING_CHILD.format(path=path)], env=env,
                             capture_output=True, text=True, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        backend, same = out.stdout.split()
        assert same == "True"
        if mode == "pool":
            assert backend == "pool"
        saved[mode] = (backend, torch.load(path))
    # torch built with OpenMP has its runtime loaded by import time, and dynattn must find it
    assert saved["openmp"][0] == ("openmp" if torch.backends.openmp.is_available() else "pool")
    for a, b in zip(saved["openmp"][1], saved["pool"][1]):
        assert torch.equal(a, b)
