"""FER checkpoints: model weights as safetensors plus a JSON config, written atomically.

A checkpoint ``<stem>`` (``runs/NAME/best``, ``runs/NAME/last``) is

* ``<stem>.safetensors``: the model's ``state_dict`` (no pickle);
* ``<stem>.json``: the config, enough to rebuild the model and its input pipeline without the training code:
  ``model`` (timm name), ``model_kwargs``, ``num_classes``, ``classes``, ``img_size``, ``mean``, ``std``,
  ``interpolation``, ``dataset``, ``epoch`` (completed epochs), ``metrics``, plus ``format`` and
  ``checkpoint_id``;
* optionally ``<stem>.state.safetensors``: the training state for ``--resume`` (optimizer, scheduler, grad
  scaler, RNG states, best metric). Its tensors are safetensors tensors; everything else is a JSON document kept
  in the file's metadata, so no file of a checkpoint is ever unpickled.

Atomicity: every file is first written in full to ``<file>.tmp`` (fsynced), and only then are the ``.tmp`` files
renamed over the old ones with ``os.replace``, the JSON last. The three files carry the same random
``checkpoint_id``; a reader that finds them disagreeing (a kill between two renames) finishes the interrupted
save from the ``.tmp`` files that are still there, so a checkpoint is always either the old one or the new one.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

__all__ = [
    "CHECKPOINT_FORMAT",
    "CheckpointError",
    "build_model",
    "checkpoint_stem",
    "load_model",
    "load_training_state",
    "load_weights",
    "read_config",
    "repair_checkpoint",
    "save_checkpoint",
    "unwrap_model",
]

#: ``format`` field of every checkpoint config this module writes.
CHECKPOINT_FORMAT = "dynattn-fer-checkpoint/1"

_WEIGHTS, _CONFIG, _STATE = ".safetensors", ".json", ".state.safetensors"
_ID_KEY = "checkpoint_id"
_REQUIRED_KEYS = ("model", "model_kwargs", "num_classes", "classes", "img_size", "mean", "std")

PathLike = Union[str, "os.PathLike[str]"]


class CheckpointError(ValueError):
    """A checkpoint's files are missing, inconsistent or not in the expected format (the message names them)."""


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError('dynattn.fer checkpoints need safetensors: pip install "dynattn[fer]"') from e
    return st


# ---------------------------------------------------------------------------------------------- file helpers


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_tmp(path: str, data: bytes) -> str:
    """Write ``data`` to ``path + '.tmp'`` and fsync it; returns the temp path (renamed later)."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _commit(pairs: List[Tuple[str, str]]) -> None:
    """Rename ``(tmp, final)`` pairs in order (the JSON config last): the commit point of a save."""
    for tmp, final in pairs:
        os.replace(tmp, final)
    if pairs:
        _fsync_dir(os.path.dirname(os.path.abspath(pairs[-1][1])))


def _tensor_dict(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """CPU, contiguous, unshared copies where needed (safetensors refuses tensors that share storage)."""
    out: Dict[str, torch.Tensor] = {}
    seen = set()
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"state entry {k!r} must be a torch.Tensor, got {type(v).__name__}")
        t = v.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        if key is not None and (key in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size()):
            t = t.clone()
        elif key is not None:
            seen.add(key)
        out[k] = t
    return out


def _header_metadata(path: str) -> Dict[str, str]:
    _safetensors()
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e


def _file_id(path: str) -> Optional[str]:
    if not os.path.isfile(path):
        return None
    try:
        return _header_metadata(path).get(_ID_KEY)
    except CheckpointError:
        return None


# ---------------------------------------------------------------------------------------------- nested state


def _flatten_state(obj: Any, tensors: Dict[str, torch.Tensor], prefix: str) -> Any:
    """JSON skeleton of ``obj`` with tensors/arrays moved into ``tensors`` (replaced by ``{"__tensor__": key}``)."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, np.ndarray):
        tensors[prefix] = torch.from_numpy(np.ascontiguousarray(obj))
        return {"__ndarray__": prefix}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(f"extra_state keys must be str or int, got {k!r} at {prefix or '<root>'}")
            # JSON object keys are strings: remember int keys (optimizer state is keyed by parameter index)
            key = k if isinstance(k, str) else f"__int__{k}"
            out[key] = _flatten_state(v, tensors, f"{prefix}/{k}" if prefix else str(k))
        return out
    if isinstance(obj, (list, tuple)):
        items = [_flatten_state(v, tensors, f"{prefix}/{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return obj.item()
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    raise TypeError(f"extra_state value at {prefix or '<root>'} has unsupported type {type(obj).__name__}")


def _unflatten_state(obj: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__ndarray__"}:
            return tensors[obj["__ndarray__"]].numpy()
        if set(obj) == {"__tuple__"}:
            return tuple(_unflatten_state(v, tensors) for v in obj["__tuple__"])
        return {(int(k[7:]) if k.startswith("__int__") else k): _unflatten_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten_state(v, tensors) for v in obj]
    return obj


# ---------------------------------------------------------------------------------------------- paths


def checkpoint_stem(path: PathLike, *, default: str = "best") -> str:
    """The ``<stem>`` of a checkpoint given a run directory (``<dir>/<default>``), a ``.safetensors``, ``.json`` or
    ``.state.safetensors`` file, or the stem itself. Raises ``FileNotFoundError`` when no config is there."""
    p = os.fspath(path)
    if os.path.isdir(p):
        stem = os.path.join(p, default)
        if not os.path.isfile(stem + _CONFIG) and not os.path.isfile(stem + _CONFIG + ".tmp"):
            found = sorted(f for f in os.listdir(p) if f.endswith(_CONFIG))
            raise FileNotFoundError(
                f"run directory {p!r} has no {default}{_CONFIG} checkpoint"
                + (f" (it has: {', '.join(found)}; pass one of those files)" if found else "")
            )
        return stem
    for ext in (_STATE, _WEIGHTS, _CONFIG):
        if p.endswith(ext):
            p = p[: -len(ext)]
            break
    if not os.path.isfile(p + _CONFIG) and not os.path.isfile(p + _CONFIG + ".tmp"):
        raise FileNotFoundError(f"no checkpoint at {os.fspath(path)!r}: {p + _CONFIG} does not exist")
    return p


def repair_checkpoint(path: PathLike) -> None:
    """Finish a save of the checkpoint stem ``path`` that a kill interrupted between its renames (or drop the temp
    files of one that never reached them). Reading functions do this themselves; call it once from one process
    before several processes read the same checkpoint."""
    stem = os.fspath(path)
    for ext in (_STATE, _WEIGHTS, _CONFIG):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
            break
    _recover(stem)


def _recover(stem: str) -> None:
    """Finish a save that was interrupted between its renames, or drop the temp files of one that never reached
    them (an unparsable ``.json.tmp`` means the new files were still being written, and the old ones stand)."""
    cfg_tmp = stem + _CONFIG + ".tmp"
    if not os.path.isfile(cfg_tmp):
        return
    try:
        with open(cfg_tmp, encoding="utf-8") as f:
            new_id = json.load(f).get(_ID_KEY)
    except (OSError, ValueError):
        new_id = None
    pairs = []
    if new_id is not None:
        for ext in (_STATE, _WEIGHTS):
            final, tmp = stem + ext, stem + ext + ".tmp"
            if _file_id(tmp) == new_id:
                pairs.append((tmp, final))
            elif _file_id(final) != new_id and ext == _WEIGHTS:
                new_id = None  # the new weights are nowhere: this save cannot be completed
                break
    if new_id is None:
        for ext in (_STATE, _WEIGHTS, _CONFIG):
            if os.path.isfile(stem + ext + ".tmp"):
                os.remove(stem + ext + ".tmp")
        return
    _commit(pairs + [(cfg_tmp, stem + _CONFIG)])


# ---------------------------------------------------------------------------------------------- public API


def save_checkpoint(path: PathLike, model: nn.Module, config: Dict[str, Any], *,
                    extra_state: Optional[Dict[str, Any]] = None) -> str:
    """Write a checkpoint atomically: ``<path>.safetensors`` (weights), ``<path>.json`` (``config``) and, with
    ``extra_state``, ``<path>.state.safetensors``.

    Args:
        path: the checkpoint stem, without extension (e.g. ``"runs/rafdb/best"``); its directory is created.
        model: the model (a DDP/compiled wrapper is unwrapped); its ``state_dict`` is saved on CPU.
        config: JSON-serialisable dict with at least ``model``, ``model_kwargs``, ``num_classes``, ``classes``,
            ``img_size``, ``mean``, ``std`` (see the module docstring). ``format`` and ``checkpoint_id`` are added.
        extra_state: optional nested dict/list/tuple of tensors, numpy arrays and JSON scalars (an optimizer's
            ``state_dict()``, RNG states, ...). :func:`load_training_state` gives it back with the same types.

    Returns:
        The stem ``path`` as a string.
    """
    st = _safetensors()
    stem = os.fspath(path)
    for ext in (_STATE, _WEIGHTS, _CONFIG):
        if stem.endswith(ext):
            raise ValueError(f"path must be a checkpoint stem without extension, got {stem!r}")
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    missing = [k for k in _REQUIRED_KEYS if k not in config]
    if missing:
        raise ValueError(f"config is missing the keys {missing} (required: {list(_REQUIRED_KEYS)})")
    model = unwrap_model(model)
    ckpt_id = uuid.uuid4().hex
    config = dict(config, format=CHECKPOINT_FORMAT, **{_ID_KEY: ckpt_id})
    try:
        config_bytes = json.dumps(config, indent=2, allow_nan=True).encode("utf-8")
    except TypeError as e:
        raise TypeError(f"config must be JSON-serialisable: {e}") from e

    directory = os.path.dirname(os.path.abspath(stem))
    os.makedirs(directory, exist_ok=True)
    _recover(stem)  # never leave another save's temp files around to be confused with ours
    pairs = []
    if extra_state is not None:
        tensors: Dict[str, torch.Tensor] = {}
        skeleton = _flatten_state(extra_state, tensors, "")
        meta = {_ID_KEY: ckpt_id, "state": json.dumps(skeleton, allow_nan=True)}
        pairs.append((_write_tmp(stem + _STATE, st.save(_tensor_dict(tensors), metadata=meta)), stem + _STATE))
    weights = _tensor_dict(model.state_dict())
    pairs.append((_write_tmp(stem + _WEIGHTS, st.save(weights, metadata={_ID_KEY: ckpt_id})), stem + _WEIGHTS))
    pairs.append((_write_tmp(stem + _CONFIG, config_bytes), stem + _CONFIG))
    _commit(pairs)
    if extra_state is None and os.path.isfile(stem + _STATE):
        os.remove(stem + _STATE)  # a stale training state would not match these weights
    return stem


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ == "DataParallel":
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def read_config(path: PathLike) -> Dict[str, Any]:
    """The JSON config of the checkpoint at ``path`` (run directory -> ``best``, or a checkpoint file/stem)."""
    stem = checkpoint_stem(path)
    _recover_quietly(stem)
    cfg_path = stem + _CONFIG
    try:
        with open(cfg_path, encoding="utf-8") as f:
            config = json.load(f)
    except ValueError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from e
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_path} must hold a JSON object, got {type(config).__name__}")
    missing = [k for k in _REQUIRED_KEYS if k not in config]
    if missing:
        raise CheckpointError(f"{cfg_path} is not a dynattn-fer checkpoint config: missing keys {missing}")
    return config


def _recover_quietly(stem: str) -> None:
    try:
        _recover(stem)
    except OSError:  # read-only location: read what is committed
        pass


#: model kwargs that only name where initial weights come from; dropped when a model is rebuilt to load a checkpoint
_WEIGHT_SOURCE_KWARGS = ("backbone_weights",)


def build_model(config: Dict[str, Any], *, pretrained: bool = False) -> nn.Module:
    """``timm.create_model(config["model"], num_classes=config["num_classes"], **config["model_kwargs"])`` after
    registering dynattn's models; weights are random unless ``pretrained`` (the model's own pretrained weights)."""
    import timm

    import dynattn.models  # noqa: F401  (registers vit_bra_* and the baselines with timm)

    kwargs = dict(config.get("model_kwargs") or {})
    if not pretrained:  # initial-weight files (e.g. DAN's backbone_weights) are not needed, nor read, to rebuild
        for key in _WEIGHT_SOURCE_KWARGS:
            kwargs.pop(key, None)
    try:
        return timm.create_model(config["model"], pretrained=pretrained, num_classes=int(config["num_classes"]),
                                 **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(f"unknown model {config['model']!r}: not a timm or dynattn model name") from e
        raise


def load_model(path: PathLike, *, map_location: Union[str, torch.device] = "cpu") -> Tuple[nn.Module, Dict[str, Any]]:
    """Rebuild a trained model from its checkpoint.

    Args:
        path: a run directory (loads its ``best`` checkpoint), a checkpoint's ``.safetensors`` or ``.json`` file,
            or its stem.
        map_location: device for the model (``"cpu"``, ``"cuda:0"``, ...).

    Returns:
        ``(model, config)``: the model in eval mode on ``map_location`` (float32, as trained), and the config
        dict (``classes``, ``img_size``, ``mean``, ``std``, ... see the module docstring).

    Raises:
        FileNotFoundError: no checkpoint there. CheckpointError: the files disagree or are not a checkpoint.
    """
    config = read_config(path)
    stem = checkpoint_stem(path)
    device = torch.device(map_location)
    state = load_weights(stem, map_location=device)
    model = build_model(config)
    weights_path = stem + _WEIGHTS
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{weights_path} does not match model {config['model']!r} with "
                              f"{config.get('model_kwargs')}: missing {missing}, unexpected {unexpected}")
    return model.to(device).eval(), config


def load_weights(path: PathLike, *, map_location: Union[str, torch.device] = "cpu") -> Dict[str, torch.Tensor]:
    """The saved ``state_dict`` of the checkpoint at ``path`` (run directory -> ``best``, or a checkpoint file or
    stem), on ``map_location``, after checking that the weights belong to the checkpoint's config."""
    st = _safetensors()
    config = read_config(path)
    stem = checkpoint_stem(path)
    weights_path = stem + _WEIGHTS
    if not os.path.isfile(weights_path):
        raise FileNotFoundError(f"checkpoint weights {weights_path} do not exist (config {stem + _CONFIG})")
    meta_id = _header_metadata(weights_path).get(_ID_KEY)
    if config.get(_ID_KEY) is not None and meta_id != config.get(_ID_KEY):
        raise CheckpointError(f"{weights_path} does not belong to {stem + _CONFIG} (checkpoint ids differ: "
                              "the files come from different saves)")
    return st.load_file(weights_path, device=str(torch.device(map_location)))


def load_training_state(path: PathLike) -> Dict[str, Any]:
    """The ``extra_state`` saved with the checkpoint at ``path`` (a stem or file; a run directory means ``last``),
    tensors on CPU. Raises ``FileNotFoundError`` when the checkpoint has none, :class:`CheckpointError` when it
    belongs to another save than the checkpoint's config."""
    st = _safetensors()
    stem = checkpoint_stem(path, default="last")
    _recover_quietly(stem)
    state_path = stem + _STATE
    if not os.path.isfile(state_path):
        raise FileNotFoundError(f"checkpoint {stem} has no training state ({state_path} does not exist)")
    meta = _header_metadata(state_path)
    config = read_config(stem + _CONFIG)
    if meta.get(_ID_KEY) != config.get(_ID_KEY):
        raise CheckpointError(f"{state_path} does not belong to {stem + _CONFIG} (checkpoint ids differ)")
    if "state" not in meta:
        raise CheckpointError(f"{state_path} has no 'state' metadata: not a dynattn-fer training state")
    tensors = st.load_file(state_path, device="cpu")
    return _unflatten_state(json.loads(meta["state"]), tensors)
