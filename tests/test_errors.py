"""Bad input raises ValueError/TypeError naming the argument, on every backend, before any kernel runs."""

import pytest
import torch

import dynattn


def qkv(shape=(1, 8, 8, 2, 16), dv=16, dtype=torch.float32):
    q = torch.randn(shape, dtype=dtype)
    k = torch.randn(shape, dtype=dtype)
    v = torch.randn(*shape[:-1], dv, dtype=dtype)
    return q, k, v


def idx_for(R=4, topk=2, B=1):
    return torch.stack([torch.randperm(R)[:topk] for _ in range(B * R)]).reshape(B, R, topk)


@pytest.mark.parametrize(
    "make,exc,match",
    [
        (lambda: (torch.randn(8, 2, 16),) * 2 + (torch.randn(8, 2, 16),), ValueError, "q.dim"),
        (lambda: (torch.randn(1, 2, 2, 2, 2, 2, 16),) * 3, ValueError, "q.dim"),
        (lambda: (qkv()[0], torch.randn(1, 8, 2, 16), qkv()[2]), ValueError, "k.dim"),
        (lambda: (qkv()[0], torch.randn(2, 8, 8, 2, 16), qkv()[2]), ValueError, "k.shape"),
        (lambda: (qkv()[0], torch.randn(1, 8, 8, 3, 16), qkv()[2]), ValueError, "k.shape"),
        (lambda: (qkv()[0], qkv()[1], torch.randn(1, 8, 6, 2, 16)), ValueError, "v.shape"),
        (lambda: (qkv()[0], torch.randn(1, 8, 8, 2, 8), qkv()[2]), ValueError, "d_qk"),
        (lambda: (qkv()[0], qkv()[1].double(), qkv()[2]), TypeError, "k.dtype"),
        (lambda: (qkv()[0].int(), qkv()[1].int(), qkv()[2].int()), TypeError, "q must be a floating"),
        (lambda: (qkv()[0], "k", qkv()[2]), TypeError, "k must be a torch.Tensor"),
        (lambda: tuple(t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in qkv()), ValueError, "stride"),
        (lambda: qkv(shape=(0, 8, 8, 2, 16)), ValueError, "empty"),
        (lambda: (qkv()[0], qkv()[1], qkv()[2].to("meta")), ValueError, "device"),
    ],
)
def test_bad_qkv(make, exc, match):
    q, k, v = make()
    with pytest.raises(exc, match=match):
        dynattn.bi_level_routing_attention(q, k, v, 2, 2)


@pytest.mark.parametrize(
    "num_regions,exc,match",
    [
        (9, ValueError, r"num_regions\[0\]=9 is larger"),
        ((2, 9), ValueError, r"num_regions\[1\]=9"),
        ((2, 2, 2), ValueError, "spatial dims"),
        ((2,), ValueError, "spatial dims"),
        (0, ValueError, r"num_regions\[0\]=0 must be >= 1"),
        (2.0, TypeError, "num_regions"),
        ((2, "a"), TypeError, "num_regions"),
    ],
)
def test_bad_num_regions(num_regions, exc, match):
    q, k, v = qkv()
    with pytest.raises(exc, match=match):
        dynattn.bi_level_routing_attention(q, k, v, num_regions, 1)
    with pytest.raises(exc, match=match):
        dynattn.route(q, k, num_regions, 1)


@pytest.mark.parametrize("topk,exc", [(0, ValueError), (5, ValueError), (-1, ValueError), (1.5, TypeError)])
def test_bad_topk(topk, exc):
    q, k, v = qkv()
    with pytest.raises(exc, match="topk"):
        dynattn.route(q, k, 2, topk)
    with pytest.raises(exc, match="topk"):
        dynattn.bi_level_routing_attention(q, k, v, 2, topk)


@pytest.mark.parametrize(
    "make_idx,exc,match",
    [
        (lambda: idx_for().int(), TypeError, "idx must be int64"),
        (lambda: idx_for().float(), TypeError, "idx must be int64"),
        (lambda: idx_for()[0], ValueError, "idx.shape"),
        (lambda: idx_for(B=2), ValueError, "idx.shape"),
        (lambda: torch.zeros(1, 3, 4, 1, dtype=torch.long), ValueError, "idx.shape"),
        (lambda: torch.zeros(1, 4, 5, dtype=torch.long), ValueError, "idx.shape"),
        (lambda: torch.full((1, 4, 2), 4, dtype=torch.long), ValueError, "idx values"),
        (lambda: torch.full((1, 4, 2), -1, dtype=torch.long), ValueError, "idx values"),
        (lambda: torch.zeros(1, 4, 2, dtype=torch.long), ValueError, "distinct"),
        (lambda: "idx", TypeError, "idx must be a torch.Tensor"),
    ],
)
def test_bad_idx(backend, make_idx, exc, match):
    if backend not in ("reference", "cpu"):
        pytest.skip("input checks are backend-independent; CPU tensors run them on cpu/reference")
    q, k, v = qkv()
    with pytest.raises(exc, match=match):
        dynattn.routed_attention(q, k, v, make_idx(), 2, backend=backend)


def test_bad_scale_backend_per_head():
    q, k, v = qkv()
    idx = idx_for()
    with pytest.raises(TypeError, match="scale"):
        dynattn.routed_attention(q, k, v, idx, 2, scale="x")
    with pytest.raises(ValueError, match="scale"):
        dynattn.routed_attention(q, k, v, idx, 2, scale=float("nan"))
    with pytest.raises(ValueError, match="backend"):
        dynattn.routed_attention(q, k, v, idx, 2, backend="fast")
    with pytest.raises(ValueError, match="'cuda'"):
        dynattn.routed_attention(q, k, v, idx, 2, backend="cuda")
    with pytest.raises(TypeError, match="per_head"):
        dynattn.route(q, k, 2, 2, per_head=1)


def test_env_override(monkeypatch):
    q, k, v = qkv()
    idx = idx_for()
    monkeypatch.setenv("DYNATTN_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="DYNATTN_BACKEND"):
        dynattn.routed_attention(q, k, v, idx, 2)
    monkeypatch.setenv("DYNATTN_BACKEND", "reference")
    out = dynattn.routed_attention(q, k, v, idx, 2)
    torch.testing.assert_close(out, dynattn.reference.routed_attention(q, k, v, idx, 2))


@pytest.mark.parametrize("bad_value", [4, -1, 1 << 40])
def test_cpu_kernels_never_read_out_of_bounds(backend, bad_value):
    """Even when the Python value checks are bypassed, the compiled CPU kernels reject bad idx values."""
    if backend != "cpu":
        pytest.skip("the raw-pointer guard is a property of the compiled CPU kernels")
    from dynattn.backends import cpu

    q, k, v = qkv()
    idx = idx_for()
    idx[0, 1, 1] = bad_value
    with pytest.raises(ValueError, match="idx"):
        cpu.fwd(q, k, v, idx, (2, 2), 0.25)
