"""Routing-index helpers shared by the GPU backends."""

from __future__ import annotations

from typing import Tuple

import torch


def inverse_routing_index(idx: torch.Tensor, num_regions_total: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """CSR of "which query regions routed to key region rk", one table per routing group (batch, or
    batch x head), which is what lets backward accumulate dK/dV per key region without atomics.

    idx: int64 ``(G..., R, T)``. Returns int32 ``offsets`` ``(G, R+1)`` and ``regions`` ``(G, R*T)``: the
    query regions of key region rk are ``regions[g, offsets[g, rk]:offsets[g, rk+1]]``, ascending.

    A stable sort of each group's flattened index groups the entries by key region and keeps them in
    (query region, slot) order, and ``searchsorted`` finds the group boundaries: device-side ops of static
    shapes (no host sync, CUDA-graph safe), deterministic (allowed under ``torch.use_deterministic_algorithms``).
    """
    R, T = num_regions_total, idx.shape[-1]
    flat = idx.reshape(-1, R * T)
    keys, order = torch.sort(flat, dim=1, stable=True)
    regions = torch.div(order, T, rounding_mode="floor").to(torch.int32)
    bounds = torch.arange(R + 1, device=idx.device, dtype=idx.dtype).expand(flat.shape[0], R + 1).contiguous()
    offsets = torch.searchsorted(keys, bounds, out_int32=True)
    return offsets.contiguous(), regions.contiguous()
