"""EasyAnimate V5.1 on the native ComfyUI route, in a real ComfyUI, on tiny V5.1 releases (T2V and InP):

* Route agreement: ComfyUI's "normal" scheduler on the model's flow sampling is the pack's Flow schedule; KSampler
  (euler, normal) and SamplerCustom (euler with the Flow sampler's σ) give the EasyAnimate Sampler's latents (Flow
  sampler, same seed: the same start noise) within `ROUTE_TOLERANCE` of their largest value, and its decoded video
  within `VIDEO_TOLERANCE`, for text-to-video and InP image-to-video (start + end image; To Video's vae_seed = the
  Sampler's seed, so the noise on the known pixels is the same draw), and on tiny Control and Control-Camera
  releases for a control video and for camera poses, each with a reference image.
* ModelSamplingSD3 changes the shift as the Sampler's `shift` does (the same latents for shift 3).
* A V5.1 LoRA in the pack's format through LoraLoaderModelOnly equals the pack's LoRA Loader on both routes;
  strength 0 is the plain model bit for bit.
* SkipLayerGuidanceDiT's double-block patches reach the MMDiT blocks; an InP model sampled without To Video gets
  zero conditioning channels (text-to-video), the same as To Video gives it.
* Memory: `memory_required` is the transformer's own estimate with the prompt's text tokens, on both routes; a run on
  ComfyUI's lowvram path (every layer cast per call, the CPU standing in for a GPU) equals a full load.

Why the tolerance: both routes run the same transformer on the same inputs in float32; they differ only in
arithmetic order: ComfyUI's Euler step goes through the denoised estimate (x − σ·v, then d = (x − denoised)/σ,
guidance on the denoised estimates) where the Flow sampler steps x + (σ' − σ)·v with guidance on v, and ComfyUI
builds its "normal" σ in float32 where the Flow sampler uses float64. Each costs a few float32 roundings per step
(about 1e-7 relative), which the transformer amplifies a little: measured 1.0e-6 (text-to-video) and 1.2e-6
(image-to-video) of the largest latent. 1e-4 leaves about 80x margin and stays well below what the inputs change
(the start and end images change the tiny InP model's latents by 5e-3, checked to exceed 10x the tolerance).

Runs in ComfyUI's interpreter when `COMFYUI_DIR` is set (`COMFYUI_PYTHON`, default the current one); skipped with
the reason otherwise.
"""
import json

import pytest

from comfyui_script import COMFYUI_DIR, ROUTE_SCRIPT_START, run_comfyui_script
from conftest import ROOT

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set: no ComfyUI to run the native route in")

ROUTE_TOLERANCE = 1e-4  # latents, relative to their largest value (see the module docstring)
VIDEO_TOLERANCE = 1e-3  # decoded pixels in [0, 1], largest absolute difference

SCRIPT = ROUTE_SCRIPT_START + r"""
from comfy_extras import nodes_custom_sampler as cs, nodes_model_advanced, nodes_slg

folder_paths.add_model_folder_path("loras", str(work / "loras"))
assert type(pack.nodes.host.current_host()).__name__ == "ComfyHost"
SEED, STEPS, CFG, SIZE, FRAMES = 43, 10, 6.0, 32, 9
PROMPT, NEGATIVE = "a red circle moving right", "blurry"
POSES = sys.argv[6]  # a camera path in the pose-file format
figures = {}

def result(output):
    return output.result if hasattr(output, "result") else output

def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()

def setup(name):
    model, vae, text_encoder = N["LoadEasyAnimate"]().load(name, "fp32")
    native = N["EasyAnimateNativeModel"]().convert(model)[0]
    embeds = N["EasyAnimateV5TextEncode"]().encode(text_encoder, PROMPT, NEGATIVE)[0]
    positive, negative = N["EasyAnimateV5TextEncodeConditioning"]().encode_conditioning(text_encoder, PROMPT, NEGATIVE)
    return model, vae, native, embeds, positive, negative

def pack_sample(model, embeds, vae, **kw):
    return N["EasyAnimateSampler"]().sample(model, embeds, vae, SIZE, SIZE, FRAMES, SEED, STEPS, CFG, "Flow", 1.0,
                                            **kw)[0]["samples"]

def ksampler(native, pos, neg, latent, steps=STEPS):
    return comfy_nodes.KSampler().sample(native, SEED, steps, CFG, "euler", "normal", pos, neg, latent, 1.0)[0]["samples"]

def decode(vae, latents):
    return N["EasyAnimateSliceVAEDecode"]().decode(vae, {"samples": latents}, "model default", 384, 0.25, False, 0)[0]

# ---- the model: flow sampling with the release's shift, 16-channel 5-D latents, scale 1
model, vae, native, embeds, positive, negative = setup("EasyAnimateV5.1-tiny-T2V")
transformer = model.transformer.module
base_model = native.model
sampling = native.get_model_object("model_sampling")
assert isinstance(sampling, comfy.model_sampling.ModelSamplingDiscreteFlow) and isinstance(sampling, comfy.model_sampling.CONST)
assert sampling.shift == 1.0 and sampling.multiplier == 1000 and base_model.model_type == comfy.model_base.ModelType.FLOW
fmt = base_model.latent_format
assert fmt.latent_channels == 16 and fmt.scale_factor == 1.0 and fmt.latent_dimensions == 3

# ---- the schedule: ComfyUI's "normal" on this sampling is the Flow sampler's
flow = build_sampler("Flow", model.scheduler_config)
flow.set_timesteps(STEPS)
normal = comfy.samplers.calculate_sigmas(sampling, "normal", STEPS)
figures["normal schedule vs the Flow sampler's (max abs)"] = (normal - flow.sigmas).abs().max().item()
assert torch.allclose(normal, flow.sigmas, rtol=1e-6, atol=1e-6), (normal, flow.sigmas)
assert torch.allclose(sampling.timestep(flow.sigmas[:-1]), flow.timesteps), "timestep is not 1000 sigma"

# ---- route agreement, text-to-video
pos, neg, latent = N["EasyAnimateToVideo"]().prepare(positive, negative, model, vae, SIZE, SIZE, FRAMES, 1, SEED)
assert latent["samples"].shape == (1, 16, 3, 4, 4) and pos is positive  # a T2V model: nothing added
ours = pack_sample(model, embeds, vae)
ks = ksampler(native, pos, neg, latent)
custom = cs.SamplerCustom().sample(native, True, SEED, CFG, pos, neg, comfy.samplers.sampler_object("euler"),
                                   flow.sigmas.clone(), latent)[0]["samples"]
video = decode(vae, ours)
for name, latents in (("KSampler euler normal", ks), ("SamplerCustom euler + the Flow sigmas", custom)):
    figures[f"t2v latents, {name} vs the EasyAnimate Sampler (rel)"] = rel(latents, ours)
    figures[f"t2v latents, {name} vs the EasyAnimate Sampler (max abs)"] = (latents - ours).abs().max().item()
    figures[f"t2v video, {name} vs the EasyAnimate Sampler (max abs)"] = (decode(vae, latents) - video).abs().max().item()
    assert rel(latents, ours) <= tolerance, name
    assert (decode(vae, latents) - video).abs().max().item() <= video_tolerance, name

# ---- ModelSamplingSD3 changes the shift as the Sampler's shift option does
shifted = nodes_model_advanced.ModelSamplingSD3().patch(native, 3.0)[0]
ks_shift = ksampler(shifted, pos, neg, latent)
ours_shift = pack_sample(model, embeds, vae, shift=3.0)
figures["shift 3: KSampler after ModelSamplingSD3 vs the Sampler with shift 3 (rel)"] = rel(ks_shift, ours_shift)
figures["shift 3 vs shift 1 (rel)"] = rel(ks_shift, ks)
assert rel(ks_shift, ours_shift) <= tolerance and rel(ks_shift, ks) > 1e-2

# ---- SkipLayerGuidanceDiT: ComfyUI's double-block patches reach the MMDiT blocks
slg = ksampler(result(nodes_slg.SkipLayerGuidanceDiT.execute(native, 3.0, 0.01, 0.5, "1", "", 0.0))[0], pos, neg, latent)
figures["SkipLayerGuidanceDiT block 1 vs plain (rel)"] = rel(slg, ks)
assert torch.isfinite(slg).all() and rel(slg, ks) > 1e-4

# ---- LoRA in the pack's V5.1 format: LoraLoaderModelOnly = the pack's LoRA Loader, on both routes
with_lora = ksampler(comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(native, "v51_style.safetensors", 1.0)[0], pos, neg, latent)
zero = ksampler(comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(native, "v51_style.safetensors", 0.0)[0], pos, neg, latent)
pack_lora = N["EasyAnimateLoRALoader"]().apply(model, "v51_style.safetensors", 1.0, 0.0)[0]
pack_lora_native = ksampler(N["EasyAnimateNativeModel"]().convert(pack_lora)[0], pos, neg, latent)
pack_lora_sampler = pack_sample(pack_lora, embeds, vae)
figures["LoRA 1.0 vs no LoRA (rel)"] = rel(with_lora, ks)
figures["LoraLoaderModelOnly vs the pack's LoRA Loader -> MODEL (rel)"] = rel(with_lora, pack_lora_native)
figures["LoraLoaderModelOnly vs the pack's LoRA Loader -> EasyAnimate Sampler (rel)"] = rel(with_lora, pack_lora_sampler)
assert rel(with_lora, ks) > 1e-2 and torch.equal(zero, ks), "the LoRA did not apply, or strength 0 is not the plain model"
assert rel(with_lora, pack_lora_native) <= 1e-6 and rel(with_lora, pack_lora_sampler) <= tolerance

# ---- memory: the transformer's own estimate with the prompt's text tokens, on both routes
loads = []
real_load = mm.load_models_gpu
def recording(models, memory_required=0, *args, **kwargs):
    loads.append(([m.model for m in models], memory_required, kwargs.get("minimum_memory_required")))
    return real_load(models, memory_required, *args, **kwargs)
mm.load_models_gpu = recording
ksampler(native, pos, neg, latent, steps=2); native_loads = [l for l in loads if base_model in l[0]]; loads.clear()
pack_sample(model, embeds, vae); pack_loads = [l for l in loads if base_model in l[0]]; loads.clear()
mm.load_models_gpu = real_load
shape = latent["samples"].shape
tokens = positive[0][0].shape[1]
expected = transformer.activation_bytes(2 * shape[0], *shape[2:], tokens)
assert [l[1] for l in native_loads] == [expected] and [l[1] for l in pack_loads] == [expected], (native_loads, pack_loads, expected)
assert native_loads[0][2] == transformer.activation_bytes(shape[0], *shape[2:], tokens)
figures["memory estimate (bytes; native KSampler, pack sampler)"] = [native_loads[0][1], pack_loads[0][1]]

# ---- route agreement, InP image-to-video (start + end image)
imodel, ivae, inative, iembeds, ipositive, inegative = setup("EasyAnimateV5.1-tiny-InP")
g = torch.Generator().manual_seed(5)
start, end = torch.rand(1, SIZE, SIZE, 3, generator=g), torch.rand(1, SIZE, SIZE, 3, generator=g)
ipos, ineg, ilatent = N["EasyAnimateToVideo"]().prepare(ipositive, inegative, imodel, ivae, SIZE, SIZE, FRAMES, 1, SEED,
                                                        start_image=start, end_image=end)
iours = pack_sample(imodel, iembeds, ivae, start_image=start, end_image=end)
iks = ksampler(inative, ipos, ineg, ilatent)
figures["InP i2v latents, KSampler vs the EasyAnimate Sampler (rel)"] = rel(iks, iours)
figures["InP i2v latents, KSampler vs the EasyAnimate Sampler (max abs)"] = (iks - iours).abs().max().item()
figures["InP i2v video, KSampler vs the EasyAnimate Sampler (max abs)"] = (decode(ivae, iks) - decode(ivae, iours)).abs().max().item()
assert rel(iks, iours) <= tolerance
assert (decode(ivae, iks) - decode(ivae, iours)).abs().max().item() <= video_tolerance
# text-to-video on the InP model: without To Video the conditioning channels are zeros, as To Video gives them
tpos, tneg, tlatent = N["EasyAnimateToVideo"]().prepare(ipositive, inegative, imodel, ivae, SIZE, SIZE, FRAMES, 1, SEED)
assert torch.count_nonzero(tpos[0][1]["inpaint_latents"]) == 0
assert torch.equal(ksampler(inative, tpos, tneg, tlatent, steps=3), ksampler(inative, ipositive, inegative, tlatent, steps=3))
figures["InP i2v vs t2v on the native route (rel)"] = rel(iks, ksampler(inative, tpos, tneg, tlatent))
assert figures["InP i2v vs t2v on the native route (rel)"] > 10 * tolerance, "the start and end images changed nothing"

# ---- route agreement, Control (control video + reference image) and Control-Camera (camera poses + reference)
g = torch.Generator().manual_seed(7)
control_video, reference = torch.rand(FRAMES, SIZE, SIZE, 3, generator=g), torch.rand(1, SIZE, SIZE, 3, generator=g)
for name, inputs in (("Control", dict(control_video=control_video, reference_image=reference)),
                     ("Control-Camera", dict(camera_poses=POSES, reference_image=reference))):
    cmodel, cvae, cnative, cembeds, cpositive, cnegative = setup(f"EasyAnimateV5.1-tiny-{name}")
    cpos, cneg, clatent = N["EasyAnimateToVideo"]().prepare(cpositive, cnegative, cmodel, cvae, SIZE, SIZE, FRAMES, 1,
                                                            SEED, **inputs)
    cours, cks = pack_sample(cmodel, cembeds, cvae, **inputs), ksampler(cnative, cpos, cneg, clatent)
    figures[f"{name} latents, KSampler vs the EasyAnimate Sampler (rel)"] = rel(cks, cours)
    figures[f"{name} video, KSampler vs the EasyAnimate Sampler (max abs)"] = (decode(cvae, cks) - decode(cvae, cours)).abs().max().item()
    assert rel(cks, cours) <= tolerance, name
    assert (decode(cvae, cks) - decode(cvae, cours)).abs().max().item() <= video_tolerance, name
    plain = N["EasyAnimateToVideo"]().prepare(cpositive, cnegative, cmodel, cvae, SIZE, SIZE, FRAMES, 1, SEED)
    figures[f"{name} with vs without its inputs on the native route (rel)"] = rel(cks, ksampler(cnative, *plain))
    assert figures[f"{name} with vs without its inputs on the native route (rel)"] > 10 * tolerance, name

# ---- ComfyUI's lowvram path equals a full load (plain and with the LoRA)
lora_model = comfy_nodes.LoraLoaderModelOnly().load_lora_model_only(native, "v51_style.safetensors", 1.0)[0]
full, full_lora = ksampler(native, pos, neg, latent, steps=3), ksampler(lora_model, pos, neg, latent, steps=3)
mm.unload_all_models()
mm.vram_state = mm.VRAMState.NO_VRAM
mm.is_device_cpu = lambda device: False  # the CPU stands in for a GPU
low, low_lora = ksampler(native, pos, neg, latent, steps=3), ksampler(lora_model, pos, neg, latent, steps=3)
assert base_model.model_lowvram, "the native model was not loaded on the lowvram path"
streamed = [m for m in transformer.modules() if getattr(m, "comfy_cast_weights", False)]
assert len(streamed) > 10, len(streamed)
for name, a, b in (("plain", low, full), ("LoRA", low_lora, full_lora)):
    figures[f"lowvram vs full load, {name} (rel)"] = rel(a, b)
    assert rel(a, b) <= 1e-6, (name, rel(a, b))
figures["layers cast per call on the lowvram path"] = len(streamed)
mm.unload_all_models()
print(json.dumps(figures, indent=1))
print("ok")
"""


def test_v51_on_the_native_route_agrees_with_the_pack_sampler(tmp_path):
    from safetensors.torch import load_file

    from pack_fixtures import write_lora
    from test_nodes_v51 import pose_lines
    from release_v5 import make_release_v51

    releases = tmp_path / "models" / "easyanimate"
    make_release_v51(releases / "EasyAnimateV5.1-tiny-T2V", "t2v")
    make_release_v51(releases / "EasyAnimateV5.1-tiny-InP", "inp")
    (tmp_path / "loras").mkdir()
    state = load_file(str(releases / "EasyAnimateV5.1-tiny-T2V" / "transformer" / "diffusion_pytorch_model.safetensors"))
    write_lora(tmp_path / "loras" / "v51_style.safetensors", state, seed=1)
    make_release_v51(releases / "EasyAnimateV5.1-tiny-Control", "control")
    make_release_v51(releases / "EasyAnimateV5.1-tiny-Control-Camera", "camera")
    out = run_comfyui_script(tmp_path, "native_v51.py", SCRIPT, ROOT, tmp_path, ROUTE_TOLERANCE, VIDEO_TOLERANCE,
                             pose_lines(9), timeout=1800)
    print(out[out.find("{"):])
    json.loads(out[out.find("{"):out.rfind("}") + 1])  # the figures are well formed
