"""Classification metrics for FER evaluation, in numpy (no scikit-learn dependency).

Conventions (those of scikit-learn's defaults, so numbers match papers that use it):

* confusion matrix rows are true classes, columns predicted classes;
* precision of a class never predicted, recall of a class absent from the labels, and F1 when precision + recall
  is 0 are 0 (sklearn's ``zero_division=0``);
* mean per-class accuracy (balanced accuracy) averages the recall of the classes that occur in the labels;
* macro-F1 averages the F1 of the classes that occur in the labels or the predictions (sklearn's
  ``f1_score(average="macro")`` without ``labels=``); ``weighted_f1`` weights each class's F1 by its support.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "accuracy",
    "balanced_accuracy",
    "classification_report",
    "confusion_matrix",
    "format_report",
    "macro_f1",
    "normalize_confusion_matrix",
    "precision_recall_f1",
]


def _labels(y, name: str) -> np.ndarray:
    a = np.asarray(y)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-d sequence of class ids, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        if np.issubdtype(a.dtype, np.floating) and np.all(a == np.round(a)):
            a = a.astype(np.int64)
        else:
            raise TypeError(f"{name} must hold integer class ids, got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


def _pair(y_true, y_pred) -> Tuple[np.ndarray, np.ndarray]:
    t, p = _labels(y_true, "y_true"), _labels(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred must have the same length, got {t.size} and {p.size}")
    return t, p


def confusion_matrix(y_true: Sequence[int], y_pred: Sequence[int], num_classes: Optional[int] = None) -> np.ndarray:
    """Counts ``cm[i, j]`` of samples of true class ``i`` predicted as ``j``.

    Args:
        y_true, y_pred: 1-d integer class ids in ``[0, num_classes)``, same length ``N``.
        num_classes: ``C``; ``None`` takes ``max(y_true, y_pred) + 1``.

    Returns:
        int64 ``(C, C)``.
    """
    t, p = _pair(y_true, y_pred)
    if num_classes is None:
        num_classes = int(max(t.max(initial=-1), p.max(initial=-1))) + 1
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    for name, a in (("y_true", t), ("y_pred", p)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{name} holds class ids outside [0, {num_classes}): min {a.min()}, max {a.max()}")
    flat = np.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def _check_cm(cm) -> np.ndarray:
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"cm must be a square (C, C) confusion matrix, got shape {cm.shape}")
    return cm


def normalize_confusion_matrix(cm) -> np.ndarray:
    """Row-normalised confusion matrix: ``cm[i] / cm[i].sum()`` (each true class sums to 1; rows of classes
    with no sample stay 0). float64 ``(C, C)``."""
    cm = _check_cm(cm).astype(np.float64)
    support = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, support, out=np.zeros_like(cm), where=support > 0)


def precision_recall_f1(cm) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class ``(precision, recall, f1, support)`` from a ``(C, C)`` confusion matrix (float64 ``(C,)`` each,
    support int64); undefined ratios are 0."""
    cm = _check_cm(cm)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return precision, recall, f1, support.astype(np.int64)


def accuracy(y_true: Sequence[int], y_pred: Sequence[int]) -> float:
    """Fraction of ``y_pred == y_true``; 0.0 for empty input."""
    t, p = _pair(y_true, y_pred)
    return float((t == p).mean()) if t.size else 0.0


def balanced_accuracy(y_true: Sequence[int], y_pred: Sequence[int], num_classes: Optional[int] = None) -> float:
    """Mean per-class accuracy: the recall averaged over the classes present in ``y_true``."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    _, recall, _, support = precision_recall_f1(cm)
    return float(recall[support > 0].mean()) if (support > 0).any() else 0.0


def macro_f1(y_true: Sequence[int], y_pred: Sequence[int], num_classes: Optional[int] = None) -> float:
    """F1 averaged over the classes present in ``y_true`` or ``y_pred``."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    _, _, f1, _ = precision_recall_f1(cm)
    present = (cm.sum(axis=0) + cm.sum(axis=1)) > 0
    return float(f1[present].mean()) if present.any() else 0.0


def classification_report(
    y_true: Sequence[int],
    y_pred: Sequence[int],
    num_classes: Optional[int] = None,
    *,
    class_names: Optional[Sequence[str]] = None,
) -> Dict[str, Any]:
    """Every metric of an evaluation, as plain Python types (JSON-serialisable).

    Args:
        y_true, y_pred: 1-d integer class ids, same length.
        num_classes: ``C``; defaults to ``len(class_names)``, else ``max id + 1``.
        class_names: ``C`` names in class-id order (default ``"0"``, ``"1"``, ...).

    Returns:
        ``{"num_samples", "accuracy", "mean_class_accuracy", "macro_f1", "weighted_f1", "classes",
        "per_class": [{"class", "precision", "recall", "f1", "support"}, ...], "confusion_matrix": C x C counts,
        "confusion_matrix_normalized": C x C row fractions}``.
    """
    if num_classes is None and class_names is not None:
        num_classes = len(class_names)
    cm = confusion_matrix(y_true, y_pred, num_classes)
    C = cm.shape[0]
    if class_names is None:
        class_names = [str(i) for i in range(C)]
    elif len(class_names) != C:
        raise ValueError(f"class_names has {len(class_names)} names but there are {C} classes")
    precision, recall, f1, support = precision_recall_f1(cm)
    n = int(cm.sum())
    present = (cm.sum(axis=0) + support) > 0
    per_class: List[Dict[str, Any]] = [
        {"class": str(class_names[c]), "precision": float(precision[c]), "recall": float(recall[c]),
         "f1": float(f1[c]), "support": int(support[c])}
        for c in range(C)
    ]
    return {
        "num_samples": n,
        "accuracy": float(np.trace(cm) / n) if n else 0.0,
        "mean_class_accuracy": float(recall[support > 0].mean()) if (support > 0).any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "weighted_f1": float((f1 * support).sum() / n) if n else 0.0,
        "classes": [str(c) for c in class_names],
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        "confusion_matrix_normalized": normalize_confusion_matrix(cm).round(6).tolist(),
    }


def format_report(report: Dict[str, Any]) -> str:
    """A plain-text summary of :func:`classification_report`'s dict: the headline numbers and a per-class table."""
    lines = [
        f"accuracy             {report['accuracy'] * 100:7.2f} %",
        f"mean class accuracy  {report['mean_class_accuracy'] * 100:7.2f} %",
        f"macro-F1             {report['macro_f1'] * 100:7.2f} %",
        "",
    ]
    width = max([len("class")] + [len(r["class"]) for r in report["per_class"]])
    lines.append(f"{'class':<{width}}  {'precision':>9}  {'recall':>6}  {'f1':>6}  {'support':>7}")
    for r in report["per_class"]:
        lines.append(
            f"{r['class']:<{width}}  {r['precision'] * 100:9.2f}  {r['recall'] * 100:6.2f}  {r['f1'] * 100:6.2f}"
            f"  {r['support']:7d}"
        )
    lines.append(f"{'total':<{width}}  {'':9}  {'':6}  {'':6}  {report['num_samples']:7d}")
    return "\n".join(lines)
