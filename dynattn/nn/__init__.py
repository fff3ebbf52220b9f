"""nn.Modules on top of dynattn's ops.

* :class:`BiLevelRoutingAttention`: BiFormer's attention block on ``(B, H, W, C)`` maps (same arguments and
  parameter names as BiFormer's legacy module, so its state dicts load).
* :class:`RoutedAttention`: drop-in for timm's ViT ``Attention`` on ``(B, N, C)`` tokens with prefix tokens.
* :func:`convert_vit`: swap every attention of a timm ``VisionTransformer`` for :class:`RoutedAttention`.
"""

from .bra import BiLevelRoutingAttention, QKVLinear
from .vit import DEFAULT_KEYS_PER_QUERY, RoutedAttention, convert_vit, default_topk

__all__ = [
    "BiLevelRoutingAttention",
    "DEFAULT_KEYS_PER_QUERY",
    "QKVLinear",
    "RoutedAttention",
    "convert_vit",
    "default_topk",
]
