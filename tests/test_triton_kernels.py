"""Triton backend, kernel level: tile configurations the autotuner may pick, routing, layouts, determinism.

The shared matrix (test_matrix.py) checks the public op over every backend; these tests call
``dynattn.triton`` directly and force tile shapes, so every code path of the kernels (packed tiny regions,
regions split over several tiles, key steps shorter or longer than a region) runs under the CPU
interpreter too. Sizes are tiny: the interpreter runs each program in numpy.
"""

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decorates the kernels

import dynattn.triton as tr  # noqa: E402
from dynattn import reference  # noqa: E402

pytestmark = pytest.mark.skipif(not tr.is_available(), reason="triton missing, or no GPU and TRITON_INTERPRET != 1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}


def _inputs(spatial, heads, d, dv, dtype, batch=2, layout="contiguous"):
    if layout == "fused":  # one projection (B, *spatial, H*(2d+dv)) split into q | k | v, heads inside
        x = torch.randn(batch, *spatial, heads * (2 * d + dv), device=DEVICE).to(dtype)
        q = x[..., : heads * d].unflatten(-1, (heads, d))
        k = x[..., heads * d: 2 * heads * d].unflatten(-1, (heads, d))
        v = x[..., 2 * heads * d:].unflatten(-1, (heads, dv))
        assert not q.is_contiguous() and q.stride(-1) == 1
        return q, k, v
    if layout == "sliced":  # spatial dims that don't collapse into one token stride: copied by the wrapper
        x = torch.randn(batch, *(2 * n for n in spatial), heads, 2 * d + dv, device=DEVICE).to(dtype)
        x = x[(slice(None),) + (slice(None, None, 2),) * len(spatial)]
        return x[..., :d], x[..., d: 2 * d], x[..., 2 * d:]
    if layout == "qkv5":  # (B, *spatial, 3, H, D) as in timm, d == dv
        x = torch.randn(batch, *spatial, 3, heads, d, device=DEVICE).to(dtype)
        return x.unbind(-3)
    q = torch.randn(batch, *spatial, heads, d, device=DEVICE).to(dtype)
    k = torch.randn(batch, *spatial, heads, d, device=DEVICE).to(dtype)
    v = torch.randn(batch, *spatial, heads, dv, device=DEVICE).to(dtype)
    return q, k, v


def _random_idx(batch, heads, R, topk, per_head):
    shape = (batch, heads, R) if per_head else (batch, R)
    return torch.rand(*shape, R, device=DEVICE).argsort(-1)[..., :topk].contiguous()


def _reference(q, k, v, idx, regions, scale, dout, dlse):
    leaves = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
    out, lse = reference.routed_attention(*leaves, idx, regions, scale=scale, return_lse=True)
    grads = torch.autograd.grad([out, lse], leaves, [dout.float(), dlse])
    return out, lse, grads


def _close(a, e, dtype, what):
    scale = max(1.0, e.abs().max().item())
    tol = TOL[dtype] * scale
    torch.testing.assert_close(a.float(), e.float(), atol=tol, rtol=TOL[dtype], msg=lambda m: f"{what}: {m}")


def _check(spatial, regions, topk, heads, d, dv, dtype=torch.float32, per_head=False, layout="contiguous",
           cfg=None, cfg_dkv=None, batch=2, use_dlse=True):
    # the package exports functions named like its modules: fetch the modules themselves
    tfwd = importlib.import_module("dynattn.triton.fwd")
    tbwd = importlib.import_module("dynattn.triton.bwd")
    from dynattn.triton._common import geometry

    q, k, v = _inputs(spatial, heads, d, dv, dtype, batch, layout)
    R = geometry(q.shape, regions).R
    idx = _random_idx(batch, heads, R, topk, per_head)
    scale = 0.7 * d ** -0.5
    out, lse = tfwd.fwd(q, k, v, idx, regions, scale, _config=cfg)
    assert out.shape == (*q.shape[:-1], dv) and out.dtype == dtype and out.is_contiguous()
    assert lse.shape == q.shape[:-1] and lse.dtype == torch.float32
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse) if use_dlse else None
    ref_out, ref_lse, ref_grads = _reference(q, k, v, idx, regions, scale, dout,
                                             dlse if use_dlse else torch.zeros_like(lse))
    _close(out, ref_out, dtype, "out")
    torch.testing.assert_close(lse, ref_lse, atol=1e-5 if dtype == torch.float32 else 2e-3, rtol=1e-5)
    grads = tbwd.bwd(dout, dlse, q, k, v, out, lse, idx, regions, scale, _config=cfg, _config_dkv=cfg_dkv)
    for name, g, t, e in zip(("dq", "dk", "dv"), grads, (q, k, v), ref_grads):
        assert g.shape == t.shape and g.dtype == t.dtype and g.is_contiguous()
        _close(g, e, dtype, name)


# --- tile configurations: BLOCK_M / BLOCK_N relative to the padded region size MP -------------------

@pytest.mark.parametrize(
    "spatial,regions,cfg",
    [
        ((8, 8), (4, 4), {"BLOCK_M": 16, "BLOCK_N": 16}),  # MP=4: 4 regions packed, 4 key slots each
        ((8, 8), (4, 4), {"BLOCK_M": 32, "BLOCK_N": 64}),  # 8 packed, 8 slots (2 key regions) per step
        ((8, 8), (1, 2), {"BLOCK_M": 16, "BLOCK_N": 16}),  # MP=32: a region spans 2 query tiles, 2 key steps
        ((6, 10), (2, 3), {"BLOCK_M": 16, "BLOCK_N": 32}),  # 3x3 / 3x4 regions, MP=16 with masked tails
        ((12,), (5,), {"BLOCK_M": 16, "BLOCK_N": 8}),  # 1-D, sizes 2/3, MP=4, a step covers 2 slots
    ],
    ids=str,
)
def test_tile_configs(spatial, regions, cfg):
    dkv = {"BLOCK_M": cfg["BLOCK_N"], "BLOCK_N": cfg["BLOCK_M"]}
    _check(spatial, regions, 3, 2, 16, 16, cfg=cfg, cfg_dkv=dkv)


def test_tile_configs_dkv_asymmetric():
    # key tile packs 8 regions of 2x2 tokens while queries stream 2 slots per packed region
    _check((8, 8), (4, 4), 5, 1, 16, 16, cfg={"BLOCK_M": 16, "BLOCK_N": 16}, cfg_dkv={"BLOCK_M": 16, "BLOCK_N": 32})


# --- dims, dtypes, layouts, routing modes --------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_dtypes_2d_nondivisible(dtype):
    _check((7, 9), (3, 4), 3, 2, 16, 24, dtype=dtype)


@pytest.mark.parametrize("per_head", [False, True])
def test_3d(per_head):
    _check((4, 5, 6), (2, 2, 3), 4, 2, 16, 32, per_head=per_head)


def test_1d_head_dims_not_pow2():
    _check((20,), (3,), 2, 2, 40, 24, batch=1)


@pytest.mark.parametrize("layout", ["fused", "qkv5", "sliced"])
def test_strided_views(layout):
    dv = 16 if layout == "qkv5" else 24
    _check((8, 8), (2, 2), 2, 2, 16, dv, layout=layout, per_head=layout == "fused")


@pytest.mark.parametrize(
    "spatial,regions,topk,d,dv,cfg",
    [
        ((6, 6), (6, 6), 4, 16, 16, None),  # one-token regions: MP = 1, 16 regions packed per tile
        ((6, 6), (6, 6), 4, 16, 16, {"BLOCK_M": 16, "BLOCK_N": 16}),  # one key slot per packed region per step
        ((5,), (1,), 1, 16, 16, None),  # a single region: dense attention
        ((6, 6), (2, 2), 3, 256, 200, None),  # largest head dim, d_v not a power of two
    ],
    ids=str,
)
def test_edge_cases(spatial, regions, topk, d, dv, cfg):
    dkv = None if cfg is None else {"BLOCK_M": cfg["BLOCK_N"], "BLOCK_N": cfg["BLOCK_M"]}
    _check(spatial, regions, topk, 1, d, dv, cfg=cfg, cfg_dkv=dkv, batch=1)


def test_without_dlse_and_topk_all():
    _check((6, 6), (3, 2), 6, 1, 16, 16, use_dlse=False)


def test_expanded_dlse():
    """An autograd gradient may be an expanded (0-stride) tensor."""
    q, k, v = _inputs((8, 8), 2, 16, 16, torch.float32)
    idx = _random_idx(2, 2, 4, 2, False)
    out, lse = tr.fwd(q, k, v, idx, (2, 2), 0.25)
    dout = torch.randn_like(out)
    dlse = torch.ones((), device=DEVICE).expand_as(lse)
    grads = tr.bwd(dout, dlse, q, k, v, out, lse, idx, (2, 2), 0.25)
    ref_grads = _reference(q, k, v, idx, (2, 2), 0.25, dout, dlse.contiguous())[2]
    for g, e in zip(grads, ref_grads):
        _close(g, e, torch.float32, "grad")


def test_backward_deterministic():
    q, k, v = _inputs((8, 8), 2, 16, 16, torch.float16)
    idx = _random_idx(2, 2, 16, 5, False)
    out, lse = tr.fwd(q, k, v, idx, (4, 4), 0.25)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    a = tr.bwd(dout, dlse, q, k, v, out, lse, idx, (4, 4), 0.25)
    b = tr.bwd(dout, dlse, q, k, v, out, lse, idx, (4, 4), 0.25)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# --- routing ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "spatial,regions,per_head,layout",
    [((8, 8), (4, 4), False, "contiguous"), ((7, 9), (3, 4), True, "fused"), ((4, 5, 6), (2, 2, 3), False, "qkv5"),
     ((19,), (5,), True, "contiguous")],
    ids=str,
)
def test_route_matches_reference(spatial, regions, per_head, layout):
    q, k, _ = _inputs(spatial, 2, 16, 16, torch.float32, layout=layout)
    R = torch.tensor(regions).prod().item()
    topk = min(3, R)
    scale = 16 ** -0.5 if per_head else 32 ** -0.5
    idx = tr.route(q, k, regions, topk, per_head, scale)
    expected = reference.route(q, k, regions, topk, per_head=per_head, scale=scale)
    assert idx.dtype == torch.int64 and idx.is_contiguous() and idx.shape == expected.shape
    assert torch.equal(idx, expected)


def test_route_ties_lower_index_first():
    q = torch.ones(1, 4, 4, 1, 16, device=DEVICE)  # every region mean identical: all logits tie
    idx = tr.route(q, q, (2, 2), 3, False, 0.25)
    assert idx.tolist() == [[[0, 1, 2]] * 4]


def test_route_half_precision():
    q, k, _ = _inputs((8, 8), 2, 16, 16, torch.bfloat16)
    idx = tr.route(q, k, (4, 4), 4, False, 32 ** -0.5)
    expected = reference.route(q, k, (4, 4), 4, scale=32 ** -0.5)
    assert torch.equal(idx, expected)


# --- inverse index ------------------------------------------------------------------------------------

def test_inverse_index():
    from dynattn.backends._routing import inverse_routing_index

    idx = _random_idx(3, 2, 9, 4, True)
    qoffs, qlist = inverse_routing_index(idx, 9)
    flat = idx.reshape(6, 9, 4)
    for g in range(6):
        for rk in range(9):
            got = qlist[g, qoffs[g, rk]: qoffs[g, rk + 1]].tolist()
            want = [r for r in range(9) if rk in flat[g, r].tolist()]
            assert got == want


# --- autotuning space (pure Python: checks the pruning rules GPU runs rely on) ---------------------------

@pytest.mark.parametrize("kind", ["fwd", "dq", "dkv"])
def test_config_pruning_never_empty(kind):
    from dynattn.triton._common import CONFIGS, keep_config

    for block_d in (16, 32, 64, 128, 256):
        for mp in (1, 2, 4, 16, 64, 256, 1024):
            for topk in (1, 4, 16):
                for fp32 in (False, True):
                    kept = [c for c in CONFIGS if keep_config(kind, c[0], c[1], c[3], mp, topk, block_d, fp32)]
                    if not fp32 or block_d <= 64:  # fp32 at D >= 128 may fall back to the smallest tile
                        assert kept, (kind, block_d, mp, topk, fp32)
                    for own, other, _, _ in kept:
                        assert own <= max(16, mp)  # never packs past 16 rows
                        assert other >= max(1, own // mp)


def test_autotuned_prune_hook():
    from dynattn.triton import _common

    tuned = _common.autotuned(importlib.import_module("dynattn.triton.bwd")._dkv_kernel, "dkv")
    prune = tuned.early_config_prune
    q = torch.empty(1, dtype=torch.bfloat16)
    kept = prune(tuned.configs, {"Q": q, "TOPK": 16}, MP=4, BLOCK_DQK=32, BLOCK_DV=32)
    assert kept and all(c.kwargs["BLOCK_N"] == 16 for c in kept)  # dK/dV: own key tile is BLOCK_N
