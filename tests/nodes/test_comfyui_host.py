"""ComfyUI's host in a real ComfyUI: chosen inside ComfyUI, an error (not a fallback) when one of ComfyUI's
modules is broken, and generation on ComfyUI's lowvram path (every layer's weights cast per call from the
offload device) equal to a full load, with and without a LoRA patch, inputs on the host's compute device.

Runs in ComfyUI's interpreter when `COMFYUI_DIR` is set (`COMFYUI_PYTHON`, default the current one);
skipped with the reason otherwise. This CPU machine has no GPU, so the CPU stands in for one: ComfyUI treats
a CPU load device as "no offloading", and the test tells it otherwise (`is_device_cpu` answers False) so
that `load_models_gpu` takes the same lowvram route it takes on a GPU with too little memory.
"""
import pytest

from comfyui_script import COMFYUI_DIR, run_comfyui_script
from conftest import ROOT

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set: no ComfyUI to run the host in")

SCRIPT = r"""
import importlib.util, sys
from pathlib import Path
comfy_dir, root, work = sys.argv[1], sys.argv[2], Path(sys.argv[3])
sys.path.insert(0, comfy_dir)
sys.path.insert(0, root + "/tests")
sys.path.insert(1, root)  # the tests' helpers import the core as `easyanimate`
import comfy.cli_args
comfy.cli_args.args.cpu = True
import torch
import comfy.model_management as mm
import folder_paths
from safetensors.torch import load_file, save_file
from release import make_release

models = work / "models"
release = make_release(models / "easyanimate" / "EasyAnimateV3-tiny", "v3")
state = load_file(str(release / "transformer" / "diffusion_pytorch_model.safetensors"))
g = torch.Generator().manual_seed(1)
lora = {}
for key, weight in state.items():
    if key.endswith((".attn1.to_q.weight", ".ff.net.2.weight")):
        stem = "lora_unet__" + key[: -len(".weight")].replace(".", "_")
        lora[stem + ".lora_down.weight"] = torch.randn(2, weight.shape[1], generator=g) * 0.3
        lora[stem + ".lora_up.weight"] = torch.randn(weight.shape[0], 2, generator=g) * 0.3
(models / "loras").mkdir()
save_file(lora, str(models / "loras" / "style.safetensors"))
folder_paths.add_model_folder_path("easyanimate", str(models / "easyanimate"))
folder_paths.add_model_folder_path("loras", str(models / "loras"))

spec = importlib.util.spec_from_file_location("easyanimate_pack", root + "/__init__.py", submodule_search_locations=[root])
pack = importlib.util.module_from_spec(spec); sys.modules["easyanimate_pack"] = pack; spec.loader.exec_module(pack)
host = pack.nodes.host.current_host()
assert type(host).__name__ == "ComfyHost", type(host)
N = pack.nodes.NODE_CLASS_MAPPINGS

model, vae, t5 = N["LoadEasyAnimate"]().load("EasyAnimateV3-tiny", "fp32")
adapted, _ = N["EasyAnimateLoRALoader"]().apply(model, "style.safetensors", 0.8, 0.0, t5=t5)
embeds = N["EasyAnimateT5Encode"]().encode("a red circle moving right", "blurry", True, t5=t5)[0]
module = model.transformer.module
before = {k: v.clone() for k, v in module.state_dict().items()}
devices = []
module.register_forward_pre_hook(lambda m, args: devices.append(args[0].device))

def sample(m):
    return N["EasyAnimateSampler"]().sample(m, embeds, vae, 32, 32, 8, 3, 2, 6.0, "Euler", 1.0)[0]["samples"]

full, full_lora = sample(model), sample(adapted)
assert not torch.equal(full, full_lora)

mm.unload_all_models()
mm.vram_state = mm.VRAMState.NO_VRAM  # ComfyUI's lowest setting: no layer stays loaded, each is cast per call
mm.is_device_cpu = lambda device: False  # the CPU stands in for a GPU
low, low_lora = sample(model), sample(adapted)
# The patcher holds the native-route model around the transformer (nodes/native.py), or the transformer itself.
loaded = [p for p in mm.current_loaded_models if getattr(p.model.model, "diffusion_model", p.model.model) is module]
assert loaded and loaded[0].model.model.model_lowvram, "the transformer was not loaded on the lowvram path"
streamed = [m for m in module.modules() if getattr(m, "comfy_cast_weights", False)]
assert len(streamed) > 10, len(streamed)
print("lowvram: %d layers cast per call" % len(streamed))
for name, a, b in (("plain", low, full), ("LoRA", low_lora, full_lora)):
    err = ((a - b).abs().max() / b.abs().max()).item()
    print(name, "lowvram vs full load rel", err)
    assert err <= 1e-6, (name, err)
assert set(devices) == {mm.get_torch_device()}, devices
mm.unload_all_models()
assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items()), "weights changed"

sys.modules["comfy.ops"] = None  # a ComfyUI whose module cannot be imported any more
try:
    pack.nodes.host.select_host()
except pack.easyanimate.host.HostError as err:
    assert "comfy.ops" in str(err), err
else:
    raise AssertionError("a broken comfy import fell back to the standalone host")
print("ok")
"""


def test_comfyui_host_partial_loading_and_broken_import(tmp_path):
    print(run_comfyui_script(tmp_path, "host_check.py", SCRIPT, ROOT, tmp_path))
