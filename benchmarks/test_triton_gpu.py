"""GPU benchmarks of the Triton kernels against dense FlashAttention, FlexAttention and the reference.

Run: ``pytest benchmarks/test_triton_gpu.py --benchmark-only`` on a machine with a CUDA GPU (every case is
skipped, with the reason, without one). bfloat16 throughout.

Impls, per shape and pass (``fwd``, ``fwd+bwd``); all start from dynattn's ``(B, *grid, heads, D)`` tensors
and a routing index computed once (untimed) with ``dynattn.triton.route``:

* ``triton``: ``dynattn.triton.fwd`` / ``dynattn.triton.bwd`` called directly (kernel time: no input checks,
  no autograd; ``benchmarks/test_op.py`` times the public op).
* ``dense_sdpa``: ``F.scaled_dot_product_attention`` over all N tokens, forced to the FlashAttention backend
  (``torch.nn.attention.sdpa_kernel(SDPBackend.FLASH_ATTENTION)``), on ``(B, heads, N, D)`` views.
* ``reference``: ``dynattn.reference.routed_attention`` (gather + materialised scores, float32 math).
* ``flex``: ``torch.compile``d ``flex_attention`` with a ``BlockMask`` built from the same ``idx``
  (``BlockMask.from_kv_blocks``). Tokens are permuted region-major once, untimed (this favours Flex: the
  permutation and its inverse would cost two extra passes over q/k/v/out in a model). Block size = region
  size when a region has >= 16 tokens: every routed block is a *full* block (no mask_mod evaluated). Smaller
  regions (BiFormer stage 3: 2x2 tokens) are grouped ``16 // M`` to a block, the kv blocks of a query block
  are the union of its regions' routed blocks, and a ``mask_mod`` looks the region pair up in a dense
  ``(B, R, R)`` routing mask.

Every impl's output (and gradients for fwd+bwd) is checked once against the reference, untimed.
``benchmark.extra_info`` holds FLOPs (forward ``4*B*H*N*keys*D`` with ``D = (d_qk + d_v)/2``; backward
counted as 2x forward, as in ``dynattn.ops`` and ``test_op.py``), GFLOP/s, keys per query, peak memory of
one call, and the speed-up over dense SDPA measured in the same session (CUDA events, median of 20).
Results also go to the op-benchmark store (``conftest.bench_results``) so the saved JSON gets the
cross-impl ratios.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import pytest
import torch
import torch.nn.functional as F

import dynattn.triton as dtriton
from dynattn import reference
from _memory import peak_mib

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible: GPU benchmarks skipped")

DTYPE = torch.bfloat16
DEVICE = "cuda"  # a CPU smoke test of the case plumbing may switch it (flex then runs eagerly)
PASSES = ("fwd", "fwd+bwd")
IMPLS = ("triton", "dense_sdpa", "reference", "flex")
TOL = 3e-2  # bf16 vs the float32 reference, relative to the largest magnitude


@dataclass(frozen=True)
class GpuShape:
    name: str
    batch: int
    grid: Tuple[int, int]
    heads: int
    d: int
    regions: Tuple[int, int]
    topk: int

    @property
    def n(self) -> int:
        return math.prod(self.grid)

    @property
    def r(self) -> int:
        return math.prod(self.regions)

    @property
    def m(self) -> int:
        return self.n // self.r

    @property
    def routed_keys(self) -> int:
        return self.topk * self.m

    def desc(self) -> str:
        g = "x".join(map(str, self.grid))
        tok = "x".join(str(a // b) for a, b in zip(self.grid, self.regions))
        return f"B{self.batch} {g} {self.heads}hx{self.d} regions of {tok} tokens, topk {self.topk}"

    def __str__(self) -> str:
        return self.name


SHAPES = (
    # high resolution, 8x8-token regions, topk 4
    GpuShape("g64_h4", 8, (64, 64), 4, 64, (8, 8), 4),
    GpuShape("g64_h8", 8, (64, 64), 8, 64, (8, 8), 4),
    GpuShape("g128_h4", 2, (128, 128), 4, 64, (16, 16), 4),
    GpuShape("g128_h8", 2, (128, 128), 8, 64, (16, 16), 4),
    # BiFormer-B stages 1-3 at 224x224, batch 8 (head dim 32, 7x7 regions)
    GpuShape("biformer_b_s1", 8, (56, 56), 3, 32, (7, 7), 1),
    GpuShape("biformer_b_s2", 8, (28, 28), 6, 32, (7, 7), 4),
    GpuShape("biformer_b_s3", 8, (14, 14), 12, 32, (7, 7), 16),
)


def flops(shape: GpuShape, keys: int, passes: str) -> int:
    fwd = 4 * shape.batch * shape.heads * shape.n * keys * shape.d
    return fwd if passes == "fwd" else 3 * fwd


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


# --------------------------------------------------------------------------------------------------
# inputs, shared by the cases of one shape
# --------------------------------------------------------------------------------------------------


class _Case:
    def __init__(self, shape: GpuShape):
        self.shape = shape
        g = torch.Generator(device="cpu").manual_seed(0)
        dims = (shape.batch, *shape.grid, shape.heads, shape.d)
        self.q, self.k, self.v = (torch.randn(dims, generator=g).to(DEVICE, DTYPE) for _ in range(3))
        self.dout = torch.randn(dims, generator=g).to(DEVICE, DTYPE)
        self.scale = shape.d ** -0.5
        route_scale = (shape.heads * shape.d) ** -0.5
        self.idx = dtriton.route(self.q, self.k, shape.regions, shape.topk, False, route_scale)
        self._ref = None
        self._dense_ms = {}
        self._flex = None

    def reference(self):
        if self._ref is None:
            leaves = [t.detach().float().requires_grad_(True) for t in (self.q, self.k, self.v)]
            out = reference.routed_attention(*leaves, self.idx, self.shape.regions, scale=self.scale)
            grads = torch.autograd.grad(out, leaves, self.dout.float())
            self._ref = (out.detach(), grads)
        return self._ref

    def dense_ms(self, passes: str) -> float:
        if passes not in self._dense_ms:
            self._dense_ms[passes] = _cuda_ms(make_call(self, "dense_sdpa", passes))
        return self._dense_ms[passes]

    # ---- FlexAttention: region-major tokens and a BlockMask from idx

    def region_major(self, x: torch.Tensor) -> torch.Tensor:
        """(B, G0, G1, H, D) -> (B, H, N, D) with the tokens of each region consecutive (contiguous copy)."""
        (S0, S1), (G0, G1) = self.shape.regions, self.shape.grid
        B, H, D = x.shape[0], x.shape[-2], x.shape[-1]
        x = x.reshape(B, S0, G0 // S0, S1, G1 // S1, H, D).permute(0, 5, 1, 3, 2, 4, 6)
        return x.reshape(B, H, self.shape.n, D).contiguous()

    def grid_major(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of region_major: (B, H, N, D) -> (B, G0, G1, H, D)."""
        (S0, S1), (G0, G1) = self.shape.regions, self.shape.grid
        B, H, D = x.shape[0], x.shape[1], x.shape[-1]
        x = x.reshape(B, H, S0, S1, G0 // S0, G1 // S1, D).permute(0, 2, 4, 3, 5, 1, 6)
        return x.reshape(B, G0, G1, H, D)

    def flex(self):
        """(compiled flex_attention, block_mask, q, k, v region-major)."""
        if self._flex is None:
            from torch.nn.attention.flex_attention import BlockMask, flex_attention

            s, idx = self.shape, self.idx
            B, R, M = s.batch, s.r, s.m
            # Region-level routing as a mask_mod on a (B, R', R') mask (R' = R padded to whole blocks). With
            # one region per block (M >= 16) every routed block is a *full* block, so compiled Flex never
            # evaluates the mask_mod; it is still passed because Flex's eager (CPU) path ignores the block
            # structure and applies only mask_mod.
            G = max(1, 16 // M)
            assert G * M in (M, 16), "benchmark shapes keep regions power-of-two sized"
            nb = -(-R // G)
            routed = torch.zeros((B, nb * G, nb * G), dtype=torch.bool, device=DEVICE)
            routed[:, :R].scatter_(2, idx, True)

            def mask_mod(b, h, q_idx, kv_idx):
                return routed[b, q_idx // M, kv_idx // M]

            # (B, q blocks, kv blocks); index tensors are full width, as create_block_mask makes them
            blocks = routed.view(B, nb, G, nb, G).any(dim=4).any(dim=2)
            num = blocks.sum(-1, dtype=torch.int32).view(B, 1, nb)
            order = torch.sort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).indices
            order = order.to(torch.int32).view(B, 1, nb, nb)
            if G == 1:  # one region per block: the routed blocks are full blocks
                none = torch.zeros_like(num)
                mask = BlockMask.from_kv_blocks(none, order, num, order, BLOCK_SIZE=M, mask_mod=mask_mod,
                                                seq_lengths=(s.n, s.n))
            else:  # G tiny regions per 16-token block (the last may be partial: N % 16 != 0 is fine for Flex)
                mask = BlockMask.from_kv_blocks(num, order, BLOCK_SIZE=16, mask_mod=mask_mod, seq_lengths=(s.n, s.n))
            # every shape (and grad mode) is a recompile of the same function: lift dynamo's limit of 8, past
            # which it would silently fall back to Flex's eager (dense) path
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            compiled = torch.compile(flex_attention, dynamic=False) if DEVICE == "cuda" else flex_attention
            self._flex = (compiled, mask, *(self.region_major(t) for t in (self.q, self.k, self.v)))
        return self._flex


@pytest.fixture(scope="module")
def cases():
    store = {}

    def get(shape):
        if shape.name not in store:
            store[shape.name] = _Case(shape)
        return store[shape.name]

    return get


def make_call(c: _Case, impl: str, passes: str):
    """A zero-argument callable running one pass of ``impl``; returns (out grid-major, grads or None)."""
    s, scale = c.shape, c.scale
    bwd = passes == "fwd+bwd"

    def heads_first(x):  # (B, *grid, H, D) -> (B, H, N, D) view
        return x.reshape(s.batch, s.n, s.heads, x.shape[-1]).transpose(1, 2)

    if impl == "triton":
        q, k, v, idx, dout = c.q, c.k, c.v, c.idx, c.dout

        def call():
            out, lse = dtriton.fwd(q, k, v, idx, s.regions, scale)
            if not bwd:
                return out, None
            return out, dtriton.bwd(dout, None, q, k, v, out, lse, idx, s.regions, scale)
        return call

    if impl == "flex":
        compiled, mask, qf, kf, vf = c.flex()
        if bwd:
            qf, kf, vf = (t.detach().requires_grad_(True) for t in (qf, kf, vf))
            dout_f = c.region_major(c.dout)

        def call():
            out = compiled(qf, kf, vf, block_mask=mask, scale=scale)
            if not bwd:
                return out, None
            return out, torch.autograd.grad(out, (qf, kf, vf), dout_f)
        return call

    if impl == "dense_sdpa":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def attend(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v), scale=scale)
    elif impl == "reference":
        def attend(q, k, v):
            return reference.routed_attention(q, k, v, c.idx, s.regions, scale=scale)
    else:
        raise ValueError(impl)

    if not bwd:
        return lambda: (attend(c.q, c.k, c.v), None)
    q, k, v = (t.detach().requires_grad_(True) for t in (c.q, c.k, c.v))

    def call():
        out = attend(q, k, v)
        dout = heads_first(c.dout) if impl == "dense_sdpa" else c.dout
        return out, torch.autograd.grad(out, (q, k, v), dout)
    return call


def _check(c: _Case, impl: str, result):
    """Untimed: compare with the reference (flex results are permuted back to the grid first)."""
    if impl == "dense_sdpa":
        return "n/a (dense attention)"
    out, grads = result
    if impl == "flex":
        out = c.grid_major(out)
        grads = None if grads is None else tuple(c.grid_major(g) for g in grads)
    ref_out, ref_grads = c.reference()
    pairs = [("out", out, ref_out)] + ([] if grads is None else list(zip(("dq", "dk", "dv"), grads, ref_grads)))
    for name, a, e in pairs:
        tol = TOL * max(1.0, e.abs().max().item())
        torch.testing.assert_close(a.detach().float(), e, atol=tol, rtol=TOL, msg=lambda m: f"{impl} {name}: {m}")
    return ", ".join(p[0] for p in pairs)


@pytest.mark.parametrize("passes", PASSES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_gpu(benchmark, request, bench_results, cases, shape, impl, passes):
    if impl == "triton" and not dtriton.is_available():
        pytest.skip("dynattn.triton is unavailable (triton not importable)")
    c = cases(shape)
    call = make_call(c, impl, passes)

    def fn():
        result = call()
        torch.cuda.synchronize()
        return result

    checked = _check(c, impl, fn())  # also compiles / autotunes, untimed
    peak = peak_mib(fn, "cuda")
    ms = _cuda_ms(fn)
    seconds = request.config.getoption("bench_seconds", 1.0)
    rounds = int(min(200, max(5, round(seconds / max(ms * 1e-3, 1e-6)))))
    benchmark.group = f"cuda {shape.name} {passes}"
    benchmark.pedantic(fn, rounds=rounds, warmup_rounds=2, iterations=1)

    keys = shape.n if impl == "dense_sdpa" else shape.routed_keys
    fl = flops(shape, keys, passes)
    stats = getattr(benchmark, "stats", None)
    median = stats.stats.median if stats is not None else ms * 1e-3
    dense_ms = c.dense_ms(passes)
    benchmark.extra_info.update({
        "device": "cuda", "gpu": torch.cuda.get_device_name(), "dtype": "bfloat16", "shape": shape.name,
        "shape_desc": shape.desc(), "impl": impl, "pass": passes, "flops": fl, "gflops": fl / median / 1e9,
        "keys_per_query": keys, "peak_mib": peak, "cuda_event_ms": ms, "dense_sdpa_ms": dense_ms,
        "speedup_vs_dense": dense_ms / ms, "checked_against_reference": checked,
    })
    bench_results[("cuda", shape.name, passes, impl)] = {
        "median_s": median, "flops": fl, "gflops": fl / median / 1e9, "keys": keys, "peak_mib": peak,
        "dtype": "bfloat16", "order": IMPLS.index(impl),
    }
