"""ViT with bi-level routing attention (``vit_bra_*``), registered with timm.

``timm.create_model("vit_bra_base_patch16_224", num_classes=7)`` (after ``import dynattn``) builds timm's
``VisionTransformer`` of that size and converts every attention with :func:`dynattn.nn.convert_vit`: grid tokens
attend to their ``topk`` routed regions (plus the class token), the class token to everything.

Model kwargs on top of timm's ViT ones:

* ``num_regions`` (default 7): regions per grid side: 7x7 regions on the 14x14 grid at 224 px, of 2x2 tokens;
  on the 28x28 grid at 448 px, of 4x4 tokens.
* ``topk`` (default ``None``): key regions per query region. ``None`` follows BiFormer's key budget of
  64 keys per query (:data:`dynattn.nn.DEFAULT_KEYS_PER_QUERY`): 16 of 49 regions at 224 px (the setting of
  BiFormer's stage 3, which runs on the same 14x14 map with the same 7x7 regions), 4 of 49 at 448 px. A fixed
  budget keeps the attention cost linear in the number of tokens, while starting from dense ImageNet weights
  the larger share at 224 px keeps the change from dense attention moderate.
* ``per_head_routing`` (default False), ``backend`` (default ``"auto"``).

``pretrained=True`` loads timm's dense ViT weights of the same size (e.g. ``vit_base_patch16_224``'s default
tag) from a local file, never from the network: ``pretrained_cfg_overlay=dict(file=...)``, else
``$DYNATTN_PRETRAINED_DIR``, else the Hugging Face cache (``cache_dir`` or the default one). The position
embedding is resampled when ``img_size`` differs, and the classifier is dropped when ``num_classes`` differs.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

from timm.data import IMAGENET_INCEPTION_MEAN, IMAGENET_INCEPTION_STD
from timm.models import VisionTransformer, build_model_with_cfg, generate_default_cfgs, register_model

from ..nn.vit import convert_vit

__all__ = [
    "PRETRAINED_DIR_ENV",
    "find_local_weights",
    "find_pretrained_file",
    "load_dense_vit_weights",
    "vit_bra_tiny_patch16_224",
    "vit_bra_small_patch16_224",
    "vit_bra_base_patch16_224",
]

#: Environment variable naming a directory with dense timm ViT weights (``<timm model name>[.<tag>].safetensors``).
PRETRAINED_DIR_ENV = "DYNATTN_PRETRAINED_DIR"
_EXTENSIONS = (".safetensors", ".pth", ".bin", ".pt")
_HF_FILES = ("model.safetensors", "pytorch_model.bin")

# vit_bra name -> (dense timm model whose weights it reuses, architecture kwargs)
_ARCHS: Dict[str, Tuple[str, dict]] = {
    "vit_bra_tiny_patch16_224": ("vit_tiny_patch16_224", dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)),
    "vit_bra_small_patch16_224": ("vit_small_patch16_224", dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)),
    "vit_bra_base_patch16_224": ("vit_base_patch16_224", dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)),
}


def _cfg(**kwargs) -> dict:
    # timm's augreg ViT weights (the dense models' defaults) use inception mean/std
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": IMAGENET_INCEPTION_MEAN,
        "std": IMAGENET_INCEPTION_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({name: _cfg() for name in _ARCHS})


# ---------------------------------------------------------------------------------------------- weights


def _dense_hub_ids(dense_name: str) -> List[str]:
    """``timm/<dense model>.<default tag>`` of the dense model's default pretrained weights."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(dense_name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    return [hub_id] if hub_id else []


def find_local_weights(stems: Sequence[str], hub_ids: Sequence[str], *,
                       cache_dir: Optional[str] = None) -> Tuple[Optional[str], List[str]]:
    """Locate a weights file on disk; never touches the network.

    Looks in ``$DYNATTN_PRETRAINED_DIR`` for ``<stem>{.safetensors,.pth,.bin,.pt}`` and
    ``<stem>/{model.safetensors,pytorch_model.bin}`` (``hf download --local-dir <dir>/<stem>``) for each stem,
    then in the Hugging Face cache (``cache_dir`` or the default one) for each hub id's ``model.safetensors`` /
    ``pytorch_model.bin``.

    Returns ``(path or None, places looked at)``.
    """
    looked: List[str] = []
    directory = os.environ.get(PRETRAINED_DIR_ENV)
    if directory:
        for stem in stems:
            for path in [os.path.join(directory, stem + ext) for ext in _EXTENSIONS] + \
                        [os.path.join(directory, stem, f) for f in _HF_FILES]:
                looked.append(path)
                if os.path.isfile(path):
                    return path, looked
    else:
        looked.append(f"${PRETRAINED_DIR_ENV} (not set)")
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - huggingface_hub ships with timm
        try_to_load_from_cache = None
    for hub_id in hub_ids:
        for fname in _HF_FILES:
            looked.append(f"Hugging Face cache{'' if cache_dir is None else f' {cache_dir}'}: {hub_id}/{fname}")
            if try_to_load_from_cache is None:
                continue
            path = try_to_load_from_cache(hub_id, fname, cache_dir=cache_dir)
            if isinstance(path, str) and os.path.isfile(path):
                return path, looked
    return None, looked


def find_pretrained_file(dense_name: str, cache_dir: Optional[str] = None) -> Tuple[Optional[str], List[str]]:
    """Locate a timm model's default pretrained weights (e.g. the dense ViT's) on disk; no network access.

    :func:`find_local_weights` with the stems ``<name>.<tag>`` and ``<name>`` and the hub id of the model's default
    weights (e.g. ``timm/vit_base_patch16_224.augreg2_in21k_ft_in1k``).

    Returns ``(path or None, places looked at)``.
    """
    hub_ids = _dense_hub_ids(dense_name)
    stems = [h.split("/", 1)[-1] for h in hub_ids] + [dense_name]
    return find_local_weights(stems, hub_ids, cache_dir=cache_dir)


def load_dense_vit_weights(model: VisionTransformer, path: str) -> None:
    """Load a dense timm ViT checkpoint (safetensors or torch) into a (converted) ViT, in place.

    Uses timm's ``checkpoint_filter_fn``, which resamples the position embedding to ``model``'s grid (and the
    patch embedding to its patch size); the classifier is skipped when its shape differs (other
    ``num_classes``). Raises ``RuntimeError`` if any other weight is missing or unexpected.
    """
    from timm.models import load_state_dict
    from timm.models.vision_transformer import checkpoint_filter_fn

    state_dict = checkpoint_filter_fn(load_state_dict(path), model)
    own = model.state_dict()
    skipped = []
    for key in ("head.weight", "head.bias"):
        if key in state_dict and (key not in own or own[key].shape != state_dict[key].shape):
            del state_dict[key]
            skipped.append(key)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if k not in skipped]
    if missing or unexpected:
        raise RuntimeError(
            f"{path} does not match the model: missing keys {missing}, unexpected keys {unexpected} "
            "(is it a timm ViT checkpoint of the same size?)"
        )


def _load_pretrained(model: VisionTransformer, variant: str, dense_name: str, file: Optional[str],
                     cache_dir: Optional[str]) -> None:
    if file is None:
        file, looked = find_pretrained_file(dense_name, cache_dir=None if cache_dir is None else str(cache_dir))
        if file is None:
            hub = (_dense_hub_ids(dense_name) or [f"timm/{dense_name}"])[0]
            raise FileNotFoundError(
                f"{variant}(pretrained=True) needs timm's dense {dense_name} weights on disk (no download is "
                "attempted). Looked at:\n  " + "\n  ".join(looked) + "\nTo get them, on a machine with network "
                f"access run\n  hf download {hub} model.safetensors --local-dir <dir>/{hub.split('/', 1)[1]}\n"
                "or\n  python -c \"import timm, safetensors.torch as st; "
                f"st.save_file(timm.create_model('{dense_name}', pretrained=True).state_dict(), "
                f"'{dense_name}.safetensors')\"\nthen set {PRETRAINED_DIR_ENV}=<dir> (the folder holding the file), "
                "or pass pretrained_cfg_overlay=dict(file='/path/to/weights.safetensors')."
            )
    elif not os.path.isfile(file):
        raise FileNotFoundError(f"pretrained_cfg_overlay file={file!r} does not exist")
    load_dense_vit_weights(model, file)


# ---------------------------------------------------------------------------------------------- factories


def _create_vit_bra(
    variant: str,
    pretrained: bool = False,
    *,
    num_regions=7,
    topk: Optional[int] = None,
    per_head_routing: bool = False,
    backend: str = "auto",
    **kwargs,
) -> VisionTransformer:
    dense_name, arch = _ARCHS[variant]
    kwargs = dict(arch, **kwargs)
    out_indices = kwargs.pop("out_indices", 3)
    overlay = kwargs.pop("pretrained_cfg_overlay", None) or {}
    file = overlay.get("file") or None
    cache_dir = kwargs.get("cache_dir")

    def build(**model_kwargs) -> VisionTransformer:
        model = VisionTransformer(**model_kwargs)
        convert_vit(model, num_regions, topk, per_head_routing=per_head_routing, backend=backend)
        if pretrained:
            _load_pretrained(model, variant, dense_name, file, cache_dir)
        return model

    # timm handles the pretrained cfg (data config), features_only and kwargs; weights are loaded in build()
    return build_model_with_cfg(
        build,
        variant,
        pretrained=False,
        pretrained_cfg_overlay=overlay,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


@register_model
def vit_bra_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Ti/16 with bi-level routing attention (7x7 regions; weights of ``vit_tiny_patch16_224``)."""
    return _create_vit_bra("vit_bra_tiny_patch16_224", pretrained=pretrained, **kwargs)


@register_model
def vit_bra_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-S/16 with bi-level routing attention (7x7 regions; weights of ``vit_small_patch16_224``)."""
    return _create_vit_bra("vit_bra_small_patch16_224", pretrained=pretrained, **kwargs)


@register_model
def vit_bra_base_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-B/16 with bi-level routing attention (7x7 regions; weights of ``vit_base_patch16_224``)."""
    return _create_vit_bra("vit_bra_base_patch16_224", pretrained=pretrained, **kwargs)
