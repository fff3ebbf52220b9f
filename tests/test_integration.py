"""PyTorch integration: gradcheck, opcheck, torch.compile, FlopCounterMode, backend selection, threads."""

import math
import subprocess
import sys

import pytest
import torch

import dynattn
from dynattn import ops
from _utils import Case, interpreted, make_qkv, random_idx

SMALL = Case((6, 5), (3, 2), 2, heads=2, d=8, dv=6, batch=1)
SMALL_3D = Case((3, 4, 3), (2, 2, 1), 2, heads=1, d=4, dv=5, per_head=True)


@pytest.mark.parametrize("case", [SMALL, SMALL_3D], ids=str)
def test_gradcheck_float64(backend, device, case):
    if backend not in ("reference", "cpu"):
        pytest.skip(f"backend {backend!r} has no float64 kernels")
    q, k, v = make_qkv(case, torch.float64, device, requires_grad=True)
    idx = random_idx(case, device)

    def f(q, k, v):
        out, lse = dynattn.routed_attention(q, k, v, idx, case.regions, scale=0.7, return_lse=True, backend=backend)
        return out, lse

    assert torch.autograd.gradcheck(f, (q, k, v), eps=1e-6, atol=1e-5, rtol=1e-4)


def _op_samples(device, dtype=torch.float32):
    case = Case((6, 4), (3, 2), 2, heads=2, d=8, dv=8)
    q, k, v = make_qkv(case, dtype, device)
    idx = random_idx(case, device)
    return case, q, k, v, idx


def test_opcheck(backend, device):
    if interpreted(backend):
        pytest.skip("opcheck runs each op many times; too slow under the Triton interpreter")
    case, q, k, v, idx = _op_samples(device)
    regions = list(case.regions)
    torch.library.opcheck(torch.ops.dynattn.route.default, (q, k, regions, 2, False, backend))
    torch.library.opcheck(torch.ops.dynattn.route.default, (q, k, regions, 3, True, backend))
    for leaf in (q, k, v):
        leaf.requires_grad_(True)
    torch.library.opcheck(torch.ops.dynattn.routed_attention_fwd.default, (q, k, v, idx, regions, 0.35, backend))
    out, lse = dynattn.routed_attention(q, k, v, idx, case.regions, return_lse=True, backend=backend)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    args = (dout, dlse, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), idx, regions, 0.35, backend)
    torch.library.opcheck(torch.ops.dynattn.routed_attention_bwd.default, args)
    torch.library.opcheck(torch.ops.dynattn.routed_attention_bwd.default, (dout, None) + args[2:])


def test_torch_compile_fullgraph(backend, device):
    if interpreted(backend):
        pytest.skip("compile + interpreter is too slow; the compiled path is the same custom op")
    torch._dynamo.reset()
    case = Case((8, 8), (2, 2), 2, heads=2, d=16, dv=16)
    q, k, v = make_qkv(case, torch.float32, device, requires_grad=True)

    def f(q, k, v):
        out, lse = dynattn.bi_level_routing_attention(q, k, v, (2, 2), 2, return_lse=True, backend=backend)
        return (out * 2).sum() + lse.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    loss_eager = f(q, k, v)
    grads_eager = torch.autograd.grad(loss_eager, (q, k, v))
    torch.testing.assert_close(loss, loss_eager)
    for a, b in zip(grads, grads_eager):
        torch.testing.assert_close(a, b)


def test_torch_compile_inductor(backend, device):
    """The default inductor backend too (what users call), with the op inside a larger graph."""
    if backend != "cpu" and backend != "cuda":
        pytest.skip("one compiled-kernel backend per device is enough for the inductor check")
    torch._dynamo.reset()
    case = Case((8, 8), (4, 4), 3, heads=2, d=16, dv=16)
    q, k, v = make_qkv(case, torch.float32, device, requires_grad=True)
    idx = random_idx(case, device)

    def f(q, k, v):
        return torch.tanh(dynattn.routed_attention(q.sin(), k, v, idx, (4, 4), backend=backend)).sum()

    compiled = torch.compile(f, fullgraph=True)
    ga = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    gb = torch.autograd.grad(f(q, k, v), (q, k, v))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    B, L, H, D, Dv, S, topk = 2, 16, 3, 8, 12, 4, 3
    q = torch.randn(B, L, L, H, D, requires_grad=True)
    k = torch.randn(B, L, L, H, D, requires_grad=True)
    v = torch.randn(B, L, L, H, Dv, requires_grad=True)
    n, R = L * L, S * S
    keys = topk * n // R
    attention = 2 * B * H * n * keys * (D + Dv)  # 4*d*keys per query token per head, d split qk/v
    routing = 2 * B * n * H * D + 2 * B * R * R * H * D
    with FlopCounterMode(display=False) as counter:
        out = dynattn.bi_level_routing_attention(q, k, v, S, topk, backend="reference")
    assert counter.get_total_flops() == attention + routing
    with FlopCounterMode(display=False) as counter:
        out.sum().backward()
    assert counter.get_total_flops() == 2 * attention


def test_required_backends_are_built():
    """CI names the backends that must be present (DYNATTN_REQUIRE_BACKENDS), so a failed build cannot
    turn the matrix into skips."""
    import os

    required = [b for b in os.environ.get("DYNATTN_REQUIRE_BACKENDS", "").split(",") if b]
    missing = [b for b in required if b not in dynattn.available_backends()]
    assert not missing, f"required backends not available: {missing}"


def test_available_backends_and_auto():
    names = dynattn.available_backends()
    assert "reference" in names
    assert set(names) <= {"cpu", "cuda", "triton", "reference"}
    from dynattn.backends import explain, resolve_backend

    q = torch.randn(1, 4, 4, 1, 8)
    chosen = resolve_backend("auto", q)
    assert chosen == ("cpu" if "cpu" in names else "reference")
    reasons = dict(explain(q))
    assert reasons["reference"] == ""
    assert resolve_backend("auto", q, torch.randn(1, 4, 4, 1, 300)) == "reference"  # too large a head dim for kernels


def test_import_without_compiled_modules(tmp_path):
    """`import dynattn` works when neither dynattn._C nor dynattn._C_cuda can be loaded."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name in ('dynattn._C', 'dynattn._C_cuda'):\n"
        "            raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "sys.modules['triton'] = None  # as if triton were not installed\n"
        "import torch, dynattn\n"
        "assert dynattn.available_backends() == ['reference'], dynattn.available_backends()\n"
        "q = torch.randn(1, 4, 4, 1, 8)\n"
        "out = dynattn.bi_level_routing_attention(q, q, q, 2, 2)\n"
        "print(out.shape)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "torch.Size([1, 4, 4, 1, 8])" in res.stdout


def test_cpu_backward_identical_across_thread_counts(backend):
    if backend != "cpu":
        pytest.skip("thread-count determinism is a property of the CPU kernels")
    case = Case((16, 16), (4, 4), 3, heads=3, d=32, dv=32, batch=2, per_head=True)
    q, k, v = make_qkv(case, torch.float32, "cpu", requires_grad=True)
    idx = random_idx(case)
    g = torch.randn(case.batch, *case.spatial, case.heads, case.dv)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            out, lse = dynattn.routed_attention(q, k, v, idx, case.regions, return_lse=True, backend="cpu")
            results.append((out, lse) + torch.autograd.grad(out, (q, k, v), g))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_reference_region_helpers():
    """Partition of DESIGN.md: floor(i*L/S) bounds, row-major regions and tokens."""
    from dynattn import reference

    assert reference.region_bounds(7, 3) == [(0, 2), (2, 4), (4, 7)]
    ids = reference.token_region_ids((5, 4), (2, 2)).reshape(5, 4)
    expected = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3], [2, 2, 3, 3]])
    assert torch.equal(ids, expected)
    index, valid = reference.region_token_index((5, 4), (2, 2))
    assert index.shape == (4, 6) and valid.sum().item() == 20
    assert index[0, :4].tolist() == [0, 1, 4, 5]
    assert math.prod((5, 4)) == len(set(index[valid].tolist()))
