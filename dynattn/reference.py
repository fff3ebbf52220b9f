"""Pure-PyTorch bi-level routing attention: the oracle for every backend.

Readable, gather-based and built from standard differentiable ops only (indexing, gather, matmul,
logsumexp), so it also serves as the ONNX-exportable path. It materialises the gathered K/V and the
score matrix, which the fused kernels never do: use it to check results, not for speed.

Shapes (see DESIGN.md): ``q, k: (B, *spatial, H, Dqk)``, ``v: (B, *spatial, H, Dv)`` with 1 to 3 spatial
dims. Region ``i`` of an extent ``L`` cut into ``S`` regions spans ``[floor(i*L/S), floor((i+1)*L/S))``;
regions are numbered row-major over the spatial dims and tokens inside a region are row-major too.
Math runs in float32 (float64 for float64 inputs); outputs come back in the input dtype, lse in float32
(float64 for float64 inputs).
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Optional, Sequence, Tuple, Union

import torch

__all__ = [
    "normalize_num_regions",
    "region_bounds",
    "region_token_index",
    "token_region_ids",
    "route",
    "routed_attention",
    "bi_level_routing_attention",
    "routed_attention_backward",
]


def normalize_num_regions(num_regions: Union[int, Sequence[int]], spatial: Sequence[int]) -> Tuple[int, ...]:
    """An int (the same count on every spatial dim) or one int per dim -> a tuple with one entry per dim."""
    if isinstance(num_regions, int):
        return (num_regions,) * len(spatial)
    return tuple(int(s) for s in num_regions)


def region_bounds(length: int, regions: int) -> list:
    """``[(start, end), ...]`` of the ``regions`` regions cutting an extent of ``length`` tokens."""
    return [((i * length) // regions, ((i + 1) * length) // regions) for i in range(regions)]


def region_token_index(spatial: Sequence[int], num_regions: Sequence[int], device=None):
    """Flat token indices of every region, padded to the largest region.

    Returns ``(index, valid)``: ``index`` int64 ``(R, M)`` holds the row-major flat index of each region's
    tokens (row-major inside the region), ``valid`` bool ``(R, M)`` marks real entries (padding points at
    token 0 and must be masked). ``M`` is the largest region's token count.
    """
    index, valid = _region_token_index_cpu(tuple(int(s) for s in spatial), tuple(int(s) for s in num_regions))
    return index.to(device), valid.to(device)


@functools.lru_cache(maxsize=64)
def _region_token_index_cpu(spatial: Tuple[int, ...], num_regions: Tuple[int, ...]):
    # cached: the tables depend on the geometry only, and building them is a Python loop over tokens
    strides = [math.prod(spatial[d + 1:]) for d in range(len(spatial))]
    per_dim = [region_bounds(length, s) for length, s in zip(spatial, num_regions)]
    regions = []
    for bounds in itertools.product(*per_dim):
        coords = itertools.product(*[range(a, b) for a, b in bounds])
        regions.append([sum(c * st for c, st in zip(coord, strides)) for coord in coords])
    m = max(len(r) for r in regions)
    index = torch.zeros(len(regions), m, dtype=torch.long)
    valid = torch.zeros(len(regions), m, dtype=torch.bool)
    for r, toks in enumerate(regions):
        index[r, : len(toks)] = torch.tensor(toks, dtype=torch.long)
        valid[r, : len(toks)] = True
    return index, valid


def token_region_ids(spatial: Sequence[int], num_regions: Sequence[int], device=None) -> torch.Tensor:
    """int64 ``(N,)``: the region of every token, tokens in row-major order."""
    index, valid = region_token_index(spatial, num_regions)
    ids = torch.empty(math.prod(spatial), dtype=torch.long)
    ids[index[valid]] = torch.arange(index.shape[0]).unsqueeze(1).expand_as(index)[valid]
    return ids.to(device)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """lse is float32, except float64 for float64 inputs (so gradcheck can run through it)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _region_means(x: torch.Tensor, index: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B, N, H, D) -> (B, R, H, D): mean over each region's tokens."""
    g = x[:, index] * valid[None, :, :, None, None].to(x.dtype)  # (B, R, M, H, D)
    return g.sum(2) / valid.sum(1).to(x.dtype)[None, :, None, None]


def route(
    q: torch.Tensor,
    k: torch.Tensor,
    num_regions: Union[int, Sequence[int]],
    topk: int,
    *,
    per_head: bool = False,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Top-k key regions of every query region, from region-mean logits.

    q, k: ``(B, *spatial, H, Dqk)``. Returns int64 ``(B, R, topk)`` (shared routing: the heads are
    concatenated, logits ``scale * q_r @ k_r^T`` with ``scale = (H*Dqk) ** -0.5``) or ``(B, H, R, topk)``
    (``per_head``: ``scale = Dqk ** -0.5``), each row sorted by descending logit. Not differentiable.
    """
    spatial = q.shape[1:-2]
    B, H, D = q.shape[0], q.shape[-2], q.shape[-1]
    regions = normalize_num_regions(num_regions, spatial)
    index, valid = region_token_index(spatial, regions, q.device)
    cdt = _compute_dtype(q.dtype)
    with torch.no_grad():
        qr = _region_means(q.detach().reshape(B, -1, H, D).to(cdt), index, valid)  # (B, R, H, D)
        kr = _region_means(k.detach().reshape(B, -1, H, D).to(cdt), index, valid)
        if per_head:
            scale = D ** -0.5 if scale is None else scale
            logits = scale * qr.transpose(1, 2) @ kr.transpose(1, 2).transpose(-1, -2)  # (B, H, R, R)
        else:
            scale = (H * D) ** -0.5 if scale is None else scale
            logits = scale * qr.flatten(2) @ kr.flatten(2).transpose(-1, -2)  # (B, R, R)
        return torch.topk(logits, topk, dim=-1, sorted=True).indices


def routed_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    num_regions: Union[int, Sequence[int]],
    *,
    scale: Optional[float] = None,
    return_lse: bool = False,
):
    """Exact softmax attention of each query token over the tokens of its routed key regions.

    q, k: ``(B, *spatial, H, Dqk)``; v: ``(B, *spatial, H, Dv)``; idx: int64 ``(B, R, T)`` or
    ``(B, H, R, T)``. Returns ``out`` ``(B, *spatial, H, Dv)`` in q's dtype and, with ``return_lse``,
    ``lse`` float32 ``(B, *spatial, H)`` (natural log of the softmax denominator, scale included).
    """
    g = _gather(q, k, v, idx, num_regions)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (g.q @ g.k.transpose(-1, -2)) * scale  # (B, H, R, M, T*M)
    scores = scores.masked_fill(~g.kv_valid, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    out = g.scatter_tokens(torch.exp(scores - lse) @ g.v).to(q.dtype)  # (B, *spatial, H, Dv)
    if not return_lse:
        return out
    return out, g.scatter_tokens(lse).squeeze(-1).to(_lse_dtype(q.dtype))


class _Gathered:
    """Region-major views of one call: queries per region, and the routed keys/values per query region."""

    def __init__(self, q, k, v, idx, num_regions):
        spatial = q.shape[1:-2]
        B, H, D, Dv = q.shape[0], q.shape[-2], q.shape[-1], v.shape[-1]
        N = math.prod(spatial)
        regions = normalize_num_regions(num_regions, spatial)
        index, valid = region_token_index(spatial, regions, q.device)  # (R, M)
        R, M = index.shape
        cdt = _compute_dtype(q.dtype)
        self.shape, self.N, self.R, self.M = (B, *spatial, H), N, R, M
        self.index = index

        qf = q.reshape(B, N, H, D).to(cdt).transpose(1, 2)  # (B, H, N, D)
        kf = k.reshape(B, N, H, D).to(cdt).transpose(1, 2)
        vf = v.reshape(B, N, H, Dv).to(cdt).transpose(1, 2)
        self.q = qf[:, :, index]  # (B, H, R, M, D); padded rows are discarded at the end

        if idx.dim() == 3:  # shared routing: the same regions for every head
            idx = idx.unsqueeze(1).expand(B, H, R, idx.shape[-1])
        T = idx.shape[-1]
        self.kv_tok = index[idx].reshape(B, H, R * T * M)  # token ids of the routed regions
        self.kv_valid = valid[idx].reshape(B, H, R, 1, T * M)
        self.k = torch.gather(kf, 2, self.kv_tok.unsqueeze(-1).expand(-1, -1, -1, D)).reshape(B, H, R, T * M, D)
        self.v = torch.gather(vf, 2, self.kv_tok.unsqueeze(-1).expand(-1, -1, -1, Dv)).reshape(B, H, R, T * M, Dv)

        # Every token sits in exactly one (region, slot): that is where its result is read back from.
        self.slot = torch.empty(N, dtype=torch.long, device=q.device)
        self.slot[index[valid]] = torch.arange(R * M, device=q.device).reshape(R, M)[valid]

    def scatter_tokens(self, x):
        """(B, H, R, M, C) per-region rows -> (B, *spatial, H, C) tokens."""
        B, H, C = x.shape[0], x.shape[1], x.shape[-1]
        x = x.reshape(B, H, self.R * self.M, C)[:, :, self.slot]  # (B, H, N, C)
        return x.transpose(1, 2).reshape(*self.shape, C)

    def regions_of(self, x):
        """(B, *spatial, H, C) tokens -> (B, H, R, M, C) per-region rows (padding repeats token 0)."""
        B, H, C = x.shape[0], x.shape[-2], x.shape[-1]
        return x.reshape(B, self.N, H, C).transpose(1, 2)[:, :, self.index]

    def add_to_tokens(self, x_g):
        """Sum gathered key-side rows (B, H, R, T*M, C) back onto their tokens: (B, *spatial, H, C)."""
        B, H, C = x_g.shape[0], x_g.shape[1], x_g.shape[-1]
        out = x_g.new_zeros(B, H, self.N, C)
        out.scatter_add_(2, self.kv_tok.unsqueeze(-1).expand(-1, -1, -1, C), x_g.reshape(B, H, -1, C))
        return out.transpose(1, 2).reshape(*self.shape, C)


def _gather(q, k, v, idx, num_regions) -> _Gathered:
    return _Gathered(q, k, v, idx, num_regions)


def routed_attention_backward(dout, dlse, q, k, v, idx, num_regions, *, scale=None):
    """Closed-form gradients of :func:`routed_attention` (gather-based, recomputing the probabilities).

    dout: ``(B, *spatial, H, Dv)``; dlse: ``(B, *spatial, H)`` or None. Returns ``(dq, dk, dv)`` in the
    input dtypes. Padded key slots carry zero probability, so they contribute nothing.
    """
    g = _gather(q, k, v, idx, num_regions)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = ((g.q @ g.k.transpose(-1, -2)) * scale).masked_fill(~g.kv_valid, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    p = torch.exp(scores - lse)  # (B, H, R, M, T*M)
    o = p @ g.v
    do = g.regions_of(dout.to(o.dtype))  # (B, H, R, M, Dv)
    delta = (do * o).sum(-1, keepdim=True)
    if dlse is not None:
        delta = delta - g.regions_of(dlse.to(o.dtype).unsqueeze(-1))
    ds = p * (do @ g.v.transpose(-1, -2) - delta)
    dq = g.scatter_tokens(scale * ds @ g.k)
    # padded query rows must not feed dK/dV: zero them through the row mask of the region table
    row_valid = torch.zeros(g.R * g.M, dtype=torch.bool, device=q.device)
    row_valid[g.slot] = True
    row_valid = row_valid.reshape(1, 1, g.R, g.M, 1)
    ds, p = ds * row_valid, p * row_valid
    dk = g.add_to_tokens(scale * ds.transpose(-1, -2) @ g.q)
    dv = g.add_to_tokens(p.transpose(-1, -2) @ do)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def bi_level_routing_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    num_regions: Union[int, Sequence[int]],
    topk: int,
    *,
    scale: Optional[float] = None,
    per_head: bool = False,
    return_lse: bool = False,
):
    """:func:`route` then :func:`routed_attention` (shapes as there)."""
    idx = route(q, k, num_regions, topk, per_head=per_head)
    return routed_attention(q, k, v, idx, num_regions, scale=scale, return_lse=return_lse)
