"""Helpers shared by the baseline FER models (``dan``, ``mit_fer``, ``patt_lite``): argument checks, finding
ImageNet-pretrained backbone weights on local disk only, and loading them into a backbone sub-module.
"""

from __future__ import annotations

import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .vit_bra import PRETRAINED_DIR_ENV, find_local_weights, find_pretrained_file

__all__ = [
    "check_img_size",
    "check_num_classes",
    "find_local_weights",
    "load_into",
    "resolve_weights_file",
    "set_input_size",
]

ImgSize = Union[int, Tuple[int, int]]


def check_img_size(img_size: ImgSize, *, minimum: int, model: str) -> Tuple[int, int]:
    """``img_size`` (int or ``(H, W)``) as a pair; ``ValueError``/``TypeError`` naming ``model`` if it is not
    a positive int (pair) of at least ``minimum`` pixels per side."""
    if isinstance(img_size, int) and not isinstance(img_size, bool):
        img_size = (img_size, img_size)
    if not (isinstance(img_size, (tuple, list, torch.Size)) and len(img_size) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in img_size)):
        raise TypeError(f"{model}: img_size must be an int or a pair of ints (H, W), got {img_size!r}")
    if min(img_size) < minimum:
        raise ValueError(f"{model}: img_size must be at least {minimum} px per side, got {tuple(img_size)}")
    return int(img_size[0]), int(img_size[1])


def check_num_classes(num_classes: int, *, minimum: int, model: str) -> int:
    """``num_classes`` if it is an int of at least ``minimum``, else ``ValueError`` naming ``model``."""
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < minimum:
        raise ValueError(f"{model}: num_classes must be an int >= {minimum}, got {num_classes!r}")
    return num_classes


def check_input(x: torch.Tensor, in_chans: int, min_size: int, model: str) -> None:
    """``TypeError``/``ValueError`` naming ``model`` unless ``x`` is a ``(B, in_chans, H, W)`` tensor with
    ``H, W >= min_size``; fails early and clearly instead of deep inside a conv."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{model}: input must be a tensor (B, {in_chans}, H, W), got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != in_chans:
        raise ValueError(f"{model}: input must have shape (B, {in_chans}, H, W), got {tuple(x.shape)}")
    if min(x.shape[-2:]) < min_size:
        raise ValueError(f"{model}: input images must be at least {min_size} px per side, got {tuple(x.shape[-2:])}")


def set_input_size(model: nn.Module, in_chans: int, img_size: Tuple[int, int]) -> None:
    """Make ``model.pretrained_cfg['input_size']`` (what ``timm.data.resolve_data_config`` reads) follow the
    ``img_size``/``in_chans`` the model was built with."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg["input_size"] = (in_chans, *img_size)
    model.pretrained_cfg = cfg
    model.default_cfg = cfg  # timm's backwards-compatible alias


# ---------------------------------------------------------------------------------------------- weights


def resolve_weights_file(variant: str, *, file: Optional[str], cache_dir: Optional[str] = None,
                         timm_name: Optional[str] = None, stems: Sequence[str] = (),
                         hub_ids: Sequence[str] = (), how_to_get: str = "") -> str:
    """The local file holding ``variant``'s pretrained backbone weights, or ``FileNotFoundError``.

    ``file`` (from ``pretrained_cfg_overlay=dict(file=...)``) wins and must exist. Otherwise a timm model's weights
    (``timm_name``, e.g. ``"resnet18"``) are searched with :func:`find_pretrained_file`, other weights with
    :func:`find_local_weights` (``stems``, ``hub_ids``). The error lists every place looked at and ``how_to_get``.
    """
    if file is not None:
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{variant}: pretrained_cfg_overlay file={file!r} does not exist")
        return file
    cache = None if cache_dir is None else str(cache_dir)
    if timm_name is not None:
        path, looked = find_pretrained_file(timm_name, cache_dir=cache)
    else:
        path, looked = find_local_weights(stems, hub_ids, cache_dir=cache)
    if path is None:
        raise FileNotFoundError(
            f"{variant}(pretrained=True) needs ImageNet-pretrained backbone weights on disk (no download is "
            "attempted). Looked at:\n  " + "\n  ".join(looked) + "\n" + how_to_get + f"\nthen set "
            f"{PRETRAINED_DIR_ENV}=<dir> (the folder holding the file), or pass "
            "pretrained_cfg_overlay=dict(file='/path/to/weights')."
        )
    return path


def timm_how_to_get(timm_name: str) -> str:
    """Instructions, for the error message, to fetch a timm model's default weights on another machine."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(timm_name)
    hub = getattr(cfg, "hf_hub_id", None) or f"timm/{timm_name}"
    return (f"To get them, on a machine with network access run\n  hf download {hub} model.safetensors "
            f"--local-dir <dir>/{hub.split('/', 1)[1]}")


def load_into(module: nn.Module, state_dict: Dict[str, torch.Tensor], *, source: str,
              ignore: Iterable[str] = (), in_chans: int = 3, first_conv: Optional[str] = None) -> None:
    """Load ``state_dict`` into ``module`` in place, checking that it fits.

    Keys starting with one of the ``ignore`` prefixes (e.g. the source model's classifier or its layers past the
    point where we truncate it) are dropped. When ``in_chans != 3``, the ``first_conv`` weight is adapted with
    timm's ``adapt_input_conv`` (sum to grey, or repeat). Raises ``RuntimeError`` naming ``source`` and the
    offending keys if any weight is missing, unexpected or of the wrong shape.
    """
    ignore = tuple(ignore)
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(ignore)} if ignore else dict(state_dict)
    if first_conv is not None and in_chans != 3 and f"{first_conv}.weight" in state_dict:
        from timm.models import adapt_input_conv

        key = f"{first_conv}.weight"
        state_dict[key] = adapt_input_conv(in_chans, state_dict[key])
    own = module.state_dict()
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state_dict.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if wrong or missing or unexpected:
        raise RuntimeError(
            f"{source} does not match the model: missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}, wrong shapes {wrong[:8]}"
        )
    module.load_state_dict(state_dict, strict=True)


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """A checkpoint's state dict (safetensors or torch; ``state_dict``/``model`` key and ``module.`` prefixes
    handled by timm's ``load_state_dict``); torch files are read with ``weights_only=True``."""
    from timm.models import load_state_dict

    try:
        return load_state_dict(path, use_ema=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"weights file {path!r} does not exist") from None
