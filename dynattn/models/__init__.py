"""timm-registered FER classifiers: ViTs with bi-level routing attention, and baseline FER models.

Importing this package registers with timm (``timm.create_model(name, num_classes=7)``):

* ``vit_bra_tiny_patch16_224``, ``vit_bra_small_patch16_224``, ``vit_bra_base_patch16_224``: timm ViTs whose
  attention is bi-level routing attention (:mod:`dynattn.models.vit_bra`);
* the baselines from the FER literature: ``dan_resnet18`` (and ``dan_resnet50``) (:mod:`dynattn.models.dan`),
  ``mit_fer`` (:mod:`dynattn.models.mit_fer`) and ``patt_lite`` (:mod:`dynattn.models.patt_lite`). DAN returns its
  extra losses as ``(logits, {"affinity": ..., "partition": ...})`` from ``forward(x, targets)`` in training mode.

``python -m dynattn.models.flops`` prints their FLOPs and parameters next to the dense timm ViTs.
"""

from .vit_bra import (
    PRETRAINED_DIR_ENV,
    find_pretrained_file,
    load_dense_vit_weights,
    vit_bra_base_patch16_224,
    vit_bra_small_patch16_224,
    vit_bra_tiny_patch16_224,
)
from .dan import DAN, affinity_loss, dan_resnet18, dan_resnet50, load_dan_checkpoint, partition_loss  # noqa: E402
from .mit_fer import MiTFER, mit_fer  # noqa: E402
from .patt_lite import PAttLite, patt_lite  # noqa: E402

#: timm names of the baseline FER models, in the order the FLOPs table lists them.
BASELINE_MODELS = ("dan_resnet18", "mit_fer", "patt_lite")

__all__ = [
    "BASELINE_MODELS",
    "DAN",
    "MiTFER",
    "PAttLite",
    "PRETRAINED_DIR_ENV",
    "affinity_loss",
    "dan_resnet18",
    "dan_resnet50",
    "find_pretrained_file",
    "load_dan_checkpoint",
    "load_dense_vit_weights",
    "mit_fer",
    "partition_loss",
    "patt_lite",
    "vit_bra_base_patch16_224",
    "vit_bra_small_patch16_224",
    "vit_bra_tiny_patch16_224",
]
