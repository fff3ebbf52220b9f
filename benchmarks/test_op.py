"""Op-level benchmarks: the fused routed attention vs unfused gather forms, dense SDPA and the reference.

One case = (device, impl, shape, pass). Per case, untimed: the output (and for fwd+bwd the gradients) is
checked once against ``dynattn.reference`` and the peak memory of one call is measured; then the call is
timed with ``benchmark.pedantic``. Run: ``pytest benchmarks/ --benchmark-only`` (see benchmarks/README.md).

Impls (all take and return dynattn's ``(B, H, W, heads, D)`` layout):

* ``fused_<backend>``: ``dynattn.routed_attention(..., backend=<backend>)`` with a precomputed ``idx``
* ``fused_route_<backend>``: ``dynattn.bi_level_routing_attention(..., backend=<backend>)`` (routing timed too)
* ``index_select_gather``, ``biformer_gather``, ``dense_sdpa``: see ``_impls.py``
* ``reference``: ``dynattn.routed_attention(..., backend="reference")`` (the gather-based oracle)

CPU cases run in float32; when a CUDA device is visible the same matrix runs on it in bfloat16 with the GPU
backends (``cuda``, ``triton``) as the fused impls.
"""

from __future__ import annotations

import time

import pytest
import torch

import dynattn
from dynattn.backends import why_not
from _impls import (SHAPES, attention_flops, biformer_gather_backward_bytes, default_scale, dense_sdpa,
                    gather_biformer, gather_index_select, make_qkv)
from _memory import peak_mib

PASSES = ("fwd", "fwd+bwd")
DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}
# Fused backends that run on each device's tensors (triton on CPU only exists under the interpreter: not timed).
FUSED_BACKENDS = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}
UNFUSED = ("index_select_gather", "biformer_gather", "dense_sdpa", "reference")
# Tolerance (atol relative to the reference's max magnitude, and rtol) for the untimed correctness check.
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def _impl_params():
    params = []
    for device in ("cpu", "cuda"):
        names = [f"fused_{b}" for b in FUSED_BACKENDS[device]]
        names += [f"fused_route_{b}" for b in FUSED_BACKENDS[device]]
        names += list(UNFUSED)
        params += [pytest.param(device, name, i, id=f"{device}-{name}") for i, name in enumerate(names)]
    return params


class _Inputs:
    """Inputs of one (device, shape), shared by its cases, with the reference results computed on demand."""

    def __init__(self, shape, device):
        self.shape, self.device, self.dtype = shape, device, DTYPE[device]
        self.q, self.k, self.v = make_qkv(shape, device, self.dtype)
        self.idx = dynattn.route(self.q, self.k, shape.regions, shape.topk, backend="reference")
        self.scale = default_scale(shape)
        self.dout = torch.randn(self.v.shape, generator=torch.Generator().manual_seed(1)).to(device, self.dtype)
        self._ref = None

    def reference(self):
        """(out, (dq, dk, dv)) of the pure-PyTorch reference in float32 on these (rounded) inputs."""
        if self._ref is None:
            leaves = [t.detach().float().requires_grad_(True) for t in (self.q, self.k, self.v)]
            out = dynattn.reference.routed_attention(*leaves, self.idx, self.shape.regions, scale=self.scale)
            grads = torch.autograd.grad(out, leaves, self.dout.float())
            self._ref = (out.detach(), grads)
        return self._ref


@pytest.fixture(scope="session")
def inputs():
    cache = {}

    def get(shape, device):
        if (shape.name, device) not in cache:
            cache[(shape.name, device)] = _Inputs(shape, device)
        return cache[(shape.name, device)]

    return get


def _attend_fn(impl, x):
    """(q, k, v) -> out for an impl name, with the case's idx/regions/scale bound."""
    S, topk, idx, scale = x.shape.regions, x.shape.topk, x.idx, x.scale
    if impl == "dense_sdpa":
        return lambda q, k, v: dense_sdpa(q, k, v, scale=scale)
    if impl == "biformer_gather":
        return lambda q, k, v: gather_biformer(q, k, v, idx, S, scale=scale)
    if impl == "index_select_gather":
        return lambda q, k, v: gather_index_select(q, k, v, idx, S, scale=scale)
    if impl == "reference":
        return lambda q, k, v: dynattn.routed_attention(q, k, v, idx, S, scale=scale, backend="reference")
    if impl.startswith("fused_route_"):
        b = impl[len("fused_route_"):]
        return lambda q, k, v: dynattn.bi_level_routing_attention(q, k, v, S, topk, scale=scale, backend=b)
    if impl.startswith("fused_"):
        b = impl[len("fused_"):]
        return lambda q, k, v: dynattn.routed_attention(q, k, v, idx, S, scale=scale, backend=b)
    raise ValueError(f"unknown impl {impl!r}")


def _device_skip_reason(device) -> str:
    if device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device visible (GPU cases run in bfloat16 when one is)"
    return ""


def _skip_reason(x, impl, passes) -> str:
    """Why this impl cannot run on these inputs, or ""."""
    shape, device = x.shape, x.device
    if impl.startswith("fused_"):
        return why_not(impl.rsplit("_", 1)[1], x.q)  # e.g. "backend 'cpu' is unavailable: dynattn._C is not built"
    if impl == "biformer_gather" and passes == "fwd+bwd":
        need = biformer_gather_backward_bytes(shape, DTYPE[device].itemsize)
        avail = _available_bytes(device)
        if avail is not None and need > avail // 2:
            return (f"BiFormer's gather backward allocates a {need / 2**30:.1f} GiB (n, p2, p2, w2, 2C) buffer, "
                    f"more than half the {avail / 2**30:.1f} GiB available")
    return ""


def _available_bytes(device):
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _assert_close(actual, expected, dtype, what):
    tol = TOL[dtype]
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual.detach().float(), expected, atol=tol * scale, rtol=tol,
                               msg=lambda m: f"{what} differs from dynattn.reference: {m}")


@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("device,impl,order", _impl_params())
def test_op(benchmark, request, bench_results, inputs, device, impl, order, shape, passes):
    key = (device, shape.name, passes, impl)
    reason = _device_skip_reason(device)
    x = None if reason else inputs(shape, device)
    reason = reason or _skip_reason(x, impl, passes)
    if reason:
        bench_results[key] = {"skipped": reason, "order": order}
        pytest.skip(reason)

    attend = _attend_fn(impl, x)
    if passes == "fwd":
        q, k, v = x.q, x.k, x.v

        def call():
            return attend(q, k, v)
    else:
        q, k, v = (t.detach().requires_grad_(True) for t in (x.q, x.k, x.v))
        dout = x.dout

        def call():
            out = attend(q, k, v)
            return out, torch.autograd.grad(out, (q, k, v), dout)

    if device == "cuda":
        def fn():
            result = call()
            torch.cuda.synchronize()
            return result
    else:
        fn = call

    # untimed: correctness once (dense SDPA is a different op: not compared), then peak memory
    t0 = time.perf_counter()
    result = fn()
    t_first = time.perf_counter() - t0
    if impl == "dense_sdpa":
        checked = "n/a (dense attention)"
    else:
        ref_out, ref_grads = x.reference()
        out = result if passes == "fwd" else result[0]
        _assert_close(out, ref_out, x.dtype, f"{impl} output")
        if passes == "fwd+bwd":
            for name, g, rg in zip(("dq", "dk", "dv"), result[1], ref_grads):
                _assert_close(g, rg, x.dtype, f"{impl} {name}")
        checked = "out" if passes == "fwd" else "out, dq, dk, dv"
    del result
    t0 = time.perf_counter()
    peak = peak_mib(fn, device)
    t_est = min(t_first, time.perf_counter() - t0)

    seconds = request.config.getoption("bench_seconds")
    rounds = int(min(200, max(3, round(seconds / max(t_est, 1e-6)))))
    benchmark.group = f"{device} {shape.name} {passes}"
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)

    dense = impl == "dense_sdpa"
    keys = shape.n if dense else shape.routed_keys
    flops = attention_flops(shape, keys, passes)
    stats = getattr(benchmark, "stats", None)
    median = stats.stats.median if stats is not None else None
    gflops = flops / median / 1e9 if median else None
    benchmark.extra_info.update({
        "device": device, "dtype": str(x.dtype).replace("torch.", ""), "shape": shape.name,
        "shape_desc": shape.desc(), "impl": impl, "pass": passes, "flops": flops, "gflops": gflops,
        "keys_per_query": keys, "peak_mib": peak, "threads": torch.get_num_threads(), "rounds": rounds,
        "checked_against_reference": checked,
    })
    bench_results[key] = {"median_s": median, "flops": flops, "gflops": gflops, "keys": keys, "peak_mib": peak,
                          "dtype": str(x.dtype).replace("torch.", ""), "order": order}
