"""``synthetic``: procedurally drawn cartoon faces in FER2013's 7 classes, for smoke tests without any download.

Every image is drawn with PIL from ``(seed, split, index)`` alone, so the set is the same on every machine and
needs no files: a face oval on a cluttered background, eyes, brows and a mouth whose shapes depend on the class
(a smile for Happy, an open "O" for Surprise, brows slanted down to the nose for Angry, ...), with random
expression intensity (shapes are blended toward Neutral by a random amount), face position, size, tilt, skin
and background colours, line widths, a random mirror, a grey-scale share and pixel noise, so that telling the
classes apart takes learning, but a tiny model gets well above chance in a couple of epochs.

It is meant for smoke tests of the pipeline (training, resuming, evaluation, prediction), **not** for measuring
accuracy: nothing learnt on it transfers to real faces.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Optional, Sequence, Tuple

import numpy as np

from .base import FERDataset, SPLITS, Sample

__all__ = ["SyntheticFaces", "FER2013_CLASSES"]

FER2013_CLASSES: Tuple[str, ...] = ("Angry", "Disgust", "Fear", "Happy", "Sad", "Surprise", "Neutral")

# Face-local coordinates: u (right) and v (down) in [-1, 1] over the face oval. Per class: brow height, brow tilt
# (inner end's offset: + lowers the inner end), eye openness, mouth curvature (+ corners up), mouth opening
# (height of an open mouth), mouth width, asymmetry (Disgust's one-sided sneer).
_EXPRESSIONS = {
    #            brow_y brow_tilt eye_open curve  open  width  asym
    "Neutral":  (-0.42,  0.00,    0.08,    0.00,  0.00, 0.55,  0.0),
    "Angry":    (-0.36,  0.16,    0.045,  -0.10,  0.00, 0.40,  0.0),
    "Disgust":  (-0.38,  0.08,    0.05,   -0.06,  0.05, 0.50,  0.22),
    "Fear":     (-0.55, -0.12,    0.13,   -0.06,  0.14, 0.62,  0.0),
    "Happy":    (-0.44,  0.00,    0.07,    0.28,  0.06, 0.70,  0.0),
    "Sad":      (-0.46, -0.16,    0.06,   -0.24,  0.00, 0.48,  0.0),
    "Surprise": (-0.64,  0.00,    0.14,    0.00,  0.30, 0.32,  0.0),
}

_SPLIT_KEYS = {name: i + 1 for i, name in enumerate(SPLITS)}  # train/val/test draw from disjoint seed streams


class SyntheticFaces(FERDataset):
    """Procedurally drawn faces of 7 expression classes (FER2013's names and order), generated on the fly.

    Args:
        root: ignored (nothing is read from disk); may be ``None``.
        split: ``"train"``, ``"val"`` or ``"test"``; the three are drawn from disjoint random streams.
        transform: applied to the RGB ``PIL.Image`` of ``size x size`` pixels.
        size: image side in pixels (default 48, as FER2013).
        num_samples: images in the train split (default 2800).
        eval_samples: images in each of the val and test splits (default ``max(7, num_samples // 4)``).
        seed: base seed; the same ``(seed, split, index)`` always gives the same image and label.
        variation: spread of the nuisance factors (pose, size, feature placement, expression intensity, blur,
            noise): 0.3 by default, 0 for upright centred faces (trivial), up to 2 for a much harder set.

    Labels are balanced (each class ``n // 7`` or ``n // 7 + 1`` times) in a seeded random order.
    """

    classes = FER2013_CLASSES
    name = "synthetic"

    def __init__(self, root: Optional[str] = None, split: str = "train", transform: Optional[Callable] = None, *,
                 size: int = 48, num_samples: int = 2800, eval_samples: Optional[int] = None, seed: int = 0,
                 variation: float = 0.3, crop_margin: float = 0.0):
        super().__init__(os.curdir, split, transform, crop_margin=crop_margin)
        self.root = "" if root is None else os.fspath(root)
        for name, value, low in (("size", size, 16), ("num_samples", num_samples, 1), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"SyntheticFaces: {name} must be an int >= {low}, got {value!r}")
        if eval_samples is None:
            eval_samples = max(len(self.classes), num_samples // 4)
        if isinstance(eval_samples, bool) or not isinstance(eval_samples, int) or eval_samples < 1:
            raise ValueError(f"SyntheticFaces: eval_samples must be an int >= 1, got {eval_samples!r}")
        if isinstance(variation, bool) or not isinstance(variation, (int, float)) or not 0 <= variation <= 2:
            raise ValueError(f"SyntheticFaces: variation must be a number in [0, 2], got {variation!r}")
        self.size, self.seed, self.variation = size, seed, float(variation)
        n = num_samples if split == "train" else eval_samples
        rng = np.random.default_rng([seed, _SPLIT_KEYS[split]])
        labels = rng.permutation(np.arange(n) % len(self.classes))
        self.samples = [Sample(source=f"synthetic:{split}:{i}", label=int(c)) for i, c in enumerate(labels)]

    def load_image(self, index: int):
        """The RGB ``PIL.Image`` (``size x size``) of sample ``index``, drawn from ``(seed, split, index)``."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        index %= len(self)
        rng = np.random.default_rng([self.seed, _SPLIT_KEYS[self.split], index, 7919])
        return draw_face(self.classes[self.samples[index].label], self.size, rng, variation=self.variation)


def _lerp(a: Sequence[float], b: Sequence[float], t: float) -> Tuple[float, ...]:
    return tuple(x + (y - x) * t for x, y in zip(a, b))


def draw_face(expression: str, size: int, rng: np.random.Generator, *, variation: float = 1.0):
    """Draw one face with ``expression`` (a name of :data:`FER2013_CLASSES`) as an RGB ``size x size`` image.

    ``variation`` scales the random spread of pose, size, feature placement, expression intensity, blur and noise
    (1: the full spread, 0: every face upright and centred; colours and background stay random)."""
    from PIL import Image, ImageDraw, ImageFilter

    if expression not in _EXPRESSIONS:
        raise ValueError(f"expression must be one of {list(_EXPRESSIONS)}, got {expression!r}")
    ss = 2  # draw supersampled, then downsample: smooth edges without antialiased primitives
    S = size * ss
    u01 = rng.uniform

    def J(lo: float, hi: float) -> float:
        # a nuisance draw whose spread around the range's middle scales with `variation` (0: always the middle);
        # it consumes the same random numbers whatever `variation` is
        mid = 0.5 * (lo + hi)
        return mid + (u01(lo, hi) - mid) * variation

    # background: a colour gradient with a few low-contrast blobs, so the face is not on a flat field
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0.0, 1.0, S)[:, None, None]
    bg = (c0 * (1 - t) + c1 * t).repeat(S, axis=1).astype(np.uint8)
    img = Image.fromarray(bg, "RGB")
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        x, y, r = u01(0, S), u01(0, S), u01(0.05, 0.3) * S
        col = tuple(int(v) for v in np.clip(bg[int(y) % S, int(x) % S] + rng.integers(-40, 41, 3), 0, 255))
        d.ellipse((x - r, y - r, x + r, y + r), fill=col)

    # the face, tilted by `angle` about its centre: every shape is a polygon through rotated face-local points
    cx, cy = S * (0.5 + J(-0.07, 0.07)), S * (0.5 + J(-0.05, 0.07))
    rx = S * J(0.32, 0.40)
    ry = rx * J(1.12, 1.32)
    angle = math.radians(J(-18, 18))
    ca, sa = math.cos(angle), math.sin(angle)
    skin = np.array([u01(150, 245), u01(105, 205), u01(80, 180)])
    skin = tuple(int(v) for v in np.clip(np.sort(skin)[::-1] if rng.random() < 0.8 else skin, 0, 255))
    ink = tuple(int(v) for v in np.clip(np.array(skin) * u01(0.1, 0.35), 0, 255))
    lw = max(1, int(round(S * u01(0.03, 0.045))))

    def P(u: float, v: float) -> Tuple[float, float]:
        x, y = u * rx, v * ry
        return cx + ca * x - sa * y, cy + sa * x + ca * y

    def oval(u: float, v: float, au: float, av: float, n: int = 20):
        """Polygon of an axis-aligned (in face coordinates) ellipse of half-axes (au, av) in face units."""
        t = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
        return [P(u + au * math.cos(a), v + av * math.sin(a)) for a in t]

    d.polygon(oval(0.0, 0.0, 1.0, 1.0, 48), fill=skin)

    # expression parameters, blended toward Neutral by a random intensity, plus per-face jitter
    intensity = J(0.7, 1.2)
    brow_y, brow_tilt, eye_open, curve, mouth_open, width, asym = _lerp(
        _EXPRESSIONS["Neutral"], _EXPRESSIONS[expression], intensity)
    brow_y += J(-0.04, 0.04)
    eye_open *= J(0.8, 1.2)
    width *= J(0.85, 1.15)
    eye_y, eye_dx = J(-0.24, -0.16), J(0.34, 0.44)
    mouth_y = J(0.42, 0.52)

    for side in (-1, 1):
        # eyes: an outlined white, and the iris
        eu, eh = side * eye_dx, max(eye_open, 0.02)
        d.polygon(oval(eu, eye_y, 0.16, eh), fill=(245, 245, 240), outline=ink, width=lw)
        pr = min(eh * ry, 0.08 * rx)
        d.polygon(oval(eu, eye_y, pr / rx, pr / ry, 12), fill=ink)
        # brows: inner end (near the nose) moved down by brow_tilt; Disgust lowers one side more
        tilt = brow_tilt + (asym * 0.5 if side == 1 else 0.0)
        inner, outer = P(side * 0.12, brow_y + tilt), P(side * 0.62, brow_y - 0.3 * tilt)
        mid = P(side * 0.37, brow_y - 0.05 - 0.1 * abs(min(0.0, brow_y + 0.42)))
        d.line([inner, mid, outer], fill=ink, width=int(lw * 1.6), joint="curve")

    # nose, and Disgust's wrinkle lines beside it
    d.line([P(0.0, -0.05), P(0.07, 0.2), P(-0.03, 0.22)], fill=ink, width=lw)
    if asym > 0.05:
        for k in (0, 1):
            d.line([P(0.12 + 0.05 * k, 0.0 + 0.06 * k), P(0.2 + 0.05 * k, 0.1 + 0.06 * k)], fill=ink,
                   width=max(1, lw // 2 + 1))

    # mouth: corners lifted by `curve` (one corner raised further for the sneer), opened by `mouth_open`
    n = 24
    us = np.linspace(-width / 2, width / 2, n)
    lift = curve * (us / (width / 2)) ** 2 + asym * np.clip(us / (width / 2), 0, 1)
    upper = [P(u, mouth_y - l) for u, l in zip(us, lift)]
    if mouth_open > 0.02:
        sag = mouth_open * np.sqrt(np.clip(1 - (us / (width / 2)) ** 2, 0, 1))
        lower = [P(u, mouth_y - l + s) for u, l, s in zip(us, lift, sag)]
        top = [P(u, mouth_y - l - 0.25 * s) for u, l, s in zip(us, lift, sag)]
        d.polygon(top + lower[::-1], fill=(int(ink[0] * 0.6) + 60, 20, 30), outline=ink, width=lw)
    else:
        d.line(upper, fill=ink, width=int(lw * 1.3), joint="curve")

    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    img = img.resize((size, size), Image.LANCZOS)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(J(0.3, 0.9)))
    arr = np.asarray(img, dtype=np.float32)
    if rng.random() < 0.3:  # grey share, like FER2013
        arr = arr.mean(axis=2, keepdims=True).repeat(3, axis=2)
    arr = arr * J(0.75, 1.2) + J(-25, 25) + rng.normal(0.0, J(2, 8) * variation, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
