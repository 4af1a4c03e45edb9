"""CLIP image encoder for V3 image-to-video: loading, Pillow-exact preprocessing, per-step CLIP inputs.

The image encoder is built here in the release layout (`image_encoder/` with a full-CLIP config.json,
preprocessor_config.json and a `pytorch_model.bin` pickle holding the vision and text towers), tiny
(hidden 32, 2 layers, 32 px, patch 8, projection 768), and compared with transformers'
`CLIPVisionModelWithProjection` holding the same weights.
"""
from __future__ import annotations

import argparse
import hashlib
import json

import numpy as np
import pytest
import torch

from easyanimate.errors import CheckpointMismatchError, CorruptCheckpointError, EasyAnimateError, LayoutError
from easyanimate.image_encoder import (
    CLIP_EMBED_DIM,
    CLIP_TOKENS,
    ClipPreprocessor,
    clip_conditioning,
    clip_inputs_for_step,
    clip_is_applied,
    load_image_encoder,
    resize_like_pil,
    to_uint8_images,
)

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR = {
    "crop_size": {"height": 32, "width": 32}, "do_center_crop": True, "do_convert_rgb": True,
    "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": list(MEAN),
    "image_processor_type": "CLIPImageProcessor", "image_std": list(STD), "resample": 3,
    "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": 32},
}


def _pattern(height, width):
    """A deterministic uint8 RGB test image with detail at every scale."""
    i, j, c = np.meshgrid(np.arange(height), np.arange(width), np.arange(3), indexing="ij")
    return torch.from_numpy(((i * i * 31 + j * 17 + c * 101 + i * j * 7) % 256).astype(np.uint8))


def _clip_config(projection_in_vision=True, projection_dim=CLIP_EMBED_DIM):
    from transformers import CLIPConfig

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8, hidden_act="quick_gelu")
    if projection_in_vision:
        vision["projection_dim"] = projection_dim
    text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=64, max_position_embeddings=16, projection_dim=projection_dim)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim).to_dict()


@pytest.fixture(scope="module")
def clip_weights():
    """(full-CLIP config dict, state dict of CLIPModel) with random non-zero weights."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = _clip_config()
    model = CLIPModel(CLIPConfig(**config))
    generator = torch.Generator().manual_seed(2)
    state = {}
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point():
            state[name] = torch.randn(tensor.shape, generator=generator) * 0.2 + ("norm" in name)
        else:
            state[name] = tensor.clone()
    return config, state


def _write_release(root, config, state, preprocessor=PREPROCESSOR):
    folder = root / "image_encoder"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    if preprocessor is not None:
        (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    torch.save(state, folder / "pytorch_model.bin")
    return root


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory, clip_weights):
    return _write_release(tmp_path_factory.mktemp("v3"), *clip_weights)


def _reference_vision_model(config, state, dtype=torch.float32):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**config["vision_config"]))
    vision = {k: v for k, v in state.items() if k.startswith(("vision_model.", "visual_projection."))}
    missing, _ = model.load_state_dict(vision, strict=False)
    assert not [k for k in missing if not k.endswith("position_ids")]
    return model.to(dtype).eval()


# --------------------------------------------------------------------------------------------------
# Resizing with Pillow
# --------------------------------------------------------------------------------------------------

PILLOW_MAJOR = int(__import__("PIL").__version__.split(".")[0])

# sha256 (first 16 hex digits) of Pillow's `Image.fromarray(_pattern(h, w)).resize((ow, oh), filter)`, as
# recorded with Pillow 11/12, the versions the reference ran with.
PIL_RESIZE_CASES = [
    ((7, 9), (4, 5), "bicubic", "b5d5a8a0f3f33076"),
    ((7, 9), (15, 11), "bicubic", "93b9d7743aed4c12"),
    ((20, 30), (13, 17), "bilinear", "f0ce3a5e5a8238da"),
    ((20, 30), (41, 19), "lanczos", "297bfabc52ed7d59"),
    ((32, 48), (224, 336), "bicubic", "fbad78eb55e0c74d"),
    # Pillow 13 runs the vertical pass first for this shape (Pillow 12 the horizontal one), so it rounds
    # to 8 bits at another point and some pixels differ by a few levels.
    ((11, 31), (9, 71), "bicubic", "2a36fe3f8fca2045" if PILLOW_MAJOR <= 12 else "ae4b83e6efe840bd"),
    ((5, 3), (5, 8), "bicubic", "5ed4d419e75689c2"),
]


@pytest.mark.parametrize("size, out, resample, digest", PIL_RESIZE_CASES)
def test_resize_matches_recorded_pillow_output(size, out, resample, digest):
    result = resize_like_pil(_pattern(*size)[None], *out, resample=resample)
    assert result.shape == (1, *out, 3) and result.dtype == torch.uint8
    assert hashlib.sha256(result[0].numpy().tobytes()).hexdigest()[:16] == digest


@pytest.mark.parametrize("resample, pil_filter", [("bicubic", 3), ("bilinear", 2), ("lanczos", 1)])
@pytest.mark.parametrize("size, out", [((37, 53), (64, 90)), ((64, 90), (23, 31)), ((30, 12), (9, 40)),
                                       ((12, 40), (50, 20))], ids=["up", "down", "narrow-to-wide", "wide-to-tall"])
def test_resize_equals_pillow_on_random_images(size, out, resample, pil_filter):
    from PIL import Image

    generator = np.random.default_rng(sum(size) * 1000 + sum(out))
    images = generator.integers(0, 256, (2, *size, 3), dtype=np.uint8)
    result = resize_like_pil(torch.from_numpy(images), *out, resample=resample)
    for image, ours in zip(images, result):
        expected = np.asarray(Image.fromarray(image).resize((out[1], out[0]), resample=pil_filter))
        assert np.array_equal(ours.numpy(), expected)


def test_resize_gray_images():
    from PIL import Image

    gray = _pattern(10, 14)[None, ..., :1]  # (1, H, W, 1)
    expected = np.asarray(Image.fromarray(gray[0, ..., 0].numpy()).resize((6, 5), resample=3))
    result = resize_like_pil(gray, 5, 6)
    assert result.shape == (1, 5, 6, 1) and np.array_equal(result[0, ..., 0].numpy(), expected)


def test_resize_small_case_values():
    # Red channel of Pillow's bicubic 9x7 -> 5x4 resize of the test pattern (antialiased downscale).
    expected = [[25, 60, 94, 126, 170], [94, 155, 180, 116, 109], [88, 88, 175, 180, 74], [87, 132, 104, 125, 146]]
    assert resize_like_pil(_pattern(7, 9)[None], 4, 5)[0, ..., 0].tolist() == expected


def test_resize_same_size_is_identity():
    image = _pattern(6, 10)[None]
    assert torch.equal(resize_like_pil(image, 6, 10), image)


def test_resize_bad_inputs():
    with pytest.raises(EasyAnimateError, match="filter"):
        resize_like_pil(_pattern(4, 4)[None], 2, 2, resample="nearest")
    with pytest.raises(EasyAnimateError, match="uint8"):
        resize_like_pil(_pattern(4, 4)[None].float(), 2, 2)
    with pytest.raises(EasyAnimateError, match="RGB"):
        resize_like_pil(torch.zeros(1, 4, 4, 4, dtype=torch.uint8), 2, 2)


# --------------------------------------------------------------------------------------------------
# Images in and the CLIPImageProcessor steps
# --------------------------------------------------------------------------------------------------


def test_to_uint8_images_like_the_reference_nodes():
    # ComfyUI floats become uint8 by clip(255·x) and truncation, as the reference nodes' tensor2pil.
    floats = torch.tensor([0.0, 0.999, 1.0, 1.5, -0.2, 0.5]).view(1, 1, 2, 3)
    assert to_uint8_images(floats).flatten().tolist() == [0, 254, 255, 255, 0, 127]
    gray = to_uint8_images(np.full((4, 5, 1), 7, dtype=np.uint8))
    assert gray.shape == (1, 4, 5, 3) and (gray == 7).all()
    # uint8 -> float / 255 -> back is exact, in either channel order.
    image = _pattern(6, 10)
    assert torch.equal(to_uint8_images(image.float() / 255), image[None])
    assert torch.equal(to_uint8_images(image.permute(2, 0, 1)[None].float() / 255), image[None])
    with pytest.raises(EasyAnimateError, match="RGB images"):
        to_uint8_images(torch.zeros(1, 4, 8, 8))
    with pytest.raises(EasyAnimateError, match="uint8 or float"):
        to_uint8_images(torch.zeros(8, 8, 3, dtype=torch.int32))


def _normalised(image_u8_hwc):
    pixels = (image_u8_hwc.permute(2, 0, 1).double() * (1 / 255)).float()
    return (pixels - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)


@pytest.mark.parametrize("height, width", [(24, 40), (40, 24), (32, 32), (64, 100)])
def test_preprocessor_resize_and_crop(height, width):
    processor = ClipPreprocessor(PREPROCESSOR)
    image = _pattern(height, width)
    short, long = min(height, width), max(height, width)
    resized_long = int(32 * long / short)
    resized = (32, resized_long) if height <= width else (resized_long, 32)
    assert processor.output_size(height, width) == resized
    expected = resize_like_pil(image[None], *resized)[0]
    top, left = (resized[0] - 32) // 2, (resized[1] - 32) // 2
    expected = _normalised(expected[top:top + 32, left:left + 32])
    pixels = processor(image)
    assert pixels.shape == (1, 3, 32, 32) and pixels.dtype == torch.float32
    assert torch.equal(pixels[0], expected)


def test_preprocessor_pads_when_the_crop_is_larger():
    processor = ClipPreprocessor({**PREPROCESSOR, "do_resize": False, "crop_size": {"height": 8, "width": 8}})
    image = _pattern(4, 6)
    canvas = torch.zeros(8, 8, 3, dtype=torch.uint8)
    canvas[2:6, 1:7] = image  # centred with ceil((8 - 4) / 2) rows and ceil((8 - 6) / 2) columns above/left
    assert torch.equal(processor(image)[0], _normalised(canvas))


def test_preprocessor_old_style_sizes():
    processor = ClipPreprocessor({"size": 20, "crop_size": 16})
    assert processor.output_size(30, 40) == (20, 26) and processor.crop_size == (16, 16)
    assert processor(_pattern(30, 40)).shape == (1, 3, 16, 16)
    with pytest.raises(LayoutError, match="resample"):
        ClipPreprocessor({"resample": 0})


# --------------------------------------------------------------------------------------------------
# Loading and encoding, compared with transformers' CLIPVisionModelWithProjection
# --------------------------------------------------------------------------------------------------


def test_encode_matches_transformers(release_dir, clip_weights):
    encoder = load_image_encoder(release_dir)  # the release folder; image_encoder/ is found inside
    reference = _reference_vision_model(*clip_weights)
    images = torch.stack([_pattern(24, 40), _pattern(24, 40).flip(1)])
    embeds = encoder.encode(images)
    assert embeds.shape == (2, CLIP_EMBED_DIM) and embeds.dtype == torch.float32
    with torch.no_grad():
        expected = reference(pixel_values=encoder.preprocess(images)).image_embeds
    assert torch.equal(embeds, expected)
    # size= first resizes to the video size, as the reference does with the start image.
    assert torch.equal(encoder.encode(_pattern(30, 50), size=(24, 40))[0],
                       encoder.encode(resize_like_pil(_pattern(30, 50)[None], 24, 40))[0])


def test_bf16_and_projection_from_top_level(tmp_path, clip_weights):
    config, state = clip_weights
    config = {**config, "vision_config": {k: v for k, v in config["vision_config"].items() if k != "projection_dim"}}
    encoder = load_image_encoder(_write_release(tmp_path, config, state) / "image_encoder", dtype="bf16")
    assert encoder.dtype == torch.bfloat16
    embeds = encoder.encode(_pattern(32, 32))
    assert embeds.dtype == torch.bfloat16 and embeds.shape == (1, CLIP_EMBED_DIM)
    reference = _reference_vision_model(clip_weights[0], state, torch.bfloat16)
    with torch.no_grad():
        expected = reference(pixel_values=encoder.preprocess(_pattern(32, 32)).bfloat16()).image_embeds
    assert torch.equal(embeds, expected)


def test_safetensors_vision_only_checkpoint(tmp_path, clip_weights):
    from safetensors.torch import save_file

    config, state = clip_weights
    folder = tmp_path / "image_encoder"
    folder.mkdir()
    vision_config = {**config["vision_config"], "model_type": "clip_vision_model"}
    (folder / "config.json").write_text(json.dumps(vision_config))
    vision = {k: v.contiguous() for k, v in state.items() if k.startswith(("vision_model.", "visual_projection."))}
    save_file(vision, str(folder / "model.safetensors"))
    encoder = load_image_encoder(folder)  # no preprocessor_config.json: CLIP defaults at the model's 32 px
    assert encoder.preprocess.crop_size == (32, 32) and encoder.preprocess.resample == "bicubic"
    assert encoder.encode(_pattern(16, 16)).shape == (1, CLIP_EMBED_DIM)
    (folder / "preprocessor_config.json").write_text(json.dumps({**PREPROCESSOR, "crop_size": 224}))
    with pytest.raises(LayoutError, match="do not belong together"):
        load_image_encoder(folder)


def test_bad_image_encoders(tmp_path, clip_weights):
    config, state = clip_weights
    with pytest.raises(LayoutError, match="image_encoder"):
        load_image_encoder(tmp_path)
    wrong_width = _write_release(tmp_path / "wide", _clip_config(projection_dim=512), state)
    with pytest.raises(CheckpointMismatchError, match="768"):
        load_image_encoder(wrong_width)
    pickled_object = _write_release(tmp_path / "pickle", config, {**state, "extra": argparse.Namespace(a=1)})
    with pytest.raises(CorruptCheckpointError, match="pickled Python objects"):
        load_image_encoder(pickled_object)
    truncated = _write_release(tmp_path / "cut", config, state)
    weights = truncated / "image_encoder" / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CorruptCheckpointError):
        load_image_encoder(truncated)
    text_only = _write_release(tmp_path / "text", config, {k: v for k, v in state.items() if k.startswith("text_")})
    with pytest.raises(LayoutError, match="vision"):
        load_image_encoder(text_only)
    not_clip = tmp_path / "t5" / "image_encoder"
    not_clip.mkdir(parents=True)
    (not_clip / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(LayoutError, match="CLIP"):
        load_image_encoder(not_clip)


# --------------------------------------------------------------------------------------------------
# CLIP inputs per step (docs/numerics.md#clip-apply-ratio)
# --------------------------------------------------------------------------------------------------


def test_clip_conditioning_layout():
    embeds = torch.randn(1, CLIP_EMBED_DIM)
    cond = clip_conditioning(embeds, 2, guidance=True, dtype=torch.float16)
    assert cond.states.shape == (4, CLIP_EMBED_DIM) and cond.mask.shape == (4, CLIP_TOKENS)
    assert cond.states.dtype == cond.mask.dtype == torch.float16
    # [unconditional, unconditional, positive, positive]: zeros / mask 0, then the embeds / mask 1.
    assert (cond.states[:2] == 0).all() and (cond.mask[:2] == 0).all()
    assert torch.equal(cond.states[2:], embeds.half().expand(2, -1)) and (cond.mask[2:] == 1).all()
    plain = clip_conditioning(embeds, 1, guidance=False, dtype=torch.float32)
    assert torch.equal(plain.states, embeds) and plain.mask.tolist() == [[1.0] * CLIP_TOKENS]
    # No image (text-to-video through the InP model): zeros everywhere.
    none = clip_conditioning(None, 1, guidance=True, dtype=torch.float32)
    assert none.states.shape == (2, CLIP_EMBED_DIM) and not none.states.any() and not none.mask.any()
    with pytest.raises(EasyAnimateError, match="768"):
        clip_conditioning(torch.zeros(1, 512), 1, guidance=True, dtype=torch.float32)
    with pytest.raises(EasyAnimateError, match="batch"):
        clip_conditioning(torch.zeros(3, CLIP_EMBED_DIM), 2, guidance=True, dtype=torch.float32)


@pytest.mark.parametrize("num_timesteps, ratio, first_with_clip", [
    (25, 0.5, 13),   # the reference default: steps 0-12 without, 13-24 with CLIP
    (5, 0.5, 3),     # the fixtures: steps 0-2 without
    (34, 0.5, 17),   # PNDM, 25 steps = 34 timesteps: the schedule counts timesteps
    (10, 1.0, 0),    # always
    (10, 0.0, 10),   # never
    (10, 0.3, 7),
])
def test_clip_apply_ratio_schedule(num_timesteps, ratio, first_with_clip):
    applied = [clip_is_applied(i, num_timesteps, ratio) for i in range(num_timesteps)]
    assert applied == [i >= first_with_clip for i in range(num_timesteps)]


def test_clip_inputs_for_step():
    cond = clip_conditioning(torch.ones(1, CLIP_EMBED_DIM), 1, guidance=True, dtype=torch.float32)
    early = clip_inputs_for_step(cond, 0, 5)
    assert not early.states.any() and not early.mask.any() and early.states.shape == cond.states.shape
    assert clip_inputs_for_step(cond, 4, 5) is cond
    assert clip_inputs_for_step(None, 4, 5) is None
    with pytest.raises(EasyAnimateError, match="clip_apply_ratio"):
        clip_inputs_for_step(cond, 0, 5, clip_apply_ratio=1.5)
