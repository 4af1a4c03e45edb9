"""CLIP image conditioning for EasyAnimate V3 image-to-video.

The V3 InP transformer takes, besides the text, one 768-d CLIP image embedding of the start image,
projected inside the DiT to 8 extra context tokens with their own 8-entry attention mask. This module:

* loads the release's `image_encoder/` (config.json, preprocessor_config.json, and `pytorch_model.bin`
  read with `torch.load(weights_only=True)`, or `model.safetensors`) as transformers'
  `CLIPVisionModelWithProjection`, built on the `meta` device and filled in the requested dtype;
* preprocesses images exactly as the reference's `CLIPImageProcessor` does (resize the shortest side
  with Pillow's bicubic filter, center crop, rescale, normalise) on uint8 tensors; the resizing is
  Pillow's own `Image.resize`, through `resize_like_pil`, which the pipeline also uses for the
  reference's other `Image.resize` calls (start/end images to the video size);
* lays out the CLIP inputs per denoising step: `clip_conditioning` builds the classifier-free-guidance
  batch ([zeros, embeds] with masks [0, 1]), `clip_inputs_for_step` zeroes states and masks for the
  first steps as `clip_apply_ratio` asks (steps i < num_timesteps · (1 − ratio)).

transformers is imported inside the functions that need it, so importing this module is cheap.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import NamedTuple

import torch

from .checkpoint import assign_tensors, describe_keys, iter_file, meta_tensors, parse_dtype, read_json_config, weight_files
from .errors import CheckpointMismatchError, EasyAnimateError, LayoutError

logger = logging.getLogger(__name__)

# The V3 transformer's `clip_projection` takes 768-d embeddings (CLIP ViT-L/14's projection width)
# and turns them into this many context tokens; the CLIP attention mask has one entry per token.
CLIP_EMBED_DIM = 768
CLIP_TOKENS = 8

# CLIPImageProcessor defaults (also what the release's preprocessor_config.json says).
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_PIL_RESAMPLE_NAMES = {1: "lanczos", 2: "bilinear", 3: "bicubic"}


# ==================================================================================================
# Images in, uint8 out
# ==================================================================================================


def to_uint8_images(images) -> torch.Tensor:
    """Images as uint8 (B, H, W, C) with C = 3 (RGB).

    Accepts arrays/tensors (H, W, C) or (B, H, W, C) (ComfyUI's layout), or channels-first (C, H, W) /
    (B, C, H, W) (torch's; recognised when the last axis is not 1 or 3 long). uint8 values are used
    as they are; floats in [0, 1] are converted the way the reference ComfyUI nodes convert them to
    PIL, `uint8(clip(255 · x, 0, 255))` (truncating; exact for values that came from uint8 / 255).
    Grayscale (C = 1) is repeated to RGB.
    """
    if not isinstance(images, torch.Tensor):
        import numpy as np

        images = torch.from_numpy(np.ascontiguousarray(np.asarray(images)))
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() == 4 and images.shape[-1] not in (1, 3) and images.shape[1] in (1, 3):
        images = images.movedim(1, -1)  # channels first -> channels last
    if images.dim() != 4 or images.shape[-1] not in (1, 3):
        raise EasyAnimateError(
            f"Expected RGB images of shape (B, H, W, 3) or (B, 3, H, W), got {tuple(images.shape)}."
        )
    if images.dtype != torch.uint8:
        if not images.is_floating_point():
            raise EasyAnimateError(f"Images must be uint8 or float in [0, 1], got {images.dtype}.")
        images = (images.to(torch.float32) * 255.0).clamp(0, 255).to(torch.uint8)
    if images.shape[-1] == 1:
        images = images.expand(-1, -1, -1, 3)
    return images.cpu()


# ==================================================================================================
# Resizing with Pillow
# ==================================================================================================

# Pillow's numbers of the filters the reference's images are resized with.
_PIL_RESAMPLE_CODES = {name: code for code, name in _PIL_RESAMPLE_NAMES.items()}


def resize_like_pil(images: torch.Tensor, height: int, width: int, resample: str = "bicubic") -> torch.Tensor:
    """Resize uint8 (B, H, W, C) images (C = 3 RGB, or 1) with Pillow's `Image.resize((width, height),
    resample)`, one image at a time, as the reference resizes its PIL images.

    `resample` is "bicubic" (Pillow's default), "bilinear" or "lanczos". The result is whatever the
    installed Pillow computes: Pillow 13 runs the vertical pass first for some sizes where Pillow 12
    and earlier always ran the horizontal one first, which moves some pixels by a few levels.
    """
    if resample not in _PIL_RESAMPLE_CODES:
        raise EasyAnimateError(
            f"Unsupported resample filter '{resample}'; use one of {sorted(_PIL_RESAMPLE_CODES)}."
        )
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] not in (1, 3):
        raise EasyAnimateError(
            f"resize_like_pil takes uint8 (B, H, W, 3) RGB or (B, H, W, 1) gray images, got {images.dtype} "
            f"{tuple(images.shape)}."
        )
    if height < 1 or width < 1:
        raise EasyAnimateError(f"Cannot resize to {height}x{width}.")
    if tuple(images.shape[1:3]) == (height, width):
        return images  # Pillow returns an unchanged copy
    import numpy as np
    from PIL import Image

    resized = []
    for image in images.cpu().numpy():
        # A single channel becomes a gray ("L") image; Pillow would read (H, W, 1) as nothing it knows.
        picture = Image.fromarray(np.ascontiguousarray(image[..., 0] if image.shape[-1] == 1 else image))
        pixels = np.asarray(picture.resize((width, height), resample=_PIL_RESAMPLE_CODES[resample]))
        resized.append(pixels.reshape(height, width, image.shape[-1]))
    return torch.from_numpy(np.stack(resized))


# ==================================================================================================
# CLIPImageProcessor
# ==================================================================================================


class ClipPreprocessor:
    """The reference's `CLIPImageProcessor` (preprocessor_config.json), on uint8 (B, H, W, 3) tensors.

    Steps, as transformers does them: resize (shortest side to `size`, the other side scaled and
    truncated to an integer, Pillow filter `resample`), center crop to `crop_size` (zero padding if the
    image is smaller), multiply by `rescale_factor` in float64 then cast to float32, normalise with
    `image_mean`/`image_std` in float32. Returns float32 (B, 3, crop_h, crop_w).
    """

    def __init__(self, config: dict | None = None):
        config = dict(config or {})
        self.do_resize = bool(config.get("do_resize", True))
        self.do_center_crop = bool(config.get("do_center_crop", True))
        self.do_rescale = bool(config.get("do_rescale", True))
        self.do_normalize = bool(config.get("do_normalize", True))
        self.rescale_factor = float(config.get("rescale_factor", 1 / 255))
        self.mean = tuple(float(v) for v in config.get("image_mean", _CLIP_MEAN))
        self.std = tuple(float(v) for v in config.get("image_std", _CLIP_STD))
        resample = config.get("resample", 3)
        if resample not in _PIL_RESAMPLE_NAMES:
            raise LayoutError(
                f"preprocessor_config.json asks for Pillow resample filter {resample}; supported: "
                f"{_PIL_RESAMPLE_NAMES} (the CLIP default is 3, bicubic)."
            )
        self.resample = _PIL_RESAMPLE_NAMES[resample]
        size = config.get("size", {"shortest_edge": 224})
        if isinstance(size, int):  # old configs: a bare number is the shortest edge
            size = {"shortest_edge": size}
        self.shortest_edge = size.get("shortest_edge")
        self.resize_to = None if self.shortest_edge else (int(size["height"]), int(size["width"]))
        crop = config.get("crop_size", {"height": 224, "width": 224})
        self.crop_size = (crop, crop) if isinstance(crop, int) else (int(crop["height"]), int(crop["width"]))

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Size after the resize step (transformers' `get_resize_output_image_size`)."""
        if self.resize_to is not None:
            return self.resize_to
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        images = to_uint8_images(images)
        if self.do_resize:
            images = resize_like_pil(images, *self.output_size(images.shape[1], images.shape[2]), self.resample)
        if self.do_center_crop:
            images = _center_crop(images, *self.crop_size)
        pixels = images.movedim(-1, 1)  # (B, 3, H, W)
        if self.do_rescale:
            pixels = (pixels.to(torch.float64) * self.rescale_factor).to(torch.float32)
        else:
            pixels = pixels.to(torch.float32)
        if self.do_normalize:
            mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
            pixels = (pixels - mean) / std
        return pixels.contiguous()


def _center_crop(images: torch.Tensor, crop_height: int, crop_width: int) -> torch.Tensor:
    """transformers' `center_crop` on (B, H, W, C): offsets (size − crop) // 2; zero-pad if too small."""
    height, width = images.shape[1], images.shape[2]
    if crop_height > height or crop_width > width:
        padded = images.new_zeros((images.shape[0], max(height, crop_height), max(width, crop_width), images.shape[3]))
        top_pad = math.ceil((padded.shape[1] - height) / 2)
        left_pad = math.ceil((padded.shape[2] - width) / 2)
        padded[:, top_pad:top_pad + height, left_pad:left_pad + width] = images
        top = (height - crop_height) // 2 + top_pad
        left = (width - crop_width) // 2 + left_pad
        return padded[:, max(0, top):top + crop_height, max(0, left):left + crop_width]
    top = (height - crop_height) // 2
    left = (width - crop_width) // 2
    return images[:, top:top + crop_height, left:left + crop_width]


# ==================================================================================================
# The image encoder
# ==================================================================================================


class ClipImageEncoder:
    """transformers' CLIPVisionModelWithProjection plus the reference preprocessing."""

    def __init__(self, model: torch.nn.Module, preprocessor: ClipPreprocessor, source: str = ""):
        self.model = model
        self.preprocess = preprocessor
        self.source = source

    @property
    def dtype(self) -> torch.dtype:
        return self.model.visual_projection.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.visual_projection.weight.device

    def to(self, device) -> "ClipImageEncoder":
        self.model.to(device)
        return self

    def encode(self, images, size: tuple[int, int] | None = None) -> torch.Tensor:
        """`image_embeds` (B, 768) of the images, in the encoder's dtype, on the CPU (not normalised).

        `images` as `to_uint8_images` accepts them. The reference resizes the start image to the video
        size (Pillow bicubic) before CLIP sees it; pass `size=(height, width)` to do that here too.
        """
        images = to_uint8_images(images)
        if size is not None:
            images = resize_like_pil(images, int(size[0]), int(size[1]))
        pixel_values = self.preprocess(images).to(device=self.device, dtype=self.dtype)
        with torch.no_grad():
            embeds = self.model(pixel_values=pixel_values).image_embeds
        return embeds.cpu()


def load_image_encoder(
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
) -> ClipImageEncoder:
    """Load a V3 release's CLIP image encoder: the release folder or its `image_encoder/` folder."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    dtype = parse_dtype(dtype)
    path = Path(path)
    folder = path / "image_encoder" if (path / "image_encoder").is_dir() else path
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise LayoutError(
            f"No CLIP image encoder at '{path}': expected an image_encoder/ folder with config.json. Only "
            "EasyAnimate V3 InP releases have one (it is needed for image-to-video)."
        )
    config = _vision_config(read_json_config(config_file, what="image encoder config"), config_file, CLIPVisionConfig)
    if config.projection_dim != CLIP_EMBED_DIM:
        raise CheckpointMismatchError(
            f"'{config_file}': this CLIP gives {config.projection_dim}-d image embeddings, but EasyAnimate V3 "
            f"takes {CLIP_EMBED_DIM}-d ones (CLIP ViT-L/14). Use the release's own image_encoder/."
        )
    processor_file = folder / "preprocessor_config.json"
    if processor_file.is_file():
        preprocessor = ClipPreprocessor(read_json_config(processor_file, what="image preprocessor config"))
    else:
        # CLIPImageProcessor's defaults, at the model's own resolution (224 px for the released ViT-L/14).
        side = config.image_size
        logger.warning("'%s' has no preprocessor_config.json; using the CLIP defaults at %d px.", folder, side)
        preprocessor = ClipPreprocessor({"size": {"shortest_edge": side}, "crop_size": {"height": side, "width": side}})
    if preprocessor.do_center_crop and preprocessor.crop_size != (config.image_size, config.image_size):
        raise LayoutError(
            f"'{processor_file}' crops images to {preprocessor.crop_size}, but the CLIP model in '{folder}' takes "
            f"{config.image_size}x{config.image_size} px. The two files do not belong together."
        )

    with torch.device("meta"):
        model = CLIPVisionModelWithProjection(config)

    def rename(key: str) -> str | None:
        # A full CLIP checkpoint also holds the text tower; only the vision tower and its projection
        # are used. Position ids are recomputed below rather than trusted from old files.
        if key.startswith(("vision_model.", "visual_projection.")) and not key.endswith("position_ids"):
            return key
        return None

    def file_tensors():
        for weights in weight_files(folder, stem="model"):
            yield from iter_file(weights)

    assigned, _ = assign_tensors(model, file_tensors(), dtype=dtype, device=device, rename=rename, source=str(folder))
    position_ids = [
        (name, torch.arange(buffer.shape[-1]).expand(buffer.shape).contiguous())
        for name, buffer in model.named_buffers() if name.endswith("position_ids")
    ]
    assign_tensors(model, position_ids, dtype=None, device=device)
    if not any(k.startswith("vision_model.") for k in assigned):
        raise LayoutError(
            f"'{folder}' holds no CLIP vision weights (no 'vision_model.*' tensors); it is not a "
            "transformers CLIP checkpoint."
        )
    missing = meta_tensors(model)
    if missing:
        raise CheckpointMismatchError(
            f"'{folder}': the CLIP image encoder is incomplete, missing {describe_keys(missing)}. Re-download it."
        )
    return ClipImageEncoder(model.eval().requires_grad_(False), preprocessor, source=str(folder))


def _vision_config(config: dict, config_file: Path, config_class):
    """The vision config from a `clip_vision_model` config or from a full `clip` config (as released)."""
    model_type = config.get("model_type")
    if model_type == "clip":
        vision = dict(config.get("vision_config") or {})
        # The vision tower's projection width may only be given at the top level.
        vision.setdefault("projection_dim", config.get("projection_dim", CLIP_EMBED_DIM))
        return config_class.from_dict(vision)
    if model_type == "clip_vision_model":
        return config_class.from_dict(config)
    raise LayoutError(
        f"'{config_file}' describes a '{model_type}' model, not a CLIP vision model. Use the image_encoder/ "
        "folder of an EasyAnimate V3 InP release."
    )


# ==================================================================================================
# CLIP inputs per denoising step
# ==================================================================================================


class ClipConditioning(NamedTuple):
    """CLIP inputs of the transformer: states (N, 768) and mask (N, 8), N = the model batch."""

    states: torch.Tensor
    mask: torch.Tensor


def clip_conditioning(
    image_embeds: torch.Tensor | None,
    batch_size: int,
    *,
    guidance: bool,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> ClipConditioning:
    """The CLIP states and mask for the whole sampling run, before the per-step `clip_apply_ratio`.

    With an image: the positive half gets the embeddings and mask ones, the unconditional half (with
    guidance, first in the batch as in [negative, positive]) zeros and mask zeros. Without an image
    (text-to-video through the InP model): zeros and mask zeros for every row. One embedding is
    repeated for every prompt of the batch.
    """
    rows = 2 * batch_size if guidance else batch_size
    if image_embeds is None:
        return ClipConditioning(
            torch.zeros(rows, CLIP_EMBED_DIM, dtype=dtype, device=device),
            torch.zeros(rows, CLIP_TOKENS, dtype=dtype, device=device),
        )
    if image_embeds.dim() != 2 or image_embeds.shape[-1] != CLIP_EMBED_DIM:
        raise EasyAnimateError(
            f"CLIP image embeddings must be (B, {CLIP_EMBED_DIM}), got {tuple(image_embeds.shape)}."
        )
    if image_embeds.shape[0] == 1:
        image_embeds = image_embeds.expand(batch_size, -1)
    if image_embeds.shape[0] != batch_size:
        raise EasyAnimateError(
            f"Got {image_embeds.shape[0]} CLIP image embeddings for a batch of {batch_size}; give one, or one per prompt."
        )
    states = image_embeds.to(device=device, dtype=dtype)
    mask = torch.ones(batch_size, CLIP_TOKENS, dtype=dtype, device=device)
    if guidance:
        states = torch.cat([torch.zeros_like(states), states])
        mask = torch.cat([torch.zeros_like(mask), mask])
    return ClipConditioning(states.contiguous(), mask)


def clip_is_applied(step_index: int, num_timesteps: int, clip_apply_ratio: float = 0.5) -> bool:
    """Whether step `step_index` (0-based) sees the CLIP image, per the reference's schedule.

    The reference zeroes the CLIP states and masks while `i < len(timesteps) · (1 − clip_apply_ratio)`:
    with the default ratio 0.5 and 25 steps, steps 0–12 run without and 13–24 with the image.
    `num_timesteps` is the length of the scheduler's timestep list (PNDM's is longer than its steps).
    """
    if not 0.0 <= clip_apply_ratio <= 1.0:
        raise EasyAnimateError(f"clip_apply_ratio must be in [0, 1], got {clip_apply_ratio}.")
    return not step_index < num_timesteps * (1 - clip_apply_ratio)


def clip_inputs_for_step(
    conditioning: ClipConditioning | None, step_index: int, num_timesteps: int, clip_apply_ratio: float = 0.5
) -> ClipConditioning | None:
    """The CLIP inputs for one step: `conditioning` itself, or all zeros (states and mask) before the
    image is applied. None (a model without CLIP input) stays None."""
    if conditioning is None:
        return None
    if clip_is_applied(step_index, num_timesteps, clip_apply_ratio):
        return conditioning
    return ClipConditioning(torch.zeros_like(conditioning.states), torch.zeros_like(conditioning.mask))
