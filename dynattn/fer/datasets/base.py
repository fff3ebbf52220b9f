"""The dataset interface every FER loader implements, and the pieces they share.

A loader is a :class:`FERDataset`: a list of :class:`Sample` records (where the image is, its label, an optional
face box) built once from the dataset's own index files, plus :meth:`FERDataset.load_image`, which turns one record
into an RGB ``PIL.Image`` (EXIF orientation applied, cropped to the box). ``dataset[i]`` returns
``(transform(image), label)``, or ``None`` when the image cannot be read: :func:`collate_skip_none` drops those
from the batch, and the loader keeps a count (:attr:`FERDataset.num_unreadable`) and warns once per file, so one
broken JPEG never stops an epoch.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

__all__ = [
    "SPLITS",
    "BrokenRows",
    "DatasetFormatError",
    "FERDataset",
    "FileIndex",
    "Sample",
    "UnreadableImageError",
    "collate_skip_none",
    "holdout_split",
    "iter_csv_rows",
    "open_image",
    "select_split",
]

#: The three splits every loader offers. ``val`` is for model selection and is never the test split: where a
#: dataset has no official validation set (RAF-DB, AffectNet: their val set is everyone's test set), ``val`` is a
#: fixed, stratified holdout of the official training set (:func:`holdout_split`), and ``train`` is the rest.
SPLITS = ("train", "val", "test")

Box = Tuple[float, float, float, float]  # (x0, y0, x1, y1) in pixels of the EXIF-transposed image


class DatasetFormatError(ValueError):
    """An index/annotation file is missing or malformed. The message names the file (and line, where known)."""


class UnreadableImageError(OSError):
    """An image file is missing, truncated or not an image."""


@dataclasses.dataclass(frozen=True)
class Sample:
    """One labelled face.

    ``source`` is a file path, or ``bytes``/``np.ndarray`` for datasets that ship pixels inline (FER2013's csv).
    ``label`` indexes the dataset's ``classes``. ``box`` (optional) is the face box to crop to; ``soft_label``
    (optional) a per-class probability vector (FERPlus' vote distributions).
    """

    source: Union[str, bytes, np.ndarray]
    label: int
    box: Optional[Box] = None
    soft_label: Optional[Tuple[float, ...]] = None


def open_image(source: Union[str, bytes, np.ndarray], box: Optional[Box] = None, margin: float = 0.0):
    """Decode ``source`` into an RGB ``PIL.Image`` with EXIF orientation applied, cropped to ``box`` (grown by
    ``margin`` times its size on every side, clipped to the image). Raises :class:`UnreadableImageError`."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        if isinstance(source, np.ndarray):
            img = Image.fromarray(source)
        else:
            img = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            img.load()
            img = ImageOps.exif_transpose(img)
        img = img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        name = source if isinstance(source, str) else "<inline image>"
        raise UnreadableImageError(f"cannot read image {name}: {e}") from e
    if box is not None:
        x0, y0, x1, y1 = box
        mx, my = margin * (x1 - x0), margin * (y1 - y0)
        x0, y0 = max(0, int(round(x0 - mx))), max(0, int(round(y0 - my)))
        x1, y1 = min(img.width, int(round(x1 + mx))), min(img.height, int(round(y1 + my)))
        if x1 <= x0 or y1 <= y0:
            name = source if isinstance(source, str) else "<inline image>"
            raise UnreadableImageError(f"face box {box} of {name} lies outside the {img.width}x{img.height} image")
        img = img.crop((x0, y0, x1, y1))
    return img


class FERDataset(Dataset):
    """Base class of the FER loaders.

    Subclasses set ``classes`` (label names in label-id order) and fill ``samples`` in ``__init__``; they may
    override :meth:`load_image`. ``transform`` maps the PIL image to what the model eats (a ``(3, S, S)`` float
    tensor for the training pipeline); ``None`` returns the PIL image.
    """

    #: label names, in label-id order
    classes: Sequence[str] = ()
    #: registry name (``build_dataset(name, ...)``)
    name: str = ""

    def __init__(self, root: str, split: str, transform: Optional[Callable] = None, *, crop_margin: float = 0.0):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        self.root = os.fspath(root)
        if not os.path.exists(self.root):
            raise FileNotFoundError(f"{type(self).__name__}: data directory/file {self.root!r} does not exist")
        self.split = split
        self.transform = transform
        self.crop_margin = crop_margin
        self.samples: List[Sample] = []
        self._unreadable: Dict[str, str] = {}
        #: index rows dropped at construction because their image data is broken: ``(file, line, reason)``
        self.skipped: List[Tuple[str, Optional[int], str]] = []

    # ---- records
    def __len__(self) -> int:
        return len(self.samples)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def targets(self) -> List[int]:
        """Labels of every sample, in order (for class-balanced samplers and stratified splits)."""
        return [s.label for s in self.samples]

    def class_counts(self) -> List[int]:
        return np.bincount(np.asarray(self.targets, dtype=np.int64), minlength=self.num_classes).tolist()

    # ---- images
    def load_image(self, index: int):
        """The RGB ``PIL.Image`` of sample ``index``; raises :class:`UnreadableImageError`."""
        s = self.samples[index]
        return open_image(s.source, s.box, self.crop_margin)

    @property
    def num_unreadable(self) -> int:
        """How many distinct samples failed to load so far (in this process)."""
        return len(self._unreadable)

    def __getitem__(self, index: int) -> Optional[Tuple[Any, int]]:
        try:
            img = self.load_image(index)
        except UnreadableImageError as e:
            key = str(index)
            if key not in self._unreadable:
                self._unreadable[key] = str(e)
                warnings.warn(f"{type(self).__name__}: skipping sample {index}: {e}", stacklevel=2)
            return None
        if self.transform is not None:
            img = self.transform(img)
        return img, self.samples[index].label

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={self.root!r}, split={self.split!r}, samples={len(self)}, "
                f"classes={list(self.classes)})")


def collate_skip_none(batch: List[Optional[Tuple[Any, int]]]):
    """``default_collate`` over the readable items of ``batch``; ``None`` when none is readable."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    return default_collate(batch)


def holdout_split(targets: Sequence[int], fraction: float = 0.1, seed: int = 0) -> Tuple[List[int], List[int]]:
    """Split indices ``0..len(targets)-1`` into ``(train, val)`` with ``val`` a stratified ``fraction`` of each
    class (at least one sample of every class with two or more), the same for the same inputs on every machine."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    targets = np.asarray(targets, dtype=np.int64)
    rng = np.random.default_rng(seed)
    val: List[int] = []
    for c in np.unique(targets):
        members = np.flatnonzero(targets == c)
        rng.shuffle(members)
        n = int(round(fraction * len(members)))
        if len(members) >= 2:
            n = min(max(n, 1), len(members) - 1)
        else:
            n = 0
        val.extend(members[:n].tolist())
    val_set = set(val)
    train = [i for i in range(len(targets)) if i not in val_set]
    return train, sorted(val)


class BrokenRows:
    """Collects the index rows whose *image data* is broken (bad pixels, a missing image file, no usable face box).

    With ``strict=True`` the first one raises :class:`DatasetFormatError` naming the file and line; otherwise they
    are kept in ``rows`` (``(file, line, reason)``, ``line`` 1-based or ``None``) and :meth:`report` warns once
    with the count and the first few locations. Malformed index structure (headers, labels) always raises.
    """

    def __init__(self, owner: str, *, strict: bool):
        self.owner = owner
        self.strict = bool(strict)
        self.rows: List[Tuple[str, Optional[int], str]] = []

    def add(self, file: str, line: Optional[int], reason: str) -> None:
        if self.strict:
            where = f"{file}, line {line}" if line is not None else file
            raise DatasetFormatError(f"{self.owner}: {where}: {reason} "
                                     f"(strict=True; pass strict=False to skip such rows)")
        self.rows.append((file, line, reason))

    def report(self, show: int = 5) -> List[Tuple[str, Optional[int], str]]:
        if self.rows:
            first = "; ".join(f"{f}, line {ln}: {r}" if ln is not None else f"{f}: {r}"
                              for f, ln, r in self.rows[:show])
            more = f" (and {len(self.rows) - show} more)" if len(self.rows) > show else ""
            warnings.warn(f"{self.owner}: skipped {len(self.rows)} row(s) with broken image data: {first}{more}",
                          stacklevel=3)
        return self.rows


class FileIndex:
    """``exists(path)`` answered from one ``os.listdir`` per directory: a ``stat`` per image is slow on network file
    systems and datasets list hundreds of thousands of files."""

    def __init__(self):
        self._dirs: Dict[str, frozenset] = {}

    def names(self, directory: str) -> frozenset:
        names = self._dirs.get(directory)
        if names is None:
            try:
                names = frozenset(os.listdir(directory))
            except OSError:
                names = frozenset()
            self._dirs[directory] = names
        return names

    def exists(self, path: str) -> bool:
        directory, name = os.path.split(path)
        return name in self.names(directory)


def select_split(samples: Sequence[Sample], split: str, *, val_fraction: float = 0.1, seed: int = 0) -> List[Sample]:
    """The ``train`` or ``val`` part of an official training set that has no official validation set: ``val`` is
    :func:`holdout_split` (stratified, ``val_fraction`` of each class, fixed by ``seed``), ``train`` the rest."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val' here, got {split!r}")
    if not isinstance(val_fraction, (int, float)) or not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
    train, val = holdout_split([s.label for s in samples], float(val_fraction), int(seed))
    return [samples[i] for i in (train if split == "train" else val)]


def iter_csv_rows(reader, path: str) -> Iterator[Tuple[int, List[str]]]:
    """``(line, row)`` for every non-blank row of ``csv.reader`` ``reader`` over file ``path`` (``line`` is
    1-based); a row the csv module cannot parse raises :class:`DatasetFormatError` naming the file and line."""
    while True:
        try:
            row = next(reader, None)
        except (csv.Error, UnicodeDecodeError) as e:
            raise DatasetFormatError(f"{path}, line {reader.line_num + 1}: unreadable csv row: {e}") from e
        if row is None:
            return
        if row and not (len(row) == 1 and not row[0].strip()):
            yield reader.line_num, row
