"""pytest-benchmark plumbing for the op benchmarks: options, the per-run result store, ratios and the summary.

Every case stores its median, FLOPs and peak memory in a session-wide dict (``config.stash``). At the end of
the run the ratios between implementations measured in this same run are computed from it, added to each
benchmark's ``extra_info`` in the saved JSON (``pytest_benchmark_update_json``) and printed, with the issue's
targets marked PASS/MISS, by ``pytest_terminal_summary``. A miss never fails the run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

try:
    import dynattn  # noqa: F401
except ImportError:  # running from a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _impls import SHAPES, STAGE_SHAPES  # noqa: E402

RESULTS = pytest.StashKey[dict]()

# Baselines every implementation is compared with (speed-up = baseline median / this median).
BASELINES = ("dense_sdpa", "biformer_gather", "index_select_gather", "reference")
BASELINE_LABEL = {"dense_sdpa": "x dense", "biformer_gather": "x biformer", "index_select_gather": "x idx_sel",
                  "reference": "x ref"}


def pytest_addoption(parser):
    group = parser.getgroup("dynattn benchmarks")
    group.addoption("--threads", type=int, default=2, help="torch.set_num_threads for every case (default 2)")
    group.addoption("--bench-seconds", type=float, default=1.0,
                    help="timed seconds aimed at per case: rounds = seconds / (one call), clamped to [3, 200]")


def pytest_configure(config):
    if config.getoption("threads", None) is not None:
        torch.set_num_threads(config.getoption("threads"))
    config.stash[RESULTS] = {}


@pytest.fixture
def bench_results(request):
    """``{(device, shape, pass, impl): record}``; a record holds median_s, flops, gflops, peak_mib... or skipped."""
    threads = request.config.getoption("threads")
    if torch.get_num_threads() != threads:  # something in the process changed it: put it back
        torch.set_num_threads(threads)
    return request.config.stash[RESULTS]


# --------------------------------------------------------------------------------------------------
# ratios and targets
# --------------------------------------------------------------------------------------------------


def _ratios(results: dict) -> dict:
    """Per measured case: speed-ups over each baseline and peak memory relative to dense SDPA (same run)."""
    out = {}
    for (device, shape, passes, impl), rec in results.items():
        if rec.get("median_s") is None:
            continue
        r = {}
        for base in BASELINES:
            b = results.get((device, shape, passes, base), {})
            if base != impl and b.get("median_s"):
                r[f"speedup_vs_{base}"] = b["median_s"] / rec["median_s"]
        dense = results.get((device, shape, passes, "dense_sdpa"), {})
        if dense.get("peak_mib") and rec.get("peak_mib") is not None:
            r["peak_mib_vs_dense_sdpa"] = rec["peak_mib"] / dense["peak_mib"]
        if dense.get("gflops") and rec.get("gflops") is not None:
            r["gflops_vs_dense_sdpa"] = rec["gflops"] / dense["gflops"]
        out[(device, shape, passes, impl)] = r
    return out


def _why_missing(results, key) -> str:
    rec = results.get(key)
    if rec is None:
        return f"{key[3]} not run (deselected)"
    if rec.get("skipped"):
        return f"{key[3]} skipped: {rec['skipped']}"
    return f"{key[3]} has no timing (--benchmark-disable?)"


def _targets(results: dict, ratios: dict) -> list:
    """The issue's CPU targets: one dict per check with status PASS, MISS or n/a."""
    dev, fused = "cpu", "fused_cpu"
    checks = []  # (shape, pass, description, metric key in ratios or None, compare, goal, other impl)
    for s in STAGE_SHAPES:
        checks.append((s, "fwd+bwd", "fused >= 1.5x faster than index_select gather", "speedup_vs_index_select_gather",
                       ">=", 1.5, "index_select_gather"))
        checks.append((s, "fwd+bwd", "fused >= 7x faster than BiFormer's gather", "speedup_vs_biformer_gather",
                       ">=", 7.0, "biformer_gather"))
        checks.append((s, "fwd+bwd", "fused peak memory <= dense SDPA's", "peak_mib_vs_dense_sdpa", "<=", 1.0,
                       "dense_sdpa"))
    for p in ("fwd", "fwd+bwd"):
        checks.append(("hires_128", p, "fused >= 30x faster than dense SDPA", "speedup_vs_dense_sdpa", ">=", 30.0,
                       "dense_sdpa"))
    for shape in SHAPES:
        for p in ("fwd", "fwd+bwd"):
            checks.append((shape.name, p, "fused GFLOP/s >= 70% of dense SDPA's", "gflops_vs_dense_sdpa", ">=", 0.7,
                           "dense_sdpa"))
    rows = []
    for shape, passes, what, metric, cmp, goal, other in checks:
        key = (dev, shape, passes, fused)
        value = ratios.get(key, {}).get(metric)
        row = {"shape": shape, "pass": passes, "check": what, "metric": metric, "goal": f"{cmp} {goal:g}",
               "value": value}
        if value is None:
            missing = key if results.get(key, {}).get("median_s") is None else (dev, shape, passes, other)
            row["status"], row["note"] = "n/a", _why_missing(results, missing)
        else:
            ok = value >= goal if cmp == ">=" else value <= goal
            row["status"] = "PASS" if ok else "MISS"
        rows.append(row)
    return rows


def pytest_benchmark_update_json(config, benchmarks, output_json):
    results = config.stash.get(RESULTS, {})
    ratios = _ratios(results)
    for bench in output_json.get("benchmarks", []):
        info = bench.get("extra_info", {})
        key = (info.get("device"), info.get("shape"), info.get("pass"), info.get("impl"))
        info.update(ratios.get(key, {}))
    output_json["dynattn"] = {
        "threads": config.getoption("threads"),
        "torch": torch.__version__,
        "targets": _targets(results, ratios),
        "skipped": {"/".join(k): r["skipped"] for k, r in results.items() if r.get("skipped")},
    }


# --------------------------------------------------------------------------------------------------
# terminal summary
# --------------------------------------------------------------------------------------------------


def _fmt(x, spec=".2f", empty="-"):
    return empty if x is None else format(x, spec)


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    results = config.stash.get(RESULTS, {})
    if not results:
        return
    tr = terminalreporter
    ratios = _ratios(results)
    tr.section("dynattn op benchmarks: medians, and speed-ups over the other impls measured in this run")
    tr.write_line(f"torch {torch.__version__}, {config.getoption('threads')} threads. 'x base' = base median / this "
                  "median (> 1: this impl is faster). GFLOP/s = attention FLOPs / median (fwd+bwd = 3x fwd).")
    known = {s.name: s for s in SHAPES}
    devices = sorted({k[0] for k in results}, key=lambda d: d != "cpu")
    for device in devices:
        names = list(dict.fromkeys(k[1] for k in results if k[0] == device))  # other suites may add shapes
        for name in names:
            keys = [k for k in results if k[0] == device and k[1] == name]
            measured = [k for k in keys if results[k].get("median_s") is not None]
            if not measured:
                continue
            dtype = results[measured[0]].get("dtype", "")
            tr.write_line("")
            shape = known.get(name)
            desc = f": {shape.desc()}; keys/query routed {shape.routed_keys}, dense {shape.n}" if shape else ""
            tr.write_line(f"[{device} {dtype}] {name}{desc}")
            head = f"  {'pass':8}{'impl':22}{'median ms':>11}{'GFLOP/s':>9}{'peak MiB':>10}"
            head += "".join(f"{BASELINE_LABEL[b]:>11}" for b in BASELINES)
            tr.write_line(head)
            for passes in ("fwd", "fwd+bwd"):
                for k in sorted((k for k in keys if k[2] == passes), key=lambda k: results[k].get("order", 0)):
                    rec = results[k]
                    if rec.get("skipped"):
                        tr.write_line(f"  {passes:8}{k[3]:22}  skipped: {rec['skipped']}")
                        continue
                    ms = None if rec.get("median_s") is None else rec["median_s"] * 1e3
                    line = (f"  {passes:8}{k[3]:22}{_fmt(ms, '.3f'):>11}{_fmt(rec.get('gflops'), '.1f'):>9}"
                            f"{_fmt(rec.get('peak_mib'), '.1f'):>10}")
                    r = ratios.get(k, {})
                    line += "".join(f"{_fmt(r.get(f'speedup_vs_{b}')):>11}" for b in BASELINES)
                    tr.write_line(line)
    if "cpu" in devices:
        tr.write_line("")
        tr.write_line("Targets (cpu, fused = routed_attention(backend='cpu') with a precomputed idx; a MISS does not "
                      "fail the run):")
        rows = _targets(results, ratios)
        ran = {(k[1], k[2]) for k in results if k[0] == "cpu"}
        for row in rows:
            if (row["shape"], row["pass"]) not in ran:
                continue
            value = "" if row["value"] is None else f"{row['value']:.2f} "
            note = f"  ({row['note']})" if row.get("note") else ""
            tr.write_line(f"  {row['status']:5} {row['shape']:14} {row['pass']:8} {row['check']}: "
                          f"{value}{row['goal']}{note}")
        left = sum((row["shape"], row["pass"]) not in ran for row in rows)
        if left:
            tr.write_line(f"  ({left} more target lines concern shapes/passes not run here)")
