"""EasyAnimate V5.1 on ComfyUI's model management, in a real ComfyUI: the Qwen2-VL text encoder placed with its own
memory estimate and taken off the compute device right after encoding (not loaded again for prompts it has
encoded); the transformer placed with its estimate for each latent shape; and a run on ComfyUI's lowvram path
(every layer of the text encoder and of the transformer cast per call from the offload device) equal to a full
load. It also prints the estimates for the released 12B transformer and the Qwen2-VL-7B encoder at 576x1008, 49
frames, from their configs on the meta device (no weights), with what ComfyUI would keep loaded on a 24 GiB GPU.

Runs in ComfyUI's interpreter when `COMFYUI_DIR` is set (`COMFYUI_PYTHON`, default the current one); skipped with
the reason otherwise. As in test_comfyui_host.py the CPU stands in for a GPU (`is_device_cpu` answers False), so
that `load_models_gpu` takes the route it takes on a GPU with too little memory.
"""
import pytest

from comfyui_script import COMFYUI_DIR, run_comfyui_script
from conftest import ROOT

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set: no ComfyUI to run the host in")

SCRIPT = r"""
import importlib.util, sys, types
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
from release_v5 import make_release_v51

GiB = 2**30
release = make_release_v51(work / "models" / "easyanimate" / "EasyAnimateV5.1-tiny-InP", "inp")
folder_paths.add_model_folder_path("easyanimate", str(release.parent))
spec = importlib.util.spec_from_file_location("easyanimate_pack", root + "/__init__.py", submodule_search_locations=[root])
pack = importlib.util.module_from_spec(spec); sys.modules["easyanimate_pack"] = pack; spec.loader.exec_module(pack)
assert type(pack.nodes.host.current_host()).__name__ == "ComfyHost"
N = pack.nodes.NODE_CLASS_MAPPINGS
core = pack.easyanimate

loads = []  # every load_models_gpu call: (the patcher's model, memory_required, whether it was loaded partially)
load_models_gpu = mm.load_models_gpu
def recording_load(models, memory_required=0, **options):
    load_models_gpu(models, memory_required=memory_required, **options)
    loads.extend((p.model, memory_required, bool(p.model.model_lowvram)) for p in models)
mm.load_models_gpu = recording_load

def loads_of(module):
    return [(memory, partial) for model, memory, partial in loads if model is module]

model, vae, text_encoder = N["LoadEasyAnimate"]().load("EasyAnimateV5.1-tiny-InP", "fp32")
transformer = model.transformer.module
held = model.transformer.patcher.model  # what ComfyUI loads: the native route's model around it
assert held.diffusion_model is transformer
encode, sample = N["EasyAnimateV5TextEncode"]().encode, N["EasyAnimateSampler"]().sample

# 1. The text encoder: placed with its estimate, off the compute device right after, not loaded for the same prompts.
embeds = encode(text_encoder, "a red circle moving right", "blurry")[0]
encoder, component = text_encoder.source.model, text_encoder.source.component
assert encoder is not None, "inside ComfyUI the encoder's weights stay in RAM (ComfyUI manages them)"
holder = component.patcher.model
assert loads_of(holder) == [(encoder.activation_bytes(1), False)], loads_of(holder)
assert not [m for m in mm.current_loaded_models if m.model is not None and m.model.is_clone(component.patcher)], \
    "the text encoder is still loaded after encoding"
again = encode(text_encoder, "a red circle moving right", "blurry")[0]
assert len(loads_of(holder)) == 1 and torch.equal(again.positive.embeds, embeds.positive.embeds)
print("text encoder: placed with its estimate (%d bytes), unloaded after encoding, not loaded again for the same "
      "prompts" % encoder.activation_bytes(1))

# 2. The transformer: placed with its own estimate for each latent shape (guidance batch of 2 rows).
tokens = embeds.positive.embeds.shape[1]
print("tiny V5.1 transformer, estimate per request (frames, width x height -> latent shape: bytes):")
for frames, height, width in ((5, 32, 32), (9, 32, 64), (13, 64, 48)):
    before = len(loads_of(held))
    sample(model, embeds, vae, width, height, frames, 3, 1, 6.0, "auto", 1.0)
    latent = ((frames - 1) // 4 + 1, height // 8, width // 8)
    expected = transformer.activation_bytes(2, *latent, tokens)
    assert loads_of(held)[before:] == [(expected, False)], (loads_of(held)[before:], expected)
    print("  %2d frames, %dx%d -> %s: %d" % (frames, width, height, latent, expected))

# 3. ComfyUI's lowvram path: every castable layer cast per call; the same embeddings and latents as a full load.
start = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(1))
def run():
    return sample(model, embeds, vae, 32, 32, 5, 3, 2, 6.0, "auto", 1.0, start_image=start)[0]["samples"]
full = run()
prompt = "a blue square moving up"
plain_encoder = core.text_v5.load_text_encoder_v5(release, dtype="fp32")
expected_text = plain_encoder.encode([prompt], ["blurry"])

mm.unload_all_models()
mm.vram_state = mm.VRAMState.NO_VRAM  # ComfyUI's lowest setting: no layer stays loaded, each is cast per call
mm.is_device_cpu = lambda device: False  # the CPU stands in for a GPU
low_text = encode(text_encoder, prompt, "blurry")[0]
assert loads_of(holder)[-1][1], "the text encoder was not loaded on the lowvram path"
assert torch.equal(low_text.positive.embeds, expected_text.embeds), "lowvram text encoding differs"
assert torch.equal(low_text.negative.embeds, expected_text.negative_embeds)
low = run()
assert loads_of(held)[-1][1], "the transformer was not loaded on the lowvram path"
err = ((low - full).abs().max() / full.abs().max()).item()
print("lowvram: text encoder %d layers and transformer %d layers cast per call; latents vs full load rel %.2e" % (
    sum(hasattr(m, "comfy_cast_weights") for m in encoder.model.modules()),
    sum(hasattr(m, "comfy_cast_weights") for m in transformer.modules()), err))
assert err <= 1e-6, err
mm.unload_all_models()

# 4. The released sizes, from their configs on the meta device: what the hosts load them with at 576x1008, 49 frames.
from transformers import Qwen2VLConfig
from transformers.models.qwen2_vl import modeling_qwen2_vl
mmdit = core.models.mmdit
with torch.device("meta"):
    big = mmdit.EasyAnimateMMDiT(mmdit.MMDiTConfig.from_dict(mmdit.family_preset("v51"), "v51"), dtype=torch.bfloat16)
    qwen = Qwen2VLConfig(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=152064, rms_norm_eps=1e-6, rope_theta=1e6,
                         rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]})
    text_model = getattr(modeling_qwen2_vl, "Qwen2VLTextModel", modeling_qwen2_vl.Qwen2VLModel)(
        getattr(qwen, "text_config", None) or qwen).to(torch.bfloat16)
text_model.layers = text_model.layers[:-1]  # as the encoder is built: the embedding is the last layer's input
big_encoder = core.text_v5.Qwen2VLTextEncoder(text_model, types.SimpleNamespace(model_max_length=32768), identity="7B")

def weights(module):
    return sum(p.numel() * p.element_size() for p in module.parameters())

def kept_loaded(free, required):
    # load_models_gpu's budget for the weights of a model that does not fit (NORMAL_VRAM, after freeing the rest)
    minimum = max(mm.minimum_inference_memory(), required + mm.extra_reserved_memory())
    return max(128 * 2**20, free - minimum, min(free * mm.MIN_WEIGHT_MEMORY_RATIO, free - mm.minimum_inference_memory()))

print("released sizes, bf16 (576x1008, 49 frames -> latents 13 x 72 x 126; guidance batch of 2; 256 text tokens):")
for frames, height, width in ((49, 384, 672), (49, 576, 1008), (49, 768, 1344)):
    estimate = big.activation_bytes(2, (frames - 1) // 4 + 1, height // 8, width // 8, 256)
    print("  V5.1 12B transformer, %d frames at %dx%d: estimate %.2f GiB" % (frames, width, height, estimate / GiB))
estimate = big.activation_bytes(2, 13, 72, 126, 256)
print("  V5.1 12B transformer weights %.2f GiB; on a 24 GiB GPU ComfyUI keeps %.2f GiB of them loaded and casts the "
      "rest per call" % (weights(big) / GiB, min(weights(big), kept_loaded(24 * GiB, estimate)) / GiB))
print("  Qwen2-VL-7B language model (27 of 28 layers) weights %.2f GiB, estimate per prompt %.3f GiB" % (
    weights(text_model) / GiB, big_encoder.activation_bytes(1) / GiB))
print("ok")
"""


def test_v51_on_comfyui_model_management_estimates_unload_and_lowvram(tmp_path):
    print(run_comfyui_script(tmp_path, "v51_check.py", SCRIPT, ROOT, tmp_path))
