"""``dynattn-fer train``: train an FER classifier with AdamW, a warmup + cosine schedule and checkpoints that resume
exactly.

    dynattn-fer train --dataset rafdb --data DIR --model vit_bra_small_patch16_224 --out runs/NAME
    torchrun --nproc_per_node 4 -m dynattn.fer train ...          # DistributedDataParallel

Outputs in ``--out``: ``best.{safetensors,json}`` (highest accuracy on the ``val`` split, never ``test``),
``last.{safetensors,json}`` + ``last.state.safetensors`` (training state for ``--resume``), ``metrics.jsonl``
(one JSON object per epoch) and, with ``--tensorboard``, ``tensorboard/``.

Reproducibility: data order, augmentation, dropout and every other random draw of an epoch depend only on
``(seed, epoch, rank)`` (the sampler is seeded per epoch, torch/numpy/python RNGs and the DataLoader's worker
seeds are re-seeded at the start of each epoch), so a run resumed after epoch ``k`` produces the same weights as
an uninterrupted run (bitwise on CPU; on GPU as far as the kernels are deterministic).

Models may return extra losses: when the (unwrapped) model's ``forward`` has a ``targets`` parameter it is called
as ``model(images, targets=labels)`` during training and may return ``(logits, {name: weighted scalar loss})``;
the losses are added to the classification loss and logged by name (``aux_<name>``).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import random
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from .checkpoint import (
    load_training_state,
    load_weights,
    read_config,
    repair_checkpoint,
    save_checkpoint,
    unwrap_model,
)
from .datasets.base import collate_skip_none
from .distributed import (
    DistInfo,
    ShardedSampler,
    all_gather_floats,
    all_reduce_sum,
    balanced_weights,
    barrier,
    cleanup_distributed,
    derive_seed,
    init_distributed,
    shard_indices,
)
from .transforms import DEFAULT_AUGMENT, eval_transform, train_transform

__all__ = ["WarmupCosineSchedule", "add_train_args", "parse_key_values", "run_train", "split_model_output",
           "train", "weights_fingerprint"]

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------- pieces


class WarmupCosineSchedule:
    """Per-step learning rate: linear warmup from 0 to each group's base lr over ``warmup_steps``, then cosine
    decay to ``min_lr`` at ``total_steps``.

    ``lr(step) = base * (step + 1) / warmup_steps`` for ``step < warmup_steps``, else
    ``min_lr + (base - min_lr) * (1 + cos(pi * t)) / 2`` with ``t = (step - warmup_steps) / (total - warmup)``.
    Call :meth:`step` once per optimizer step, before it (it sets the lr of the coming step).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int,
                 min_lr: float = 0.0) -> None:
        if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"need 0 <= warmup_steps <= total_steps and total_steps >= 1, got "
                             f"warmup_steps={warmup_steps}, total_steps={total_steps}")
        self.optimizer = optimizer
        self.warmup_steps, self.total_steps, self.min_lr = int(warmup_steps), int(total_steps), float(min_lr)
        self.base_lrs = [float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]
        for g, lr in zip(optimizer.param_groups, self.base_lrs):
            g["initial_lr"] = lr
        self.last_step = -1

    def lr_at(self, step: int, base: float) -> float:
        if step < self.warmup_steps:
            return base * (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        return self.min_lr + (base - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))

    def step(self) -> float:
        """Advance to the next step and set its lr; returns the first group's lr."""
        self.last_step += 1
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = self.lr_at(self.last_step, base)
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> Dict[str, Any]:
        return {"last_step": self.last_step, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
                "min_lr": self.min_lr, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.last_step = int(state["last_step"])
        self.base_lrs = [float(b) for b in state["base_lrs"]]


def split_model_output(output: Any) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """``logits`` or ``(logits, {name: scalar loss})`` -> ``(logits (B, C), aux losses dict)``."""
    if isinstance(output, torch.Tensor):
        return output, {}
    if isinstance(output, (tuple, list)) and len(output) == 2 and isinstance(output[0], torch.Tensor) \
            and isinstance(output[1], dict):
        aux = output[1]
        for name, value in aux.items():
            if not isinstance(name, str) or not isinstance(value, torch.Tensor) or value.numel() != 1:
                raise TypeError(f"the model's extra losses must map names to scalar tensors, got {name!r}: "
                                f"{type(value).__name__}{tuple(getattr(value, 'shape', ()))}")
        return output[0], dict(aux)
    raise TypeError("the model must return logits (B, C) or (logits, {name: loss}), got "
                    f"{type(output).__name__}")


def _wants_targets(model: nn.Module) -> bool:
    try:
        return "targets" in inspect.signature(unwrap_model(model).forward).parameters
    except (TypeError, ValueError):
        return False


def parse_key_values(items: Optional[Sequence[str]], flag: str, *, parse_values: bool = True) -> Dict[str, Any]:
    """``["key=value", ...]`` -> dict. With ``parse_values``, values are parsed as JSON when possible (``2``,
    ``0.5``, ``true``, ``[64, 64]``, ``null``), else kept as strings; without, all values stay strings (dataset
    options: ``build_dataset`` converts them to each option's type). Raises ``ValueError`` naming ``flag``."""
    out: Dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or not key.replace("_", "a").isalnum():
            raise ValueError(f"{flag} expects key=value with a Python identifier as key, got {item!r}")
        if key in out:
            raise ValueError(f"{flag} gives {key!r} twice")
        if not parse_values:
            out[key] = value
            continue
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _tqdm():
    try:
        from tqdm.auto import tqdm
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError('progress bars need tqdm: pip install "dynattn[fer]" (or pass --progress off)') from e
    return tqdm


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed)


def _rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


def collate_counting(batch: List[Optional[Tuple[Any, int]]]):
    """``(collate_skip_none(batch), number of unreadable items)``: counts skipped images even inside workers."""
    dropped = sum(b is None for b in batch)
    return collate_skip_none(batch), dropped


def _amp_context(amp: str, device: torch.device):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AMP_DTYPES[amp])


def weights_fingerprint(state_dict: Dict[str, torch.Tensor]) -> List[float]:
    """SHA-256 of a state dict (``name`` bytes then the tensor's raw bytes, in sorted name order), as four exact
    float64 numbers (48 bits each) so that it can travel through a float all-gather. Equal weights <=> equal values
    (up to hash collisions)."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu").contiguous()
        h.update(name.encode("utf-8"))
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    d = h.digest()
    return [float(int.from_bytes(d[6 * i: 6 * i + 6], "big")) for i in range(4)]


# ---------------------------------------------------------------------------------------------- CLI


def add_train_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``dynattn-fer train`` options to ``parser``; returns it."""
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", required=True, help="dataset name (see `dynattn-fer datasets`), e.g. rafdb")
    g.add_argument("--data", default=None, help="dataset root directory/file (not needed for 'synthetic')")
    g.add_argument("--data-opt", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="dataset option passed to the loader, e.g. --data-opt num_samples=700 (repeatable)")
    g.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader worker processes")
    g.add_argument("--balanced-sampler", action="store_true",
                   help="draw training samples with probability 1/class frequency (with replacement)")

    g = parser.add_argument_group("model")
    g.add_argument("--model", default="vit_bra_small_patch16_224", help="timm/dynattn model name")
    g.add_argument("--model-kwargs", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="extra timm.create_model kwargs, e.g. --model-kwargs depth=6 num_regions=7 topk=8")
    g.add_argument("--img-size", type=int, default=None,
                   help="input size (passed to the model as img_size); default: the model's own")
    g.add_argument("--pretrained", action="store_true",
                   help="start from the model's pretrained weights (vit_bra_*: dense timm ViT weights on disk)")

    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=30)
    g.add_argument("--batch-size", type=int, default=64, help="per process")
    g.add_argument("--lr", type=float, default=3e-4, help="peak AdamW learning rate")
    g.add_argument("--min-lr", type=float, default=1e-6, help="learning rate at the end of the cosine")
    g.add_argument("--weight-decay", type=float, default=0.05,
                   help="AdamW weight decay (not applied to biases, norms, position embeddings, tokens)")
    g.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warmup length, in epochs (may be 0)")
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--clip-grad", type=float, default=None, metavar="NORM", help="clip the gradient's L2 norm")
    g.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none",
                   help="autocast dtype: bf16 or fp16 on GPU (fp16 uses a grad scaler); bf16 also works on CPU")

    g = parser.add_argument_group("augmentation")
    g.add_argument("--hflip", type=float, default=DEFAULT_AUGMENT["hflip"], help="flip probability (0: off)")
    g.add_argument("--rotation", type=float, default=DEFAULT_AUGMENT["rotation"], help="max degrees (0: off)")
    g.add_argument("--crop-scale", type=float, nargs=2, default=list(DEFAULT_AUGMENT["crop_scale"]),
                   metavar=("MIN", "MAX"), help="random resized crop area range")
    g.add_argument("--no-random-crop", action="store_true", help="resize + center crop instead")
    g.add_argument("--erasing", type=float, default=DEFAULT_AUGMENT["erasing"],
                   help="random erasing probability (0: off)")

    g = parser.add_argument_group("run")
    g.add_argument("--out", required=True, help="run directory for checkpoints and metrics")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (torchrun: cuda:LOCAL_RANK)")
    g.add_argument("--resume", nargs="?", const="", default=None, metavar="CHECKPOINT",
                   help="continue from the last checkpoint of --out (or the given last.json / run directory)")
    g.add_argument("--tensorboard", action="store_true", help="also log to <out>/tensorboard")
    g.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                   help="progress bars (auto: when stderr is a terminal)")
    # stop after this many completed epochs, as if killed (tests resume equivalence); not a user feature
    g.add_argument("--stop-after-epoch", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def _check_args(args: argparse.Namespace) -> None:
    def positive(name: str, value, allow_zero: bool = False) -> None:
        if value is not None and (value < 0 or (value == 0 and not allow_zero)):
            raise ValueError(f"--{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")

    positive("epochs", args.epochs)
    positive("batch-size", args.batch_size)
    positive("lr", args.lr)
    positive("min-lr", args.min_lr, allow_zero=True)
    positive("weight-decay", args.weight_decay, allow_zero=True)
    positive("warmup-epochs", args.warmup_epochs, allow_zero=True)
    positive("workers", args.workers, allow_zero=True)
    positive("clip-grad", args.clip_grad)
    positive("img-size", args.img_size)
    if args.warmup_epochs > args.epochs:
        raise ValueError(f"--warmup-epochs ({args.warmup_epochs}) must not exceed --epochs ({args.epochs})")
    if not 0.0 <= args.label_smoothing < 1.0:
        raise ValueError(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    if args.min_lr > args.lr:
        raise ValueError(f"--min-lr ({args.min_lr}) must not exceed --lr ({args.lr})")
    for name in ("hflip", "erasing"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            raise ValueError(f"--{name} must be a probability in [0, 1], got {getattr(args, name)}")
    if not 0.0 <= args.rotation <= 180.0:
        raise ValueError(f"--rotation must be in [0, 180] degrees, got {args.rotation}")
    lo, hi = args.crop_scale
    if not 0.0 < lo <= hi <= 1.0:
        raise ValueError(f"--crop-scale MIN MAX must satisfy 0 < MIN <= MAX <= 1, got {lo} {hi}")
    from .datasets import dataset_names

    if args.dataset not in dataset_names():
        raise ValueError(f"unknown dataset {args.dataset!r}; expected one of {dataset_names()}")
    if args.data is None and args.dataset != "synthetic":
        raise ValueError(f"--data is required for dataset {args.dataset!r} (the dataset's root folder or file)")
    if args.stop_after_epoch is not None and args.stop_after_epoch < 1:
        raise ValueError(f"--stop-after-epoch must be >= 1, got {args.stop_after_epoch}")


# ---------------------------------------------------------------------------------------------- training


def _build_data(args, name: str, data_options: Dict[str, Any]):
    """The train and val splits (transforms are set once the model's input config is known)."""
    from .datasets import build_dataset

    root = args.data
    train_ds = build_dataset(name, root, "train", transform=None, **data_options)
    val_ds = build_dataset(name, root, "val", transform=None, **data_options)
    if len(train_ds) == 0:
        raise ValueError(f"dataset {name!r} at {root!r} has no training samples")
    if len(val_ds) == 0:
        raise ValueError(f"dataset {name!r} at {root!r} has an empty val split: cannot select the best epoch")
    if list(train_ds.classes) != list(val_ds.classes):
        raise ValueError(f"dataset {name!r}: train and val classes differ ({train_ds.classes} vs {val_ds.classes})")
    if len(train_ds.classes) < 2:
        raise ValueError(f"dataset {name!r} must have at least 2 classes, got {list(train_ds.classes)}")
    return train_ds, val_ds


def _optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    from timm.optim import param_groups_weight_decay

    skip = getattr(model, "no_weight_decay", None)
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip() if callable(skip) else ())
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def _rewrite_metrics(path: str, keep_epochs: int) -> None:
    """Drop metrics lines of epochs after ``keep_epochs`` (written before a kill, redone after the resume)."""
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [ln for ln in f if ln.strip()]
    kept = []
    for ln in lines:
        try:
            if int(json.loads(ln)["epoch"]) <= keep_epochs:
                kept.append(ln)
        except (ValueError, KeyError, TypeError):
            continue
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)


_RESUME_MUST_MATCH = ("model", "model_kwargs", "num_classes", "dataset")


def train(args: argparse.Namespace) -> Dict[str, Any]:
    """Run training as configured by the ``train`` CLI options in ``args`` (see :func:`add_train_args`).

    Returns a summary dict on every rank: ``best_val_acc``, ``best_epoch``, ``epochs_done``, ``out`` and the last
    epoch's ``metrics``. Raises ``ValueError``/``FileNotFoundError`` for bad options, data or checkpoints.
    """
    import timm

    import dynattn.models  # noqa: F401  (registers the dynattn models with timm)

    _check_args(args)
    dist_info, device = init_distributed(args.device)
    try:
        return _train(args, dist_info, device, timm)
    finally:
        cleanup_distributed()


def _train(args: argparse.Namespace, dist_info: DistInfo, device: torch.device, timm) -> Dict[str, Any]:
    if args.amp == "fp16" and device.type != "cuda":
        raise ValueError("--amp fp16 needs a CUDA device (on CPU use --amp bf16 or none)")
    main = dist_info.is_main
    out = os.path.abspath(args.out)
    model_kwargs = parse_key_values(args.model_kwargs, "--model-kwargs")
    data_options = parse_key_values(args.data_opt, "--data-opt", parse_values=False)
    for reserved in ("num_classes", "pretrained"):
        if reserved in model_kwargs:
            raise ValueError(f"--model-kwargs must not set {reserved!r} (use the dedicated option)")
    if args.img_size is not None:
        if model_kwargs.get("img_size", args.img_size) != args.img_size:
            raise ValueError(f"--img-size {args.img_size} contradicts --model-kwargs "
                             f"img_size={model_kwargs['img_size']}")
        model_kwargs["img_size"] = args.img_size

    resume_stem = None
    if args.resume is not None:
        resume_stem = os.path.join(out, "last") if args.resume == "" else args.resume
        if os.path.isdir(resume_stem):
            resume_stem = os.path.join(resume_stem, "last")
        for ext in (".state.safetensors", ".safetensors", ".json"):
            if resume_stem.endswith(ext):
                resume_stem = resume_stem[: -len(ext)]
                break
        if not os.path.isfile(resume_stem + ".json") and not os.path.isfile(resume_stem + ".json.tmp"):
            raise FileNotFoundError(f"--resume: no checkpoint {resume_stem}.json to resume from")
    elif os.path.isfile(os.path.join(out, "last.json")):
        raise ValueError(f"--out {args.out!r} already holds a run (last.json): pass --resume to continue it, or "
                         "choose another --out")

    # ---- data first (the model's head needs the classes), then the model, then the transforms (they need the
    # model's input size and normalisation)
    train_ds, val_ds = _build_data(args, args.dataset, data_options)
    classes = [str(c) for c in train_ds.classes]
    num_classes = len(classes)
    torch.manual_seed(args.seed)
    try:
        # a resumed run takes every weight from its checkpoint: the pretrained file is not needed again
        model = timm.create_model(args.model, pretrained=args.pretrained and resume_stem is None,
                                  num_classes=num_classes, **model_kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise ValueError(f"--model {args.model!r} is not a timm/dynattn model name") from e
        raise
    except TypeError as e:
        raise ValueError(f"--model-kwargs {model_kwargs} not accepted by {args.model}: {e}") from e
    data_cfg = timm.data.resolve_data_config({}, model=model)
    img_size = args.img_size or model_kwargs.get("img_size") or data_cfg["input_size"][-1]
    if isinstance(img_size, (list, tuple)):
        img_size = int(img_size[-1])
    config: Dict[str, Any] = {
        "model": args.model,
        "model_kwargs": model_kwargs,
        "num_classes": num_classes,
        "classes": classes,
        "img_size": int(img_size),
        "mean": [float(m) for m in data_cfg["mean"]],
        "std": [float(s) for s in data_cfg["std"]],
        "interpolation": str(data_cfg.get("interpolation", "bicubic")),
        "dataset": args.dataset,
        "data": os.path.abspath(args.data) if args.data is not None else None,
        "data_options": data_options,
        "pretrained": bool(args.pretrained),
        "train_args": _jsonable({k: v for k, v in vars(args).items() if k not in ("func", "stop_after_epoch")}),
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
    }
    augment = dict(hflip=args.hflip, rotation=args.rotation, erasing=args.erasing,
                   crop_scale=None if args.no_random_crop else tuple(args.crop_scale))
    train_ds.transform = train_transform(config, **augment)
    val_ds.transform = eval_transform(config)
    model.to(device)

    # ---- optimisation
    optimizer = _optimizer(model, args.lr, args.weight_decay)
    weights = balanced_weights(train_ds.targets, num_classes) if args.balanced_sampler else None
    sampler = ShardedSampler(len(train_ds), num_replicas=dist_info.world_size, rank=dist_info.rank,
                             shuffle=True, weights=weights, seed=args.seed)
    drop_last = len(sampler) >= args.batch_size  # tiny datasets keep their only (partial) batch
    steps_per_epoch = len(sampler) // args.batch_size if drop_last else 1
    total_steps = steps_per_epoch * args.epochs
    schedule = WarmupCosineSchedule(optimizer, warmup_steps=int(round(args.warmup_epochs * steps_per_epoch)),
                                    total_steps=total_steps, min_lr=args.min_lr)
    scaler = torch.amp.GradScaler("cuda") if args.amp == "fp16" else None
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    wants_targets = _wants_targets(model)

    start_epoch, best_acc, best_epoch = 0, -1.0, 0
    if resume_stem is not None:
        if main:  # finish a save interrupted by the kill, once, before any rank reads the files
            repair_checkpoint(resume_stem)
        barrier()
        start_epoch, best_acc, best_epoch = _resume(resume_stem, model, optimizer, schedule, scaler, config, device,
                                                    main)
    if start_epoch >= args.epochs and main:
        print(f"nothing to do: the checkpoint has completed {start_epoch} of {args.epochs} epochs", file=sys.stderr)

    ddp_model: nn.Module = model
    if dist_info.enabled:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    metrics_path = os.path.join(out, "metrics.jsonl")
    writer = None
    if main:
        os.makedirs(out, exist_ok=True)
        if resume_stem is not None:
            _rewrite_metrics(metrics_path, start_epoch)
        else:
            open(metrics_path, "w", encoding="utf-8").close()
        if args.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError('--tensorboard needs the tensorboard package: pip install tensorboard') from e
            writer = SummaryWriter(os.path.join(out, "tensorboard"))
    show_progress = main and (args.progress == "on" or (args.progress == "auto" and sys.stderr.isatty()))
    val_indices = shard_indices(len(val_ds), dist_info.rank, dist_info.world_size)

    last_metrics: Dict[str, Any] = {}
    epoch = start_epoch
    for epoch in range(start_epoch, args.epochs):
        t0 = time.perf_counter()
        # every random draw of this epoch depends on (seed, epoch, rank) only: what makes --resume exact
        _seed_everything(derive_seed(args.seed, epoch, dist_info.rank))
        sampler.set_epoch(epoch)
        loader = DataLoader(train_ds, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                            collate_fn=collate_counting, drop_last=drop_last, pin_memory=device.type == "cuda",
                            generator=torch.Generator().manual_seed(derive_seed(args.seed, epoch, dist_info.rank,
                                                                                1)))
        train_stats = _train_epoch(ddp_model, loader, optimizer, schedule, scaler, criterion, args, device,
                                   wants_targets, epoch, show_progress, img_size=int(img_size))
        train_time = time.perf_counter() - t0
        val_stats = _validate(model, Subset(val_ds, val_indices), args, device, num_classes, epoch, show_progress)

        images = train_stats.pop("_images")
        metrics = {"epoch": epoch + 1, **train_stats, **val_stats, "lr": optimizer.param_groups[0]["lr"],
                   "time_s": time.perf_counter() - t0, "images_per_s": images / max(train_time, 1e-9)}
        is_best = metrics["val_acc"] > best_acc
        if is_best:
            best_acc, best_epoch = metrics["val_acc"], epoch + 1
        metrics.update(best_val_acc=best_acc, best_epoch=best_epoch, world_size=dist_info.world_size)
        if dist_info.enabled:
            prints = all_gather_floats(weights_fingerprint(model.state_dict()), device)
            metrics["rank_fingerprints"] = prints
            if any(p != prints[0] for p in prints):
                raise RuntimeError(f"DDP ranks hold different weights after epoch {epoch + 1}: {prints}")
        last_metrics = metrics
        if main:
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(metrics) + "\n")
            if writer is not None:
                for k, v in metrics.items():
                    if isinstance(v, (int, float)) and k != "epoch":
                        writer.add_scalar(k, v, epoch + 1)
                writer.flush()
            ckpt_config = dict(config, epoch=epoch + 1, metrics=metrics)
            if is_best:
                save_checkpoint(os.path.join(out, "best"), model, ckpt_config)
            state = {
                "epoch": epoch + 1,
                "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "rng": _rng_state(),
                "best_val_acc": best_acc,
                "best_epoch": best_epoch,
                "sampler_epoch": epoch + 1,
                "world_size": dist_info.world_size,
            }
            save_checkpoint(os.path.join(out, "last"), model, ckpt_config, extra_state=state)
            print(_epoch_line(metrics, args.epochs), flush=True)
        if args.stop_after_epoch is not None and epoch + 1 >= args.stop_after_epoch:
            epoch += 1
            break
    else:
        epoch = args.epochs
    if writer is not None:
        writer.close()
    return {"best_val_acc": best_acc, "best_epoch": best_epoch, "epochs_done": epoch, "out": out,
            "metrics": last_metrics}


def _resume(stem: str, model: nn.Module, optimizer, schedule, scaler, config, device, main: bool):
    saved = read_config(stem + ".json")
    diff = [k for k in _RESUME_MUST_MATCH if _jsonable(saved.get(k)) != _jsonable(config.get(k))]
    if diff:
        raise ValueError(f"--resume: checkpoint {stem} was trained with different "
                         + ", ".join(f"{k} ({saved.get(k)!r} vs now {config.get(k)!r})" for k in diff))
    state = load_training_state(stem)
    model.load_state_dict(load_weights(stem + ".json"))
    model.to(device)
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"])
    if main:
        changed = sorted(k for k, v in (saved.get("train_args") or {}).items()
                         if k not in ("resume", "progress") and config["train_args"].get(k) != v)
        if changed:
            print(f"warning: resuming with changed options {changed}; the result will differ from an "
                  "uninterrupted run", file=sys.stderr)
        print(f"resuming from {stem} after epoch {state['epoch']}", file=sys.stderr)
    return int(state["epoch"]), float(state["best_val_acc"]), int(state["best_epoch"])


def _train_epoch(model, loader, optimizer, schedule, scaler, criterion, args, device, wants_targets, epoch,
                 show_progress, *, img_size: int) -> Dict[str, Any]:
    model.train()
    distributed = isinstance(model, nn.parallel.DistributedDataParallel)
    sums: Dict[str, torch.Tensor] = {}
    n_images = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.float64, device=device)
    unreadable = 0
    iterator = loader
    if show_progress:
        iterator = _tqdm()(loader, desc=f"epoch {epoch + 1}/{args.epochs}", leave=False, dynamic_ncols=True)
    for step, (batch, dropped) in enumerate(iterator):
        unreadable += dropped
        weight = 1.0
        if batch is None and not distributed:
            schedule.step()  # every image unreadable: skip the update, keep the schedule on time
            continue
        if batch is None:
            # every image of this batch was unreadable, but DDP needs every rank in the gradient all-reduce
            images = torch.zeros(1, 3, img_size, img_size, device=device)
            labels = torch.zeros(1, dtype=torch.long, device=device)
            weight = 0.0
        else:
            images, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        schedule.step()
        with _amp_context(args.amp, device):
            output = model(images, targets=labels) if wants_targets else model(images)
            logits, aux = split_model_output(output)
            ce = criterion(logits.float(), labels)
            loss = ce + sum((v.float().reshape(()) for v in aux.values()), torch.zeros((), device=device))
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss * weight).backward()
            if args.clip_grad is not None:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
        else:
            (loss * weight).backward()
            if args.clip_grad is not None:
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            optimizer.step()
        if weight:
            b = labels.shape[0]
            n_images += b
            correct += (logits.detach().argmax(1) == labels).sum()
            for name, value in (("loss", loss), ("ce_loss", ce), *((f"aux_{k}", v) for k, v in aux.items())):
                sums[name] = sums.get(name, torch.zeros((), dtype=torch.float64, device=device)) \
                    + value.detach().double().reshape(()) * b
        if show_progress and step % 10 == 0:
            iterator.set_postfix(loss=f"{float(sums['loss'] / n_images.clamp_min(1)):.4f}" if sums else "-",
                                 lr=f"{optimizer.param_groups[0]['lr']:.2e}")
    # reduce over ranks: names must agree, so order them
    names = sorted(sums)
    packed = torch.stack([n_images, correct, torch.tensor(float(unreadable), dtype=torch.float64, device=device)]
                         + [sums[k] for k in names])
    all_reduce_sum(packed)
    total = float(packed[0])
    stats = {k: float(packed[3 + i]) / max(total, 1.0) for i, k in enumerate(names)}
    if "loss" in stats and not math.isfinite(stats["loss"]):
        raise FloatingPointError(f"training loss is {stats['loss']} in epoch {epoch + 1}: lower --lr, use "
                                 "--clip-grad, or --amp bf16/none")
    return {"train_" + k if not k.startswith("aux_") else k: v for k, v in stats.items()} | {
        "train_acc": float(packed[1]) / max(total, 1.0), "train_unreadable": int(packed[2]), "_images": total}


@torch.no_grad()
def _validate(model, dataset, args, device, num_classes: int, epoch: int, show_progress: bool) -> Dict[str, Any]:
    model.eval()
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
                        collate_fn=collate_counting, pin_memory=device.type == "cuda")
    cm = torch.zeros(num_classes, num_classes, dtype=torch.float64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    unreadable = 0
    iterator = loader
    if show_progress:
        iterator = _tqdm()(loader, desc=f"val {epoch + 1}", leave=False, dynamic_ncols=True)
    for batch, dropped in iterator:
        unreadable += dropped
        if batch is None:
            continue
        images, labels = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        with _amp_context(args.amp, device):
            logits, _ = split_model_output(model(images))
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        pred = logits.argmax(1)
        cm.index_put_((labels, pred), torch.ones_like(labels, dtype=torch.float64), accumulate=True)
    packed = torch.cat([cm.flatten(), loss_sum.reshape(1),
                        torch.tensor([float(unreadable)], dtype=torch.float64, device=device)])
    all_reduce_sum(packed)
    cm = packed[: num_classes * num_classes].reshape(num_classes, num_classes).cpu()
    total = float(cm.sum())
    support = cm.sum(1)
    recall = cm.diag()[support > 0] / support[support > 0]
    return {
        "val_acc": float(cm.diag().sum()) / max(total, 1.0),
        "val_mean_class_acc": float(recall.mean()) if recall.numel() else 0.0,
        "val_loss": float(packed[-2]) / max(total, 1.0),
        "val_samples": int(total),
        "val_unreadable": int(packed[-1]),
    }


def _epoch_line(m: Dict[str, Any], epochs: int) -> str:
    aux = "".join(f" {k}={v:.4f}" for k, v in m.items() if k.startswith("aux_"))
    return (f"epoch {m['epoch']}/{epochs}: train_loss={m.get('train_loss', float('nan')):.4f}{aux} "
            f"val_acc={m['val_acc']:.4f} val_mean_class_acc={m['val_mean_class_acc']:.4f} lr={m['lr']:.3e} "
            f"{m['images_per_s']:.1f} img/s {m['time_s']:.1f}s"
            + (" *best*" if m["best_epoch"] == m["epoch"] else ""))


def run_train(args: argparse.Namespace) -> int:
    """CLI entry of ``dynattn-fer train``; returns the exit status."""
    summary = train(args)
    if summary["best_epoch"] and int(os.environ.get("RANK", "0")) == 0:
        print(f"best val_acc {summary['best_val_acc']:.4f} at epoch {summary['best_epoch']}; checkpoints in "
              f"{summary['out']}")
    return 0
