"""AffectNet, 8 (``affectnet8``) or 7 (``affectnet7``, without contempt) expression classes.

Expression ids: 0 Neutral, 1 Happy, 2 Sad, 3 Surprise, 4 Fear, 5 Disgust, 6 Anger, 7 Contempt; 8 None,
9 Uncertain and 10 No-Face are dropped (and 7 for affectnet7). Both releases are read, detected from ``root``:

- **cropped** (the later release)::

      root/train_set/images/<n>.jpg          root/val_set/images/<n>.jpg
      root/train_set/annotations/<n>_exp.npy root/val_set/annotations/<n>_exp.npy   (+ _val/_aro/_lnd, unused)

  ``<n>_exp.npy`` holds the expression id (a 0-d array of a string such as ``'3'`` or of a number).
- **original**::

      root/Manually_Annotated_file_lists/training.csv, validation.csv
      root/Manually_Annotated_Images/<subdir>/<hash>.jpg   (also accepted one level down, e.g. under
                                                            Manually_Annotated/ or Manually_Annotated_compressed/)

  csv header ``subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,
  arousal``; images are uncropped and are cropped to the face box (after EXIF orientation is applied).

The official validation set (500 images per class) is everyone's test set, so ``test`` = validation set and
``val`` = a stratified holdout of the training set (``train`` = the rest). If both releases are present the
cropped one is used unless ``release="original"``.
"""

from __future__ import annotations

import csv
import io
import os
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from .base import BrokenRows, DatasetFormatError, FERDataset, FileIndex, iter_csv_rows, Sample, select_split
from .fer2013 import _header_columns

__all__ = ["AFFECTNET_CLASSES", "AffectNet", "AffectNet7", "AffectNet8"]

AFFECTNET_CLASSES = ("Neutral", "Happy", "Sad", "Surprise", "Fear", "Disgust", "Anger", "Contempt")
MAX_ID = 10  # 8 None, 9 Uncertain, 10 No-Face
RELEASES = ("auto", "cropped", "original")
CSV_COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "expression")
IMAGE_DIR = "Manually_Annotated_Images"


# The ~290k annotation files share one .npy header: parse each distinct header once (np.load costs ~10x more).
_NPY_HEADERS: Dict[bytes, Tuple[np.dtype, Tuple[int, ...]]] = {}


def _load_small_npy(path: str) -> np.ndarray:
    with open(path, "rb") as f:
        data = f.read()
    if data[:6] != b"\x93NUMPY" or len(data) < 12:
        raise ValueError("not a .npy file")
    offset = (10 + int.from_bytes(data[8:10], "little")) if data[6] == 1 else \
        (12 + int.from_bytes(data[8:12], "little"))
    header = data[:offset]
    meta = _NPY_HEADERS.get(header)
    if meta is None:
        f = io.BytesIO(data)
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        if dtype.hasobject:
            raise ValueError("object arrays (pickles) are not read")
        meta = _NPY_HEADERS[header] = (dtype, tuple(shape))
    dtype, shape = meta
    count = int(np.prod(shape)) if shape else 1
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)


def read_expression(path: str) -> int:
    """The expression id stored in a cropped-release ``<n>_exp.npy``; :class:`DatasetFormatError` if malformed."""
    try:
        value = _load_small_npy(path)
    except (OSError, ValueError, EOFError) as e:
        raise DatasetFormatError(f"{path}: not a readable .npy file: {e}") from e
    if value.size != 1:
        raise DatasetFormatError(f"{path}: expected one expression id, got an array of shape {value.shape}")
    v = value.reshape(()).item()
    if isinstance(v, bytes):
        v = v.decode("ascii", "replace")
    try:
        if isinstance(v, str):
            out = int(v.strip())
        elif isinstance(v, float):
            if not v.is_integer():
                raise ValueError
            out = int(v)
        elif isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            out = int(v)
        else:
            raise ValueError
    except ValueError:
        raise DatasetFormatError(f"{path}: expression id must be an int in 0..{MAX_ID}, got {v!r}") from None
    if not 0 <= out <= MAX_ID:
        raise DatasetFormatError(f"{path}: expression id must be an int in 0..{MAX_ID}, got {out}")
    return out


class AffectNet(FERDataset):
    """AffectNet from either release (see the module docstring).

    Args:
        root: the dataset directory (holding ``train_set``/``val_set``, or ``Manually_Annotated_file_lists``).
        split: ``train`` / ``val`` (holdout of the training set) / ``test`` (the official validation set).
        num_classes: 8 (with contempt) or 7.
        release: ``auto`` (default), ``cropped`` or ``original``.
        images_dir: where ``<subdir>/<hash>.jpg`` live for the original release, if not found under ``root``.
        val_fraction, seed: size of the stratified validation holdout and its seed.
        strict: a listed image that does not exist, or an empty face box, raises :class:`DatasetFormatError` when
            True; by default such rows are skipped with one warning. Malformed annotations always raise.
        crop_margin: grow the face box by this fraction of its size on every side (original release).
    """

    name = "affectnet8"
    classes = AFFECTNET_CLASSES

    def __init__(self, root: str, split: str, transform: Optional[Callable] = None, *, num_classes: int = 8,
                 release: str = "auto", images_dir: Optional[str] = None, val_fraction: float = 0.1, seed: int = 0,
                 strict: bool = False, crop_margin: float = 0.0):
        super().__init__(root, split, transform, crop_margin=crop_margin)
        if num_classes not in (7, 8):
            raise ValueError(f"num_classes must be 8 (with contempt) or 7, got {num_classes!r}")
        if release not in RELEASES:
            raise ValueError(f"release must be one of {RELEASES}, got {release!r}")
        self.classes = AFFECTNET_CLASSES[:num_classes]
        has_cropped = any(os.path.isdir(os.path.join(self.root, d)) for d in ("train_set", "val_set"))
        has_original = os.path.isdir(os.path.join(self.root, "Manually_Annotated_file_lists"))
        if release == "auto":
            if not (has_cropped or has_original):
                raise FileNotFoundError(
                    f"AffectNet: {self.root!r} holds neither the cropped release (train_set/, val_set/) nor the "
                    f"original one (Manually_Annotated_file_lists/)")
            release = "cropped" if has_cropped else "original"
        self.release = release
        broken = BrokenRows(type(self).__name__, strict=strict)
        official = "train" if split in ("train", "val") else "validation"
        if release == "cropped":
            samples = self._load_cropped(official, broken)
        else:
            samples = self._load_original(official, images_dir, broken)
        self.samples = samples if split == "test" else select_split(samples, split, val_fraction=val_fraction,
                                                                    seed=seed)
        self.skipped = broken.report()

    def _load_cropped(self, official: str, broken: BrokenRows) -> List[Sample]:
        set_dir = os.path.join(self.root, "train_set" if official == "train" else "val_set")
        ann_dir, img_dir = os.path.join(set_dir, "annotations"), os.path.join(set_dir, "images")
        for d in (ann_dir, img_dir):
            if not os.path.isdir(d):
                raise FileNotFoundError(f"AffectNet: directory {d!r} does not exist")
        ids = [n[: -len("_exp.npy")] for n in os.listdir(ann_dir) if n.endswith("_exp.npy") and not n.startswith(".")]
        ids.sort(key=lambda s: (0, int(s), "") if s.isdigit() else (1, 0, s))
        images = FileIndex()
        samples = []
        for n in ids:
            ann = os.path.join(ann_dir, f"{n}_exp.npy")
            label = read_expression(ann)
            if label >= len(self.classes):
                continue
            path = os.path.join(img_dir, f"{n}.jpg")
            if not images.exists(path):
                broken.add(ann, None, f"image file {path!r} does not exist")
                continue
            samples.append(Sample(path, label))
        return samples

    def _find_images_dir(self, images_dir: Optional[str]) -> str:
        if images_dir is not None:
            if not os.path.isdir(images_dir):
                raise FileNotFoundError(f"AffectNet: images_dir {images_dir!r} does not exist")
            return images_dir
        candidates = [os.path.join(self.root, IMAGE_DIR)]
        candidates += sorted(os.path.join(self.root, d, IMAGE_DIR) for d in os.listdir(self.root)
                             if os.path.isdir(os.path.join(self.root, d, IMAGE_DIR)))
        for c in candidates:
            if os.path.isdir(c):
                return c
        raise FileNotFoundError(f"AffectNet: no {IMAGE_DIR} directory in {self.root!r} or one level below "
                                f"(pass images_dir=...)")

    def _load_original(self, official: str, images_dir: Optional[str], broken: BrokenRows) -> List[Sample]:
        csv_path = os.path.join(self.root, "Manually_Annotated_file_lists",
                                "training.csv" if official == "train" else "validation.csv")
        if not os.path.isfile(csv_path):
            raise FileNotFoundError(f"AffectNet: annotation file {csv_path!r} does not exist")
        image_root = self._find_images_dir(images_dir)
        files = FileIndex()
        samples = []
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            try:
                header = next(reader, None)
            except (csv.Error, UnicodeDecodeError) as e:
                raise DatasetFormatError(f"{csv_path}, line 1: not a readable csv file: {e}") from e
            cols = _header_columns(csv_path, header, CSV_COLUMNS)
            width = max(cols.values()) + 1
            for line, row in iter_csv_rows(reader, csv_path):
                if len(row) < width:
                    raise DatasetFormatError(f"{csv_path}, line {line}: expected {len(header)} columns, got {len(row)}")
                text = row[cols["expression"]]
                try:
                    label = int(text)
                except ValueError:
                    label = -1
                if not 0 <= label <= MAX_ID:
                    raise DatasetFormatError(f"{csv_path}, line {line}: expression must be an int in 0..{MAX_ID}, "
                                             f"got {text!r}")
                if label >= len(self.classes):
                    continue
                box = self._box(csv_path, line, row, cols)
                rel = row[cols["subDirectory_filePath"]].strip().replace("\\", "/")
                path = os.path.join(image_root, *rel.split("/"))
                if box is None:
                    broken.add(csv_path, line, f"empty face box for {rel!r}")
                elif not files.exists(path):
                    broken.add(csv_path, line, f"image file {path!r} does not exist")
                else:
                    samples.append(Sample(path, label, box=box))
        return samples

    @staticmethod
    def _box(path: str, line: int, row, cols) -> Optional[Tuple[float, float, float, float]]:
        try:
            x, y, w, h = (float(row[cols[c]]) for c in ("face_x", "face_y", "face_width", "face_height"))
        except ValueError:
            raise DatasetFormatError(f"{path}, line {line}: face_x, face_y, face_width, face_height must be numbers, "
                                     f"got {[row[cols[c]] for c in CSV_COLUMNS[1:5]]}") from None
        if not (w > 0 and h > 0):
            return None
        return (x, y, x + w, y + h)


class AffectNet8(AffectNet):
    """AffectNet with 8 classes (Neutral, Happy, Sad, Surprise, Fear, Disgust, Anger, Contempt)."""

    name = "affectnet8"

    def __init__(self, root: str, split: str, transform: Optional[Callable] = None, *, release: str = "auto",
                 images_dir: Optional[str] = None, val_fraction: float = 0.1, seed: int = 0, strict: bool = False,
                 crop_margin: float = 0.0):
        super().__init__(root, split, transform, num_classes=8, release=release, images_dir=images_dir,
                         val_fraction=val_fraction, seed=seed, strict=strict, crop_margin=crop_margin)


class AffectNet7(AffectNet):
    """AffectNet with 7 classes (contempt, id 7, dropped as in DAN)."""

    name = "affectnet7"

    def __init__(self, root: str, split: str, transform: Optional[Callable] = None, *, release: str = "auto",
                 images_dir: Optional[str] = None, val_fraction: float = 0.1, seed: int = 0, strict: bool = False,
                 crop_margin: float = 0.0):
        super().__init__(root, split, transform, num_classes=7, release=release, images_dir=images_dir,
                         val_fraction=val_fraction, seed=seed, strict=strict, crop_margin=crop_margin)
