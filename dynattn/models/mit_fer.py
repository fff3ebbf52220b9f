"""MiT-FER (``mit_fer``): a SegFormer Mix Transformer encoder with a multi-scale fusion block, registered with timm.

Paper: Farshad Safavi, Kulin Patel, Ramana Kumar Vinjamuri, "Towards Efficient Deep Learning Models for Facial
Expression Recognition using Transformers", IEEE 19th International Conference on Body Sensor Networks (BSN 2023),
doi:10.1109/BSN58485.2023.10331041 (no arXiv version or public code that we could find). Reported: 3.45M
parameters, 0.425 GFLOPs at 224 px (its FLOPs are multiply-accumulates of the convs and linears: ours are 0.42
GMACs for those, 0.46 with the attention matmuls; see ``python -m dynattn.models.flops``). The encoder is
SegFormer's MiT-B0 (Xie et al., "SegFormer: Simple and Efficient Design for Semantic Segmentation with
Transformers", NeurIPS 2021, arXiv:2105.15203; code github.com/NVlabs/SegFormer).

What we implement:

* **MiT-B0 encoder**, four stages at 1/4, 1/8, 1/16, 1/32 of the input with 32/64/160/256 channels, 2 blocks
  each: overlapping patch embedding (conv 7x7 stride 4, then 3x3 stride 2; padding ``k // 2``; LayerNorm);
  efficient self-attention with 1/2/5/8 heads whose keys/values come from a spatially reduced sequence
  (conv with kernel = stride = 8/4/2/1, then LayerNorm); Mix-FFN (Linear, 3x3 depthwise conv, GELU, Linear;
  hidden ratio 4); pre-norm residual blocks with stochastic depth (``drop_path_rate`` 0.1, linear over the 8
  blocks, SegFormer's default) and a LayerNorm at the end of each stage. Parameter names follow the SegFormer
  code (``patch_embed{i}``, ``block{i}``, ``norm{i}``; ``attn.q``, ``attn.kv``, ``attn.sr``; ``mlp.fc1``,
  ``mlp.dwconv.dwconv``, ``mlp.fc2``) so its ImageNet ``mit_b0.pth`` loads unchanged; Hugging Face
  ``nvidia/mit-b0`` checkpoints are converted on load.
* **Fusion block**: stage 1-3 maps are max-pooled to the stage-4 grid (kernel = stride = 8, 4, 2 at inputs that
  are multiples of 32), concatenated with stage 4 (32+64+160+256 = 512 channels), a 1x1 conv to 256 channels
  gives ``F_R``, and ``F_N = F4 + F4 * F_R``.
* **Head**: global average pooling, dropout (``drop_rate``, default 0.4), Linear(256, num_classes).

Model kwargs: ``drop_rate`` (0.4), ``drop_path_rate`` (0.1), ``attn_drop_rate`` (0.0), ``in_chans`` (3),
``img_size`` (accepted and recorded in ``pretrained_cfg``; the network has no position embedding and takes any
input of at least 32 px), ``num_classes`` (0 gives the pooled 256-d features).

``pretrained=True`` loads ImageNet-1k MiT-B0 encoder weights from local disk only: ``pretrained_cfg_overlay=
dict(file=...)``, else ``$DYNATTN_PRETRAINED_DIR`` (``mit_b0.pth`` from the SegFormer release, or ``mit-b0/``
holding Hugging Face's ``nvidia/mit-b0`` files), else the Hugging Face cache (``nvidia/mit-b0``).

Deviations and choices (the paper gives no code, so these are ours where it is silent):

* The issue text lists stage channels 32/64/128/256; MiT-B0 (which the paper says it uses) has 160 at stage 3,
  and only 160 reproduces the paper's 3.45M parameters (128 would give about 3.2M), so we use 160.
* Stage 1-3 pooling uses ``adaptive_max_pool2d`` to the stage-4 size: identical to max-pooling with
  kernel = stride = 8/4/2 when the input side is a multiple of 32 (224 px: 56/28/14 -> 7), and still aligned
  with stage 4 at other sizes (windows then differ in size by at most one).
* ``F_R`` is the plain 1x1 conv output (with bias); the paper names no normalisation or activation there.
* Initialisation follows SegFormer (truncated normal 0.02 for linears, fan-out normal for convs); the
  classifier and fusion conv are initialised the same way. Self-attention uses
  ``F.scaled_dot_product_attention`` (same maths as SegFormer's explicit softmax).
* LayerNorm eps: 1e-6 in blocks and stage norms, PyTorch's default 1e-5 in the patch embeddings and the
  spatial-reduction norm, as in the SegFormer code.
"""

from __future__ import annotations

import re
from typing import Dict, List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, trunc_normal_
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
)

__all__ = ["MiTFER", "MixTransformer", "convert_mit_state_dict", "mit_fer"]

_MIN_SIZE = 32
_HUB_IDS = ("nvidia/mit-b0",)
_STEMS = ("mit_b0", "mit-b0")


class OverlapPatchEmbed(nn.Module):
    """Overlapping patch embedding: ``(B, C_in, H, W) -> ((B, H'*W', C), H', W')``, conv stride ``stride``."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, stride: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride, padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        H, W = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), H, W


class EfficientSelfAttention(nn.Module):
    """Multi-head self-attention whose keys/values come from the sequence reduced ``sr_ratio`` times per side."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"MiT: dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, sr_ratio, sr_ratio)
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = x.shape
        h = self.num_heads
        q = self.q(x).reshape(B, N, h, C // h).transpose(1, 2)
        if self.sr_ratio > 1:
            x = self.sr(x.transpose(1, 2).reshape(B, C, H, W)).flatten(2).transpose(1, 2)
            x = self.norm(x)
        k, v = self.kv(x).reshape(B, -1, 2, h, C // h).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))


class _DWConv(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = x.shape
        return self.dwconv(x.transpose(1, 2).reshape(B, C, H, W)).flatten(2).transpose(1, 2)


class MixFFN(nn.Module):
    """Mix-FFN: Linear, 3x3 depthwise conv on the token grid, GELU, Linear."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = _DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = self.drop(self.act(self.dwconv(self.fc1(x), H, W)))
        return self.drop(self.fc2(x))


class MiTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int, drop_path: float = 0.0,
                 attn_drop: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio, attn_drop=attn_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MixFFN(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), H, W))
        return x + self.drop_path(self.mlp(self.norm2(x), H, W))


class MixTransformer(nn.Module):
    """SegFormer's hierarchical Mix Transformer encoder (MiT-B0 by default).

    ``forward(x)``: ``(B, in_chans, H, W)`` -> list of 4 maps ``(B, embed_dims[i], ~H/2^(i+2), ~W/2^(i+2))``.
    """

    def __init__(self, *, in_chans: int = 3, embed_dims: Sequence[int] = (32, 64, 160, 256),
                 num_heads: Sequence[int] = (1, 2, 5, 8), mlp_ratios: Sequence[float] = (4, 4, 4, 4),
                 depths: Sequence[int] = (2, 2, 2, 2), sr_ratios: Sequence[int] = (8, 4, 2, 1),
                 drop_path_rate: float = 0.1, attn_drop_rate: float = 0.0):
        super().__init__()
        self.embed_dims = tuple(embed_dims)
        n = sum(depths)
        rates = [drop_path_rate * i / max(n - 1, 1) for i in range(n)]  # linear, as torch.linspace
        cur = 0
        for i in range(4):
            patch, stride = (7, 4) if i == 0 else (3, 2)
            in_dim = in_chans if i == 0 else embed_dims[i - 1]
            setattr(self, f"patch_embed{i + 1}", OverlapPatchEmbed(in_dim, embed_dims[i], patch, stride))
            setattr(self, f"block{i + 1}", nn.ModuleList(
                MiTBlock(embed_dims[i], num_heads[i], mlp_ratios[i], sr_ratios[i], rates[cur + j], attn_drop_rate)
                for j in range(depths[i])))
            setattr(self, f"norm{i + 1}", nn.LayerNorm(embed_dims[i], eps=1e-6))
            cur += depths[i]

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        outs = []
        for i in range(1, 5):
            x, H, W = getattr(self, f"patch_embed{i}")(x)
            for block in getattr(self, f"block{i}"):
                x = block(x, H, W)
            x = getattr(self, f"norm{i}")(x)
            x = x.transpose(1, 2).reshape(x.shape[0], -1, H, W)
            outs.append(x)
        return outs


def _init_weights(m: nn.Module) -> None:
    # SegFormer's initialisation
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class MiTFER(nn.Module):
    """MiT-B0 encoder + fusion block + pooled linear classifier (see the module docstring).

    ``forward(x)``: ``(B, in_chans, H, W)`` float -> logits ``(B, num_classes)``.
    """

    def __init__(self, num_classes: int = 7, *, in_chans: int = 3, img_size: Union[int, Tuple[int, int]] = 224,
                 drop_rate: float = 0.4, drop_path_rate: float = 0.1, attn_drop_rate: float = 0.0):
        super().__init__()
        self.num_classes = check_num_classes(num_classes, minimum=0, model="mit_fer")
        self.img_size = check_img_size(img_size, minimum=_MIN_SIZE, model="mit_fer")
        for arg, value in (("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate),
                           ("attn_drop_rate", attn_drop_rate)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
                raise ValueError(f"mit_fer: {arg} must be in [0, 1), got {value!r}")
        self.in_chans = in_chans
        self.encoder = MixTransformer(in_chans=in_chans, drop_path_rate=drop_path_rate,
                                      attn_drop_rate=attn_drop_rate)
        dims = self.encoder.embed_dims
        self.num_features = dims[-1]
        self.fusion = nn.Conv2d(sum(dims), dims[-1], 1)  # F_R
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        check_num_classes(num_classes, minimum=0, model="mit_fer")
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.head.apply(_init_weights)

    def forward_stages(self, x: torch.Tensor) -> List[torch.Tensor]:
        """The four encoder stage maps (``F1..F4``)."""
        check_input(x, self.in_chans, _MIN_SIZE, "mit_fer")
        return self.encoder(x)

    def fuse(self, stages: Sequence[torch.Tensor]) -> torch.Tensor:
        """Fusion block: ``F_N = F4 + F4 * conv1x1(cat(maxpool(F1), maxpool(F2), maxpool(F3), F4))``."""
        f4 = stages[-1]
        pooled = [F.adaptive_max_pool2d(f, f4.shape[-2:]) for f in stages[:-1]]
        f_r = self.fusion(torch.cat(pooled + [f4], dim=1))
        return f4 + f4 * f_r

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Fused map ``F_N`` ``(B, 256, ~H/32, ~W/32)``."""
        return self.fuse(self.forward_stages(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x.mean(dim=(2, 3)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------------------------------------- weights


def convert_mit_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """MiT encoder weights in our (= the SegFormer release's) names, from either the SegFormer release
    (``patch_embed1.proj.weight``, ...; ``backbone.`` prefixes of segmentation checkpoints dropped) or Hugging Face
    transformers (``segformer.encoder.patch_embeddings.0.proj.weight``, ..., separate key/value linears).
    Classifier and decode-head weights are dropped.
    """
    out: Dict[str, torch.Tensor] = {}
    kv: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key.startswith(("head.", "classifier.", "decode_head.", "auxiliary_head.")):
            continue
        key = key.removeprefix("backbone.")
        if key.startswith("segformer."):
            key = key.removeprefix("segformer.").removeprefix("encoder.")
            key = re.sub(r"^patch_embeddings\.(\d)\.", lambda m: f"patch_embed{int(m.group(1)) + 1}.", key)
            key = re.sub(r"^block\.(\d)\.", lambda m: f"block{int(m.group(1)) + 1}.", key)
            key = re.sub(r"^layer_norm\.(\d)\.", lambda m: f"norm{int(m.group(1)) + 1}.", key)
            for hf, ours in (("layer_norm_1", "norm1"), ("layer_norm_2", "norm2"),
                             ("attention.self.query", "attn.q"), ("attention.self.sr", "attn.sr"),
                             ("attention.self.layer_norm", "attn.norm"), ("attention.output.dense", "attn.proj"),
                             ("mlp.dense1", "mlp.fc1"), ("mlp.dense2", "mlp.fc2"), ("layer_norm", "norm")):
                key = key.replace(hf, ours)
            m = re.match(r"^(.*)\.attention\.self\.(key|value)\.(weight|bias)$", key)
            if m:  # HF splits SegFormer's fused kv linear: re-fuse, key rows first
                kv.setdefault(f"{m.group(1)}.attn.kv.{m.group(3)}", {})[m.group(2)] = value
                continue
        out[key] = value
    for key, parts in kv.items():
        if set(parts) != {"key", "value"}:
            raise RuntimeError(f"convert_mit_state_dict: {key} has only {sorted(parts)} of key/value")
        out[key] = torch.cat([parts["key"], parts["value"]], dim=0)
    return out


def _create_mit_fer(variant: str, pretrained: bool = False, **kwargs) -> MiTFER:
    overlay = kwargs.pop("pretrained_cfg_overlay", None) or {}
    file = overlay.get("file") or None
    cache_dir = kwargs.get("cache_dir")

    def build(**model_kwargs) -> MiTFER:
        model = MiTFER(**model_kwargs)
        if pretrained:
            path = resolve_weights_file(
                variant, file=file, cache_dir=cache_dir, stems=_STEMS, hub_ids=_HUB_IDS,
                how_to_get="To get them, on a machine with network access run\n  hf download nvidia/mit-b0 "
                           "--local-dir <dir>/mit-b0\n(or take mit_b0.pth from the SegFormer release)")
            load_into(model.encoder, convert_mit_state_dict(read_state_dict(path)), source=path,
                      in_chans=model.in_chans, first_conv="patch_embed1.proj")
        return model

    model = build_model_with_cfg(build, variant, pretrained=False, pretrained_cfg_overlay=overlay, **kwargs)
    set_input_size(model, model.in_chans, model.img_size)
    return model


default_cfgs = generate_default_cfgs({
    "mit_fer": {
        "url": "",
        "num_classes": 7,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "encoder.patch_embed1.proj",
        "classifier": "head",
        "paper_ids": "doi:10.1109/BSN58485.2023.10331041",
    },
})


@register_model
def mit_fer(pretrained: bool = False, **kwargs) -> MiTFER:
    """MiT-FER (Safavi et al., BSN 2023): MiT-B0 encoder + multi-scale fusion block (3.45M parameters)."""
    return _create_mit_fer("mit_fer", pretrained=pretrained, **kwargs)
