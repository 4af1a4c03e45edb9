"""The native ComfyUI route in a real ComfyUI: the EasyAnimate model as a ComfyUI MODEL sampled by ComfyUI's
own samplers, LoRA loaders and model patches, and its agreement with the pack's own sampler.

* Route agreement on the demo model: the same seed gives the same start noise on both routes; ComfyUI's Euler
  with the pack's Euler schedule (SamplerCustom with those σ, and KSampler euler + "normal", which is the same
  schedule) gives the pack's latents within `ROUTE_TOLERANCE` (relative to their largest value) and its
  decoded video within `VIDEO_TOLERANCE` (pixels in [0, 1]); image-to-video with the CLIP image on the tiny
  release (its CLIP tokens switched on for the last half of the steps on both routes) the same.
* KSampler, KSamplerAdvanced, SamplerCustom and SamplerCustomAdvanced with a spread of samplers and schedulers.
* LoraLoaderModelOnly / LoraLoader with the demo LoRA (listed in ComfyUI's `loras`) changes the video, strength
  0 gives the plain one bit for bit, and equals the pack's LoRA Loader; every LoRA format the pack reads,
  through ComfyUI's `load_lora_for_models`, patches the weights the pack's merge does.
* EasyCache reports skipped steps (and the transformer is called that much less), LazyCache, CFGZeroStar and
  SkipLayerGuidanceDiT run; the attention goes through ComfyUI's attention function and its
  `transformer_options` override.
* Memory: the native model's estimate is the pack route's, ComfyUI loads it with that estimate, loads it
  partially on the lowvram path with the same result, and holds it once whichever route ran last.

Runs in ComfyUI's interpreter when `COMFYUI_DIR` is set (`COMFYUI_PYTHON`, default the current one); skipped
with the reason otherwise. `EASYANIMATE_TEST_TORCH_COMPILE=1` also compiles the model with TorchCompileModel
(inductor; about 90 s on a CPU).
"""
import json
import os

import pytest

from comfyui_script import COMFYUI_DIR, run_comfyui_script
from conftest import ROOT

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set: no ComfyUI to run the native route in")

ROUTE_TOLERANCE = 2e-4  # latents, relative to their largest value (measured: see the printed figures)
VIDEO_TOLERANCE = 2e-3  # decoded pixels in [0, 1], largest absolute difference

SETUP = r"""
import importlib.util, json, logging, os, sys, time
from pathlib import Path
comfy_dir, root, work = sys.argv[1], sys.argv[2], Path(sys.argv[3])
sys.path.insert(0, comfy_dir)
sys.path.insert(0, root + "/tests")
sys.path.append(root)  # the tests' helpers import the core as `easyanimate` (after ComfyUI: its `nodes` first)
import comfy.cli_args
comfy.cli_args.args.cpu = True
import torch
torch.set_num_threads(1)
import comfy.model_management as mm
import comfy.samplers, comfy.sd, comfy.utils
import folder_paths
import nodes as comfy_nodes
from comfy_extras import nodes_custom_sampler as cs, nodes_easycache, nodes_cfg, nodes_slg
from release import make_release

models = work / "models"
if not (models / "easyanimate" / "EasyAnimateV3-tiny").is_dir():
    make_release(models / "easyanimate" / "EasyAnimateV3-tiny", "v3")
folder_paths.add_model_folder_path("easyanimate", str(models / "easyanimate"))
spec = importlib.util.spec_from_file_location("easyanimate_pack", root + "/__init__.py", submodule_search_locations=[root])
pack = importlib.util.module_from_spec(spec); sys.modules["easyanimate_pack"] = pack; spec.loader.exec_module(pack)
host = pack.nodes.host.current_host()
assert type(host).__name__ == "ComfyHost", type(host)
N = pack.nodes.NODE_CLASS_MAPPINGS
DEMO = "EasyAnimateV3-demo-64px"
PROMPT = "a red circle moving right on a black background"
figures = {}

def result(output):
    return output.result if hasattr(output, "result") else output

def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()

def load_demo():
    model, vae, t5 = N["LoadEasyAnimate"]().load(DEMO, "fp32")
    native = N["EasyAnimateNativeModel"]().convert(model)[0]
    positive, negative = N["EasyAnimateT5EncodeConditioning"]().encode_conditioning(PROMPT, "", True, t5=t5)
    return model, vae, t5, native, positive, negative
"""

ROUTE_SCRIPT = SETUP + r"""
tolerance, video_tolerance, compile_too = float(sys.argv[4]), float(sys.argv[5]), sys.argv[6] == "1"
SEED, STEPS, CFG = 43, 25, 5.0
model, vae, t5, native, positive, negative = load_demo()
transformer = model.transformer.module
assert "magenta.safetensors" in folder_paths.get_filename_list("loras"), "the demo LoRA is not listed in loras"
pos, neg, latent = N["EasyAnimateToVideo"]().prepare(positive, negative, model, vae, 64, 64, 16, 1, SEED + 1)

# ---- route agreement (text-to-video on the demo model)
from easyanimate_pack.easyanimate.sampling import build_sampler
euler = build_sampler("Euler", model.scheduler_config)
euler.set_timesteps(STEPS)
sigmas = euler.sigmas.clone()
normal = comfy.samplers.calculate_sigmas(native.get_model_object("model_sampling"), "normal", STEPS)
figures["normal schedule vs the pack's Euler schedule (rel)"] = rel(normal, sigmas)
assert torch.allclose(normal, sigmas, rtol=1e-5, atol=1e-6), (normal, sigmas)
embeds = N["EasyAnimateT5Encode"]().encode(PROMPT, "", True, t5=t5)[0]
sample = lambda m=model, **kw: N["EasyAnimateSampler"]().sample(m, embeds, vae, 64, 64, 16, SEED, STEPS, CFG, "Euler", 1.0, **kw)[0]["samples"]
pack_latents = sample()
transformer.attention_function = None  # the standalone path's attention (SDPA)
pack_sdpa = sample()
transformer.attention_function = pack.nodes.native.comfy_attention
custom = cs.SamplerCustom().sample(native, True, SEED, CFG, pos, neg, comfy.samplers.sampler_object("euler"), sigmas, latent)[0]["samples"]
ksampler = comfy_nodes.KSampler().sample(native, SEED, STEPS, CFG, "euler", "normal", pos, neg, latent, 1.0)[0]["samples"]
decode = lambda latents: N["EasyAnimateSliceVAEDecode"]().decode(vae, {"samples": latents}, "model default", 384, 0.25, False, 0)[0]
video = decode(pack_latents)
for name, latents in (("SamplerCustom euler + the pack's sigmas", custom), ("KSampler euler normal", ksampler)):
    figures[f"t2v latents, {name} vs the pack's sampler in ComfyUI (rel)"] = rel(latents, pack_latents)
    figures[f"t2v latents, {name} vs the pack's sampler with SDPA (rel)"] = rel(latents, pack_sdpa)
    figures[f"t2v video, {name} vs the pack's sampler (max abs)"] = (decode(latents) - video).abs().max().item()
    assert rel(latents, pack_latents) <= tolerance and rel(latents, pack_sdpa) <= tolerance, name
    assert (decode(latents) - video).abs().max().item() <= video_tolerance, name

# ---- route agreement with the CLIP image (image-to-video on the tiny release, which has image_encoder/)
tmodel, tvae, tt5 = N["LoadEasyAnimate"]().load("EasyAnimateV3-tiny", "fp32")
tnative = N["EasyAnimateNativeModel"]().convert(tmodel)[0]
g = torch.Generator().manual_seed(5)
image, end = torch.rand(1, 32, 32, 3, generator=g), torch.rand(1, 32, 32, 3, generator=g)
tembeds = N["EasyAnimateT5Encode"]().encode("a red circle", "blurry", True, t5=tt5)[0]
tpos, tneg = N["EasyAnimateT5EncodeConditioning"]().encode_conditioning("a red circle", "blurry", True, t5=tt5)
small = build_sampler("Euler", tmodel.scheduler_config)
small.set_timesteps(6)
outputs = {}
for ratio in (0.5, 0.0):
    p, n, lat = N["EasyAnimateToVideo"]().prepare(tpos, tneg, tmodel, tvae, 32, 32, 8, 1, 8, start_image=image,
                                                  end_image=end, clip_apply_ratio=ratio)
    ours = N["EasyAnimateSampler"]().sample(tmodel, tembeds, tvae, 32, 32, 8, 7, 6, 6.0, "Euler", 1.0, start_image=image,
                                          end_image=end, clip_apply_ratio=ratio)[0]["samples"]
    theirs = cs.SamplerCustom().sample(tnative, True, 7, 6.0, p, n, comfy.samplers.sampler_object("euler"), small.sigmas.clone(), lat)[0]["samples"]
    figures[f"i2v latents (start + end image, CLIP ratio {ratio}) vs the pack's sampler (rel)"] = rel(theirs, ours)
    assert rel(theirs, ours) <= tolerance, ratio
    outputs[ratio] = theirs
assert rel(outputs[0.5], outputs[0.0]) > 1e-3, "the CLIP image changed nothing"

# ---- ComfyUI's samplers, schedulers and sampling nodes
for sampler_name, scheduler in (("dpmpp_2m", "karras"), ("heun", "normal"), ("uni_pc", "simple"), ("ddim", "ddim_uniform"),
                                ("euler_ancestral", "beta"), ("dpmpp_2m_sde", "sgm_uniform"), ("lcm", "exponential")):
    out = comfy_nodes.KSampler().sample(native, SEED, 8, CFG, sampler_name, scheduler, pos, neg, latent, 1.0)[0]["samples"]
    assert out.shape == latent["samples"].shape and torch.isfinite(out).all(), (sampler_name, scheduler)
advanced = comfy_nodes.KSamplerAdvanced().sample(native, "enable", SEED, STEPS, CFG, "euler", "normal", pos, neg, latent, 0, 10000, "disable")[0]["samples"]
figures["KSamplerAdvanced vs KSampler (rel)"] = rel(advanced, ksampler)
assert rel(advanced, ksampler) < 1e-6
guider = cs.CFGGuider().get_guider(native, pos, neg, CFG)[0]
noise = cs.RandomNoise().get_noise(SEED)[0]
schedule = cs.BasicScheduler().get_sigmas(native, "normal", STEPS, 1.0)[0]
custom_advanced = cs.SamplerCustomAdvanced().sample(noise, guider, cs.KSamplerSelect().get_sampler("euler")[0], schedule, latent)[0]["samples"]
figures["SamplerCustomAdvanced vs KSampler (rel)"] = rel(custom_advanced, ksampler)
assert rel(custom_advanced, ksampler) < 1e-6

ks = lambda m, steps=STEPS: comfy_nodes.KSampler().sample(m, SEED, steps, CFG, "euler", "normal", pos, neg, latent, 1.0)[0]["samples"]

# ---- LoRA through ComfyUI's loaders (the demo LoRA, listed in loras)
with_lora = ks(comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(native, "magenta.safetensors", 1.0)[0])
figures["LoraLoaderModelOnly magenta 1.0 vs no LoRA (rel)"] = rel(with_lora, ksampler)
assert rel(with_lora, ksampler) > 0.05
zero = ks(comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(native, "magenta.safetensors", 0.0)[0])
assert torch.equal(zero, ksampler), "strength 0 is not the plain output"
loader = ks(comfy_nodes.LoraLoader().load_lora(native, None, "magenta.safetensors", 1.0, 0.0)[0])
assert torch.equal(loader, with_lora)
pack_lora = N["EasyAnimateLoRALoader"]().apply(model, "magenta.safetensors", 1.0, 0.0)[0]
from_pack_loader = ks(N["EasyAnimateNativeModel"]().convert(pack_lora)[0])
figures["pack's LoRA Loader -> MODEL vs LoraLoaderModelOnly (rel)"] = rel(from_pack_loader, with_lora)
assert rel(from_pack_loader, with_lora) < 1e-6

# ---- model patches
messages = []
class Catch(logging.Handler):
    def emit(self, record):
        messages.append(record.getMessage())
logging.getLogger().addHandler(Catch())
logging.getLogger().setLevel(logging.INFO)
calls = []
hook = transformer.register_forward_pre_hook(lambda *a: calls.append(1))
start = time.perf_counter(); plain = ks(native); plain_time = time.perf_counter() - start
plain_calls = len(calls); calls.clear()
easycache = result(nodes_easycache.EasyCacheNode.execute(native, 0.2, 0.15, 0.95, False))[0]
start = time.perf_counter(); cached = ks(easycache); cached_time = time.perf_counter() - start
cached_calls = len(calls); calls.clear()
report = [m for m in messages if m.startswith("EasyCache - skipped")]
assert report, messages[-5:]
skipped = int(report[-1].split("skipped ")[1].split("/")[0])
figures["EasyCache (0.2, 0.15, 0.95), 25 steps"] = report[-1]
figures["EasyCache transformer calls (plain, cached)"] = [plain_calls, cached_calls]
figures["EasyCache seconds (plain, cached)"] = [round(plain_time, 2), round(cached_time, 2)]
figures["EasyCache vs plain (rel)"] = rel(cached, plain)
assert skipped > 0 and cached_calls == plain_calls - skipped, (skipped, plain_calls, cached_calls)
lazy = result(nodes_easycache.LazyCacheNode.execute(native, 0.2, 0.15, 0.95, False))[0]
ks(lazy)
figures["LazyCache"] = [m for m in messages if m.startswith("LazyCache - skipped")][-1]
hook.remove()
zero_star = ks(result(nodes_cfg.CFGZeroStar.execute(native))[0])
assert torch.isfinite(zero_star).all() and rel(zero_star, plain) > 1e-4
figures["CFGZeroStar vs plain (rel)"] = rel(zero_star, plain)
slg = ks(result(nodes_slg.SkipLayerGuidanceDiT.execute(native, 3.0, 0.01, 0.5, "2, 3", "", 0.0))[0])
assert torch.isfinite(slg).all() and rel(slg, plain) > 1e-4
figures["SkipLayerGuidanceDiT blocks 2, 3 vs plain (rel)"] = rel(slg, plain)
if compile_too:
    from comfy_extras import nodes_torch_compile
    compiled = ks(result(nodes_torch_compile.TorchCompileModel.execute(native, "inductor"))[0], steps=4)
    figures["TorchCompileModel (inductor) vs plain, 4 steps (rel)"] = rel(compiled, ks(native, steps=4))
    assert rel(compiled, ks(native, steps=4)) < 1e-4

# ---- attention: ComfyUI's function, and a transformer_options override reaching it
import comfy.ldm.modules.attention as attention
seen = {"optimized": 0, "pytorch": 0, "override": 0}
optimized, pytorch = attention.optimized_attention, attention.attention_pytorch
def count(name, fn):
    def wrapped(*args, **kwargs):
        seen[name] += 1
        return fn(*args, **kwargs)
    return wrapped
attention.optimized_attention, attention.attention_pytorch = count("optimized", optimized), count("pytorch", pytorch)
try:
    overridden = native.clone()
    def override(func, *args, **kwargs):
        seen["override"] += 1
        return func(*args, **kwargs)
    overridden.model_options["transformer_options"]["optimized_attention_override"] = override
    same = ks(overridden, steps=2)
finally:
    attention.optimized_attention, attention.attention_pytorch = optimized, pytorch
figures["attention calls in 2 steps (optimized, masked via pytorch, override)"] = [seen["optimized"], seen["pytorch"], seen["override"]]
assert seen["optimized"] > 0 and seen["pytorch"] > 0 and seen["override"] == seen["optimized"] + seen["pytorch"], seen
print(json.dumps(figures, indent=1))
print("ok")
"""

LORA_SCRIPT = SETUP + r"""
jobs = json.loads(Path(sys.argv[4]).read_text())
from easyanimate_pack.easyanimate.lora import lora_patches, resolve_lora
model, vae, t5 = N["LoadEasyAnimate"]().load("EasyAnimateV3-tiny", "fp32")
native = N["EasyAnimateNativeModel"]().convert(model)[0]
transformer = model.transformer.module
base = {k: v.clone() for k, v in transformer.state_dict().items()}
not_loaded = []
class Watch(logging.Handler):
    def emit(self, record):
        if "NOT LOADED" in record.getMessage() or "lora key not loaded" in record.getMessage():
            not_loaded.append(record.getMessage())
logging.getLogger().addHandler(Watch())
for fmt, job in jobs.items():
    patched = comfy.sd.load_lora_for_models(native, None, comfy.utils.load_torch_file(job["path"], safe_load=True), 0.6, 0)[0]
    patched.patch_model()
    comfy_weights = {k: v.clone() for k, v in transformer.state_dict().items()}
    patched.unpatch_model()
    assert all(torch.equal(v, base[k]) for k, v in transformer.state_dict().items()), fmt
    # ComfyUI reads a LoRA's scale from `.alpha` tensors only: for PEFT files whose scale is in metadata or
    # adapter_config.json it uses 1, so strength s there is strength s * rank / alpha here.
    with lora_patches(transformer, [(resolve_lora(job["path"], transformer), 0.6 * job["strength_factor"])]):
        ours = {k: v.clone() for k, v in transformer.state_dict().items()}
    changed = [k for k in ours if not torch.equal(ours[k], base[k])]
    assert len(changed) == job["layers"], (fmt, len(changed), job["layers"])
    for key, value in ours.items():
        scale = value.abs().max().clamp_min(1e-30)
        assert (comfy_weights[key] - value).abs().max() <= 1e-6 * scale, (fmt, key)
    print("ComfyUI applied", fmt, "as the pack does:", len(changed), "layers")
assert not not_loaded, not_loaded[:3]
print("ok")
"""

MEMORY_SCRIPT = SETUP + r"""
model, vae, t5, native, positive, negative = load_demo()
transformer = model.transformer.module
base_model = native.model
assert model.transformer.patcher.model is base_model and base_model.diffusion_model is transformer
before = {k: v.clone() for k, v in transformer.state_dict().items()}
pos, neg, latent = N["EasyAnimateToVideo"]().prepare(positive, negative, model, vae, 64, 64, 16, 1, 44)
embeds = N["EasyAnimateT5Encode"]().encode(PROMPT, "", True, t5=t5)[0]
ks = lambda m: comfy_nodes.KSampler().sample(m, 43, 3, 5.0, "euler", "normal", pos, neg, latent, 1.0)[0]["samples"]
sample = lambda: N["EasyAnimateSampler"]().sample(model, embeds, vae, 64, 64, 16, 43, 3, 5.0, "Euler", 1.0)[0]["samples"]

# The estimate: the transformer's own, for the guidance batch, on both routes.
loads = []
real_load = mm.load_models_gpu
def recording(models, memory_required=0, *args, **kwargs):
    loads.append(([m.model for m in models], memory_required, kwargs.get("minimum_memory_required")))
    return real_load(models, memory_required, *args, **kwargs)
mm.load_models_gpu = recording
ks(native); native_loads = [l for l in loads if base_model in l[0]]; loads.clear()
sample(); pack_loads = [l for l in loads if base_model in l[0]]; loads.clear()
mm.load_models_gpu = real_load
shape = latent["samples"].shape
expected = transformer.activation_bytes(2 * shape[0], *shape[2:])
assert base_model.memory_required([2 * shape[0], *shape[1:]]) == expected
assert [l[1] for l in native_loads] == [expected] and [l[1] for l in pack_loads] == [expected], (native_loads, pack_loads, expected)
assert native_loads[0][2] == transformer.activation_bytes(shape[0], *shape[2:])
figures["memory estimate (bytes; native KSampler, pack sampler)"] = [native_loads[0][1], pack_loads[0][1]]

# One model, whichever route ran last (the native MODEL is a clone of the pack route's patcher).
ours = [lm for lm in mm.current_loaded_models if lm.model.model is base_model]
assert len(ours) == 1, len(ours)
full = ks(native)
lora = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(native, "magenta.safetensors", 1.0)[0]
full_lora = ks(lora)
assert len([lm for lm in mm.current_loaded_models if lm.model.model is base_model]) == 1
mm.free_memory(1e30, mm.get_torch_device())
assert not [lm for lm in mm.current_loaded_models if lm.model.model is base_model], "not evicted"
assert all(torch.equal(v, before[k]) for k, v in transformer.state_dict().items()), "weights changed"

# ComfyUI's lowvram path: every layer's weights cast per call from the offload device.
mm.unload_all_models()
mm.vram_state = mm.VRAMState.NO_VRAM
mm.is_device_cpu = lambda device: False  # the CPU stands in for a GPU
low, low_lora = ks(native), ks(lora)
loaded = [lm for lm in mm.current_loaded_models if lm.model.model is base_model]
assert loaded and base_model.model_lowvram, "the native model was not loaded on the lowvram path"
streamed = [m for m in transformer.modules() if getattr(m, "comfy_cast_weights", False)]
assert len(streamed) > 10, len(streamed)
for name, a, b in (("plain", low, full), ("LoRA", low_lora, full_lora)):
    figures[f"lowvram vs full load, {name} (rel)"] = rel(a, b)
    assert rel(a, b) <= 1e-6, (name, rel(a, b))
figures["layers cast per call on the lowvram path"] = len(streamed)
mm.unload_all_models()
assert all(torch.equal(v, before[k]) for k, v in transformer.state_dict().items()), "weights changed"
print(json.dumps(figures, indent=1))
print("ok")
"""


def test_native_route_samplers_loras_patches_and_agreement_with_the_pack_sampler(tmp_path):
    compile_too = os.environ.get("EASYANIMATE_TEST_TORCH_COMPILE") == "1"
    out = run_comfyui_script(tmp_path, "native_route.py", ROUTE_SCRIPT, ROOT, tmp_path, ROUTE_TOLERANCE, VIDEO_TOLERANCE,
                             "1" if compile_too else "0", timeout=1800)
    print(out[out.find("{"):])


def test_comfyui_lora_loaders_apply_every_format_the_pack_reads(tmp_path):
    from easyanimate.loading import load_transformer
    from release import make_release
    from test_lora import ALPHA, RANK, all_formats, make_factors

    release = make_release(tmp_path / "models" / "easyanimate" / "EasyAnimateV3-tiny", "v3")
    transformer = load_transformer(release, dtype="fp32")
    factors = make_factors(transformer)
    jobs = {}
    for fmt, path in all_formats(tmp_path / "loras", factors).items():
        metadata_scale = "metadata" in fmt or "adapter_config" in fmt
        jobs[fmt] = {"path": str(path), "layers": len(factors), "strength_factor": RANK / ALPHA if metadata_scale else 1.0}
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    print(run_comfyui_script(tmp_path, "native_loras.py", LORA_SCRIPT, ROOT, tmp_path, tmp_path / "jobs.json"))


def test_native_model_memory_estimate_partial_loading_and_eviction(tmp_path):
    out = run_comfyui_script(tmp_path, "native_memory.py", MEMORY_SCRIPT, ROOT, tmp_path)
    print(out[out.find("{"):])

