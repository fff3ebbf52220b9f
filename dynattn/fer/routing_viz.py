"""See where a routed-attention ViT looks: capture each layer's routing index and draw it over the face.

In every :class:`dynattn.nn.RoutedAttention` layer of a ``vit_bra_*`` (or :func:`dynattn.convert_vit`) model,
each of the ``R = rows x cols`` query regions of the patch grid picks ``topk`` key regions to attend to.
:class:`capture_routing` records that choice with forward hooks that recompute :func:`dynattn.route` from the
layer's own input, q/k projection and norms, exactly as the layer does (so nothing in ``dynattn.nn`` changes and
the model's outputs are untouched). :func:`draw_routing` turns one layer's index into a PNG: for every query
region a small panel with the face dimmed except the routed key regions (the query region outlined), next to
heat maps of how many query regions route to each key region, in that layer and over all layers.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .. import ops
from ..nn.vit import RoutedAttention

__all__ = [
    "RoutingCapture",
    "capture_routing",
    "denormalize",
    "draw_routing",
    "region_bounds",
    "routed_attention_layers",
    "routing_maps",
]


def routed_attention_layers(model: nn.Module) -> List[Tuple[str, RoutedAttention]]:
    """``(qualified name, module)`` of every :class:`RoutedAttention` in ``model``, in forward (module) order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, RoutedAttention)]


def _route_like_layer(layer: RoutedAttention, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """The routing index ``layer`` uses for input ``x`` ``(B, N, dim)``: the layer's q/k steps, then route."""
    B, N, _ = x.shape
    grid = layer._grid_for(N)
    topk = layer._routing_for(grid)
    q, k, v = layer.qkv(x).unflatten(-1, (3, layer.num_heads, layer.head_dim)).unbind(2)
    q, k = layer.q_norm(q), layer.k_norm(k)
    if q.dtype != v.dtype:  # as the layer does under autocast
        q, k = q.to(v.dtype), k.to(v.dtype)
    P = layer.num_prefix_tokens
    qg, kg = q[:, P:].unflatten(1, grid), k[:, P:].unflatten(1, grid)
    idx = ops.route(qg, kg, layer.num_regions, topk, per_head=layer.per_head_routing, backend=layer.backend)
    return idx, grid


@dataclasses.dataclass
class RoutingCapture:
    """Routing recorded during forward passes, one entry per :class:`RoutedAttention` call.

    Attributes:
        names: layer names (``model.named_modules()``), in call order.
        idx: per call, int64 CPU tensor ``(B, R, topk)``, or ``(B, heads, R, topk)`` with per-head routing;
            ``R = rows * cols`` regions numbered row-major over the patch grid.
        grid_size: per call, the patch grid ``(H, W)`` in tokens.
        num_regions: per call, regions per grid side ``(rows, cols)``.
    """

    names: List[str] = dataclasses.field(default_factory=list)
    idx: List[torch.Tensor] = dataclasses.field(default_factory=list)
    grid_size: List[Tuple[int, int]] = dataclasses.field(default_factory=list)
    num_regions: List[Tuple[int, int]] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.idx)


class capture_routing:
    """Context manager recording the routing index of every :class:`RoutedAttention` layer of ``model``.

    ::

        with capture_routing(model) as cap:
            logits = model(x)            # x: (B, 3, S, S)
        cap.idx[-1]                      # (B, R, topk) routing of the last layer

    The hooks run under ``torch.no_grad`` and leave the outputs unchanged; they are removed on exit. Raises
    ``ValueError`` when ``model`` has no :class:`RoutedAttention` (e.g. a CNN baseline).
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = routed_attention_layers(model)
        if not self.layers:
            raise ValueError(
                f"{type(model).__name__} has no RoutedAttention layer: routing pictures need a vit_bra_* model or a "
                "ViT converted with dynattn.convert_vit"
            )
        self.capture = RoutingCapture()
        self._handles: list = []

    def _hook(self, name: str):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["x"]
            with torch.no_grad():
                idx, grid = _route_like_layer(module, x.detach())
            self.capture.names.append(name)
            self.capture.idx.append(idx.cpu())
            self.capture.grid_size.append(tuple(grid))
            self.capture.num_regions.append(tuple(module.num_regions))

        return hook

    def __enter__(self) -> RoutingCapture:
        for name, m in self.layers:
            self._handles.append(m.register_forward_hook(self._hook(name), with_kwargs=True))
        return self.capture

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def region_bounds(length: int, regions: int) -> List[Tuple[int, int]]:
    """Token spans ``[start, end)`` of the ``regions`` regions of an extent ``length`` (dynattn's partition:
    region ``i`` spans ``[floor(i*L/S), floor((i+1)*L/S))``)."""
    if not 1 <= regions <= length:
        raise ValueError(f"regions must be in [1, length={length}], got {regions}")
    return [(i * length // regions, (i + 1) * length // regions) for i in range(regions)]


def routing_maps(capture: RoutingCapture, layer: int = -1, *, batch_index: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """One layer's routing as arrays.

    Returns:
        ``selection``: float64 ``(R, R)``, ``selection[q, k]`` = fraction of heads whose query region ``q`` routes
        to key region ``k`` (0 or 1 with shared routing); ``key_count``: float64 ``(rows, cols)``, how many query
        regions route to each key region (``selection.sum(0)`` laid out on the region grid).
    """
    if not len(capture):
        raise ValueError("the capture is empty: run the model inside `with capture_routing(model) as cap:`")
    if not -len(capture) <= layer < len(capture):
        raise ValueError(f"layer must be in [{-len(capture)}, {len(capture)}), got {layer}")
    idx = capture.idx[layer]
    if not 0 <= batch_index < idx.shape[0]:
        raise ValueError(f"batch_index must be in [0, {idx.shape[0]}), got {batch_index}")
    rows, cols = capture.num_regions[layer]
    R = rows * cols
    idx = idx[batch_index]
    if idx.dim() == 2:  # shared routing: one "head"
        idx = idx.unsqueeze(0)
    heads = idx.shape[0]
    sel = np.zeros((heads, R, R), dtype=np.float64)
    h_i, q_i, _ = np.meshgrid(np.arange(heads), np.arange(R), np.arange(idx.shape[-1]), indexing="ij")
    sel[h_i, q_i, idx.numpy()] = 1.0
    sel = sel.mean(axis=0)
    return sel, sel.sum(axis=0).reshape(rows, cols)


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]):
    """The picture a model sees: ``(3, S, S)`` normalised float input -> RGB ``PIL.Image`` of size ``S x S``."""
    from PIL import Image

    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[0] != 3:
        raise ValueError(f"x must be a (3, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    m = torch.as_tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(3, 1, 1)
    img = (x.detach().float().cpu() * s + m).clamp(0, 1)
    return Image.fromarray((img.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8))


def _pixel_bounds(grid: Tuple[int, int], regions: Tuple[int, int], size: Tuple[int, int]):
    """Per region row / column: pixel spans on an image of ``size = (W, H)`` covering the token grid."""
    W, H = size
    rows = [(round(a * H / grid[0]), round(b * H / grid[0])) for a, b in region_bounds(grid[0], regions[0])]
    cols = [(round(a * W / grid[1]), round(b * W / grid[1])) for a, b in region_bounds(grid[1], regions[1])]
    return rows, cols


def _paint(values: np.ndarray, rows, cols, shape) -> np.ndarray:
    """Per-region values ``(rows, cols)`` -> a per-pixel map of ``shape (H, W)``."""
    out = np.zeros(shape, dtype=np.float64)
    for i, (y0, y1) in enumerate(rows):
        for j, (x0, x1) in enumerate(cols):
            out[y0:y1, x0:x1] = values[i, j]
    return out


def draw_routing(
    image,
    capture: RoutingCapture,
    path: str,
    *,
    layer: int = -1,
    batch_index: int = 0,
    query_regions: Optional[Sequence[int]] = None,
    title: Optional[str] = None,
) -> str:
    """Write a PNG of the routing of one layer over ``image``.

    Left: the face with a heat map of how many query regions route to each key region, for ``layer`` and summed
    over all captured layers (numbers in the regions). Right: one panel per query region (laid out like the
    regions, or only ``query_regions``), the face dimmed except the key regions it routes to (partly dimmed
    when only some heads route there), its own region outlined in red.

    Args:
        image: the model's input picture (e.g. :func:`denormalize` of the input tensor): ``PIL.Image`` or
            ``(H, W, 3)`` uint8 array; the patch grid is taken to cover it exactly.
        capture: from :class:`capture_routing`; all layers must share the grid and region layout.
        path: output ``.png``.
        layer: which captured layer the panels show (python index; default the last).
        batch_index: which image of the captured batch.
        query_regions: row-major region ids to show (default all).
        title: figure title.

    Returns:
        ``path``.
    """
    from matplotlib.patches import Rectangle
    from PIL import Image

    from .plots import _figure, _save

    sel, key_count = routing_maps(capture, layer, batch_index=batch_index)
    layer = layer % len(capture)
    grid, regions = capture.grid_size[layer], capture.num_regions[layer]
    rows_n, cols_n = regions
    R = rows_n * cols_n
    if query_regions is None:
        query_regions = list(range(R))
    query_regions = [int(r) for r in query_regions]
    if not query_regions or any(not 0 <= r < R for r in query_regions):
        raise ValueError(f"query_regions must be non-empty ids in [0, {R}), got {query_regions}")
    total = np.zeros_like(key_count)
    for i in range(len(capture)):
        if capture.num_regions[i] != regions or capture.grid_size[i] != grid:
            raise ValueError("all captured layers must share grid_size and num_regions to be drawn together")
        total += routing_maps(capture, i, batch_index=batch_index)[1]

    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image or a uint8 array, got {type(image).__name__}")
    img = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0
    H, W = img.shape[:2]
    prow, pcol = _pixel_bounds(grid, regions, (W, H))

    # query panels: near-square layout for a subset, the region layout for all
    if len(query_regions) == R:
        pr, pc = rows_n, cols_n
    else:
        pc = int(np.ceil(np.sqrt(len(query_regions))))
        pr = int(np.ceil(len(query_regions) / pc))
    cell = max(0.9, min(1.6, 9.0 / max(pr, pc)))
    fig = _figure(4.2 + pc * cell, max(8.4, pr * cell + 0.8))
    left, right = fig.subfigures(1, 2, width_ratios=[4.2, pc * cell])

    name = capture.names[layer]
    for k, (counts, label) in enumerate(((key_count, f"layer {layer} ({name})"),
                                         (total, f"all {len(capture)} layers"))):
        ax = left.add_subplot(2, 1, k + 1)
        ax.imshow(img)
        heat = _paint(counts, prow, pcol, (H, W))
        im = ax.imshow(heat, cmap="inferno", alpha=0.55, vmin=0, vmax=max(float(counts.max()), 1e-9))
        for i, (y0, y1) in enumerate(prow):
            for j, (x0, x1) in enumerate(pcol):
                if R <= 64:
                    ax.text((x0 + x1) / 2, (y0 + y1) / 2, f"{counts[i, j]:.0f}", ha="center", va="center",
                            fontsize=6, color="white")
        left.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        ax.set_title(f"times each key region is routed to\n{label}", fontsize=8)
        ax.set_axis_off()

    axes = right.subplots(pr, pc, squeeze=False)
    for a in axes.flat:
        a.set_axis_off()
    for a, q in zip(axes.flat, query_regions):
        mask = _paint(sel[q].reshape(rows_n, cols_n), prow, pcol, (H, W))
        a.imshow(img * (0.25 + 0.75 * mask[..., None]))
        (y0, y1), (x0, x1) = prow[q // cols_n], pcol[q % cols_n]
        a.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="red", linewidth=1.2))
        a.set_title(f"query {q}", fontsize=6, pad=1)
    right.suptitle(f"key regions routed from each query region (red), layer {layer}", fontsize=9)
    if title:
        left.suptitle(title, fontsize=9)
    return _save(fig, path)
