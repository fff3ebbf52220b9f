"""A generic class-per-folder dataset (ImageFolder style), for any FER set already sorted into folders.

Layout::

    root/train/<class>/*.jpg|jpeg|png|bmp|webp
    root/val/<class>/...      (optional; also spelled "valid" or "validation")
    root/test/<class>/...

Without a ``val`` folder, ``val`` is a stratified holdout of ``train`` (and ``train`` the rest). Classes are the
sorted union of the class folders of all splits, or the order given by ``classes``.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Union

from .base import FERDataset, Sample, select_split

__all__ = ["ClassFolder", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
SPLIT_DIRS = {"train": ("train", "training"), "val": ("val", "valid", "validation"), "test": ("test", "testing")}


def _split_dir(root: str, split: str) -> Optional[str]:
    names = {n.lower(): n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n))}
    for alias in SPLIT_DIRS[split]:
        if alias in names:
            return os.path.join(root, names[alias])
    return None


def _class_dirs(split_dir: str) -> List[str]:
    return sorted(n for n in os.listdir(split_dir)
                  if not n.startswith(".") and os.path.isdir(os.path.join(split_dir, n)))


class ClassFolder(FERDataset):
    """Images sorted into ``root/<split>/<class>/`` folders.

    Args:
        root: the directory holding ``train`` (and ``test``, optionally ``val``).
        split: ``train`` / ``val`` / ``test``.
        classes: label order as a list or a comma-separated string (default: the sorted folder names). Folders
            not listed are ignored, with a warning.
        val_fraction, seed: size of the stratified validation holdout (when there is no ``val`` folder) and its
            seed.
        crop_margin: unused (no face boxes).
    """

    name = "folder"

    def __init__(self, root: str, split: str, transform: Optional[Callable] = None, *,
                 classes: Optional[Union[str, Sequence[str]]] = None, val_fraction: float = 0.1, seed: int = 0,
                 crop_margin: float = 0.0):
        super().__init__(root, split, transform, crop_margin=crop_margin)
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"ClassFolder: root {self.root!r} is not a directory")
        dirs = {s: _split_dir(self.root, s) for s in SPLIT_DIRS}
        present = {s: d for s, d in dirs.items() if d is not None}
        found = sorted({c for d in present.values() for c in _class_dirs(d)})
        if classes is None:
            if not found:
                raise FileNotFoundError(f"ClassFolder: no <split>/<class>/ folders in {self.root!r} "
                                        f"(expected e.g. {os.path.join(self.root, 'train', '<class>')!r})")
            self.classes = tuple(found)
        else:
            if isinstance(classes, str):
                classes = [c.strip() for c in classes.split(",") if c.strip()]
            classes = tuple(classes)
            if not classes or len(set(classes)) != len(classes) or not all(isinstance(c, str) for c in classes):
                raise ValueError(f"classes must be distinct folder names, got {classes!r}")
            absent = [c for c in classes if c not in found]
            if absent:
                raise ValueError(f"classes {absent} have no folder under any split of {self.root!r} "
                                 f"(found {found})")
            ignored = [c for c in found if c not in classes]
            if ignored:
                warnings.warn(f"ClassFolder: ignoring folders not in classes: {ignored}", stacklevel=2)
            self.classes = classes
        source_split = split
        if dirs[split] is None:
            if split == "val" and dirs["train"] is not None:
                source_split = "train"  # no val folder: holdout of train
            else:
                raise FileNotFoundError(f"ClassFolder: no {split!r} folder in {self.root!r} "
                                        f"(tried {', '.join(SPLIT_DIRS[split])})")
        holdout = dirs["val"] is None and split in ("train", "val")
        samples = self._scan(dirs[source_split])
        self.samples = select_split(samples, split, val_fraction=val_fraction, seed=seed) if holdout else samples

    def _scan(self, split_dir: str) -> List[Sample]:
        index: Dict[str, int] = {c: i for i, c in enumerate(self.classes)}
        samples = []
        for c in self.classes:
            d = os.path.join(split_dir, c)
            if not os.path.isdir(d):
                continue
            for name in sorted(os.listdir(d)):
                if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append(Sample(os.path.join(d, name), index[c]))
        return samples
