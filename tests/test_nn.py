"""dynattn.nn: BiLevelRoutingAttention against a literal BiFormer oracle, RoutedAttention against timm's Attention."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dynattn import reference
from dynattn.nn import BiLevelRoutingAttention, RoutedAttention, default_topk

# --------------------------------------------------------------------------------------------------
# BiFormer oracle: ops/bra_legacy.py (rayleizhu/BiFormer @ 1697bbb) in its default configuration, written
# from BIFORMER_SPEC.md step by step: region rearrange, mean pooling, detached top-k routing on the full
# qk width, KVGather's expand + gather copy, materialised softmax with scale qk_dim**-0.5, LEPE on the
# full-resolution V map, wo.
# --------------------------------------------------------------------------------------------------


def biformer_bra(x, qkv_w, qkv_b, wo_w, wo_b, lepe_w, lepe_b, *, n_win, num_heads, qk_dim, topk, qk_scale=None):
    """x (n, H, W, C) NHWC, H and W divisible by n_win. Returns (out (n, H, W, C), r_idx (n, p2, topk))."""
    n, H, W, C = x.shape
    j = i = n_win
    h, w = H // n_win, W // n_win
    p2, w2, m = n_win * n_win, h * w, num_heads
    scale = qk_scale or qk_dim ** -0.5
    # rearrange(x, "n (j h) (i w) c -> n (j i) h w c")
    x = x.reshape(n, j, h, i, w, C).permute(0, 1, 3, 2, 4, 5).reshape(n, p2, h, w, C)
    # QKVLinear: one Linear, split [qk_dim | qk_dim + dim]
    q, kv = F.linear(x, qkv_w, qkv_b).split([qk_dim, qk_dim + C], dim=-1)
    q_pix = q.reshape(n, p2, w2, qk_dim)  # "n p2 h w c -> n p2 (h w) c"
    kv_pix = kv.reshape(n, p2, w2, qk_dim + C)  # kv_down = identity
    q_win, k_win = q.mean([2, 3]), kv[..., :qk_dim].mean([2, 3])  # (n, p2, qk_dim)
    # LEPE: "n (j i) h w c -> n c (j h) (i w)" on v, conv, then "n c (j h) (i w) -> n (j h) (i w) c"
    v_map = kv[..., qk_dim:].reshape(n, j, i, h, w, C).permute(0, 5, 1, 3, 2, 4).reshape(n, C, H, W)
    if lepe_w is not None:
        lepe = F.conv2d(v_map, lepe_w, lepe_b, padding=lepe_w.shape[-1] // 2, groups=C).permute(0, 2, 3, 1)
    else:
        lepe = torch.zeros(n, H, W, C, dtype=x.dtype)
    # TopkRouting (diff_routing=False: detached; param_routing=False: identity embedding)
    logit = (q_win.detach() * scale) @ k_win.detach().transpose(-2, -1)  # (n, p2, p2)
    _, r_idx = torch.topk(logit, k=topk, dim=-1)
    # KVGather (mul_weight='none'): topk-fold copy of K/V through an expanded view
    c_kv = kv_pix.shape[-1]
    kv_sel = torch.gather(
        kv_pix.view(n, 1, p2, w2, c_kv).expand(-1, p2, -1, -1, -1),
        dim=2,
        index=r_idx.view(n, p2, topk, 1, 1).expand(-1, -1, -1, w2, c_kv),
    )  # (n, p2, topk, w2, c_kv)
    k_sel, v_sel = kv_sel.split([qk_dim, C], dim=-1)
    # "n p2 k w2 (m c) -> (n p2) m c (k w2)" and "n p2 k w2 (m c) -> (n p2) m (k w2) c"
    k_sel = k_sel.reshape(n * p2, topk, w2, m, qk_dim // m).permute(0, 3, 4, 1, 2).reshape(
        n * p2, m, qk_dim // m, topk * w2)
    v_sel = v_sel.reshape(n * p2, topk, w2, m, C // m).permute(0, 3, 1, 2, 4).reshape(n * p2, m, topk * w2, C // m)
    # "n p2 w2 (m c) -> (n p2) m w2 c"
    q_pix = q_pix.reshape(n * p2, w2, m, qk_dim // m).permute(0, 2, 1, 3)
    attn = torch.softmax((q_pix * scale) @ k_sel, dim=-1)  # (n p2, m, w2, topk w2), materialised
    out = attn @ v_sel  # (n p2, m, w2, c)
    # "(n j i) m (h w) c -> n (j h) (i w) (m c)"
    out = out.reshape(n, j, i, m, h, w, C // m).permute(0, 1, 4, 2, 5, 3, 6).reshape(n, H, W, C)
    out = out + lepe
    out = F.linear(out, wo_w, wo_b) if wo_w is not None else out
    return out, r_idx


def _oracle_of(mod: BiLevelRoutingAttention, x):
    wo = mod.wo if isinstance(mod.wo, nn.Linear) else None
    return biformer_bra(
        x, mod.qkv.qkv.weight, mod.qkv.qkv.bias,
        None if wo is None else wo.weight, None if wo is None else wo.bias,
        None if mod.lepe is None else mod.lepe.weight, None if mod.lepe is None else mod.lepe.bias,
        n_win=mod.num_regions[0], num_heads=mod.num_heads, qk_dim=mod.qk_dim, topk=mod.topk,
        qk_scale=None if mod.scale == mod.qk_dim ** -0.5 else mod.scale,
    )


BRA_CASES = [
    # (map H, W, constructor kwargs, batch)
    ((8, 8), dict(dim=32, num_heads=2, n_win=2, topk=2), 2),  # BiFormer defaults otherwise (side_dwconv 5)
    ((6, 9), dict(dim=24, num_heads=3, n_win=3, qk_dim=48, topk=4, side_dwconv=3, param_attention="qkv"), 1),
    ((8, 4), dict(dim=16, num_heads=4, n_win=4, topk=5, side_dwconv=0, qk_scale=0.3), 2),
    ((14, 14), dict(dim=64, num_heads=2, n_win=7, topk=16), 1),  # BiFormer-T stage 3 shape (2x2 regions, 16 of 49)
]


def _close(actual, expected, tol, what=""):
    """float32 comparison; sums over many tokens (weight gradients) get an absolute tolerance scaled to the
    tensor's magnitude."""
    scale = max(1.0, expected.detach().abs().max().item())
    torch.testing.assert_close(actual, expected, atol=tol * scale, rtol=tol, msg=lambda m: f"{what}: {m}")


def _randomise(mod):
    with torch.no_grad():
        for p in mod.parameters():
            p.copy_(torch.randn_like(p) * 0.3)


@pytest.mark.parametrize("hw,kwargs,batch", BRA_CASES, ids=lambda c: str(c).replace(" ", ""))
def test_bra_matches_biformer_oracle(hw, kwargs, batch):
    mod = BiLevelRoutingAttention(**kwargs)
    _randomise(mod)
    x = torch.randn(batch, *hw, kwargs["dim"], requires_grad=True)
    out, idx = mod(x, return_routing=True)
    x_ref = x.detach().clone().requires_grad_(True)
    ref, ref_idx = _oracle_of(mod, x_ref)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)

    g = torch.randn_like(out)
    params = list(mod.parameters())
    grads = torch.autograd.grad(out, [x] + params, g)
    grads_ref = torch.autograd.grad(ref, [x_ref] + params, g)
    for name, a, b in zip(["x"] + [n for n, _ in mod.named_parameters()], grads, grads_ref):
        _close(a, b, 5e-5, f"grad {name}")


def test_bra_float64_exact():
    mod = BiLevelRoutingAttention(dim=16, num_heads=2, n_win=2, topk=3).double()
    _randomise(mod)
    x = torch.randn(1, 6, 6, 16, dtype=torch.float64)
    torch.testing.assert_close(mod(x), _oracle_of(mod, x)[0], atol=1e-12, rtol=1e-12)


def test_bra_state_dict_names_are_biformers():
    mod = BiLevelRoutingAttention(dim=32, num_heads=4, n_win=2, topk=2)
    shapes = {k: tuple(v.shape) for k, v in mod.state_dict().items()}
    assert shapes == {
        "qkv.qkv.weight": (96, 32), "qkv.qkv.bias": (96,), "wo.weight": (32, 32), "wo.bias": (32,),
        "lepe.weight": (32, 1, 5, 5), "lepe.bias": (32,),
    }
    assert set(BiLevelRoutingAttention(32, 4, 2, topk=2, param_attention="qkv", side_dwconv=0).state_dict()) == {
        "qkv.qkv.weight", "qkv.qkv.bias"}


def test_bra_load_biformer_state_dicts():
    src = BiLevelRoutingAttention(dim=16, num_heads=2, n_win=2, topk=2)
    _randomise(src)
    x = torch.randn(1, 4, 4, 16)
    expected = src(x)
    # legacy names inside a whole-model checkpoint
    legacy = {"model": {f"stages.2.0.attn.{k}": v for k, v in src.state_dict().items()}}
    dst = BiLevelRoutingAttention(dim=16, num_heads=2, n_win=2, topk=2)
    dst.load_biformer_state_dict(legacy, prefix="stages.2.0.attn.")
    torch.testing.assert_close(dst(x), expected)
    # nchwBRA names: 1x1 convs
    sd = src.state_dict()
    nchw = {
        "qkv_linear.weight": sd["qkv.qkv.weight"][:, :, None, None], "qkv_linear.bias": sd["qkv.qkv.bias"],
        "output_linear.weight": sd["wo.weight"][:, :, None, None], "output_linear.bias": sd["wo.bias"],
        "lepe.weight": sd["lepe.weight"], "lepe.bias": sd["lepe.bias"],
    }
    dst = BiLevelRoutingAttention(dim=16, num_heads=2, n_win=2, topk=2)
    dst.load_biformer_state_dict(nchw)
    torch.testing.assert_close(dst(x), expected)
    with pytest.raises(ValueError, match="prefix"):
        dst.load_biformer_state_dict(nchw, prefix="nothing.")


def test_bra_non_divisible_uses_dynattn_partition():
    """7x9 map in 3x2 regions: routing + attention follow reference.py's partition, then LEPE and wo."""
    mod = BiLevelRoutingAttention(dim=12, num_heads=2, n_win=(3, 2), topk=3)
    _randomise(mod)
    x = torch.randn(2, 7, 9, 12, requires_grad=True)
    out, idx = mod(x, return_routing=True)
    q, kv = F.linear(x, mod.qkv.qkv.weight, mod.qkv.qkv.bias).split([12, 24], dim=-1)
    k, v = kv[..., :12], kv[..., 12:]
    q4, k4, v4 = (t.unflatten(-1, (2, 6)) for t in (q, k, v))
    ref_idx = reference.route(q4, k4, (3, 2), 3)
    assert torch.equal(idx, ref_idx)
    att = reference.routed_attention(q4, k4, v4, ref_idx, (3, 2), scale=12 ** -0.5).flatten(-2)
    ref = mod.wo(att + mod.lepe(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    (gx,) = torch.autograd.grad(out.square().sum(), x)
    (gx_ref,) = torch.autograd.grad(ref.square().sum(), x)
    torch.testing.assert_close(gx, gx_ref, atol=5e-5, rtol=5e-5)


def test_bra_per_head_routing_shape():
    mod = BiLevelRoutingAttention(dim=16, num_heads=2, n_win=2, topk=2, per_head_routing=True)
    out, idx = mod(torch.randn(3, 4, 6, 16), return_routing=True)
    assert out.shape == (3, 4, 6, 16) and idx.shape == (3, 2, 4, 2) and idx.dtype == torch.int64


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(kv_downsample_mode="avgpool"), NotImplementedError, "kv_downsample_mode"),
        (dict(kv_downsample_mode="bogus"), ValueError, "kv_downsample_mode"),
        (dict(param_routing=True), NotImplementedError, "param_routing"),
        (dict(diff_routing=True), NotImplementedError, "diff_routing"),
        (dict(soft_routing=True), NotImplementedError, "soft_routing"),
        (dict(param_attention="qkvm"), ValueError, "param_attention"),
        (dict(auto_pad=True), NotImplementedError, "auto_pad"),
        (dict(topk=50), ValueError, "topk"),
        (dict(topk=0), ValueError, "topk"),
        (dict(side_dwconv=4), ValueError, "side_dwconv"),
        (dict(num_heads=3), ValueError, "num_heads"),
        (dict(qk_dim=18), ValueError, "qk_dim"),
        (dict(qk_scale=-1.0), ValueError, "qk_scale"),
        (dict(n_win=0), ValueError, "n_win"),
    ],
)
def test_bra_rejects_unsupported_args(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        BiLevelRoutingAttention(**{"dim": 32, "num_heads": 4, **kwargs})


def test_bra_forward_errors():
    mod = BiLevelRoutingAttention(dim=16, num_heads=2, n_win=7, topk=4)
    with pytest.raises(ValueError, match="n_win"):
        mod(torch.randn(1, 6, 14, 16))  # 6 rows < 7 regions
    with pytest.raises(ValueError, match="dim=16"):
        mod(torch.randn(1, 14, 14, 8))
    with pytest.raises(ValueError, match=r"\(B, H, W"):
        mod(torch.randn(14, 14, 16))
    with pytest.raises(NotImplementedError, match="return_routing"):
        mod(torch.randn(1, 14, 14, 16), ret_attn_mask=True)


# --------------------------------------------------------------------------------------------------
# RoutedAttention vs timm's Attention
# --------------------------------------------------------------------------------------------------


def _timm_attention(**kwargs):
    from timm.layers import Attention

    attn = Attention(**kwargs)
    _randomise(attn)
    return attn


def _routed_like(attn, kwargs, **routing):
    routed = RoutedAttention(**kwargs, **routing)
    routed.load_state_dict(attn.state_dict())
    return routed


def _compare(a_out, b_out, x_a, x_b, mod_a, mod_b, atol=2e-5):
    torch.testing.assert_close(a_out, b_out, atol=atol, rtol=atol)
    g = torch.randn_like(a_out)
    ga = torch.autograd.grad(a_out, [x_a] + list(mod_a.parameters()), g)
    gb = torch.autograd.grad(b_out, [x_b] + list(mod_b.parameters()), g)
    for name, u, w in zip(["x"] + [n for n, _ in mod_a.named_parameters()], ga, gb):
        _close(u, w, 4 * atol, f"grad {name}")


DENSE_CASES = [
    # (timm Attention kwargs, num_prefix_tokens, grid, num_regions)
    (dict(dim=32, num_heads=2, qkv_bias=True), 1, (4, 4), 2),  # class token
    (dict(dim=24, num_heads=3), 5, (3, 5), (3, 2)),  # class + 4 registers, non-square, uneven regions
    (dict(dim=32, num_heads=4), 0, (4, 4), (2, 4)),  # no prefix token (avg-pool ViT)
    (dict(dim=32, num_heads=2, qk_norm=True, scale_norm=True, norm_layer=nn.LayerNorm), 1, (4, 3), 2),
    (dict(dim=32, num_heads=2, gated=True, attn_head_dim=8, dim_out=24), 2, (3, 3), 3),
]


@pytest.mark.parametrize("kwargs,prefix,grid,regions", DENSE_CASES, ids=str)
def test_routed_attention_all_regions_equals_timm(kwargs, prefix, grid, regions):
    attn = _timm_attention(**kwargs)
    R = math.prod(regions if isinstance(regions, tuple) else (regions, regions))
    routed = _routed_like(attn, kwargs, grid_size=grid, num_prefix_tokens=prefix, num_regions=regions, topk=R)
    x = torch.randn(2, prefix + grid[0] * grid[1], kwargs["dim"], requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    _compare(routed(x), attn(x2), x, x2, routed, attn)


def _routing_mask(idx, grid, regions, prefix, heads):
    """bool (B, heads, N, N): grid queries see prefix keys + routed regions; prefix queries see all."""
    B = idx.shape[0]
    n = grid[0] * grid[1]
    N = prefix + n
    region = reference.token_region_ids(grid, regions)  # (n,)
    if idx.dim() == 3:
        idx = idx.unsqueeze(1).expand(B, heads, *idx.shape[1:])
    allowed = torch.zeros(B, heads, idx.shape[2], math.prod(regions), dtype=torch.bool)
    allowed.scatter_(-1, idx, True)  # (B, h, R_query, R_key)
    mask = torch.ones(B, heads, N, N, dtype=torch.bool)
    mask[:, :, prefix:, prefix:] = allowed[:, :, region][:, :, :, region]
    return mask


@pytest.mark.parametrize("per_head", [False, True])
def test_routed_attention_sparse_equals_masked_timm(per_head):
    """topk < R: equals timm's Attention with the routing turned into a boolean attention mask."""
    kwargs = dict(dim=32, num_heads=2, qkv_bias=True)
    prefix, grid, regions, topk = 2, (6, 5), (3, 2), 2
    attn = _timm_attention(**kwargs)
    routed = _routed_like(attn, kwargs, grid_size=grid, num_prefix_tokens=prefix, num_regions=regions, topk=topk,
                          per_head_routing=per_head)
    x = torch.randn(2, prefix + 30, 32, requires_grad=True)
    out, idx = routed(x, return_routing=True)
    # independent routing: region means of the grid tokens' q/k
    with torch.no_grad():
        q, k, _ = F.linear(x, attn.qkv.weight, attn.qkv.bias).unflatten(-1, (3, 2, 16)).unbind(2)
        ref_idx = reference.route(q[:, prefix:].unflatten(1, grid), k[:, prefix:].unflatten(1, grid), regions, topk,
                                  per_head=per_head)
    assert torch.equal(idx, ref_idx)
    x2 = x.detach().clone().requires_grad_(True)
    ref = attn(x2, attn_mask=_routing_mask(ref_idx, grid, regions, prefix, 2))
    _compare(out, ref, x, x2, routed, attn)
    assert not torch.allclose(out, attn(x.detach()), atol=1e-3)  # really sparse


def test_routed_attention_default_topk_and_inferred_grid():
    assert default_topk((14, 14), (7, 7)) == 16
    assert default_topk((28, 28), (7, 7)) == 4
    assert default_topk((4, 4), (2, 2)) == 4  # clipped to R
    routed = RoutedAttention(16, num_heads=2, num_prefix_tokens=1, num_regions=2, topk=3)  # grid inferred
    assert routed(torch.randn(1, 1 + 36, 16)).shape == (1, 37, 16)
    with pytest.raises(ValueError, match="grid_size"):
        routed(torch.randn(1, 1 + 35, 16))


def test_routed_attention_bfloat16_close_to_float32():
    routed = RoutedAttention(32, num_heads=2, qkv_bias=True, grid_size=4, num_prefix_tokens=1, num_regions=2, topk=4)
    x = torch.randn(2, 17, 32)
    expected = routed(x)
    out = routed.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=5e-2, rtol=5e-2)


def test_routed_attention_errors():
    with pytest.raises(ValueError, match="num_regions"):
        RoutedAttention(16, num_heads=2, grid_size=(4, 6), num_regions=5)
    with pytest.raises(ValueError, match="topk"):
        RoutedAttention(16, num_heads=2, grid_size=(4, 4), num_regions=2, topk=5)
    with pytest.raises(ValueError, match="topk"):
        RoutedAttention(16, num_heads=2, grid_size=(4, 4), num_regions=2, topk=0)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        RoutedAttention(16, num_heads=2, grid_size=(4, 4), num_prefix_tokens=-1)
    routed = RoutedAttention(16, num_heads=2, grid_size=(4, 4), num_regions=2, topk=2, num_prefix_tokens=1)
    with pytest.raises(ValueError, match="grid_size"):
        routed(torch.randn(1, 16, 16))  # the class token is missing
    with pytest.raises(ValueError, match="attn_mask"):
        routed(torch.randn(1, 17, 16), attn_mask=torch.ones(17, 17, dtype=torch.bool))
    inferred = RoutedAttention(16, num_heads=2, num_regions=3, topk=2, num_prefix_tokens=0)
    with pytest.raises(ValueError, match="num_regions"):
        inferred(torch.randn(1, 4, 16))  # 2x2 grid < 3 regions
    dropout = RoutedAttention(16, num_heads=2, grid_size=4, num_regions=2, topk=2, attn_drop=0.1)
    with pytest.raises(NotImplementedError, match="attn_drop"):
        dropout(torch.randn(1, 17, 16))
    assert dropout.eval()(torch.randn(1, 17, 16)).shape == (1, 17, 16)
