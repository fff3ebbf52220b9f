"""Benchmark shapes and the implementations the fused op is compared with.

Every implementation takes q, k: ``(B, H, W, heads, D)`` and v: ``(B, H, W, heads, Dv)`` (dynattn's layout)
and returns out ``(B, H, W, heads, Dv)``; the rearranging each one needs is done inside, so it is timed.

* :func:`gather_biformer` -- BiFormer's legacy ``BiLevelRoutingAttention`` attention path (ops/bra_legacy.py):
  region-major q and one kv tensor, ``KVGather``'s ``torch.gather`` on the expanded kv (a topk-fold copy; its
  backward allocates the whole ``(n, p2, p2, w2, c_kv)`` broadcast shape), the head rearranges, and the
  materialised ``softmax((q * scale) @ k) @ v``. Routing weights are unused there by default, so left out.
* :func:`gather_index_select` -- the fastest unfused form we found: q/k/v permuted once to a region-major
  ``(B*R, M, heads, D)`` layout, ``index_select`` of the routed regions' rows (the result is already
  ``(B*R, topk*M, heads, D)``, no second copy), then ``F.scaled_dot_product_attention`` on transposed views.
* :func:`dense_sdpa` -- ``F.scaled_dot_product_attention`` over all ``N = H*W`` tokens, (B, heads, N, D) views.

Only square grids cut into ``S x S`` equal regions are supported here (BiFormer's own requirement).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    grid: int  # H = W
    heads: int
    d: int  # q/k head dim (v uses the same)
    regions: int  # S: S x S regions
    topk: int

    @property
    def n(self) -> int:
        return self.grid * self.grid

    @property
    def r(self) -> int:
        return self.regions * self.regions

    @property
    def m(self) -> int:
        """Tokens per region."""
        return self.n // self.r

    @property
    def routed_keys(self) -> int:
        return self.topk * self.m

    def desc(self) -> str:
        s = self.grid // self.regions
        return (f"B{self.batch} {self.grid}x{self.grid} {self.heads}hx{self.d} "
                f"{self.regions}x{self.regions} regions of {s}x{s}, topk {self.topk}")

    def __str__(self) -> str:
        return self.name


SHAPES = (
    # (a) BiFormer-T stages 1-3 at 224x224 input, batch 8
    Shape("biformer_t_s1", 8, 56, 2, 32, 7, 1),
    Shape("biformer_t_s2", 8, 28, 4, 32, 7, 4),
    Shape("biformer_t_s3", 8, 14, 8, 32, 7, 16),
    # (b) high resolution, batch 1, 8x8-token regions
    Shape("hires_64", 1, 64, 4, 32, 8, 4),
    Shape("hires_128", 1, 128, 4, 32, 16, 4),
)
STAGE_SHAPES = ("biformer_t_s1", "biformer_t_s2", "biformer_t_s3")


def attention_flops(shape: Shape, keys: int, passes: str) -> int:
    """Attention FLOPs: 2*(D_qk + D_v) = 4*D per key per query token per head forward; backward = 2x forward."""
    fwd = 2 * shape.batch * shape.heads * shape.n * keys * (shape.d + shape.d)
    return fwd if passes == "fwd" else 3 * fwd


def biformer_gather_backward_bytes(shape: Shape, itemsize: int) -> int:
    """Size of the zero-filled buffer autograd's gather backward allocates in BiFormer's form (n, p2, p2, w2, 2C)."""
    c_kv = 2 * shape.heads * shape.d
    return shape.batch * shape.r * shape.r * shape.m * c_kv * itemsize


def _check_grid(q: torch.Tensor, num_regions: int):
    B, H, W = q.shape[:3]
    if H % num_regions or W % num_regions:
        raise ValueError(f"grid {H}x{W} is not divisible by num_regions={num_regions}")
    return B, H, W, H // num_regions, W // num_regions


def gather_biformer(q, k, v, idx, num_regions: int, *, scale: float):
    """BiFormer's KVGather + materialised attention (ops/bra_legacy.py, default 'none' routing-weight mode)."""
    S = num_regions
    B, H, W, h, w = _check_grid(q, S)
    m, c, cv = q.shape[3], q.shape[4], v.shape[4]
    n, p2, w2 = B, S * S, h * w

    def region_major(x):  # 'n (j h) (i w) c -> n (j i) h w c' of the (B, H, W, heads*c) map, as a view
        return x.reshape(n, S, h, S, w, -1).permute(0, 1, 3, 2, 4, 5)

    q_pix = region_major(q).reshape(n, p2, w2, m * c)
    # BiFormer's single qkv Linear yields one kv tensor (k | v channels): built here in one copy
    kv_pix = torch.cat([region_major(k), region_major(v)], dim=-1).reshape(n, p2, w2, m * (c + cv))

    # KVGather (bra_legacy.py:81), verbatim
    c_kv = kv_pix.size(-1)
    topk = idx.size(-1)
    kv_sel = torch.gather(
        kv_pix.view(n, 1, p2, w2, c_kv).expand(-1, p2, -1, -1, -1),
        dim=2,
        index=idx.view(n, p2, topk, 1, 1).expand(-1, -1, -1, w2, c_kv),
    )  # (n, p2, topk, w2, c_kv)
    k_sel, v_sel = kv_sel.split([m * c, m * cv], dim=-1)
    # 'n p2 k w2 (m c) -> (n p2) m c (k w2)' and 'n p2 k w2 (m c) -> (n p2) m (k w2) c'
    k_sel = k_sel.reshape(n * p2, topk, w2, m, c).permute(0, 3, 4, 1, 2).reshape(n * p2, m, c, topk * w2)
    v_sel = v_sel.reshape(n * p2, topk, w2, m, cv).permute(0, 3, 1, 2, 4).reshape(n * p2, m, topk * w2, cv)
    # 'n p2 w2 (m c) -> (n p2) m w2 c'
    q_pix = q_pix.reshape(n * p2, w2, m, c).permute(0, 2, 1, 3)

    attn = torch.softmax((q_pix * scale) @ k_sel, dim=-1)  # (n*p2, m, w2, topk*w2)
    out = attn @ v_sel  # (n*p2, m, w2, cv)
    # '(n j i) m (h w) c -> n (j h) (i w) (m c)'
    return out.reshape(n, S, S, m, h, w, cv).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, H, W, m, cv)


def gather_index_select(q, k, v, idx, num_regions: int, *, scale: float):
    """index_select of the routed regions from a region-major layout, then SDPA (the fastest unfused form)."""
    S = num_regions
    B, H, W, h, w = _check_grid(q, S)
    m, cv = q.shape[3], v.shape[4]
    R, M, T = S * S, h * w, idx.size(-1)

    def region_major(x):  # (B, H, W, heads, c) -> (B*R, M, heads, c), one copy
        return x.reshape(B, S, h, S, w, m, x.shape[-1]).permute(0, 1, 3, 2, 4, 5, 6).reshape(B * R, M, m, -1)

    qr, kr, vr = region_major(q), region_major(k), region_major(v)
    rows = (idx + torch.arange(0, B * R, R, device=idx.device).view(B, 1, 1)).reshape(-1)  # (B*R*T,)
    ks = kr.index_select(0, rows).view(B * R, T * M, m, -1)  # routed regions are contiguous per query region
    vs = vr.index_select(0, rows).view(B * R, T * M, m, cv)
    out = F.scaled_dot_product_attention(qr.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2), scale=scale)
    # (B*R, heads, M, cv) -> (B, H, W, heads, cv)
    return out.transpose(1, 2).reshape(B, S, S, h, w, m, cv).permute(0, 1, 3, 2, 4, 5, 6).reshape(B, H, W, m, cv)


def dense_sdpa(q, k, v, *, scale: float):
    """Dense attention over all H*W tokens: SDPA on (B, heads, N, D) views (no copies)."""
    B, H, W, m = q.shape[:4]
    n = H * W

    def heads_first(x):
        return x.reshape(B, n, m, x.shape[-1]).transpose(1, 2)

    out = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v), scale=scale)
    return out.transpose(1, 2).reshape(B, H, W, m, v.shape[-1])


def default_scale(shape: Shape) -> float:
    return shape.d ** -0.5


def make_qkv(shape: Shape, device, dtype, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    dims = (shape.batch, shape.grid, shape.grid, shape.heads, shape.d)
    return tuple(torch.randn(dims, generator=g).to(device=device, dtype=dtype) for _ in range(3))

