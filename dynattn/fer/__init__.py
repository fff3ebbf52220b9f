"""Facial expression recognition (FER) with dynattn's classifiers: datasets, transforms, training, evaluation,
prediction and the ``dynattn-fer`` command (``python -m dynattn.fer``).

    from dynattn.fer import load_model, eval_transform
    model, config = load_model("runs/rafdb")                 # best checkpoint of a run, in eval mode
    x = eval_transform(config)(pil_image)[None]              # (1, 3, S, S) float32
    probs = model(x).softmax(-1)                             # config["classes"] names the columns

The pipeline needs the ``fer`` extra (``pip install "dynattn[fer]"``: pillow, safetensors, tqdm, OpenCV,
matplotlib); submodules are imported on first use, so ``import dynattn.fer`` alone is cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["build_dataset", "dataset_names", "eval_transform", "load_model", "main", "save_checkpoint",
           "train_transform"]

_LAZY = {
    "build_dataset": "dynattn.fer.datasets",
    "dataset_names": "dynattn.fer.datasets",
    "eval_transform": "dynattn.fer.transforms",
    "train_transform": "dynattn.fer.transforms",
    "load_model": "dynattn.fer.checkpoint",
    "save_checkpoint": "dynattn.fer.checkpoint",
    "main": "dynattn.fer.cli",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        try:
            module = importlib.import_module(_LAZY[name])
        except ImportError as e:
            raise ImportError(f"dynattn.fer.{name} needs the FER extras ({e}): pip install \"dynattn[fer]\"") from e
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
