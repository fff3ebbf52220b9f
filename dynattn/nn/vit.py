"""Routed attention for timm Vision Transformers: a drop-in for ``timm.layers.Attention`` and a converter.

A ViT's tokens are ``num_prefix_tokens`` prefix tokens (class and/or register tokens) followed by an
``H x W`` grid of patch tokens. :class:`RoutedAttention` keeps timm's parameters and semantics except that a
grid token attends only to the tokens of its ``topk`` routed regions **plus all prefix tokens**, exactly (one
softmax over the union, obtained by merging two partial softmaxes through their log-sum-exp), while prefix
tokens keep attending to every token. With ``topk`` equal to the number of regions it is dense attention.
"""

from __future__ import annotations

import copy
import math
from typing import List, Optional, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops

__all__ = ["RoutedAttention", "convert_vit", "default_topk", "DEFAULT_KEYS_PER_QUERY"]

#: BiFormer's key budget: every query attends to ``topk * tokens_per_region = 64`` key tokens in all of its
#: sparse stages (1x64, 4x16, 16x4 at 224 px). ``topk=None`` picks the topk that matches it.
DEFAULT_KEYS_PER_QUERY = 64

GridSize = Union[int, Tuple[int, int]]


def _pair_or_none(value, name: str) -> Optional[Tuple[int, int]]:
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        value = (value, value)
    if not (isinstance(value, (tuple, list, torch.Size)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(value) < 1:
        raise ValueError(f"{name} must be >= 1 along each dim, got {name}={tuple(value)!r}")
    return int(value[0]), int(value[1])


def default_topk(grid_size: Tuple[int, int], num_regions: Tuple[int, int],
                 keys_per_query: int = DEFAULT_KEYS_PER_QUERY) -> int:
    """The ``topk`` giving about ``keys_per_query`` grid keys per query (BiFormer's budget), within ``[1, R]``.

    On a 14x14 grid (224 px, patch 16) with 7x7 regions of 2x2 tokens this is 16 of 49 regions, the setting of
    BiFormer's stage 3, which runs on the same 14x14 map; at 448 px (28x28 grid, 4x4-token regions) it is 4.
    """
    R = num_regions[0] * num_regions[1]
    tokens_per_region = grid_size[0] * grid_size[1] / R
    return max(1, min(R, int(round(keys_per_query / tokens_per_region))))


class RoutedAttention(nn.Module):
    """Drop-in replacement for timm's ViT ``Attention`` with bi-level routing attention on the patch grid.

    Constructor arguments up to ``dtype`` and all parameter/buffer names are those of
    ``timm.layers.Attention`` (``qkv``, ``q_norm``, ``k_norm``, ``norm``, ``gate``, ``proj``), so its state dict
    loads unchanged. The keyword-only arguments describe the token layout and the routing.

    Input ``(B, N, dim)`` = ``num_prefix_tokens`` prefix tokens followed by a row-major ``H x W`` grid
    (``N = num_prefix_tokens + H*W``). Per head, with ``scale = head_dim ** -0.5`` (timm's):

    * prefix tokens attend to all ``N`` tokens (dense SDPA on those few rows);
    * a grid token in region ``r`` attends to the grid tokens of the ``topk`` regions routed from ``r`` *and* to
      all prefix tokens, with one exact softmax over that union: the routed part comes from
      :func:`dynattn.routed_attention` with its log-sum-exp, the prefix-key part from a small dense attention,
      and the two are merged through their log-sum-exps (gradients flow through both).

    Routing (:func:`dynattn.route`) uses only the grid tokens' q/k (after ``q_norm``/``k_norm``), mean-pooled per
    region and detached, shared by all heads unless ``per_head_routing``. With ``topk = R`` the layer equals
    timm's ``Attention``.

    Args:
        dim, num_heads, attn_head_dim, dim_out, qkv_bias, qk_norm, scale_norm, proj_bias, gated, proj_drop,
        norm_layer, device, dtype: as ``timm.layers.Attention``.
        attn_drop: kept for compatibility; the fused op has no attention dropout, so a non-zero value raises
            ``NotImplementedError`` in training-mode forward (eval is fine).
        grid_size: ``(H, W)`` of the patch grid (or an int for a square grid). ``None``: inferred from ``N`` at each
            call when ``N - num_prefix_tokens`` is a perfect square.
        num_prefix_tokens: class + register tokens at the start of the sequence.
        num_regions: regions per grid side (int, or ``(rows, cols)``), at most the grid's extent on that side;
            region ``i`` of an extent ``L`` cut into ``S`` spans ``[floor(i*L/S), floor((i+1)*L/S))``.
        topk: key regions per query region, ``1 <= topk <= R = rows*cols``; ``None`` picks the one giving about
            64 grid keys per query (:func:`default_topk`).
        per_head_routing: route every head separately.
        backend: dynattn backend (``"auto"`` picks the fastest available).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        attn_head_dim: Optional[int] = None,
        dim_out: Optional[int] = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        gated: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Optional[Type[nn.Module]] = None,
        device=None,
        dtype=None,
        *,
        grid_size: Optional[GridSize] = None,
        num_prefix_tokens: int = 1,
        num_regions: GridSize = 7,
        topk: Optional[int] = None,
        per_head_routing: bool = False,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        dim_out = dim_out or dim
        head_dim = attn_head_dim
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads} (or pass attn_head_dim)")
            head_dim = dim // num_heads
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("norm_layer must be given when qk_norm or scale_norm is True")
        if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be an int >= 0, got num_prefix_tokens={num_prefix_tokens!r}")
        if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int)):
            raise TypeError(f"topk must be an int or None, got {type(topk).__name__}")
        if not isinstance(per_head_routing, bool):
            raise TypeError(f"per_head_routing must be a bool, got {type(per_head_routing).__name__}")

        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.scale = head_dim ** -0.5
        self.grid_size: Optional[Tuple[int, int]] = _pair_or_none(grid_size, "grid_size")
        self.num_prefix_tokens = num_prefix_tokens
        self.num_regions: Tuple[int, int] = _pair_or_none(num_regions, "num_regions")
        self.topk = topk
        self.per_head_routing = per_head_routing
        self.backend = backend
        if self.grid_size is not None:
            self._routing_for(self.grid_size)  # bad num_regions/topk fail at construction

        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    def extra_repr(self) -> str:
        topk = f"{self.topk}"
        if self.topk is None and self.grid_size is not None:
            topk = f"None (-> {default_topk(self.grid_size, self.num_regions)})"
        return (
            f"num_heads={self.num_heads}, head_dim={self.head_dim}, grid_size={self.grid_size}, "
            f"num_prefix_tokens={self.num_prefix_tokens}, num_regions={self.num_regions}, topk={topk}, "
            f"per_head_routing={self.per_head_routing}"
        )

    # ---------------------------------------------------------------------------------------------- layout

    def _routing_for(self, grid: Tuple[int, int]) -> int:
        """Validate num_regions against the grid and return the effective topk."""
        for d, (s, length) in enumerate(zip(self.num_regions, grid)):
            if s > length:
                raise ValueError(
                    f"num_regions={self.num_regions} does not fit the {grid[0]}x{grid[1]} token grid: "
                    f"{s} regions along dim {d} need at least {s} tokens there"
                )
        R = self.num_regions[0] * self.num_regions[1]
        topk = default_topk(grid, self.num_regions) if self.topk is None else self.topk
        if not 1 <= topk <= R:
            raise ValueError(f"topk={topk} must be in [1, R={R}] for num_regions={self.num_regions}")
        return topk

    def _grid_for(self, N: int) -> Tuple[int, int]:
        P = self.num_prefix_tokens
        if self.grid_size is not None:
            H, W = self.grid_size
            if P + H * W != N:
                raise ValueError(
                    f"grid_size={self.grid_size} with num_prefix_tokens={P} needs N={P + H * W} tokens, got N={N}"
                )
            return self.grid_size
        n = N - P
        side = math.isqrt(max(n, 0))
        if n < 1 or side * side != n:
            raise ValueError(
                f"cannot infer the token grid: N={N} minus num_prefix_tokens={P} is {n}, not a positive square; "
                "pass grid_size=(H, W)"
            )
        return side, side

    # ---------------------------------------------------------------------------------------------- forward

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: Optional[torch.Tensor] = None,
        is_causal: bool = False,
        *,
        return_routing: bool = False,
    ):
        """Attend.

        Args:
            x: ``(B, N, dim)``, ``N = num_prefix_tokens + H*W``; float32/float16/bfloat16 (float64 on CPU).
            attn_mask, is_causal: timm's arguments; only ``None`` / ``False`` (the routing is the mask).
            return_routing: also return the routing index.

        Returns:
            ``(B, N, dim_out)`` in x's dtype, or ``(out, idx)`` with idx int64 ``(B, R, topk)``
            (``(B, num_heads, R, topk)`` with ``per_head_routing``), regions row-major over the grid.
        """
        if attn_mask is not None or is_causal:
            raise ValueError("RoutedAttention does not take attn_mask/is_causal: the routing decides which keys attend")
        if self.training and self.attn_drop.p > 0:
            raise NotImplementedError(
                f"attention dropout (attn_drop={self.attn_drop.p}) is not supported by the fused routed attention; "
                "build the model with attn_drop=0 (attn_drop_rate=0) or run it in eval mode"
            )
        if x.dim() != 3:
            raise ValueError(f"x must have shape (B, N, dim), got x.shape={tuple(x.shape)}")
        B, N, _ = x.shape
        grid = self._grid_for(N)
        topk = self._routing_for(grid)
        P, heads, hd = self.num_prefix_tokens, self.num_heads, self.head_dim

        gate = self.gate(x).sigmoid() if self.gate is not None else None
        q, k, v = self.qkv(x).unflatten(-1, (3, heads, hd)).unbind(2)  # (B, N, heads, hd) strided views
        q, k = self.q_norm(q), self.k_norm(k)
        if q.dtype != v.dtype:  # e.g. a LayerNorm q/k norm under autocast returns float32
            q, k = q.to(v.dtype), k.to(v.dtype)
        qg, kg, vg = (t[:, P:].unflatten(1, grid) for t in (q, k, v))  # (B, H, W, heads, hd) views

        if return_routing:
            idx = ops.route(qg, kg, self.num_regions, topk, per_head=self.per_head_routing, backend=self.backend)
            out_g, lse_g = ops.routed_attention(
                qg, kg, vg, idx, self.num_regions, scale=self.scale, return_lse=True, backend=self.backend
            )
        else:
            out_g, lse_g = ops.bi_level_routing_attention(
                qg, kg, vg, self.num_regions, topk, scale=self.scale, per_head=self.per_head_routing,
                return_lse=True, backend=self.backend,
            )
        out_g = out_g.flatten(1, 2)  # (B, HW, heads, hd)

        if P:
            out_g = self._merge_prefix_keys(qg.flatten(1, 2), out_g, lse_g.flatten(1, 2), k[:, :P], v[:, :P])
            # prefix queries see every token: a dense attention over those few rows
            out_p = F.scaled_dot_product_attention(
                q[:, :P].transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=self.scale
            ).transpose(1, 2)
            out = torch.cat([out_p, out_g.to(out_p.dtype)], dim=1)
        else:
            out = out_g
        out = out.reshape(B, N, self.attn_dim)
        out = self.norm(out)
        if gate is not None:
            out = out * gate
        out = self.proj_drop(self.proj(out))
        return (out, idx) if return_routing else out

    def _merge_prefix_keys(self, q, out_r, lse_r, k_p, v_p):
        """Fold the prefix keys into the grid queries' routed softmax.

        q ``(B, n, h, d)``, out_r ``(B, n, h, dv)`` with lse_r ``(B, n, h)`` (routed part), k_p/v_p ``(B, P, h, *)``.
        With ``lse_p, out_p`` the same for a softmax over the prefix keys, the softmax over the union is
        ``w_r * out_r + w_p * out_p`` with ``w = exp(lse - logaddexp(lse_r, lse_p))``.
        """
        cdt = lse_r.dtype  # float32 (float64 for float64 inputs)
        s = torch.einsum("bnhd,bphd->bnhp", q.to(cdt), k_p.to(cdt)) * self.scale  # (B, n, h, P)
        lse_p = torch.logsumexp(s, dim=-1)
        out_p = torch.einsum("bnhp,bphd->bnhd", torch.exp(s - lse_p.unsqueeze(-1)), v_p.to(cdt))
        lse = torch.logaddexp(lse_r, lse_p)
        w_r = torch.exp(lse_r - lse).unsqueeze(-1)
        w_p = torch.exp(lse_p - lse).unsqueeze(-1)
        return (w_r * out_r.to(cdt) + w_p * out_p).to(out_r.dtype)


# ---------------------------------------------------------------------------------------------- conversion


def _attention_types():
    from timm.layers import Attention

    return (Attention,)


def _is_identity(m) -> bool:
    return m is None or isinstance(m, nn.Identity)


def _routed_from_timm(attn: nn.Module, *, grid_size, num_prefix_tokens, num_regions, topk, per_head_routing,
                      backend) -> RoutedAttention:
    w = attn.qkv.weight
    new = RoutedAttention(
        attn.qkv.in_features,
        num_heads=attn.num_heads,
        attn_head_dim=attn.head_dim,
        dim_out=attn.proj.out_features,
        qkv_bias=attn.qkv.bias is not None,
        proj_bias=attn.proj.bias is not None,
        gated=getattr(attn, "gate", None) is not None,
        attn_drop=attn.attn_drop.p,
        proj_drop=attn.proj_drop.p,
        device=w.device,
        dtype=w.dtype,
        grid_size=grid_size,
        num_prefix_tokens=num_prefix_tokens,
        num_regions=num_regions,
        topk=topk,
        per_head_routing=per_head_routing,
        backend=backend,
    )
    # q/k/scale norms: reuse copies of the exact modules (type and eps included), weights loaded below
    for name in ("q_norm", "k_norm", "norm"):
        m = getattr(attn, name, None)
        if not _is_identity(m):
            setattr(new, name, copy.deepcopy(m))
    new.load_state_dict(attn.state_dict(), strict=True)
    new.train(attn.training)
    return new


class _GridSizeHook:
    """Forward hook on a dynamic-size ``patch_embed`` (NHWC output): tells the routed attentions the grid."""

    def __init__(self, modules: List[RoutedAttention]) -> None:
        self.modules = modules

    def __call__(self, module, args, output) -> None:
        if output.dim() == 4:  # (B, H, W, C)
            grid = (int(output.shape[1]), int(output.shape[2]))
            for m in self.modules:
                m.grid_size = grid


def convert_vit(
    model: nn.Module,
    num_regions: GridSize,
    topk: Optional[int],
    *,
    per_head_routing: bool = False,
    backend: str = "auto",
) -> nn.Module:
    """Replace every block's ``attn`` of a timm ``VisionTransformer`` by :class:`RoutedAttention`, in place.

    Weights are kept (each new module loads the old one's state dict), so with ``topk = R`` (all regions) the
    converted model computes the same logits as the original. Works for any ViT size, patch/image size, with
    a class token and/or register tokens (``model.num_prefix_tokens``); the grid comes from
    ``model.patch_embed.grid_size``. For ``dynamic_img_size=True`` models a forward hook on ``patch_embed``
    passes each input's grid to the attention layers (``num_regions`` must fit every grid used).

    Args:
        model: a ``timm.models.VisionTransformer`` whose blocks hold ``timm.layers.Attention`` (or already
            converted :class:`RoutedAttention`, which are re-configured).
        num_regions: regions per grid side (int or ``(rows, cols)``).
        topk: key regions per query region, in ``[1, R]``; ``None`` targets 64 grid keys per query.
        per_head_routing, backend: see :class:`RoutedAttention`.

    Returns:
        ``model`` itself, modified.
    """
    for name in ("patch_embed", "blocks", "num_prefix_tokens"):
        if not hasattr(model, name):
            raise TypeError(
                f"convert_vit expects a timm VisionTransformer (missing .{name}), got {type(model).__name__}"
            )
    patch_drop = getattr(model, "patch_drop", None)
    if not _is_identity(patch_drop):
        raise NotImplementedError(
            "patch dropout (patch_drop_rate > 0) removes grid tokens, so the token grid that routing needs is lost; "
            "build the model with patch_drop_rate=0"
        )
    dynamic = bool(getattr(model, "dynamic_img_size", False))
    grid = None if dynamic else _pair_or_none(tuple(model.patch_embed.grid_size), "model.patch_embed.grid_size")
    num_prefix_tokens = int(model.num_prefix_tokens)
    types = _attention_types()
    converted: List[RoutedAttention] = []
    for i, block in enumerate(model.blocks):
        attn = getattr(block, "attn", None)
        if isinstance(attn, RoutedAttention):
            attn.num_regions = _pair_or_none(num_regions, "num_regions")
            attn.topk, attn.per_head_routing, attn.backend = topk, per_head_routing, backend
            if grid is not None:
                attn._routing_for(grid)
            new = attn
        elif type(attn) in types:
            new = _routed_from_timm(
                attn, grid_size=grid, num_prefix_tokens=num_prefix_tokens, num_regions=num_regions, topk=topk,
                per_head_routing=per_head_routing, backend=backend,
            )
            block.attn = new
        else:
            raise TypeError(
                f"model.blocks[{i}].attn is {type(attn).__name__}; convert_vit handles timm.layers.Attention only"
            )
        converted.append(new)
    if dynamic:
        old = getattr(model, "_dynattn_grid_hook", None)
        if old is not None:
            old.remove()
        model._dynattn_grid_hook = model.patch_embed.register_forward_hook(_GridSizeHook(converted))
    return model
