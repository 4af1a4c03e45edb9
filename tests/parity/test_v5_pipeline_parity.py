"""V5.1 generation parity: rebuild each recorded pipeline run (text-to-video, image-to-video from a start image
and from start + end images, video-to-video, control video with and without a reference image, camera control)
through our `generate` and the VAE decode.

Every size, step count, seed and strength is read from the case files. The runs' random draws: the start noise
and the noise on the masked video's known pixels come from the run's generator, which we seed as recorded and
draw from in the reference's order (the draws are compared with the recorded ones); the one draw from torch's
global RNG (diffusers' video-to-video encode samples the posterior, where the original release takes the mode,
which is our default) is injected as `vae_noise`.
"""
import json
import re

import pytest
import torch

from conftest import fixture_cases, fixtures_dir, load_tensors, rel_error, rel_tolerance
from easyanimate.loading import load_transformer
from easyanimate.pipeline import Conditioning, conditioning_video, generate, stages_for
from easyanimate.vae import load_vae


def _seed(text: str) -> int:
    return int(re.search(r"manual_seed\((\d+)\)", text).group(1))


def _video(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.float() / 255


@pytest.mark.parametrize("case", fixture_cases("pipeline_v5"))
def test_v5_pipeline_matches_reference(case):
    case_dir = fixtures_dir() / case
    meta = json.loads((case_dir / "meta.json").read_text())
    inputs = load_tensors(case_dir / "inputs.safetensors")
    call = meta["call"]["kwargs"]
    vae = load_vae((case_dir / meta["components"]["vae"].split()[0]).resolve(), dtype="fp32")
    positive = Conditioning(inputs["input.positive_prompt_embeds"], inputs["input.positive_prompt_attention_mask"])
    negative = Conditioning(inputs["input.negative_prompt_embeds"], inputs["input.negative_prompt_attention_mask"])
    frames, height, width = call["num_frames"], call["height"], call["width"]
    checked = 0
    for run_name, run in meta["runs"].items():
        recorded = load_tensors(case_dir / run["file"])
        component = run.get("transformer") or meta["components"]["transformer"]
        transformer = load_transformer((case_dir / component.split()[0]).resolve(), dtype="fp32")
        options = dict(frames=frames, height=height, width=width, steps=call["num_inference_steps"],
                       guidance_scale=call["guidance_scale"], sampler="Flow", scheduler_config=case_dir / "scheduler",
                       generator=torch.Generator().manual_seed(_seed(run.get("generator") or call["generator"])))
        if "input.noise" in inputs:
            options["noise"] = inputs["input.noise"]
        draws = {d["key"]: d["source"] for d in run.get("random_draws", [])}
        global_draws = [recorded[k] for k in sorted(draws, key=lambda k: int(k.split(".")[1])) if draws[k] == "global"]
        if global_draws:
            options["vae_noise"] = global_draws
        if f"input.{run_name}.video_x255_uint8" in inputs:
            video, mask = _video(inputs[f"input.{run_name}.video_x255_uint8"]), inputs[f"input.{run_name}.mask_video_uint8"]
            if bool((mask == 255).all()):  # video-to-video: the whole video is redrawn
                options.update(video=video, strength=run["strength"])
            else:  # image-to-video: our conditioning video from the images equals the reference's
                start = inputs["input.start_image_uint8_hwc"].permute(2, 0, 1)[None].float() / 255
                end = inputs["input.end_image_uint8_hwc"].permute(2, 0, 1)[None].float() / 255 if "end" in run_name else None
                cond = conditioning_video(frames, height, width, start, end)
                torch.testing.assert_close(cond.video, video, rtol=0, atol=0)
                torch.testing.assert_close(cond.mask * 255, mask.float(), rtol=0, atol=0)
                options.update(start_images=start, end_images=end)
        if run.get("control_video"):
            options["control_video"] = _video(inputs["input.control_video_x255_uint8"])
        if run.get("ref_image"):
            options["reference_image"] = _video(inputs["input.ref_image_x255_uint8"])
        if run.get("control_camera_video"):
            options["control_camera"] = inputs["input.control_camera_video"]
        if "noise.0" in recorded and draws.get("noise.0") == "generator":
            # Our draws from the run's generator, in the reference's order, are the recorded ones.
            replay = torch.Generator().manual_seed(_seed(run["generator"]))
            for key in sorted(draws, key=lambda k: int(k.split(".")[1])):
                if draws[key] == "generator":
                    assert torch.equal(torch.randn(recorded[key].shape, generator=replay), recorded[key]), key

        spy = {}
        hook = transformer.register_forward_pre_hook(lambda m, a, k: spy.update(k), with_kwargs=True)
        latents = generate(transformer, vae, positive, negative, **options)
        hook.remove()
        for name in ("inpaint_latents", "control_latents"):
            if f"debug.{name}" in recorded:
                err = rel_error(spy[name], recorded[f"debug.{name}"])
                assert err <= rel_tolerance(case, "output.latents_final", run["file"]), (run_name, name, err)
        video = stages_for(transformer, vae).decode(latents, _no_placement())
        for key, ours in (("output.latents_final", latents), ("output.videos", video.permute(0, 2, 1, 3, 4))):
            err = rel_error(ours, recorded[key])
            tol = rel_tolerance(case, key, run["file"])
            print(f"{case}/{run_name} {key}: rel {err:.2e} (tolerance {tol:.0e})")
            assert err <= tol, (run_name, key, err)
        checked += 1
    assert checked == len(meta["runs"])


def _no_placement():
    from easyanimate.host import Placement, fixed_device

    return Placement(fixed_device("cpu"), {})
