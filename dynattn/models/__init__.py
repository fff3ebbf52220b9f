"""timm-registered ViT classifiers with bi-level routing attention.

Importing this package registers ``vit_bra_tiny_patch16_224``, ``vit_bra_small_patch16_224`` and
``vit_bra_base_patch16_224`` with timm (``timm.create_model(name, num_classes=7)``). ``python -m
dynattn.models.flops`` prints their FLOPs and parameters next to the dense timm ViTs.
"""

from .vit_bra import (
    PRETRAINED_DIR_ENV,
    find_pretrained_file,
    load_dense_vit_weights,
    vit_bra_base_patch16_224,
    vit_bra_small_patch16_224,
    vit_bra_tiny_patch16_224,
)

__all__ = [
    "PRETRAINED_DIR_ENV",
    "find_pretrained_file",
    "load_dense_vit_weights",
    "vit_bra_base_patch16_224",
    "vit_bra_small_patch16_224",
    "vit_bra_tiny_patch16_224",
]
