"""Benchmark shapes and the registry of implementations the fused op is compared with.

Every implementation starts from dynattn's layout -- q, k: ``(B, H, W, heads, D)``, v: ``(B, H, W, heads, Dv)``
-- and a routing index ``idx`` computed once, untimed. Most take and return that layout, so the rearranging
they need is inside the timed call; Flex is given its region-major inputs ready made (see :func:`flex`).

* ``fused_<backend>``: ``dynattn.routed_attention(..., backend=<backend>)`` with the precomputed ``idx``.
* ``fused_route_<backend>``: ``dynattn.bi_level_routing_attention(..., backend=<backend>)`` (routing timed too).
* :func:`gather_index_select` -- the fastest unfused form we found: q/k/v permuted once to a region-major
  ``(B*R, M, heads, D)`` layout, ``index_select`` of the routed regions' rows (the result is already
  ``(B*R, topk*M, heads, D)``, no second copy), then ``F.scaled_dot_product_attention`` on transposed views.
* :func:`gather_biformer` -- BiFormer's legacy ``BiLevelRoutingAttention`` attention path (ops/bra_legacy.py):
  region-major q and one kv tensor, ``KVGather``'s ``torch.gather`` on the expanded kv (a topk-fold copy; its
  backward allocates the whole ``(n, p2, p2, w2, c_kv)`` broadcast shape), the head rearranges, and the
  materialised ``softmax((q * scale) @ k) @ v``. Routing weights are unused there by default, so left out.
* :func:`dense_sdpa` -- ``F.scaled_dot_product_attention`` over all ``N = H*W`` tokens on (B, heads, N, D)
  views; on CUDA forced to the FlashAttention backend.
* ``reference``: ``dynattn.routed_attention(..., backend="reference")``, the gather-based oracle.
* :func:`flex` (CUDA only) -- ``torch.compile``d ``flex_attention`` with a ``BlockMask`` built from the same
  ``idx`` (``BlockMask.from_kv_blocks``) over region-major tokens, block size = region size.

Only square grids cut into ``S x S`` equal regions are supported here (BiFormer's own requirement).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Callable, Tuple

import torch
import torch.nn.functional as F

import dynattn
from dynattn.nn import default_topk


@dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    grid: int  # H = W
    heads: int
    d: int  # q/k head dim (v uses the same)
    regions: int  # S: S x S regions
    topk: int
    sweep: str = ""  # the scaling series it belongs to ("" = none): same everything but the grid

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

    def info(self) -> dict:
        """The shape's fields for a benchmark's ``extra_info`` (what the report needs to plot and label it)."""
        return {"shape_desc": self.desc(), "batch": self.batch, "grid": self.grid, "tokens": self.n,
                "heads": self.heads, "head_dim": self.d, "regions": self.regions, "topk": self.topk,
                "tokens_per_region": self.m, "sweep": self.sweep}

    def __str__(self) -> str:
        return self.name


# BiFormer-T and BiFormer-B stages 1-3 at 224x224 input, batch 8 (7x7 regions, head dim 32)
BIFORMER_T = (
    Shape("biformer_t_s1", 8, 56, 2, 32, 7, 1),
    Shape("biformer_t_s2", 8, 28, 4, 32, 7, 4),
    Shape("biformer_t_s3", 8, 14, 8, 32, 7, 16),
)
BIFORMER_B = (
    Shape("biformer_b_s1", 8, 56, 3, 32, 7, 1),
    Shape("biformer_b_s2", 8, 28, 6, 32, 7, 4),
    Shape("biformer_b_s3", 8, 14, 12, 32, 7, 16),
)
# The attention of vit_bra_small (ViT-S/16: 6 heads x 64) at 224 px (14x14 grid) and 448 px (28x28), batch 8,
# 7x7 regions, topk as the models pick it (dynattn.nn.default_topk: 64 keys per query -> 16 and 4 regions)
VIT = tuple(Shape(f"vit_s_{g}", 8, g, 6, 64, 7, default_topk((g, g), (7, 7))) for g in (14, 28))
# Scaling sweeps: square grids at a fixed 256 keys per query (8x8-token regions, topk 4), batch 1.
# CPU: 32^2..128^2 tokens, 4 heads x 32; GPU: 32^2..256^2 tokens, 4 heads x 64 (and 8 x 64 at three sizes).
SWEEP_CPU = "B1 4hx32, 8x8-token regions, topk 4"
SWEEP_GPU = "B1 4hx64, 8x8-token regions, topk 4"
HIRES = tuple(Shape(f"hires_{g}", 1, g, 4, 32, g // 8, 4, sweep=SWEEP_CPU) for g in (32, 48, 64, 96, 128))
HIRES_D64 = (tuple(Shape(f"hires_{g}_4x64", 1, g, 4, 64, g // 8, 4, sweep=SWEEP_GPU)
                   for g in (32, 64, 96, 128, 192, 256))
             + tuple(Shape(f"hires_{g}_8x64", 1, g, 8, 64, g // 8, 4) for g in (64, 128, 256)))
SHAPES = {"cpu": BIFORMER_T + BIFORMER_B + VIT + HIRES, "cuda": HIRES_D64 + BIFORMER_B + BIFORMER_T + VIT}
ALL_SHAPES = {s.name: s for shapes in SHAPES.values() for s in shapes}


def attention_flops(shape: Shape, keys: int, passes: str) -> int:
    """Attention FLOPs: 2*(D_qk + D_v) = 4*D per key per query token per head forward; backward = 2x forward."""
    fwd = 2 * shape.batch * shape.heads * shape.n * keys * (shape.d + shape.d)
    return fwd if passes == "fwd" else 3 * fwd


def biformer_gather_backward_bytes(shape: Shape, itemsize: int) -> int:
    """Size of the zero-filled buffer autograd's gather backward allocates in BiFormer's form (n, p2, p2, w2, 2C)."""
    c_kv = 2 * shape.heads * shape.d
    return shape.batch * shape.r * shape.r * shape.m * c_kv * itemsize


def default_scale(shape: Shape) -> float:
    return shape.d ** -0.5


def make_qkv(shape: Shape, device, dtype, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    dims = (shape.batch, shape.grid, shape.grid, shape.heads, shape.d)
    return tuple(torch.randn(dims, generator=g).to(device=device, dtype=dtype) for _ in range(3))


# --------------------------------------------------------------------------------------------------
# layouts
# --------------------------------------------------------------------------------------------------


def _check_grid(q: torch.Tensor, num_regions: int):
    B, H, W = q.shape[:3]
    if H % num_regions or W % num_regions:
        raise ValueError(f"grid {H}x{W} is not divisible by num_regions={num_regions}")
    return B, H, W, H // num_regions, W // num_regions


def to_regions(x: torch.Tensor, num_regions: int) -> torch.Tensor:
    """(B, H, W, heads, c) -> (B, R, M, heads, c): the tokens of each region consecutive (one copy)."""
    S = num_regions
    B, H, W, h, w = _check_grid(x, S)
    return x.reshape(B, S, h, S, w, *x.shape[3:]).permute(0, 1, 3, 2, 4, 5, 6).reshape(B, S * S, h * w, *x.shape[3:])


def from_regions(x: torch.Tensor, batch: int, grid: int, num_regions: int) -> torch.Tensor:
    """Inverse of :func:`to_regions`; x holds ``batch * R * M`` rows of ``(heads, c)`` in region-major order."""
    S, g = num_regions, grid // num_regions
    heads, c = x.shape[-2:]
    return x.reshape(batch, S, S, g, g, heads, c).permute(0, 1, 3, 2, 4, 5, 6).reshape(batch, grid, grid, heads, c)


# --------------------------------------------------------------------------------------------------
# unfused forms
# --------------------------------------------------------------------------------------------------


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
    B, H, W = q.shape[:3]
    R, T = S * S, idx.size(-1)
    # (B, R, M, heads, c) -> (B*R, M, heads, c): one copy each
    qr, kr, vr = (to_regions(t, S).flatten(0, 1) for t in (q, k, v))
    M = qr.shape[1]
    rows = (idx + torch.arange(0, B * R, R, device=idx.device).view(B, 1, 1)).reshape(-1)  # (B*R*T,)
    ks = kr.index_select(0, rows).view(B * R, T * M, *kr.shape[2:])  # routed regions are contiguous per query region
    vs = vr.index_select(0, rows).view(B * R, T * M, *vr.shape[2:])
    out = F.scaled_dot_product_attention(qr.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2), scale=scale)
    return from_regions(out.transpose(1, 2), B, H, S)  # (B*R, heads, M, cv) -> (B, H, W, heads, cv)


def dense_sdpa(q, k, v, *, scale: float, flash: bool = False):
    """Dense attention over all H*W tokens: SDPA on (B, heads, N, D) views (no copies); ``flash`` forces
    the FlashAttention backend (CUDA, half precision)."""
    B, H, W, m = q.shape[:4]
    n = H * W

    def heads_first(x):
        return x.reshape(B, n, m, x.shape[-1]).transpose(1, 2)

    if flash:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        ctx = sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    else:
        ctx = contextlib.nullcontext()
    with ctx:
        out = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v), scale=scale)
    return out.transpose(1, 2).reshape(B, H, W, m, v.shape[-1])


# --------------------------------------------------------------------------------------------------
# FlexAttention with a BlockMask from the routing
# --------------------------------------------------------------------------------------------------


def flex_block_mask(idx: torch.Tensor, shape: Shape):
    """A ``BlockMask`` over region-major tokens that lets region r attend to the regions ``idx[:, r]``.

    Block size = region size when a region has >= 16 tokens: every routed block is a *full* block (no mask_mod
    evaluated). Smaller regions (BiFormer stage 3: 2x2 tokens) are grouped ``16 // M`` to a block, the kv blocks
    of a query block are the union of its regions' routed blocks, and a ``mask_mod`` looks the region pair up
    in a dense ``(B, R, R)`` routing mask.
    """
    from torch.nn.attention.flex_attention import BlockMask

    B, R, M = shape.batch, shape.r, shape.m
    # Region-level routing as a mask_mod on a (B, R', R') mask (R' = R padded to whole blocks). With one
    # region per block (M >= 16) compiled Flex never evaluates the mask_mod; it is still passed because Flex's
    # eager (CPU) path ignores the block structure and applies only mask_mod.
    G = max(1, 16 // M)
    assert G * M in (M, 16), "benchmark shapes keep regions power-of-two sized"
    nb = -(-R // G)
    routed = torch.zeros((B, nb * G, nb * G), dtype=torch.bool, device=idx.device)
    routed[:, :R].scatter_(2, idx, True)

    def mask_mod(b, h, q_idx, kv_idx):
        return routed[b, q_idx // M, kv_idx // M]

    # (B, q blocks, kv blocks); index tensors are full width, as create_block_mask makes them
    blocks = routed.view(B, nb, G, nb, G).any(dim=4).any(dim=2)
    num = blocks.sum(-1, dtype=torch.int32).view(B, 1, nb)
    order = torch.sort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).indices
    order = order.to(torch.int32).view(B, 1, nb, nb)
    seq = (shape.n, shape.n)
    if G == 1:  # one region per block: the routed blocks are full blocks
        none = torch.zeros_like(num)
        return BlockMask.from_kv_blocks(none, order, num, order, BLOCK_SIZE=M, mask_mod=mask_mod, seq_lengths=seq)
    # G tiny regions per 16-token block (the last may be partial: N % 16 != 0 is fine for Flex)
    return BlockMask.from_kv_blocks(num, order, BLOCK_SIZE=16, mask_mod=mask_mod, seq_lengths=seq)


@functools.lru_cache(maxsize=None)
def _flex_attention(device_type: str):
    """``torch.compile``d flex_attention on CUDA (eager elsewhere: a CPU smoke test of the plumbing)."""
    from torch.nn.attention.flex_attention import flex_attention

    if device_type != "cuda":
        return flex_attention
    # every shape, dtype and grad mode is a recompile of the same function (68 in the GPU matrix): lift
    # dynamo's limits (8 per function), past which it would silently fall back to Flex's eager (dense) path
    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, 256)
    if hasattr(cfg, "accumulated_recompile_limit"):
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 1024)
    return torch.compile(flex_attention, dynamic=False)


# --------------------------------------------------------------------------------------------------
# the registry
# --------------------------------------------------------------------------------------------------


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass(frozen=True)
class Attend:
    """One impl bound to one case's routing: ``fn(q, k, v) -> out``, all in the impl's layout."""

    fn: Callable[..., torch.Tensor]
    to_impl: Callable[[torch.Tensor], torch.Tensor] = _same  # grid -> impl layout; untimed, on q, k, v and dout
    to_grid: Callable[[torch.Tensor], torch.Tensor] = _same  # impl -> grid layout, for the reference check


@dataclass(frozen=True)
class Impl:
    name: str
    devices: Tuple[str, ...]  # device types it is benchmarked on
    build: Callable[[Any], Attend]  # case inputs (.shape, .idx, .scale, .device, .cache) -> Attend
    backend: str = ""  # the dynattn backend a fused impl runs: dynattn.backends.why_not() says if it can
    dense: bool = False  # attends to all N keys: FLOPs over N keys, a different op (not checked)


def _fused(backend: str, route: bool):
    def build(x) -> Attend:
        S, topk, idx, scale = x.shape.regions, x.shape.topk, x.idx, x.scale
        if route:
            return Attend(lambda q, k, v: dynattn.bi_level_routing_attention(q, k, v, S, topk, scale=scale,
                                                                             backend=backend))
        return Attend(lambda q, k, v: dynattn.routed_attention(q, k, v, idx, S, scale=scale, backend=backend))
    return build


def flex(x) -> Attend:
    """Flex over region-major ``(B, heads, N, D)`` tokens. The permutation (and its inverse) is untimed, which
    favours Flex: in a model it would cost two extra passes over q/k/v/out."""
    s = x.shape
    if "flex_mask" not in x.cache:
        x.cache["flex_mask"] = flex_block_mask(x.idx, s)
    mask, attend = x.cache["flex_mask"], _flex_attention(torch.device(x.device).type)

    def to_impl(t):
        return to_regions(t, s.regions).flatten(1, 2).transpose(1, 2).contiguous()

    def to_grid(t):
        return from_regions(t.transpose(1, 2), s.batch, s.grid, s.regions)

    return Attend(lambda q, k, v: attend(q, k, v, block_mask=mask, scale=x.scale), to_impl, to_grid)


_CPU, _CUDA, _BOTH = ("cpu",), ("cuda",), ("cpu", "cuda")
IMPLS = {impl.name: impl for impl in (
    Impl("fused_cpu", _CPU, _fused("cpu", route=False), backend="cpu"),
    Impl("fused_cuda", _CUDA, _fused("cuda", route=False), backend="cuda"),
    Impl("fused_triton", _CUDA, _fused("triton", route=False), backend="triton"),
    Impl("fused_route_cpu", _CPU, _fused("cpu", route=True), backend="cpu"),
    Impl("fused_route_cuda", _CUDA, _fused("cuda", route=True), backend="cuda"),
    Impl("fused_route_triton", _CUDA, _fused("triton", route=True), backend="triton"),
    Impl("index_select_gather", _BOTH,
         lambda x: Attend(lambda q, k, v: gather_index_select(q, k, v, x.idx, x.shape.regions, scale=x.scale))),
    Impl("biformer_gather", _BOTH,
         lambda x: Attend(lambda q, k, v: gather_biformer(q, k, v, x.idx, x.shape.regions, scale=x.scale))),
    Impl("dense_sdpa", _BOTH, dense=True,
         build=lambda x: Attend(lambda q, k, v: dense_sdpa(q, k, v, scale=x.scale, flash=x.device == "cuda"))),
    Impl("reference", _BOTH, _fused("reference", route=False)),
    Impl("flex", _CUDA, flex),
)}
