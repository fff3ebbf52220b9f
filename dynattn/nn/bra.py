"""BiFormer's bi-level routing attention block on ``(B, H, W, C)`` maps, running on dynattn's fused op.

:class:`BiLevelRoutingAttention` has BiFormer's constructor arguments and parameter names
(``qkv.qkv``, ``wo``, ``lepe``; see ``ops/bra_legacy.py`` in ``rayleizhu/BiFormer``), so a state dict of
BiFormer's legacy module loads unchanged, and it computes the same function in BiFormer's default
configuration (identity kv downsampling, detached hard top-k routing shared by all heads). What differs is
how: the routed keys and values are read in place by the kernel instead of being gathered into a ``topk``-fold
copy, and no score matrix is materialised.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .. import ops

__all__ = ["BiLevelRoutingAttention", "QKVLinear"]

_BIFORMER_KV_MODES = ("identity", "ada_avgpool", "ada_maxpool", "avgpool", "maxpool", "fracpool", "conv")


def _pair(value, name: str) -> Tuple[int, int]:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return value, value
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        return int(value[0]), int(value[1])
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


class QKVLinear(nn.Module):
    """BiFormer's fused projection: one ``Linear(dim, 2*qk_dim + dim)`` whose output rows are ordered q | k | v.

    ``forward(x)`` with x ``(..., dim)`` returns ``(q, kv)``: q ``(..., qk_dim)`` and kv ``(..., qk_dim + dim)``,
    both views of the one projection output (as BiFormer's ``QKVLinear``).
    """

    def __init__(self, dim: int, qk_dim: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.dim, self.qk_dim = dim, qk_dim
        self.qkv = nn.Linear(dim, 2 * qk_dim + dim, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.qkv(x).split([self.qk_dim, self.qk_dim + self.dim], dim=-1)


class BiLevelRoutingAttention(nn.Module):
    """Bi-level routing attention (BiFormer, CVPR 2023) on channels-last maps, with fused routed attention.

    Computes, for x ``(B, H, W, dim)``: ``q | k | v = qkv(x)`` (widths ``qk_dim | qk_dim | dim``); cut the map
    into ``n_win x n_win`` regions; route every query region to the ``topk`` key regions with the largest
    ``scale * mean(q_r) . mean(k_r)`` (means over the full ``qk_dim`` width, detached, one index set shared by
    all heads); each query token attends, per head, over the tokens of its routed regions with logits
    ``scale * q_h . k_h``; add ``lepe(v)`` (a depthwise ``side_dwconv x side_dwconv`` conv with zero padding
    and bias on the full-resolution V map); project with ``wo``.

    ``scale = qk_scale or qk_dim ** -0.5``: BiFormer's temperature uses the *whole* ``qk_dim``, not the head
    width, for both the routing logits and the token logits (a positive routing scale does not change the
    top-k, so only the attention sees it).

    Equivalence with BiFormer: with the same weights, forward output and all gradients equal BiFormer's
    legacy ``BiLevelRoutingAttention`` in its default configuration (``kv_downsample_mode='identity'``, no
    param/diff/soft routing, ``auto_pad=False``) on grids divisible by ``n_win``, to float32 rounding.

    Non-divisible grids: BiFormer asserts divisibility, or with ``auto_pad=True`` zero-pads x at the bottom/right
    *before* the projection, so pad tokens carry the biases as q/k/v, enter the region means and are attended
    unmasked. Here an extent ``L`` cut into ``S`` regions uses dynattn's partition instead: region ``i`` spans
    ``[floor(i*L/S), floor((i+1)*L/S))`` (sizes differ by at most one token), and no padding token ever exists.
    Results therefore differ from ``auto_pad`` on such grids, which is why ``auto_pad=True`` is rejected.

    Args:
        dim: channels C of x and of V (and of the output).
        num_heads: attention heads; must divide ``dim`` and ``qk_dim``.
        n_win: regions per side (an int, or ``(rows, cols)``), at most the map's extent on that side.
        qk_dim: width of q and k, default ``dim``.
        qk_scale: logit scale, default ``qk_dim ** -0.5``; must be positive.
        kv_per_win, kv_downsample_ratio, kv_downsample_kernel: accepted for BiFormer compatibility; unused
            (as in BiFormer) with ``kv_downsample_mode='identity'``.
        kv_downsample_mode: only ``'identity'`` (BiFormer's default and the mode of every released model).
        topk: key regions per query region, ``1 <= topk <= n_win**2``.
        param_attention: ``'qkvo'`` (with output projection ``wo``) or ``'qkv'`` (``wo`` is the identity).
        param_routing, diff_routing, soft_routing: only ``False`` (BiFormer's defaults).
        side_dwconv: LEPE kernel size, odd, or 0 for no LEPE. Default 5, the value every BiFormer model passes
            (BiFormer's class default is 3).
        auto_pad: only ``False``; see "Non-divisible grids" above.
        per_head_routing: (dynattn extension) route each head on its own slice instead of sharing one index.
        backend: dynattn backend for routing and attention (``"auto"`` picks the fastest available).
        device, dtype: factory kwargs for the parameters.

    Parameters (names as BiFormer's): ``qkv.qkv`` Linear ``(2*qk_dim + dim, dim)``, ``wo`` Linear
    ``(dim, dim)`` (if ``'qkvo'``), ``lepe`` Conv2d ``(dim, 1, side_dwconv, side_dwconv)`` (if ``side_dwconv > 0``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        n_win: Union[int, Tuple[int, int]] = 7,
        qk_dim: Optional[int] = None,
        qk_scale: Optional[float] = None,
        kv_per_win: int = 4,
        kv_downsample_ratio: int = 4,
        kv_downsample_kernel=None,
        kv_downsample_mode: str = "identity",
        topk: int = 4,
        param_attention: str = "qkvo",
        param_routing: bool = False,
        diff_routing: bool = False,
        soft_routing: bool = False,
        side_dwconv: int = 5,
        auto_pad: bool = False,
        *,
        per_head_routing: bool = False,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        qk_dim = dim if qk_dim is None else qk_dim
        for name, value in (("dim", dim), ("num_heads", num_heads), ("qk_dim", qk_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {name}={value!r}")
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        if qk_dim % num_heads:
            raise ValueError(f"qk_dim={qk_dim} must be divisible by num_heads={num_heads}")
        regions = _pair(n_win, "n_win")
        if min(regions) < 1:
            raise ValueError(f"n_win must be >= 1, got n_win={n_win!r}")
        num_regions = regions[0] * regions[1]
        if isinstance(topk, bool) or not isinstance(topk, int) or not 1 <= topk <= num_regions:
            raise ValueError(
                f"topk={topk!r} must be an int in [1, n_win**2={num_regions}] (BiFormer's topk <= 0 selects a "
                "dense attention layer at the Block level, not this module)"
            )
        if qk_scale is not None and not (isinstance(qk_scale, (int, float)) and qk_scale > 0):
            raise ValueError(f"qk_scale must be None or a positive float, got qk_scale={qk_scale!r}")
        if kv_downsample_mode != "identity":
            if kv_downsample_mode in _BIFORMER_KV_MODES:
                raise NotImplementedError(
                    f"kv_downsample_mode={kv_downsample_mode!r} is not supported: only 'identity' (BiFormer's "
                    "default, used by every released model) runs on the fused routed attention"
                )
            raise ValueError(f"kv_downsample_mode={kv_downsample_mode!r} is not one of {_BIFORMER_KV_MODES}")
        for name, flag in (("param_routing", param_routing), ("diff_routing", diff_routing),
                           ("soft_routing", soft_routing)):
            if flag:
                raise NotImplementedError(
                    f"{name}=True is not supported: routing is hard, detached and parameter-free (BiFormer's "
                    "default configuration, used by every released model)"
                )
        if param_attention not in ("qkvo", "qkv"):
            raise ValueError(f"param_attention={param_attention!r} must be 'qkvo' or 'qkv'")
        if isinstance(side_dwconv, bool) or not isinstance(side_dwconv, int) or side_dwconv < 0 or (
            side_dwconv > 0 and side_dwconv % 2 == 0
        ):
            raise ValueError(f"side_dwconv={side_dwconv!r} must be 0 (no LEPE) or an odd positive kernel size")
        if auto_pad:
            raise NotImplementedError(
                "auto_pad=True (BiFormer's zero padding before the projection, with unmasked bias-valued pad tokens) "
                "is not supported; non-divisible maps are cut into uneven regions without padding instead, so pass "
                "auto_pad=False (results are identical on divisible maps)"
            )
        if not isinstance(per_head_routing, bool):
            raise TypeError(f"per_head_routing must be a bool, got {type(per_head_routing).__name__}")

        self.dim, self.qk_dim, self.num_heads = dim, qk_dim, num_heads
        self.n_win = n_win
        self.num_regions: Tuple[int, int] = regions
        self.topk = topk
        self.scale = float(qk_scale) if qk_scale is not None else qk_dim ** -0.5
        self.side_dwconv = side_dwconv
        self.per_head_routing = per_head_routing
        self.backend = backend
        self.param_attention = param_attention

        self.qkv = QKVLinear(dim, qk_dim, **dd)
        self.lepe = (
            nn.Conv2d(dim, dim, side_dwconv, stride=1, padding=side_dwconv // 2, groups=dim, **dd)
            if side_dwconv > 0 else None
        )
        self.wo = nn.Linear(dim, dim, **dd) if param_attention == "qkvo" else nn.Identity()

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, qk_dim={self.qk_dim}, num_heads={self.num_heads}, n_win={self.num_regions}, "
            f"topk={self.topk}, scale={self.scale:.4g}, side_dwconv={self.side_dwconv}, "
            f"per_head_routing={self.per_head_routing}"
        )

    def forward(self, x: torch.Tensor, ret_attn_mask: bool = False, *, return_routing: bool = False):
        """Apply the block.

        Args:
            x: ``(B, H, W, dim)`` channels-last map, float32/float16/bfloat16 (float64 on CPU), with
                ``H >= n_win`` rows and ``W >= n_win`` cols (divisibility not required).
            ret_attn_mask: BiFormer's flag to also return routing weights and the attention matrix. The fused
                kernels never build the attention matrix, so ``True`` raises ``NotImplementedError``; use
                ``return_routing``.
            return_routing: also return the routing index.

        Returns:
            ``out`` ``(B, H, W, dim)`` in x's dtype, or ``(out, idx)`` with ``return_routing``: idx int64
            ``(B, R, topk)`` (``(B, num_heads, R, topk)`` with ``per_head_routing``), ``R = n_win**2``
            regions numbered row-major, each row's key regions best first.
        """
        if ret_attn_mask:
            raise NotImplementedError(
                "ret_attn_mask=True: the fused kernels never materialise the attention matrix; pass "
                "return_routing=True to get the routing index (B, R, topk)"
            )
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(
                f"x must have shape (B, H, W, dim={self.dim}), got "
                f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
            )
        B, H, W, C = x.shape
        if C != self.dim:
            raise ValueError(f"x.shape[-1]={C} must equal dim={self.dim} (x is channels-last (B, H, W, dim))")
        if H < self.num_regions[0] or W < self.num_regions[1]:
            raise ValueError(
                f"n_win={self.n_win!r} cuts the map into {self.num_regions[0]}x{self.num_regions[1]} regions, which "
                f"needs at least that many tokens per side; got a {H}x{W} map"
            )
        heads = self.num_heads
        q, kv = self.qkv(x)  # views of one projection output, last dim contiguous
        v_map = kv[..., self.qk_dim:]  # (B, H, W, dim)
        q = q.unflatten(-1, (heads, self.qk_dim // heads))  # (B, H, W, heads, qk_dim/heads)
        k = kv[..., : self.qk_dim].unflatten(-1, (heads, self.qk_dim // heads))
        v = v_map.unflatten(-1, (heads, self.dim // heads))

        if return_routing:
            idx = ops.route(q, k, self.num_regions, self.topk, per_head=self.per_head_routing, backend=self.backend)
            out = ops.routed_attention(q, k, v, idx, self.num_regions, scale=self.scale, backend=self.backend)
        else:
            out = ops.bi_level_routing_attention(
                q, k, v, self.num_regions, self.topk, scale=self.scale, per_head=self.per_head_routing,
                backend=self.backend,
            )
        out = out.reshape(B, H, W, self.dim)
        if self.lepe is not None:
            out = out + self.lepe(v_map.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        out = self.wo(out)
        return (out, idx) if return_routing else out

    def load_biformer_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], prefix: str = "", strict: bool = True
    ):
        """Load the weights of a BiFormer attention module.

        Accepts the legacy module's names (``qkv.qkv.*``, ``wo.*``, ``lepe.*``: also loadable directly with
        ``load_state_dict``) and the refactored ``nchwBRA``'s (``qkv_linear.*`` 1x1 conv ``(3*dim, dim, 1, 1)``,
        ``output_linear.*``, ``lepe.*``; needs ``qk_dim == dim``). ``prefix`` selects one module's entries from a
        whole-model state dict (e.g. ``"stages.2.0.attn."``); a checkpoint nested under ``"model"`` is unwrapped.

        Returns ``load_state_dict``'s ``(missing_keys, unexpected_keys)``.
        """
        if "model" in state_dict and isinstance(state_dict["model"], Mapping):
            state_dict = state_dict["model"]
        sd: Dict[str, torch.Tensor] = {
            key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)
        }
        if not sd:
            raise ValueError(f"state_dict has no entries starting with prefix={prefix!r}")
        converted: Dict[str, torch.Tensor] = {}
        for key, value in sd.items():
            if key.startswith("qkv_linear."):  # nchwBRA: Conv2d(dim, 3*dim, 1) == Linear(dim, 3*dim)
                if self.qk_dim != self.dim:
                    raise ValueError(
                        f"an nchwBRA state dict (qkv_linear.*) needs qk_dim == dim, got qk_dim={self.qk_dim}, "
                        f"dim={self.dim}"
                    )
                key = "qkv.qkv." + key[len("qkv_linear."):]
                value = value.flatten(1) if value.dim() == 4 else value
            elif key.startswith("output_linear."):
                key = "wo." + key[len("output_linear."):]
                value = value.flatten(1) if value.dim() == 4 else value
            converted[key] = value
        return self.load_state_dict(converted, strict=strict)
