"""FLOPs and parameters of the dense timm ViTs, their ``vit_bra_*`` versions and the baseline FER models, as
markdown tables.

    python -m dynattn.models.flops [--img-size 224 448] [--num-regions 7] [--topk K]

The ViT table covers ``--img-size``; the baselines (``dan_resnet18``, ``mit_fer``, ``patt_lite``) are listed at their
native input size (224 px) with 7 classes, next to the numbers their papers report.

Counted with ``torch.utils.flop_counter.FlopCounterMode`` on one image, forward only, on the meta device (no
memory, no compute). dynattn's ops report their own FLOP formulas to the counter. FlopCounterMode counts 2 FLOPs
per multiply-accumulate, the unit of the efficient-FER literature (ViT-B/16 at 224 px: 35.1 GFLOPs); fvcore-style
counts (1 per MAC, e.g. BiFormer's README) are half these numbers.
"""

from __future__ import annotations

import argparse
import math
from typing import Dict, List, Optional, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["BASELINES", "baselines_table", "count", "flops_table", "main"]

SIZES = (("tiny", "T"), ("small", "S"), ("base", "B"))

#: Baseline FER models: (label, timm name, paper params in M, paper GFLOPs as the paper reports them, note).
#: The papers count FLOPs as multiply-accumulates (1 per MAC), i.e. half of this table's GFLOPs column.
BASELINES = (
    ("DAN (ResNet-18, 4 heads)", "dan_resnet18", 19.72, 2.23,
     "paper's figures as cited in the FER literature (not re-verified here); MACs"),
    ("MiT-FER (MiT-B0 + fusion)", "mit_fer", 3.45, 0.425,
     "paper counts conv+linear MACs only (attention matmuls uncounted, thop-style): compare "
     "(GFLOPs - attention-matmul GFLOPs) / 2"),
    ("PAtt-Lite", "patt_lite", None, None,
     "no paper figure verified here; the authors' Keras model computes to 1.10M params (BN statistics included)"),
)


def count(model_name: str, img_size: int, **kwargs) -> Dict[str, float]:
    """FLOPs of one forward pass of ``timm.create_model(model_name, img_size=img_size, **kwargs)`` on 1 image.

    Returns a dict: ``gflops`` (total, 2 FLOPs per MAC), ``attn_gflops`` (token mixing only: everything but the
    linear layers and the convolutions), ``params_m`` (millions), ``tokens``, ``keys_per_query``
    (for a grid query), ``num_regions``/``topk`` (routed models). ``tokens``, ``grid`` and ``keys_per_query`` are
    ``None`` for models that are not ViTs (the baselines).
    """
    import timm

    import dynattn.models  # noqa: F401  (registers vit_bra_* and the baselines)

    with torch.device("meta"):
        model = timm.create_model(model_name, img_size=img_size, **kwargs).eval()
        x = torch.empty(1, 3, img_size, img_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    total = counter.get_total_flops()
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    dense_ops = sum(n for op, n in by_op.items() if op.startswith(("aten.addmm", "aten.mm", "aten.convolution")))
    info = {
        "gflops": total / 1e9,
        "attn_gflops": (total - dense_ops) / 1e9,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "tokens": None,
        "grid": None,
        "keys_per_query": None,
        "num_regions": None,
        "topk": None,
    }
    if not hasattr(model, "patch_embed"):  # not a ViT (the baseline FER models)
        return info
    grid = tuple(model.patch_embed.grid_size)
    n_grid = math.prod(grid)
    prefix = model.num_prefix_tokens
    attn = model.blocks[0].attn
    info.update(tokens=n_grid + prefix, grid=grid, keys_per_query=n_grid + prefix)
    if hasattr(attn, "num_regions"):
        from dynattn.nn.vit import default_topk

        topk = attn.topk if attn.topk is not None else default_topk(grid, attn.num_regions)
        R = math.prod(attn.num_regions)
        info.update(num_regions=attn.num_regions, topk=topk, keys_per_query=round(topk * n_grid / R) + prefix)
    return info


def flops_table(img_sizes: Sequence[int] = (224, 448), num_regions: int = 7, topk: Optional[int] = None) -> str:
    """The markdown table printed by ``python -m dynattn.models.flops``."""
    lines: List[str] = [
        "| model | img | tokens | regions | topk | keys/query | params (M) | GFLOPs (2 FLOPs/MAC) "
        "| attention GFLOPs | vs dense |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    bra_kwargs = {"num_regions": num_regions}
    if topk is not None:
        bra_kwargs["topk"] = topk
    for img in img_sizes:
        for size, short in SIZES:
            dense = count(f"vit_{size}_patch16_224", img)
            bra = count(f"vit_bra_{size}_patch16_224", img, **bra_kwargs)
            for name, info in ((f"ViT-{short}/16 (timm, dense)", dense), (f"ViT-BRA-{short}/16", bra)):
                regions = "-" if info["num_regions"] is None else "x".join(map(str, info["num_regions"]))
                lines.append(
                    f"| {name} | {img} | {info['tokens']} | {regions} | {info['topk'] or '-'} "
                    f"| {info['keys_per_query']} | {info['params_m']:.1f} | {info['gflops']:.2f} "
                    f"| {info['attn_gflops']:.2f} | {info['gflops'] / dense['gflops']:.3f} |"
                )
    return "\n".join(lines)


def baselines_table(num_classes: int = 7) -> str:
    """The markdown table of the baseline FER models (:data:`BASELINES`) printed by ``python -m dynattn.models.flops``:
    params and FLOPs at each model's native input size (its ``pretrained_cfg`` ``input_size``), next to the paper's.
    """
    import timm

    lines: List[str] = [
        "| model | timm name | img | params (M) | GFLOPs (2 FLOPs/MAC) | GMACs | attention-matmul GFLOPs "
        "| paper params (M) | paper GFLOPs | note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for label, name, paper_params, paper_gflops, note in BASELINES:
        img = timm.models.get_pretrained_cfg(name).input_size[-1]
        info = count(name, img, num_classes=num_classes)
        lines.append(
            f"| {label} | {name} | {img} | {info['params_m']:.2f} | {info['gflops']:.3f} | {info['gflops'] / 2:.3f} "
            f"| {info['attn_gflops']:.3f} | {'-' if paper_params is None else paper_params} "
            f"| {'-' if paper_gflops is None else paper_gflops} | {note} |"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dynattn.models.flops", description=__doc__.split("\n\n")[0])
    parser.add_argument("--img-size", type=int, nargs="+", default=[224, 448], help="input sizes (default 224 448)")
    parser.add_argument("--num-regions", type=int, default=7, help="regions per grid side (default 7)")
    parser.add_argument("--topk", type=int, default=None, help="routed regions (default: 64 keys per query)")
    args = parser.parse_args(argv)
    print(
        "FLOPs of one forward pass per image, counted by torch.utils.flop_counter.FlopCounterMode at 2 FLOPs per "
        "multiply-accumulate (fvcore-style counts are half); attention = everything but the linear layers and "
        "the patch embedding; keys/query = keys seen by a grid token (routed regions + class token).\n"
    )
    print(flops_table(args.img_size, args.num_regions, args.topk))
    print("\nBaseline FER models at their native input size, 7 classes (paper columns as the papers report them; "
          "their FLOPs are multiply-accumulates, compare with our GMACs):\n")
    print(baselines_table())


if __name__ == "__main__":
    main()
