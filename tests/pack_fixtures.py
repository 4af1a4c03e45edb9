"""Fixtures for node tests (import them into a test module): the pack imported as ComfyUI imports it, and a
models folder with tiny weights."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from release import make_release

ROOT = Path(__file__).resolve().parent.parent
PACK = "easyanimate_pack"


@pytest.fixture(scope="session")
def pack():
    """The pack's root package, imported by path under another name (as ComfyUI does)."""
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = module
        spec.loader.exec_module(module)
    return sys.modules[PACK]


def write_lora(path, transformer_state: dict, seed: int, layers=("attn1.to_q", "attn2.to_v", "ff.net.2")):
    """An EasyAnimate-format (kohya, double underscore) LoRA of rank 2 on a few layers of every block."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, weight in transformer_state.items():
        if key.endswith(".weight") and weight.ndim == 2 and any(f".{layer}.weight" in f".{key}" for layer in layers):
            stem = "lora_unet__" + key[: -len(".weight")].replace(".", "_")
            tensors[f"{stem}.lora_down.weight"] = torch.randn(2, weight.shape[1], generator=g) * 0.3
            tensors[f"{stem}.lora_up.weight"] = torch.randn(weight.shape[0], 2, generator=g) * 0.3
            tensors[f"{stem}.alpha"] = torch.tensor(1.0)
    save_file(tensors, str(path))


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    release = make_release(root / "easyanimate" / "EasyAnimateV3-tiny", "v3")
    make_release(root / "easyanimate" / "EasyAnimateV2-tiny", "v2")
    from safetensors.torch import load_file

    state = load_file(str(release / "transformer" / "diffusion_pytorch_model.safetensors"))
    (root / "loras").mkdir()
    write_lora(root / "loras" / "style_a.safetensors", state, seed=1)
    write_lora(root / "loras" / "style_b.safetensors", state, seed=2)
    return root


@pytest.fixture()
def standalone(models_dir, monkeypatch, pack):
    monkeypatch.setenv("EASYANIMATE_MODELS_DIR", str(models_dir))
    return pack
