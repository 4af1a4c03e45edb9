"""The host is chosen once and only ComfyUI's when ComfyUI is there; inputs go to the host's compute device;
model names never leave the model folders."""
import sys
import types

import pytest
import torch

from easyanimate.errors import EasyAnimateError
from easyanimate.host import Placement, StandaloneHost, fixed_device, safe_relative_name


def test_outside_comfyui_the_standalone_host_is_chosen_and_kept(standalone):
    host = standalone.nodes.host
    assert not host.inside_comfyui()
    chosen = host.current_host()
    assert isinstance(chosen, standalone.easyanimate.host.StandaloneHost) and host.current_host() is chosen


@pytest.mark.parametrize("broken", ["comfy.model_management", "comfy.ops", "folder_paths"])
def test_inside_comfyui_a_failing_comfy_import_is_an_error_not_a_fallback(standalone, monkeypatch, broken):
    """ComfyUI imports `comfy` before it loads custom nodes; if one of its modules cannot be imported then,
    the pack must say so instead of running models outside ComfyUI's memory management."""
    host = standalone.nodes.host
    for name in ("comfy", "comfy.model_management", "comfy.model_patcher", "comfy.ops", "comfy.utils", "comfy.lora",
                 "comfy.patcher_extension", "folder_paths"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, broken, None)  # `import` of a None entry raises ImportError
    assert host.inside_comfyui()
    with pytest.raises(standalone.easyanimate.host.HostError, match=broken.replace(".", r"\.")) as info:
        host.select_host()
    assert "does not fall back" in str(info.value)


def test_the_pipeline_sends_inputs_to_the_hosts_device_not_to_where_the_weights_are():
    """Under partial loading the first weight can be anywhere; the latents and every model input must go
    to the host's compute device. Here the weights stay on the CPU and the host says "meta": every call
    of the transformer receives meta tensors."""
    from easyanimate.pipeline import Conditioning, generate
    from easyanimate.vae import build_vae
    from tiny import random_model

    model = random_model("v3", num_layers=2)
    torch.manual_seed(0)
    vae = build_vae("v3", {"ch": 8, "ch_mult": [1, 2, 4, 4], "norm_num_groups": 4, "use_tiling": False})
    seen = []

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.config, self.dtype = model, model.config, model.dtype
            self.activation_bytes = model.activation_bytes

        def forward(self, x, timestep, text, mask, **kw):
            seen.append({x.device, timestep.device, text.device, mask.device, kw["inpaint_latents"].device})
            return torch.zeros(x.shape[0], 8, *x.shape[2:], device=x.device)

    g = torch.Generator().manual_seed(0)
    text = Conditioning(torch.randn(1, 6, model.config.caption_channels, generator=g), torch.ones(1, 6))
    latents = generate(Recorder(), vae, text, text, frames=8, height=16, width=16, steps=2, seed=0,
                       placement=Placement(fixed_device("meta"), {}))
    assert seen and all(devices == {torch.device("meta")} for devices in seen)
    assert latents.device.type == "meta"
    assert next(model.parameters()).device.type == "cpu"


def test_standalone_placement_applies_loras_only_while_placed_and_restores_exactly(tmp_path):
    from easyanimate.lora import resolve_lora
    from pack_fixtures import write_lora
    from tiny import example_inputs, random_model, run

    model = random_model("v3", num_layers=2)
    write_lora(tmp_path / "a.safetensors", model.state_dict(), seed=1)
    lora = resolve_lora(tmp_path / "a.safetensors", model)
    host = StandaloneHost(compute="cpu")
    base = host.wrap(model, "transformer")
    adapted = host.with_lora(base, lora, 0.8)
    assert base.loras == () and len(adapted.loras) == 1 and adapted.module is base.module
    inputs = example_inputs(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = run(model, inputs)
    with host.placed([adapted]):
        patched = run(model, inputs)
    assert not torch.equal(plain, patched)
    assert torch.equal(run(model, inputs), plain)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(EasyAnimateError, match="strength"):
        host.with_lora(base, lora, float("nan"))


@pytest.mark.parametrize("name", ["../outside", "/etc", "a/../../b", "", "C:/models/x", "..", "a\\..\\..\\b"])
def test_names_that_leave_the_model_folders_are_refused(name):
    with pytest.raises(EasyAnimateError, match="inside the model folders"):
        safe_relative_name(name)


def test_standalone_nodes_resolve_models_inside_the_roots_only(standalone, tmp_path, monkeypatch):
    host = standalone.nodes.host
    EasyAnimateError = standalone.easyanimate.errors.EasyAnimateError  # the pack's own copy of the class
    outside = tmp_path / "outside_model"
    (outside / "transformer").mkdir(parents=True)
    (outside / "transformer" / "config.json").write_text("{}")
    for name in (str(outside), "../" * 8 + str(outside).lstrip("/"), "/"):
        with pytest.raises(EasyAnimateError, match="inside the model folders"):
            host.resolve_model(name)
    node = standalone.nodes.NODE_CLASS_MAPPINGS["LoadEasyAnimate"]
    # IS_CHANGED never walks a folder it was not meant to (a name of "/" walked the whole filesystem)
    walked = []
    monkeypatch.setattr(standalone.nodes.loaders, "_signature", lambda path: walked.append(path) or ())
    node.IS_CHANGED("/", "fp32")
    assert walked == []
    with pytest.raises(EasyAnimateError, match="inside the model folders"):
        standalone.nodes.NODE_CLASS_MAPPINGS["EasyAnimateLoRALoader"]().apply(None, "../../etc/passwd", 1.0, 1.0)
    with pytest.raises(EasyAnimateError, match="inside the model folders"):
        standalone.nodes.NODE_CLASS_MAPPINGS["MuLTILoader"]().load("/", "fp32")
