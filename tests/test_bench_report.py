"""dynattn.bench.report and dynattn.bench.roofline on a small pytest-benchmark JSON written here (no timing).

Every expected number below is worked out by hand from the medians and FLOPs the test writes.
"""

import json
import os
import subprocess
import sys

import pytest

from dynattn.bench import report, roofline

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _op(device, dtype, grid, passes, impl, median, flops, peak_mib, **extra):
    tokens = grid * grid
    info = {"kind": "op", "device": device, "dtype": dtype, "shape": f"hires_{grid}", "pass": passes, "impl": impl,
            "flops": flops, "peak_mib": peak_mib, "batch": 1, "grid": grid, "tokens": tokens, "heads": 4,
            "head_dim": 32, "regions": grid // 8, "topk": 4, "tokens_per_region": 64,
            "keys_per_query": tokens if impl == "dense_sdpa" else 256, "sweep": "B1 4hx32, 8x8-token regions",
            **extra}
    return {"name": f"test_op[{device}-{impl}-{grid}-{passes}]", "stats": {"median": median, "rounds": 5},
            "extra_info": info}


def _model(model, mode, median, *, family, dense_model=None, batch=8):
    return {"name": f"test_model[{model}-{mode}]", "stats": {"median": median},
            "extra_info": {"kind": "model", "device": "cpu", "dtype": "float32", "model": model, "family": family,
                           "dense_model": dense_model, "img_size": 224, "mode": mode, "batch": batch,
                           "params_m": 5.5, "gflops_per_image": 2.5}}


# (grid, pass): {impl: (median s, FLOPs, peak MiB)}
CPU_CASES = {
    (32, "fwd"): {"fused_cpu": (0.002, 1.6e8, 1.5), "index_select_gather": (0.005, 1.6e8, 6.0),
                  "biformer_gather": (0.040, 1.6e8, 12.0), "dense_sdpa": (0.010, 6.4e8, 3.0)},
    (32, "fwd+bwd"): {"fused_cpu": (0.006, 4.8e8, 2.0), "index_select_gather": (0.024, 4.8e8, 10.0),
                      "biformer_gather": (0.090, 4.8e8, 20.0), "dense_sdpa": (0.030, 1.92e9, 4.0)},
    (64, "fwd"): {"fused_cpu": (0.008, 6.4e8, 2.0), "index_select_gather": (0.020, 6.4e8, 24.0),
                  "biformer_gather": (0.100, 6.4e8, 50.0), "dense_sdpa": (0.160, 1.024e10, 6.0)},
    (64, "fwd+bwd"): {"fused_cpu": (0.032, 1.92e9, 8.0), "index_select_gather": (0.064, 1.92e9, 40.0),
                      "dense_sdpa": (0.480, 3.072e10, 12.0)},
}
FACTS = {"cpu_model": "Test CPU", "logical_cpus": 2, "physical_cores": 2, "threads": 2, "cores_used": 2,
         "cpu_isa": "avx512", "simd_lanes_fp32": 16, "fma_units": 2, "clock_ghz": 2.5, "clock_source": "test",
         "gpu": None, "torch": "2.x", "command": "pytest benchmarks/ --benchmark-only --benchmark-json=b.json"}


@pytest.fixture
def bench_json(tmp_path):
    benchmarks = [_op("cpu", "float32", g, p, impl, *vals)
                  for (g, p), impls in CPU_CASES.items() for impl, vals in impls.items()]
    gpu = {"gpu": "NVIDIA H100 80GB HBM3"}
    benchmarks += [_op("cuda", "bfloat16", 128, "fwd", "fused_triton", 0.01, 9.894e11, 100.0, **gpu),
                   _op("cuda", "bfloat16", 128, "fwd", "dense_sdpa", 0.02, 3.9576e12, 200.0, **gpu)]
    benchmarks += [
        _model("vit_tiny_patch16_224", "infer", 0.2, family="dense_vit"),
        _model("vit_bra_tiny_patch16_224", "infer", 0.16, family="vit_bra", dense_model="vit_tiny_patch16_224"),
        _model("dan_resnet18", "infer", 0.4, family="baseline"),
        _model("vit_tiny_patch16_224", "train", 0.8, family="dense_vit"),
        _model("vit_bra_tiny_patch16_224", "train", 0.5, family="vit_bra", dense_model="vit_tiny_patch16_224"),
        {"name": "test_something_else", "stats": {"median": 0.1}, "extra_info": {}},  # another suite: ignored
    ]
    data = {"machine_info": {"cpu": {"brand_raw": "Test CPU"}, "system": "Linux", "python_version": "3.11",
                             "dynattn": FACTS},
            "commit_info": {"id": "0123456789abcdef", "dirty": False}, "datetime": "2026-01-01T00:00:00",
            "benchmarks": benchmarks,
            "dynattn": {"skipped": {"cpu/float32/hires_64/fwd+bwd/biformer_gather": "needs 4 GiB",
                                    "cuda/bfloat16/hires_128/fwd/fused_cuda": "no CUDA device visible"},
                        "targets": [{"status": "PASS", "device": "cpu", "impl": "fused_cpu", "shape": "hires_64",
                                     "pass": "fwd", "check": "fused >= 30x faster than dense SDPA", "value": 20.0,
                                     "goal": ">= 30"}]}}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(data))
    return path


def _row(md: str, *start: str) -> list:
    """The cells of the first markdown table row whose leading cells are ``start``."""
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[:len(start)] == list(start):
            return cells
    raise AssertionError(f"no row starting with {start} in:\n{md}")


def _header(md: str, first: str) -> list:
    return _row(md, first)


def test_op_table_numbers(bench_json, tmp_path):
    bench = report.load(bench_json)
    assert len(bench.ops) == 17 and len(bench.models) == 5 and bench.ignored == 1
    md = report.op_table(bench, "cpu", "float32")
    header = _header(md, "shape")
    assert header == ["shape", "pass", "`fused_cpu`", "`index_select_gather`", "`biformer_gather`", "`dense_sdpa`"]
    row = dict(zip(header, _row(md, "`hires_32`", "fwd")))
    # 0.010 / 0.002 = 5x; 1.6e8 FLOPs / 2 ms = 80 GFLOP/s
    assert row["`fused_cpu`"] == "2.00 ms · 5.00x · 80.0 GF/s · 1.50 MiB"
    assert row["`index_select_gather`"] == "5.00 ms · 2.00x · 32.0 GF/s · 6.00 MiB"
    assert row["`biformer_gather`"] == "40.0 ms · 0.250x · 4.00 GF/s · 12.0 MiB"
    assert row["`dense_sdpa`"] == "10.0 ms · 1.00x · 64.0 GF/s · 3.00 MiB"
    row = dict(zip(header, _row(md, "`hires_64`", "fwd+bwd")))
    assert row["`fused_cpu`"] == "32.0 ms · 15.0x · 60.0 GF/s · 8.00 MiB"  # 0.480 / 0.032; 1.92e9 / 0.032
    assert row["`index_select_gather`"] == "64.0 ms · 7.50x · 30.0 GF/s · 40.0 MiB"
    assert row["`biformer_gather`"] == "skipped"
    assert row["`dense_sdpa`"] == "480 ms · 1.00x · 64.0 GF/s · 12.0 MiB"
    shapes = report.shapes_table(bench, "cpu", "float32")
    assert _row(shapes, "`hires_64`") == ["`hires_64`", "1", "64x64", "4 x 32", "8x8", "64", "4", "4096", "256"]


def test_model_table_numbers(bench_json):
    bench = report.load(bench_json)
    md = report.model_table(bench, "cpu")
    header = _header(md, "model")
    bra = dict(zip(header, _row(md, "`vit_bra_tiny`", "224", "infer")))
    assert (bra["ms/batch"], bra["images/s"], bra["x dense ViT"]) == ("160", "50.0", "1.25x")  # 8 / 0.16; 0.2 / 0.16
    dense = dict(zip(header, _row(md, "`vit_tiny`", "224", "infer")))
    assert (dense["images/s"], dense["x dense ViT"]) == ("40.0", "-")
    assert dict(zip(header, _row(md, "`vit_bra_tiny`", "224", "train")))["x dense ViT"] == "1.60x"  # 0.8 / 0.5
    assert dict(zip(header, _row(md, "`dan_resnet18`")))["images/s"] == "20.0"
    # rows: inference first, then training
    lines = [line for line in md.splitlines() if line.startswith("| `")]
    assert [line.split("|")[3].strip() for line in lines] == ["infer"] * 3 + ["train"] * 2


def test_roofline_in_report(bench_json):
    bench = report.load(bench_json)
    md = report.roofline_section(bench)
    # 2 cores x 16 lanes x 2 FMA units x 2 FLOPs x 2.5 GHz = 320 GFLOP/s
    assert "= **320.0 GFLOP/s**" in md
    header = _header(md, "shape")
    row = dict(zip(header, _row(md, "`hires_32`", "fwd", "`fused_cpu`")))
    assert (row["GFLOP/s"], row["% of peak"], row["dense % of peak"]) == ("80.0", "25.0%", "20.0%")  # 80, 64 / 320
    # H100 SXM dense bf16 peak 989.4 TFLOP/s; 9.894e11 FLOPs in 10 ms = 98.94 TFLOP/s = 10%
    row = dict(zip(header, _row(md.split("### cuda")[1], "`hires_128`", "fwd", "`fused_triton`")))
    assert (row["% of peak"], row["dense % of peak"]) == ("10.0%", "20.0%")
    # overrides: a 5 GHz clock doubles the peak, so the share halves
    md = report.roofline_section(bench, cpu_ghz=5.0, gpu_peak_tflops=494.7)
    assert "= **640.0 GFLOP/s**" in md
    assert dict(zip(header, _row(md, "`hires_32`", "fwd", "`fused_cpu`")))["% of peak"] == "12.5%"
    assert dict(zip(header, _row(md.split("### cuda")[1], "`hires_128`", "fwd", "`fused_triton`")))[
        "% of peak"] == "20.0%"


def test_render_writes_report_and_pngs(bench_json, tmp_path, capsys):
    out = tmp_path / "out"
    assert report.main([str(bench_json), "--out", str(out), "--title", "Test run"]) == 0
    printed = capsys.readouterr().out
    text = (out / "report.md").read_text()
    assert printed.strip() == text.strip()
    assert text.startswith("# Test run\n")
    assert "Command: `pytest benchmarks/ --benchmark-only --benchmark-json=b.json`" in text
    assert "Test CPU" in text and "`0123456789`" in text
    for name in ("cpu_float32_latency.png", "cpu_float32_speedup.png", "cpu_models.png"):
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000, name
        assert f"]({name})" in text
    # the GPU data has a single grid size: no sweep plot for it, no model plot either
    assert not (out / "cuda_bfloat16_latency.png").exists() and not (out / "cuda_models.png").exists()
    assert "| 1 | needs 4 GiB | `cpu/float32/hires_64/fwd+bwd/biformer_gather` |" in text
    assert "| PASS | cpu | `fused_cpu` | `hires_64` | fwd |" in text
    # the sweep groups both grid sizes of the CPU series
    sweeps = report.sweeps(report.load(bench_json))
    assert list(sweeps) == [("cpu", "float32", "B1 4hx32, 8x8-token regions")]
    assert sorted({c.info["tokens"] for c in sweeps[list(sweeps)[0]]}) == [1024, 4096]


def test_readme_block(bench_json, tmp_path):
    readme = tmp_path / "README.md"
    before, after = "# proj\n\n## Performance\n\n", "\n\n## Layout\n\nkept\n"
    readme.write_text(before + report.README_START + "\nold table\n" + report.README_END + after)
    out = tmp_path / "docs" / "bench"
    report.main([str(bench_json), "--out", str(out), "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith(before + report.README_START) and text.endswith(report.README_END + after)
    assert "old table" not in text
    assert "| `hires_32` | fwd | 2.00 ms · 5.00x · 80.0 GF/s · 1.50 MiB |" in text
    assert "![cpu_float32_latency](docs/bench/cpu_float32_latency.png)" in text
    assert "![cpu_models](docs/bench/cpu_models.png)" in text
    assert "[docs/bench/report.md](docs/bench/report.md)" in text
    # roofline summary: fused 25.0% (hires_32 fwd, 80 GF/s) down to 18.75% (hires_64 fwd+bwd, 60 GF/s) of 320
    assert "Fused cases reach 18.8-25.0% of it (dense SDPA: 20.0-20.0%)" in text
    # a second run replaces the block again instead of adding one
    report.main([str(bench_json), "--out", str(out), "--readme", str(readme), "--no-plots"])
    assert readme.read_text().count(report.README_START) == 1
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit):
        report.main([str(bench_json), "--out", str(out), "--readme", str(readme), "--no-plots"])
    with pytest.raises(ValueError, match="dynattn-bench:start"):
        report.update_readme(readme, "x")


def test_png_dimensions(bench_json, tmp_path):
    image = pytest.importorskip("matplotlib.image")
    paths = report.plot_scaling(report.load(bench_json), tmp_path)
    assert sorted(p.name for p in paths) == ["cpu_float32_latency.png", "cpu_float32_speedup.png"]
    h, w = image.imread(paths[0]).shape[:2]
    assert (w, h) == (1210, 484)  # figsize (11, 4.4) at 110 dpi


def test_cli_subprocess(bench_json, tmp_path):
    out = tmp_path / "cli"
    res = subprocess.run([sys.executable, "-m", "dynattn.bench.report", str(bench_json), "--out", str(out),
                          "--no-plots"], capture_output=True, text=True, cwd=tmp_path, env=dict(os.environ))
    assert res.returncode == 0, res.stderr
    assert "| `hires_32` | fwd | 2.00 ms · 5.00x · 80.0 GF/s · 1.50 MiB |" in res.stdout
    assert (out / "report.md").is_file() and not list(out.glob("*.png"))


def test_default_out_dir(bench_json):
    report.main([str(bench_json), "--no-plots"])
    assert (bench_json.parent / "bench_report" / "report.md").is_file()


def test_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        report.load(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"results": []}))
    with pytest.raises(ValueError, match="'benchmarks' list"):
        report.load(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        report.load(bad)
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "missing.json")])
    with pytest.raises(SystemExit):
        report.main([str(bad), "--cpu-ghz", "-1"])


def test_empty_results(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text(json.dumps({"benchmarks": [{"name": "x", "stats": {"median": 0.1}, "extra_info": {}}]}))
    text = report.render(report.load(path), out_dir=tmp_path / "o", plots=False)
    assert "No dynattn op or model results" in text and "1 other benchmarks ignored" in text
    with pytest.raises(ValueError, match="no op results for device='cpu'"):
        report.op_table(report.load(path), "cpu", "float32")


# ---------------------------------------------------------------------------------------------- roofline


def test_cpu_peak_arithmetic():
    assert roofline.cpu_peak_gflops(cores=2, simd_lanes=16, fma_units=2, clock_ghz=2.6) == pytest.approx(332.8)
    assert roofline.cpu_peak_gflops(cores=8, simd_lanes=8, fma_units=2, clock_ghz=3.0) == pytest.approx(768.0)
    assert roofline.percent_of_peak(83.2, 332.8) == pytest.approx(25.0)
    assert roofline.SIMD_LANES_FP32 == {"avx512": 16, "avx2": 8, "scalar": 1}
    with pytest.raises(ValueError, match="clock_ghz must be a positive number"):
        roofline.cpu_peak_gflops(cores=2, simd_lanes=16, fma_units=2, clock_ghz=0)
    with pytest.raises(ValueError, match="cores"):
        roofline.cpu_peak_gflops(cores=True, simd_lanes=16, fma_units=2, clock_ghz=1.0)
    with pytest.raises(ValueError, match="peak_gflops"):
        roofline.percent_of_peak(1.0, 0.0)


def test_gpu_peak_table():
    assert roofline.gpu_peak_tflops("NVIDIA H100 80GB HBM3") == (989.4, "H100 SXM")
    assert roofline.gpu_peak_tflops("NVIDIA H100 PCIe")[0] == 756.0
    assert roofline.gpu_peak_tflops("NVIDIA H100 NVL")[0] == 835.0
    assert roofline.gpu_peak_tflops("NVIDIA H200")[0] == 989.4
    assert roofline.gpu_peak_tflops("NVIDIA A100-SXM4-80GB")[0] == 312.0
    assert roofline.gpu_peak_tflops("NVIDIA GeForce GTX 1080") is None
    with pytest.raises(TypeError, match="name must be a str"):
        roofline.gpu_peak_tflops(None)


CPUINFO = """processor\t: 0
model name\t: Test CPU @ 2.00GHz
physical id\t: 0
core id\t\t: 0
cpu MHz\t\t: 2000.000

processor\t: 1
physical id\t: 0
core id\t\t: 0
cpu MHz\t\t: 3100.500

processor\t: 2
physical id\t: 0
core id\t\t: 1
cpu MHz\t\t: 2900.000

processor\t: 3
physical id\t: 0
core id\t\t: 1
cpu MHz\t\t: 1200.000
"""


def test_clock_and_cores_from_cpuinfo():
    assert roofline.cpu_clock_ghz(cpuinfo_text=CPUINFO, max_freq_khz="", env={}) == (3.1005, "/proc/cpuinfo cpu MHz")
    assert roofline.cpu_clock_ghz(cpuinfo_text=CPUINFO, max_freq_khz="3500000\n", env={}) == (
        3.5, "cpufreq cpuinfo_max_freq")
    assert roofline.cpu_clock_ghz(cpuinfo_text=CPUINFO, max_freq_khz="3500000", env={"DYNATTN_CPU_GHZ": "1.9"}) == (
        1.9, "$DYNATTN_CPU_GHZ")
    ghz, why = roofline.cpu_clock_ghz(cpuinfo_text="", max_freq_khz="", env={})
    assert ghz is None and "DYNATTN_CPU_GHZ" in why
    with pytest.raises(ValueError, match="DYNATTN_CPU_GHZ='fast'"):
        roofline.cpu_clock_ghz(env={"DYNATTN_CPU_GHZ": "fast"})
    # 4 logical CPUs on 2 cores (SMT); CPUs 0 and 1 share core 0
    assert roofline.physical_cores([0, 1, 2, 3], CPUINFO) == 2
    assert roofline.physical_cores([0, 1], CPUINFO) == 1
    assert roofline.physical_cores([0, 2], CPUINFO) == 2
    assert roofline.physical_cores([0, 1, 2], "") == 3  # nothing known: one core per CPU


def test_machine_facts_here():
    facts = roofline.machine_facts(threads=1)
    json.dumps(facts)  # stored in the benchmark JSON
    assert facts["threads"] == 1 and facts["cores_used"] == 1
    assert facts["logical_cpus"] >= 1 and 1 <= facts["physical_cores"] <= facts["logical_cpus"]
    if facts["cpu_isa"] is not None and facts["clock_ghz"] is not None:
        expected = 1 * roofline.SIMD_LANES_FP32[facts["cpu_isa"]] * facts["fma_units"] * 2 * facts["clock_ghz"]
        assert facts["cpu_peak_gflops_fp32"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="threads must be a positive int"):
        roofline.machine_facts(threads=0)
