"""Time of importing the node pack (easyanimate + the ComfyUI entry point) on top of torch.

Each import runs in a fresh process; the table shows the fastest of --repeats runs (the least disturbed by
other work on the machine) and the median. What the import must not do (build modules, make tensors, read
weights, pull in transformers / safetensors) is tested in tests/test_import.py.

    python benchmarks/import_time.py              # 5 fresh processes
    python benchmarks/import_time.py --repeats 10

Target: the pack on top of torch in under 0.5 s (fastest run).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 0.5

_CHILD = r"""
import importlib.util, json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import easyanimate
spec = importlib.util.spec_from_file_location("easyanimate_pack", r"{root}/__init__.py",
                                              submodule_search_locations=[r"{root}"])
pack = importlib.util.module_from_spec(spec)
sys.modules["easyanimate_pack"] = pack
spec.loader.exec_module(pack)
t2 = time.perf_counter()
print(json.dumps({{"torch": t1 - t0, "pack": t2 - t1}}))
"""


def measure() -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD.format(root=ROOT)], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    runs = [measure() for _ in range(max(1, args.repeats))]
    best = min(r["pack"] for r in runs)
    print(f"import time, {len(runs)} fresh processes")
    print("| what | fastest s | median s | target | result |")
    print("|---|---:|---:|---|---|")
    print(f"| torch | {min(r['torch'] for r in runs):.3f} | {statistics.median(r['torch'] for r in runs):.3f} | - | - |")
    print(f"| easyanimate + pack on top | {best:.3f} | {statistics.median(r['pack'] for r in runs):.3f} | "
          f"< {TARGET_S} s | {'PASS' if best < TARGET_S else 'MISS'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
