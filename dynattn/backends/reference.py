"""The reference implementation behind the backend interface (any device, any float dtype)."""

from __future__ import annotations

import torch

from .. import reference


def is_available() -> bool:
    return True


def route(q, k, num_regions, topk, per_head, scale):
    return reference.route(q, k, num_regions, topk, per_head=per_head, scale=scale).contiguous()


def fwd(q, k, v, idx, num_regions, scale):
    with torch.no_grad():
        out, lse = reference.routed_attention(q, k, v, idx, num_regions, scale=scale, return_lse=True)
    return out.contiguous(), lse.contiguous()


def bwd(dout, dlse, q, k, v, out, lse, idx, num_regions, scale):
    # Closed form rather than autograd: custom-op kernels run below the autograd dispatch key.
    dq, dk, dv = reference.routed_attention_backward(dout, dlse, q, k, v, idx, num_regions, scale=scale)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()
