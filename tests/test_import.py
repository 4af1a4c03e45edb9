"""Importing the pack is cheap: no model is built, no weights read, no heavy library pulled in."""
import json
import subprocess
import sys

from conftest import ROOT

_PROBE = r"""
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
heavy = [m for m in ("transformers", "safetensors", "easyanimate.models.transformer", "easyanimate.loading",
                     "comfy", "diffusers") if m in sys.modules]
print(json.dumps({{"torch": t1 - t0, "pack": t2 - t1, "heavy": heavy,
                  "nodes": sorted(pack.NODE_CLASS_MAPPINGS)}}))
"""


def probe():
    out = subprocess.run([sys.executable, "-c", _PROBE.format(root=ROOT)], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_is_cheap_and_lazy():
    result = min((probe() for _ in range(3)), key=lambda r: r["pack"])
    print(f"import torch {result['torch']:.3f} s; easyanimate + pack on top {result['pack'] * 1000:.1f} ms")
    assert result["heavy"] == [], f"importing the pack pulled in {result['heavy']}"
    assert result["pack"] < 0.5


def test_lazy_names_resolve():
    import easyanimate

    assert easyanimate.load_transformer.__name__ == "load_transformer"
