"""Benchmarks: `python -m benchmarks run [NAME ...]` measures, `python -m benchmarks report`
regenerates BENCHMARKS.md from benchmarks/results/*.json. Every comparison is a ratio measured
A/B, interleaved, in the same run."""
