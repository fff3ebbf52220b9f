"""FER datasets: loaders that read each dataset in the format it is distributed in, and a registry.

    ds = build_dataset("rafdb", "/data/raf-basic", "train", transform=tf, val_fraction=0.1)
    ds[i] -> (transform(image), label) or None (unreadable image; use collate_skip_none in the DataLoader)

Every dataset has ``classes`` (label names in label order), ``targets``, ``split`` in ``SPLITS``, ``skipped``
(index rows dropped for broken image data) and ``num_unreadable``. ``val`` is never the test split.

Registered names (options in brackets; see each class for the on-disk layout it expects):

- ``fer2013``: ``fer2013.csv`` [strict]
- ``ferplus``: ``fer2013new.csv`` votes + ``fer2013.csv`` pixels or the ``FER2013Train|Valid|Test`` folders
  [label_mode, num_classes, source, fer2013_csv, strict]
- ``rafdb``: ``basic/EmoLabel/list_patition_label.txt`` + ``basic/Image/aligned`` [aligned, val_fraction, seed, strict]
- ``affectnet7``, ``affectnet8``: the cropped release (``train_set``/``val_set``) or the original one (csv + face
  boxes) [release, images_dir, val_fraction, seed, strict]
- ``korean_emotion``: AI-Hub 한국인 감정인식을 위한 복합 영상, JSON annotations with face boxes
  [label_policy, val_fraction, seed, strict]
- ``folder``: ``root/<split>/<class>/*.jpg`` [classes, val_fraction, seed]
- ``synthetic``: procedurally drawn faces, nothing to download; for smoke tests, not accuracy (``SyntheticFaces``)

All loaders also take ``crop_margin``. Options may be given as strings (``--data-opt key=value`` on the command
line): they are converted to the type of the loader's parameter (``"0.2"`` -> 0.2, ``"false"`` -> False,
``"a,b,c"`` -> a tuple).
"""

from __future__ import annotations

import collections.abc
import importlib
import inspect
import typing
from typing import Any, Callable, Dict, List, Optional

from .base import (
    SPLITS,
    BrokenRows,
    DatasetFormatError,
    FERDataset,
    FileIndex,
    Sample,
    UnreadableImageError,
    collate_skip_none,
    holdout_split,
    open_image,
    select_split,
)
from .affectnet import AffectNet, AffectNet7, AffectNet8
from .fer2013 import FER2013
from .ferplus import FERPlus, votes_to_label
from .folder import ClassFolder
from .korean_emotion import KoreanEmotion
from .rafdb import RAFDB

__all__ = [
    "DATASETS",
    "SPLITS",
    "AffectNet",
    "AffectNet7",
    "AffectNet8",
    "BrokenRows",
    "ClassFolder",
    "DatasetFormatError",
    "FER2013",
    "FERDataset",
    "FERPlus",
    "FileIndex",
    "KoreanEmotion",
    "RAFDB",
    "Sample",
    "SyntheticFaces",
    "UnreadableImageError",
    "build_dataset",
    "collate_skip_none",
    "dataset_names",
    "dataset_options",
    "get_dataset_class",
    "holdout_split",
    "open_image",
    "select_split",
    "votes_to_label",
]

#: registry name -> "module:Class" (imported on first use)
DATASETS: Dict[str, str] = {
    "fer2013": "dynattn.fer.datasets.fer2013:FER2013",
    "ferplus": "dynattn.fer.datasets.ferplus:FERPlus",
    "rafdb": "dynattn.fer.datasets.rafdb:RAFDB",
    "affectnet7": "dynattn.fer.datasets.affectnet:AffectNet7",
    "affectnet8": "dynattn.fer.datasets.affectnet:AffectNet8",
    "korean_emotion": "dynattn.fer.datasets.korean_emotion:KoreanEmotion",
    "folder": "dynattn.fer.datasets.folder:ClassFolder",
    "synthetic": "dynattn.fer.datasets.synthetic:SyntheticFaces",
}

_FIXED_PARAMS = ("self", "root", "split", "transform")
_TRUE, _FALSE = ("1", "true", "yes", "on", "y", "t"), ("0", "false", "no", "off", "n", "f")


def __getattr__(name: str):
    # SyntheticFaces lives in its own module (another part of the pipeline); import it only when asked for.
    if name == "SyntheticFaces":
        return get_dataset_class("synthetic")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def dataset_names() -> List[str]:
    """The registered dataset names, sorted."""
    return sorted(DATASETS)


def get_dataset_class(name: str) -> type:
    """The loader class registered as ``name``; ``ValueError`` listing the names for an unknown one."""
    if not isinstance(name, str) or name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {dataset_names()}")
    module, _, attr = DATASETS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def _option_params(cls: type) -> Dict[str, inspect.Parameter]:
    params = inspect.signature(cls.__init__).parameters
    return {k: p for k, p in params.items() if k not in _FIXED_PARAMS and p.kind in
            (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)}


def dataset_options(name: str) -> Dict[str, Any]:
    """The options ``build_dataset(name, ...)`` accepts, with their defaults."""
    return {k: p.default for k, p in _option_params(get_dataset_class(name)).items()}


def _coerce(name: str, key: str, value: Any, hint: Any, default: Any) -> Any:
    """Convert a string option to the parameter's type (from its annotation, else its default)."""
    if not isinstance(value, str):
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:  # Optional[X] / Union[...]: "none" -> None, else the first non-str member
        if value.strip().lower() == "none" and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        if str in members:
            return value
        hint = members[0] if members else None
        origin = typing.get_origin(hint)
    if hint is None and default not in (None, inspect.Parameter.empty):
        hint = type(default)
    target = origin or hint
    try:
        if target is bool:
            low = value.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError
        if target is int:
            return int(value)
        if target is float:
            return float(value)
        if target in (list, tuple, collections.abc.Sequence):
            return tuple(v.strip() for v in value.split(",") if v.strip())
    except ValueError:
        kind = getattr(target, "__name__", str(target))
        raise ValueError(f"dataset {name!r}: option {key} expects a {kind}, got {value!r}") from None
    return value


def build_dataset(name: str, root: str, split: str, transform: Optional[Callable] = None,
                  **options: Any) -> FERDataset:
    """Build the dataset registered as ``name`` (see :data:`DATASETS`).

    Args:
        name: one of :func:`dataset_names`.
        root: where the dataset lies (a file or directory, as each loader documents).
        split: ``"train"``, ``"val"`` or ``"test"``.
        transform: maps the RGB ``PIL.Image`` to the model input, e.g. a ``(3, S, S)`` float32 tensor.
        **options: loader options (see :func:`dataset_options`); strings are converted to the option's type.

    Raises ``ValueError`` (listing the valid values) for an unknown name, split or option, ``FileNotFoundError``
    for a wrong path and :class:`DatasetFormatError` for a malformed index file.
    """
    cls = get_dataset_class(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    params = _option_params(cls)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD
                    for p in inspect.signature(cls.__init__).parameters.values())
    unknown = [k for k in options if k not in params]
    if unknown and not takes_any:
        raise ValueError(f"dataset {name!r} got unknown option(s) {unknown}; valid options: {sorted(params)}")
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable annotations: fall back to the defaults' types
        hints = {}
    kwargs = {k: (_coerce(name, k, v, hints.get(k), params[k].default if k in params else None)
                  if k in params else v) for k, v in options.items()}
    return cls(root, split, transform, **kwargs)
