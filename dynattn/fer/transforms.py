"""Image transforms of the FER pipeline: PIL face crop -> normalised ``(3, S, S)`` float32 tensor.

Both take the checkpoint config (``img_size``, ``mean``, ``std``, optional ``interpolation``), so training,
evaluation and prediction feed the model the same way. Grey images are already RGB (``open_image`` converts).

* :func:`eval_transform`: resize the shorter side to ``img_size``, center crop ``img_size``, normalise.
* :func:`train_transform`: random rotation, random resized crop, horizontal flip, normalise, random erasing;
  each can be tuned or switched off.

Randomness comes from torch's global RNG (torchvision's transforms draw from it), which the training loop seeds
per epoch (and DataLoader workers per epoch and worker), so augmentation is reproducible and resumable.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

__all__ = ["eval_transform", "train_transform", "DEFAULT_AUGMENT"]

#: Defaults of :func:`train_transform`'s options (a mild recipe: faces are aligned crops, so no heavy geometry).
DEFAULT_AUGMENT: Dict[str, Any] = dict(
    hflip=0.5,
    rotation=15.0,
    crop_scale=(0.8, 1.0),
    crop_ratio=(0.9, 1.1),
    erasing=0.25,
    erasing_scale=(0.02, 0.25),
)


def _v2():
    try:
        from torchvision.transforms import v2
        from torchvision.transforms import InterpolationMode
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError('dynattn.fer transforms need torchvision: pip install torchvision "dynattn[fer]"') from e
    return v2, InterpolationMode


def _input_spec(config: Dict[str, Any]) -> Tuple[int, Tuple[float, ...], Tuple[float, ...], Any]:
    if not isinstance(config, dict):
        raise TypeError(f"config must be a checkpoint config dict, got {type(config).__name__}")
    for key in ("img_size", "mean", "std"):
        if key not in config:
            raise ValueError(f"config must have {key!r} (img_size, mean, std), got keys {sorted(config)}")
    size = config["img_size"]
    if isinstance(size, (list, tuple)):  # (C, H, W) / (H, W) from timm data configs: square crops only
        size = size[-1]
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"config['img_size'] must be a positive int, got {config['img_size']!r}")
    mean, std = tuple(float(m) for m in config["mean"]), tuple(float(s) for s in config["std"])
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"config['mean'] and config['std'] must be 3 values (std > 0), got {mean} and {std}")
    _, mode = _v2()
    name = str(config.get("interpolation", "bicubic")).lower()
    try:
        interp = mode(name)
    except ValueError:
        raise ValueError(f"config['interpolation'] must be one of {[m.value for m in mode]}, got {name!r}") from None
    return size, mean, std, interp


def _to_tensor(v2, mean, std) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=mean, std=std)]


def eval_transform(config: Dict[str, Any]) -> Callable:
    """Deterministic transform for evaluation/prediction.

    Args:
        config: a checkpoint config (or any dict) with ``img_size`` (int ``S``), ``mean``, ``std`` (3 floats each,
            in [0, 1] pixel units) and optionally ``interpolation`` (default ``"bicubic"``).

    Returns:
        A callable mapping an RGB ``PIL.Image`` (or a ``(3, H, W)`` uint8 tensor) to a float32 ``(3, S, S)`` tensor:
        shorter side resized to ``S``, center crop ``S x S``, normalised with ``(x - mean) / std``.
    """
    v2, _ = _v2()
    size, mean, std, interp = _input_spec(config)
    return v2.Compose([v2.Resize(size, interpolation=interp, antialias=True), v2.CenterCrop(size),
                       *_to_tensor(v2, mean, std)])


def _pair(value, name: str) -> Optional[Tuple[float, float]]:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        raise TypeError(f"{name} must be a (min, max) pair or None, got {value!r}")
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a (min, max) pair of numbers or None, got {value!r}") from None
    if not 0 < lo <= hi:
        raise ValueError(f"{name} must satisfy 0 < min <= max, got {value!r}")
    return lo, hi


def _prob(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
    return float(value)


def train_transform(
    config: Dict[str, Any],
    *,
    hflip: float = DEFAULT_AUGMENT["hflip"],
    rotation: float = DEFAULT_AUGMENT["rotation"],
    crop_scale: Optional[Sequence[float]] = DEFAULT_AUGMENT["crop_scale"],
    crop_ratio: Sequence[float] = DEFAULT_AUGMENT["crop_ratio"],
    erasing: float = DEFAULT_AUGMENT["erasing"],
    erasing_scale: Sequence[float] = DEFAULT_AUGMENT["erasing_scale"],
) -> Callable:
    """Random augmentation for training, ending in the same normalisation as :func:`eval_transform`.

    Args:
        config: as for :func:`eval_transform`.
        hflip: probability of a horizontal flip (0 disables).
        rotation: maximum rotation in degrees, uniform in ``[-rotation, rotation]``, corners filled black
            (0 disables).
        crop_scale: area range ``(min, max)`` of the random resized crop relative to the image; ``None`` disables
            it (resize + center crop as in evaluation). ``(1, 1)`` keeps the whole image at a random aspect ratio.
        crop_ratio: aspect-ratio range of the random resized crop.
        erasing: probability of random erasing (a random rectangle set to 0 after normalisation; 0 disables).
        erasing_scale: area range of the erased rectangle.

    Returns:
        A callable mapping an RGB ``PIL.Image`` to a float32 ``(3, S, S)`` tensor. Randomness is drawn from torch's
        global RNG.
    """
    v2, mode = _v2()
    size, mean, std, interp = _input_spec(config)
    hflip, erasing = _prob(hflip, "hflip"), _prob(erasing, "erasing")
    if isinstance(rotation, bool) or not isinstance(rotation, (int, float)) or not 0 <= rotation <= 180:
        raise ValueError(f"rotation must be a number of degrees in [0, 180], got {rotation!r}")
    crop_scale = _pair(crop_scale, "crop_scale")
    if crop_scale is not None and crop_scale[1] > 1.0:
        raise ValueError(f"crop_scale must lie in (0, 1], got {crop_scale!r}")
    crop_ratio = _pair(crop_ratio, "crop_ratio")
    erasing_scale = _pair(erasing_scale, "erasing_scale")

    steps = []
    if rotation > 0:
        steps.append(v2.RandomRotation(float(rotation), interpolation=mode.BILINEAR, fill=0))
    if crop_scale is not None:
        steps.append(v2.RandomResizedCrop(size, scale=crop_scale, ratio=crop_ratio, interpolation=interp,
                                          antialias=True))
    else:
        steps += [v2.Resize(size, interpolation=interp, antialias=True), v2.CenterCrop(size)]
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    steps += _to_tensor(v2, mean, std)
    if erasing > 0:
        steps.append(v2.RandomErasing(p=erasing, scale=erasing_scale, value=0))
    return v2.Compose(steps)
