"""FER2013 (Kaggle "Challenges in Representation Learning: Facial Expression Recognition Challenge").

On disk: one ``fer2013.csv`` with the header ``emotion,pixels,Usage``. ``pixels`` holds 2304 space-separated
integers 0..255, one 48x48 greyscale face in row-major order; ``emotion`` is 0 Angry, 1 Disgust, 2 Fear, 3 Happy,
4 Sad, 5 Surprise, 6 Neutral; ``Usage`` is ``Training`` (28,709 rows), ``PublicTest`` (3,589) or ``PrivateTest``
(3,589). By convention PublicTest is the validation split and PrivateTest the test split.
"""

from __future__ import annotations

import csv
import os
import warnings
from typing import Callable, Iterator, List, NamedTuple, Optional

import numpy as np

from .base import BrokenRows, DatasetFormatError, FERDataset, iter_csv_rows, Sample

__all__ = ["FER2013", "FER2013_CLASSES", "USAGE_TO_SPLIT", "find_fer2013_csv", "iter_fer2013_rows", "parse_pixels"]

FER2013_CLASSES = ("Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral")
USAGE_TO_SPLIT = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
SPLIT_TO_USAGE = {v: k for k, v in USAGE_TO_SPLIT.items()}
IMAGE_SIZE = 48


class Fer2013Row(NamedTuple):
    index: int  # 0-based data-row index (the number in FERPlus' ``fer0000000.png`` names)
    line: int  # 1-based line in the file
    emotion: int
    usage: str
    pixels: str


def find_fer2013_csv(root: str, name: str = "fer2013.csv") -> str:
    """``root`` itself when it is a file, else ``root/<name>`` or ``root/fer2013/<name>`` (how Kaggle's archive
    unpacks). Raises ``FileNotFoundError`` naming the paths tried."""
    if os.path.isfile(root):
        return root
    tried = [os.path.join(root, name), os.path.join(root, "fer2013", name)]
    for path in tried:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"no {name} found: tried {', '.join(repr(p) for p in tried)}")


def _header_columns(path: str, header: Optional[List[str]], required) -> dict:
    """Map each required column name (case-insensitive, spaces stripped) to its position in ``header``."""
    names = [h.strip().lower() for h in (header or [])]
    missing = [c for c in required if c.lower() not in names]
    if missing:
        raise DatasetFormatError(f"{path}, line 1: header must name the columns {', '.join(required)}; "
                                 f"missing {', '.join(missing)} (got {header!r})")
    return {c: names.index(c.lower()) for c in required}


def iter_fer2013_rows(path: str) -> Iterator[Fer2013Row]:
    """Validated data rows of a ``fer2013.csv``. Pixels are returned as text (parse with :func:`parse_pixels`).

    Raises :class:`DatasetFormatError` (file and line) for a missing header/column, a row with too few fields, an
    emotion that is not an int in 0..6, or a ``Usage`` other than Training/PublicTest/PrivateTest.
    """
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
        except (csv.Error, UnicodeDecodeError) as e:
            raise DatasetFormatError(f"{path}, line 1: not a readable csv file: {e}") from e
        cols = _header_columns(path, header, ("emotion", "pixels", "Usage"))
        ie, ip, iu = cols["emotion"], cols["pixels"], cols["Usage"]
        width = max(ie, ip, iu) + 1
        index = 0
        for line, row in iter_csv_rows(reader, path):
            if len(row) < width:
                raise DatasetFormatError(f"{path}, line {line}: expected the {len(header)} columns {header}, "
                                         f"got {len(row)} field(s)")
            try:
                emotion = int(row[ie])
            except ValueError:
                emotion = -1
            if not 0 <= emotion < len(FER2013_CLASSES):
                raise DatasetFormatError(f"{path}, line {line}: emotion must be an int in 0..{len(FER2013_CLASSES) - 1}"
                                         f", got {row[ie]!r}")
            usage = row[iu].strip()
            if usage not in USAGE_TO_SPLIT:
                raise DatasetFormatError(f"{path}, line {line}: Usage must be one of {sorted(USAGE_TO_SPLIT)}, "
                                         f"got {row[iu]!r}")
            yield Fer2013Row(index, line, emotion, usage, row[ip])
            index += 1


def parse_pixels(text: str, size: int = IMAGE_SIZE):
    """``(size, size)`` uint8 array from space-separated ints, or ``(None, reason)`` if the text is not exactly
    ``size*size`` integers in 0..255. Returns ``(array, None)`` on success."""
    try:
        with warnings.catch_warnings():
            # numpy < 2.x warns and returns the values read so far on garbage; newer numpy raises ValueError.
            warnings.simplefilter("ignore", DeprecationWarning)
            values = np.fromstring(text, dtype=np.int32, sep=" ")
    except ValueError:
        return None, "pixels contain something other than space-separated integers"
    if values.size != size * size:
        return None, f"expected {size * size} pixel values, got {values.size}"
    if values.size and (values.min() < 0 or values.max() > 255):
        return None, "pixel values must lie in 0..255"
    return values.astype(np.uint8).reshape(size, size), None


class FER2013(FERDataset):
    """FER2013 from ``fer2013.csv`` (48x48 grey faces; returned as RGB ``PIL`` images).

    Args:
        root: the csv file, or a directory holding ``fer2013.csv`` (or ``fer2013/fer2013.csv``).
        split: ``train`` (Usage=Training), ``val`` (PublicTest) or ``test`` (PrivateTest).
        transform: applied to the ``PIL.Image``.
        strict: a row whose pixels are broken (not 2304 ints in 0..255) raises :class:`DatasetFormatError` when
            True; by default it is skipped, counted in ``skipped`` and reported in one warning. A malformed header,
            emotion or Usage always raises.
        crop_margin: unused (no face boxes); accepted for a uniform interface.

    The pixel text of the split is parsed once into one compact ``(N, 48, 48)`` uint8 array (``self.pixels``;
    ~2 s for all 35,887 rows); ``PIL`` images are only made per item. ``self.row_indices[i]`` is the sample's
    0-based data row in the csv.
    """

    name = "fer2013"
    classes = FER2013_CLASSES

    def __init__(self, root: str, split: str, transform: Optional[Callable] = None, *, strict: bool = False,
                 crop_margin: float = 0.0):
        super().__init__(root, split, transform, crop_margin=crop_margin)
        self.csv_path = find_fer2013_csv(self.root)
        usage = SPLIT_TO_USAGE[split]
        broken = BrokenRows(type(self).__name__, strict=strict)
        arrays, labels, rows = [], [], []
        for row in iter_fer2013_rows(self.csv_path):
            if row.usage != usage:
                continue
            px, reason = parse_pixels(row.pixels)
            if px is None:
                broken.add(self.csv_path, row.line, reason)
                continue
            arrays.append(px)
            labels.append(row.emotion)
            rows.append(row.index)
        self.pixels = np.stack(arrays) if arrays else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.uint8)
        del arrays
        self.row_indices = np.asarray(rows, dtype=np.int64)
        self.samples = [Sample(self.pixels[i], label) for i, label in enumerate(labels)]
        self.skipped = broken.report()
