"""PAtt-Lite (``patt_lite``): truncated MobileNetV1 + patch extraction + attention classifier, registered with timm.

Paper: Jia Le Ngwe, Kian Ming Lim, Chin Poo Lee, Thian Song Ong, "PAtt-Lite: Lightweight Patch and Attention
MobileNet for Challenging Facial Expression Recognition", arXiv:2306.09626 (2023); IEEE Access 12 (2024).
Authors' code: github.com/JLREx/PAtt-Lite (``patt-lite-notebook.ipynb``, Keras).

What we implement:

* **Backbone**: MobileNetV1 (width 1.0, ReLU6) truncated after the depthwise conv (+ BN + ReLU6) of its 9th
  depthwise-separable block (Keras layer ``conv_dw_9_relu``, the notebook's ``backbone.layers[-29]``):
  ``(B, 512, 14, 14)`` at 224 px. Built from timm's ``mobilenetv1_100`` (its ``blocks[3][3]`` is block 9), so timm's
  ImageNet weights load by name.
* **Patch extraction**: depthwise-separable conv 512->256, kernel 4 stride 4 with TensorFlow "same" padding
  (the 14x14 map is zero-padded to 16x16, one row/column on each side, so it splits into 4x4 patches of 4x4) +
  ReLU; depthwise-separable conv 256->256, kernel 2 stride 2, no padding + ReLU (2x2 map); 1x1 conv 256->256 +
  ReLU. Each separable conv is a bias-free depthwise conv followed by a pointwise conv with bias, no norm and no
  activation in between (Keras ``SeparableConv2D``).
* **Attention classifier**: dropout, Linear(256, 32) + ReLU + BatchNorm (Keras defaults: momentum 0.01 in
  PyTorch terms, eps 1e-3), dot-product self-attention with a learnable scalar scale initialised to 1 and no
  projections (Keras ``Attention(use_scale=True)`` with query = key = value), global average pooling, dropout,
  Linear(32, num_classes).

Model kwargs: ``drop_rate`` (0.1: the dropout before the attention classifier; the notebook uses 0.1 in its first
stage and 0.2 when fine-tuning), ``attn_drop_rate`` (``None`` = ``drop_rate``: the dropout after attention,
which the notebook adds when fine-tuning), ``in_chans`` (3), ``img_size`` (accepted and recorded in
``pretrained_cfg``; the network is size-agnostic: the "same" padding adapts, and inputs of at least 65 px give
at least one patch token; 224 px gives 2x2 = 4 tokens), ``num_classes`` (0 gives the pooled 32-d features).

``pretrained=True`` loads timm's ImageNet ``mobilenetv1_100`` weights (``mobilenetv1_100.ra4_e3600_r224_in1k``;
only the layers we keep) from ``pretrained_cfg_overlay=dict(file=...)``, ``$DYNATTN_PRETRAINED_DIR`` or the
Hugging Face cache; never downloaded.

Deviations from the paper and from the authors' code:

* **Attention over the 4 patch tokens, not across the batch.** The published notebook global-average-pools the
  patch map to one 32-d vector per image *before* ``keras.layers.Attention``, which on 2-D inputs attends over
  the batch axis: an image's logits depend on the other images in its batch (a known bug). We keep the patch
  tokens apart, apply the pre-classification Linear+ReLU+BN per token (BN statistics over all tokens of the
  batch), attend over each image's 4 tokens, and move the global average pooling after the attention. In eval
  mode an image's logits depend on that image only.
* Backbone weights are timm's PyTorch MobileNetV1 (ImageNet-1k, "ra4" recipe, normalisation mean = std = 0.5,
  i.e. inputs scaled to [-1, 1] like Keras' ``mobilenet.preprocess_input``) instead of Keras' ImageNet weights;
  timm pads the stride-2 convs symmetrically where Keras pads bottom/right only.
* New layers use Keras' default initialisation (Glorot-uniform weights, zero biases).
* The notebook's two-stage recipe (frozen backbone, then fine-tuning the last 59 layers with BN frozen, Adam with
  gradient clipping, class-weighted loss) and its in-model resizing/augmentation belong to the training CLI and
  are not part of the model; the final softmax is left to the loss (the model returns logits).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from ._layers import (
    check_img_size,
    check_input,
    check_num_classes,
    load_into,
    read_state_dict,
    resolve_weights_file,
    set_input_size,
    timm_how_to_get,
)

__all__ = ["PAttLite", "patt_lite", "tf_same_pad"]

_MIN_SIZE = 65  # 65 px -> 5x5 backbone map -> 2x2 after the stride-4 "same" conv -> 1 token
_TIMM_BACKBONE = "mobilenetv1_100"


def tf_same_pad(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """Zero-pad ``(B, C, H, W)`` as TensorFlow's ``padding="same"`` does for a ``kernel``/``stride`` conv: to
    ``ceil(H / stride)`` outputs, the odd pixel going to the bottom/right."""
    pads = []
    for size in (x.shape[-1], x.shape[-2]):  # F.pad order: last dim first
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


class SeparableConv2d(nn.Module):
    """Keras ``SeparableConv2D``: bias-free depthwise conv, then pointwise conv with bias (no norm in between)."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int, same_pad: bool):
        super().__init__()
        self.kernel, self.stride, self.same_pad = kernel, stride, same_pad
        self.conv_dw = nn.Conv2d(in_chs, in_chs, kernel, stride, groups=in_chs, bias=False)
        self.conv_pw = nn.Conv2d(in_chs, out_chs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.same_pad:
            x = tf_same_pad(x, self.kernel, self.stride)
        return self.conv_pw(self.conv_dw(x))


class _DepthwiseOnly(nn.Module):
    """The first half of a timm depthwise-separable block (same parameter names): depthwise conv + BN + ReLU6."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.conv_dw = block.conv_dw
        self.bn1 = block.bn1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn1(self.conv_dw(x))


class _TruncatedMobileNetV1(nn.Module):
    """timm ``mobilenetv1_100`` up to block 9's depthwise conv; parameter names are timm's."""

    def __init__(self, in_chans: int):
        super().__init__()
        import timm

        full = timm.create_model(_TIMM_BACKBONE, pretrained=False, num_classes=0, in_chans=in_chans)
        self.conv_stem = full.conv_stem
        self.bn1 = full.bn1
        # timm stages hold Keras blocks 1 | 2-3 | 4-5 | 6-11 | 12-13: block 9 is blocks[3][3]
        stage3 = nn.Sequential(*list(full.blocks[3][:3]), _DepthwiseOnly(full.blocks[3][3]))
        self.blocks = nn.Sequential(*list(full.blocks[:3]), stage3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.bn1(self.conv_stem(x)))


def _glorot(m: nn.Module) -> None:
    if isinstance(m, (nn.Conv2d, nn.Linear)):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class PAttLite(nn.Module):
    """PAtt-Lite with per-image attention over its patch tokens (see the module docstring).

    ``forward(x)``: ``(B, in_chans, H, W)`` float -> logits ``(B, num_classes)``.
    """

    def __init__(self, num_classes: int = 7, *, in_chans: int = 3, img_size: Union[int, Tuple[int, int]] = 224,
                 drop_rate: float = 0.1, attn_drop_rate: Optional[float] = None):
        super().__init__()
        self.num_classes = check_num_classes(num_classes, minimum=0, model="patt_lite")
        self.img_size = check_img_size(img_size, minimum=_MIN_SIZE, model="patt_lite")
        attn_drop_rate = drop_rate if attn_drop_rate is None else attn_drop_rate
        for arg, value in (("drop_rate", drop_rate), ("attn_drop_rate", attn_drop_rate)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
                raise ValueError(f"patt_lite: {arg} must be in [0, 1), got {value!r}")
        self.in_chans = in_chans
        self.num_features = 32
        self.backbone = _TruncatedMobileNetV1(in_chans)
        self.patch_extraction = nn.Sequential(
            SeparableConv2d(512, 256, 4, 4, same_pad=True), nn.ReLU(),
            SeparableConv2d(256, 256, 2, 2, same_pad=False), nn.ReLU(),
            nn.Conv2d(256, 256, 1), nn.ReLU(),
        )
        self.drop = nn.Dropout(drop_rate)
        self.pre_classification = nn.Linear(256, 32)
        self.pre_norm = nn.BatchNorm1d(32, eps=1e-3, momentum=0.01)  # Keras BatchNormalization defaults
        self.attn_scale = nn.Parameter(torch.ones(()))
        self.attn_drop = nn.Dropout(attn_drop_rate)
        self.head = nn.Linear(32, num_classes) if num_classes > 0 else nn.Identity()
        for module in (self.patch_extraction, self.pre_classification, self.head):
            module.apply(_glorot)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        check_num_classes(num_classes, minimum=0, model="patt_lite")
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.head.apply(_glorot)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Patch feature map ``(B, 256, h, w)`` (2x2 at 224 px)."""
        check_input(x, self.in_chans, _MIN_SIZE, "patt_lite")
        return self.patch_extraction(self.backbone(x))

    def attend(self, tokens: torch.Tensor) -> torch.Tensor:
        """Pre-classification and self-attention per image: ``(B, N, 256) -> (B, N, 32)``."""
        B, N, _ = tokens.shape
        t = F.relu(self.pre_classification(self.drop(tokens)))
        t = self.pre_norm(t.reshape(B * N, -1)).reshape(B, N, -1)
        scores = self.attn_scale * (t @ t.transpose(1, 2))  # (B, N, N): within one image only
        return scores.softmax(dim=-1) @ t

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = self.attn_drop(self.attend(x.flatten(2).transpose(1, 2)).mean(dim=1))
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _create_patt_lite(variant: str, pretrained: bool = False, **kwargs) -> PAttLite:
    overlay = kwargs.pop("pretrained_cfg_overlay", None) or {}
    file = overlay.get("file") or None
    cache_dir = kwargs.get("cache_dir")

    def build(**model_kwargs) -> PAttLite:
        model = PAttLite(**model_kwargs)
        if pretrained:
            path = resolve_weights_file(variant, file=file, cache_dir=cache_dir, timm_name=_TIMM_BACKBONE,
                                        how_to_get=timm_how_to_get(_TIMM_BACKBONE))
            # the layers past block 9's depthwise conv are not part of PAtt-Lite
            dropped = ("blocks.3.3.conv_pw.", "blocks.3.3.bn2.", "blocks.3.4.", "blocks.3.5.", "blocks.4.",
                       "conv_head.", "bn2.", "classifier.")
            load_into(model.backbone, read_state_dict(path), source=path, ignore=dropped,
                      in_chans=model.in_chans, first_conv="conv_stem")
        return model

    model = build_model_with_cfg(build, variant, pretrained=False, pretrained_cfg_overlay=overlay, **kwargs)
    set_input_size(model, model.in_chans, model.img_size)
    return model


default_cfgs = generate_default_cfgs({
    "patt_lite": {
        "url": "",
        "num_classes": 7,
        "input_size": (3, 224, 224),
        "pool_size": (2, 2),
        "crop_pct": 1.0,
        "interpolation": "bilinear",  # Keras Resizing default
        "fixed_input_size": False,
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "first_conv": "backbone.conv_stem",
        "classifier": "head",
        "paper_ids": "arXiv:2306.09626",
    },
})


@register_model
def patt_lite(pretrained: bool = False, **kwargs) -> PAttLite:
    """PAtt-Lite (Ngwe et al.): MobileNetV1 to block 9 + patch extraction + attention over 4 patch tokens."""
    return _create_patt_lite(variant="patt_lite", pretrained=pretrained, **kwargs)
