"""The shared test matrix: every backend against dynattn.reference (float32 math on the same inputs)."""

import math

import pytest
import torch
import torch.nn.functional as F

import dynattn
from dynattn import reference
from _utils import (
    CASES,
    Case,
    assert_close,
    interpreted,
    make_qkv,
    random_idx,
    reference_outputs,
    skip_if_unsupported,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _skip_if_reduced(backend, case: Case, dtype=torch.float32):
    if interpreted(backend) and not case.small:
        pytest.skip("reduced matrix under the Triton interpreter (the small cases cover the same code paths)")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_backward(backend, device, case, dtype):
    _skip_if_reduced(backend, case, dtype)
    q, k, v = make_qkv(case, dtype, device, requires_grad=True)
    skip_if_unsupported(backend, q, v)
    idx = random_idx(case, device)
    out, lse = dynattn.routed_attention(q, k, v, idx, case.regions, return_lse=True, backend=backend)
    assert out.shape == (case.batch, *case.spatial, case.heads, case.dv) and out.dtype == dtype
    assert lse.shape == (case.batch, *case.spatial, case.heads) and lse.dtype == torch.float32

    leaves, ref_out, ref_lse = reference_outputs(q, k, v, idx, case.regions)
    assert_close(out, ref_out, dtype, "out")
    torch.testing.assert_close(lse, ref_lse, atol=1e-3 if dtype != torch.float32 else 1e-5, rtol=1e-4)

    # gradients of a random loss through out and lse
    g_out = torch.randn_like(ref_out)
    g_lse = torch.randn_like(ref_lse)
    dq, dk, dv = torch.autograd.grad(
        [out, lse], [q, k, v], [g_out.to(dtype), g_lse]
    )
    rq, rk, rv = torch.autograd.grad([ref_out, ref_lse], leaves, [g_out.to(dtype).float(), g_lse])
    for name, a, e in (("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)):
        assert a.shape == e.shape and a.dtype == dtype
        assert_close(a, e, dtype, name)


@pytest.mark.parametrize("case", [c for c in CASES if c.small], ids=str)
def test_backward_without_lse(backend, device, case):
    """Only `out` used: the lse gradient is absent and must not leak into dq/dk."""
    q, k, v = make_qkv(case, torch.float32, device, requires_grad=True)
    skip_if_unsupported(backend, q, v)
    idx = random_idx(case, device)
    out = dynattn.routed_attention(q, k, v, idx, case.regions, backend=backend)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [q, k, v], g)
    leaves, ref_out, _ = reference_outputs(q, k, v, idx, case.regions)
    ref_grads = torch.autograd.grad(ref_out, leaves, g)
    for a, e in zip(grads, ref_grads):
        assert_close(a, e, torch.float32)


@pytest.mark.parametrize(
    "case",
    [
        Case((8, 8), (2, 2), 4, heads=2, d=32, dv=32, small=True),
        Case((6, 10), (3, 2), 6, heads=3, d=16, dv=24, small=True),
        Case((3, 4, 5), (1, 2, 2), 4, heads=2, d=16, dv=16, per_head=True, small=True),
    ],
    ids=str,
)
def test_all_regions_equals_dense_sdpa(backend, device, case):
    """topk == R: routed attention is dense attention, checked against scaled_dot_product_attention."""
    q, k, v = make_qkv(case, torch.float32, device, requires_grad=True)
    skip_if_unsupported(backend, q, v)
    idx = dynattn.route(q, k, case.regions, case.R, per_head=case.per_head, backend=backend)
    out = dynattn.routed_attention(q, k, v, idx, case.regions, scale=0.3, backend=backend)
    B, H, n = case.batch, case.heads, math.prod(case.spatial)

    def heads_first(t):
        return t.reshape(B, n, H, t.shape[-1]).transpose(1, 2)

    dense = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v), scale=0.3)
    dense = dense.transpose(1, 2).reshape(out.shape)
    torch.testing.assert_close(out, dense, atol=2e-5, rtol=2e-5)
    g = torch.randn_like(out)
    for a, e in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(dense, (q, k, v), g)):
        torch.testing.assert_close(a, e, atol=5e-5, rtol=5e-5)


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize(
    "spatial,regions,topk",
    [((16,), (4,), 2), ((9, 11), (3, 4), 5), ((4, 6, 6), (2, 3, 2), 3), ((14, 14), (7, 7), 16)],
    ids=str,
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_route(backend, device, spatial, regions, topk, per_head, dtype):
    if interpreted(backend) and (dtype != torch.float32 or len(spatial) == 2 and spatial[0] == 14):
        pytest.skip("reduced route matrix under the Triton interpreter")
    case = Case(spatial, regions, topk, heads=2, d=16, dv=16, per_head=per_head)
    q, k, _ = make_qkv(case, dtype, device)
    skip_if_unsupported(backend, q, None)
    idx = dynattn.route(q, k, regions, topk, per_head=per_head, backend=backend)
    expected_shape = (1, 2, case.R, topk) if per_head else (1, case.R, topk)
    assert idx.shape == expected_shape and idx.dtype == torch.int64 and idx.device == q.device
    # rows hold distinct regions
    srt = idx.sort(-1).values
    assert bool((srt[..., 1:] != srt[..., :-1]).all())
    # the chosen regions carry the top-k logits, in descending order (robust to near-ties: compare values)
    ref_idx = reference.route(q, k, regions, case.R, per_head=per_head)  # all regions, sorted
    logits = _route_logits(q.float(), k.float(), regions, per_head)
    chosen = logits.gather(-1, idx)
    best = logits.gather(-1, ref_idx[..., :topk])
    torch.testing.assert_close(chosen, best, atol=1e-4, rtol=1e-4)
    assert bool((chosen[..., 1:] <= chosen[..., :-1] + 1e-4).all())


def _route_logits(q, k, regions, per_head):
    spatial, (B, H, D) = q.shape[1:-2], (q.shape[0], q.shape[-2], q.shape[-1])
    index, valid = reference.region_token_index(spatial, regions, q.device)
    w = valid.float() / valid.sum(1, keepdim=True)  # (R, M) mean weights
    qr = torch.einsum("rm,brmhd->brhd", w, q.reshape(B, -1, H, D)[:, index])
    kr = torch.einsum("rm,brmhd->brhd", w, k.reshape(B, -1, H, D)[:, index])
    if per_head:
        return torch.einsum("bihd,bjhd->bhij", qr, kr) * D ** -0.5
    return torch.einsum("bihd,bjhd->bij", qr, kr) * (H * D) ** -0.5


@pytest.mark.parametrize("case", [CASES[4], CASES[7]], ids=str)
def test_bi_level_routing_attention(backend, device, case):
    """The fused entry point equals route + routed_attention of the reference."""
    q, k, v = make_qkv(case, torch.float32, device)
    skip_if_unsupported(backend, q, v)
    out = dynattn.bi_level_routing_attention(q, k, v, case.regions, case.topk, per_head=case.per_head, backend=backend)
    idx = dynattn.route(q, k, case.regions, case.topk, per_head=case.per_head, backend=backend)
    expected = reference.routed_attention(q, k, v, idx, case.regions)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("case", [CASES[3], CASES[6], CASES[9]], ids=str)
def test_backward_is_deterministic(backend, device, case):
    """Backward is bitwise reproducible (no float atomics)."""
    if interpreted(backend) and not case.small:
        pytest.skip("reduced matrix under the Triton interpreter")
    q, k, v = make_qkv(case, torch.float32, device, requires_grad=True)
    skip_if_unsupported(backend, q, v)
    idx = random_idx(case, device)
    g = torch.randn(case.batch, *case.spatial, case.heads, case.dv, device=device)
    results = []
    for _ in range(2):
        out = dynattn.routed_attention(q, k, v, idx, case.regions, backend=backend)
        results.append(torch.autograd.grad(out, (q, k, v), g))
    for a, b in zip(*results):
        assert torch.equal(a, b)
