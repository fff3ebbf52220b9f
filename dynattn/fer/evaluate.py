"""Evaluate a trained FER classifier on a dataset split: ``dynattn-fer eval``.

:func:`evaluate` runs a model over a :class:`~dynattn.fer.datasets.base.FERDataset` and returns every metric of
:func:`dynattn.fer.metrics.classification_report` plus the per-sample predictions; :func:`run_eval` is the CLI:

    dynattn-fer eval --checkpoint runs/NAME [--dataset rafdb --data DIR] [--split test] [--json] [--out DIR]

prints accuracy, mean per-class accuracy, macro-F1 and a per-class table (or, with ``--json``, one JSON object),
and writes ``confusion_matrix.png``, ``eval.json`` and ``predictions.csv`` to ``--out`` (default: the run dir),
plus ``training_curves.png`` when the run dir has a ``metrics.jsonl``. Evaluating another dataset or split than
the checkpoint's own test split names the files ``eval_<dataset>_<split>.json`` etc., so nothing is overwritten.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from .datasets.base import collate_skip_none
from .metrics import classification_report, format_report

__all__ = ["add_eval_args", "autocast_context", "evaluate", "resolve_device", "run_eval"]

AMP_CHOICES = ("auto", "none", "bf16", "fp16")


def resolve_device(device: Optional[str]) -> torch.device:
    """``"auto"``/``None`` -> the first CUDA device if there is one, else CPU; otherwise ``torch.device(device)``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but no CUDA device is visible")
    return dev


def autocast_context(amp: Optional[str], device: torch.device):
    """The autocast context for ``amp`` in :data:`AMP_CHOICES` (``None`` = ``"none"``): ``"auto"`` is bf16 on a
    GPU that supports it and float32 elsewhere."""
    if amp is None or amp is False:
        amp = "none"
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {AMP_CHOICES} or None, got {amp!r}")
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class _Indexed(Dataset):
    """``(image, label, index)`` per item (``None`` stays ``None``), so skipped samples can be told apart."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        return None if item is None else (item[0], item[1], i)


def _logits(output) -> torch.Tensor:
    # models return plain logits in eval mode; tolerate the (logits, aux_losses) training form anyway
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset,
    *,
    batch_size: int = 64,
    device="cpu",
    amp: Optional[str] = None,
    workers: int = 0,
    class_names: Optional[Sequence[str]] = None,
    return_probabilities: bool = False,
    progress: bool = False,
) -> Dict[str, Any]:
    """Classify every sample of ``dataset`` and score the predictions.

    Args:
        model: a classifier mapping ``(B, 3, S, S)`` float32 to logits ``(B, C)``; put in eval mode and moved to
            ``device`` here.
        dataset: a ``FERDataset`` (or any dataset of ``(image tensor, int label)`` / ``None`` items) whose
            transform yields the model's input, e.g. :func:`dynattn.fer.transforms.eval_transform`.
        batch_size: images per forward pass.
        device: ``"cpu"``, ``"cuda"``, ``"auto"``, a ``torch.device``.
        amp: ``None``/``"none"`` (float32), ``"bf16"``, ``"fp16"`` or ``"auto"`` (see :func:`autocast_context`).
        workers: DataLoader worker processes.
        class_names: ``C`` names (default ``dataset.classes``, else ``"0"``...).
        return_probabilities: also return the softmax probabilities.
        progress: show a tqdm progress bar on stderr.

    Returns:
        :func:`~dynattn.fer.metrics.classification_report`'s dict plus ``"loss"`` (mean cross-entropy),
        ``"num_unreadable"`` (samples skipped because their image could not be read), ``"seconds"``, and per
        evaluated sample, in dataset order: ``"indices"`` (dataset index), ``"targets"``, ``"predictions"``
        (lists of int) and, if asked, ``"probabilities"`` (lists of ``C`` floats).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ValueError(f"workers must be an int >= 0, got {workers!r}")
    if len(dataset) == 0:
        raise ValueError(f"dataset {dataset!r} is empty: nothing to evaluate")
    device = device if isinstance(device, torch.device) else resolve_device(device)
    autocast_context(amp, device)  # a bad amp fails here, before any image is read
    if class_names is None:
        class_names = list(getattr(dataset, "classes", ()) or ()) or None
    model = model.to(device).eval()
    loader = DataLoader(_Indexed(dataset), batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=collate_skip_none, pin_memory=device.type == "cuda")
    indices: List[torch.Tensor] = []
    targets: List[torch.Tensor] = []
    logits: List[torch.Tensor] = []
    start = time.perf_counter()
    batches = loader
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(loader, desc="eval", unit="batch", leave=False, file=sys.stderr)
    for batch in batches:
        if batch is None:  # every image of the batch was unreadable
            continue
        x, y, i = batch
        with autocast_context(amp, device):
            out = _logits(model(x.to(device, non_blocking=True)))
        if out.dim() != 2:
            raise ValueError(f"the model must return logits of shape (B, C), got {tuple(out.shape)}")
        if class_names is not None and len(class_names) != out.shape[1]:
            raise ValueError(f"the model predicts {out.shape[1]} classes but the dataset has {len(class_names)}: "
                             f"{list(class_names)}")
        logits.append(out.float().cpu())
        targets.append(torch.as_tensor(y, dtype=torch.int64))
        indices.append(torch.as_tensor(i, dtype=torch.int64))
    seconds = time.perf_counter() - start
    if not logits:
        raise ValueError(f"no image of {dataset!r} could be read: nothing to evaluate")
    logit = torch.cat(logits)
    target = torch.cat(targets)
    C = logit.shape[1]
    if target.min() < 0 or target.max() >= C:
        raise ValueError(f"dataset labels must be in [0, {C}) for a {C}-class model, "
                         f"got {int(target.min())}..{int(target.max())}")
    pred = logit.argmax(dim=1)
    report = classification_report(target.numpy(), pred.numpy(), C, class_names=class_names)
    report["loss"] = float(torch.nn.functional.cross_entropy(logit, target))
    report["num_unreadable"] = len(dataset) - int(target.numel())
    report["seconds"] = round(seconds, 3)
    report["indices"] = torch.cat(indices).tolist()
    report["targets"] = target.tolist()
    report["predictions"] = pred.tolist()
    if return_probabilities:
        report["probabilities"] = logit.softmax(dim=1).tolist()
    return report


# ---------------------------------------------------------------------------------------------- CLI


def add_eval_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``dynattn-fer eval`` options to ``parser`` (a subcommand parser); returns it."""
    parser.add_argument("--checkpoint", required=True,
                        help="run directory (uses its best checkpoint) or a checkpoint .safetensors/.json file")
    parser.add_argument("--dataset", default=None,
                        help="dataset name (default: the one the checkpoint was trained on)")
    parser.add_argument("--data", default=None,
                        help="dataset root (default: the training data path recorded in the checkpoint, if any)")
    parser.add_argument("--data-opt", action="append", default=[], metavar="KEY=VALUE",
                        help="dataset option passed to the loader (repeatable); defaults to the training run's")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"), help="split to evaluate")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--amp", default="none", choices=AMP_CHOICES,
                        help="mixed precision autocast (default none: exact float32 numbers for reporting; "
                             "auto: bf16 on a GPU that supports it)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    parser.add_argument("--out", default=None,
                        help="folder for confusion_matrix.png, eval.json, predictions.csv (default: the run dir)")
    return parser


class _Relabeled(Dataset):
    """``dataset`` with its labels mapped through ``mapping`` (dataset label id -> model label id)."""

    def __init__(self, dataset, mapping: List[int], classes: List[str]) -> None:
        self.dataset, self.mapping, self.classes = dataset, mapping, classes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        return None if item is None else (item[0], self.mapping[int(item[1])])

    def __repr__(self) -> str:
        return f"{self.dataset!r} relabeled to {self.classes}"


def _match_classes(dataset, classes: List[str], name: str):
    """Score in the model's label order: when the dataset names the same classes in another order (e.g. a class
    folder sorted alphabetically), map its labels onto the model's by name (case-insensitive)."""
    ds_classes = [str(c) for c in getattr(dataset, "classes", ())]
    if not classes or not ds_classes:
        return dataset
    if len(classes) != len(ds_classes):
        raise ValueError(f"the checkpoint has {len(classes)} classes {classes} but dataset {name!r} has "
                         f"{len(ds_classes)} {ds_classes}")
    lower, ds_lower = [c.lower() for c in classes], [c.lower() for c in ds_classes]
    if lower == ds_lower:
        return dataset
    if sorted(lower) == sorted(ds_lower) and len(set(lower)) == len(lower):
        print(f"note: dataset {name!r} orders its classes {ds_classes}; mapping them onto the checkpoint's "
              f"{classes} by name", file=sys.stderr)
        return _Relabeled(dataset, [lower.index(c) for c in ds_lower], classes)
    print(f"warning: class names differ between the checkpoint {classes} and dataset {name!r} {ds_classes}; "
          "scoring by label id", file=sys.stderr)
    return dataset


def _run_dir(checkpoint: str) -> str:
    path = os.fspath(checkpoint)
    return path if os.path.isdir(path) else (os.path.dirname(os.path.abspath(path)) or ".")


def _confusion_text(report: Dict[str, Any]) -> str:
    names = report["classes"]
    cm = report["confusion_matrix"]
    w = max(6, max(len(n) for n in names), max(len(str(v)) for row in cm for v in row))
    short = [n[:w] for n in names]
    lines = ["confusion matrix (rows: true, columns: predicted)",
             " " * (w + 2) + " ".join(f"{n:>{w}}" for n in short)]
    for n, row in zip(short, cm):
        lines.append(f"{n:<{w}}  " + " ".join(f"{v:>{w}}" for v in row))
    return "\n".join(lines)


def _write_predictions_csv(path: str, report: Dict[str, Any], probabilities: List[List[float]]) -> None:
    names = report["classes"]
    tmp = path + ".tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["index", "target", "prediction", "target_name", "prediction_name"] + [f"p_{n}" for n in names])
        for i, t, p, probs in zip(report["indices"], report["targets"], report["predictions"], probabilities):
            w.writerow([i, t, p, names[t], names[p]] + [f"{v:.6f}" for v in probs])
    os.replace(tmp, path)


def _write_json(path: str, obj: Dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def _training_curves(checkpoint: str, out_dir: str) -> Optional[str]:
    """Plot the run's ``metrics.jsonl`` next to the evaluation, when the checkpoint's run has one."""
    from .plots import plot_training_curves

    metrics_path = os.path.join(_run_dir(checkpoint), "metrics.jsonl")
    if not os.path.isfile(metrics_path):
        return None
    try:
        return plot_training_curves(metrics_path, os.path.join(out_dir, "training_curves.png"))
    except ValueError as e:  # a damaged log must not cost the evaluation
        print(f"warning: no training curves: {e}", file=sys.stderr)
        return None


def run_eval(args: argparse.Namespace) -> int:
    """Run ``dynattn-fer eval`` with parsed ``args`` (see :func:`add_eval_args`); returns the exit code (0).

    Raises ``FileNotFoundError``/``ValueError`` (with the file or option named) for a missing checkpoint or data
    path, an unknown dataset or a class-count mismatch; the CLI turns these into an error message.
    """
    from .checkpoint import load_model
    from .datasets import build_dataset
    from .plots import plot_confusion_matrix
    from .train import parse_key_values
    from .transforms import eval_transform

    device = resolve_device(args.device)
    model, config = load_model(args.checkpoint, map_location=device)
    name = args.dataset or config.get("dataset")
    if not name:
        raise ValueError(f"checkpoint {args.checkpoint!r} does not record its dataset: pass --dataset")
    same_dataset = name == config.get("dataset")
    root = args.data if args.data is not None else (config.get("data") if same_dataset else None)
    if root is None and name != "synthetic":  # the synthetic set is drawn, not read
        raise ValueError(f"--data is required: the checkpoint does not record where the {name!r} data lives")
    # the training run's loader options (e.g. label policy, holdout seed) unless overridden
    options = dict(config.get("data_options") or {}) if same_dataset else {}
    options.update(parse_key_values(args.data_opt, "--data-opt"))
    dataset = build_dataset(name, root, args.split, transform=eval_transform(config), **options)

    classes = [str(c) for c in config.get("classes") or []]
    dataset = _match_classes(dataset, classes, name)
    show_progress = not args.json and sys.stderr.isatty()
    report = evaluate(model, dataset, batch_size=args.batch_size, device=device, amp=args.amp,
                      workers=args.workers, class_names=classes or None, return_probabilities=True,
                      progress=show_progress)
    probabilities = report.pop("probabilities")

    out_dir = args.out if args.out is not None else _run_dir(args.checkpoint)
    os.makedirs(out_dir, exist_ok=True)
    suffix = "" if (same_dataset and args.split == "test") else f"_{name}_{args.split}"
    cm_path = os.path.join(out_dir, f"confusion_matrix{suffix}.png")
    json_path = os.path.join(out_dir, f"eval{suffix}.json")
    csv_path = os.path.join(out_dir, f"predictions{suffix}.csv")
    result = {
        "checkpoint": os.fspath(args.checkpoint),
        "model": config.get("model"),
        "epoch": config.get("epoch"),
        "dataset": name,
        "data": None if root is None else os.fspath(root),
        "split": args.split,
        "num_images": len(dataset),
        **report,
        "files": {"confusion_matrix": cm_path, "eval_json": json_path, "predictions_csv": csv_path},
    }
    plot_confusion_matrix(report["confusion_matrix"], report["classes"], cm_path,
                          title=f"{config.get('model')} on {name} {args.split}: accuracy "
                                f"{report['accuracy'] * 100:.2f}%, macro-F1 {report['macro_f1'] * 100:.2f}%")
    _write_predictions_csv(csv_path, report, probabilities)
    curves = _training_curves(args.checkpoint, out_dir)
    if curves:
        result["files"]["training_curves"] = curves
    _write_json(json_path, result)

    if args.json:
        print(json.dumps(result))
    else:
        epoch = config.get("epoch")
        print(f"checkpoint {args.checkpoint} ({config.get('model')}"
              + (f", epoch {epoch})" if epoch is not None else ")"))
        print(f"dataset {name} split {args.split}: {report['num_samples']} images evaluated, "
              f"{report['num_unreadable']} unreadable skipped")
        print(format_report(report))
        print()
        print(_confusion_text(report))
        print()
        print("\n".join(f"wrote {p}" for p in result["files"].values()))
    return 0
