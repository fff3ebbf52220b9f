"""pytest-benchmark plumbing for the op and model benchmarks: options, the per-run result stores, ratios, the
machine facts and the summary.

Every op case stores its median, FLOPs and peak memory in a session-wide dict (``config.stash``), every model
case its median and batch in another. At the end of the run the ratios between implementations (models)
measured in this same run are computed from them, added to each benchmark's ``extra_info`` in the saved JSON
(``pytest_benchmark_update_json``) and printed, with the issue's targets marked PASS/MISS, by
``pytest_terminal_summary``. A miss never fails the run. ``pytest_benchmark_update_machine_info`` records what
the roofline note of ``python -m dynattn.bench.report`` needs (ISA, cores used, clock, GPU peak) and the command.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest
import torch

try:
    import dynattn
except ImportError:  # running from a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import dynattn

from _impls import ALL_SHAPES, BIFORMER_T, HIRES_D64, SHAPES  # noqa: E402

RESULTS = pytest.StashKey[dict]()
MODEL_RESULTS = pytest.StashKey[dict]()
PASSES = ("fwd", "fwd+bwd")

# Baselines every implementation is compared with (speed-up = baseline median / this median), where measured.
BASELINE_LABEL = {"dense_sdpa": "x dense", "biformer_gather": "x biformer", "index_select_gather": "x idx_sel",
                  "reference": "x ref", "flex": "x flex", "fused_triton": "x triton"}
BASELINES = tuple(BASELINE_LABEL)


def pytest_addoption(parser):
    group = parser.getgroup("dynattn benchmarks")
    group.addoption("--threads", type=int, default=2, help="torch.set_num_threads for every case (default 2)")
    # 0.5 s keeps the default CPU run (about 180 cases) well inside 10 minutes on 2 cores
    group.addoption("--bench-seconds", type=float, default=0.5,
                    help="timed seconds aimed at per case (default 0.5): rounds = seconds / (one call), clamped to "
                         "[3, 200] for ops, [3, 50] for models ([5, 200] and [5, 100] on CUDA)")


def pytest_configure(config):
    if config.getoption("threads", None) is not None:
        torch.set_num_threads(config.getoption("threads"))
    config.stash[RESULTS] = {}
    config.stash[MODEL_RESULTS] = {}
    json_path = config.getoption("benchmark_json", None)
    if json_path:  # pytest-benchmark opens it without creating its folder (e.g. .benchmarks/, git-ignored)
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)


@pytest.fixture
def bench_results(request):
    """``{(device, dtype, shape, pass, impl): record}``; a record holds median_s, flops, gflops, peak_mib... or
    skipped (the reason)."""
    threads = request.config.getoption("threads")
    if torch.get_num_threads() != threads:  # something in the process changed it: put it back
        torch.set_num_threads(threads)
    return request.config.stash[RESULTS]


@pytest.fixture
def model_results(request):
    """``{(device, dtype, img_size, mode, model): record}``; a record holds median_s, batch, dense_model... or
    skipped (the reason)."""
    threads = request.config.getoption("threads")
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return request.config.stash[MODEL_RESULTS]


def pytest_benchmark_update_machine_info(config, machine_info):
    """The facts the report's roofline note needs, taken here so the report does not depend on where it runs."""
    from dynattn.bench.roofline import machine_facts

    facts = machine_facts(threads=config.getoption("threads"))
    facts.update(torch=torch.__version__, dynattn=getattr(dynattn, "__version__", None),
                 command=shlex.join(["pytest", *map(str, config.invocation_params.args)]),
                 bench_seconds=config.getoption("bench_seconds"))
    machine_info["dynattn"] = facts


# --------------------------------------------------------------------------------------------------
# ratios and targets
# --------------------------------------------------------------------------------------------------


def _bwd_gflops(results: dict, key) -> float | None:
    """Backward-only GFLOP/s of a fwd+bwd case: (its FLOPs - fwd's) / (its median - fwd's median)."""
    if key[3] != "fwd+bwd":
        return None
    both, fwd = results.get(key, {}), results.get(key[:3] + ("fwd",) + key[4:], {})
    if not (both.get("median_s") and fwd.get("median_s")) or both["median_s"] <= fwd["median_s"]:
        return None
    return (both["flops"] - fwd["flops"]) / (both["median_s"] - fwd["median_s"]) / 1e9


def _ratios(results: dict) -> dict:
    """Per measured case: speed-ups over each baseline, peak memory, GFLOP/s (and backward-only GFLOP/s)
    relative to dense SDPA; all from this same run, same device, dtype, shape and pass."""
    out = {}
    for key, rec in results.items():
        if rec.get("median_s") is None:
            continue
        group, impl = key[:4], key[4]
        r = {}
        for base in BASELINES:
            b = results.get(group + (base,), {})
            if base != impl and b.get("median_s"):
                r[f"speedup_vs_{base}"] = b["median_s"] / rec["median_s"]
        dense = results.get(group + ("dense_sdpa",), {})
        if dense.get("peak_mib") and rec.get("peak_mib") is not None:
            r["peak_mib_vs_dense_sdpa"] = rec["peak_mib"] / dense["peak_mib"]
        if dense.get("gflops") and rec.get("gflops") is not None:
            r["gflops_vs_dense_sdpa"] = rec["gflops"] / dense["gflops"]
        bwd, dense_bwd = _bwd_gflops(results, key), _bwd_gflops(results, group + ("dense_sdpa",))
        if bwd is not None:
            r["bwd_gflops"] = bwd
            if dense_bwd:
                r["bwd_gflops_vs_dense_sdpa"] = bwd / dense_bwd
        out[key] = r
    return out


def _target_specs():
    """The issue's targets: (device, dtype, impl, shapes, passes, description, metric in _ratios, cmp, goal)."""
    stages, cpu, gpu = ([s.name for s in shapes] for shapes in (BIFORMER_T, SHAPES["cpu"], SHAPES["cuda"]))
    g128 = [s.name for s in HIRES_D64 if s.grid == 128]
    d64 = [s.name for s in SHAPES["cuda"] if s.d == 64]  # head dim 64
    fb = ("fwd+bwd",)
    cpu_, gpu_ = ("cpu", "float32", "fused_cpu"), ("cuda", "bfloat16")
    return [
        (*cpu_, stages, fb, "fused >= 1.5x faster than index_select gather", "speedup_vs_index_select_gather", ">=",
         1.5),
        (*cpu_, stages, fb, "fused >= 7x faster than BiFormer's gather", "speedup_vs_biformer_gather", ">=", 7.0),
        (*cpu_, stages, fb, "fused peak memory <= dense SDPA's", "peak_mib_vs_dense_sdpa", "<=", 1.0),
        (*cpu_, ["hires_128"], PASSES, "fused >= 30x faster than dense SDPA", "speedup_vs_dense_sdpa", ">=", 30.0),
        (*cpu_, cpu, PASSES, "fused GFLOP/s >= 70% of dense SDPA's", "gflops_vs_dense_sdpa", ">=", 0.7),
        (*gpu_, "fused_triton", g128, fb, "triton >= 20x faster than dense flash SDPA", "speedup_vs_dense_sdpa",
         ">=", 20.0),
        (*gpu_, "fused_triton", gpu, PASSES, "triton faster than Flex (same block mask)", "speedup_vs_flex", ">",
         1.0),
        (*gpu_, "fused_triton", gpu, PASSES, "triton GFLOP/s >= 50% of dense flash SDPA's", "gflops_vs_dense_sdpa",
         ">=", 0.5),
        (*gpu_, "fused_cuda", d64, ("fwd",), "cuda fwd GFLOP/s >= 70% of dense flash SDPA's", "gflops_vs_dense_sdpa",
         ">=", 0.7),
        (*gpu_, "fused_cuda", d64, fb, "cuda bwd GFLOP/s >= 50% of dense flash SDPA's", "bwd_gflops_vs_dense_sdpa",
         ">=", 0.5),
        (*gpu_, "fused_cuda", g128, fb, "cuda >= 1.5x faster than triton", "speedup_vs_fused_triton", ">=", 1.5),
        (*gpu_, "fused_cuda", g128, fb, "cuda >= 1.5x faster than Flex", "speedup_vs_flex", ">=", 1.5),
    ]


def _why_missing(results, key) -> str:
    rec = results.get(key)
    if rec is None:
        return f"{key[4]} not run (deselected)"
    if rec.get("skipped"):
        return f"{key[4]} skipped: {rec['skipped']}"
    return f"{key[4]} has no timing (--benchmark-disable?)"


def _targets(results: dict, ratios: dict) -> list:
    """One dict per check with status PASS, MISS or n/a."""
    rows = []
    for device, dtype, fused, shapes, passes_list, what, metric, cmp, goal in _target_specs():
        other = metric.rsplit("_vs_", 1)[1]
        for shape in shapes:
            for passes in passes_list:
                key = (device, dtype, shape, passes, fused)
                value = ratios.get(key, {}).get(metric)
                row = {"device": device, "dtype": dtype, "impl": fused, "shape": shape, "pass": passes,
                       "check": what, "metric": metric, "goal": f"{cmp} {goal:g}", "value": value}
                if value is None:
                    missing = key if results.get(key, {}).get("median_s") is None else key[:4] + (other,)
                    row["status"], row["note"] = "n/a", _why_missing(results, missing)
                else:
                    ok = {">=": value >= goal, ">": value > goal, "<=": value <= goal}[cmp]
                    row["status"] = "PASS" if ok else "MISS"
                rows.append(row)
    return rows


def _model_ratios(models: dict) -> dict:
    """Per measured vit_bra case: ``speedup_vs_dense_model`` = its dense ViT's median / its median (same device,
    dtype, image size, mode and batch, this run)."""
    out = {}
    for key, rec in models.items():
        dense = models.get(key[:4] + (rec.get("dense_model"),), {})
        if rec.get("median_s") and dense.get("median_s") and dense.get("batch") == rec.get("batch"):
            out[key] = {"speedup_vs_dense_model": dense["median_s"] / rec["median_s"]}
    return out


def pytest_benchmark_update_json(config, benchmarks, output_json):
    results = config.stash.get(RESULTS, {})
    models = config.stash.get(MODEL_RESULTS, {})
    ratios, model_ratios = _ratios(results), _model_ratios(models)
    for bench in output_json.get("benchmarks", []):
        info = bench.get("extra_info", {})
        if info.get("kind") == "model":
            key = tuple(info.get(k) for k in ("device", "dtype", "img_size", "mode", "model"))
            info.update(model_ratios.get(key, {}))
        else:
            key = tuple(info.get(k) for k in ("device", "dtype", "shape", "pass", "impl"))
            info.update(ratios.get(key, {}))
    skipped = {"/".join(k): r["skipped"] for k, r in results.items() if r.get("skipped")}
    skipped.update({"/".join(["model", *map(str, k)]): r["skipped"] for k, r in models.items() if r.get("skipped")})
    output_json["dynattn"] = {
        "threads": config.getoption("threads"),
        "torch": torch.__version__,
        "targets": _targets(results, ratios),
        "skipped": skipped,
    }


# --------------------------------------------------------------------------------------------------
# terminal summary
# --------------------------------------------------------------------------------------------------


def _fmt(x, spec=".2f", empty="-"):
    return empty if x is None else format(x, spec)


def _measured(results, key_filter):
    return [k for k, rec in results.items() if key_filter(k) and rec.get("median_s") is not None]


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    _op_summary(terminalreporter, config)
    _model_summary(terminalreporter, config)
    _skip_summary(terminalreporter, config)


def _model_summary(tr, config):
    models = config.stash.get(MODEL_RESULTS, {})
    measured = [k for k, rec in models.items() if rec.get("median_s")]
    if not measured:
        return
    ratios = _model_ratios(models)
    tr.section("dynattn model benchmarks: images/s, and vit_bra's speed-up over its dense ViT in this run")
    tr.write_line(f"{'device':7}{'dtype':10}{'img':>5} {'mode':6}{'model':30}{'batch':>6}{'ms/batch':>10}"
                  f"{'images/s':>10}{'x dense':>9}{'GFLOPs/img':>12}")
    for k in measured:
        rec = models[k]
        tr.write_line(f"{k[0]:7}{k[1]:10}{k[2]:>5} {k[3]:6}{k[4]:30}{rec['batch']:>6}"
                      f"{rec['median_s'] * 1e3:>10.1f}{rec['batch'] / rec['median_s']:>10.2f}"
                      f"{_fmt(ratios.get(k, {}).get('speedup_vs_dense_model')):>9}"
                      f"{_fmt(rec.get('gflops_per_image')):>12}")


def _skip_summary(tr, config):
    """Every skip reason with its count: nothing is skipped silently."""
    counts = {}
    for store, what in ((config.stash.get(RESULTS, {}), "op"), (config.stash.get(MODEL_RESULTS, {}), "model")):
        for rec in store.values():
            if rec.get("skipped"):
                counts[(what, rec["skipped"])] = counts.get((what, rec["skipped"]), 0) + 1
    if not counts:
        return
    tr.section("dynattn benchmarks: skipped cases and why")
    for (what, reason), n in sorted(counts.items(), key=lambda kv: (kv[0][0] != "op", -kv[1])):
        tr.write_line(f"  {n:4d} {what} case{'s' if n > 1 else ' '}: {reason}")


def _op_summary(tr, config):
    results = config.stash.get(RESULTS, {})
    if not results:
        return
    ratios = _ratios(results)
    tr.section("dynattn op benchmarks: medians, and speed-ups over the other impls measured in this run")
    tr.write_line(f"torch {torch.__version__}, {config.getoption('threads')} threads. 'x base' = base median / this "
                  "median (> 1: this impl is faster). GFLOP/s = attention FLOPs / median (fwd+bwd = 3x fwd); "
                  "bwd GF/s = backward FLOPs / (fwd+bwd median - fwd median).")
    devices = sorted({k[0] for k in results}, key=lambda d: d != "cpu")
    for device in devices:
        measured = _measured(results, lambda k: k[0] == device)
        if not measured:
            reasons = sorted({r["skipped"] for k, r in results.items() if k[0] == device and r.get("skipped")})
            tr.write_line("")
            tr.write_line(f"[{device}] no case ran" + (f" ({'; '.join(reasons)})" if reasons else ""))
            continue
        if device == "cuda":
            tr.write_line("")
            tr.write_line(f"[cuda] {torch.cuda.get_device_name()}; dense_sdpa is forced to FlashAttention")
        bases = [b for b in BASELINES if any(k[4] == b for k in measured)]
        for group in dict.fromkeys(k[:3] for k in results if k[0] == device):  # (device, dtype, shape)
            keys = [k for k in results if k[:3] == group]
            if not any(k in measured for k in keys):
                continue
            tr.write_line("")
            shape = ALL_SHAPES.get(group[2])
            desc = f": {shape.desc()}; keys/query routed {shape.routed_keys}, dense {shape.n}" if shape else ""
            tr.write_line(f"[{device} {group[1]}] {group[2]}{desc}")
            head = f"  {'pass':8}{'impl':20}{'median ms':>11}{'GFLOP/s':>9}{'bwd GF/s':>10}{'peak MiB':>10}"
            tr.write_line(head + "".join(f"{BASELINE_LABEL[b]:>11}" for b in bases))
            for passes in PASSES:
                for k in sorted((k for k in keys if k[3] == passes), key=lambda k: results[k].get("order", 0)):
                    rec, r = results[k], ratios.get(k, {})
                    if rec.get("skipped"):
                        tr.write_line(f"  {passes:8}{k[4]:20}  skipped: {rec['skipped']}")
                        continue
                    ms = None if rec.get("median_s") is None else rec["median_s"] * 1e3
                    line = (f"  {passes:8}{k[4]:20}{_fmt(ms, '.3f'):>11}{_fmt(rec.get('gflops'), '.1f'):>9}"
                            f"{_fmt(r.get('bwd_gflops'), '.1f'):>10}{_fmt(rec.get('peak_mib'), '.1f'):>10}")
                    tr.write_line(line + "".join(f"{_fmt(r.get(f'speedup_vs_{b}')):>11}" for b in bases))
    ran = {k[:4] for k in results}  # (device, dtype, shape, pass) collected and not deselected
    measured_devices = {k[0] for k in _measured(results, lambda k: True)}
    rows = [row for row in _targets(results, ratios) if row["device"] in measured_devices]
    if not rows:
        return
    tr.write_line("")
    tr.write_line("Targets (fused_<backend> = routed_attention(backend=<backend>) with a precomputed idx; a MISS "
                  "does not fail the run):")
    shown = [row for row in rows if (row["device"], row["dtype"], row["shape"], row["pass"]) in ran]
    for row in shown:
        value = "" if row["value"] is None else f"{row['value']:.2f} "
        note = f"  ({row['note']})" if row.get("note") else ""
        tr.write_line(f"  {row['status']:5} {row['device']:5}{row['impl']:13} {row['shape']:15} {row['pass']:8} "
                      f"{row['check']}: {value}{row['goal']}{note}")
    if len(rows) > len(shown):
        tr.write_line(f"  ({len(rows) - len(shown)} more target lines concern shapes/passes not run here)")
