"""Face detection and cropping for prediction on arbitrary photos.

Detection uses OpenCV's frontal-face Haar cascade (``haarcascade_frontalface_default.xml``, shipped inside
``opencv-python-headless``), imported only when a face is to be detected. Images are read with EXIF orientation
applied first, so a phone photo stored sideways is detected (and its boxes reported) upright.
"""

from __future__ import annotations

import functools
import os
from typing import List, Optional, Tuple

import numpy as np

from .datasets.base import UnreadableImageError, open_image

__all__ = [
    "Box",
    "ImageReadError",
    "check_detector_options",
    "crop_face",
    "detect_faces",
    "expand_box",
    "load_image",
]

Box = Tuple[int, int, int, int]  # (x0, y0, x1, y1): pixel columns x0..x1-1 and rows y0..y1-1

_INSTALL_HINT = (
    "face detection needs OpenCV: pip install 'opencv-python-headless<5' "
    "(or skip detection and classify the whole image: --no-detect / detect=False)"
)


class ImageReadError(UnreadableImageError, ValueError):
    """A file given for prediction is not a readable image (also a ``ValueError``: it is bad user input)."""


def load_image(image):
    """An RGB ``PIL.Image`` from a path, a ``PIL.Image`` or an ``(H, W[, 3|4])`` uint8 array; EXIF orientation
    is applied to files and ``PIL.Image`` objects (a no-op for one already transposed: transposing drops the tag).
    Raises ``FileNotFoundError`` for a missing path, :class:`ImageReadError` for a file
    that is not an image, ``TypeError`` for anything else."""
    from PIL import Image, ImageOps

    if isinstance(image, Image.Image):
        image = ImageOps.exif_transpose(image)
        return image.convert("RGB") if image.mode != "RGB" else image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise TypeError(f"image array must be uint8 (H, W), (H, W, 3) or (H, W, 4), got {image.dtype} "
                            f"{image.shape}")
        return open_image(np.ascontiguousarray(image))
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"image file {path!r} does not exist")
        try:
            return open_image(path)
        except UnreadableImageError as e:
            raise ImageReadError(f"{path!r} is not a readable image ({e})") from e
    raise TypeError(f"image must be a path, a PIL.Image or a uint8 numpy array, got {type(image).__name__}")


@functools.lru_cache(maxsize=None)
def _cascade(name: str):
    try:
        import cv2
    except ImportError as e:
        raise ImportError(_INSTALL_HINT) from e
    path = os.path.join(cv2.data.haarcascades, name)
    cascade = cv2.CascadeClassifier(path)
    if cascade.empty():
        raise RuntimeError(f"OpenCV could not load the Haar cascade {path!r}; reinstall opencv-python-headless")
    return cascade


def check_detector_options(*, min_size: int = 32, scale_factor: float = 1.1, min_neighbors: int = 5,
                           max_side: Optional[int] = 1024, max_faces: Optional[int] = None) -> None:
    """Raise ``ValueError`` naming the first bad :func:`detect_faces` option (so a CLI can fail before any image)."""
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 1:
        raise ValueError(f"min_size must be a positive int (pixels), got {min_size!r}")
    if not isinstance(scale_factor, (int, float)) or not scale_factor > 1.0:
        raise ValueError(f"scale_factor must be > 1, got {scale_factor!r}")
    if isinstance(min_neighbors, bool) or not isinstance(min_neighbors, int) or min_neighbors < 0:
        raise ValueError(f"min_neighbors must be an int >= 0, got {min_neighbors!r}")
    if max_side is not None and (isinstance(max_side, bool) or not isinstance(max_side, int) or max_side < 32):
        raise ValueError(f"max_side must be None or an int >= 32, got {max_side!r}")
    if max_faces is not None and (isinstance(max_faces, bool) or not isinstance(max_faces, int) or max_faces < 1):
        raise ValueError(f"max_faces must be None or a positive int, got {max_faces!r}")


def detect_faces(
    image,
    *,
    min_size: int = 32,
    scale_factor: float = 1.1,
    min_neighbors: int = 5,
    max_side: Optional[int] = 1024,
    max_faces: Optional[int] = None,
) -> List[Box]:
    """Find frontal faces with OpenCV's Haar cascade.

    Args:
        image: a path, ``PIL.Image`` or uint8 array (see :func:`load_image`).
        min_size: smallest face side to report, in pixels of ``image``.
        scale_factor: cascade image-pyramid step (> 1; smaller finds more sizes, slower).
        min_neighbors: overlapping detections a face needs (higher: fewer false positives).
        max_side: detect on a copy whose longer side is at most this (boxes are mapped back), which keeps
            multi-megapixel photos fast; ``None`` detects at full resolution.
        max_faces: keep only the largest ones.

    Returns:
        Boxes ``(x0, y0, x1, y1)`` in pixels of the (EXIF-transposed) image, largest first.
    """
    check_detector_options(min_size=min_size, scale_factor=scale_factor, min_neighbors=min_neighbors,
                           max_side=max_side, max_faces=max_faces)
    cascade = _cascade("haarcascade_frontalface_default.xml")
    import cv2

    img = load_image(image)
    W, H = img.size
    gray = np.asarray(img.convert("L"))
    s = 1.0
    if max_side is not None and max(W, H) > max_side:
        s = max_side / max(W, H)
        gray = cv2.resize(gray, (max(1, round(W * s)), max(1, round(H * s))), interpolation=cv2.INTER_AREA)
    gray = cv2.equalizeHist(gray)  # the cascade is sensitive to contrast; equalising helps dim/backlit photos
    m = max(1, int(round(min_size * s)))
    found = cascade.detectMultiScale(gray, scaleFactor=float(scale_factor), minNeighbors=min_neighbors,
                                     minSize=(m, m))
    boxes: List[Box] = []
    for x, y, w, h in np.asarray(found, dtype=np.float64).reshape(-1, 4):
        x0, y0 = max(0, int(round(x / s))), max(0, int(round(y / s)))
        x1, y1 = min(W, int(round((x + w) / s))), min(H, int(round((y + h) / s)))
        if x1 > x0 and y1 > y0:
            boxes.append((x0, y0, x1, y1))
    boxes.sort(key=lambda b: ((b[2] - b[0]) * (b[3] - b[1]), -b[1], -b[0]), reverse=True)
    return boxes[:max_faces] if max_faces is not None else boxes


def expand_box(box, margin: float, width: int, height: int) -> Box:
    """Grow ``box`` by ``margin`` times its width/height on each side, clipped to a ``width x height`` image.

    Returns integer ``(x0, y0, x1, y1)`` with ``0 <= x0 < x1 <= width`` and ``0 <= y0 < y1 <= height``.
    """
    if not isinstance(margin, (int, float)) or isinstance(margin, bool) or margin < 0:
        raise ValueError(f"margin must be a number >= 0 (fraction of the face size), got {margin!r}")
    if len(box) != 4:
        raise ValueError(f"box must be (x0, y0, x1, y1), got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"box must have x1 > x0 and y1 > y0, got {box!r}")
    mx, my = margin * (x1 - x0), margin * (y1 - y0)
    out = (max(0, int(round(x0 - mx))), max(0, int(round(y0 - my))),
           min(width, int(round(x1 + mx))), min(height, int(round(y1 + my))))
    if not (out[2] > out[0] and out[3] > out[1]):
        raise ValueError(f"box {box!r} lies outside the {width}x{height} image")
    return out


def crop_face(image, box, *, margin: float = 0.2):
    """Crop a face with a margin: returns ``(crop as RGB PIL.Image, crop box (x0, y0, x1, y1))``, the box being
    :func:`expand_box` of ``box`` (so the crop never extends past the image)."""
    img = load_image(image)
    crop_box = expand_box(box, margin, img.width, img.height)
    return img.crop(crop_box), crop_box
