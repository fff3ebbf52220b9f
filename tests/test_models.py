"""convert_vit on timm ViTs, the timm-registered vit_bra_* models, pretrained loading, training, FLOPs."""

import pytest
import torch

timm = pytest.importorskip("timm")

import dynattn.models  # noqa: E402,F401  (registers vit_bra_*)
from dynattn.models import PRETRAINED_DIR_ENV, flops  # noqa: E402
from dynattn.nn import RoutedAttention, convert_vit  # noqa: E402


def _vit(**kwargs):
    args = dict(pretrained=False, img_size=64, num_classes=7, depth=4)
    args.update(kwargs)
    model = timm.create_model("vit_tiny_patch16_224", **args).eval()
    with torch.no_grad():  # timm's init leaves cls/reg tokens ~0 and the head 0: make every path matter
        for name, p in model.named_parameters():
            if "token" in name or name.startswith("head"):
                p.normal_(0, 0.5)
    return model


CONVERT_CASES = [
    # (timm kwargs, num_regions)
    (dict(), 2),  # class token, 4x4 grid
    (dict(reg_tokens=4), (2, 4)),  # class + 4 register tokens
    (dict(class_token=False, reg_tokens=4, global_pool="avg"), 2),
    (dict(class_token=False, global_pool="avg"), (4, 2)),  # no prefix token at all
    (dict(img_size=(80, 48)), (3, 2)),  # non-square 5x3 grid, uneven regions
    (dict(patch_size=8, img_size=40, no_embed_class=True), (2, 3)),  # 5x5 grid
]


@pytest.mark.parametrize("kwargs,regions", CONVERT_CASES, ids=str)
def test_convert_vit_all_regions_equals_timm(kwargs, regions):
    model = _vit(**kwargs)
    x = torch.randn(2, 3, *model.patch_embed.img_size)
    with torch.no_grad():
        expected = model(x)
    R = regions[0] * regions[1] if isinstance(regions, tuple) else regions ** 2
    assert convert_vit(model, regions, R) is model
    assert all(isinstance(b.attn, RoutedAttention) for b in model.blocks)
    assert model.blocks[0].attn.num_prefix_tokens == model.num_prefix_tokens
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


def test_convert_vit_sparse_forward_backward():
    model = _vit(reg_tokens=2)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    convert_vit(model, 2, 1).train()
    assert set(model.state_dict()) == set(dense)  # weights kept under the same names
    assert all(torch.equal(model.state_dict()[k], v) for k, v in dense.items())
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    out.logsumexp(-1).sum().backward()
    assert torch.isfinite(out).all()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_convert_vit_dynamic_img_size():
    model = _vit(dynamic_img_size=True)
    convert_vit(model, 2, 4)  # 2x2 regions, topk = all: dense at every size
    for size in [(64, 64), (48, 80)]:
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            ref_model = _vit(dynamic_img_size=True)
        ref_model.load_state_dict(model.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref_model(x), atol=2e-5, rtol=2e-5)
    assert model.blocks[0].attn.grid_size == (3, 5)
    convert_vit(model, 3, 2)  # re-configure in place; too few tokens for 3 regions now:
    with pytest.raises(ValueError, match="num_regions"):
        model(torch.randn(1, 3, 32, 64))


def test_convert_vit_errors():
    with pytest.raises(TypeError, match="VisionTransformer"):
        convert_vit(torch.nn.Linear(2, 2), 2, 2)
    with pytest.raises(ValueError, match="num_regions"):
        convert_vit(_vit(), 5, 2)  # 4x4 grid
    with pytest.raises(ValueError, match="topk"):
        convert_vit(_vit(), 2, 5)  # R = 4
    with pytest.raises(NotImplementedError, match="patch_drop"):
        convert_vit(_vit(patch_drop_rate=0.5), 2, 2)


# --------------------------------------------------------------------------------------------------
# registered models
# --------------------------------------------------------------------------------------------------


def test_models_registered_and_created():
    names = timm.list_models("vit_bra_*")
    assert {"vit_bra_tiny_patch16_224", "vit_bra_small_patch16_224", "vit_bra_base_patch16_224"} <= set(names)
    model = timm.create_model("vit_bra_tiny_patch16_224", num_classes=7)
    attn = model.blocks[0].attn
    assert isinstance(attn, RoutedAttention) and attn.grid_size == (14, 14) and attn.num_regions == (7, 7)
    assert model.head.out_features == 7
    assert model.pretrained_cfg["architecture"] == "vit_bra_tiny_patch16_224"
    assert "topk=None (-> 16)" in repr(attn)
    with torch.device("meta"):  # big models: structure only
        base = timm.create_model("vit_bra_base_patch16_224", num_classes=7, img_size=448, topk=8)
    assert base.blocks[11].attn.grid_size == (28, 28) and base.blocks[11].attn.topk == 8
    assert base.pos_embed.shape == (1, 1 + 28 * 28, 768)


def _save_dense(tmp_path, name="vit_tiny_patch16_224.safetensors", **kwargs):
    from safetensors.torch import save_file

    dense = timm.create_model("vit_tiny_patch16_224", depth=2, **kwargs)
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_(0, 0.1)
    path = tmp_path / name
    save_file(dense.state_dict(), str(path))
    return dense, path


def test_pretrained_from_local_dir(tmp_path, monkeypatch):
    from timm.layers import resample_abs_pos_embed

    dense, _ = _save_dense(tmp_path)
    monkeypatch.setenv(PRETRAINED_DIR_ENV, str(tmp_path))
    model = timm.create_model("vit_bra_tiny_patch16_224", pretrained=True, depth=2, img_size=64, num_regions=4,
                              num_classes=7)
    sd, dsd = model.state_dict(), dense.state_dict()
    for k, v in dsd.items():
        if k == "pos_embed":
            torch.testing.assert_close(sd[k], resample_abs_pos_embed(v, (4, 4), num_prefix_tokens=1))
        elif not k.startswith("head."):
            assert torch.equal(sd[k], v), k
    assert sd["head.weight"].shape == (7, 192)
    # same size and classes: identical to the dense model when routing keeps every region
    same = timm.create_model("vit_bra_tiny_patch16_224", pretrained=True, depth=2, topk=49).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(same(x), dense.eval()(x), atol=5e-5, rtol=5e-5)


def test_pretrained_from_file_overlay_and_missing(tmp_path, monkeypatch):
    _, path = _save_dense(tmp_path, name="weights.pth")
    monkeypatch.delenv(PRETRAINED_DIR_ENV, raising=False)
    empty_cache = tmp_path / "hf"
    empty_cache.mkdir()
    with pytest.raises(FileNotFoundError, match=PRETRAINED_DIR_ENV) as err:
        timm.create_model("vit_bra_tiny_patch16_224", pretrained=True, depth=2, cache_dir=str(empty_cache))
    assert "vit_tiny_patch16_224" in str(err.value) and "hf download" in str(err.value)
    # a torch-saved checkpoint passed the timm way
    torch.save(timm.create_model("vit_tiny_patch16_224", depth=2).state_dict(), path)
    model = timm.create_model("vit_bra_tiny_patch16_224", pretrained=True, depth=2,
                              pretrained_cfg_overlay=dict(file=str(path)), cache_dir=str(empty_cache))
    assert isinstance(model.blocks[1].attn, RoutedAttention)
    with pytest.raises(RuntimeError, match="missing keys"):  # a checkpoint of another depth
        timm.create_model("vit_bra_tiny_patch16_224", pretrained=True, depth=3,
                          pretrained_cfg_overlay=dict(file=str(path)))


def test_training_steps_reduce_loss():
    torch.manual_seed(0)
    model = timm.create_model("vit_bra_tiny_patch16_224", num_classes=7, img_size=64, num_regions=4, topk=4)
    model.train()
    x = torch.randn(8, 3, 64, 64)
    y = torch.arange(8) % 7
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_state_dict_safetensors_roundtrip(tmp_path):
    from safetensors.torch import load_file, save_file

    kwargs = dict(num_classes=7, img_size=64, num_regions=2, topk=2, depth=2, reg_tokens=1)
    model = timm.create_model("vit_bra_tiny_patch16_224", **kwargs).eval()
    save_file(model.state_dict(), str(tmp_path / "m.safetensors"))
    other = timm.create_model("vit_bra_tiny_patch16_224", **kwargs).eval()
    other.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), other(x))


# --------------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------------


def test_flops_dense_vit_b_matches_literature():
    info = flops.count("vit_base_patch16_224", 224)
    assert abs(info["gflops"] - 35.1) < 0.1  # efficient-FER papers, 2 FLOPs per MAC
    assert abs(info["params_m"] - 86.6) < 0.1


def test_flops_routed_counts_through_custom_op():
    dense = flops.count("vit_tiny_patch16_224", 448)
    sparse = flops.count("vit_bra_tiny_patch16_224", 448)
    full = flops.count("vit_bra_tiny_patch16_224", 448, topk=49)
    assert sparse["topk"] == 4 and sparse["keys_per_query"] == 65
    assert sparse["params_m"] == dense["params_m"]
    # routed attention = topk/R of dense attention (+ routing and class-token terms)
    assert sparse["attn_gflops"] < 0.1 * dense["attn_gflops"]
    assert abs(full["attn_gflops"] - dense["attn_gflops"]) < 0.02 * dense["attn_gflops"]


def test_flops_main_prints_table(capsys):
    flops.main(["--img-size", "112"])  # what `python -m dynattn.models.flops --img-size 112` runs
    out = capsys.readouterr().out
    assert "GFLOPs (2 FLOPs/MAC)" in out and "ViT-BRA-B/16" in out and out.count("| 112 |") == 6


def test_compile_fullgraph():
    """The converted model traces into one graph (reference backend named explicitly: no dispatch in the graph)."""
    torch._dynamo.reset()
    model = timm.create_model("vit_bra_tiny_patch16_224", img_size=64, num_regions=2, topk=2, depth=2,
                              reg_tokens=1, backend="reference").eval()
    x = torch.randn(2, 3, 64, 64)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
