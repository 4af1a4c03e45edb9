"""CLIP image conditioning parity: our image encoder and clip_apply_ratio schedule vs the reference.

For every pipeline case that ships an `image_encoder/`, and every run in it that recorded the CLIP
inputs of the transformer (`debug.clip_encoder_hidden_states_first_step/_last_step` and the matching
masks), rebuild them: the start image resized to the video size and encoded by our CLIP encoder when
the run keeps a frame (its mask video has zeros), the classifier-free-guidance layout, and the
per-step zeroing. Sizes, step counts and guidance come from the case files.
"""
import json
import re

import pytest
import torch

from conftest import fixture_cases, fixtures_dir, load_tensors, rel_error
from easyanimate.image_encoder import clip_conditioning, clip_inputs_for_step, load_image_encoder

# A single forward pass of the image encoder (README: rel <= 1e-4 for single forward passes).
TOLERANCE = 1e-4
DEFAULT_CLIP_APPLY_RATIO = 0.5  # the reference pipeline's default


def _ratio(call: dict) -> float:
    value = call.get("clip_apply_ratio", DEFAULT_CLIP_APPLY_RATIO)
    if isinstance(value, (int, float)):
        return float(value)
    match = re.search(r"[-+]?\d*\.?\d+", str(value))  # recorded as e.g. "default 0.5"
    return float(match.group(0)) if match else DEFAULT_CLIP_APPLY_RATIO


@pytest.mark.parametrize("case", fixture_cases("pipeline", having="image_encoder"))
def test_clip_conditioning_matches_reference(case):
    case_dir = fixtures_dir() / case
    meta = json.loads((case_dir / "meta.json").read_text())
    call = meta["call"]["kwargs"]
    inputs = load_tensors(case_dir / meta.get("inputs_file", "inputs.safetensors"))
    encoder = load_image_encoder(case_dir / "image_encoder", dtype="fp32")
    guidance = float(call["guidance_scale"]) > 1
    batch_size = inputs["input.noise"].shape[0]
    ratio = _ratio(call)

    checked = []
    for run_name, run in meta["runs"].items():
        recorded = load_tensors(case_dir / run["file"])
        if "debug.clip_encoder_hidden_states_last_step" not in recorded:
            continue  # debug tensors are optional in a fixture set
        mask_video = inputs[f"input.{run_name}.mask_video_uint8"]
        height, width = inputs[f"input.{run_name}.video_x255_uint8"].shape[-2:]
        # A frame kept from the conditioning video (mask 0) means a start image, which is the CLIP image.
        image_embeds = None
        if (mask_video == 0).any():
            image_embeds = encoder.encode(inputs["input.start_image_uint8_hwc"], size=(height, width))
        conditioning = clip_conditioning(image_embeds, batch_size, guidance=guidance, dtype=torch.float32)
        num_timesteps = len(run["timesteps"])
        for step, tag in ((0, "first_step"), (num_timesteps - 1, "last_step")):
            states, mask = clip_inputs_for_step(conditioning, step, num_timesteps, ratio)
            expected_states = recorded[f"debug.clip_encoder_hidden_states_{tag}"]
            expected_mask = recorded[f"debug.clip_attention_mask_{tag}"]
            assert torch.equal(mask, expected_mask), f"{run_name} {tag}: CLIP mask differs"
            error = rel_error(states, expected_states)
            assert error <= TOLERANCE, f"{run_name} {tag}: CLIP states rel error {error:.2e} > {TOLERANCE}"
        checked.append(run_name)
    if not checked:
        pytest.skip(f"{case} records no CLIP inputs (debug tensors are optional)")
