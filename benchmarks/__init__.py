"""Benchmarks: throughput ratios against same-run baselines (docs/BENCHMARKS.md). Run by path."""
