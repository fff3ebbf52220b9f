"""dynattn.fer evaluation: metrics against hand computations (and scikit-learn when installed), the PNG plots,
evaluate() on a tiny routed ViT, and `dynattn-fer eval` end to end on the synthetic set and a folder dataset."""

import json
import os

import numpy as np
import pytest
import torch

timm = pytest.importorskip("timm")
PIL_Image = pytest.importorskip("PIL.Image")
pytest.importorskip("matplotlib")

import dynattn.models  # noqa: E402,F401  (registers vit_bra_*)
from dynattn.fer import metrics, plots  # noqa: E402
from dynattn.fer.checkpoint import save_checkpoint  # noqa: E402
from dynattn.fer.datasets.base import UnreadableImageError  # noqa: E402
from dynattn.fer.datasets.synthetic import SyntheticFaces  # noqa: E402
from dynattn.fer.evaluate import evaluate  # noqa: E402
from dynattn.fer.transforms import eval_transform  # noqa: E402

CLASSES = ["Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral"]
MODEL_KWARGS = dict(img_size=32, patch_size=8, depth=1, num_regions=2, topk=2, global_pool="avg")
SYN_OPTS = dict(size=32, num_samples=14, eval_samples=21, seed=3)

# ---------------------------------------------------------------------------------------------- metrics

# 3 classes: cm = [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
Y_TRUE = [0, 0, 1, 2, 2, 2]
Y_PRED = [0, 1, 1, 2, 0, 2]


def test_metrics_by_hand():
    cm = metrics.confusion_matrix(Y_TRUE, Y_PRED, 3)
    assert cm.dtype == np.int64 and cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    p, r, f1, s = metrics.precision_recall_f1(cm)
    np.testing.assert_allclose(p, [1 / 2, 1 / 2, 2 / 2])  # tp / column sums
    np.testing.assert_allclose(r, [1 / 2, 1 / 1, 2 / 3])  # tp / row sums
    np.testing.assert_allclose(f1, [0.5, 2 * 0.5 * 1 / 1.5, 2 * 1 * (2 / 3) / (5 / 3)])
    assert s.tolist() == [2, 1, 3]
    assert metrics.accuracy(Y_TRUE, Y_PRED) == pytest.approx(4 / 6)
    assert metrics.balanced_accuracy(Y_TRUE, Y_PRED) == pytest.approx((1 / 2 + 1 + 2 / 3) / 3)
    assert metrics.macro_f1(Y_TRUE, Y_PRED) == pytest.approx((0.5 + 2 / 3 + 0.8) / 3)
    np.testing.assert_allclose(metrics.normalize_confusion_matrix(cm), [[.5, .5, 0], [0, 1, 0], [1 / 3, 0, 2 / 3]])

    # a 4th class that occurs nowhere: zeros in the table, left out of the averages
    rep = metrics.classification_report(Y_TRUE, Y_PRED, 4, class_names=["a", "b", "c", "d"])
    assert rep["accuracy"] == pytest.approx(4 / 6)
    assert rep["mean_class_accuracy"] == pytest.approx((1 / 2 + 1 + 2 / 3) / 3)
    assert rep["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 0.8) / 3)
    assert rep["weighted_f1"] == pytest.approx((0.5 * 2 + 2 / 3 * 1 + 0.8 * 3) / 6)
    assert rep["per_class"][3] == {"class": "d", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert rep["confusion_matrix_normalized"][3] == [0.0] * 4
    assert rep["num_samples"] == 6 and rep["classes"] == ["a", "b", "c", "d"]
    json.dumps(rep)  # plain Python types only

    # a class that is never predicted: precision 0 (no division error), it still counts in the averages
    rep = metrics.classification_report([0, 1, 1], [0, 0, 0], 2)
    assert [c["precision"] for c in rep["per_class"]] == [pytest.approx(1 / 3), 0.0]
    assert rep["mean_class_accuracy"] == pytest.approx(0.5)
    assert rep["macro_f1"] == pytest.approx((2 * (1 / 3) / (4 / 3) + 0) / 2)

    text = metrics.format_report(rep)
    assert "accuracy" in text and "33.33" in text and "macro-F1" in text


def test_metrics_input_errors():
    with pytest.raises(ValueError, match="same length"):
        metrics.confusion_matrix([0, 1], [0], 2)
    with pytest.raises(ValueError, match=r"y_pred holds class ids outside \[0, 2\)"):
        metrics.confusion_matrix([0, 1], [0, 2], 2)
    with pytest.raises(TypeError, match="integer class ids"):
        metrics.accuracy([0.5, 1.0], [0, 1])
    with pytest.raises(ValueError, match="1-d"):
        metrics.accuracy([[0, 1]], [[0, 1]])
    with pytest.raises(ValueError, match="class_names has 2 names"):
        metrics.classification_report([0, 1, 2], [0, 1, 2], 3, class_names=["a", "b"])
    with pytest.raises(ValueError, match=r"y_true holds class ids outside \[0, 2\)"):
        metrics.classification_report([0, 1, 2], [0, 1, 1], class_names=["a", "b"])
    with pytest.raises(ValueError, match="square"):
        metrics.normalize_confusion_matrix(np.zeros((2, 3)))


def test_metrics_match_sklearn():
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for trial in range(20):
        C = int(rng.integers(2, 9))
        n = int(rng.integers(1, 60))
        t = rng.integers(0, C, n)
        p = np.where(rng.random(n) < 0.5, t, rng.integers(0, C, n))
        rep = metrics.classification_report(t, p, C)
        assert rep["accuracy"] == pytest.approx(skm.accuracy_score(t, p))
        assert rep["macro_f1"] == pytest.approx(skm.f1_score(t, p, average="macro", zero_division=0))
        assert rep["weighted_f1"] == pytest.approx(
            skm.f1_score(t, p, average="weighted", zero_division=0, labels=np.unique(t)))
        cm = skm.confusion_matrix(t, p, labels=range(C))
        assert rep["confusion_matrix"] == cm.tolist()
        sp, sr, sf, ss = skm.precision_recall_fscore_support(t, p, labels=range(C), zero_division=0)
        np.testing.assert_allclose([c["precision"] for c in rep["per_class"]], sp)
        np.testing.assert_allclose([c["recall"] for c in rep["per_class"]], sr)
        np.testing.assert_allclose([c["f1"] for c in rep["per_class"]], sf)
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                balanced = skm.balanced_accuracy_score(t, p)
        assert rep["mean_class_accuracy"] == pytest.approx(balanced)


# ---------------------------------------------------------------------------------------------- plots


def test_confusion_matrix_png(tmp_path):
    cm = metrics.confusion_matrix(Y_TRUE, Y_PRED, 3)
    path = plots.plot_confusion_matrix(cm, ["Anger", "Happy", "Neutral"], str(tmp_path / "sub" / "cm.png"))
    img = PIL_Image.open(path)
    assert img.format == "PNG" and img.width > 200 and img.height > 200
    px = np.asarray(img.convert("RGB")).reshape(-1, 3).astype(int)
    assert ((px[:, 2] - px[:, 0]) > 80).sum() > 1000  # blue cells were drawn
    with pytest.raises(ValueError, match="class_names has 2 names"):
        plots.plot_confusion_matrix(cm, ["a", "b"], str(tmp_path / "x.png"))


def test_training_curves_png(tmp_path):
    path = tmp_path / "metrics.jsonl"
    recs = [{"epoch": e, "train_loss": 2.0 / e, "val_loss": 2.2 / e, "val_acc": 0.2 * e,
             "val_mean_class_acc": 0.18 * e, "lr": 1e-3} for e in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"epoch": 4, "train_lo')  # killed mid-write
    assert plots.load_metrics_jsonl(str(path)) == recs
    out = plots.plot_training_curves(str(path), str(tmp_path / "curves.png"))
    assert PIL_Image.open(out).format == "PNG"
    plots.plot_training_curves(recs[:1], str(tmp_path / "one.png"))  # records work as well as a file

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"epoch": 1}\nnot json\n{"epoch": 2}\n')
    with pytest.raises(ValueError, match="bad.jsonl, line 2"):
        plots.load_metrics_jsonl(str(bad))
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        plots.load_metrics_jsonl(str(tmp_path / "nope.jsonl"))
    with pytest.raises(ValueError, match="no record with a numeric 'epoch'"):
        plots.plot_training_curves([{"step": 1}], str(tmp_path / "c.png"))


# ---------------------------------------------------------------------------------------------- evaluate()


def _tiny_model():
    model = timm.create_model("vit_bra_tiny_patch16_224", num_classes=len(CLASSES), **MODEL_KWARGS).eval()
    with torch.no_grad():  # timm zero-inits the head: random logits that differ between images
        for name, p in model.named_parameters():
            if "token" in name or name.startswith("head"):
                p.normal_(0, 1.0)
    return model


def _config():
    return dict(model="vit_bra_tiny_patch16_224", model_kwargs=dict(MODEL_KWARGS), num_classes=len(CLASSES),
                classes=CLASSES, img_size=32, mean=[0.5] * 3, std=[0.5] * 3, dataset="synthetic", epoch=2,
                metrics={}, data=None, data_options=dict(SYN_OPTS))


class _Broken(SyntheticFaces):
    """Synthetic faces whose images 2 and 5 cannot be read."""

    def load_image(self, index):
        if index in (2, 5):
            raise UnreadableImageError(f"cannot read image synthetic:{index}: truncated")
        return super().load_image(index)


def _by_hand(model, dataset):
    """Per-sample logits, one image at a time (an independent batching of the same model)."""
    out = {}
    with torch.no_grad():
        for i in range(len(dataset)):
            item = dataset[i]
            if item is not None:
                out[i] = model(item[0][None])[0]
    return out


@pytest.mark.parametrize("workers", [0, 2])
def test_evaluate_counts_unreadable_and_matches_per_image(workers):
    torch.manual_seed(0)
    model = _tiny_model()
    ds = _Broken(None, "test", eval_transform(_config()), **SYN_OPTS)
    with pytest.warns(UserWarning, match="skipping sample"):
        hand = _by_hand(model, ds)
    rep = evaluate(model, ds, batch_size=4, device="cpu", workers=workers)
    assert rep["num_unreadable"] == 2 and rep["num_samples"] == 19
    assert rep["indices"] == [i for i in range(21) if i not in (2, 5)]
    assert rep["targets"] == [ds.samples[i].label for i in rep["indices"]]
    assert rep["predictions"] == [int(hand[i].argmax()) for i in rep["indices"]]
    assert len(set(rep["predictions"])) > 1  # a model that says something
    t, p = np.array(rep["targets"]), np.array(rep["predictions"])
    assert rep["accuracy"] == pytest.approx((t == p).mean())
    recalls = [(p[t == c] == c).mean() for c in range(7) if (t == c).any()]
    assert rep["mean_class_accuracy"] == pytest.approx(np.mean(recalls))
    logits = torch.stack([hand[i] for i in rep["indices"]])
    assert rep["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, torch.tensor(t))), abs=1e-5)
    assert rep["classes"] == CLASSES


def test_evaluate_errors():
    model = _tiny_model()
    ds = SyntheticFaces(None, "test", eval_transform(_config()), **SYN_OPTS)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(model, ds, batch_size=0)
    with pytest.raises(ValueError, match="model predicts 7 classes but the dataset has 3"):
        evaluate(model, ds, class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="amp"):
        evaluate(model, ds, amp="fp8")


# ---------------------------------------------------------------------------------------------- the CLI


def _cli(argv):
    from dynattn.fer.cli import main

    return main(argv)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("run")
    save_checkpoint(os.path.join(d, "best"), _tiny_model(), _config())
    return str(d)


def test_eval_cli_json_on_synthetic(run_dir, capsys):
    rc = _cli(["eval", "--checkpoint", run_dir, "--json", "--batch-size", "8"])
    out = capsys.readouterr().out
    assert rc == 0
    result = json.loads(out)  # exactly one JSON object on stdout
    for key in ("accuracy", "mean_class_accuracy", "macro_f1", "per_class", "confusion_matrix", "num_unreadable",
                "predictions", "targets", "indices", "dataset", "split"):
        assert key in result
    assert result["dataset"] == "synthetic" and result["split"] == "test" and result["num_samples"] == 21
    t, p = np.array(result["targets"]), np.array(result["predictions"])
    recomputed = metrics.classification_report(t, p, 7, class_names=CLASSES)
    for key in ("accuracy", "mean_class_accuracy", "macro_f1", "confusion_matrix", "per_class"):
        assert result[key] == recomputed[key]
    # the data is the synthetic test split, with the options recorded in the checkpoint
    ds = SyntheticFaces(None, "test", **SYN_OPTS)
    assert result["targets"] == ds.targets
    assert PIL_Image.open(os.path.join(run_dir, "confusion_matrix.png")).format == "PNG"
    with open(os.path.join(run_dir, "eval.json")) as f:
        assert json.load(f)["accuracy"] == result["accuracy"]
    with open(os.path.join(run_dir, "predictions.csv")) as f:
        rows = f.read().splitlines()
    assert rows[0].startswith("index,target,prediction") and len(rows) == 22
    assert [int(r.split(",")[2]) for r in rows[1:]] == result["predictions"]


def _write_folder_dataset(root, model, config):
    """A class-per-folder test split: two images per class, plus one broken file."""
    rng = np.random.default_rng(0)
    for c in CLASSES:
        d = root / "test" / c
        d.mkdir(parents=True)
        for j in range(2):
            PIL_Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(d / f"{j}.png")
    (root / "test" / "Happy" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    for c in CLASSES:  # the folder loader wants the train split too
        (root / "train" / c).mkdir(parents=True)
        PIL_Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(root / "train" / c / "0.png")


def test_eval_cli_folder_dataset_text_output(run_dir, tmp_path, capsys):
    pytest.importorskip("dynattn.fer.datasets.folder")
    root = tmp_path / "faces"
    _write_folder_dataset(root, None, None)
    out_dir = tmp_path / "out"
    with pytest.warns(UserWarning):
        rc = _cli(["eval", "--checkpoint", os.path.join(run_dir, "best.safetensors"), "--dataset", "folder",
                   "--data", str(root), "--out", str(out_dir)])
    captured = capsys.readouterr()
    out = captured.out
    assert rc == 0
    assert "mapping them onto the checkpoint's" in captured.err  # the folders sort Neutral before Sad
    for needle in ("accuracy", "mean class accuracy", "macro-F1", "precision", "recall", "support",
                   "1 unreadable", "confusion matrix"):
        assert needle in out
    for c in CLASSES:
        assert c in out
    files = sorted(os.listdir(out_dir))
    assert files == ["confusion_matrix_folder_test.png", "eval_folder_test.json", "predictions_folder_test.csv"]
    with open(out_dir / "eval_folder_test.json") as f:
        result = json.load(f)
    assert result["num_unreadable"] == 1 and result["num_samples"] == 14
    line = next(ln for ln in out.splitlines() if ln.startswith("accuracy"))
    assert f"{result['accuracy'] * 100:.2f}" in line
    # labels are in the checkpoint's order: Neutral (folder label 4) is the model's class 6
    assert result["classes"] == CLASSES
    assert sorted(result["targets"]) == sorted([c for c in range(7) for _ in range(2)])
    from dynattn.fer.datasets import build_dataset

    ds = build_dataset("folder", str(root), "test")
    for i, t in zip(result["indices"], result["targets"]):
        assert CLASSES[t] == os.path.basename(os.path.dirname(ds.samples[i].source))


def test_eval_cli_errors(run_dir, tmp_path, capsys):
    assert _cli(["eval", "--checkpoint", str(tmp_path / "no_run")]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    assert _cli(["eval", "--checkpoint", run_dir, "--dataset", "rafdb"]) == 2
    assert "--data is required" in capsys.readouterr().err
    for c in ("a", "b", "c"):  # a 3-class folder set for a 7-class model
        (tmp_path / "three" / "test" / c).mkdir(parents=True)
        PIL_Image.new("RGB", (8, 8)).save(tmp_path / "three" / "test" / c / "0.png")
    assert _cli(["eval", "--checkpoint", run_dir, "--dataset", "folder", "--data", str(tmp_path / "three")]) == 2
    assert "the checkpoint has 7 classes" in capsys.readouterr().err


def test_eval_reproduces_the_training_runs_validation(tmp_path, capsys):
    # `train`'s own validation pass is an independent implementation of the same numbers
    out = tmp_path / "run"
    assert _cli(["train", "--dataset", "synthetic", "--data-opt", "size=32", "--data-opt", "num_samples=35",
                 "--data-opt", "eval_samples=21", "--model", "vit_bra_tiny_patch16_224", "--img-size", "32",
                 "--model-kwargs", "depth=1", "num_regions=2", "patch_size=8", "--epochs", "1",
                 "--batch-size", "16", "--out", str(out)]) == 0
    capsys.readouterr()
    assert _cli(["eval", "--checkpoint", str(out), "--split", "val", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    with open(out / "best.json") as f:
        logged = json.load(f)["metrics"]
    assert result["num_samples"] == logged["val_samples"] == 21
    assert result["accuracy"] == pytest.approx(logged["val_acc"], abs=1e-9)
    assert result["mean_class_accuracy"] == pytest.approx(logged["val_mean_class_acc"], abs=1e-6)
    assert result["loss"] == pytest.approx(logged["val_loss"], rel=1e-4)
    assert result["files"]["training_curves"] == str(out / "training_curves.png")
    assert PIL_Image.open(out / "training_curves.png").format == "PNG"
    assert os.path.isfile(out / "confusion_matrix_synthetic_val.png")
