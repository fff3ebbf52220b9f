"""Baseline FER models (dan_resnet18/50, mit_fer, patt_lite): shapes, training, DAN's losses against hand-computed
values, per-image attention in PAtt-Lite, parameter counts, weight loading from the real on-disk formats, FLOPs."""

import math

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")

import dynattn.models  # noqa: E402,F401  (registers the models)
from dynattn.models import PRETRAINED_DIR_ENV, affinity_loss, flops, load_dan_checkpoint, partition_loss  # noqa: E402
from dynattn.models.patt_lite import tf_same_pad  # noqa: E402

# small inputs keep the default run fast on 2 CPU cores; every model is size-agnostic. PAtt-Lite needs >= 65 px; a
# 65x193 image gives it 1x2 patch tokens (224 px gives 2x2)
SMALL = {"dan_resnet18": (32, 32), "mit_fer": (32, 32), "patt_lite": (65, 193)}
BASELINES = tuple(SMALL)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These tensors are tiny: a second intra-op thread buys nothing and, on a busy machine, its spin-waiting
    costs several times the work itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _create(name, **kwargs):
    kwargs.setdefault("num_classes", 7)
    return timm.create_model(name, pretrained=False, **kwargs)


# --------------------------------------------------------------------------------------------------
# registration, shapes, create_model round trip
# --------------------------------------------------------------------------------------------------


def test_registered():
    names = set(timm.list_models())
    assert {"dan_resnet18", "dan_resnet50", "mit_fer", "patt_lite"} <= names
    assert set(dynattn.models.BASELINE_MODELS) == set(BASELINES)


@pytest.mark.parametrize("name", BASELINES)
def test_output_shapes(name):
    model = _create(name).eval()
    h, w = SMALL[name]
    with torch.no_grad():
        assert model(torch.randn(2, 3, h, w)).shape == (2, 7)
        assert model(torch.randn(1, 3, h + 33, w + 17)).shape == (1, 7)  # other size, not a multiple of 32
        assert model.forward_head(model.forward_features(torch.randn(2, 3, h, w)), pre_logits=True).shape == \
            (2, model.num_features)
    other = _create(name, num_classes=3, in_chans=1, img_size=(80, 112), drop_rate=0.2).eval()
    with torch.no_grad():
        assert other(torch.randn(2, 1, 80, 112)).shape == (2, 3)
    assert other.pretrained_cfg["input_size"] == (1, 80, 112)
    assert timm.data.resolve_data_config(model=other)["input_size"] == (1, 80, 112)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        other(torch.randn(2, 3, 80, 112))


def test_native_size_feature_maps():
    with torch.device("meta"):  # structure only, no compute
        x = torch.empty(1, 3, 224, 224)
        dan = _create("dan_resnet18").eval()
        assert dan.forward_features(x).shape == (1, 512, 7, 7)
        assert dan.forward_attention(dan.forward_features(x)).shape == (1, 4, 512)
        mit = _create("mit_fer").eval()
        stages = mit.forward_stages(x)
        assert [tuple(s.shape[1:]) for s in stages] == [(32, 56, 56), (64, 28, 28), (160, 14, 14), (256, 7, 7)]
        patt = _create("patt_lite").eval()
        assert patt.backbone(x).shape == (1, 512, 14, 14)  # MobileNetV1 up to block 9's depthwise conv
        assert patt.forward_features(x).shape == (1, 256, 2, 2)  # 4 patch tokens
        r50 = _create("dan_resnet50").eval()
        assert r50.forward_attention(r50.forward_features(x)).shape == (1, 4, 2048)


@pytest.mark.parametrize("name", BASELINES)
def test_create_model_roundtrip(name, tmp_path):
    from safetensors.torch import load_file, save_file

    model = _create(name).eval()
    cfg = model.pretrained_cfg
    assert cfg["architecture"] == name and cfg["input_size"] == (3, 224, 224) and cfg["num_classes"] == 7
    assert model.get_classifier() is model.get_submodule(cfg["classifier"])
    assert isinstance(model.get_submodule(cfg["first_conv"]), torch.nn.Conv2d)
    save_file(model.state_dict(), str(tmp_path / "m.safetensors"))
    other = _create(name).eval()
    other.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    x = torch.randn(2, 3, *SMALL[name])
    with torch.no_grad():
        assert torch.equal(model(x), other(x))
    model.reset_classifier(4)
    with torch.no_grad():
        assert model(x).shape == (2, 4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="img_size"):
        _create("patt_lite", img_size=64)
    with pytest.raises(TypeError, match="img_size"):
        _create("mit_fer", img_size="224")
    with pytest.raises(ValueError, match="num_heads"):
        _create("dan_resnet18", num_heads=0)
    with pytest.raises(ValueError, match="num_centers"):
        _create("dan_resnet18", num_centers=5)
    with pytest.raises(ValueError, match="drop_rate"):
        _create("mit_fer", drop_rate=1.5)
    with pytest.raises(ValueError, match="at least 65 px"):
        _create("patt_lite").eval()(torch.randn(1, 3, 64, 64))


# --------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", BASELINES)
def test_training_steps_reduce_loss(name):
    torch.manual_seed(0)
    model = _create(name).train()
    x = torch.randn(8, 3, *SMALL[name])
    y = torch.arange(8) % 7
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, fused=True)  # fused: a fraction of the CPU time
    takes_targets = "targets" in model.forward.__code__.co_varnames
    losses = []
    for _ in range(4):
        out = model(x, targets=y) if takes_targets else model(x)
        logits, aux = out if isinstance(out, tuple) else (out, {})
        loss = torch.nn.functional.cross_entropy(logits, y) + sum(aux.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0], losses
    model.eval()
    with torch.no_grad():
        out = model(x, targets=y) if takes_targets else model(x)
    assert isinstance(out, torch.Tensor) and out.shape == (8, 7)  # plain logits in eval mode
    if name == "dan_resnet18":  # the centres are parameters and were trained
        assert model.centers.grad is not None and model.centers.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------
# DAN
# --------------------------------------------------------------------------------------------------


def _affinity_by_hand(features, targets, centers):
    """DAN's affinity loss with plain loops: mean_i ||f_i - c_{y_i}||^2 / sum_d var_c(c[:, d]) (unbiased)."""
    C, D = len(centers), len(centers[0])
    spread = 0.0
    for d in range(D):
        mean = sum(centers[c][d] for c in range(C)) / C
        spread += sum((centers[c][d] - mean) ** 2 for c in range(C)) / (C - 1)
    total = 0.0
    for f, y in zip(features, targets):
        total += sum((f[d] - centers[y][d]) ** 2 for d in range(D)) / spread
    return total / len(features)


def _partition_by_hand(heads):
    """log(1 + K / mean_{b,d} var_k(heads[b, :, d])) with the unbiased variance across heads, by loops."""
    B, K, D = len(heads), len(heads[0]), len(heads[0][0])
    variances = []
    for b in range(B):
        for d in range(D):
            vals = [heads[b][k][d] for k in range(K)]
            mean = sum(vals) / K
            variances.append(sum((v - mean) ** 2 for v in vals) / (K - 1))
    return math.log(1 + K / (sum(variances) / len(variances)))


def test_affinity_loss_hand_computed():
    features = [[1.0, 2.0], [0.0, -1.0], [3.0, 0.5]]
    targets = [0, 2, 2]
    centers = [[0.0, 1.0], [2.0, -1.0], [1.0, 0.0]]
    # by hand: spread = var(0,2,1) + var(1,-1,0) = 1 + 1 = 2; distances 2, 2, 4.25 -> (1 + 1 + 2.125) / 3
    expected = (1 + 1 + 2.125) / 3
    assert _affinity_by_hand(features, targets, centers) == pytest.approx(expected)
    f = torch.tensor(features, requires_grad=True)
    c = torch.tensor(centers, requires_grad=True)
    loss = affinity_loss(f, torch.tensor(targets), c)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert f.grad is not None and c.grad is not None and c.grad.abs().sum() > 0
    # a (B, D, H, W) map is global-average-pooled first
    fmap = torch.tensor(features)[:, :, None, None].expand(3, 2, 2, 3).contiguous()
    assert affinity_loss(fmap, torch.tensor(targets), c).item() == pytest.approx(expected, rel=1e-6)

    rng = np.random.default_rng(0)
    features, centers = rng.normal(size=(5, 4)), rng.normal(size=(3, 4))
    targets = [2, 0, 1, 1, 2]
    got = affinity_loss(torch.tensor(features), torch.tensor(targets), torch.tensor(centers))
    assert got.item() == pytest.approx(_affinity_by_hand(features.tolist(), targets, centers.tolist()), rel=1e-5)
    # probability targets: one-hot equals indices; a mixture weights the squared distances
    onehot = torch.nn.functional.one_hot(torch.tensor(targets), 3).double()
    assert affinity_loss(torch.tensor(features), onehot, torch.tensor(centers)).item() == pytest.approx(got.item())
    probs = torch.tensor([[0.5, 0.5, 0.0]] * 5, dtype=torch.float64)
    mixed = 0.5 * _affinity_by_hand(features.tolist(), [0] * 5, centers.tolist()) + \
        0.5 * _affinity_by_hand(features.tolist(), [1] * 5, centers.tolist())
    assert affinity_loss(torch.tensor(features), probs, torch.tensor(centers)).item() == pytest.approx(mixed, rel=1e-5)


def test_partition_loss_hand_computed():
    heads = [[[1.0, 0.0], [3.0, 2.0], [2.0, 4.0]],
             [[0.0, 1.0], [0.0, 1.0], [3.0, 1.0]]]
    # by hand: variances across the 3 heads: (1, 4, 3, 0) -> mean 2 -> log(1 + 3/2)
    assert _partition_by_hand(heads) == pytest.approx(math.log(2.5))
    assert partition_loss(torch.tensor(heads)).item() == pytest.approx(math.log(2.5), rel=1e-6)
    heads = np.random.default_rng(1).normal(size=(4, 4, 6))
    assert partition_loss(torch.tensor(heads)).item() == pytest.approx(_partition_by_hand(heads.tolist()), rel=1e-5)
    assert partition_loss(torch.randn(3, 1, 5)).item() == 0.0  # one head: no partition loss


def test_dan_loss_errors():
    c = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        affinity_loss(torch.randn(2, 4), torch.tensor([0, 3]), c)
    with pytest.raises(ValueError, match="centers"):
        affinity_loss(torch.randn(2, 5), torch.tensor([0, 1]), c)
    with pytest.raises(ValueError, match="targets"):
        affinity_loss(torch.randn(2, 4), torch.tensor([[0, 1]]), c)
    with pytest.raises(ValueError, match="heads"):
        partition_loss(torch.randn(3, 4))


def test_dan_aux_losses_only_in_training_with_targets():
    torch.manual_seed(0)
    model = _create("dan_resnet18", affinity_weight=2.0, partition_weight=0.5)
    assert model.centers.shape == (7, 512) and isinstance(model.centers, torch.nn.Parameter)
    assert any(p is model.centers for p in model.parameters())  # the optimizer gets the centres
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 6, 3])
    model.train()
    assert isinstance(model(x), torch.Tensor)  # training without targets: plain logits
    logits, aux = model(x, targets=y)
    assert logits.shape == (4, 7) and set(aux) == {"affinity", "partition"}
    with torch.no_grad():  # the weighted losses are the functions applied to the model's own pieces
        features = model.forward_features(x)
        heads = model.forward_attention(features)
        torch.testing.assert_close(aux["affinity"], 2.0 * affinity_loss(features, y, model.centers))
        torch.testing.assert_close(aux["partition"], 0.5 * partition_loss(heads))
        # the heads are log-softmaxed across the head axis before the fusion and the partition loss
        torch.testing.assert_close(heads.exp().sum(dim=1), torch.ones(4, 512))
    model.eval()
    with torch.no_grad():
        assert isinstance(model(x, targets=y), torch.Tensor)
    # the authors' RAF-DB setting: 8 centres for 7 classes; probability targets get no mass on the extra centre
    model = _create("dan_resnet18", num_centers=8).train()
    assert model.centers.shape == (8, 512)
    probs = torch.softmax(torch.randn(4, 7), dim=1)
    _, aux = model(x, targets=probs)
    with torch.no_grad():
        padded = torch.cat([probs, torch.zeros(4, 1)], dim=1)
        torch.testing.assert_close(aux["affinity"], affinity_loss(model.forward_features(x), padded, model.centers))


def _torchvision_resnet18_state(seed=0):
    import torchvision

    torch.manual_seed(seed)
    net = torchvision.models.resnet18(weights=None)
    with torch.no_grad():  # non-trivial BN statistics so that loading them matters
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def test_dan_backbone_weights_msceleb_format(tmp_path):
    """The authors' MS-Celeb ResNet-18: a torchvision state dict under 'state_dict'. Oracle: torchvision's trunk."""
    net = _torchvision_resnet18_state()
    path = tmp_path / "resnet18_msceleb.pth"
    torch.save({"epoch": 3, "state_dict": net.state_dict()}, path)
    model = _create("dan_resnet18", backbone_weights=str(path)).eval()
    trunk = torch.nn.Sequential(*list(net.children())[:-2])
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), trunk(x))
    bad = tmp_path / "other.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}}, bad)
    with pytest.raises(RuntimeError, match="missing keys"):
        _create("dan_resnet18", backbone_weights=str(bad))


def test_dan_pretrained_imagenet_from_local_dir(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    net = timm.create_model("resnet18")
    save_file(net.state_dict(), str(tmp_path / "resnet18.a1_in1k.safetensors"))
    monkeypatch.setenv(PRETRAINED_DIR_ENV, str(tmp_path))
    model = timm.create_model("dan_resnet18", pretrained=True, num_classes=7)
    own = model.backbone.state_dict()
    assert all(torch.equal(own[k], v) for k, v in net.state_dict().items() if not k.startswith("fc."))
    grey = timm.create_model("dan_resnet18", pretrained=True, num_classes=7, in_chans=1)
    # one input channel: timm's adaptation sums the RGB filters
    torch.testing.assert_close(grey.backbone.conv1.weight, net.conv1.weight.sum(dim=1, keepdim=True))


def test_load_dan_checkpoint_authors_format(tmp_path):
    """A checkpoint named the way the authors' DAN saves it (features = resnet children, cat_head{i})."""
    src = _create("dan_resnet18").eval()
    net = _torchvision_resnet18_state(seed=1)
    state = {f"features.{k}": v for k, v in torch.nn.Sequential(*list(net.children())[:-2]).state_dict().items()}
    for i, head in enumerate(src.heads):
        state.update({f"cat_head{i}.{k}": v for k, v in head.state_dict().items()})
    state.update({f"fc.{k}": v for k, v in src.fc.state_dict().items()})
    state.update({f"bn.{k}": v for k, v in src.bn.state_dict().items()})
    path = tmp_path / "rafdb_epoch21_acc0.897_bacc0.8275.pth"
    torch.save({"iter": 21, "model_state_dict": state}, path)
    model = _create("dan_resnet18").eval()
    load_dan_checkpoint(model, str(path))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), torch.nn.Sequential(*list(net.children())[:-2])(x))
        src.backbone.load_state_dict(net.state_dict(), strict=False)
        torch.testing.assert_close(model(x), src(x))


# --------------------------------------------------------------------------------------------------
# MiT-FER
# --------------------------------------------------------------------------------------------------


def test_mit_fer_parameter_count_matches_paper():
    model = _create("mit_fer")
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 3.45e6) < 0.05 * 3.45e6, n
    # MiT-B0's encoder (SegFormer's ImageNet classifier minus its 256x1000 head) + 1x1 fusion conv + classifier
    assert sum(p.numel() for p in model.fusion.parameters()) == 512 * 256 + 256
    assert sum(p.numel() for p in model.head.parameters()) == 256 * 7 + 7


@pytest.mark.parametrize("sr_ratio", [1, 2])
def test_mit_efficient_attention_matches_torch_mha(sr_ratio):
    """Oracle: torch.nn.MultiheadAttention with the same weights, keys/values from the reduced sequence."""
    from dynattn.models.mit_fer import EfficientSelfAttention

    torch.manual_seed(0)
    dim, heads, H, W = 16, 2, 4, 6
    attn = EfficientSelfAttention(dim, heads, sr_ratio).eval()
    mha = torch.nn.MultiheadAttention(dim, heads, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([attn.q.weight, attn.kv.weight]))  # rows: q, k, v
        mha.in_proj_bias.copy_(torch.cat([attn.q.bias, attn.kv.bias]))
        mha.out_proj.weight.copy_(attn.proj.weight)
        mha.out_proj.bias.copy_(attn.proj.bias)
        x = torch.randn(2, H * W, dim)
        kv = x
        if sr_ratio > 1:
            kv = attn.sr(x.transpose(1, 2).reshape(2, dim, H, W)).flatten(2).transpose(1, 2)
            kv = torch.nn.functional.layer_norm(kv, (dim,), attn.norm.weight, attn.norm.bias, attn.norm.eps)
            assert kv.shape[1] == H * W // sr_ratio ** 2
        expected, _ = mha(x, kv, kv, need_weights=False)
        torch.testing.assert_close(attn(x, H, W), expected, atol=1e-5, rtol=1e-5)


def test_mit_fer_fusion_block():
    """At 224 px the fusion equals max-pooling with kernel = stride = 8, 4, 2 (the paper's), then F4 + F4 * F_R."""
    torch.manual_seed(0)
    model = _create("mit_fer").eval()
    stages = [torch.randn(1, c, s, s) for c, s in ((32, 56), (64, 28), (160, 14), (256, 7))]
    f4 = stages[3]
    pooled = [torch.nn.functional.max_pool2d(f, k, k) for f, k in zip(stages[:3], (8, 4, 2))]
    cat = torch.cat(pooled + [f4], dim=1)
    w, b = model.fusion.weight[:, :, 0, 0], model.fusion.bias
    f_r = torch.einsum("oc,bchw->bohw", w, cat) + b[None, :, None, None]
    with torch.no_grad():
        torch.testing.assert_close(model.fuse(stages), f4 + f4 * f_r, atol=1e-5, rtol=1e-5)


def _hf_segformer_names(state):
    """Rename SegFormer-release keys the way Hugging Face's conversion script does (kv split into key/value)."""
    out = {}
    for key, value in state.items():
        key = "segformer.encoder." + key
        for i in range(1, 5):
            key = key.replace(f"patch_embed{i}.", f"patch_embeddings.{i - 1}.")
            key = key.replace(f"block{i}.", f"block.{i - 1}.")
            key = key.replace(f"encoder.norm{i}.", f"encoder.layer_norm.{i - 1}.")
        key = key.replace("norm1", "layer_norm_1").replace("norm2", "layer_norm_2")
        key = key.replace("attn.norm", "attn.layer_norm").replace(".norm.", ".layer_norm.")
        key = key.replace("attn.q.", "attention.self.query.").replace("attn.proj", "attention.output.dense")
        key = key.replace("attn.", "attention.self.").replace("fc1", "dense1").replace("fc2", "dense2")
        if key.endswith(("attention.self.kv.weight", "attention.self.kv.bias")):
            half = value.shape[0] // 2
            out[key.replace(".kv.", ".key.")] = value[:half]
            out[key.replace(".kv.", ".value.")] = value[half:]
        else:
            out[key] = value
    out["classifier.weight"], out["classifier.bias"] = torch.zeros(1000, 256), torch.zeros(1000)
    return out


def test_mit_fer_pretrained_segformer_and_hf_formats(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    src = _create("mit_fer")
    with torch.no_grad():
        for p in src.encoder.parameters():
            p.normal_(0, 0.1)
    enc = {k: v.clone() for k, v in src.encoder.state_dict().items()}
    # the SegFormer release's ImageNet file: encoder keys + a 1000-class 'head'
    torch.save({**enc, "head.weight": torch.zeros(1000, 256), "head.bias": torch.zeros(1000)},
               tmp_path / "mit_b0.pth")
    monkeypatch.setenv(PRETRAINED_DIR_ENV, str(tmp_path))
    model = timm.create_model("mit_fer", pretrained=True, num_classes=7, cache_dir=str(tmp_path / "hf"))
    assert all(torch.equal(model.encoder.state_dict()[k], v) for k, v in enc.items())
    # Hugging Face's nvidia/mit-b0 layout: <dir>/mit-b0/model.safetensors
    hf = _hf_segformer_names(enc)
    assert "segformer.encoder.block.2.1.attention.self.key.weight" in hf
    assert "segformer.encoder.patch_embeddings.0.layer_norm.weight" in hf
    assert "segformer.encoder.block.0.0.attention.self.layer_norm.bias" in hf
    (tmp_path / "hf_only" / "mit-b0").mkdir(parents=True)
    save_file(hf, str(tmp_path / "hf_only" / "mit-b0" / "model.safetensors"))
    monkeypatch.setenv(PRETRAINED_DIR_ENV, str(tmp_path / "hf_only"))
    model = timm.create_model("mit_fer", pretrained=True, num_classes=7, cache_dir=str(tmp_path / "hf"))
    assert all(torch.equal(model.encoder.state_dict()[k], v) for k, v in enc.items())


# --------------------------------------------------------------------------------------------------
# PAtt-Lite
# --------------------------------------------------------------------------------------------------


def test_patt_lite_attention_is_per_image():
    torch.manual_seed(0)
    model = _create("patt_lite").eval()
    x = torch.randn(4, 3, *SMALL["patt_lite"])
    assert model.forward_features(x).shape[-2:] == (1, 2)  # 2 tokens: attention has something to mix
    with torch.no_grad():
        ref = model(x)
        x2 = x.clone()
        x2[0] = torch.randn(3, *SMALL["patt_lite"]) * 3
        out = model(x2)
        alone = model(x[1:2])
    assert not torch.allclose(out[0], ref[0])
    torch.testing.assert_close(out[1:], ref[1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone, ref[1:2], atol=1e-5, rtol=1e-5)


def test_patt_lite_attention_over_patch_tokens():
    """The classifier: softmax(scale * t t^T) t over the image's 4 tokens, then the mean, then the linear head."""
    torch.manual_seed(0)
    model = _create("patt_lite").eval()
    with torch.no_grad():
        model.attn_scale.fill_(0.3)
        feats = torch.randn(2, 256, 2, 2)
        got = model.forward_head(feats)
        for b in range(2):
            tokens = feats[b].reshape(256, 4).T  # row-major 2x2 patches
            t = torch.relu(model.pre_classification(tokens))
            t = (t - model.pre_norm.running_mean) / torch.sqrt(model.pre_norm.running_var + 1e-3) \
                * model.pre_norm.weight + model.pre_norm.bias
            weights = torch.softmax(0.3 * t @ t.T, dim=-1)
            torch.testing.assert_close(got[b], model.head((weights @ t).mean(0)), atol=1e-5, rtol=1e-5)


def test_tf_same_padding():
    x = torch.randn(1, 2, 14, 14)
    torch.testing.assert_close(tf_same_pad(x, 4, 4), torch.nn.functional.pad(x, (1, 1, 1, 1)))  # 14 -> 16
    x = torch.randn(1, 2, 7, 9)  # TF puts the odd pixel at the bottom/right
    assert tf_same_pad(x, 4, 4).shape == (1, 2, 8, 12)
    torch.testing.assert_close(tf_same_pad(x, 4, 4), torch.nn.functional.pad(x, (1, 2, 0, 1)))


def test_patt_lite_pretrained_timm_mobilenetv1(tmp_path):
    """timm's mobilenetv1_100 weights load into the truncated backbone; oracle: timm's own model, cut by a hook."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    full = timm.create_model("mobilenetv1_100").eval()
    with torch.no_grad():
        for m in full.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "mobilenetv1_100.safetensors"
    save_file(full.state_dict(), str(path))
    model = timm.create_model("patt_lite", pretrained=True, num_classes=7,
                              pretrained_cfg_overlay=dict(file=str(path))).eval()
    seen = {}
    full.blocks[3][3].bn1.register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    x = torch.randn(1, 3, 80, 80)
    with torch.no_grad():
        full(x)
        torch.testing.assert_close(model.backbone(x), seen["out"])


# --------------------------------------------------------------------------------------------------
# pretrained weights missing, FLOPs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,hub", [("dan_resnet18", "resnet18"), ("mit_fer", "nvidia/mit-b0"),
                                      ("patt_lite", "mobilenetv1_100")])
def test_pretrained_without_local_file_raises(name, hub, tmp_path, monkeypatch):
    monkeypatch.setenv(PRETRAINED_DIR_ENV, str(tmp_path))
    (tmp_path / "hf").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        timm.create_model(name, pretrained=True, num_classes=7, cache_dir=str(tmp_path / "hf"))
    msg = str(err.value)
    assert "no download is attempted" in msg and hub in msg and str(tmp_path) in msg and PRETRAINED_DIR_ENV in msg
    with pytest.raises(FileNotFoundError, match="does not exist"):
        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "nope.pth")))


def test_flops_lists_baselines():
    info = flops.count("mit_fer", 224, num_classes=7)  # meta device
    assert abs(info["params_m"] - 3.45) < 0.05 * 3.45
    # conv + linear multiply-accumulates are the paper's 0.425 G (its counter skips the attention matmuls)
    assert abs((info["gflops"] - info["attn_gflops"]) / 2 - 0.425) < 0.02
    assert info["tokens"] is None
    table = flops.baselines_table()
    for label, name, *_ in flops.BASELINES:
        assert f"| {name} | 224 |" in table
    assert "| 3.45 |" in table and "| 19.72 |" in table
