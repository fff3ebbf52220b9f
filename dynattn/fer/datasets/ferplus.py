"""FERPlus (microsoft/FERPlus): FER2013's faces relabelled by 10 taggers each.

On disk (``root`` is a directory):

- ``fer2013new.csv``, header ``Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,
  unknown,NF``: per row the vote counts of the 10 taggers, in the same row order as ``fer2013.csv``. ``Image name``
  is ``fer0000000.png`` (the 0-based row index, 7 digits) and is empty for 173 rows, which are skipped (as the official
  generator does).
- pixels, either from ``fer2013.csv`` (``root/fer2013.csv``, ``root/fer2013/fer2013.csv`` or option
  ``fer2013_csv``), or from the image folders written by the official ``generate_training_data.py``:
  ``FER2013Train``, ``FER2013Valid``, ``FER2013Test`` (directly under ``root`` or under ``root/data``), each with
  the ``fer0000000.png`` files and a header-less ``label.csv`` whose rows are
  ``fer0000000.png,4,0,0,1,3,2,0,0,0,0`` (older layout: ``fer0000000.png,"(0, 0, 48, 48)",4,0,...``; the box,
  always the whole 48x48 image, is ignored). A folder without ``label.csv`` takes its votes from
  ``fer2013new.csv``.

Splits: Training -> ``train`` (FER2013Train), PublicTest -> ``val`` (FER2013Valid), PrivateTest -> ``test``
(FER2013Test).
"""

from __future__ import annotations

import csv
import os
from typing import Callable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from .base import BrokenRows, DatasetFormatError, FERDataset, FileIndex, iter_csv_rows, Sample
from .fer2013 import SPLIT_TO_USAGE, USAGE_TO_SPLIT, _header_columns, find_fer2013_csv, iter_fer2013_rows, parse_pixels

__all__ = ["FERPlus", "FERPLUS_CLASSES", "LABEL_MODES", "VOTE_COLUMNS", "votes_to_label"]

#: the 8 emotions, in the column order of fer2013new.csv (also the ONNX model zoo's order)
FERPLUS_CLASSES = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt")
#: all vote columns; the last two are not emotions
VOTE_COLUMNS = FERPLUS_CLASSES + ("unknown", "NF")
LABEL_MODES = ("majority", "probability", "crossentropy", "multi_target")
FOLDERS = {"train": "FER2013Train", "val": "FER2013Valid", "test": "FER2013Test"}
_N_EMO = len(FERPLUS_CLASSES)


def votes_to_label(votes: Sequence[float], mode: str = "majority") -> Optional[Tuple[int, Tuple[float, ...]]]:
    """FERPlus' official vote processing (``src/ferplus.py`` of microsoft/FERPlus).

    Args:
        votes: the 10 vote counts in :data:`VOTE_COLUMNS` order.
        mode: ``majority``, ``probability``/``crossentropy`` (the same distribution; they differ only in how a
            trainer uses it) or ``multi_target``.

    Returns ``(label, distribution)`` with ``label`` in 0..7 and ``distribution`` 8 floats summing to 1, or
    ``None`` when the image is dropped (its winner is unknown/NF, or no reliable label exists).

    Every mode first removes single votes as outliers. ``majority`` keeps the top emotion only if it has more than
    half of the remaining votes (one-hot distribution). ``probability`` takes the emotions with the most votes
    (ties together, in column order) until 75% of the votes are covered or 3 emotions are taken; meeting
    unknown/NF stops it (and discards that column unless nothing was taken before); it drops the image if 50% or
    less of the votes were taken or more than 3 emotions tie in. ``multi_target`` keeps every column with at least
    30% of the votes and drops the image if they hold 50% or less. The label is the first largest entry.
    """
    if mode not in LABEL_MODES:
        raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {mode!r}")
    v = np.asarray(votes, dtype=np.float64).copy()
    if v.shape != (len(VOTE_COLUMNS),):
        raise ValueError(f"votes must hold {len(VOTE_COLUMNS)} counts ({', '.join(VOTE_COLUMNS)}), got shape {v.shape}")
    v[v <= 1.0] = 0.0  # a single vote is an outlier
    total = v.sum()
    if total <= 0:
        return None
    dist = np.zeros_like(v)
    if mode == "majority":
        top = int(np.argmax(v))
        if v[top] <= 0.5 * total:
            return None  # no majority: "unknown"
        dist[top] = v[top]
    elif mode in ("probability", "crossentropy"):
        remaining = v.copy()
        covered, taken, stop = 0.0, 0, False
        while covered < 0.75 * total and taken < 3 and not stop:
            peak = remaining.max()
            for i in np.flatnonzero(remaining == peak):  # ties are taken together, in column order
                dist[i] = peak
                remaining[i] = 0.0
                covered += peak
                taken += 1
                if i >= _N_EMO:  # unknown / NF reached: stop here
                    stop = True
                    if dist.sum() > peak:  # other columns came first: keep those, drop this one
                        dist[i] = 0.0
                        taken -= 1
                    break
        if dist.sum() <= 0.5 * total or taken > 3:
            return None
    else:  # multi_target
        keep = v >= 0.3 * total
        dist[keep] = v[keep]
        if dist.sum() <= 0.5 * total:
            return None
    label = int(np.argmax(dist))
    if label >= _N_EMO:
        return None  # the winner is unknown or NF
    emo = dist[:_N_EMO]
    return label, tuple(float(x) for x in emo / emo.sum())


class _VoteRow(NamedTuple):
    index: int  # data-row index in fer2013new.csv (or in label.csv)
    line: int
    usage: str  # "" for label.csv rows
    name: str
    votes: Tuple[int, ...]


def _parse_votes(path: str, line: int, fields: Sequence[str]) -> Tuple[int, ...]:
    votes = []
    for col, text in zip(VOTE_COLUMNS, fields):
        try:
            n = int(text)
        except ValueError:
            n = -1
        if n < 0:
            raise DatasetFormatError(f"{path}, line {line}: vote count for {col!r} must be a non-negative int, "
                                     f"got {text!r}")
        votes.append(n)
    return tuple(votes)


def iter_ferplus_votes(path: str) -> Iterator[_VoteRow]:
    """Rows of ``fer2013new.csv`` (all of them, including those with an empty image name)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
        except (csv.Error, UnicodeDecodeError) as e:
            raise DatasetFormatError(f"{path}, line 1: not a readable csv file: {e}") from e
        cols = _header_columns(path, header, ("Usage", "Image name") + VOTE_COLUMNS)
        vote_pos = [cols[c] for c in VOTE_COLUMNS]
        width = max(cols.values()) + 1
        index = 0
        for line, row in iter_csv_rows(reader, path):
            if len(row) < width:
                raise DatasetFormatError(f"{path}, line {line}: expected {len(header)} columns, got {len(row)}")
            usage = row[cols["Usage"]].strip()
            if usage not in USAGE_TO_SPLIT:
                raise DatasetFormatError(f"{path}, line {line}: Usage must be one of {sorted(USAGE_TO_SPLIT)}, "
                                         f"got {row[cols['Usage']]!r}")
            votes = _parse_votes(path, line, [row[i] for i in vote_pos])
            yield _VoteRow(index, line, usage, row[cols["Image name"]].strip(), votes)
            index += 1


def iter_label_csv(path: str) -> Iterator[_VoteRow]:
    """Rows of a generated ``FER2013*/label.csv``: ``name,<10 votes>`` or ``name,"(x, y, w, h)",<10 votes>``."""
    n = len(VOTE_COLUMNS)
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        index = 0
        for line, row in iter_csv_rows(reader, path):
            if len(row) == n + 1:
                votes = row[1:]
            elif len(row) == n + 2:
                votes = row[2:]  # older layout with a face box column
            else:
                raise DatasetFormatError(f"{path}, line {line}: expected 'image name' + {n} vote counts "
                                         f"({', '.join(VOTE_COLUMNS)}), optionally with a box column; "
                                         f"got {len(row)} field(s)")
            yield _VoteRow(index, line, "", row[0].strip(), _parse_votes(path, line, votes))
            index += 1


class FERPlus(FERDataset):
    """FERPlus with the official label rules (see :func:`votes_to_label`).

    Args:
        root: directory holding ``fer2013new.csv`` and ``fer2013.csv``, and/or the ``FER2013Train|Valid|Test``
            folders (see the module docstring for the exact layout).
        split: ``train``, ``val`` or ``test`` (FER2013's Training / PublicTest / PrivateTest).
        label_mode: ``majority`` (default; hard labels), ``probability`` / ``crossentropy`` / ``multi_target``
            (the vote distribution goes to ``Sample.soft_label``; ``label`` is its argmax).
        num_classes: 8 (default, the official order) or 7 (drops contempt: images labelled contempt are removed
            and the contempt entry of soft labels is removed and the rest renormalised).
        source: ``auto`` (default: the image folder of the split if it exists, else ``fer2013.csv``), ``folders``
            or ``csv``.
        fer2013_csv: path of ``fer2013.csv`` when it is not in ``root``.
        strict: rows with broken pixels or a missing image file raise :class:`DatasetFormatError` when True; by
            default they are skipped with one warning (see ``skipped``). Malformed vote files always raise.
        crop_margin: unused (the images are the 48x48 faces).

    Samples hold the vote distribution in ``soft_label`` (``None`` in majority mode). ``votes`` keeps the raw
    10 vote counts of every sample, ``image_names`` the ``fer0000000.png`` names.
    """

    name = "ferplus"
    classes = FERPLUS_CLASSES

    def __init__(self, root: str, split: str, transform: Optional[Callable] = None, *, label_mode: str = "majority",
                 num_classes: int = 8, source: str = "auto", fer2013_csv: Optional[str] = None, strict: bool = False,
                 crop_margin: float = 0.0):
        super().__init__(root, split, transform, crop_margin=crop_margin)
        if label_mode not in LABEL_MODES:
            raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
        if num_classes not in (7, 8):
            raise ValueError(f"num_classes must be 8 (all FERPlus emotions) or 7 (without contempt), "
                             f"got {num_classes!r}")
        if source not in ("auto", "folders", "csv"):
            raise ValueError(f"source must be one of ('auto', 'folders', 'csv'), got {source!r}")
        if not os.path.isdir(self.root):
            raise FileNotFoundError(f"FERPlus: root {self.root!r} must be a directory (holding fer2013new.csv "
                                    f"and fer2013.csv or the FER2013Train/Valid/Test folders)")
        self.label_mode = label_mode
        self.classes = FERPLUS_CLASSES[:num_classes]
        folder = self._find_folder(split)
        if source == "folders" and folder is None:
            raise FileNotFoundError(f"FERPlus: no {FOLDERS[split]} folder under {self.root!r} "
                                    f"(looked in {self.root!r} and {os.path.join(self.root, 'data')!r})")
        self.source = "folders" if (source == "folders" or (source == "auto" and folder is not None)) else "csv"
        broken = BrokenRows(type(self).__name__, strict=strict)
        self.votes: List[Tuple[int, ...]] = []
        self.image_names: List[str] = []
        if self.source == "folders":
            self._load_folder(folder, broken)
        else:
            self._load_csv(fer2013_csv, broken)
        self.skipped = broken.report()

    # ---- locating files
    def _find_folder(self, split: str) -> Optional[str]:
        for base in (self.root, os.path.join(self.root, "data")):
            path = os.path.join(base, FOLDERS[split])
            if os.path.isdir(path):
                return path
        return None

    def _votes_csv(self) -> str:
        path = os.path.join(self.root, "fer2013new.csv")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"FERPlus: vote file {path!r} does not exist")
        return path

    def _label(self, votes: Tuple[int, ...]) -> Optional[Tuple[int, Tuple[float, ...]]]:
        """``votes_to_label`` restricted to this dataset's classes (contempt dropped when num_classes=7)."""
        result = votes_to_label(votes, self.label_mode)
        return None if result is None or result[0] >= len(self.classes) else result

    def _add(self, source, name: str, votes: Tuple[int, ...], result: Tuple[int, Tuple[float, ...]]) -> None:
        label, dist = result
        soft = None
        if self.label_mode != "majority":
            emo = np.asarray(dist[: len(self.classes)])
            soft = tuple(float(x) for x in emo / emo.sum())
        self.samples.append(Sample(source, label, soft_label=soft))
        self.votes.append(votes)
        self.image_names.append(name)

    # ---- the two sources of pixels
    def _load_folder(self, folder: str, broken: BrokenRows) -> None:
        label_csv = os.path.join(folder, "label.csv")
        if os.path.isfile(label_csv):
            rows, index_file = iter_label_csv(label_csv), label_csv
        else:
            usage = SPLIT_TO_USAGE[self.split]
            index_file = self._votes_csv()
            rows = (r for r in iter_ferplus_votes(index_file) if r.usage == usage)
        files = FileIndex()
        for row in rows:
            if not row.name:
                continue  # rows without an image name have no image (official generator skips them)
            result = self._label(row.votes)
            if result is None:
                continue  # dropped by the label rule: no need to look for its file
            path = os.path.join(folder, row.name)
            if not files.exists(path):
                broken.add(index_file, row.line, f"image file {path!r} does not exist")
                continue
            self._add(path, row.name, row.votes, result)

    def _load_csv(self, fer2013_csv: Optional[str], broken: BrokenRows) -> None:
        votes_path = self._votes_csv()
        pixels_path = fer2013_csv if fer2013_csv is not None else find_fer2013_csv(self.root)
        if not os.path.isfile(pixels_path):
            raise FileNotFoundError(f"FERPlus: fer2013_csv {pixels_path!r} does not exist")
        usage = SPLIT_TO_USAGE[self.split]
        pixel_rows = iter_fer2013_rows(pixels_path)
        arrays = []
        for vrow in iter_ferplus_votes(votes_path):
            prow = next(pixel_rows, None)
            if prow is None:
                raise DatasetFormatError(f"{votes_path}, line {vrow.line}: has more rows than {pixels_path!r}; "
                                         f"the two files must hold the same images in the same order")
            if prow.usage != vrow.usage:
                raise DatasetFormatError(f"{votes_path}, line {vrow.line}: Usage {vrow.usage!r} differs from "
                                         f"{prow.usage!r} at {pixels_path}, line {prow.line}: the files are not "
                                         f"in the same row order")
            if vrow.usage != usage or not vrow.name:
                continue
            result = self._label(vrow.votes)
            if result is None:
                continue
            px, reason = parse_pixels(prow.pixels)
            if px is None:
                broken.add(pixels_path, prow.line, reason)
                continue
            self._add(len(arrays), vrow.name, vrow.votes, result)
            arrays.append(px)
        extra = next(pixel_rows, None)
        if extra is not None:
            raise DatasetFormatError(f"{pixels_path}, line {extra.line}: has more rows than {votes_path!r}; the two "
                                     f"files must hold the same images in the same order")
        self.pixels = np.stack(arrays) if arrays else np.zeros((0, 48, 48), np.uint8)
        # point every sample at its row of the compact pixel array
        self.samples = [Sample(self.pixels[s.source], s.label, soft_label=s.soft_label) for s in self.samples]
