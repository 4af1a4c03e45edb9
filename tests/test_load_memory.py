"""Smoke run of benchmarks/load_memory.py: every loader and dtype loads the checkpoint in a fresh process.

The memory target (our loader holds one copy of the weights at most) is a measurement on a shared machine:
the benchmark prints it with PASS/MISS; this test checks that the benchmark works and what it measures.
"""
import importlib.util

import pytest

from conftest import ROOT


def test_load_memory_benchmark_smoke():
    spec = importlib.util.spec_from_file_location("load_memory", ROOT / "benchmarks" / "load_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.run(smoke=True, repeats=1)
    bench.print_table(rows)
    assert [(r["method"], r["dtype"]) for r in rows] == [("ours", "fp32"), ("naive", "fp32"), ("ours", "bf16"),
                                                         ("naive", "bf16")]
    weights = {(r["method"], r["dtype"]): r["model_mb"] for r in rows}
    # Both loaders build the same model: the same weight bytes per dtype, bf16 half of fp32, and the fp32
    # weights are the checkpoint's tensors (the file adds only its header).
    assert weights["ours", "fp32"] == weights["naive", "fp32"] and weights["ours", "bf16"] == weights["naive", "bf16"]
    assert weights["ours", "bf16"] == pytest.approx(weights["ours", "fp32"] / 2, rel=1e-6)
    assert 0 < rows[0]["file_mb"] - weights["ours", "fp32"] < 0.5
    for row in rows:
        assert row["seconds"] > 0 and row["peak_mb"] >= 0 and row["peak_rss_mb"] >= 0, row
