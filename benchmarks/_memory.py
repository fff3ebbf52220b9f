"""Peak memory of one call: the most tensor memory live at once during it, above what was live before it.

CPU: the call runs once under ``torch.profiler.profile(profile_memory=True)``. Every allocation and free made
through torch's CPU allocator is then a ``[memory]`` event with a timestamp and a signed byte count (+ alloc,
- free). Summing the events in time order gives the live-bytes curve from the start of the call; its maximum is
the peak. It counts every tensor allocated through torch, temporaries inside ATen kernels included (e.g. SDPA's
scratch buffers); memory a compiled extension takes with its own malloc/new is invisible to it. The profiler
cannot size frees of blocks allocated before it started and drops them, so the number is exact for calls that
free nothing which existed before them -- true of the benchmark closures, whose inputs the caller holds.
The events are read from the profiler's raw result list (``prof.profiler.kineto_results``): the
``FunctionEvent`` view (``prof.events()``) folds allocations into the ops that made them.
Checked on known sequences (alloc 4, alloc 8, free 4, alloc 12 MiB -> 20 MiB) and against the size of the
buffer BiFormer's gather backward is known to allocate (600.25 MiB at BiFormer-T stage 1, batch 8).

CUDA: ``torch.cuda.max_memory_allocated() - memory_allocated()`` around the call, after
``reset_peak_memory_stats`` (the caching allocator's exact count of bytes handed to tensors).

Both are untimed: the call measured here is an extra one, outside the benchmark's rounds.
"""

from __future__ import annotations

from typing import Callable

import torch

MiB = 1024 * 1024


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        result = fn()
        del result  # its free is the last event; it was counted while it was live
    events = [
        (e.start_ns(), i, e.nbytes())
        for i, e in enumerate(prof.profiler.kineto_results.events())
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort()  # by time; the enumeration index keeps record order among equal timestamps
    live = peak = 0
    for _, _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def _cuda_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del result
    return peak


def peak_bytes(fn: Callable[[], object], device: torch.device | str) -> int:
    """Peak tensor bytes live during one call of ``fn`` above those live before it (see module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_peak_bytes(fn, device)
    if device.type == "cpu":
        return _cpu_peak_bytes(fn)
    raise ValueError(f"peak memory on device type {device.type!r} is not supported (cpu or cuda)")


def peak_mib(fn: Callable[[], object], device: torch.device | str) -> float:
    return peak_bytes(fn, device) / MiB
