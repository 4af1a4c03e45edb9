"""End-to-end generation parity: rebuild each recorded pipeline run through our API.

For every pipeline case and every run file in it: load the case's transformer and VAE with our
loaders, build the sampler from the case's `scheduler/` folder, feed the recorded embeddings, noise
and (for image-to-video) start image, inject the recorded VAE posterior draws, and compare the final
latents and the decoded video with the tolerance `index.json` gives for the run.
"""
import json
import re

import pytest
import torch

from conftest import fixture_cases, fixtures_dir, load_tensors, rel_error, rel_tolerance
from easyanimate.loading import load_transformer
from easyanimate.pipeline import Conditioning, conditioning_video, generate
from easyanimate.sampling import sampler_name_for
from easyanimate.vae import load_vae


def component(case_dir, meta, name):
    return (case_dir / meta["components"][name].split()[0]).resolve()


def runs_of(case_dir, meta):
    for run_name, run in meta["runs"].items():
        yield run_name, run, load_tensors(case_dir / run["file"])


def draws(tensors, prefix):
    keys = sorted((k for k in tensors if k.startswith(prefix)), key=lambda k: int(k.rsplit(".", 1)[1]))
    return [tensors[k] for k in keys]


@pytest.mark.parametrize("case", fixture_cases("pipeline"))
def test_pipeline_matches_reference(case):
    case_dir = fixtures_dir() / case
    meta = json.loads((case_dir / "meta.json").read_text())
    transformer = load_transformer(component(case_dir, meta, "transformer"), dtype="fp32")
    vae = load_vae(component(case_dir, meta, "vae"), dtype="fp32")
    image_encoder = None
    if (case_dir / "image_encoder").is_dir():
        from easyanimate.image_encoder import load_image_encoder

        image_encoder = load_image_encoder(case_dir / "image_encoder", dtype="fp32")
    inputs = load_tensors(case_dir / meta["inputs_file"])
    call = meta["call"]["kwargs"]
    positive = Conditioning(inputs["input.positive_prompt_embeds"], inputs["input.positive_prompt_attention_mask"])
    negative = Conditioning(inputs["input.negative_prompt_embeds"], inputs["input.negative_prompt_attention_mask"])
    global_seed = int(re.search(r"manual_seed\((\d+)\)", meta["call"]["global_rng"]).group(1))

    for run_name, run, recorded in runs_of(case_dir, meta):
        file_name = run["file"]
        start_images = None
        if f"input.{run_name}.video_x255_uint8" in inputs and run_name != "t2v":
            start = inputs["input.start_image_uint8_hwc"].permute(2, 0, 1)[None].float() / 255
            start_images = start
        if f"input.{run_name}.video_x255_uint8" in inputs:
            # Our conditioning video and mask equal what the reference's helper built.
            cond = conditioning_video(call["video_length"], call["height"], call["width"], start_images)
            torch.testing.assert_close(cond.video, inputs[f"input.{run_name}.video_x255_uint8"].float() / 255)
            torch.testing.assert_close(cond.mask, inputs[f"input.{run_name}.mask_video_uint8"].float() / 255)

        vae_draws = draws(recorded, "noise.vae_sample.") or []
        decode_draws = draws(recorded, "noise.decode.")
        n_encode = 3 if transformer.config.in_channels == 12 else 0
        # A CPU generator seeded like the reference's global RNG reproduces its recorded draws exactly.
        if vae_draws:
            g = torch.Generator().manual_seed(global_seed)
            for recorded_draw in vae_draws[:n_encode]:
                torch.testing.assert_close(torch.randn(recorded_draw.shape, generator=g), recorded_draw, rtol=0, atol=0)

        latents = generate(
            transformer, vae, positive, negative,
            frames=call["video_length"], height=call["height"], width=call["width"],
            steps=call["num_inference_steps"], guidance_scale=call["guidance_scale"],
            sampler=sampler_name_for(run["scheduler_class"]), scheduler_config=case_dir,
            noise=inputs["input.noise"], start_images=start_images, image_encoder=image_encoder,
            vae_noise=vae_draws[:n_encode],
        )
        err = rel_error(latents, recorded["output.latents_final"])
        tol = rel_tolerance(case, "output.latents_final", run_file=file_name)
        print(f"{case}/{run_name} latents_final: rel error {err:.2e} (tolerance {tol:.0e})")
        assert err <= tol, f"{case}/{run_name}: final latents rel error {err:.3e} > {tol:.1e}"

        smooth_noise = decode_draws or vae_draws[n_encode:]
        video = vae.decode_video(latents, reference_parity=True, noise=smooth_noise or None,
                                 generator=None if smooth_noise else torch.Generator())
        err = rel_error(video, recorded["output.videos"])
        tol = rel_tolerance(case, "output.videos", run_file=file_name)
        print(f"{case}/{run_name} videos: rel error {err:.2e} (tolerance {tol:.0e})")
        assert err <= tol, f"{case}/{run_name}: video rel error {err:.3e} > {tol:.1e}"
