"""Distributed training helpers: process-group setup from ``torchrun``'s environment, samplers that shard and
shuffle by ``(seed, epoch)``, and reductions that are no-ops in a single process.

``torchrun --nproc_per_node N -m dynattn.fer train ...`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``;
:func:`init_distributed` then joins the process group (NCCL on CUDA devices, gloo on CPU) and picks the device
(``cuda:LOCAL_RANK``). Without those variables everything runs in one process and the collectives do nothing.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = [
    "DistInfo",
    "ShardedSampler",
    "all_gather_floats",
    "all_reduce_sum",
    "balanced_weights",
    "barrier",
    "cleanup_distributed",
    "derive_seed",
    "init_distributed",
    "shard_indices",
]


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed derived from ``seed`` and ``keys`` (e.g. epoch, rank), independent for different keys."""
    words = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, *(int(k) for k in keys)]).generate_state(2)
    return int((int(words[0]) << 31) ^ int(words[1])) & 0x7FFFFFFFFFFFFFFF


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size`` (``local_rank`` on its node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def init_distributed(device: Optional[str] = None) -> Tuple[DistInfo, torch.device]:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE > 1``) and choose the device.

    Args:
        device: ``None``/``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``. Under
            ``torchrun`` with CUDA, each process takes ``cuda:LOCAL_RANK``.

    Returns:
        ``(info, device)``. The backend is NCCL for CUDA devices and gloo for CPU.
    """
    world = _env_int("WORLD_SIZE", 1)
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if device in (None, "", "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device!r} asks for CUDA but no CUDA device is available")
        if world > 1 or dev.index is None:
            dev = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
        torch.cuda.set_device(dev)
    info = DistInfo(rank=rank, world_size=world, local_rank=local)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", init_method="env://")
    return info, dev


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if _active():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all processes, in place (returned); unchanged in a single process."""
    if _active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_floats(values: Sequence[float], device: torch.device) -> List[List[float]]:
    """Every process's ``values`` (same length everywhere), as float64, in rank order."""
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    if not _active():
        return [t.tolist()]
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]


def shard_indices(n: int, rank: int, world_size: int) -> List[int]:
    """Indices ``rank, rank + world_size, ...`` of ``range(n)``: disjoint shards that together cover everything
    once (evaluation must not count a sample twice, unlike :class:`ShardedSampler`'s padding)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return list(range(rank, n, world_size))


class ShardedSampler(Sampler[int]):
    """Training sampler: one permutation (or a class-balanced draw) per epoch from ``(seed, epoch)``, cut into
    ``num_replicas`` equal shards.

    Args:
        num_samples: dataset length ``N``.
        num_replicas, rank: the process's share (``1, 0`` without distribution).
        shuffle: random order (else ``0..N-1``); ignored with ``weights``.
        weights: optional per-sample weights (e.g. inverse class frequency): ``N`` indices are then drawn with
            replacement proportionally to them, as in a class-balanced sampler.
        seed: base seed; the epoch's order depends only on ``(seed, epoch)``, so all ranks agree on it and a
            resumed run sees the same order as an uninterrupted one.

    Every rank yields ``ceil(N / num_replicas)`` indices (the global list is padded by wrapping around), so all
    ranks run the same number of steps.
    """

    def __init__(self, num_samples: int, *, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 weights: Optional[Sequence[float]] = None, seed: int = 0) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={num_replicas}), got {rank}")
        self.n, self.num_replicas, self.rank = num_samples, num_replicas, rank
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.weights = None
        if weights is not None:
            w = torch.as_tensor(weights, dtype=torch.float64)
            if w.shape != (num_samples,) or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
                raise ValueError(f"weights must be {num_samples} finite non-negative numbers with a positive sum")
            self.weights = w
        self.per_rank = math.ceil(num_samples / num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def global_order(self) -> List[int]:
        """The epoch's indices over all ranks (before sharding), ``N`` long."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, 0x5A4D))
        if self.weights is not None:
            return torch.multinomial(self.weights, self.n, replacement=True, generator=g).tolist()
        if self.shuffle:
            return torch.randperm(self.n, generator=g).tolist()
        return list(range(self.n))

    def __iter__(self) -> Iterator[int]:
        order = self.global_order()
        total = self.per_rank * self.num_replicas
        order = (order * math.ceil(total / len(order)))[:total]
        return iter(order[self.rank:total:self.num_replicas])

    def __len__(self) -> int:
        return self.per_rank


def balanced_weights(targets: Sequence[int], num_classes: int) -> torch.Tensor:
    """Per-sample weights ``1 / count(class)``, so every class is drawn equally often on average (float64, ``(N,)``)."""
    t = torch.as_tensor(list(targets), dtype=torch.int64)
    counts = torch.bincount(t, minlength=num_classes).to(torch.float64)
    return 1.0 / counts.clamp_min(1.0)[t]
