"""Importing the pack is cheap: no model is built, no weights read, no heavy library pulled in."""
import json
import subprocess
import sys

from conftest import ROOT

_PROBE = r"""
import builtins, importlib.util, io, json, sys
import torch
built, opened, tensors = [], [], []
module_init = torch.nn.Module.__init__
def counting_init(self, *args, **kwargs):
    built.append(type(self).__name__)
    module_init(self, *args, **kwargs)
torch.nn.Module.__init__ = counting_init
real_open = builtins.open
def watching_open(file, *args, **kwargs):
    opened.append(str(file))
    return real_open(file, *args, **kwargs)
builtins.open = io.open = watching_open
for name in ("empty", "zeros", "ones", "randn", "rand", "full", "tensor"):  # tensor factories
    real = getattr(torch, name)
    def counting(*args, _real=real, _name=name, **kwargs):
        tensors.append(_name)
        return _real(*args, **kwargs)
    setattr(torch, name, counting)
import easyanimate
spec = importlib.util.spec_from_file_location("easyanimate_pack", r"{root}/__init__.py",
                                              submodule_search_locations=[r"{root}"])
pack = importlib.util.module_from_spec(spec)
sys.modules["easyanimate_pack"] = pack
spec.loader.exec_module(pack)
heavy = [m for m in ("transformers", "safetensors", "easyanimate.models.transformer", "easyanimate.loading",
                     "comfy", "diffusers") if m in sys.modules]
weights = [f for f in opened if f.endswith((".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".gguf"))]
print(json.dumps({{"heavy": heavy, "modules_built": built, "weight_files_opened": weights, "tensors_made": tensors,
                  "nodes": sorted(pack.NODE_CLASS_MAPPINGS)}}))
"""


def probe():
    out = subprocess.run([sys.executable, "-c", _PROBE.format(root=ROOT)], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_is_cheap_and_lazy():
    """Importing the pack builds no module, makes no tensor, opens no weight file and pulls in no heavy
    library (its time is measured by benchmarks/import_time.py)."""
    result = probe()
    assert result["heavy"] == [], f"importing the pack pulled in {result['heavy']}"
    assert result["modules_built"] == [], f"importing the pack built {result['modules_built'][:5]}"
    assert result["tensors_made"] == [], f"importing the pack made tensors ({result['tensors_made'][:5]})"
    assert result["weight_files_opened"] == [], f"importing the pack read {result['weight_files_opened'][:3]}"
    assert "EasyAnimateSampler" in result["nodes"] and "LoadEasyAnimate" in result["nodes"]


def test_lazy_names_resolve():
    import easyanimate

    assert easyanimate.load_transformer.__name__ == "load_transformer"
