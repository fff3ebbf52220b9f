"""PNG plots for FER runs: the confusion matrix of an evaluation and the training curves of a run.

matplotlib is used through its object API with the Agg canvas (no ``pyplot``), so plotting never opens a window,
never switches the process-wide backend and is safe in worker threads and on headless machines.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import numpy as np

__all__ = ["load_metrics_jsonl", "plot_confusion_matrix", "plot_training_curves"]


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - matplotlib is installed with the fer extra
        raise ImportError("plots need matplotlib: pip install matplotlib") from e
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str) -> str:
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def plot_confusion_matrix(
    cm,
    class_names: Sequence[str],
    path: str,
    *,
    title: Optional[str] = None,
) -> str:
    """Write the confusion matrix as a PNG: colour = row-normalised fraction, each cell labelled with its count
    and its percentage of the true class.

    Args:
        cm: ``(C, C)`` counts (rows true, columns predicted), e.g. ``classification_report(...)["confusion_matrix"]``.
        class_names: ``C`` names in class-id order.
        path: output ``.png`` path (parent folders are created).
        title: figure title.

    Returns:
        ``path``.
    """
    from .metrics import normalize_confusion_matrix

    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"cm must be a square (C, C) matrix, got shape {cm.shape}")
    C = cm.shape[0]
    if len(class_names) != C:
        raise ValueError(f"class_names has {len(class_names)} names for a {C}x{C} confusion matrix")
    frac = normalize_confusion_matrix(cm)
    side = max(4.0, 0.9 * C + 2.0)
    fig = _figure(side + 1.0, side)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_xticks(range(C), labels=list(class_names), rotation=45, ha="right")
    ax.set_yticks(range(C), labels=list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fontsize = 9 if C <= 8 else 7
    for i in range(C):
        for j in range(C):
            color = "white" if frac[i, j] > 0.5 else "black"
            ax.text(j, i, f"{int(cm[i, j])}\n{frac[i, j] * 100:.1f}%", ha="center", va="center",
                    color=color, fontsize=fontsize)
    n = int(cm.sum())
    acc = np.trace(cm) / n * 100 if n else 0.0
    ax.set_title(title or f"confusion matrix ({n} samples, accuracy {acc:.2f}%)")
    return _save(fig, path)


def load_metrics_jsonl(path: str) -> List[Dict[str, Any]]:
    """Read a ``metrics.jsonl`` (one JSON object per line; blank lines skipped). Raises ``ValueError`` naming
    the file and line for a line that is not a JSON object (a run killed mid-write leaves at most a partial last
    line, which is skipped)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"metrics file {path!r} does not exist")
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines):  # a last line without its newline: a write cut short by a kill
                continue
            raise ValueError(f"{path}, line {n}: not valid JSON ({e})") from e
        if not isinstance(rec, dict):
            raise ValueError(f"{path}, line {n}: expected a JSON object, got {type(rec).__name__}")
        records.append(rec)
    return records


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def plot_training_curves(
    metrics: Union[str, Iterable[Dict[str, Any]]],
    path: str,
    *,
    x_key: str = "epoch",
    title: Optional[str] = None,
) -> str:
    """Plot per-epoch curves of a training run as a PNG: losses in the left panel, accuracies / F1 in the right
    one (as %, when the values are fractions).

    Args:
        metrics: a ``metrics.jsonl`` path or its records (dicts). Records with a numeric ``x_key`` are plotted;
            every numeric key whose name contains ``loss`` or starts with ``aux_`` goes left, ``acc`` or ``f1``
            right (e.g. ``train_loss``, ``val_loss``, ``val_acc``, ``val_mean_class_acc``). When several records
            share an x value (e.g. a resumed run repeating an epoch) the last one wins.
        path: output ``.png`` path.
        x_key: the record key of the x axis.

    Returns:
        ``path``.
    """
    from matplotlib.ticker import MaxNLocator

    records = load_metrics_jsonl(metrics) if isinstance(metrics, (str, os.PathLike)) else list(metrics)
    by_x: Dict[float, Dict[str, Any]] = {}
    for rec in records:
        if not isinstance(rec, dict):
            raise TypeError(f"metrics records must be dicts, got {type(rec).__name__}")
        if _is_number(rec.get(x_key)):
            by_x[rec[x_key]] = {**by_x.get(rec[x_key], {}), **rec}
    if not by_x:
        raise ValueError(f"no record with a numeric {x_key!r} to plot")
    xs = sorted(by_x)
    keys: List[str] = []
    for x in xs:
        keys += [k for k, v in by_x[x].items() if k != x_key and _is_number(v) and k not in keys]
    loss_keys = [k for k in keys if "loss" in k.lower() or k.startswith("aux_")]  # aux_*: extra model losses
    score_keys = [k for k in keys if k not in loss_keys and ("acc" in k.lower() or "f1" in k.lower())
                  and not k.startswith("best_")]  # best-so-far values repeat the val curve

    fig = _figure(11.0, 4.0)
    panels = [(loss_keys, "loss", False), (score_keys, "accuracy / F1 (%)", True)]
    for i, (ks, label, percent) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        for k in ks:
            pts = [(x, by_x[x][k]) for x in xs if _is_number(by_x[x].get(k))]
            if not pts:
                continue
            px, py = zip(*pts)
            py = np.asarray(py, dtype=np.float64)
            if percent and py.max() <= 1.0:
                py = py * 100
            ax.plot(px, py, marker="o" if len(px) < 30 else None, markersize=3, label=k)
        ax.set_xlabel(x_key)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ks:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, f"no {label.split()[0]} values logged", ha="center", va="center",
                    transform=ax.transAxes, color="gray")
    fig.suptitle(title or f"training curves ({len(xs)} {x_key}s)")
    return _save(fig, path)
