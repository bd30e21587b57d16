"""Benchmark suite: speed, memory and sample efficiency of AlignProp, measured as ratios in one run.

`python -m bench run --out bench/results` writes `RESULTS.md`, `results.json` and PNG plots. Every number
in them comes from a measurement of that run; nothing is hard-coded. See `bench.cli` for the options.
"""
