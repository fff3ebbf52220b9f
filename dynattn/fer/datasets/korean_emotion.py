"""AI-Hub "한국인 감정인식을 위한 복합 영상" (Korean facial emotion photos, 7 classes, dataSetSn=82).

Expected layout (after unzipping AI-Hub's archives; ``root`` is the folder holding ``1.Training`` and
``2.Validation``, or a parent up to three levels above it)::

    root/
      1.Training/
        원천데이터/[원천]EMOIMG_기쁨_TRAIN_01/<photo>.jpg        # images, one or more folders per emotion
        라벨링데이터/[라벨]EMOIMG_기쁨_TRAIN/img_emotion_training_data(기쁨).json
        ...  (분노 불안 기쁨 상처 중립 당황 슬픔)
      2.Validation/
        원천데이터/[원천]EMOIMG_기쁨_VALID/<photo>.jpg
        라벨링데이터/[라벨]EMOIMG_기쁨_VALID/img_emotion_validation_data(기쁨).json

Only the split folders are looked up by name (any folder called ``Training`` / ``Validation``, with an optional
``1.`` style prefix, case-insensitive); below them every ``*.json`` is read as an annotation list and every
``.jpg/.jpeg/.png`` is an image, matched to its record by file name, so the exact spelling of the emotion
folders does not matter. Names are compared in Unicode NFC (archives unpacked on macOS give NFD names).

Each JSON file is a list of records::

    {"filename": "....jpg", "faceExp_uploader": "기쁨",
     "annot_A": {"faceExp": "기쁨", "boxes": {"minX": 1032.1, "minY": 712.4, "maxX": 1710.9, "maxY": 1538.0}},
     "annot_B": {...}, "annot_C": {...}, "gender": ..., "age": ..., ...}

``faceExp_uploader`` is the emotion the person was asked to show; ``annot_*`` are three annotators' readings
(``알수없음`` = cannot tell) with face boxes in the EXIF-transposed frame (the loader applies the EXIF orientation
before cropping). Files are read as UTF-8 (with or without BOM), falling back to CP949.

Classes (English, alphabetical): anger 분노, anxiety 불안, happy 기쁨, hurt 상처, neutral 중립, panic 당황,
sadness 슬픔. Splits: ``1.Training`` -> ``train`` / ``val`` (a stratified holdout), ``2.Validation`` -> ``test``.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .base import BrokenRows, DatasetFormatError, FERDataset, Sample, select_split

__all__ = ["KOREAN_CLASSES", "KOREAN_LABELS", "KoreanEmotion", "LABEL_POLICIES", "load_json_records"]

KOREAN_CLASSES = ("anger", "anxiety", "happy", "hurt", "neutral", "panic", "sadness")
#: Korean label -> English class name
KOREAN_LABELS = {"분노": "anger", "불안": "anxiety", "기쁨": "happy", "상처": "hurt", "중립": "neutral",
                 "당황": "panic", "슬픔": "sadness"}
UNKNOWN_LABEL = "알수없음"
LABEL_POLICIES = ("uploader", "majority", "unanimous")
IMAGE_EXTS = (".jpg", ".jpeg", ".png")
_SPLIT_DIR = {"train": re.compile(r"^(\d+[._ -]?)?training$"), "test": re.compile(r"^(\d+[._ -]?)?validation$")}
_CLASS_INDEX = {k: KOREAN_CLASSES.index(v) for k, v in KOREAN_LABELS.items()}
_JSON_WS = re.compile(r"[ \t\n\r]*")


def _nfc(s: str) -> str:
    return unicodedata.normalize("NFC", s)


def _line_of(text: str, pos: int, start_pos: int, start_line: int) -> int:
    return start_line + text.count("\n", start_pos, pos)


def load_json_records(path: str) -> List[Tuple[int, Any]]:
    """The records of an annotation file as ``(line, record)``, ``line`` being the 1-based line where the record
    starts. The file is a JSON list (a single record object is accepted too), UTF-8 with or without BOM, else
    CP949. Raises :class:`DatasetFormatError` naming file and line for bad JSON or a non-list top level."""
    with open(path, "rb") as f:
        raw = f.read()
    for encoding in ("utf-8-sig", "cp949"):
        try:
            text = raw.decode(encoding)
            break
        except UnicodeDecodeError:
            continue
    else:
        raise DatasetFormatError(f"{path}: neither UTF-8 nor CP949 text")
    decoder = json.JSONDecoder()
    try:
        pos = len(text) - len(text.lstrip())
        if text.startswith("{", pos):
            return [(_line_of(text, pos, 0, 1), decoder.raw_decode(text, pos)[0])]
        if not text.startswith("[", pos):
            raise DatasetFormatError(f"{path}, line {_line_of(text, pos, 0, 1)}: expected a JSON list of annotation "
                                     f"records")
        # walk the list element by element so that each record's line is known
        records: List[Tuple[int, Any]] = []
        line, line_pos = 1, 0
        pos += 1
        ws = _JSON_WS
        pos = ws.match(text, pos).end()
        if text.startswith("]", pos):
            return records
        while True:
            line = _line_of(text, pos, line_pos, line)
            line_pos = pos
            obj, pos = decoder.raw_decode(text, pos)
            records.append((line, obj))
            pos = ws.match(text, pos).end()
            if text.startswith(",", pos):
                pos = ws.match(text, pos + 1).end()
            elif text.startswith("]", pos):
                break
            else:
                raise json.JSONDecodeError("expected ',' or ']'", text, pos)
        if text[pos + 1:].strip():
            raise json.JSONDecodeError("extra data after the list", text, pos + 1)
        return records
    except json.JSONDecodeError as e:
        raise DatasetFormatError(f"{path}, line {e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None


def _find_split_dir(root: str, split: str) -> str:
    """The ``1.Training`` / ``2.Validation`` folder: ``root`` itself or a folder up to three levels below it."""
    pattern = _SPLIT_DIR["test" if split == "test" else "train"]
    level = [root]
    for depth in range(4):
        for d in level:
            if pattern.match(_nfc(os.path.basename(os.path.normpath(d))).casefold()):
                return d
        if depth == 3:
            break
        nxt = []
        for d in level:
            try:
                entries = sorted(os.scandir(d), key=lambda e: e.name)
            except OSError:
                continue
            nxt += [e.path for e in entries if e.is_dir() and not e.name.startswith(".")]
        level = nxt
    name = "2.Validation" if split == "test" else "1.Training"
    raise FileNotFoundError(f"KoreanEmotion: no {name!r} folder in {root!r} or up to three levels below it")


def _walk(split_dir: str) -> Tuple[List[str], Dict[str, str]]:
    """All annotation files (sorted) and a map NFC image name -> path below ``split_dir``."""
    jsons, images, dup = [], {}, set()
    for dirpath, dirnames, filenames in os.walk(split_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fn in sorted(filenames):
            if fn.startswith("."):  # hidden files and macOS "._name" resource forks
                continue
            low = fn.lower()
            if low.endswith(".json"):
                jsons.append(os.path.join(dirpath, fn))
            elif low.endswith(IMAGE_EXTS):
                key = _nfc(fn)
                if key in images:
                    dup.add(key)
                images.setdefault(key, os.path.join(dirpath, fn))
    if dup:
        warnings.warn(f"KoreanEmotion: {len(dup)} image name(s) occur more than once below {split_dir!r} (e.g. "
                      f"{sorted(dup)[0]!r}); the first one found is used", stacklevel=3)
    return jsons, images


def _label_index(path: str, line: int, value: Any, field: str, allow_unknown: bool) -> Optional[int]:
    """Class index of a Korean label; ``None`` for 알수없음 or no label (if allowed); DatasetFormatError otherwise."""
    if allow_unknown and (value is None or (isinstance(value, str) and not value.strip())):
        return None
    if isinstance(value, str):
        key = _nfc(value.strip())
        if key in _CLASS_INDEX:
            return _CLASS_INDEX[key]
        if allow_unknown and key == UNKNOWN_LABEL:
            return None
    known = list(KOREAN_LABELS) + ([UNKNOWN_LABEL] if allow_unknown else [])
    raise DatasetFormatError(f"{path}, line {line}: {field} must be one of {known}, got {value!r}")


def _box(entry: Any) -> Optional[Tuple[float, float, float, float]]:
    boxes = entry.get("boxes") if isinstance(entry, dict) else None
    if not isinstance(boxes, dict):
        return None
    try:
        x0, y0, x1, y1 = (float(boxes[k]) for k in ("minX", "minY", "maxX", "maxY"))
    except (KeyError, TypeError, ValueError):
        return None
    if not (np.isfinite([x0, y0, x1, y1]).all() and x1 > x0 and y1 > y0):
        return None
    return (x0, y0, x1, y1)


def _median_box(boxes: Sequence[Tuple[float, float, float, float]]) -> Tuple[float, float, float, float]:
    return tuple(float(c) for c in np.median(np.asarray(boxes, dtype=np.float64), axis=0))


def resolve_record(path: str, line: int, rec: Any, policy: str) -> Tuple[Optional[int], Optional[Tuple]]:
    """``(label, box)`` of one record under ``policy`` (``label`` None -> record dropped by the policy;
    ``box`` None -> no usable face box). Raises :class:`DatasetFormatError` for a malformed record."""
    if not isinstance(rec, dict):
        raise DatasetFormatError(f"{path}, line {line}: expected an annotation record (JSON object), "
                                 f"got {type(rec).__name__}")
    annots = [(k, rec[k]) for k in sorted(rec) if k.startswith("annot_")]
    votes: List[Tuple[Optional[int], Optional[Tuple]]] = []
    for k, entry in annots:
        if not isinstance(entry, dict):
            raise DatasetFormatError(f"{path}, line {line}: {k} must be an object with faceExp and boxes")
        # the uploader policy never reads the annotators' labels, so it does not insist on them
        label = _label_index(path, line, entry.get("faceExp"), f"{k}.faceExp", True) if policy != "uploader" else None
        votes.append((label, _box(entry)))
    if policy == "uploader":
        label = _label_index(path, line, rec.get("faceExp_uploader"), "faceExp_uploader", False)
        boxes = [b for _, b in votes if b is not None]
    else:
        counts = np.bincount([lab for lab, _ in votes if lab is not None], minlength=len(KOREAN_CLASSES))
        label = int(np.argmax(counts))
        n = int(counts[label])
        ok = (n >= 2 and 2 * n > len(votes)) if policy == "majority" else (len(votes) >= 2 and n == len(votes))
        if not ok:
            return None, None
        boxes = [b for lab, b in votes if lab == label and b is not None]
    return label, (_median_box(boxes) if boxes else None)


class KoreanEmotion(FERDataset):
    """The AI-Hub Korean emotion photo set, cropped to the annotated face box.

    Args:
        root: see the module docstring for the layout.
        split: ``train`` / ``val`` (stratified holdout of ``1.Training``) / ``test`` (``2.Validation``).
        label_policy: which label a photo gets:
            ``uploader`` (default) - ``faceExp_uploader``, the emotion the person was asked to show;
            ``majority`` - the label at least 2 of the 3 annotators agree on (else the photo is dropped);
            ``unanimous`` - only photos on which all annotators agree.
            ``알수없음`` ("cannot tell") never counts as a label.
        val_fraction, seed: size of the stratified validation holdout and its seed.
        strict: a record whose image file is missing or that has no usable face box raises
            :class:`DatasetFormatError` when True; by default such records are skipped with one warning.
            Malformed JSON or labels always raise.
        crop_margin: grow the face box by this fraction of its size on every side.

    The face box is the coordinate-wise median of the annotators' boxes: of all of them for ``uploader``, of those
    who agree with the chosen label for ``majority`` / ``unanimous``.
    """

    name = "korean_emotion"
    classes = KOREAN_CLASSES

    def __init__(self, root: str, split: str, transform: Optional[Callable] = None, *,
                 label_policy: str = "uploader", val_fraction: float = 0.1, seed: int = 0, strict: bool = False,
                 crop_margin: float = 0.0):
        super().__init__(root, split, transform, crop_margin=crop_margin)
        if label_policy not in LABEL_POLICIES:
            raise ValueError(f"label_policy must be one of {LABEL_POLICIES}, got {label_policy!r}")
        self.label_policy = label_policy
        self.split_dir = _find_split_dir(self.root, split)
        jsons, images = _walk(self.split_dir)
        if not jsons:
            raise FileNotFoundError(f"KoreanEmotion: no annotation (*.json) files below {self.split_dir!r}")
        broken = BrokenRows(type(self).__name__, strict=strict)
        samples: List[Sample] = []
        self.dropped_by_policy = 0
        for jpath in jsons:
            for line, rec in load_json_records(jpath):
                label, box = resolve_record(jpath, line, rec, label_policy)
                name = rec.get("filename")
                if not isinstance(name, str) or not name.strip():
                    raise DatasetFormatError(f"{jpath}, line {line}: record has no 'filename'")
                if label is None:
                    self.dropped_by_policy += 1
                    continue
                image = images.get(_nfc(os.path.basename(name.strip().replace("\\", "/"))))
                if image is None:
                    broken.add(jpath, line, f"image {name!r} not found below {self.split_dir!r}")
                elif box is None:
                    broken.add(jpath, line, f"no valid face box (annot_*.boxes minX/minY/maxX/maxY) for {name!r}")
                else:
                    samples.append(Sample(image, label, box=box))
        self.samples = samples if split == "test" else select_split(samples, split, val_fraction=val_fraction,
                                                                    seed=seed)
        self.skipped = broken.report()
