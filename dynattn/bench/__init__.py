"""Benchmark reporting: turn pytest-benchmark JSON from ``benchmarks/`` into tables, plots and a roofline note.

* :mod:`dynattn.bench.report` -- ``python -m dynattn.bench.report BENCH.json [--out DIR]``: markdown tables
  (op level: one row per shape and pass, one column per implementation; model level: images/s), PNG plots
  (latency and speed-up over dense vs tokens; model images/s) and the roofline note.
* :mod:`dynattn.bench.roofline` -- the machine's peak FLOP/s estimate (CPU: cores x SIMD lanes x FMA units x
  2 x clock; GPU: dense tensor-core peak by device name) and the facts it needs, recorded at benchmark time.

The report reads only the JSON (the machine facts are recorded in it at benchmark time), so it can be made on
any machine, not just the one that ran the benchmarks.
"""

__all__ = ["report", "roofline"]
