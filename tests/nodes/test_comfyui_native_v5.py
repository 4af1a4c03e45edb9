"""EasyAnimate V5 (Bert + mT5 text encoders, DDPM-family sampling) on the native ComfyUI route, in a real ComfyUI,
on a tiny V5 InP release:

* The model samples discrete ε as V1-V3 do (ComfyUI's `ModelSamplingDiscrete` with the release's training table),
  and ComfyUI's "normal" scheduler on it is the pack's Euler schedule.
* Route agreement: KSampler (euler, normal) gives the EasyAnimate Sampler's Euler latents (same seed: the same start
  noise) within `ROUTE_TOLERANCE` of their largest value and its decoded video within `VIDEO_TOLERANCE`, for
  text-to-video and image-to-video from a start + end image; the conditioning carries both encoders' states (the
  mT5 states change the video).

The tolerance is the V1-V3 route's (tests/nodes/test_comfyui_native.py): the same transformer on the same inputs
in float32, with ComfyUI's Euler going through the denoised estimate where the pack's Euler steps on ε.

Runs in ComfyUI's interpreter when `COMFYUI_DIR` is set (`COMFYUI_PYTHON`, default the current one); skipped with
the reason otherwise.
"""
import pytest

from comfyui_script import COMFYUI_DIR, ROUTE_SCRIPT_START, run_comfyui_script
from conftest import ROOT

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="COMFYUI_DIR is not set: no ComfyUI to run the native route in")

ROUTE_TOLERANCE = 2e-4  # latents, relative to their largest value
VIDEO_TOLERANCE = 2e-3  # decoded pixels in [0, 1], largest absolute difference

SCRIPT = ROUTE_SCRIPT_START + r"""
SEED, STEPS, CFG, SIZE, FRAMES = 43, 10, 6.0, 32, 9
PROMPT, NEGATIVE = "a cat walks in the snow", "blurry"
figures = {}

def rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()

def decode(vae, latents):
    return N["EasyAnimateSliceVAEDecode"]().decode(vae, {"samples": latents}, "model default", 384, 0.25, False, 0)[0]

model, vae, text_encoder = N["LoadEasyAnimate"]().load("EasyAnimateV5-tiny-InP", "fp32")
assert model.family == "v5"
native = N["EasyAnimateNativeModel"]().convert(model)[0]
embeds = N["EasyAnimateV5TextEncode"]().encode(text_encoder, PROMPT, NEGATIVE)[0]
positive, negative = N["EasyAnimateV5TextEncodeConditioning"]().encode_conditioning(text_encoder, PROMPT, NEGATIVE)

# ---- discrete ε sampling; "normal" is the pack's Euler schedule
sampling = native.get_model_object("model_sampling")
assert isinstance(sampling, comfy.model_sampling.ModelSamplingDiscrete) and isinstance(sampling, comfy.model_sampling.EPS)
euler = build_sampler("Euler", model.scheduler_config)
euler.set_timesteps(STEPS)
normal = comfy.samplers.calculate_sigmas(sampling, "normal", STEPS)
figures["normal schedule vs the pack's Euler (max rel)"] = ((normal[:-1] - euler.sigmas[:-1]).abs() / euler.sigmas[:-1]).max().item()
assert torch.allclose(normal, euler.sigmas.to(normal.dtype), rtol=1e-5, atol=1e-6), (normal, euler.sigmas)

def pack_sample(**kw):
    return N["EasyAnimateSampler"]().sample(model, embeds, vae, SIZE, SIZE, FRAMES, SEED, STEPS, CFG, "Euler", 1.0,
                                            **kw)[0]["samples"]

def ksampler(pos, neg, latent):
    return comfy_nodes.KSampler().sample(native, SEED, STEPS, CFG, "euler", "normal", pos, neg, latent, 1.0)[0]["samples"]

g = torch.Generator().manual_seed(5)
start, end = torch.rand(1, SIZE, SIZE, 3, generator=g), torch.rand(1, SIZE, SIZE, 3, generator=g)
runs = {"t2v": {}, "i2v start + end": dict(start_image=start, end_image=end)}
for name, images in runs.items():
    pos, neg, latent = N["EasyAnimateToVideo"]().prepare(positive, negative, model, vae, SIZE, SIZE, FRAMES, 1, SEED,
                                                         **images)
    ours, ks = pack_sample(**images), ksampler(pos, neg, latent)
    figures[f"{name} latents, KSampler vs the EasyAnimate Sampler (rel)"] = rel(ks, ours)
    figures[f"{name} video, KSampler vs the EasyAnimate Sampler (max abs)"] = (decode(vae, ks) - decode(vae, ours)).abs().max().item()
    assert rel(ks, ours) <= tolerance, name
    assert (decode(vae, ks) - decode(vae, ours)).abs().max().item() <= video_tolerance, name
    runs[name] = ks
figures["i2v vs t2v (rel)"] = rel(runs["i2v start + end"], runs["t2v"])
assert figures["i2v vs t2v (rel)"] > 10 * tolerance, "the start and end images changed nothing"

# the mT5 states are part of the conditioning: zeroing them changes the video
assert "t5_embeds" in json.dumps(list(positive[0][1])), list(positive[0][1])
pos, neg, latent = N["EasyAnimateToVideo"]().prepare(positive, negative, model, vae, SIZE, SIZE, FRAMES, 1, SEED)
no_t5 = [[c[0], {**c[1], "t5_embeds": torch.zeros_like(c[1]["t5_embeds"])}] for c in pos]
figures["mT5 states zeroed vs kept (rel)"] = rel(ksampler(no_t5, neg, latent), runs["t2v"])
assert figures["mT5 states zeroed vs kept (rel)"] > 10 * tolerance
print(json.dumps(figures, indent=1))
print("ok")
"""


def test_v5_on_the_native_route_agrees_with_the_pack_sampler(tmp_path):
    from release_v5 import make_release_v5

    make_release_v5(tmp_path / "models" / "easyanimate" / "EasyAnimateV5-tiny-InP", "inp")
    out = run_comfyui_script(tmp_path, "native_v5.py", SCRIPT, ROOT, tmp_path, ROUTE_TOLERANCE, VIDEO_TOLERANCE)
    print(out[out.find("{"):])
