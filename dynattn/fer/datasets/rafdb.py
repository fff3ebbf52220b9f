"""RAF-DB, basic subset (Real-world Affective Faces, 7 basic expressions).

On disk (``root`` is the ``basic`` directory, or its parent)::

    basic/
      EmoLabel/list_patition_label.txt     # sic; "<name> <label>" per line, no header, e.g. "train_00001.jpg 5"
      Image/aligned/train_00001_aligned.jpg  # 100x100 aligned faces (the default)
      Image/original/train_00001.jpg         # the uncropped photos (option aligned=False)

Labels are 1-based: 1 Surprise, 2 Fear, 3 Disgust, 4 Happiness, 5 Sadness, 6 Anger, 7 Neutral; they become
0..6 in the same order (as DAN and POSTER use them). ``train_*`` files are the official training set (12,271),
``test_*`` the test set (3,068). There is no official validation set: ``val`` is a stratified holdout of
``train_*`` and ``train`` the rest.
"""

from __future__ import annotations

import os
from typing import Callable, List, Optional

from .base import BrokenRows, DatasetFormatError, FERDataset, FileIndex, Sample, select_split

__all__ = ["RAFDB", "RAFDB_CLASSES"]

RAFDB_CLASSES = ("Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral")
LABEL_FILE = os.path.join("EmoLabel", "list_patition_label.txt")


class RAFDB(FERDataset):
    """RAF-DB basic.

    Args:
        root: the ``basic`` directory (or the directory that contains ``basic``).
        split: ``train`` / ``val`` (holdout of ``train_*``) / ``test`` (``test_*``).
        aligned: read ``Image/aligned/<stem>_aligned.jpg`` (default) or, if False, ``Image/original/<name>``.
        val_fraction, seed: size of the stratified validation holdout and its seed.
        strict: a listed image that does not exist raises :class:`DatasetFormatError` when True; by default it is
            skipped with one warning. A malformed label line always raises.
        crop_margin: unused (no face boxes).
    """

    name = "rafdb"
    classes = RAFDB_CLASSES

    def __init__(self, root: str, split: str, transform: Optional[Callable] = None, *, aligned: bool = True,
                 val_fraction: float = 0.1, seed: int = 0, strict: bool = False, crop_margin: float = 0.0):
        super().__init__(root, split, transform, crop_margin=crop_margin)
        base = self.root
        if not os.path.isfile(os.path.join(base, LABEL_FILE)) and os.path.isdir(os.path.join(base, "basic")):
            base = os.path.join(base, "basic")
        label_file = os.path.join(base, LABEL_FILE)
        if not os.path.isfile(label_file):
            raise FileNotFoundError(f"RAF-DB: label file {label_file!r} does not exist (root must be the 'basic' "
                                    f"directory or its parent)")
        self.base = base
        image_dir = os.path.join(base, "Image", "aligned" if aligned else "original")
        broken = BrokenRows(type(self).__name__, strict=strict)
        files = FileIndex()
        prefix = "test_" if split == "test" else "train_"
        samples: List[Sample] = []
        with open(label_file, encoding="utf-8-sig") as f:
            for line_no, line in enumerate(f, 1):
                fields = line.split()
                if not fields:
                    continue
                if len(fields) != 2:
                    raise DatasetFormatError(f"{label_file}, line {line_no}: expected '<image name> <label 1..7>', "
                                             f"got {line.strip()!r}")
                name, text = fields
                try:
                    label = int(text)
                except ValueError:
                    label = 0
                if not 1 <= label <= len(RAFDB_CLASSES):
                    raise DatasetFormatError(f"{label_file}, line {line_no}: label must be an int in "
                                             f"1..{len(RAFDB_CLASSES)}, got {text!r}")
                if not name.startswith(("train_", "test_")):
                    raise DatasetFormatError(f"{label_file}, line {line_no}: image name must start with 'train_' "
                                             f"or 'test_', got {name!r}")
                if not name.startswith(prefix):
                    continue
                stem = os.path.splitext(name)[0]
                path = os.path.join(image_dir, f"{stem}_aligned.jpg" if aligned else name)
                if not files.exists(path):
                    broken.add(label_file, line_no, f"image file {path!r} does not exist")
                    continue
                samples.append(Sample(path, label - 1))
        self.samples = samples if split == "test" else select_split(samples, split, val_fraction=val_fraction,
                                                                    seed=seed)
        self.skipped = broken.report()
