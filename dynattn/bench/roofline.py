"""Roofline estimates: the machine's peak FLOP/s and the share of it a benchmark case achieves.

CPU, float32::

    peak = cores used x SIMD lanes x FMA units per core x 2 FLOPs per FMA x clock

* cores used: ``min(threads, physical cores the process may run on)`` (hyper-threads share a core's FMA units);
* SIMD lanes: float32 lanes of the ISA dynattn's CPU kernels dispatch to (``dynattn.backends.cpu.isa()``):
  16 for AVX-512, 8 for AVX2, 1 for the portable scalar path;
* FMA units: 2 (server cores with AVX-512 and AVX2 cores since Haswell issue two vector FMAs per cycle);
  ``$DYNATTN_CPU_FMA_UNITS`` overrides it when the part has one (some AVX-512 SKUs do);
* clock: the highest of ``cpuinfo_max_freq`` (cpufreq), else the highest ``cpu MHz`` in ``/proc/cpuinfo``;
  ``$DYNATTN_CPU_GHZ`` overrides it. Heavy AVX-512 code may run below that clock, so the estimate is an upper
  bound.

GPU: the dense (no structured sparsity) bf16/fp16 tensor-core peak of the device, looked up by name in
:data:`GPU_PEAK_TFLOPS` (H100, H200, A100); ``None`` for other devices.

:func:`machine_facts` gathers all of it at benchmark time (``benchmarks/conftest.py`` stores it in the JSON's
``machine_info["dynattn"]``), so a report made elsewhere uses the benchmarked machine's numbers.
"""

from __future__ import annotations

import os
import platform
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

__all__ = [
    "DEFAULT_FMA_UNITS",
    "GPU_PEAK_TFLOPS",
    "SIMD_LANES_FP32",
    "cpu_clock_ghz",
    "cpu_peak_gflops",
    "gpu_peak_tflops",
    "machine_facts",
    "parse_cpuinfo",
    "percent_of_peak",
    "physical_cores",
]

#: float32 lanes of one vector register, per ISA name of ``dynattn.backends.cpu.isa()``
SIMD_LANES_FP32: Dict[str, int] = {"avx512": 16, "avx2": 8, "scalar": 1}
#: vector FMA units per core assumed unless ``$DYNATTN_CPU_FMA_UNITS`` says otherwise
DEFAULT_FMA_UNITS = 2
CLOCK_ENV = "DYNATTN_CPU_GHZ"
FMA_ENV = "DYNATTN_CPU_FMA_UNITS"

#: (lower-case substrings that must all occur in ``torch.cuda.get_device_name()``, dense bf16/fp16 tensor-core
#: TFLOP/s, what it is); the first match wins, so more specific names come first. NVIDIA datasheet figures
#: without sparsity (the datasheets print the sparse figure, twice these).
GPU_PEAK_TFLOPS: Tuple[Tuple[Tuple[str, ...], float, str], ...] = (
    (("h100", "pcie"), 756.0, "H100 PCIe"),
    (("h100", "nvl"), 835.0, "H100 NVL"),
    (("h100",), 989.4, "H100 SXM"),
    (("h200", "nvl"), 835.0, "H200 NVL"),
    (("h200",), 989.4, "H200 SXM / GH200"),
    (("a100",), 312.0, "A100"),
)


def cpu_peak_gflops(*, cores: int, simd_lanes: int, fma_units: int, clock_ghz: float) -> float:
    """Peak GFLOP/s: ``cores * simd_lanes * fma_units * 2 * clock_ghz`` (an FMA is 2 FLOPs)."""
    for name, value in (("cores", cores), ("simd_lanes", simd_lanes), ("fma_units", fma_units),
                        ("clock_ghz", clock_ghz)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    return float(cores * simd_lanes * fma_units * 2 * clock_ghz)


def percent_of_peak(gflops: float, peak_gflops: float) -> float:
    """``100 * gflops / peak_gflops``."""
    if not peak_gflops > 0:
        raise ValueError(f"peak_gflops must be positive, got {peak_gflops!r}")
    return 100.0 * gflops / peak_gflops


def gpu_peak_tflops(name: str) -> Optional[Tuple[float, str]]:
    """``(dense bf16/fp16 tensor-core TFLOP/s, matched family)`` for a CUDA device name, or None if unknown.

    >>> gpu_peak_tflops("NVIDIA H100 80GB HBM3")
    (989.4, 'H100 SXM')
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str (a CUDA device name), got {type(name).__name__}")
    low = name.lower()
    for needles, tflops, family in GPU_PEAK_TFLOPS:
        if all(n in low for n in needles):
            return tflops, family
    return None


# ---------------------------------------------------------------------------------------------- CPU facts


def parse_cpuinfo(text: str) -> list:
    """``/proc/cpuinfo`` text -> one dict per processor block (keys as written, values stripped)."""
    blocks, cur = [], {}
    for line in text.splitlines():
        if not line.strip():
            if cur:
                blocks.append(cur)
                cur = {}
            continue
        key, sep, value = line.partition(":")
        if sep:
            cur[key.strip()] = value.strip()
    if cur:
        blocks.append(cur)
    return blocks


def cpu_clock_ghz(*, cpuinfo_text: Optional[str] = None, max_freq_khz: Optional[str] = None,
                  env: Optional[Mapping[str, str]] = None) -> Tuple[Optional[float], str]:
    """``(GHz, where it came from)``: ``$DYNATTN_CPU_GHZ``, else cpufreq's ``cpuinfo_max_freq`` (kHz), else the
    highest ``cpu MHz`` of ``/proc/cpuinfo``; ``(None, reason)`` if none is known.

    ``cpuinfo_text`` / ``max_freq_khz`` / ``env`` default to this machine's files and ``os.environ``.
    """
    env = os.environ if env is None else env
    if env.get(CLOCK_ENV):
        try:
            ghz = float(env[CLOCK_ENV])
        except ValueError:
            raise ValueError(f"{CLOCK_ENV}={env[CLOCK_ENV]!r} is not a number of GHz") from None
        if not ghz > 0:
            raise ValueError(f"{CLOCK_ENV} must be positive, got {ghz}")
        return ghz, f"${CLOCK_ENV}"
    if max_freq_khz is None:
        max_freq_khz = _read("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    if max_freq_khz and max_freq_khz.strip().isdigit() and int(max_freq_khz) > 0:
        return int(max_freq_khz) / 1e6, "cpufreq cpuinfo_max_freq"
    if cpuinfo_text is None:
        cpuinfo_text = _read("/proc/cpuinfo") or ""
    mhz = []
    for block in parse_cpuinfo(cpuinfo_text):
        try:
            mhz.append(float(block.get("cpu MHz", "")))
        except ValueError:
            pass
    if mhz and max(mhz) > 0:
        return max(mhz) / 1e3, "/proc/cpuinfo cpu MHz"
    return None, f"unknown (no cpufreq, no 'cpu MHz' in /proc/cpuinfo; set ${CLOCK_ENV})"


def physical_cores(cpus: Sequence[int], cpuinfo_text: str) -> int:
    """How many distinct physical cores the logical CPUs ``cpus`` sit on, from ``/proc/cpuinfo`` text
    (``physical id`` / ``core id`` per ``processor``); ``len(cpus)`` when the text does not say."""
    want, cores = set(cpus), set()
    for block in parse_cpuinfo(cpuinfo_text):
        try:
            proc = int(block["processor"])
        except (KeyError, ValueError):
            continue
        if proc in want:
            if "core id" not in block:
                return len(want)
            cores.add((block.get("physical id", "0"), block["core id"]))
    return len(cores) if cores else len(want)


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _cpu_isa() -> Tuple[Optional[str], str]:
    try:
        from dynattn.backends import cpu

        return cpu.isa(), "dynattn.backends.cpu.isa()"
    except Exception as e:  # not built: no kernels to estimate a peak for
        return None, f"unknown ({type(e).__name__}: {e})"


def _gpu_facts() -> Optional[Dict[str, Any]]:
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name()
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
    except Exception:
        return None
    peak = gpu_peak_tflops(name)
    return {"name": name, "sm_count": props.multi_processor_count,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "peak_tflops_bf16": peak[0] if peak else None,
            "peak_source": f"dense tensor-core bf16/fp16 peak of the {peak[1]}" if peak else
            "device not in dynattn.bench.roofline.GPU_PEAK_TFLOPS"}


def machine_facts(*, threads: int) -> Dict[str, Any]:
    """What the roofline needs, JSON-serialisable; never raises (an unknown fact is None with a reason).

    Keys: ``cpu_model``, ``logical_cpus`` (usable by this process), ``physical_cores``, ``threads``,
    ``cores_used``, ``cpu_isa`` (+ ``cpu_isa_source``), ``simd_lanes_fp32``, ``fma_units`` (+ ``_source``),
    ``clock_ghz`` (+ ``clock_source``), ``cpu_peak_gflops_fp32`` (None if a factor is unknown), ``gpu``
    (None, or ``name``, ``sm_count``, ``memory_gib``, ``peak_tflops_bf16``, ``peak_source``), ``platform``.
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    cpuinfo = _read("/proc/cpuinfo") or ""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = list(range(os.cpu_count() or 1))
    phys = physical_cores(cpus, cpuinfo)
    isa, isa_source = _cpu_isa()
    lanes = SIMD_LANES_FP32.get(isa) if isa else None
    fma_units, fma_source = DEFAULT_FMA_UNITS, "default (2 vector FMA units per core)"
    if os.environ.get(FMA_ENV):
        try:
            fma_units, fma_source = int(os.environ[FMA_ENV]), f"${FMA_ENV}"
        except ValueError:
            fma_units, fma_source = DEFAULT_FMA_UNITS, f"default (${FMA_ENV}={os.environ[FMA_ENV]!r} ignored)"
    try:
        ghz, clock_source = cpu_clock_ghz(cpuinfo_text=cpuinfo)
    except ValueError as e:
        ghz, clock_source = None, f"unknown ({e})"
    cores_used = min(threads, phys)
    peak = None
    if lanes and ghz and fma_units > 0:
        peak = cpu_peak_gflops(cores=cores_used, simd_lanes=lanes, fma_units=fma_units, clock_ghz=ghz)
    blocks = parse_cpuinfo(cpuinfo)
    return {
        "cpu_model": blocks[0].get("model name") if blocks else platform.processor() or None,
        "logical_cpus": len(cpus),
        "physical_cores": phys,
        "threads": threads,
        "cores_used": cores_used,
        "cpu_isa": isa,
        "cpu_isa_source": isa_source,
        "simd_lanes_fp32": lanes,
        "fma_units": fma_units,
        "fma_units_source": fma_source,
        "clock_ghz": ghz,
        "clock_source": clock_source,
        "cpu_peak_gflops_fp32": peak,
        "gpu": _gpu_facts(),
        "platform": platform.platform(),
    }
