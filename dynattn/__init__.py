"""dynattn: bi-level routing attention (BiFormer's sparse attention) with fused CPU, CUDA and Triton kernels.

Public API::

    idx = dynattn.route(q, k, num_regions, topk)                      # (B, R, topk) int64
    out = dynattn.routed_attention(q, k, v, idx, num_regions)         # (B, *spatial, H, Dv)
    out = dynattn.bi_level_routing_attention(q, k, v, num_regions, topk)
    dynattn.available_backends()                                      # e.g. ['cpu', 'reference']
    dynattn.nn.BiLevelRoutingAttention, dynattn.nn.RoutedAttention    # drop-in modules
    dynattn.convert_vit(timm_vit, num_regions=7, topk=4)              # sparse attention in a timm ViT

q, k: ``(B, *spatial, H, Dqk)``, v: ``(B, *spatial, H, Dv)`` with 1 to 3 spatial dims.
"""

from . import reference
from .backends import available_backends
from .ops import bi_level_routing_attention, route, routed_attention

from . import models, nn  # noqa: E402  (nn builds on the ops; models registers vit_bra_* with timm)
from .nn import convert_vit  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "bi_level_routing_attention",
    "convert_vit",
    "models",
    "nn",
    "reference",
    "route",
    "routed_attention",
    "__version__",
]
