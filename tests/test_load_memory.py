"""Loading holds one copy of the weights at most (smoke run of benchmarks/load_memory.py)."""
import importlib.util

from conftest import ROOT


def test_loading_peak_memory_is_one_copy_of_the_weights():
    spec = importlib.util.spec_from_file_location("load_memory", ROOT / "benchmarks" / "load_memory.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.run(smoke=True, repeats=1)
    bench.print_table(rows)
    for row in rows:
        if row["method"] == "ours":
            assert row["peak_mb"] <= 1.15 * row["model_mb"] + 8, row
