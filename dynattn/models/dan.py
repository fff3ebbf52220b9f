"""DAN, "Distract Your Attention" (``dan_resnet18``, ``dan_resnet50``), registered with timm.

Paper: Zhengyao Wen, Wenzhong Lin, Tao Wang, Ge Xu, "Distract Your Attention: Multi-head Cross Attention Network
for Facial Expression Recognition", arXiv:2109.07270 (2021); journal version in Biomimetics 8(2):199 (2023).
Authors' code: github.com/yaoing/DAN (``networks/dan.py``, ``rafdb.py``).

What we implement (the paper's model as the authors' code defines it):

* **Feature clustering network**: a ResNet-18 trunk (everything before global pooling and fc; ``(B, 512, 7, 7)`` at
  224 px) and the **affinity loss** ``L_af = mean_i ||f_i - c_{y_i}||^2 / sum_d Var_c(c[:, d])`` on the globally
  average-pooled trunk features ``f_i``, with learnable class centres ``c`` (``model.centers``, an
  ``nn.Parameter``, so the optimizer gets them; initialised from N(0, 1) like the authors' code); the per-sample
  term is clamped to ``[1e-12, 1e12]`` and ``Var`` is the unbiased variance over centres.
* **Multi-head cross attention network**: ``num_heads`` (4) parallel heads, each a spatial attention unit (1x1 conv
  to 256 channels + BN; then 3x3, 1x3 and 3x1 convs back to 512 channels, each + BN, summed, ReLU; summed over
  channels to one map that multiplies the input, no sigmoid) followed by a channel attention unit (global average
  pooling, Linear 512->32, BN, ReLU, Linear 32->512, sigmoid, multiplied into the pooled vector); initialised
  as in the authors' code (conv kaiming-normal fan-out, linear N(0, 0.001)).
* **Attention fusion network**: the heads ``(B, K, 512)`` go through a log-softmax across the head axis (when
  ``K > 1``), are summed over heads, then Linear(512, num_classes) and BatchNorm1d(num_classes) give the logits.
  The **partition loss** ``L_pt = log(1 + K / (mean_{b,d} Var_k(heads[b, :, d]) + eps))`` (unbiased variance
  across the log-softmaxed heads, one log of the mean as in the authors' code; 0 when ``K = 1``).
* Losses: ``forward(x, targets)`` in training mode returns ``(logits, {"affinity": w_af * L_af,
  "partition": w_pt * L_pt})``; the training loop adds cross-entropy (weights 1.0 by default, the paper's).

Model kwargs (``timm.create_model("dan_resnet18", num_classes=7, ...)``): ``num_heads`` (4), ``affinity_weight``
(1.0), ``partition_weight`` (1.0), ``num_centers`` (``None`` = ``num_classes``), ``attn_dim`` (256: hidden channels
of the spatial attention), ``drop_rate`` (0.0), ``in_chans`` (3), ``img_size`` (accepted and recorded in
``pretrained_cfg``; the network is size-agnostic: any input of at least 32 px gives a ``ceil(H/32) x ceil(W/32)``
trunk map), ``backbone_weights`` (path, see below).

Weights (never downloaded): ``pretrained=True`` loads timm's ImageNet ResNet-18/50 (``resnet18.a1_in1k`` /
``resnet50.a1_in1k``, same parameter names as torchvision's) from ``pretrained_cfg_overlay=dict(file=...)``,
``$DYNATTN_PRETRAINED_DIR`` or the Hugging Face cache. ``backbone_weights=PATH`` loads the face-pretrained
MS-Celeb-1M ResNet-18 the authors use (``resnet18_msceleb.pth``, a torchvision ResNet-18 under the ``state_dict``
key) and takes precedence over ``pretrained``. :func:`load_dan_checkpoint` loads the authors' released
trained DAN checkpoints (RAF-DB, AffectNet-7/8) into ``dan_resnet18``.

Deviations from the paper and from the authors' code:

* Number of centres: one per class (``num_centers = num_classes``). The authors' ``AffinityLoss`` defaults to 8
  centres and their RAF-DB script keeps 8 for its 7 classes, so an unused 8th centre enters the variance
  denominator; pass ``num_centers=8`` to reproduce that.
* The affinity distance is computed as ``sum_d (f - c)^2`` directly rather than through the expansion
  ``|f|^2 + |c|^2 - 2 f.c`` (same value, no cancellation error), and clamped per sample rather than on every
  entry of the masked ``(B, C)`` distance matrix (the authors' clamp adds ``1e-12`` per masked-out entry).
* Soft targets: besides class indices ``(B,)``, ``targets`` may be class probabilities ``(B, num_centers)``
  (mixup, FERPlus vote distributions); the distance is then the probability-weighted sum over centres, which
  equals the paper's loss for one-hot targets.
* ``eps = 1e-12`` is added to the mean head variance in the partition loss (the authors' code has none); the
  losses are computed in float32 under autocast.
* ``drop_rate`` (dropout before the fusion classifier, default 0 = none) is our addition for the training CLI.
* ``dan_resnet50`` is our extension (the paper uses ResNet-18 only): the same heads on the 2048-channel ResNet-50
  map, spatial attention hidden width kept at 256 (``attn_dim``), channel attention hidden width 32.
* The trunk is timm's ResNet (identical architecture and parameter names to torchvision's); from random
  initialisation timm zero-initialises the last BN of each residual block. The training recipe (SGD lr 0.1,
  40 epochs, StepLR; centres in the optimizer) belongs to the CLI, not to the model.
"""

from __future__ import annotations

import re
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet
from torch import nn
from torch.nn import init

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

__all__ = ["DAN", "affinity_loss", "partition_loss", "load_dan_checkpoint", "dan_resnet18", "dan_resnet50"]

_MIN_SIZE = 32
_TRUNKS = {
    # variant -> (timm model whose ImageNet weights the trunk takes, block, layers, channels)
    "dan_resnet18": ("resnet18", BasicBlock, (2, 2, 2, 2), 512),
    "dan_resnet50": ("resnet50", Bottleneck, (3, 4, 6, 3), 2048),
}


# ---------------------------------------------------------------------------------------------- losses


def affinity_loss(features: torch.Tensor, targets: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """DAN's affinity loss: squared distance of each feature to its class centre over the centres' spread.

    ``L = mean_i clamp(d_i / sum_d Var_c(centers[:, d]), 1e-12, 1e12)`` with ``d_i = ||f_i - c_{y_i}||^2`` for
    class-index targets, or ``d_i = sum_c p_ic ||f_i - c_c||^2`` for probability targets; ``Var`` is the
    unbiased variance over the centres (``C >= 2``).

    Args:
        features: ``(B, D)`` features, or a ``(B, D, H, W)`` map (global-average-pooled first); any float dtype.
        targets: ``(B,)`` int64 class indices in ``[0, C)``, or ``(B, C)`` float class probabilities.
        centers: ``(C, D)`` class centres.

    Returns:
        A float32 scalar tensor, differentiable in ``features`` and ``centers``.
    """
    if not all(isinstance(t, torch.Tensor) for t in (features, targets, centers)):
        raise TypeError("affinity_loss: features, targets and centers must be tensors")
    if features.dim() == 4:
        features = features.float().mean(dim=(2, 3))
    if features.dim() != 2:
        raise ValueError(f"affinity_loss: features must be (B, D) or (B, D, H, W), got {tuple(features.shape)}")
    if centers.dim() != 2 or centers.shape[1] != features.shape[1] or centers.shape[0] < 2:
        raise ValueError(f"affinity_loss: centers must be (C >= 2, D={features.shape[1]}), got "
                         f"{tuple(centers.shape)}")
    B, C = features.shape[0], centers.shape[0]
    f, c = features.float(), centers.float()
    dist = (f[:, None, :] - c[None, :, :]).pow(2).sum(-1)  # (B, C)
    if targets.dim() == 1 and not targets.is_floating_point():
        if targets.shape[0] != B:
            raise ValueError(f"affinity_loss: targets must have B={B} entries, got {tuple(targets.shape)}")
        if targets.device.type == "cpu" and B and not torch.compiler.is_compiling() \
                and (int(targets.min()) < 0 or int(targets.max()) >= C):
            raise ValueError(f"affinity_loss: class indices must be in [0, {C}), got "
                             f"[{int(targets.min())}, {int(targets.max())}]")
        per_sample = dist.gather(1, targets.long()[:, None]).squeeze(1)
    elif targets.dim() == 2 and targets.is_floating_point():
        if tuple(targets.shape) != (B, C):
            raise ValueError(f"affinity_loss: probability targets must be (B, C)=({B}, {C}), got "
                             f"{tuple(targets.shape)}")
        per_sample = (dist * targets.float()).sum(1)
    else:
        raise ValueError("affinity_loss: targets must be (B,) integer class indices or (B, C) float probabilities, "
                         f"got shape {tuple(targets.shape)} dtype {targets.dtype}")
    spread = c.var(dim=0, unbiased=True).sum()
    return (per_sample / spread).clamp(min=1e-12, max=1e12).mean()


def partition_loss(heads: torch.Tensor, *, eps: float = 1e-12) -> torch.Tensor:
    """DAN's partition loss: ``log(1 + K / (mean_{b,d} Var_k(heads[b, :, d]) + eps))``, 0 when ``K == 1``.

    Pushes the ``K`` attention heads apart (a larger variance across heads lowers it). ``Var`` is unbiased.

    Args:
        heads: ``(B, K, D)``, the heads as DAN's fusion network sees them (after the log-softmax across heads).

    Returns:
        A float32 scalar tensor.
    """
    if not isinstance(heads, torch.Tensor) or heads.dim() != 3:
        raise ValueError(f"partition_loss: heads must be a (B, K, D) tensor, got "
                         f"{tuple(heads.shape) if isinstance(heads, torch.Tensor) else type(heads).__name__}")
    K = heads.shape[1]
    if K == 1:
        return heads.float().sum() * 0.0  # keeps the graph (and DDP) happy
    var = heads.float().var(dim=1, unbiased=True).mean()
    return torch.log1p(K / (var + eps))


# ---------------------------------------------------------------------------------------------- modules


class SpatialAttention(nn.Module):
    """DAN's spatial attention unit: ``(B, C, H, W) -> (B, C, H, W)``, the input times a one-channel map."""

    def __init__(self, channels: int = 512, hidden: int = 256):
        super().__init__()
        self.conv1x1 = nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.BatchNorm2d(hidden))
        self.conv_3x3 = nn.Sequential(nn.Conv2d(hidden, channels, 3, padding=1), nn.BatchNorm2d(channels))
        self.conv_1x3 = nn.Sequential(nn.Conv2d(hidden, channels, (1, 3), padding=(0, 1)), nn.BatchNorm2d(channels))
        self.conv_3x1 = nn.Sequential(nn.Conv2d(hidden, channels, (3, 1), padding=(1, 0)), nn.BatchNorm2d(channels))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1x1(x)
        y = self.relu(self.conv_3x3(y) + self.conv_1x3(y) + self.conv_3x1(y))
        return x * y.sum(dim=1, keepdim=True)


class ChannelAttention(nn.Module):
    """DAN's channel attention unit: ``(B, C, H, W) -> (B, C)``, the pooled vector times a sigmoid gate."""

    def __init__(self, channels: int = 512, hidden: int = 32):
        super().__init__()
        self.attention = nn.Sequential(
            nn.Linear(channels, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, channels), nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(dim=(2, 3))
        return s * self.attention(s)


class CrossAttentionHead(nn.Module):
    """One DAN attention head: spatial then channel attention, ``(B, C, H, W) -> (B, C)``."""

    def __init__(self, channels: int = 512, hidden: int = 256):
        super().__init__()
        self.sa = SpatialAttention(channels, hidden)
        self.ca = ChannelAttention(channels)
        for m in self.modules():  # the authors' initialisation
            if isinstance(m, nn.Conv2d):
                init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                init.ones_(m.weight)
                init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                init.normal_(m.weight, std=0.001)
                if m.bias is not None:
                    init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ca(self.sa(x))


class DAN(nn.Module):
    """Distract Your Attention Network on a ResNet trunk (see the module docstring).

    ``forward(x, targets=None)``: ``x`` ``(B, in_chans, H, W)`` float. Returns logits ``(B, num_classes)``, or, in
    training mode with ``targets`` given, ``(logits, {"affinity": ..., "partition": ...})`` (weighted float32
    scalars to add to the cross-entropy).
    """

    def __init__(
        self,
        num_classes: int = 7,
        *,
        in_chans: int = 3,
        img_size: Union[int, Tuple[int, int]] = 224,
        num_heads: int = 4,
        affinity_weight: float = 1.0,
        partition_weight: float = 1.0,
        num_centers: Optional[int] = None,
        attn_dim: int = 256,
        drop_rate: float = 0.0,
        trunk: str = "resnet18",
    ):
        super().__init__()
        name = f"dan_{trunk}"
        if name not in _TRUNKS:
            raise ValueError(f"DAN: trunk must be one of {[k[4:] for k in _TRUNKS]}, got {trunk!r}")
        self.num_classes = check_num_classes(num_classes, minimum=1, model=name)
        if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
            raise ValueError(f"{name}: num_heads must be an int >= 1, got {num_heads!r}")
        num_centers = max(2, num_classes) if num_centers is None else num_centers
        if not isinstance(num_centers, int) or num_centers < max(2, num_classes):
            raise ValueError(f"{name}: num_centers must be an int >= max(2, num_classes={num_classes}), got "
                             f"{num_centers!r}")
        for arg, value in (("affinity_weight", affinity_weight), ("partition_weight", partition_weight),
                           ("drop_rate", drop_rate)):
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name}: {arg} must be a number >= 0, got {value!r}")
        if not 0 <= drop_rate < 1:
            raise ValueError(f"{name}: drop_rate must be in [0, 1), got {drop_rate!r}")
        self.img_size = check_img_size(img_size, minimum=_MIN_SIZE, model=name)
        self.in_chans = in_chans
        _, block, layers, channels = _TRUNKS[name]
        self.num_features = channels
        self.num_heads = num_heads
        self.affinity_weight = float(affinity_weight)
        self.partition_weight = float(partition_weight)

        self.backbone = ResNet(block, layers, num_classes=0, in_chans=in_chans, global_pool="")
        self.heads = nn.ModuleList(CrossAttentionHead(channels, attn_dim) for _ in range(num_heads))
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(channels, num_classes)
        self.bn = nn.BatchNorm1d(num_classes)
        self.centers = nn.Parameter(torch.randn(num_centers, channels))

    # timm-style API -----------------------------------------------------------------------------------------

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """New fusion classifier (Linear + BatchNorm1d) and, when the centre count followed it, new centres."""
        check_num_classes(num_classes, minimum=1, model="DAN")
        device = self.fc.weight.device
        if self.centers.shape[0] == self.num_classes or self.centers.shape[0] < max(2, num_classes):
            self.centers = nn.Parameter(torch.randn(max(2, num_classes), self.num_features, device=device))
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes, device=device)
        self.bn = nn.BatchNorm1d(num_classes, device=device)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Trunk feature map ``(B, C, ceil(H/32), ceil(W/32))`` (``C`` = 512 for ResNet-18)."""
        check_input(x, self.in_chans, _MIN_SIZE, type(self).__name__)
        return self.backbone.forward_features(x)

    def forward_attention(self, features: torch.Tensor) -> torch.Tensor:
        """The attention heads ``(B, K, C)``, log-softmaxed across heads when ``K > 1`` (as the partition loss and
        the fusion network see them)."""
        heads = torch.stack([head(features) for head in self.heads], dim=1)
        return F.log_softmax(heads, dim=1) if self.num_heads > 1 else heads

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits ``(B, num_classes)`` from the trunk map (or the fused ``(B, C)`` vector if ``pre_logits``)."""
        return self._fuse(self.forward_attention(features), pre_logits)

    def _fuse(self, heads: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        fused = self.head_drop(heads.sum(dim=1))
        return fused if pre_logits else self.bn(self.fc(fused))

    def forward(self, x: torch.Tensor, targets: Optional[torch.Tensor] = None):
        features = self.forward_features(x)
        heads = self.forward_attention(features)
        logits = self._fuse(heads)
        if not (self.training and targets is not None):
            return logits
        if targets.is_floating_point() and targets.dim() == 2 and targets.shape[1] < self.centers.shape[0]:
            targets = F.pad(targets, (0, self.centers.shape[0] - targets.shape[1]))  # no mass on extra centres
        aux = {
            "affinity": self.affinity_weight * affinity_loss(features, targets, self.centers),
            "partition": self.partition_weight * partition_loss(heads),
        }
        return logits, aux


# ---------------------------------------------------------------------------------------------- weights


def _remap_dan_key(key: str) -> str:
    # the authors' model: features = Sequential(resnet.children()[:-2]) -> conv1, bn1, relu, maxpool, layer1..4
    key = re.sub(r"^features\.0\.", "backbone.conv1.", key)
    key = re.sub(r"^features\.1\.", "backbone.bn1.", key)
    key = re.sub(r"^features\.([4-7])\.", lambda m: f"backbone.layer{int(m.group(1)) - 3}.", key)
    return re.sub(r"^cat_head(\d+)\.", r"heads.\1.", key)


def load_dan_checkpoint(model: DAN, path: str) -> None:
    """Load one of the authors' trained DAN checkpoints (github.com/yaoing/DAN, ``model_state_dict`` key: keys
    ``features.*``, ``cat_head{i}.*``, ``fc.*``, ``bn.*``) into a ``dan_resnet18`` of the same ``num_classes`` and
    ``num_heads``, in place. The affinity-loss centres are not in those files and are left as they are.
    Raises ``RuntimeError`` naming the mismatching keys.
    """
    import os

    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_dan_checkpoint: {path!r} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt.get("model_state_dict", ckpt.get("state_dict", ckpt)) if isinstance(ckpt, dict) else ckpt
    state = {_remap_dan_key(k.removeprefix("module.")): v for k, v in state.items()}
    state["centers"] = model.centers.detach()
    load_into(model, state, source=path)


def _create_dan(variant: str, pretrained: bool = False, **kwargs) -> DAN:
    timm_name = _TRUNKS[variant][0]
    overlay = kwargs.pop("pretrained_cfg_overlay", None) or {}
    file = overlay.get("file") or None
    cache_dir = kwargs.get("cache_dir")
    backbone_weights = kwargs.pop("backbone_weights", None)

    def build(**model_kwargs) -> DAN:
        model = DAN(trunk=timm_name, **model_kwargs)
        in_chans = model.in_chans
        if backbone_weights is not None:  # the face-pretrained (MS-Celeb-1M) trunk
            load_into(model.backbone, read_state_dict(str(backbone_weights)), source=str(backbone_weights),
                      ignore=("fc.",), in_chans=in_chans, first_conv="conv1")
        elif pretrained:
            path = resolve_weights_file(variant, file=file, cache_dir=cache_dir, timm_name=timm_name,
                                        how_to_get=timm_how_to_get(timm_name))
            load_into(model.backbone, read_state_dict(path), source=path, ignore=("fc.",), in_chans=in_chans,
                      first_conv="conv1")
        return model

    model = build_model_with_cfg(build, variant, pretrained=False, pretrained_cfg_overlay=overlay, **kwargs)
    set_input_size(model, model.in_chans, model.img_size)
    return model


def _cfg(**kwargs) -> dict:
    return {
        "url": "",
        "num_classes": 7,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 1.0,  # DAN resizes aligned faces to 224 without cropping
        "interpolation": "bilinear",
        "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "backbone.conv1",
        "classifier": "fc",
        "paper_ids": "arXiv:2109.07270",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({"dan_resnet18": _cfg(), "dan_resnet50": _cfg()})


@register_model
def dan_resnet18(pretrained: bool = False, **kwargs) -> DAN:
    """DAN (Wen et al.) on ResNet-18 with 4 attention heads: the paper's model (19.7M parameters)."""
    return _create_dan("dan_resnet18", pretrained=pretrained, **kwargs)


@register_model
def dan_resnet50(pretrained: bool = False, **kwargs) -> DAN:
    """DAN's heads on a ResNet-50 trunk (our extension; not in the paper)."""
    return _create_dan("dan_resnet50", pretrained=pretrained, **kwargs)
