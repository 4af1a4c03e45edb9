"""Generation: text-, image- and video-to-video with an EasyAnimate transformer and VAE (spec §5.4).

The public Python API the nodes and the command line call:

    transformer = load_transformer(folder, dtype="bf16", device="cuda")
    vae = load_vae(folder, dtype="bf16", device="cuda")
    positive, negative = text_encoder.encode(prompt), text_encoder.encode(negative_prompt)  # Conditioning
    latents = generate(transformer, vae, positive, negative, frames=49, height=384, width=672, seed=43)
    video = vae.decode_video(latents)                                      # (B, 3, F, H, W) in [0, 1]

What happens inside `generate`, in the reference's order:
  1. check every input before any work (sizes, frame count, strength, image shapes, text width);
  2. build the conditioning video and mask: text-to-video = an empty video, everything to generate;
     image-to-video = the start image(s) on the first frames (and an end image on the last), the
     rest to generate; video-to-video = the input video, everything regenerated from `strength`;
  3. V3 InP models: encode [mask, masked video] with the VAE into the 8 `inpaint_latents` channels
     (for text-to-video too: the encodings of the all-masked video, not zeros);
  4. draw the start noise from the caller's generator; denoise with CFG as one [negative, positive]
     batch, CLIP image tokens switched on for the last `clip_apply_ratio` of the steps;
  5. return the latents (decoding is the VAE's `decode_video`, so hosts can decode in their own node).

Everything random comes from explicit generators. The reference draws its VAE posterior samples
from torch's global RNG; pass `vae_generator` (a CPU generator seeded as the reference seeded its
global RNG) to reproduce them.

Memory (outside ComfyUI): `memory=MemoryPlan(MemoryOptions(mode=...), compute="cuda")` places each model
only for its stage (VAE encode -> transformer -> VAE decode; `make_video` adds the text encoder), streams
the transformer's blocks, or uses fp8 weights; see `easyanimate.memory`. The results are those of a plain
run (fp8: close).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .errors import EasyAnimateError
from .frames import latent_size
from .image_encoder import clip_conditioning, clip_inputs_for_step, resize_like_pil, to_uint8_images
from .sampling import build_sampler, check_strength, denoise, first_step_for_strength, start_latents


@dataclass
class Conditioning:
    """Encoded prompt(s): embeddings (B, L, C) and their attention mask (B, L), 1 = real token."""

    embeds: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self):
        if self.embeds.ndim != 3 or self.mask.shape != self.embeds.shape[:2]:
            raise EasyAnimateError(
                f"Conditioning needs embeddings (batch, tokens, width) and a mask (batch, tokens); got "
                f"{tuple(self.embeds.shape)} and {tuple(self.mask.shape)}."
            )


@dataclass
class ConditioningVideo:
    """What the inpaint model is told about the clip: pixels in [0, 1] and where to generate."""

    video: torch.Tensor  # (1, 3, F, H, W) in [0, 1]
    mask: torch.Tensor  # (1, 1, F, H, W): 1 = generate, 0 = keep
    clip_image: Optional[torch.Tensor]  # (1, 3, H, W) in [0, 1], the image CLIP sees (first start image)


def _as_frames(images: torch.Tensor, height: int, width: int, what: str) -> torch.Tensor:
    """Images (N, 3, H', W') in [0, 1] -> (N, 3, height, width).

    A size change goes through 8-bit pixels and Pillow's bicubic filter, as the reference resizes its
    PIL start images; images already at the video size are used as they are.
    """
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[1] != 3:
        raise EasyAnimateError(
            f"The {what} must be RGB images shaped (count, 3, height, width) with values in [0, 1]; got "
            f"shape {tuple(images.shape)}."
        )
    images = images.float().clamp(0, 1)
    if images.shape[-2:] != (height, width):
        pixels = to_uint8_images(images.permute(0, 2, 3, 1))  # (N, H', W', 3) uint8
        images = resize_like_pil(pixels, height, width).permute(0, 3, 1, 2).float() / 255
    return images


def inpaint_pixels(cond: ConditioningVideo) -> tuple[torch.Tensor, torch.Tensor]:
    """The two videos the VAE encodes into a V3 InP model's 8 inpaint channels: the mask, encoded as an
    image in [0, 1] (not [-1, 1]; 1 = generate), and the conditioning video in [-1, 1] with the frames to
    generate set to -1."""
    mask3 = cond.mask.repeat(1, 3, 1, 1, 1)
    pixels = cond.video * 2 - 1
    return mask3, torch.where(mask3 < 0.5, pixels, torch.full_like(pixels, -1.0))


def conditioning_video(
    frames: int,
    height: int,
    width: int,
    start_images: Optional[torch.Tensor] = None,
    end_images: Optional[torch.Tensor] = None,
    video: Optional[torch.Tensor] = None,
) -> ConditioningVideo:
    """The reference's `get_image_to_video_latent` / `get_video_to_video_latent` on tensors."""
    if video is not None:
        if start_images is not None or end_images is not None:
            raise EasyAnimateError("Give either an input video (video-to-video) or start/end images, not both.")
        if video.ndim != 5 or video.shape[1] != 3:
            raise EasyAnimateError(f"The input video must be (1, 3, frames, height, width) in [0, 1]; got {tuple(video.shape)}.")
        if video.shape[2] < frames:
            raise EasyAnimateError(f"The input video has {video.shape[2]} frames; {frames} are needed.")
        clip = video[0, :, :frames].transpose(0, 1)
        pixels = _as_frames(clip, height, width, "input video").transpose(0, 1)[None]
        return ConditioningVideo(pixels, torch.ones(1, 1, frames, height, width), None)

    pixels = torch.zeros(1, 3, frames, height, width)
    mask = torch.ones(1, 1, frames, height, width)
    clip_image = None
    if start_images is not None:
        starts = _as_frames(start_images, height, width, "start image")
        if len(starts) > frames:
            raise EasyAnimateError(f"{len(starts)} start images do not fit in a {frames}-frame video.")
        pixels[:] = starts[0][None, :, None]
        pixels[0, :, : len(starts)] = starts.transpose(0, 1)
        mask[:, :, : len(starts)] = 0
        clip_image = starts[:1]
    if end_images is not None:
        if start_images is None:
            raise EasyAnimateError("An end image needs a start image (the reference conditions on both).")
        ends = _as_frames(end_images, height, width, "end image")
        pixels[0, :, frames - len(ends):] = ends.transpose(0, 1)
        mask[:, :, frames - len(ends):] = 0
    return ConditioningVideo(pixels, mask, clip_image)


def check_size(transformer, height: int, width: int) -> None:
    """Pixel sizes: multiples of 8 * patch (16); V1's 2x2 motion cells need multiples of 32."""
    unit = 8 * transformer.config.patch_size
    if any(s.get("block_size", 1) > 1 for s in transformer.config.motion_modules):
        unit *= max(s.get("block_size", 1) for s in transformer.config.motion_modules)
    if height % unit or width % unit or height <= 0 or width <= 0:
        raise EasyAnimateError(
            f"Height and width must be positive multiples of {unit} pixels for this model (got {height}x{width}); "
            f"for example {max(unit, height // unit * unit)}x{max(unit, width // unit * unit)}."
        )


def _check_text(transformer, positive: Conditioning, negative: Optional[Conditioning], guidance_scale: float):
    width = transformer.config.caption_channels
    for name, cond in (("prompt", positive), ("negative prompt", negative)):
        if cond is not None and cond.embeds.shape[-1] != width:
            raise EasyAnimateError(
                f"The {name} embeddings have width {cond.embeds.shape[-1]}, but this model expects {width} "
                "(T5-XXL for the released models); encode it with the model's T5 encoder, not a CLIP text encoder."
            )
    if guidance_scale > 1:
        if negative is None:
            raise EasyAnimateError("Guidance (cfg > 1) needs a negative prompt conditioning (it may encode an empty prompt).")
        if negative.embeds.shape[:2] != positive.embeds.shape[:2]:
            raise EasyAnimateError(
                f"Prompt and negative prompt were encoded to different shapes {tuple(positive.embeds.shape[:2])} and "
                f"{tuple(negative.embeds.shape[:2])}; encode both with the same encoder and token length."
            )


def generate(
    transformer,
    vae,
    positive: Conditioning,
    negative: Optional[Conditioning] = None,
    *,
    frames: int,
    height: int,
    width: int,
    steps: int = 25,
    guidance_scale: float = 7.0,
    sampler: str = "Euler",
    scheduler_config=None,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    noise: Optional[torch.Tensor] = None,
    start_images: Optional[torch.Tensor] = None,
    end_images: Optional[torch.Tensor] = None,
    video: Optional[torch.Tensor] = None,
    strength: float = 1.0,
    clip_image_embeds: Optional[torch.Tensor] = None,
    image_encoder=None,
    clip_apply_ratio: float = 0.5,
    vae_generator: Optional[torch.Generator] = None,
    vae_noise: Optional[Sequence[torch.Tensor]] = None,
    round_frames: bool = False,
    callback: Optional[Callable[[int, int, torch.Tensor], Optional[bool]]] = None,
    memory=None,
) -> torch.Tensor:
    """Sample latents (B, 4, F_latent, H/8, W/8), scaled as the VAE's `decode_video` expects.

    `sampler` is one of "Euler", "Euler A", "DPM++", "PNDM", "DDIM"; `scheduler_config` a release's
    folder or `scheduler/` config (None: the era's YAML defaults). Randomness: `generator` (or `seed`)
    draws the start noise and the ancestral noise; `noise` replaces the start noise draw (unit normal);
    `vae_generator` / `vae_noise` feed the VAE posterior samples (default: a generator seeded from
    `seed`). `callback(steps_done, total, latents)` runs after each step and may return False to stop
    (raises `SamplingCancelled`); nothing in the models is changed by a run, stopped or not.
    `memory`: an `easyanimate.memory.MemoryPlan` placing the VAE and the transformer per stage.
    """
    cfg = transformer.config
    rules = vae.rules
    strength = check_strength(strength)
    check_size(transformer, height, width)
    count = rules.round_frames(frames) if round_frames else rules.check_frames(frames)
    frames = count.frames
    lat_h, lat_w = latent_size(height, width)
    _check_text(transformer, positive, negative, guidance_scale)
    inpaint_model = cfg.in_channels == 12
    if (start_images is not None or end_images is not None) and not inpaint_model:
        raise EasyAnimateError(
            "Image-to-video needs an EasyAnimate V3 InP model (12 input channels); this model only does "
            "text-to-video and video-to-video."
        )
    if strength < 1 and video is None:
        raise EasyAnimateError("A denoise strength below 1 needs an input video (video-to-video).")
    if not 0 <= clip_apply_ratio <= 1:
        raise EasyAnimateError(f"clip_apply_ratio must be in [0, 1], got {clip_apply_ratio}.")
    sampler_obj = build_sampler(sampler, scheduler_config)
    sampler_obj.set_timesteps(steps)
    start = first_step_for_strength(steps, strength)
    cond = conditioning_video(frames, height, width, start_images, end_images, video)
    batch = positive.embeds.shape[0]
    shape = (batch, vae.latent_channels, count.latents, lat_h, lat_w)
    if noise is not None and tuple(noise.shape) != shape:
        raise EasyAnimateError(f"noise has shape {tuple(noise.shape)}; this run needs {shape}.")

    from .memory import MemoryPlan

    memory = memory or MemoryPlan.passive()
    device = memory.compute if memory.options.streams_weights else next(transformer.parameters()).device
    dtype = transformer.dtype
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else seed)
    if vae_generator is None and vae_noise is None:
        vae_generator = torch.Generator().manual_seed((0 if seed is None else seed) + 1)
    vae_draws = list(vae_noise) if vae_noise is not None else None

    def vae_encode(pixels):
        draw = vae_draws.pop(0) if vae_draws else None
        with memory.stage(vae.model):
            return vae.encode_latents(pixels, generator=None if draw is not None else vae_generator, noise=draw)

    pixels = cond.video * 2 - 1

    # The reference encodes the conditioning video even when only the inpaint channels use it.
    video_latents = vae_encode(pixels) if (inpaint_model or strength < 1) else None
    inpaint = None
    if inpaint_model:
        inpaint = torch.cat([vae_encode(video) for video in inpaint_pixels(cond)], dim=1)
        inpaint = inpaint.to(device, dtype).expand(batch, -1, -1, -1, -1)
        if inpaint.shape[2:] != shape[2:]:
            raise EasyAnimateError(f"Conditioning latents {tuple(inpaint.shape)} do not match the latent shape {shape}.")

    use_guidance = guidance_scale > 1
    clip = None
    if inpaint_model:
        if clip_image_embeds is None and image_encoder is not None and cond.clip_image is not None:
            with memory.stage(image_encoder.model):
                clip_image_embeds = image_encoder.encode(cond.clip_image)
        clip = clip_conditioning(clip_image_embeds, batch, guidance=use_guidance, dtype=dtype, device=device)

    if noise is None:
        noise = torch.randn(shape, generator=generator, device=generator.device, dtype=dtype)
    noise = noise.to(device, dtype)
    latents = start_latents(sampler_obj, noise, start,
                            video_latents.to(device, dtype).expand(shape) if strength < 1 else None)

    text = torch.cat([negative.embeds, positive.embeds]) if use_guidance else positive.embeds
    text_mask = torch.cat([negative.mask, positive.mask]) if use_guidance else positive.mask
    text, text_mask = text.to(device, dtype), text_mask.to(device)
    if inpaint is not None and use_guidance:
        inpaint = torch.cat([inpaint, inpaint])
    steps_run = len(sampler_obj.timesteps) - start

    def model_fn(model_input, timestep, step):
        clip_in = clip_inputs_for_step(clip, step, steps_run, clip_apply_ratio) if clip is not None else (None, None)
        with torch.no_grad():
            return transformer(model_input.to(dtype), timestep, text, text_mask, inpaint_latents=inpaint,
                               clip_encoder_hidden_states=clip_in[0], clip_attention_mask=clip_in[1])

    with memory.transformer_stage(transformer):
        return denoise(model_fn, latents, sampler_obj, guidance_scale, start_index=start, generator=generator,
                       latent_channels=vae.latent_channels, callback=callback)


# ----------------------------------------------------------------------------------------------------
# Long videos: segments, each conditioned on the last frames of the one before, cross-faded
# ----------------------------------------------------------------------------------------------------

def segment_plan(frames: int, segment: int, overlap: int, chunk: int) -> list[int]:
    """Frames of each segment of a long video, cut as the reference cuts them: full segments that
    overlap by `overlap` frames, then a last one rounded down to whole chunks of `chunk` frames."""
    plan, start = [], 0
    while start < frames:
        if start + segment >= frames:
            last = (frames - start) // chunk * chunk
            if last > 0:
                plan.append(last)
            break
        plan.append(segment)
        start += segment - overlap
    return plan


def generate_long(
    transformer,
    vae,
    positive: Conditioning,
    negative: Optional[Conditioning] = None,
    *,
    frames: int,
    height: int,
    width: int,
    segment_frames: int,
    overlap: int = 4,
    start_images: Optional[torch.Tensor] = None,
    seed: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    vae_generator: Optional[torch.Generator] = None,
    decode_options: Optional[dict] = None,
    callback: Optional[Callable[[int, int, torch.Tensor], Optional[bool]]] = None,
    **generate_options,
) -> torch.Tensor:
    """A video longer than one segment (the reference's `partial_video_length` mode), decoded, in [0, 1].

    Each segment after the first starts from the last `overlap` frames of the video so far (as start
    images, through 8-bit pixels as the reference does); the overlapping frames are cross-faded
    linearly. Needs a V3 InP model. One generator runs through all segments, so a seed gives one video.
    `generate_options` are passed to `generate` (steps, guidance_scale, sampler, image_encoder, ...).
    """
    if transformer.config.in_channels != 12:
        raise EasyAnimateError("Long videos are conditioned on earlier frames, which needs a V3 InP model (12 input channels).")
    segment = vae.rules.check_frames(segment_frames).frames
    if not 0 < overlap < segment:
        raise EasyAnimateError(f"overlap must be between 1 and segment_frames - 1 ({segment - 1}); got {overlap}.")
    plan = segment_plan(frames, segment, overlap, vae.rules.frames_per_chunk)
    seed = 0 if seed is None else seed
    generator = generator or torch.Generator().manual_seed(seed)
    vae_generator = vae_generator or torch.Generator().manual_seed(seed + 1)
    steps = generate_options.get("steps", 25)
    total = steps * len(plan)

    video, images = None, start_images
    for index, length in enumerate(plan):
        def segment_progress(done, _total, latents, offset=index * steps):
            return callback(offset + done, total, latents) if callback else None

        latents = generate(transformer, vae, positive, negative, frames=length, height=height, width=width,
                           start_images=images, generator=generator, vae_generator=vae_generator,
                           callback=segment_progress, **generate_options)
        part = vae.decode_video(latents, generator=vae_generator, **(decode_options or {})).cpu()
        if video is None:
            video = part
        else:
            mix = (torch.arange(overlap, dtype=torch.float32) / overlap).view(1, 1, overlap, 1, 1)
            video[:, :, -overlap:] = video[:, :, -overlap:] * (1 - mix) + part[:, :, :overlap] * mix
            video = torch.cat([video, part[:, :, overlap:]], dim=2)
        images = ((video[0, :, -overlap:] * 255).to(torch.uint8).float() / 255).transpose(0, 1)
    return video


# ----------------------------------------------------------------------------------------------------
# A whole release in one object, and prompt -> video in one call (what the command line uses)
# ----------------------------------------------------------------------------------------------------

@dataclass
class EasyAnimateModel:
    """The parts of one EasyAnimate release, loaded."""

    family: str
    transformer: object
    vae: object
    text_encoder: object = None
    image_encoder: object = None
    scheduler_config: Optional[object] = None  # the release's scheduler/ folder, when it has one


def load_model(path, *, dtype="bf16", device="cpu", text_encoder: bool = True, image_encoder: bool = True,
               motion_module=None, personalized=None) -> EasyAnimateModel:
    """Load a release folder (transformer/, vae/, text_encoder/ + tokenizer/, image_encoder/, scheduler/)."""
    from pathlib import Path

    from .loading import load_transformer
    from .vae import load_vae

    root = Path(path)
    transformer = load_transformer(root, dtype=dtype, device=device, motion_module=motion_module, personalized=personalized)
    vae = load_vae(root, dtype=dtype, device=device)
    encoder = None
    if text_encoder:
        from .text import load_text_encoder

        if not (root / "text_encoder").is_dir():
            raise EasyAnimateError(
                f"'{root}' has no text_encoder/ folder; load the T5 encoder separately (load_text_encoder) "
                "or pass text_encoder=False and encode prompts yourself."
            )
        encoder = load_text_encoder(root, dtype=dtype, device=device)
    clip = None
    if image_encoder and transformer.config.has_clip_projection and (root / "image_encoder").is_dir():
        from .image_encoder import load_image_encoder

        clip = load_image_encoder(root, dtype=dtype, device=device)
    scheduler = root / "scheduler" if (root / "scheduler" / "scheduler_config.json").is_file() else None
    return EasyAnimateModel(transformer.config.family, transformer, vae, encoder, clip, scheduler)


def make_video(
    model: EasyAnimateModel,
    prompt: str,
    negative_prompt: str = "",
    *,
    frames: int,
    height: int,
    width: int,
    clean_caption: bool = True,
    smooth: bool = False,
    tiling=None,
    memory=None,
    **generate_options,
) -> torch.Tensor:
    """Prompt (and optional start/end images or input video) -> video (1, 3, F, H, W) in [0, 1], on the CPU.

    `memory`: an `easyanimate.memory.MemoryPlan` (after `memory.place_model(model)`): each model is placed
    for its stage only, and a budget also picks the VAE's tile size."""
    from .memory import MemoryPlan

    memory = memory or MemoryPlan.passive()
    if model.text_encoder is None:
        raise EasyAnimateError("This model was loaded without its text encoder; encode prompts and call generate().")
    with memory.stage(model.text_encoder.model):
        text = model.text_encoder.encode([prompt], [negative_prompt], clean_caption=clean_caption)
    positive = Conditioning(text.embeds, text.mask)
    negative = Conditioning(text.negative_embeds, text.negative_mask)
    generate_options.setdefault("scheduler_config", model.scheduler_config)
    if model.image_encoder is not None:
        generate_options.setdefault("image_encoder", model.image_encoder)
    seed = generate_options.get("seed")
    latents = generate(model.transformer, model.vae, positive, negative, frames=frames, height=height, width=width,
                       memory=memory, **generate_options)
    decode_generator = torch.Generator().manual_seed((0 if seed is None else seed) + 2) if smooth else None
    with memory.stage(model.vae.model):
        return model.vae.decode_video(latents, smooth=smooth, generator=decode_generator, tiling=tiling,
                                      memory_budget=memory.options.budget_bytes if tiling is None else None,
                                      out_device="cpu")
