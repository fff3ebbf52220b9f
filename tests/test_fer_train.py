"""FER training: synthetic faces, transforms, checkpoints, samplers, schedule, extra losses, a real training run,
and bitwise resume equivalence."""

from __future__ import annotations

import json
import math
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("torchvision")
pytest.importorskip("safetensors")
from PIL import Image  # noqa: E402
import safetensors.torch as st  # noqa: E402

import timm  # noqa: E402
from timm.models import register_model  # noqa: E402

from dynattn.fer import checkpoint as ckpt  # noqa: E402
from dynattn.fer.cli import main  # noqa: E402
from dynattn.fer.datasets import build_dataset  # noqa: E402
from dynattn.fer.datasets.synthetic import FER2013_CLASSES, SyntheticFaces  # noqa: E402
from dynattn.fer.distributed import ShardedSampler, balanced_weights, derive_seed, shard_indices  # noqa: E402
from dynattn.fer.train import WarmupCosineSchedule, parse_key_values, split_model_output  # noqa: E402
from dynattn.fer.transforms import eval_transform, train_transform  # noqa: E402

# the tiny ViT used by the runs below: 32 px, 8 px patches -> 4x4 grid, 2x2 regions of 2x2 tokens, topk 2 (sparse)
TINY = ["--model", "vit_bra_tiny_patch16_224", "--img-size", "32",
        "--model-kwargs", "patch_size=8", "depth=1", "num_regions=2", "topk=2"]


@pytest.fixture(autouse=True)
def _one_thread():
    # the in-process training runs use one intra-op thread: on a shared 2-core machine two threads slow down
    # several-fold whenever another process holds a core
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _read_metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------------------------------------- synthetic set


def test_synthetic_faces_deterministic_balanced_and_split_disjoint():
    a = SyntheticFaces(None, "train", size=48, num_samples=70, seed=3)
    b = SyntheticFaces(None, "train", size=48, num_samples=70, seed=3)
    assert tuple(a.classes) == ("Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral")
    assert a.targets == b.targets and np.bincount(a.targets).tolist() == [10] * 7
    img = a.load_image(5)
    assert img.mode == "RGB" and img.size == (48, 48)
    assert np.array_equal(np.asarray(img), np.asarray(b.load_image(5)))          # same (seed, split, index)
    assert not np.array_equal(np.asarray(img), np.asarray(a.load_image(6)))
    other_seed = SyntheticFaces(None, "train", size=48, num_samples=70, seed=4)
    assert not np.array_equal(np.asarray(img), np.asarray(other_seed.load_image(5)))
    val = SyntheticFaces(None, "val", size=48, num_samples=70, seed=3)
    assert len(val) == 17 and SyntheticFaces(None, "test", num_samples=70, eval_samples=9).targets.__len__() == 9
    train_px = {np.asarray(a.load_image(i)).tobytes() for i in range(len(a))}
    assert all(np.asarray(val.load_image(i)).tobytes() not in train_px for i in range(len(val)))
    # the registry builds it from string options, as the CLI passes them
    ds = build_dataset("synthetic", None, "val", transform=None, num_samples="70", size="32")
    assert len(ds) == 17 and ds.load_image(0).size == (32, 32)
    x, y = SyntheticFaces(None, "train", num_samples=7, transform=eval_transform(
        {"img_size": 40, "mean": (0.5,) * 3, "std": (0.5,) * 3}))[0]
    assert x.shape == (3, 40, 40) and x.dtype == torch.float32 and 0 <= y < 7


def test_synthetic_faces_expressions_differ_and_bad_options():
    # with no nuisance variation two faces of a class differ only in colours/background, so the dark "ink"
    # strokes of the mouth region must differ between classes (a smile is not a frown)
    def mouth_mask(label):
        ds = SyntheticFaces(None, "train", size=64, num_samples=7 * 8, variation=0.0)
        i = ds.targets.index(label)
        arr = np.asarray(ds.load_image(i).convert("L"), dtype=np.float32)
        return arr[38:58, 16:48]

    happy, sad = mouth_mask(FER2013_CLASSES.index("Happy")), mouth_mask(FER2013_CLASSES.index("Sad"))
    assert np.abs(happy - sad).mean() > 5
    for kwargs, match in [(dict(size=8), "size"), (dict(num_samples=0), "num_samples"),
                          (dict(variation=3.0), "variation"), (dict(eval_samples=0), "eval_samples")]:
        with pytest.raises(ValueError, match=match):
            SyntheticFaces(None, "train", **kwargs)
    with pytest.raises(ValueError, match="split"):
        SyntheticFaces(None, "dev")


# ---------------------------------------------------------------------------------------------- transforms

CFG = {"img_size": 24, "mean": [0.5, 0.25, 0.125], "std": [0.5, 0.25, 0.5]}


def test_eval_transform_normalises_with_config_values():
    img = Image.new("RGB", (60, 40), (255, 0, 128))
    x = eval_transform(CFG)(img)
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32
    expected = [(255 / 255 - 0.5) / 0.5, (0 - 0.25) / 0.25, (128 / 255 - 0.125) / 0.5]
    for c in range(3):
        assert torch.allclose(x[c], torch.full((24, 24), expected[c]), atol=1e-6)
    # aspect ratio is kept: resize the shorter side, then center crop (a left/right split image stays split)
    half = Image.new("RGB", (80, 40), (0, 0, 0))
    half.paste((255, 255, 255), (40, 0, 80, 40))
    y = eval_transform({"img_size": 20, "mean": [0.0] * 3, "std": [1.0] * 3})(half)
    assert torch.allclose(y[:, :, :8], torch.zeros(3, 20, 8)) and torch.allclose(y[:, :, 12:], torch.ones(3, 20, 8))


def test_train_transform_options():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8))
    off = dict(hflip=0.0, rotation=0.0, crop_scale=None, erasing=0.0)
    assert torch.equal(train_transform(CFG, **off)(img), eval_transform(CFG)(img))      # all off == eval
    flipped = train_transform(CFG, **dict(off, hflip=1.0))(img)
    assert torch.equal(flipped, eval_transform(CFG)(img).flip(-1))
    erased = train_transform(CFG, **dict(off, erasing=1.0, erasing_scale=(0.2, 0.2)))(img)
    zero = (erased == 0).all(0)
    assert 0.1 * 24 * 24 <= zero.sum() <= 0.3 * 24 * 24                                   # one rectangle of ~20%
    full = train_transform(CFG)
    torch.manual_seed(1)
    a = full(img)
    torch.manual_seed(1)
    assert torch.equal(a, full(img)) and a.shape == (3, 24, 24)                            # seeded by torch's RNG
    for kwargs, match in [(dict(hflip=1.5), "hflip"), (dict(rotation=-1), "rotation"),
                          (dict(crop_scale=(0.5, 1.5)), "crop_scale"), (dict(erasing="x"), "erasing")]:
        with pytest.raises((ValueError, TypeError), match=match):
            train_transform(CFG, **kwargs)
    with pytest.raises(ValueError, match="img_size"):
        eval_transform({"mean": [0] * 3, "std": [1] * 3})


# ---------------------------------------------------------------------------------------------- checkpoints


def _tiny_config(**extra):
    return dict({"model": "vit_bra_tiny_patch16_224",
                 "model_kwargs": {"img_size": 32, "patch_size": 8, "depth": 1, "num_regions": 2, "topk": 2},
                 "num_classes": 7, "classes": list(FER2013_CLASSES), "img_size": 32, "mean": [0.5] * 3,
                 "std": [0.5] * 3, "dataset": "synthetic", "epoch": 1, "metrics": {}}, **extra)


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    cfg = _tiny_config()
    return timm.create_model(cfg["model"], num_classes=7, **cfg["model_kwargs"]).eval()


def test_checkpoint_round_trip_gives_identical_logits(tmp_path):
    model = _tiny_model()
    stem = ckpt.save_checkpoint(tmp_path / "run" / "best", model, _tiny_config())
    assert sorted(os.listdir(tmp_path / "run")) == ["best.json", "best.safetensors"]
    x = torch.randn(3, 3, 32, 32)
    for path in (tmp_path / "run", stem + ".json", stem + ".safetensors", stem):
        loaded, config = ckpt.load_model(path)
        assert not loaded.training and config["classes"] == list(FER2013_CLASSES)
        assert torch.equal(loaded(x), model(x))
    with open(stem + ".json") as f:
        on_disk = json.load(f)
    assert on_disk["format"] == ckpt.CHECKPOINT_FORMAT and on_disk["img_size"] == 32
    # the weights file is plain safetensors with the model's own names
    assert set(st.load_file(stem + ".safetensors")) == set(model.state_dict())


def test_checkpoint_loads_without_the_initial_backbone_file(tmp_path):
    """DAN trained from ``backbone_weights=FILE``: the checkpoint holds every weight, so loading it must not need
    (or read) that file again."""
    torch.manual_seed(0)
    model = timm.create_model("dan_resnet18", num_classes=7).eval()
    config = dict(_tiny_config(), model="dan_resnet18", img_size=64,
                  model_kwargs={"backbone_weights": str(tmp_path / "deleted_msceleb.pth")})
    stem = ckpt.save_checkpoint(tmp_path / "run" / "best", model, config)
    loaded, _ = ckpt.load_model(stem)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_checkpoint_extra_state_round_trip(tmp_path):
    model = _tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    random.seed(5)
    np.random.seed(5)
    state = {"optimizer": opt.state_dict(), "python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(), "best": 0.5, "none": None}
    ckpt.save_checkpoint(tmp_path / "last", model, _tiny_config(), extra_state=state)
    back = ckpt.load_training_state(tmp_path / "last.json")
    assert back["python"] == random.getstate() and back["best"] == 0.5 and back["none"] is None
    assert back["numpy"][0] == "MT19937" and np.array_equal(back["numpy"][1], np.random.get_state()[1])
    assert torch.equal(back["torch"], torch.get_rng_state())
    o = back["optimizer"]
    assert o["param_groups"][0]["betas"] == (0.9, 0.999) and set(o["state"]) == set(opt.state_dict()["state"])
    for i, s in opt.state_dict()["state"].items():
        assert all(torch.equal(s[k], o["state"][i][k]) for k in s)
    opt2 = torch.optim.AdamW(_tiny_model(1).parameters(), lr=1e-3)
    opt2.load_state_dict(o)                                   # what --resume does
    # saving without extra_state drops the stale training state
    ckpt.save_checkpoint(tmp_path / "last", model, _tiny_config())
    with pytest.raises(FileNotFoundError, match="training state"):
        ckpt.load_training_state(tmp_path / "last")


class _Kill(Exception):
    pass


def test_checkpoint_save_interrupted_between_renames_is_completed(tmp_path, monkeypatch):
    old, new = _tiny_model(0), _tiny_model(1)
    stem = str(tmp_path / "last")
    ckpt.save_checkpoint(stem, old, _tiny_config(epoch=1), extra_state={"epoch": 1})
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if dst.endswith(".json"):
            raise _Kill                                     # killed after the weights, before the config
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(_Kill):
        ckpt.save_checkpoint(stem, new, _tiny_config(epoch=2), extra_state={"epoch": 2})
    monkeypatch.setattr(ckpt.os, "replace", real_replace)
    assert calls[-1] == stem + ".json" and os.path.exists(stem + ".json.tmp")
    model, config = ckpt.load_model(stem)                      # rolls the save forward
    assert config["epoch"] == 2 and ckpt.load_training_state(stem)["epoch"] == 2
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), new(x))
    assert not any(f.endswith(".tmp") for f in os.listdir(tmp_path))


def test_checkpoint_save_killed_while_writing_keeps_the_old_one(tmp_path, monkeypatch):
    old, new = _tiny_model(0), _tiny_model(1)
    stem = str(tmp_path / "best")
    ckpt.save_checkpoint(stem, old, _tiny_config(epoch=1))
    real_write = ckpt._write_tmp

    def write(path, data):
        if path.endswith(".json"):
            with open(path + ".tmp", "wb") as f:
                f.write(data[: len(data) // 2])                # half a JSON file, then the kill
            raise _Kill
        return real_write(path, data)

    monkeypatch.setattr(ckpt, "_write_tmp", write)
    with pytest.raises(_Kill):
        ckpt.save_checkpoint(stem, new, _tiny_config(epoch=2))
    monkeypatch.setattr(ckpt, "_write_tmp", real_write)
    model, config = ckpt.load_model(tmp_path)
    x = torch.randn(2, 3, 32, 32)
    assert config["epoch"] == 1 and torch.equal(model(x), old(x))
    assert not any(f.endswith(".tmp") for f in os.listdir(tmp_path))


def test_checkpoint_errors(tmp_path):
    model = _tiny_model()
    with pytest.raises(FileNotFoundError, match="best.json"):
        ckpt.load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        ckpt.load_model(tmp_path / "nothing.safetensors")
    with pytest.raises(ValueError, match="missing the keys"):
        ckpt.save_checkpoint(tmp_path / "x", model, {"model": "vit_bra_tiny_patch16_224"})
    with pytest.raises(ValueError, match="without extension"):
        ckpt.save_checkpoint(tmp_path / "x.json", model, _tiny_config())
    a = ckpt.save_checkpoint(tmp_path / "a", model, _tiny_config())
    b = ckpt.save_checkpoint(tmp_path / "b", model, _tiny_config())
    os.replace(b + ".safetensors", a + ".safetensors")            # weights of another save
    with pytest.raises(ckpt.CheckpointError, match="checkpoint ids differ"):
        ckpt.load_model(a)


# ---------------------------------------------------------------------------------------------- loop pieces


def test_sharded_sampler_shards_cover_the_epoch_order():
    n = 23
    single = ShardedSampler(n, seed=7)
    single.set_epoch(3)
    order = list(single)
    assert sorted(order) == list(range(n))                                   # a permutation
    shards = []
    for rank in range(3):
        s = ShardedSampler(n, num_replicas=3, rank=rank, seed=7)
        s.set_epoch(3)
        shards.append(list(s))
        assert len(shards[-1]) == len(s) == 8
    padded = order + order[: 24 - n]
    assert [padded[i] for i in range(24)] == [shards[i % 3][i // 3] for i in range(24)]
    single.set_epoch(4)
    assert list(single) != order                                             # a new order each epoch
    assert shard_indices(10, 1, 3) == [1, 4, 7]


def test_balanced_sampler_equalises_classes():
    targets = [0] * 900 + [1] * 90 + [2] * 10
    w = balanced_weights(targets, 3)
    assert torch.allclose(w[[0, 900, 999]], torch.tensor([1 / 900, 1 / 90, 1 / 10], dtype=torch.float64))
    s = ShardedSampler(len(targets), weights=w, seed=0)
    counts = np.zeros(3)
    for epoch in range(6):
        s.set_epoch(epoch)
        counts += np.bincount([targets[i] for i in s], minlength=3)
    freq = counts / counts.sum()
    assert np.all(np.abs(freq - 1 / 3) < 0.03), freq                          # 6000 draws: sd ~0.006


def test_warmup_cosine_schedule_values():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([p], lr=1.0)
    sched = WarmupCosineSchedule(opt, warmup_steps=4, total_steps=14, min_lr=0.1)
    lrs = [sched.step() for _ in range(14)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # after warmup: 0.1 + 0.9 * (1 + cos(pi * t)) / 2 with t = (step - 4) / 10
    assert lrs[4:] == pytest.approx([0.1 + 0.45 * (1 + math.cos(math.pi * t / 10)) for t in range(10)])
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupCosineSchedule(opt, warmup_steps=5, total_steps=4)


def test_parse_key_values_and_model_output():
    assert parse_key_values(["depth=2", "backend=cpu", "img_size=[64, 64]", "x=true"], "--model-kwargs") == \
        {"depth": 2, "backend": "cpu", "img_size": [64, 64], "x": True}
    assert parse_key_values(["n=2"], "--data-opt", parse_values=False) == {"n": "2"}
    for bad in (["depth"], ["=2"], ["a=1", "a=2"]):
        with pytest.raises(ValueError, match="--model-kwargs"):
            parse_key_values(bad, "--model-kwargs")
    logits = torch.zeros(2, 7)
    assert split_model_output(logits)[1] == {}
    out, aux = split_model_output((logits, {"a": torch.tensor(1.0)}))
    assert out is logits and set(aux) == {"a"}
    with pytest.raises(TypeError, match="scalar"):
        split_model_output((logits, {"a": torch.ones(3)}))
    assert derive_seed(1, 2) == derive_seed(1, 2) != derive_seed(1, 3)


# ---------------------------------------------------------------------------------------------- training runs


class _AuxNet(nn.Module):
    """A tiny classifier with the extra-losses protocol: ``forward(x, targets=None)``."""

    calls: list = []

    def __init__(self, num_classes: int = 7, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 8, 8)
        self.head = nn.Linear(8, num_classes)
        self.extra = nn.Parameter(torch.ones(3))         # moved only by the "pull" loss

    def forward(self, x, targets=None):
        logits = self.head(self.conv(x).mean((2, 3)))
        _AuxNet.calls.append(targets is not None)
        if targets is None:
            return logits
        assert targets.shape == (x.shape[0],) and targets.dtype == torch.long
        return logits, {"pull": 0.5 * (self.extra ** 2).sum(), "const": logits.new_tensor(0.25)}


@register_model
def fer_test_auxnet(pretrained=False, **kwargs):
    kwargs = {k: v for k, v in kwargs.items() if k in ("num_classes", "img_size")}
    return _AuxNet(**kwargs)


def test_extra_losses_are_added_and_logged(tmp_path):
    _AuxNet.calls.clear()
    run = str(tmp_path / "aux")
    rc = main(["train", "--dataset", "synthetic", "--data-opt", "num_samples=56", "size=32", "--model",
               "fer_test_auxnet", "--img-size", "32", "--epochs", "2", "--batch-size", "8", "--lr", "0.1",
               "--weight-decay", "0", "--warmup-epochs", "0", "--workers", "0", "--out", run])
    assert rc == 0
    m = _read_metrics(run)
    assert [r["epoch"] for r in m] == [1, 2]
    for r in m:
        assert r["aux_const"] == pytest.approx(0.25, abs=1e-12)
        assert r["train_loss"] == pytest.approx(r["train_ce_loss"] + r["aux_pull"] + r["aux_const"], rel=1e-6)
    assert m[1]["aux_pull"] < m[0]["aux_pull"] < 1.5                   # 0.5 * 3 * 1^2 = 1.5 at the start
    extra = st.load_file(os.path.join(run, "last.safetensors"))["extra"]
    assert (extra < 0.7).all()                                         # only the aux loss's gradient moves it
    # targets in training (7 steps per epoch), none in validation (2 batches of <= 8 of the 14 val images)
    assert _AuxNet.calls == ([True] * 7 + [False] * 2) * 2


def test_training_run_learns_synthetic_faces(tmp_path, capsys):
    """Two epochs of a tiny routed-attention ViT on the synthetic faces reach well above chance (1/7)."""
    run = str(tmp_path / "run")
    rc = main(["train", "--dataset", "synthetic", "--data-opt", "num_samples=1400", "variation=0.3",
               "--model", "vit_bra_tiny_patch16_224", "--img-size", "48",
               "--model-kwargs", "patch_size=8", "depth=2", "num_regions=2", "topk=2",
               "--epochs", "2", "--batch-size", "32", "--lr", "2e-3", "--warmup-epochs", "0.2",
               "--rotation", "0", "--erasing", "0", "--no-random-crop", "--workers", "0", "--out", run])
    assert rc == 0
    m = _read_metrics(run)
    assert [r["epoch"] for r in m] == [1, 2]
    assert m[1]["train_loss"] < m[0]["train_loss"]
    assert m[1]["val_samples"] == 350 and m[1]["val_unreadable"] == 0 and m[1]["train_unreadable"] == 0
    best = max(r["val_acc"] for r in m)
    assert best >= 0.45, m                                             # chance is 1/7; ~0.7 here
    assert m[1]["lr"] < 1e-4 and m[1]["images_per_s"] > 0
    printed = capsys.readouterr().out
    assert "epoch 2/2" in printed and "best val_acc" in printed

    # independent check of the reported val accuracy and of the best checkpoint: reload it, score the val split
    model, config = ckpt.load_model(run)
    assert config["epoch"] == 1 + [r["val_acc"] for r in m].index(best) and config["metrics"]["val_acc"] == best
    val = build_dataset("synthetic", None, "val", transform=eval_transform(config), **config["data_options"])
    x = torch.stack([val[i][0] for i in range(len(val))])
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 64]).argmax(1) for i in range(0, len(x), 64)])
    acc = (pred == torch.tensor(val.targets)).double().mean().item()
    assert abs(acc - best) <= 1.5 / len(val)                            # batch composition may flip one argmax


def test_resume_after_kill_is_bitwise_identical(tmp_path):
    """Run 2 epochs straight, and 1 epoch + --resume: same weights, optimizer state and metrics. Workers, the
    balanced sampler, every augmentation, label smoothing and clipping are on, so all their RNG must resume."""
    common = ["train", "--dataset", "synthetic", "--data-opt", "num_samples=84", "size=32", *TINY,
              "--epochs", "2", "--batch-size", "16", "--workers", "1", "--balanced-sampler",
              "--label-smoothing", "0.1", "--clip-grad", "1.0", "--rotation", "20", "--erasing", "0.5"]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    seed = ["--seed", "3"]
    assert main(common + seed + ["--out", straight]) == 0
    assert main(common + seed + ["--out", resumed, "--stop-after-epoch", "1"]) == 0
    assert ckpt.read_config(os.path.join(resumed, "last"))["epoch"] == 1
    assert len(_read_metrics(resumed)) == 1
    assert main(common + seed + ["--out", resumed]) == 2               # refuses to overwrite a run
    with open(os.path.join(resumed, "metrics.jsonl"), "a") as f:       # killed after logging epoch 2, before
        f.write(json.dumps({"epoch": 2, "val_acc": -1}) + "\n")       # its checkpoint: the line is redone
    assert main(common + seed + ["--out", resumed, "--resume"]) == 0

    a = st.load_file(os.path.join(straight, "last.safetensors"))
    b = st.load_file(os.path.join(resumed, "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = ckpt.load_training_state(straight), ckpt.load_training_state(resumed)
    for i, s in sa["optimizer"]["state"].items():
        assert all(torch.equal(s[k], sb["optimizer"]["state"][i][k]) for k in s)
    assert sa["schedule"] == sb["schedule"] and sa["epoch"] == sb["epoch"] == 2
    strip = [{k: v for k, v in r.items() if k not in ("time_s", "images_per_s")} for r in _read_metrics(straight)]
    assert strip == [{k: v for k, v in r.items() if k not in ("time_s", "images_per_s")}
                     for r in _read_metrics(resumed)]
    # and another seed gives other weights (the comparison above can fail)
    other = str(tmp_path / "other")
    assert main(common + ["--seed", "4", "--out", other]) == 0
    c = st.load_file(os.path.join(other, "last.safetensors"))
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_unreadable_images_are_skipped_and_counted(tmp_path):
    """A class-folder dataset written here with broken files: the epoch runs through them (batch size 1, so some
    batches are entirely unreadable) and metrics count them."""
    rng = np.random.default_rng(0)
    for split, good, bad in (("train", 4, 2), ("val", 2, 1)):
        for c, cls in enumerate(("calm", "smile")):
            d = tmp_path / "data" / split / cls
            d.mkdir(parents=True)
            for i in range(good):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
            for i in range(bad if c == 0 else 0):
                (d / f"broken{i}.png").write_bytes(b"not a png at all")
    run = str(tmp_path / "run")
    with pytest.warns(UserWarning, match="broken"):
        rc = main(["train", "--dataset", "folder", "--data", str(tmp_path / "data"), *TINY, "--epochs", "1",
                   "--batch-size", "1", "--workers", "0", "--out", run])
    assert rc == 0
    (m,) = _read_metrics(run)
    assert m["train_unreadable"] == 2 and m["val_unreadable"] == 1
    assert m["val_samples"] == 4 and 0 <= m["val_acc"] <= 1
    assert ckpt.read_config(run)["classes"] == ["calm", "smile"]

    # when every training image is unreadable no update happens at all: the weights stay the seeded init
    for f in (tmp_path / "data" / "train").rglob("*.png"):
        f.write_bytes(b"broken")
    run2 = str(tmp_path / "run2")
    with pytest.warns(UserWarning):
        assert main(["train", "--dataset", "folder", "--data", str(tmp_path / "data"), *TINY, "--epochs", "1",
                     "--batch-size", "1", "--workers", "0", "--seed", "5", "--out", run2]) == 0
    assert _read_metrics(run2)[0]["train_unreadable"] == 10
    torch.manual_seed(5)
    init = timm.create_model("vit_bra_tiny_patch16_224", num_classes=2, img_size=32, patch_size=8, depth=1,
                             num_regions=2, topk=2).state_dict()
    saved = st.load_file(os.path.join(run2, "last.safetensors"))
    assert all(torch.equal(saved[k], init[k]) for k in init)
