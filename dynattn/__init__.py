"""dynattn: bi-level routing attention (BiFormer's sparse attention) with fused CPU, CUDA and Triton kernels.

Public API::

    idx = dynattn.route(q, k, num_regions, topk)                      # (B, R, topk) int64
    out = dynattn.routed_attention(q, k, v, idx, num_regions)         # (B, *spatial, H, Dv)
    out = dynattn.bi_level_routing_attention(q, k, v, num_regions, topk)
    dynattn.available_backends()                                      # e.g. ['cpu', 'reference']

q, k: ``(B, *spatial, H, Dqk)``, v: ``(B, *spatial, H, Dv)`` with 1 to 3 spatial dims.
"""

from . import reference
from .backends import available_backends
from .ops import bi_level_routing_attention, route, routed_attention

__version__ = "0.1.0"

__all__ = [
    "available_backends",
    "bi_level_routing_attention",
    "reference",
    "route",
    "routed_attention",
    "__version__",
]
