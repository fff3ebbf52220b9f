"""Markdown tables, PNG plots and a roofline note from the pytest-benchmark JSON of ``benchmarks/``.

    pytest benchmarks/ --benchmark-only --benchmark-json=BENCH.json
    python -m dynattn.bench.report BENCH.json [--out DIR] [--title TITLE] [--no-plots] [--readme FILE]
                                   [--cpu-ghz GHZ] [--fma-units N] [--cores N] [--gpu-peak-tflops T]

Writes ``DIR/report.md`` (also printed) and, per device and dtype, ``<device>_<dtype>_latency.png`` (latency vs
tokens of the scaling sweep, log-log, one line per implementation, fwd and fwd+bwd), ``<device>_<dtype>_speedup.png``
(speed-up over dense SDPA vs tokens) and ``<device>_models.png`` (model images/s). ``DIR`` defaults to
``<BENCH stem>_report`` beside the JSON. ``--readme README.md`` also replaces the block between
``<!-- dynattn-bench:start -->`` and ``<!-- dynattn-bench:end -->`` in that file with the machine, the command, the
tables, the plots (linked relative to it) and a roofline summary.

Every number is recomputed from the JSON: times are pytest-benchmark medians (``stats.median``), speed-ups are
ratios of medians of the same run (a speed-up over dense = dense median / this median, > 1 is faster), GFLOP/s
= the case's ``extra_info["flops"]`` / median. The roofline uses the machine facts the benchmark run stored in
``machine_info["dynattn"]`` (see :mod:`dynattn.bench.roofline`); the ``--cpu-ghz``/``--fma-units``/``--cores``/
``--gpu-peak-tflops`` options override them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from . import roofline

__all__ = ["Bench", "ModelCase", "OpCase", "README_END", "README_START", "load", "main", "model_table", "op_table",
           "plot_models", "plot_scaling", "readme_block", "render", "roofline_section", "roofline_summary",
           "shapes_table", "sig", "sweeps", "update_readme"]

PathLike = Union[str, "os.PathLike[str]"]

PASSES = ("fwd", "fwd+bwd")
DENSE = "dense_sdpa"
# column order of the op tables; impls not listed follow in alphabetical order
IMPL_ORDER = ("fused_cpu", "fused_cuda", "fused_triton", "fused_route_cpu", "fused_route_cuda", "fused_route_triton",
              "flex", "index_select_gather", "biformer_gather", "dense_sdpa", "reference")
FAMILY_COLOR = {"dense_vit": "#8c8c8c", "vit_bra": "#1f77b4", "baseline": "#ff7f0e"}


@dataclass(frozen=True)
class OpCase:
    """One op-level benchmark: ``(device, dtype, shape, pass, impl)`` and what was measured."""

    device: str
    dtype: str
    shape: str
    passes: str
    impl: str
    median_s: float
    flops: Optional[float]
    peak_mib: Optional[float]
    info: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)  # the whole extra_info

    @property
    def key(self) -> Tuple[str, str, str, str, str]:
        return self.device, self.dtype, self.shape, self.passes, self.impl

    @property
    def gflops(self) -> Optional[float]:
        return self.flops / self.median_s / 1e9 if self.flops else None


@dataclass(frozen=True)
class ModelCase:
    """One model-level benchmark: ``(device, dtype, img_size, mode, model)`` and what was measured."""

    device: str
    dtype: str
    model: str
    family: str  # "dense_vit", "vit_bra" or "baseline"
    dense_model: Optional[str]  # vit_bra: the dense timm ViT it is compared with
    img_size: int
    mode: str  # "infer" or "train"
    batch: int
    median_s: float
    params_m: Optional[float]
    gflops_per_image: Optional[float]

    @property
    def images_per_s(self) -> float:
        return self.batch / self.median_s


@dataclass
class Bench:
    """A pytest-benchmark JSON file read by :func:`load`."""

    path: Path
    machine: Dict[str, Any]  # pytest-benchmark's machine_info
    facts: Dict[str, Any]  # machine_info["dynattn"] (roofline facts, command), {} if absent
    commit: Dict[str, Any]
    datetime: str
    ops: List[OpCase]
    models: List[ModelCase]
    skipped: Dict[str, str]  # "device/dtype/shape/pass/impl" (or "model/...") -> reason
    targets: List[Dict[str, Any]]
    ignored: int  # benchmarks that are neither op nor model cases, or have no timing

    def op_groups(self) -> List[Tuple[str, str]]:
        """``(device, dtype)`` pairs with op results, CPU first, in first-seen order."""
        seen = list(dict.fromkeys((c.device, c.dtype) for c in self.ops))
        return sorted(seen, key=lambda g: g[0] != "cpu")

    def model_devices(self) -> List[str]:
        return sorted(dict.fromkeys(c.device for c in self.models), key=lambda d: d != "cpu")


# ---------------------------------------------------------------------------------------------- loading


def _number(x) -> Optional[float]:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def load(path: PathLike) -> Bench:
    """Read a pytest-benchmark JSON written by ``pytest benchmarks/ --benchmark-json=PATH``.

    Raises ``FileNotFoundError`` if ``path`` does not exist and ``ValueError`` if it is not pytest-benchmark JSON
    (no ``benchmarks`` list). Benchmarks without dynattn's ``extra_info`` or without a median are counted in
    ``Bench.ignored``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark JSON {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e}); expected the file written by --benchmark-json") from None
    if not isinstance(data, dict) or not isinstance(data.get("benchmarks"), list):
        raise ValueError(f"{path}: expected pytest-benchmark JSON (an object with a 'benchmarks' list), as written "
                         "by `pytest benchmarks/ --benchmark-only --benchmark-json=PATH`")
    ops: Dict[tuple, OpCase] = {}
    models: Dict[tuple, ModelCase] = {}
    ignored = 0
    for bench in data["benchmarks"]:
        info = bench.get("extra_info") or {}
        median = _number((bench.get("stats") or {}).get("median"))
        if not median or median <= 0:
            ignored += 1
            continue
        kind = info.get("kind", "op" if {"impl", "shape", "pass"} <= info.keys() else None)
        try:
            if kind == "op":
                case = OpCase(str(info["device"]), str(info["dtype"]), str(info["shape"]), str(info["pass"]),
                              str(info["impl"]), median, _number(info.get("flops")), _number(info.get("peak_mib")),
                              info)
                ops[case.key] = case
            elif kind == "model":
                case = ModelCase(str(info["device"]), str(info["dtype"]), str(info["model"]),
                                 str(info.get("family", "baseline")), info.get("dense_model"), int(info["img_size"]),
                                 str(info["mode"]), int(info["batch"]), median, _number(info.get("params_m")),
                                 _number(info.get("gflops_per_image")))
                models[(case.device, case.dtype, case.img_size, case.mode, case.model)] = case
            else:
                ignored += 1
        except (KeyError, TypeError, ValueError):  # a benchmark of another suite with partial extra_info
            ignored += 1
    machine = data.get("machine_info") or {}
    meta = data.get("dynattn") or {}
    return Bench(path=path, machine=machine, facts=machine.get("dynattn") or {}, commit=data.get("commit_info") or {},
                 datetime=str(data.get("datetime", "")), ops=list(ops.values()), models=list(models.values()),
                 skipped=dict(meta.get("skipped") or {}), targets=list(meta.get("targets") or []), ignored=ignored)


# ---------------------------------------------------------------------------------------------- formatting


def sig(x: Optional[float], digits: int = 3) -> str:
    """``x`` to ``digits`` significant digits without an exponent (integers from ``10**(digits-1)`` on);
    "-" for None."""
    if x is None:
        return "-"
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    if abs(x) >= 10 ** (digits - 1):
        return f"{x:.0f}"
    decimals = digits - 1 - math.floor(math.log10(abs(x)))
    return f"{x:.{decimals}f}"


def _impl_order(impls) -> List[str]:
    known = [i for i in IMPL_ORDER if i in impls]
    return known + sorted(set(impls) - set(known))


def _pass_order(passes) -> List[str]:
    return [p for p in PASSES if p in passes] + sorted(set(passes) - set(PASSES))


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], align: Sequence[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- tables

OP_LEGEND = ("Each cell: median ms · speed-up over `dense_sdpa` (its median / this median, same run; > 1 is "
             "faster) · GFLOP/s (attention FLOPs / median: 4·D per key per query per head, fwd+bwd = 3x fwd, "
             "routing not counted) · peak MiB of one call. `fused_<b>` = `dynattn.routed_attention(backend=<b>)` "
             "with a precomputed routing; `fused_route_<b>` times routing too.")


def op_cell(case: Optional[OpCase], dense: Optional[OpCase], skipped: Optional[str]) -> str:
    """``"<ms> ms · <x>x · <GFLOP/s> GF/s · <MiB> MiB"`` for a case ("skipped" / "" when it did not run)."""
    if case is None:
        return "skipped" if skipped else ""
    speedup = f"{sig(dense.median_s / case.median_s)}x" if dense is not None else "-"
    return (f"{sig(case.median_s * 1e3)} ms · {speedup} · {sig(case.gflops)} GF/s · "
            f"{sig(case.peak_mib)} MiB")


def op_table(bench: Bench, device: str, dtype: str) -> str:
    """Markdown: one row per shape and pass, one column per implementation (see :func:`op_cell`)."""
    cases = {c.key: c for c in bench.ops if (c.device, c.dtype) == (device, dtype)}
    if not cases:
        raise ValueError(f"no op results for device={device!r}, dtype={dtype!r} in {bench.path}")
    impls = _impl_order({k[4] for k in cases})
    shapes = list(dict.fromkeys(k[2] for k in cases))
    rows = []
    for shape in shapes:
        for passes in _pass_order({k[3] for k in cases if k[2] == shape}):
            group = (device, dtype, shape, passes)
            dense = cases.get(group + (DENSE,))
            rows.append([f"`{shape}`", passes] + [
                op_cell(cases.get(group + (impl,)), dense, bench.skipped.get("/".join(group + (impl,))))
                for impl in impls])
    return _table(["shape", "pass"] + [f"`{i}`" for i in impls], rows, ["l", "l"] + ["r"] * len(impls))


def shapes_table(bench: Bench, device: str, dtype: str) -> str:
    """Markdown: what each shape of the (device, dtype) op table is."""
    seen: Dict[str, Mapping[str, Any]] = {}
    for c in bench.ops:
        if (c.device, c.dtype) == (device, dtype):
            seen.setdefault(c.shape, c.info)
    rows = []
    for shape, info in seen.items():
        g, s = info.get("grid"), info.get("regions")
        rows.append([f"`{shape}`", str(info.get("batch", "-")), f"{g}x{g}" if g else "-",
                     f"{info.get('heads', '-')} x {info.get('head_dim', '-')}", f"{s}x{s}" if s else "-",
                     str(info.get("tokens_per_region", "-")), str(info.get("topk", "-")),
                     str(info.get("tokens", "-")), str(_routed_keys(bench, device, dtype, shape) or "-")])
    return _table(["shape", "batch", "grid", "heads x dim", "regions", "tokens/region", "topk", "tokens (dense keys)",
                   "routed keys/query"], rows, ["l"] + ["r"] * 8)


def _routed_keys(bench: Bench, device: str, dtype: str, shape: str) -> Optional[int]:
    for c in bench.ops:
        if (c.device, c.dtype, c.shape) == (device, dtype, shape) and c.impl != DENSE:
            return c.info.get("keys_per_query")
    return None


def _short(model: str) -> str:
    return model.replace("_patch16_224", "")


def model_speedups(bench: Bench) -> Dict[Tuple, float]:
    """``{(device, dtype, img, mode, vit_bra model): dense median / its median}`` (same batch, same run)."""
    by_key = {(c.device, c.dtype, c.img_size, c.mode, c.model): c for c in bench.models}
    out = {}
    for key, c in by_key.items():
        dense = by_key.get(key[:4] + (c.dense_model,)) if c.dense_model else None
        if dense is not None and dense.batch == c.batch:
            out[key] = dense.median_s / c.median_s
    return out


def model_table(bench: Bench, device: str) -> str:
    """Markdown: one row per (mode, image size, model): batch, ms/batch, images/s, speed-up of vit_bra over
    its dense ViT, parameters and forward GFLOPs per image."""
    cases = [c for c in bench.models if c.device == device]
    if not cases:
        raise ValueError(f"no model results for device={device!r} in {bench.path}")
    speed = model_speedups(bench)
    order = {m: i for i, m in enumerate(dict.fromkeys(c.model for c in cases))}
    mode_order = {"infer": 0, "train": 1}
    cases.sort(key=lambda c: (mode_order.get(c.mode, 2), c.mode, c.img_size, order[c.model]))
    rows = []
    for c in cases:
        x = speed.get((c.device, c.dtype, c.img_size, c.mode, c.model))
        rows.append([f"`{_short(c.model)}`", str(c.img_size), c.mode, c.dtype, str(c.batch), sig(c.median_s * 1e3),
                     sig(c.images_per_s), f"{sig(x)}x" if x is not None else "-", sig(c.params_m),
                     sig(c.gflops_per_image)])
    return _table(["model", "img", "mode", "dtype", "batch", "ms/batch", "images/s", "x dense ViT", "params (M)",
                   "GFLOPs/img (fwd)"], rows, ["l", "r", "l", "l"] + ["r"] * 6)


# ---------------------------------------------------------------------------------------------- roofline


def cpu_peak(facts: Mapping[str, Any], *, clock_ghz: Optional[float] = None, fma_units: Optional[int] = None,
             cores: Optional[int] = None) -> Tuple[Optional[float], str]:
    """``(peak GFLOP/s or None, the formula with its numbers, or why it is unknown)`` from the recorded facts,
    each factor overridable."""
    cores = cores if cores is not None else facts.get("cores_used")
    lanes, isa = facts.get("simd_lanes_fp32"), facts.get("cpu_isa")
    fma = fma_units if fma_units is not None else facts.get("fma_units")
    ghz = clock_ghz if clock_ghz is not None else facts.get("clock_ghz")
    missing = [n for n, v in (("cores used", cores), ("SIMD lanes", lanes), ("FMA units", fma), ("clock", ghz))
               if not v]
    if missing:
        return None, (f"unknown: the JSON does not record {', '.join(missing)} (run the benchmarks with this "
                      "version of benchmarks/conftest.py, or pass --cores/--fma-units/--cpu-ghz)")
    peak = roofline.cpu_peak_gflops(cores=cores, simd_lanes=lanes, fma_units=fma, clock_ghz=ghz)
    src = "given" if clock_ghz is not None else facts.get("clock_source", "?")
    return peak, (f"{cores} cores x {lanes} fp32 lanes ({isa}) x {fma} FMA units x 2 FLOPs/FMA x {ghz:.2f} GHz "
                  f"(clock: {src}) = **{sig(peak, 4)} GFLOP/s**")


def gpu_peak(bench: Bench, device_name: Optional[str], *, tflops: Optional[float] = None
             ) -> Tuple[Optional[float], str]:
    """``(peak GFLOP/s or None, where it comes from)`` for the GPU the cases ran on."""
    if tflops is not None:
        return tflops * 1e3, f"{sig(tflops, 4)} TFLOP/s (given)"
    gpu = bench.facts.get("gpu") or {}
    if gpu.get("peak_tflops_bf16"):
        return gpu["peak_tflops_bf16"] * 1e3, f"{sig(gpu['peak_tflops_bf16'], 4)} TFLOP/s, {gpu.get('peak_source')}"
    name = device_name or gpu.get("name")
    found = roofline.gpu_peak_tflops(name) if name else None
    if found:
        return found[0] * 1e3, f"{sig(found[0], 4)} TFLOP/s, dense tensor-core bf16/fp16 peak of the {found[1]}"
    return None, f"unknown for {name or 'this GPU'} (pass --gpu-peak-tflops)"


def roofline_section(bench: Bench, *, cpu_ghz: Optional[float] = None, fma_units: Optional[int] = None,
                     cores: Optional[int] = None, gpu_peak_tflops: Optional[float] = None) -> str:
    """Markdown: the peak estimates and, per fused case, achieved GFLOP/s as % of peak (dense SDPA beside it)."""
    out = ["## Roofline", "",
           "Achieved GFLOP/s of each fused case as a share of the machine's peak estimate (dense SDPA beside it). "
           "FLOPs count the two matmuls only (4·D per score); the softmax's exp, max and sum per score are not "
           "counted, and at head dim 32-64 they are a large share of the work, so the percentage is how close the "
           "matmuls alone come to the FMA ceiling."]
    for device, dtype in bench.op_groups():
        cases = {c.key: c for c in bench.ops if (c.device, c.dtype) == (device, dtype)}
        fused = [c for c in cases.values() if c.impl.startswith("fused_") and c.gflops]
        if not fused:
            continue
        if device == "cpu":
            peak, how = cpu_peak(bench.facts, clock_ghz=cpu_ghz, fma_units=fma_units, cores=cores)
            note = f"CPU peak ({dtype}): {how}."
            if dtype != "float32" and peak:
                note += " (float32 lanes; other dtypes are computed in float32 by the kernels.)"
        else:
            name = next((c.info.get("gpu") for c in fused if c.info.get("gpu")), None)
            peak, how = gpu_peak(bench, name, tflops=gpu_peak_tflops)
            note = f"GPU peak ({name or device}, {dtype}): {how}."
        out += ["", f"### {device} {dtype}", "", note, ""]
        rows = []
        for c in sorted(fused, key=lambda c: (list(dict.fromkeys(k[2] for k in cases)).index(c.shape),
                                              _pass_order([c.passes, *PASSES]).index(c.passes), c.impl)):
            dense = cases.get(c.key[:4] + (DENSE,))
            pct = f"{roofline.percent_of_peak(c.gflops, peak):.1f}%" if peak else "-"
            dpct = f"{roofline.percent_of_peak(dense.gflops, peak):.1f}%" if peak and dense and dense.gflops else "-"
            rows.append([f"`{c.shape}`", c.passes, f"`{c.impl}`", sig(c.gflops), pct,
                         sig(dense.gflops) if dense else "-", dpct])
        out.append(_table(["shape", "pass", "impl", "GFLOP/s", "% of peak", "dense_sdpa GFLOP/s", "dense % of peak"],
                          rows, ["l", "l", "l", "r", "r", "r", "r"]))
    if len(out) == 3:
        out += ["", "No fused op results in this file."]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------- plots


def _figure(**kwargs):
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # optional: pip install "dynattn[bench]"
        raise ImportError("the plots need matplotlib: pip install 'dynattn[bench]' (or pass --no-plots)") from e
    return Figure(**kwargs)


IMPL_COLOR = {"fused_cpu": "#1f77b4", "fused_cuda": "#9467bd", "fused_triton": "#2ca02c", "fused_route_cpu": "#17becf",
              "fused_route_cuda": "#e377c2", "fused_route_triton": "#bcbd22", "flex": "#ff7f0e",
              "index_select_gather": "#8c564b", "biformer_gather": "#d62728", "dense_sdpa": "#000000",
              "reference": "#7f7f7f"}


def _colors(impls) -> Dict[str, str]:
    """A fixed colour per known impl (the same in every plot), others from a spare palette."""
    spare = ["#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173"]
    others = sorted(set(impls) - set(IMPL_COLOR))
    return {**IMPL_COLOR, **{impl: spare[i % len(spare)] for i, impl in enumerate(others)}}


def sweeps(bench: Bench) -> Dict[Tuple[str, str, str], List[OpCase]]:
    """``{(device, dtype, sweep name): cases}`` for the scaling-sweep shapes (``extra_info["sweep"]``) with at
    least two token counts."""
    groups: Dict[Tuple[str, str, str], List[OpCase]] = {}
    for c in bench.ops:
        name = c.info.get("sweep")
        if name and c.info.get("tokens"):
            groups.setdefault((c.device, c.dtype, name), []).append(c)
    return {k: v for k, v in groups.items() if len({c.info["tokens"] for c in v}) >= 2}


def plot_scaling(bench: Bench, out_dir: PathLike) -> List[Path]:
    """Per scaling sweep: ``<device>_<dtype>_latency.png`` (median ms vs tokens, log-log) and
    ``<device>_<dtype>_speedup.png`` (speed-up over dense SDPA vs tokens, log-log), fwd and fwd+bwd panels,
    one line per implementation. Returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    groups = sweeps(bench)
    per_dd: Dict[Tuple[str, str], int] = {}
    for (device, dtype, name), cases in groups.items():
        n = per_dd[(device, dtype)] = per_dd.get((device, dtype), 0) + 1
        stem = f"{device}_{dtype}" + (f"_{n}" if n > 1 else "")
        impls = _impl_order({c.impl for c in cases})
        colors = _colors(impls)
        by_key = {c.key: c for c in cases}
        grids = sorted({(c.info["tokens"], c.info.get("grid")) for c in cases})
        keys = next((c.info.get("keys_per_query") for c in cases if c.impl != DENSE), None)
        for what in ("latency", "speedup"):
            fig = _figure(figsize=(11, 4.4), layout="constrained")
            axes = fig.subplots(1, 2)
            for ax, passes in zip(axes, PASSES):
                for impl in impls:
                    if what == "speedup" and impl == DENSE:
                        continue
                    pts = []
                    for tokens, _ in grids:
                        c = next((c for c in cases if c.passes == passes and c.impl == impl
                                  and c.info["tokens"] == tokens), None)
                        if c is None:
                            continue
                        if what == "latency":
                            pts.append((tokens, c.median_s * 1e3))
                        else:
                            dense = by_key.get(c.key[:4] + (DENSE,))
                            if dense is not None:
                                pts.append((tokens, dense.median_s / c.median_s))
                    if pts:
                        xs, ys = zip(*pts)
                        ax.plot(xs, ys, marker="o", color=colors[impl], label=impl,
                                linewidth=2.4 if impl.startswith("fused") else 1.4,
                                linestyle="--" if impl in (DENSE, "reference") else "-")
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xticks([t for t, _ in grids])
                ax.set_xticklabels([f"{g}²" if g else str(t) for t, g in grids])
                ax.minorticks_off()
                ax.grid(True, which="major", alpha=0.3)
                ax.set_xlabel("tokens (grid side²)")
                if what == "latency":
                    ax.set_ylabel("median latency (ms)")
                else:
                    ax.axhline(1.0, color="#444444", linewidth=1, linestyle=":", label="dense SDPA (1x)")
                    ax.set_ylabel("speed-up over dense SDPA (x)")
                ax.set_title(passes)
                ax.legend(fontsize=8, loc="best")
            title = "latency" if what == "latency" else "speed-up over dense SDPA"
            fig.suptitle(f"{device} {dtype}: {title} vs tokens ({name}"
                         + (f", {keys} keys/query" if keys else "") + ")")
            path = out_dir / f"{stem}_{what}.png"
            fig.savefig(path, dpi=110)
            written.append(path)
    return written


def plot_models(bench: Bench, out_dir: PathLike) -> List[Path]:
    """Per device: ``<device>_models.png``, images/s per model, one panel per image size (rows) and mode
    (columns: inference, training step), bars coloured dense ViT / vit_bra / baseline. Returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for device in bench.model_devices():
        cases = [c for c in bench.models if c.device == device]
        modes = [m for m in ("infer", "train") if any(c.mode == m for c in cases)]
        modes += sorted({c.mode for c in cases} - set(modes))
        sizes = sorted({c.img_size for c in cases})
        models = list(dict.fromkeys(c.model for c in cases))
        fig = _figure(figsize=(11, 0.8 + len(sizes) * (0.9 + 0.3 * len(models))), layout="constrained")
        axes = fig.subplots(len(sizes), len(modes), squeeze=False)
        got = {(c.img_size, c.mode, c.model): c for c in cases}
        for row, img in zip(axes, sizes):
            for ax, mode in zip(row, modes):
                ys = list(range(len(models)))[::-1]
                for y, model in zip(ys, models):
                    c = got.get((img, mode, model))
                    if c is None:
                        continue
                    ax.barh(y, c.images_per_s, color=FAMILY_COLOR.get(c.family, "#2ca02c"))
                    ax.text(c.images_per_s, y, f" {sig(c.images_per_s)}", va="center", fontsize=7)
                ax.set_yticks(ys)
                ax.set_yticklabels([_short(m) for m in models], fontsize=8)
                ax.set_xlabel("images/s")
                ax.margins(x=0.15)
                what = {"infer": "inference (eval, no_grad)", "train": "training step (fwd+bwd+AdamW)"}.get(mode, mode)
                batches = sorted({c.batch for c in cases if (c.img_size, c.mode) == (img, mode)})
                ax.set_title(f"{img} px, {what}, batch {'/'.join(map(str, batches))}", fontsize=9)
                ax.grid(True, axis="x", alpha=0.3)
        handles = [_patch(color, fam) for fam, color in FAMILY_COLOR.items() if any(c.family == fam for c in cases)]
        fig.legend(handles=handles, fontsize=8, loc="outside lower center", ncol=len(handles))
        dtype = ", ".join(sorted({c.dtype for c in cases}))
        fig.suptitle(f"{device} ({dtype}): images/s of the FER classifiers")
        path = out_dir / f"{device}_models.png"
        fig.savefig(path, dpi=110)
        written.append(path)
    return written


def _patch(color: str, label: str):
    from matplotlib.patches import Patch

    return Patch(color=color, label={"dense_vit": "dense timm ViT", "vit_bra": "vit_bra (routed)"}.get(label, label))


# ---------------------------------------------------------------------------------------------- report


def machine_lines(bench: Bench) -> List[str]:
    """The machine, software and command the JSON was measured with, as markdown lines."""
    f, cpu = bench.facts, bench.machine.get("cpu") or {}
    brand = cpu.get("brand_raw") or f.get("cpu_model") or bench.machine.get("processor") or "unknown CPU"
    parts = [f"{brand}"]
    if f.get("logical_cpus"):
        parts.append(f"{f['logical_cpus']} logical CPUs ({f.get('physical_cores', '?')} cores)")
    if f.get("cpu_isa"):
        parts.append(f"dynattn CPU kernels: {f['cpu_isa']}")
    if f.get("clock_ghz"):
        parts.append(f"{f['clock_ghz']:.2f} GHz")
    lines = [f"- Machine: {', '.join(parts)}; {bench.machine.get('system', '')} {bench.machine.get('release', '')}"
             .rstrip()]
    gpu = f.get("gpu")
    if gpu:
        lines.append(f"- GPU: {gpu.get('name')} ({gpu.get('sm_count')} SMs, {gpu.get('memory_gib')} GiB)")
    soft = [f"threads {f['threads']}" if f.get("threads") else None, f"torch {f['torch']}" if f.get("torch") else None,
            f"python {bench.machine.get('python_version')}" if bench.machine.get("python_version") else None]
    lines.append(f"- Software: {', '.join(s for s in soft if s) or 'not recorded'}")
    if bench.commit.get("id"):
        lines.append(f"- Commit: `{bench.commit['id'][:10]}`" + (" (uncommitted changes)" if bench.commit.get("dirty")
                                                                 else "") + f", run {bench.datetime[:19]} UTC")
    if f.get("command"):
        lines.append(f"- Command: `{f['command']}`")
    return lines


def targets_section(bench: Bench) -> str:
    rows = [t for t in bench.targets if t.get("status") in ("PASS", "MISS")]
    na = len(bench.targets) - len(rows)
    if not bench.targets:
        return ""
    out = ["## Targets", "", "The issue's goals for the fused kernels (a MISS does not fail the run)."]
    if rows:
        out += ["", _table(["status", "device", "impl", "shape", "pass", "check", "value", "goal"], [
            [t["status"], t.get("device", ""), f"`{t.get('impl', '')}`", f"`{t.get('shape', '')}`", t.get("pass", ""),
             t.get("check", ""), sig(t.get("value")), t.get("goal", "")] for t in rows], ["l"] * 6 + ["r", "l"])]
    if na:
        out += ["", f"{na} more target lines are n/a: the cases they compare were not measured in this run "
                    "(skipped, see below, or not selected)."]
    return "\n".join(out)


def skipped_section(bench: Bench) -> str:
    if not bench.skipped:
        return ""
    by_reason: Dict[str, List[str]] = {}
    for key, reason in bench.skipped.items():
        by_reason.setdefault(reason, []).append(key)
    rows = [[str(len(keys)), reason, f"`{keys[0]}`"] for reason, keys in
            sorted(by_reason.items(), key=lambda kv: -len(kv[1]))]
    return "\n".join(["## Skipped", "", "Cases that could not run here, and why.", "",
                      _table(["cases", "reason", "e.g."], rows, ["r", "l", "l"])])


NOISE_NOTE = ("Medians of pytest-benchmark rounds; every ratio compares two medians of this same run. Timings on a "
              "shared machine are noisy: compare ratios, and re-run on an idle machine for numbers you publish.")
MODEL_LEGEND = ("images/s = batch / median time of one call; `infer`: eval + no_grad forward; `train`: one step "
                "(forward, cross-entropy, backward, AdamW). `x dense ViT`: the dense timm ViT's median / the "
                "vit_bra median (same size, mode and batch). GFLOPs: forward, per image, 2 FLOPs per multiply-add.")


def _sections(bench: Bench, images: Mapping[str, str], level: str, shapes: bool) -> List[str]:
    """Op and model sections; ``images`` maps PNG file names to the link to use for them."""
    md: List[str] = []
    for device, dtype in bench.op_groups():
        md += ["", f"{level} Op level: {device} {dtype}", "", OP_LEGEND, "", op_table(bench, device, dtype)]
        if shapes:
            md += ["", "Shapes:", "", shapes_table(bench, device, dtype)]
        for name in sorted(images):
            if name.startswith(f"{device}_{dtype}") and name.endswith(("_latency.png", "_speedup.png")):
                md += ["", f"![{name[:-4]}]({images[name]})"]
    for device in bench.model_devices():
        md += ["", f"{level} Model level: {device}", "", MODEL_LEGEND, "", model_table(bench, device)]
        if f"{device}_models.png" in images:
            md += ["", f"![{device}_models]({images[f'{device}_models.png']})"]
    return md


def roofline_summary(bench: Bench, *, cpu_ghz: Optional[float] = None, fma_units: Optional[int] = None,
                     cores: Optional[int] = None, gpu_peak_tflops: Optional[float] = None) -> List[str]:
    """One line per device and dtype: the peak estimate and the range of % of it the fused cases reach."""
    lines = []
    for device, dtype in bench.op_groups():
        cases = {c.key: c for c in bench.ops if (c.device, c.dtype) == (device, dtype)}
        fused = [c for c in cases.values() if c.impl.startswith("fused_") and c.gflops]
        dense = [c for c in cases.values() if c.impl == DENSE and c.gflops]
        if not fused:
            continue
        if device == "cpu":
            peak, how = cpu_peak(bench.facts, clock_ghz=cpu_ghz, fma_units=fma_units, cores=cores)
        else:
            name = next((c.info.get("gpu") for c in fused if c.info.get("gpu")), None)
            peak, how = gpu_peak(bench, name, tflops=gpu_peak_tflops)
        line = f"- {device} {dtype} peak: {how}."
        if peak:
            f = [roofline.percent_of_peak(c.gflops, peak) for c in fused]
            line += f" Fused cases reach {min(f):.1f}-{max(f):.1f}% of it"
            if dense:
                d = [roofline.percent_of_peak(c.gflops, peak) for c in dense]
                line += f" (dense SDPA: {min(d):.1f}-{max(d):.1f}%)"
            line += "."
        lines.append(line)
    return lines


def render(bench: Bench, *, out_dir: PathLike, title: str = "dynattn benchmarks", plots: bool = True,
           cpu_ghz: Optional[float] = None, fma_units: Optional[int] = None, cores: Optional[int] = None,
           gpu_peak_tflops: Optional[float] = None, readme: Optional[PathLike] = None) -> str:
    """Write ``out_dir/report.md`` (and the PNGs unless ``plots=False``); return the markdown.

    ``readme``: a markdown file whose block between :data:`README_START` and :data:`README_END` is replaced by
    the machine, command, tables, plots (linked relative to the file) and a roofline summary.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = (plot_scaling(bench, out_dir) + plot_models(bench, out_dir)) if plots else []
    overrides = dict(cpu_ghz=cpu_ghz, fma_units=fma_units, cores=cores, gpu_peak_tflops=gpu_peak_tflops)
    md = [f"# {title}", "", *machine_lines(bench), "", NOISE_NOTE]
    md += _sections(bench, {p.name: p.name for p in written}, "##", shapes=True)
    if bench.ops:
        md += ["", roofline_section(bench, **overrides)]
    for section in (targets_section(bench), skipped_section(bench)):
        if section:
            md += ["", section]
    if not bench.ops and not bench.models:
        md += ["", f"No dynattn op or model results in {bench.path} ({bench.ignored} other benchmarks ignored)."]
    text = "\n".join(md) + "\n"
    (out_dir / "report.md").write_text(text)
    if readme is not None:
        update_readme(readme, readme_block(bench, out_dir=out_dir, readme=readme, images=written, **overrides))
    return text


README_START = "<!-- dynattn-bench:start -->"
README_END = "<!-- dynattn-bench:end -->"
_README_NOTE = "<!-- generated by `python -m dynattn.bench.report BENCH.json --readme FILE`; edits are overwritten -->"


def _link(path: Path, readme: Path) -> str:
    return Path(os.path.relpath(Path(path).resolve(), Path(readme).resolve().parent)).as_posix()


def readme_block(bench: Bench, *, out_dir: PathLike, readme: PathLike, images: Sequence[Path] = (),
                 **overrides: Optional[float]) -> str:
    """The README's generated block (markers included): machine and command, op and model tables, the plots
    linked relative to ``readme``, the roofline summary (``overrides``: :func:`roofline_summary`'s options)
    and a link to the full report."""
    readme = Path(readme)
    md = [README_START, _README_NOTE, "", *machine_lines(bench), "", NOISE_NOTE]
    md += _sections(bench, {Path(p).name: _link(p, readme) for p in images}, "###", shapes=False)
    summary = roofline_summary(bench, **overrides)
    if summary:
        md += ["", "### Roofline", "", "Achieved attention GFLOP/s against the machine's peak estimate (cores x SIMD "
               "lanes x FMA units x 2 x clock on CPU; dense tensor-core peak on GPU):", "", *summary]
    md += ["", f"Every shape, the roofline per case, the targets and the skipped cases: "
               f"[{_link(Path(out_dir) / 'report.md', readme)}]({_link(Path(out_dir) / 'report.md', readme)}).",
           "", README_END]
    return "\n".join(md)


def update_readme(readme: PathLike, block: str) -> None:
    """Replace the text from :data:`README_START` to :data:`README_END` in ``readme`` with ``block``."""
    readme = Path(readme)
    if not readme.is_file():
        raise FileNotFoundError(f"README {str(readme)!r} does not exist")
    text = readme.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"{readme}: no '{README_START}' ... '{README_END}' block to replace; add the two markers "
                         "where the benchmark tables belong")
    readme.write_text(text[:start] + block + text[end + len(README_END):])


def _positive(kind):
    def parse(s: str):
        try:
            x = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {s!r}") from None
        if not x > 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {s!r}")
        return x
    return parse


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m dynattn.bench.report``: print the report and write it (and the plots) to ``--out``."""
    parser = argparse.ArgumentParser(prog="python -m dynattn.bench.report",
                                     description="Markdown tables, PNG plots and a roofline note from the "
                                                 "pytest-benchmark JSON of dynattn's benchmarks/.")
    parser.add_argument("json", help="the file written by pytest benchmarks/ --benchmark-json=PATH")
    parser.add_argument("--out", default=None, help="output folder (default: <json stem>_report beside the JSON)")
    parser.add_argument("--title", default="dynattn benchmarks", help="the report's heading")
    parser.add_argument("--no-plots", action="store_true", help="tables only (no matplotlib needed)")
    parser.add_argument("--cpu-ghz", type=_positive(float), default=None, help="CPU clock for the roofline")
    parser.add_argument("--fma-units", type=_positive(int), default=None, help="vector FMA units per core")
    parser.add_argument("--cores", type=_positive(int), default=None, help="cores used, for the CPU peak")
    parser.add_argument("--gpu-peak-tflops", type=_positive(float), default=None,
                        help="GPU dense bf16/fp16 peak TFLOP/s, for devices not in the built-in table")
    parser.add_argument("--readme", default=None,
                        help="also replace the block between the dynattn-bench markers of this markdown file "
                             "(e.g. README.md) with the tables and the plots")
    args = parser.parse_args(argv)
    try:
        bench = load(args.json)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    out = Path(args.out) if args.out else Path(args.json).with_name(Path(args.json).stem + "_report")
    if args.readme is not None and not Path(args.readme).is_file():
        parser.error(f"--readme {args.readme!r} does not exist")
    try:
        text = render(bench, out_dir=out, title=args.title, plots=not args.no_plots, cpu_ghz=args.cpu_ghz,
                      fma_units=args.fma_units, cores=args.cores, gpu_peak_tflops=args.gpu_peak_tflops,
                      readme=args.readme)
    except ValueError as e:  # e.g. --readme without the markers
        parser.error(str(e))
    print(text)
    print(f"wrote {out / 'report.md'}" + ("" if args.no_plots else " and its PNG plots")
          + (f"; updated {args.readme}" if args.readme else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
