"""Classify the facial expressions in photos: ``dynattn-fer predict``.

:func:`predict_image` finds the faces of an image (OpenCV Haar cascade, :mod:`dynattn.fer.faces`), crops each with
a margin, and classifies the crops with a trained model in one batch. The CLI

    dynattn-fer predict IMAGE... --checkpoint runs/NAME [--annotate OUT_DIR] [--routing OUT_DIR] [--top K]

prints one JSON line per face::

    {"image": "a.jpg", "face": 0, "box": [x0, y0, x1, y1], "label": "Happy", "score": 0.93,
     "probabilities": {"Happy": 0.93, ...}}

(``box``: the detected face in pixels of the EXIF-upright image, ``x1``/``y1`` exclusive; probabilities highest
first), or ``{"image": ..., "face": null, "message": "no face detected ..."}`` for an image without a face.
``--annotate`` saves each image with boxes and labels drawn, ``--routing`` a picture of the routing attention of a
``vit_bra_*`` model over each face (:func:`dynattn.fer.routing_viz.draw_routing`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .faces import ImageReadError, check_detector_options, crop_face, detect_faces, load_image

__all__ = ["IMAGE_EXTENSIONS", "add_predict_args", "annotate_image", "predict_image", "run_predict"]

#: File extensions taken from a folder given as IMAGE.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")

DEFAULT_MARGIN = 0.2


def _face_crops(img, *, detect: bool, margin: float, detector: Dict[str, Any]) -> List[Tuple[Tuple[int, ...], Any]]:
    """``[(face box, crop PIL.Image), ...]``, largest face first; the whole image when ``detect`` is False."""
    if not detect:
        return [((0, 0, img.width, img.height), img)]
    return [(box, crop_face(img, box, margin=margin)[0]) for box in detect_faces(img, **detector)]


def _classify(model, transform: Callable, crops: Sequence[Any], *, routing: bool = False):
    """Softmax probabilities ``(F, C)`` of the crops, their model inputs ``(F, 3, S, S)`` and, if ``routing``, the
    :class:`~dynattn.fer.routing_viz.RoutingCapture` of that forward pass."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.stack([transform(c) for c in crops])
    capture = None
    with torch.no_grad():
        if routing:
            from .routing_viz import capture_routing

            with capture_routing(model) as capture:
                out = model(x.to(device))
        else:
            out = model(x.to(device))
    out = out[0] if isinstance(out, (tuple, list)) else out
    return out.float().softmax(dim=1).cpu(), x, capture


def _results(probs: torch.Tensor, boxes, classes: Sequence[str], top: Optional[int]) -> List[Dict[str, Any]]:
    results = []
    k = probs.shape[1] if top is None else min(top, probs.shape[1])
    for i, (p, box) in enumerate(zip(probs, boxes)):
        vals, ids = p.topk(k)
        results.append({
            "face": i,
            "box": [int(v) for v in box],
            "label": classes[int(ids[0])],
            "score": round(float(vals[0]), 6),
            "probabilities": {classes[int(j)]: round(float(v), 6) for v, j in zip(vals, ids)},
        })
    return results


def _check_top(top) -> None:
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1):
        raise ValueError(f"top must be None or a positive int, got {top!r}")


def _classes(config: Dict[str, Any], num_outputs: Optional[int] = None) -> List[str]:
    classes = [str(c) for c in (config.get("classes") or [])]
    if not classes:
        raise ValueError("config has no 'classes' (label names): not a dynattn-fer checkpoint config")
    if num_outputs is not None and num_outputs != len(classes):
        raise ValueError(f"the model predicts {num_outputs} classes but config['classes'] has {len(classes)}")
    return classes


def predict_image(
    model: torch.nn.Module,
    config: Dict[str, Any],
    image,
    *,
    detect: bool = True,
    margin: float = DEFAULT_MARGIN,
    top: Optional[int] = None,
    transform: Optional[Callable] = None,
    min_face_size: int = 32,
    scale_factor: float = 1.1,
    min_neighbors: int = 5,
    max_faces: Optional[int] = None,
    detect_max_side: Optional[int] = 1024,
) -> List[Dict[str, Any]]:
    """Detect, crop and classify the faces of one image.

    Args:
        model: a trained classifier in eval mode (e.g. from :func:`dynattn.fer.checkpoint.load_model`); inputs go
            to the device of its parameters.
        config: its checkpoint config (``classes``, ``img_size``, ``mean``, ``std``).
        image: a path, an RGB ``PIL.Image`` or an ``(H, W, 3)`` uint8 array; EXIF orientation is applied to files.
        detect: find faces with OpenCV's Haar cascade; ``False`` classifies the whole image as one face.
        margin: grow each detected box by this fraction of its size on every side before cropping (clipped to the
            image): models are trained on crops with some context around the face.
        top: keep only the ``top`` most probable classes in ``probabilities``.
        transform: PIL -> model input; default :func:`dynattn.fer.transforms.eval_transform` of ``config``.
        min_face_size, scale_factor, min_neighbors, max_faces, detect_max_side: detector options
            (:func:`~dynattn.fer.faces.detect_faces`'s ``min_size``, ..., ``max_side``).

    Returns:
        One dict per face, largest face first: ``{"face": i, "box": [x0, y0, x1, y1] (ints, pixels of the upright
        image, x1/y1 exclusive), "label": str, "score": float, "probabilities": {class: p} (highest first)}``;
        ``[]`` when no face is found.

    Raises:
        FileNotFoundError: ``image`` is a path that does not exist. ImageReadError (a ``ValueError``): it is not
        an image.
    """
    _check_top(top)
    img = load_image(image)
    classes = _classes(config)
    if transform is None:
        from .transforms import eval_transform

        transform = eval_transform(config)
    detector = dict(min_size=min_face_size, scale_factor=scale_factor, min_neighbors=min_neighbors,
                    max_faces=max_faces, max_side=detect_max_side)
    faces = _face_crops(img, detect=detect, margin=margin, detector=detector)
    if not faces:
        return []
    probs, _, _ = _classify(model, transform, [c for _, c in faces])
    _classes(config, probs.shape[1])
    return _results(probs, [b for b, _ in faces], classes, top)


def annotate_image(image, results: Sequence[Dict[str, Any]], path: str) -> str:
    """Save ``image`` with each result's box and ``label score`` drawn on it (PNG/JPEG by ``path``'s extension);
    returns ``path``."""
    from PIL import ImageDraw, ImageFont

    img = load_image(image).copy()
    draw = ImageDraw.Draw(img)
    side = min(img.size)
    width = max(2, side // 200)
    try:
        font = ImageFont.load_default(size=max(12, side // 30))
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        font = ImageFont.load_default()
    palette = [(0, 220, 0), (255, 160, 0), (0, 160, 255), (255, 0, 160), (160, 0, 255)]
    for r in results:
        color = palette[r["face"] % len(palette)]
        x0, y0, x1, y1 = r["box"]
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=color, width=width)
        text = f"{r['label']} {r['score']:.2f}"
        tb = draw.textbbox((0, 0), text, font=font)
        tw, th = tb[2] - tb[0], tb[3] - tb[1]
        ty = y0 - th - 2 * width if y0 - th - 2 * width >= 0 else y1 + width  # above the box, else below
        tx = min(max(0, x0), max(0, img.width - tw - 2 * width))
        draw.rectangle([tx, ty, tx + tw + 2 * width, ty + th + 2 * width], fill=color)
        draw.text((tx + width - tb[0], ty + width - tb[1]), text, fill=(0, 0, 0), font=font)
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    img.save(path)
    return path


# ---------------------------------------------------------------------------------------------- CLI


def add_predict_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``dynattn-fer predict`` options to ``parser`` (a subcommand parser); returns it."""
    parser.add_argument("images", nargs="+", metavar="IMAGE",
                        help=f"image files, or folders (their {'/'.join(IMAGE_EXTENSIONS)} files)")
    parser.add_argument("--checkpoint", required=True,
                        help="run directory (uses its best checkpoint) or a checkpoint .safetensors/.json file")
    parser.add_argument("--no-detect", dest="detect", action="store_false",
                        help="do not detect faces: classify each whole image as one face")
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                        help="grow each face box by this fraction of its size per side before cropping")
    parser.add_argument("--min-face-size", type=int, default=32, help="smallest face side to detect, in pixels")
    parser.add_argument("--scale-factor", type=float, default=1.1, help="face detector pyramid step (> 1)")
    parser.add_argument("--min-neighbors", type=int, default=5,
                        help="face detector: higher gives fewer false detections")
    parser.add_argument("--max-faces", type=int, default=None, help="keep only the largest N faces per image")
    parser.add_argument("--detect-max-side", type=int, default=1024,
                        help="detect faces on a copy downscaled to this longer side (fast on big photos; faces "
                             "must stay >= 24 px there); 0: full resolution")
    parser.add_argument("--top", type=int, default=None, metavar="K", help="print only the K most probable classes")
    parser.add_argument("--annotate", default=None, metavar="OUT_DIR",
                        help="save each image with face boxes and labels drawn")
    parser.add_argument("--routing", default=None, metavar="OUT_DIR",
                        help="save a picture of the routing attention over each face (vit_bra_* models)")
    parser.add_argument("--routing-layer", type=int, default=-1,
                        help="layer whose per-query routing the picture shows (default: the last)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    return parser


def _expand_images(items: Sequence[str]) -> List[str]:
    paths: List[str] = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item)
                           if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(item, f)))
            if not found:
                print(f"warning: folder {item!r} has no image ({'/'.join(IMAGE_EXTENSIONS)}) files", file=sys.stderr)
            paths += found
        else:
            paths.append(item)
    return paths


class _Names:
    """Output file names that stay unique when two inputs share a stem (``a/x.jpg``, ``b/x.jpg``)."""

    def __init__(self) -> None:
        self.used: set = set()

    def __call__(self, directory: str, stem: str, suffix: str) -> str:
        n, name = 1, f"{stem}{suffix}"
        while os.path.join(directory, name) in self.used:
            n += 1
            name = f"{stem}_{n}{suffix}"
        path = os.path.join(directory, name)
        self.used.add(path)
        return path


def run_predict(args: argparse.Namespace) -> int:
    """Run ``dynattn-fer predict`` with parsed ``args`` (see :func:`add_predict_args`).

    Returns 0, or 1 when some image could not be read (the others are still processed; the reason goes to
    stderr). Raises ``FileNotFoundError``/``ValueError`` for a bad checkpoint or option before any image is read.
    """
    from .checkpoint import load_model
    from .evaluate import resolve_device
    from .transforms import eval_transform

    _check_top(args.top)
    if not 0 <= args.margin <= 2:
        raise ValueError(f"--margin must be in [0, 2] (a fraction of the face size), got {args.margin}")
    device = resolve_device(args.device)
    model, config = load_model(args.checkpoint, map_location=device)
    classes = _classes(config)
    transform = eval_transform(config)
    if args.routing is not None:
        from .routing_viz import routed_attention_layers

        n_layers = len(routed_attention_layers(model))
        if not n_layers:
            raise ValueError(f"--routing needs a model with routed attention (vit_bra_*); {config.get('model')!r} "
                             "has none")
        if not -n_layers <= args.routing_layer < n_layers:
            raise ValueError(f"--routing-layer must be in [{-n_layers}, {n_layers}), got {args.routing_layer}")
    detector = dict(min_size=args.min_face_size, scale_factor=args.scale_factor, min_neighbors=args.min_neighbors,
                    max_faces=args.max_faces, max_side=args.detect_max_side or None)
    if args.detect:
        check_detector_options(**detector)
    names = _Names()
    failed = 0
    for path in _expand_images(args.images):
        try:
            img = load_image(path)
        except (FileNotFoundError, ImageReadError) as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        faces = _face_crops(img, detect=args.detect, margin=args.margin, detector=detector)
        stem = os.path.splitext(os.path.basename(path))[0]
        if not faces:
            print(json.dumps({"image": path, "face": None,
                              "message": "no face detected (try --no-detect, or a smaller --min-face-size)"}),
                  flush=True)
            continue
        probs, x, capture = _classify(model, transform, [c for _, c in faces], routing=args.routing is not None)
        _classes(config, probs.shape[1])
        results = _results(probs, [b for b, _ in faces], classes, args.top)
        extra: Dict[int, Dict[str, str]] = {r["face"]: {} for r in results}
        if args.routing is not None:
            from .routing_viz import denormalize, draw_routing

            for r in results:
                i = r["face"]
                out = names(args.routing, stem, f"_face{i}_routing.png")
                draw_routing(denormalize(x[i], config["mean"], config["std"]), capture, out,
                             layer=args.routing_layer, batch_index=i,
                             title=f"{os.path.basename(path)} face {i}: {r['label']} {r['score']:.2f}")
                extra[i]["routing"] = out
        if args.annotate is not None:
            out = names(args.annotate, stem, "_annotated.png")
            annotate_image(img, results, out)
            for r in results:
                extra[r["face"]]["annotated"] = out
        for r in results:
            print(json.dumps({"image": path, **r, **extra[r["face"]]}), flush=True)
    return 1 if failed else 0
