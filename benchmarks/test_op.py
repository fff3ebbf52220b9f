"""Op-level benchmarks: the fused routed attention vs unfused gather forms, dense SDPA, FlexAttention and the
reference, on CPU and (when one is visible) on a CUDA GPU.

One case = (device, dtype, impl, shape, pass). Per case, untimed: the output (and for fwd+bwd the gradients)
is checked once against ``dynattn.reference`` (this also compiles / autotunes) and the peak memory of one call
is measured; then the call is timed with ``benchmark.pedantic``. Run: ``pytest benchmarks/ --benchmark-only``
(see benchmarks/README.md). The impls are in ``_impls.IMPLS``; the ratios and the summary in ``conftest.py``.

The matrix (:data:`MATRIX`): on CPU every CPU impl in float32 at ``_impls.SHAPES["cpu"]``; on CUDA every CUDA
impl in bfloat16 at ``_impls.SHAPES["cuda"]``, and every one but the two unfused gathers in float16. Without a
CUDA device the GPU cases are collected and skip with "no CUDA device visible" (and, for the Triton and CUDA
backends, why a GPU is needed): nothing is left out silently.
"""

from __future__ import annotations

import time

import pytest
import torch

import dynattn
from dynattn.backends import why_not
from _impls import IMPLS, SHAPES, attention_flops, biformer_gather_backward_bytes, default_scale, make_qkv
from _memory import peak_mib

PASSES = ("fwd", "fwd+bwd")
PEAK_HOW = {"cpu": "torch.profiler memory events (tensor bytes live at once, above those live before the call)",
            "cuda": "torch.cuda.max_memory_allocated above memory_allocated before the call"}
# (device, dtype, impls (None: all of the device's), shapes)
MATRIX = (
    ("cpu", torch.float32, None, SHAPES["cpu"]),
    ("cuda", torch.bfloat16, None, SHAPES["cuda"]),
    ("cuda", torch.float16, ("fused_cuda", "fused_triton", "fused_route_cuda", "fused_route_triton", "dense_sdpa",
                             "flex", "reference"), SHAPES["cuda"]),
)
DTYPE_ID = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
# Tolerance (atol relative to the reference's max magnitude, and rtol) for the untimed correctness check.
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
# (minimum rounds, warm-up rounds) of the timed benchmark. The CPU needs no warm-up round: the untimed check and
# peak-memory calls come first.
ROUNDS = {"cpu": (3, 0), "cuda": (5, 2)}
# Why a GPU-only backend is skipped on a machine without one
NO_GPU = {
    "triton": "no CUDA device visible: Triton kernels need a GPU (its CPU interpreter, TRITON_INTERPRET=1, is "
              "for correctness tests, not a benchmark)",
    "cuda": "no CUDA device visible: the CUDA kernels need a GPU",
}


def _cases():
    params = []
    for device, dtype, names, shapes in MATRIX:
        impls = [i for i in IMPLS.values() if device in i.devices and (names is None or i.name in names)]
        for impl in impls:
            for shape in shapes:
                for passes in PASSES:
                    params.append(pytest.param(device, dtype, impl, shape, passes,
                                               id=f"{device}-{DTYPE_ID[dtype]}-{impl.name}-{shape}-{passes}"))
    return params


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class _Inputs:
    """Inputs of one (shape, device, dtype), shared by its cases, with the reference results computed on demand."""

    def __init__(self, shape, device, dtype):
        self.shape, self.device, self.dtype = shape, device, dtype
        self.q, self.k, self.v = make_qkv(shape, device, dtype)
        self.idx = dynattn.route(self.q, self.k, shape.regions, shape.topk, backend="reference")
        self.scale = default_scale(shape)
        self.dout = torch.randn(self.v.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
        self.cache = {}  # what impls build once per inputs (Flex's block mask)
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

    def get(shape, device, dtype):
        key = (shape.name, device, dtype)
        if key not in cache:
            cache[key] = _Inputs(shape, device, dtype)
        return cache[key]

    return get


def _skip_reason(shape, device, dtype, impl, passes, get_inputs) -> str:
    """Why this case cannot run, or ""."""
    if device == "cuda" and not torch.cuda.is_available():
        return NO_GPU.get(impl.backend, "no CUDA device visible")
    if impl.backend:  # e.g. "backend 'cpu' is unavailable: dynattn._C is not built"
        return why_not(impl.backend, get_inputs(shape, device, dtype).q)
    if impl.name == "flex":
        try:
            from torch.nn.attention.flex_attention import BlockMask  # noqa: F401
        except ImportError as e:
            return f"FlexAttention is unavailable in torch {torch.__version__}: {e}"
    if impl.name == "biformer_gather" and passes == "fwd+bwd":
        need = biformer_gather_backward_bytes(shape, dtype.itemsize)
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


def _check(x, impl, attend, passes, result) -> str:
    """Untimed: compare with the reference (results are brought back to the grid layout first)."""
    if impl.dense:
        return "n/a (dense attention)"
    out, grads = (result, ()) if passes == "fwd" else result
    ref_out, ref_grads = x.reference()
    pairs = [("out", out, ref_out)] + list(zip(("dq", "dk", "dv"), grads, ref_grads))
    tol = TOL[x.dtype]
    for name, actual, expected in pairs:
        atol = tol * max(1.0, expected.abs().max().item())
        torch.testing.assert_close(attend.to_grid(actual.detach()).float(), expected, atol=atol, rtol=tol,
                                   msg=lambda m: f"{impl.name} {name} differs from dynattn.reference: {m}")
    return ", ".join(p[0] for p in pairs)


def _cuda_ms(fn, reps: int = 20) -> float:
    """Median milliseconds of ``fn`` over ``reps`` calls, timed with CUDA events (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


@pytest.mark.parametrize("device,dtype,impl,shape,passes", _cases())
def test_op(benchmark, request, bench_results, inputs, device, dtype, impl, shape, passes):
    key = (device, dtype_name(dtype), shape.name, passes, impl.name)
    order = list(IMPLS).index(impl.name)
    reason = _skip_reason(shape, device, dtype, impl, passes, inputs)
    if reason:
        bench_results[key] = {"skipped": reason, "order": order}
        pytest.skip(reason)

    x = inputs(shape, device, dtype)
    attend = impl.build(x)
    q, k, v = (attend.to_impl(t) for t in (x.q, x.k, x.v))
    if passes == "fwd":
        def call():
            return attend.fn(q, k, v)
    else:
        q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
        dout = attend.to_impl(x.dout)

        def call():
            out = attend.fn(q, k, v)
            return out, torch.autograd.grad(out, (q, k, v), dout)

    if device == "cuda":
        def fn():
            result = call()
            torch.cuda.synchronize()
            return result
    else:
        fn = call

    # untimed: correctness once (also compiles / autotunes), then peak memory, then a time estimate
    t0 = time.perf_counter()
    result = fn()
    t_first = time.perf_counter() - t0
    checked = _check(x, impl, attend, passes, result)
    del result
    t0 = time.perf_counter()
    peak = peak_mib(fn, device)
    t_est = min(t_first, time.perf_counter() - t0)
    gpu_info = {}
    if device == "cuda":
        t_est = _cuda_ms(fn) * 1e-3
        gpu_info = {"gpu": torch.cuda.get_device_name(), "cuda_event_ms": t_est * 1e3}

    min_rounds, warmup = ROUNDS[device]
    seconds = request.config.getoption("bench_seconds")
    rounds = int(min(200, max(min_rounds, round(seconds / max(t_est, 1e-6)))))
    benchmark.group = f"{device} {dtype_name(dtype)} {shape.name} {passes}"
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup, iterations=1)

    keys = shape.n if impl.dense else shape.routed_keys
    flops = attention_flops(shape, keys, passes)
    stats = getattr(benchmark, "stats", None)
    median = stats.stats.median if stats is not None else None
    gflops = flops / median / 1e9 if median else None
    record = {"median_s": median, "flops": flops, "gflops": gflops, "keys": keys, "peak_mib": peak,
              "dtype": dtype_name(dtype), "order": order}
    benchmark.extra_info.update({
        "kind": "op", "device": device, "dtype": dtype_name(dtype), "shape": shape.name, **shape.info(),
        "impl": impl.name, "pass": passes, "flops": flops, "gflops": gflops, "keys_per_query": keys,
        "peak_mib": peak, "peak_mib_how": PEAK_HOW[device], "threads": torch.get_num_threads(), "rounds": rounds,
        "checked_against_reference": checked, **gpu_info,
    })
    bench_results[key] = record
