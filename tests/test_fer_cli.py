"""The ``dynattn-fer`` command: help, entry point, argument errors, and DDP training with 2 CPU processes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("safetensors")
import safetensors.torch as st  # noqa: E402

from dynattn.fer import checkpoint as ckpt  # noqa: E402
from dynattn.fer.cli import main  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "vit_bra_tiny_patch16_224", "--img-size", "32",
        "--model-kwargs", "patch_size=8", "depth=1", "num_regions=2", "topk=2"]
SYNTH = ["--dataset", "synthetic", "--data-opt", "num_samples=70", "size=32"]


@pytest.fixture(autouse=True)
def _one_thread():
    # the in-process training runs use one intra-op thread: on a shared 2-core machine two threads slow down
    # several-fold whenever another process holds a core
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _run(args, cwd, timeout=240):
    # the child imports the same dynattn as this process (installed, or PYTHONPATH), from an empty folder
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, timeout=timeout)


def test_module_help_lists_the_subcommands(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("train", "eval", "predict", "datasets", "torchrun"):
        assert word in out
    res = _run([sys.executable, "-m", "dynattn.fer", "train", "--help"], tmp_path)
    assert res.returncode == 0, res.stderr
    for flag in ("--resume", "--balanced-sampler", "--amp", "--model-kwargs", "--data-opt", "--clip-grad",
                 "--warmup-epochs", "--label-smoothing", "--tensorboard", "--img-size", "--pretrained"):
        assert flag in res.stdout
    assert "--stop-after-epoch" not in res.stdout                    # internal test hook stays hidden


def test_console_script_entry_point(tmp_path):
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    target = project["scripts"]["dynattn-fer"]
    assert target == "dynattn.fer.cli:main"
    assert "safetensors" in " ".join(project["optional-dependencies"]["fer"])
    # what the generated `dynattn-fer` script does: import the target and sys.exit() its result
    module, func = target.split(":")
    code = f"import sys; from {module} import {func}; sys.exit({func}())"
    res = _run([sys.executable, "-c", code, "datasets"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "synthetic" in res.stdout and "rafdb" in res.stdout
    installed = shutil.which("dynattn-fer") or shutil.which("dynattn-fer", path=os.path.dirname(sys.executable))
    if installed is None:
        pytest.skip("dynattn is not pip-installed here, so there is no dynattn-fer executable to run")
    res = _run([installed, "--help"], tmp_path)
    assert res.returncode == 0 and "train" in res.stdout, res.stderr


@pytest.mark.parametrize("extra, message", [
    (["--epochs", "0"], "--epochs must be > 0"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--warmup-epochs", "5"], "--warmup-epochs"),
    (["--label-smoothing", "1.5"], "--label-smoothing"),
    (["--model-kwargs", "depth"], "--model-kwargs expects key=value"),
    (["--model-kwargs", "num_classes=3"], "num_classes"),
    (["--model-kwargs", "img_size=48"], "contradicts"),
    (["--model", "no_such_model_xyz"], "no_such_model_xyz"),
    (["--dataset", "nope"], "unknown dataset 'nope'"),
    (["--data-opt", "variation=abc"], "variation"),
    (["--data-opt", "colour=red"], "colour"),
    (["--resume"], "no checkpoint"),
    (["--crop-scale", "0.5", "2"], "--crop-scale"),
    (["--hflip", "2"], "--hflip"),
    (["--dataset", "rafdb"], "--data is required"),
    (["--dataset", "rafdb", "--data", "/nonexistent/raf", "--data-opt", "val_fraction=0.1"], "/nonexistent/raf"),
    (["--data-opt", "num_samples=70", "num_samples=7"], "twice"),
])
def test_train_argument_errors(tmp_path, capsys, extra, message):
    # options given twice: the later wins; repeatable ones (--model-kwargs, --data-opt) add to the list
    # (no --data-opt here: a real dataset would reject the synthetic set's options before its own error)
    args = ["train", "--dataset", "synthetic", *TINY, "--epochs", "1", "--workers", "0",
            "--out", str(tmp_path / "run"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("dynattn-fer train: error:") and message in err, err
    assert not os.path.exists(tmp_path / "run" / "last.json")


def test_missing_required_and_fp16_on_cpu(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--dataset", "synthetic"])
    assert e.value.code == 2 and "--out" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["train", *SYNTH, "--amp", "fp32", "--out", str(tmp_path)])
    assert e.value.code == 2 and "fp32" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["train", *SYNTH, *TINY, "--amp", "fp16", "--device", "cpu", "--out", str(tmp_path / "r")]) == 2
        assert "--amp fp16 needs a CUDA device" in capsys.readouterr().err


def test_bf16_autocast_on_cpu_trains_with_tensorboard(tmp_path):
    run = str(tmp_path / "bf16")
    tensorboard = "--tensorboard" if _has_tensorboard() else "--progress=off"
    assert main(["train", *SYNTH, *TINY, "--epochs", "1", "--batch-size", "16", "--amp", "bf16", "--workers", "0",
                 "--device", "cpu", tensorboard, "--out", run]) == 0
    config = ckpt.read_config(run)
    assert config["train_args"]["amp"] == "bf16"
    weights = st.load_file(os.path.join(run, "best.safetensors"))
    assert all(t.dtype == torch.float32 for t in weights.values())     # autocast, not a bf16 model
    if tensorboard == "--tensorboard":
        events = os.listdir(os.path.join(run, "tensorboard"))
        assert any(f.startswith("events.out.tfevents") for f in events), events


def _has_tensorboard():
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def test_train_does_not_need_the_eval_and_predict_modules(monkeypatch, capsys):
    import importlib

    from dynattn.fer import cli

    real = importlib.import_module

    def fake(name, *args):
        if name in ("dynattn.fer.predict", "dynattn.fer.evaluate"):
            raise ImportError("No module named 'cv2'")
        return real(name, *args)

    monkeypatch.setattr(cli.importlib, "import_module", fake)
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0 and "--balanced-sampler" in capsys.readouterr().out
    assert main(["predict", "face.jpg", "--checkpoint", "run"]) == 2
    err = capsys.readouterr().err
    assert "cv2" in err and 'pip install "dynattn[fer]"' in err


def _sha_fingerprint(state):
    # the same digest train.weights_fingerprint sends through all_gather, recomputed here from the file
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    d = h.digest()
    return [float(int.from_bytes(d[6 * i: 6 * i + 6], "big")) for i in range(4)]


def test_ddp_two_cpu_processes(tmp_path):
    """torchrun with 2 gloo processes: trains, ranks hold the same weights every epoch, metrics are global."""
    run = str(tmp_path / "ddp")
    res = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "dynattn.fer", "train", *SYNTH, *TINY, "--epochs", "2", "--batch-size", "8",
                "--balanced-sampler", "--workers", "0", "--progress", "on", "--out", run], tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    metrics = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert res.stdout.count("epoch 2/2:") == 1                        # only rank 0 reports and writes
    for m in metrics:
        assert m["world_size"] == 2
        assert m["rank_fingerprints"][0] == m["rank_fingerprints"][1]
        assert m["val_samples"] == 17                                  # val is sharded, each image counted once
    last = st.load_file(os.path.join(run, "last.safetensors"))
    assert metrics[-1]["rank_fingerprints"][0] == _sha_fingerprint(last)
    # the reduced val accuracy equals a single-process evaluation of the saved weights
    from dynattn.fer.datasets import build_dataset
    from dynattn.fer.transforms import eval_transform

    model, config = ckpt.load_model(os.path.join(run, "last.json"))
    val = build_dataset("synthetic", None, "val", transform=eval_transform(config), **config["data_options"])
    with torch.no_grad():
        pred = model(torch.stack([val[i][0] for i in range(len(val))])).argmax(1)
    correct = int((pred == torch.tensor(val.targets)).sum())
    assert abs(correct - round(metrics[-1]["val_acc"] * len(val))) <= 1
    assert sorted(f for f in os.listdir(run)) == ["best.json", "best.safetensors", "last.json",
                                                  "last.safetensors", "last.state.safetensors", "metrics.jsonl"]


def test_datasets_subcommand(capsys):
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    assert "synthetic" in out and "num_samples" in out


def test_pretrained_loads_dense_weights_from_disk(tmp_path, monkeypatch, capsys):
    import timm

    torch.manual_seed(1)
    dense = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1).state_dict()
    (tmp_path / "weights").mkdir()
    st.save_file(dense, str(tmp_path / "weights" / "vit_tiny_patch16_224.safetensors"))
    monkeypatch.setenv("DYNATTN_PRETRAINED_DIR", str(tmp_path / "weights"))
    run = str(tmp_path / "pre")
    # a learning rate so small that the trained weights still equal the pretrained ones to float precision
    assert main(["train", *SYNTH, *TINY, "--pretrained", "--epochs", "1", "--lr", "1e-12", "--min-lr", "0",
                 "--workers", "0", "--out", run]) == 0
    trained = st.load_file(os.path.join(run, "last.safetensors"))
    for key in ("blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "pos_embed"):
        assert torch.allclose(trained[key], dense[key], atol=1e-6), key
    assert trained["head.weight"].shape == (7, 192)                    # a new 7-class head
    assert ckpt.read_config(run)["pretrained"] is True
    # no file: a clear error, not a download (unless the Hugging Face cache of this machine holds one)
    from dynattn.models import find_pretrained_file

    monkeypatch.setenv("DYNATTN_PRETRAINED_DIR", str(tmp_path))        # no weights there
    if find_pretrained_file("vit_tiny_patch16_224")[0] is None:
        rc = main(["train", *SYNTH, *TINY, "--pretrained", "--epochs", "1", "--workers", "0",
                   "--out", str(tmp_path / "missing")])
        assert rc == 2 and "DYNATTN_PRETRAINED_DIR" in capsys.readouterr().err
