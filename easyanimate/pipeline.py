"""Generation: prompts to video in four named stages, the public Python API the nodes and the command line call.

    1. prepare text         prompts -> `Conditioning` (positive, negative)             `stages.prepare_text`
    2. prepare latents      a checked `VideoRequest` -> `Denoising`: the sampler, the   `stages.prepare_latents`
                            start latents and everything the model sees besides them
    3. denoise              `Denoising` -> latents: the sampler's loop with guidance   `stages.denoise`
    4. decode               latents -> video (B, 3, F, H, W) in [0, 1]                 `stages.decode`

A model family implements the four stages (`DiTStages`: EasyAnimate V1, V2 and V3); `generate`,
`generate_long` and `make_video` run them in order, so a new family adds its own stages instead of
branches here. Every input is checked (`stages.request`) before any model runs.

Each stage runs its model inside `placement.stage(kind, memory_required)`: a host (see `easyanimate.host`)
puts the model on its compute device for that stage, knowing the stage's activation estimate; without a
placement the models stay where they are. Everything random comes from explicit generators:
`generator` (or `seed`) draws the start noise and each step's noise; the VAE posterior samples come
from `vae_generator` (default: seeded with seed + 1), since the reference draws them from torch's global
RNG (pass a CPU generator seeded as the reference seeded its global RNG to reproduce them).

    transformer = load_transformer(folder, dtype="bf16", device="cuda")
    vae = load_vae(folder, dtype="bf16", device="cuda")
    latents = generate(transformer, vae, positive, negative, frames=48, height=384, width=672, seed=43)
    video = vae.decode_video(latents)                               # (B, 3, F, H, W) in [0, 1]
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .errors import EasyAnimateError, check_finite, check_seed
from .frames import SPATIAL_FACTOR, latent_size
from .host import MemoryEstimate, Placement
from .image_encoder import ClipConditioning, clip_conditioning, clip_inputs_for_step, resize_like_pil, to_uint8_images
from .sampling import (
    Sampler, build_sampler, check_sampler_for_family, check_strength, denoise, first_step_for_strength, start_latents,
)

ProgressFn = Callable[[int, int, torch.Tensor], Optional[bool]]


@dataclass
class Conditioning:
    """Encoded prompt(s): embeddings (B, L, C) and their attention mask (B, L), 1 = real token. EasyAnimate V5
    encodes each prompt twice: Bert states in `embeds`, mT5 states in `t5_embeds` (with `t5_mask`)."""

    embeds: torch.Tensor
    mask: torch.Tensor
    t5_embeds: Optional[torch.Tensor] = None
    t5_mask: Optional[torch.Tensor] = None

    def __post_init__(self):
        pairs = [("prompt", self.embeds, self.mask)]
        if self.t5_embeds is not None or self.t5_mask is not None:
            pairs.append(("mT5 prompt", self.t5_embeds, self.t5_mask))
        for what, embeds, mask in pairs:
            if embeds is None or mask is None or embeds.ndim != 3 or mask.shape != embeds.shape[:2] \
                    or embeds.shape[0] != self.embeds.shape[0]:
                raise EasyAnimateError(
                    f"Conditioning needs {what} embeddings (batch, tokens, width) and a mask (batch, tokens); got "
                    f"{None if embeds is None else tuple(embeds.shape)} and {None if mask is None else tuple(mask.shape)}."
                )
            check_finite(embeds, f"{what} embedding")


# ----------------------------------------------------------------------------------------------------
# The conditioning video: what an inpaint model is told about the clip
# ----------------------------------------------------------------------------------------------------

@dataclass
class ConditioningVideo:
    """Pixels in [0, 1] and where to generate."""

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
    check_finite(images, what)
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
    """Pixel sizes: multiples of the VAE's factor times the patch (8 x 2 = 16); V1's 2x2 motion cells need
    multiples of 32."""
    patch = transformer.config.patch_size
    unit, why = SPATIAL_FACTOR * patch, f"the VAE's {SPATIAL_FACTOR}x downsampling times {patch}x{patch} patches"
    motion = getattr(transformer.config, "motion_modules", ())
    if any(s.get("block_size", 1) > 1 for s in motion):
        cells = max(s.get("block_size", 1) for s in motion)
        unit, why = unit * cells, why + f" times {cells}x{cells} motion cells"
    check_pixel_size(height, width, unit, getattr(transformer.config, "name", "this model"), why)


def nearest_multiples(value: int, unit: int) -> tuple[int, ...]:
    """The multiples of `unit` nearest to `value`, at least `unit`: (value,) when it is one, else the one
    below (if any) and the one above."""
    below, above = value // unit * unit, -(-value // unit) * unit
    return tuple(v for v in dict.fromkeys((below, above)) if v >= unit) or (unit,)


def check_pixel_size(height, width, unit: int, model: str = "this model",
                     why: str = f"the VAE's {SPATIAL_FACTOR}x downsampling times 2x2 patches") -> None:
    """Refuse a height or width that is not a positive multiple of `unit` pixels (`why`), naming the nearest
    valid sizes."""
    whole = [isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in (height, width)]
    if all(whole) and height % unit == 0 and width % unit == 0:
        return
    if not all(whole):
        raise EasyAnimateError(f"Height and width must be positive whole numbers of pixels; got {height!r}x{width!r}.")
    options = [f"{h}x{w}" for h in nearest_multiples(height, unit) for w in nearest_multiples(width, unit)]
    raise EasyAnimateError(
        f"Height and width must be positive multiples of {unit} pixels for {model} ({why}); got {height}x{width}. "
        f"The nearest valid sizes: {', '.join(options)}."
    )


# ----------------------------------------------------------------------------------------------------
# What the stages hand each other
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VideoRequest:
    """What the caller asked for, checked against the models (stage `request`)."""

    frames: int
    latent_frames: int
    height: int
    width: int
    steps: int
    guidance_scale: float
    sampler: str
    scheduler_config: object
    strength: float
    start_images: Optional[torch.Tensor]
    end_images: Optional[torch.Tensor]
    video: Optional[torch.Tensor]
    clip_apply_ratio: float
    control_video: Optional[torch.Tensor] = None  # V5/V5.1 Control models
    reference_image: Optional[torch.Tensor] = None  # V5.1 Control / Control-Camera models
    control_camera: Optional[torch.Tensor] = None  # V5.1 Control-Camera: Plücker rays (1, 6, F, H, W)
    teacache: Optional[object] = None  # V5/V5.1: `teacache.TeaCache` settings with the model's coefficients

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1

    @property
    def latent_hw(self) -> tuple[int, int]:
        return latent_size(self.height, self.width)


@dataclass
class ModelInputs:
    """What the transformer sees at every step besides the latents and the timestep, for the whole
    model batch ([negative, positive] rows with guidance)."""

    text: torch.Tensor
    text_mask: torch.Tensor
    inpaint: Optional[torch.Tensor] = None  # InP: [mask latents, masked-video latents] (V3 8, V5/V5.1 17 channels)
    clip: Optional[ClipConditioning] = None  # V3 InP: CLIP image states and mask
    clip_apply_ratio: float = 0.5
    control: Optional[torch.Tensor] = None  # V5/V5.1 Control models: control (and reference) latents
    t5: Optional[torch.Tensor] = None  # V5: the mT5 text states (the Bert ones are `text`)

    def for_step(self, step: int, steps_run: int) -> dict:
        clip = clip_inputs_for_step(self.clip, step, steps_run, self.clip_apply_ratio)
        return dict(inpaint_latents=self.inpaint,
                    clip_encoder_hidden_states=None if clip is None else clip.states,
                    clip_attention_mask=None if clip is None else clip.mask)


@dataclass
class Denoising:
    """Everything the denoising loop needs (stage `prepare_latents` -> stage `denoise`)."""

    sampler: Sampler
    start_index: int
    latents: torch.Tensor  # where the loop starts, on the compute device
    inputs: ModelInputs
    guidance_scale: float
    generator: torch.Generator
    latent_channels: int
    memory_required: int  # activation estimate of one transformer call on the model batch
    teacache: Optional[object] = None  # V5/V5.1: `teacache.TeaCache` settings, or None


def check_guidance_text(request: VideoRequest, positive: Conditioning, negative: Optional[Conditioning]) -> None:
    """Guidance needs a negative prompt encoded like the prompt."""
    if not request.guided:
        return
    if negative is None:
        raise EasyAnimateError("Guidance (cfg > 1) needs a negative prompt conditioning (it may encode an empty prompt).")
    if negative.embeds.shape[:2] != positive.embeds.shape[:2]:
        raise EasyAnimateError(
            f"Prompt and negative prompt were encoded to different shapes {tuple(positive.embeds.shape[:2])} and "
            f"{tuple(negative.embeds.shape[:2])}; encode both with the same encoder and token length."
        )


def request_memory(request: VideoRequest, shape: tuple, vae, in_channels: int, activations: int, one_row: int, *,
                   encodes: bool, conditioning_planes: int, budget: Optional[int]) -> MemoryEstimate:
    """What a request needs beyond the weights, from the models' own estimates: on the compute device the
    larger of the denoising stage (latents, the guidance batch with its conditioning channels, the
    transformer's `activations`, chunked under `budget`) and the VAE stages (one slice, tiled under `budget`);
    in RAM the conditioning pixels (`conditioning_planes` float32 planes of the video) or the decoded video,
    whichever phase is larger. `one_row`: the transformer's activations for one model row, the least any
    chunking can reach."""
    from .vae import Tiling

    b, c, f, h, w = shape
    rows = 2 * b if request.guided else b
    latent = 4 * c * f * h * w  # one float32 latent video
    # latents, start noise and the sampler's temporaries per video; model input and output per model row
    loop = latent * (4 * b + 3 * rows) + rows * (in_channels - c) * f * h * w * 4
    tiles = (lambda size, decode: vae.tiling_for_budget(budget, size, decode)) if budget else (lambda *_: None)
    vae_work = vae.activation_bytes((h, w), decode=True, batch=b, tiling=tiles((h, w), True))
    if encodes:
        size = (request.height, request.width)
        vae_work = max(vae_work, vae.activation_bytes(size, decode=False, tiling=tiles(size, False)))
    compute = ({"latents and guidance batch": loop, "transformer activations": activations}
               if activations >= vae_work else {"latents": loop, "VAE working memory": vae_work})
    denoising_minimum = loop + one_row
    smallest_tiles = Tiling(64, 0.25)  # what a budget can shrink the VAE's tiles to
    minimum = max(denoising_minimum, loop + vae.activation_bytes((h, w), decode=True, batch=b, tiling=smallest_tiles))
    plane = request.frames * request.height * request.width * 4  # one float32 channel of the video
    conditioning, decoded = conditioning_planes * plane, 3 * b * plane
    ram = {"conditioning pixels": conditioning} if conditioning > decoded else {"decoded video": decoded}
    return MemoryEstimate(compute, ram, minimum, denoising_minimum)


# ----------------------------------------------------------------------------------------------------
# The stages of EasyAnimate V1, V2 and V3
# ----------------------------------------------------------------------------------------------------

class DiTStages:
    """The four stages for the PixArt-style DiT families (V1, V2, V3): T5 text, an ε-predicting DDPM
    transformer sampled with the five samplers and classifier-free guidance, and, for V3 InP models, the
    inpaint channels and CLIP image tokens."""

    def __init__(self, transformer, vae, image_encoder=None, text_encoder=None):
        self.transformer, self.vae = transformer, vae
        self.image_encoder, self.text_encoder = image_encoder, text_encoder

    @property
    def inpaint_model(self) -> bool:
        return self.transformer.config.in_channels == 12

    # ------------------------------------------------------------------ checks
    def request(self, *, frames, height, width, steps=25, guidance_scale=7.0, sampler="Euler", scheduler_config=None,
                strength=1.0, start_images=None, end_images=None, video=None, clip_apply_ratio=0.5,
                round_frames=False, control_video=None, reference_image=None, control_camera=None,
                teacache=None) -> VideoRequest:
        """Check every input against the models before any of them runs."""
        from .teacache import resolve

        resolve(teacache, self.transformer.config)  # refuses it: TeaCache is for the V5/V5.1 transformers
        if any(t is not None for t in (control_video, reference_image, control_camera)):
            raise EasyAnimateError(
                "Control videos, reference images and camera control need an EasyAnimate V5/V5.1 Control model; "
                f"this is EasyAnimate {self.transformer.config.family.upper()}."
            )
        strength = check_strength(strength)
        check_size(self.transformer, height, width)
        rules = self.vae.rules
        count = rules.round_frames(frames) if round_frames else rules.check_frames(frames)
        if not isinstance(guidance_scale, (int, float)) or not 0 <= guidance_scale < float("inf"):
            raise EasyAnimateError(
                f"The guidance scale (cfg) must be a finite number ≥ 0 (1 or less: no guidance); got {guidance_scale!r}."
            )
        if (start_images is not None or end_images is not None) and not self.inpaint_model:
            raise EasyAnimateError(
                "Image-to-video needs an EasyAnimate V3 InP model (12 input channels); this model only does "
                "text-to-video and video-to-video."
            )
        if strength < 1 and video is None:
            raise EasyAnimateError("A denoise strength below 1 needs an input video (video-to-video).")
        if not 0 <= clip_apply_ratio <= 1:
            raise EasyAnimateError(f"clip_apply_ratio must be in [0, 1], got {clip_apply_ratio}.")
        first_step_for_strength(steps, strength)  # refuses a step count that leaves nothing to run
        check_sampler_for_family(sampler, self.transformer.config.family)
        build_sampler(sampler, scheduler_config)  # refuses unknown names and unsupported configs
        return VideoRequest(count.frames, count.latents, height, width, steps, float(guidance_scale), sampler,
                            scheduler_config, strength, start_images, end_images, video, clip_apply_ratio)

    def _check_text(self, request: VideoRequest, positive: Conditioning, negative: Optional[Conditioning]) -> None:
        width = self.transformer.config.caption_channels
        for name, cond in (("prompt", positive), ("negative prompt", negative)):
            if cond is not None and cond.embeds.shape[-1] != width:
                raise EasyAnimateError(
                    f"The {name} embeddings have width {cond.embeds.shape[-1]}, but this model expects {width} "
                    "(T5-XXL for the released models); encode it with the model's T5 encoder, not a CLIP text encoder."
                )
        check_guidance_text(request, positive, negative)

    def latent_shape(self, request: VideoRequest, batch: int = 1) -> tuple[int, ...]:
        return (batch, self.vae.latent_channels, request.latent_frames, *request.latent_hw)

    def memory_estimate(self, request: VideoRequest, batch: int = 1, budget: Optional[int] = None) -> MemoryEstimate:
        """What the request needs beyond the weights, from each model's own estimate (`activation_bytes`):
        on the compute device the larger of the denoising stage (latents, guidance batch, transformer
        activations, chunked under `budget`) and the VAE stages (a slice, tiled under `budget`); in RAM the
        conditioning pixels or the decoded video, whichever phase is larger."""
        transformer = self.transformer
        b, _, f, h, w = self.latent_shape(request, batch)
        rows = 2 * b if request.guided else b
        if budget is not None:
            rows_per_pass, queries = transformer.plan_chunks(rows, f, h, w, budget)
            activations = transformer.activation_bytes(rows_per_pass, f, h, w, queries)
        else:
            activations = transformer.activation_bytes(rows, f, h, w)
        planes = 13 if self.inpaint_model else 9 if request.strength < 1 else 0
        return request_memory(request, self.latent_shape(request, batch), self.vae, transformer.config.in_channels,
                              activations, transformer.activation_bytes(1, f, h, w),
                              encodes=self.inpaint_model or request.strength < 1, conditioning_planes=planes,
                              budget=budget)

    # ------------------------------------------------------------------ 1. text
    def prepare_text(self, prompt: str, negative_prompt: str, placement, *, clean_caption: bool = True):
        """The release's T5 on both prompts -> (positive, negative) Conditioning on the CPU."""
        if self.text_encoder is None:
            raise EasyAnimateError("This model was loaded without its text encoder; encode prompts and call generate().")
        with placement.stage("text_encoder", self.text_encoder.activation_bytes(1)):
            text = self.text_encoder.encode([prompt], [negative_prompt], clean_caption=clean_caption)
        return Conditioning(text.embeds, text.mask), Conditioning(text.negative_embeds, text.negative_mask)

    # ------------------------------------------------------------------ 2. latents and conditioning
    def prepare_latents(self, request: VideoRequest, positive: Conditioning, negative: Optional[Conditioning],
                        placement, *, generator: torch.Generator, noise=None, vae_generator=None, vae_noise=None,
                        clip_image_embeds=None) -> Denoising:
        """The sampler, the start latents and the model's other inputs, in the reference's order: VAE encodes
        of the conditioning video (InP models, video-to-video), the CLIP image, then the start noise."""
        self._check_text(request, positive, negative)
        transformer, vae = self.transformer, self.vae
        sampler = build_sampler(request.sampler, request.scheduler_config)
        sampler.set_timesteps(request.steps)
        start = first_step_for_strength(request.steps, request.strength)
        cond = conditioning_video(request.frames, request.height, request.width,
                                  request.start_images, request.end_images, request.video)
        batch = positive.embeds.shape[0]
        shape = self.latent_shape(request, batch)
        if noise is not None and tuple(noise.shape) != shape:
            raise EasyAnimateError(f"noise has shape {tuple(noise.shape)}; this run needs {shape}.")
        device, dtype = placement.device, transformer.dtype
        vae_draws = list(vae_noise) if vae_noise is not None else None

        def vae_encode(pixels):
            draw = vae_draws.pop(0) if vae_draws else None
            size = pixels.shape[-2:]
            with placement.stage("vae", vae.activation_bytes(size, decode=False, tiling=None)):
                return vae.encode_latents(pixels, generator=None if draw is not None else vae_generator, noise=draw)

        # The reference encodes the conditioning video even when only the inpaint channels use it.
        video_latents = vae_encode(cond.video * 2 - 1) if (self.inpaint_model or request.strength < 1) else None
        inpaint = clip = None
        if self.inpaint_model:
            inpaint = torch.cat([vae_encode(pixels) for pixels in inpaint_pixels(cond)], dim=1)
            inpaint = inpaint.to(device, dtype).expand(batch, -1, -1, -1, -1)
            if inpaint.shape[2:] != shape[2:]:
                raise EasyAnimateError(f"Conditioning latents {tuple(inpaint.shape)} do not match the latent shape {shape}.")
            if clip_image_embeds is None and self.image_encoder is not None and cond.clip_image is not None:
                with placement.stage("image_encoder"):
                    clip_image_embeds = self.image_encoder.encode(cond.clip_image)
            clip = clip_conditioning(clip_image_embeds, batch, guidance=request.guided, dtype=dtype, device=device)

        if noise is None:
            noise = torch.randn(shape, generator=generator, device=generator.device, dtype=dtype)
        noise = noise.to(device, dtype)
        latents = start_latents(sampler, noise, start,
                                video_latents.to(device, dtype).expand(shape) if request.strength < 1 else None)

        text = torch.cat([negative.embeds, positive.embeds]) if request.guided else positive.embeds
        text_mask = torch.cat([negative.mask, positive.mask]) if request.guided else positive.mask
        if inpaint is not None and request.guided:
            inpaint = torch.cat([inpaint, inpaint])
        inputs = ModelInputs(text.to(device, dtype), text_mask.to(device), inpaint, clip, request.clip_apply_ratio)
        rows = 2 * batch if request.guided else batch
        memory = transformer.activation_bytes(rows, *shape[2:])
        return Denoising(sampler, start, latents, inputs, request.guidance_scale, generator,
                         vae.latent_channels, memory)

    # ------------------------------------------------------------------ 3. denoise
    def denoise(self, denoising: Denoising, placement, callback: Optional[ProgressFn] = None) -> torch.Tensor:
        """The sampler's loop with classifier-free guidance -> latents (B, C, F, h, w)."""
        transformer, inputs = self.transformer, denoising.inputs
        dtype = transformer.dtype
        steps_run = len(denoising.sampler.timesteps) - denoising.start_index

        def model_fn(model_input, timestep, step):
            with torch.no_grad():
                return transformer(model_input.to(dtype), timestep, inputs.text, inputs.text_mask,
                                   **inputs.for_step(step, steps_run))

        with placement.stage("transformer", denoising.memory_required):
            return denoise(model_fn, denoising.latents, denoising.sampler, denoising.guidance_scale,
                           start_index=denoising.start_index, generator=denoising.generator,
                           latent_channels=denoising.latent_channels, callback=callback)

    # ------------------------------------------------------------------ 4. decode
    def decode(self, latents: torch.Tensor, placement, *, smooth: bool = False, generator=None, tiling=None,
               out_device="cpu", progress=None) -> torch.Tensor:
        """Latents -> video (B, 3, F, H, W) in [0, 1], slice by slice; a memory budget picks the tiles."""
        budget = placement.budget_bytes if tiling is None else None
        size = latents.shape[-2:]
        with placement.stage("vae", self.vae.activation_bytes(size, decode=True, batch=latents.shape[0], tiling=tiling)):
            return self.vae.decode_video(latents, smooth=smooth, generator=generator, tiling=tiling,
                                         memory_budget=budget, out_device=out_device, progress=progress)


# The VAE family each transformer family was trained with.
VAE_FOR_FAMILY = {"v1": "v1", "v2": "v2", "v3": "v3", "v5": "v5", "v51": "v5"}
FAMILY_NAMES = {"v1": "V1", "v2": "V2", "v3": "V3", "v5": "V5", "v51": "V5.1"}


def check_pair(transformer, vae) -> None:
    """Refuse a transformer and a VAE of different families, before anything runs, naming both."""
    family, vae_family = transformer.config.family, vae.family
    if VAE_FOR_FAMILY.get(family) != vae_family:
        want = VAE_FOR_FAMILY.get(family, "?")
        raise EasyAnimateError(
            f"The transformer is EasyAnimate {FAMILY_NAMES.get(family, family)} but the VAE is the "
            f"{FAMILY_NAMES.get(vae_family, vae_family)} one; the {FAMILY_NAMES.get(family, family)} transformer needs the "
            f"{FAMILY_NAMES.get(want, want)} VAE ({vae_family} latents have another channel count or frame rule). Load the "
            "VAE of the same release folder."
        )


def stages_for(transformer, vae, image_encoder=None, text_encoder=None):
    """The stages of the model family `transformer` belongs to (after checking that `vae` fits it)."""
    check_pair(transformer, vae)
    if transformer.config.family in ("v5", "v51"):
        from .stages_v5 import MMDiTStages

        return MMDiTStages(transformer, vae, image_encoder, text_encoder)
    return DiTStages(transformer, vae, image_encoder, text_encoder)


def models_in_place(transformer) -> Placement:
    """The placement of a call that was given none: the models stay where they are, inputs go to the
    transformer's device."""
    from .host import fixed_device

    return Placement(fixed_device(next(transformer.parameters()).device), {})


# ----------------------------------------------------------------------------------------------------
# Running the stages
# ----------------------------------------------------------------------------------------------------

def generate(
    transformer,
    vae,
    positive: Conditioning,
    negative: Optional[Conditioning] = None,
    *,
    frames: int,
    height: int,
    width: int,
    steps: Optional[int] = None,
    guidance_scale: Optional[float] = None,
    sampler: Optional[str] = None,
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
    callback: Optional[ProgressFn] = None,
    placement=None,
    control_video: Optional[torch.Tensor] = None,
    reference_image: Optional[torch.Tensor] = None,
    control_camera: Optional[torch.Tensor] = None,
    teacache=None,
) -> torch.Tensor:
    """Sample latents (B, C, F_latent, H/8, W/8), scaled as the VAE's `decode_video` expects (stages 2 and 3).

    `sampler` is one of "Euler", "Euler A", "DPM++", "PNDM", "DDIM" (V1–V3, V5) or "Flow" (V5.1);
    `scheduler_config` a release's folder or `scheduler/` config (None: the era's YAML defaults). Unset
    `steps`, `guidance_scale` and `sampler` take the family's reference defaults (V1–V3: 25, 7.0, Euler;
    V5.1: 50, 6.0, Flow). Randomness: `generator` (or `seed`)
    draws the start noise and the ancestral noise; `noise` replaces the start noise draw (unit normal);
    `vae_generator` / `vae_noise` feed the VAE posterior samples (default: a generator seeded from
    `seed` + 1). `callback(steps_done, total, latents)` runs after each step and may return False to stop
    (raises `SamplingCancelled`); nothing in the models is changed by a run, stopped or not.
    `placement` (from a host's `placement(...)`) places each model for its stage; None: models where they are.
    V5/V5.1 Control models: `control_video` (1, 3, F, H, W) in [0, 1] and (V5.1) a `reference_image`
    (1, 3, H, W); Control-Camera models: `control_camera`, Plücker rays (1, 6, F, H, W)
    (`easyanimate.camera.plucker_rays` makes them from camera poses).
    `teacache`: None (off, the default), a threshold such as 0.08 or 0.1, or a `teacache.TeaCache` with
    explicit coefficients: transformer calls whose input barely changed reuse the last computed one's
    residual (V5.1; V5 only with explicit coefficients; see easyanimate/teacache.py).
    """
    stages = stages_for(transformer, vae, image_encoder)
    chosen = {k: v for k, v in dict(steps=steps, guidance_scale=guidance_scale, sampler=sampler).items() if v is not None}
    request = stages.request(frames=frames, height=height, width=width, scheduler_config=scheduler_config,
                             strength=strength, start_images=start_images, end_images=end_images, video=video,
                             clip_apply_ratio=clip_apply_ratio, round_frames=round_frames,
                             control_video=control_video, reference_image=reference_image,
                             control_camera=control_camera, teacache=teacache, **chosen)
    seed = check_seed(0 if seed is None else seed)
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    if vae_generator is None and vae_noise is None:
        vae_generator = torch.Generator().manual_seed(seed + 1)
    placement = placement or models_in_place(transformer)
    placement.check_memory(stages.memory_estimate(request, positive.embeds.shape[0], placement.budget_bytes),
                           f"{request.frames} frames at {request.width}x{request.height}")
    denoising = stages.prepare_latents(request, positive, negative, placement, generator=generator, noise=noise,
                                       vae_generator=vae_generator, vae_noise=vae_noise,
                                       clip_image_embeds=clip_image_embeds)
    return stages.denoise(denoising, placement, callback)


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


def crossfade(video: torch.Tensor, part: torch.Tensor, overlap: int) -> torch.Tensor:
    """`video` followed by `part`, whose first `overlap` frames fade linearly into `video`'s last ones."""
    mix = (torch.arange(overlap, dtype=torch.float32) / overlap).view(1, 1, overlap, 1, 1)
    video[:, :, -overlap:] = video[:, :, -overlap:] * (1 - mix) + part[:, :, :overlap] * mix
    return torch.cat([video, part[:, :, overlap:]], dim=2)


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
    callback: Optional[ProgressFn] = None,
    placement=None,
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
    seed = check_seed(0 if seed is None else seed)
    generator = generator or torch.Generator().manual_seed(seed)
    vae_generator = vae_generator or torch.Generator().manual_seed(seed + 1)
    steps = generate_options.get("steps", 25)
    total = steps * len(plan)
    placement = placement or models_in_place(transformer)
    stages = stages_for(transformer, vae, generate_options.get("image_encoder"))

    video, images = None, start_images
    for index, length in enumerate(plan):
        def segment_progress(done, _total, latents, offset=index * steps):
            return callback(offset + done, total, latents) if callback else None

        latents = generate(transformer, vae, positive, negative, frames=length, height=height, width=width,
                           start_images=images, generator=generator, vae_generator=vae_generator,
                           callback=segment_progress, placement=placement, **generate_options)
        part = stages.decode(latents, placement, generator=vae_generator, **(decode_options or {})).cpu()
        video = part if video is None else crossfade(video, part, overlap)
        images = ((video[0, :, -overlap:] * 255).to(torch.uint8).float() / 255).transpose(0, 1)
    return video


# ----------------------------------------------------------------------------------------------------
# A whole release in one object, and prompt -> video in one call (what the command line uses)
# ----------------------------------------------------------------------------------------------------

@dataclass
class EasyAnimateModel:
    """The parts of one EasyAnimate release, loaded on `device`."""

    family: str
    transformer: object
    vae: object
    text_encoder: object = None
    image_encoder: object = None
    scheduler_config: Optional[object] = None  # the release's scheduler/ folder, when it has one
    device: torch.device = torch.device("cpu")

    def modules(self) -> dict:
        """The torch modules of the parts, by component kind."""
        return {"transformer": self.transformer, "vae": self.vae.model,
                "text_encoder": self.text_encoder.model if self.text_encoder is not None else None,
                "image_encoder": self.image_encoder.model if self.image_encoder is not None else None}


def load_model(path, *, dtype="bf16", device="cpu", text_encoder: bool = True, image_encoder: bool = True,
               motion_module=None, personalized=None) -> EasyAnimateModel:
    """Load a release folder: transformer/, vae/, scheduler/, and the text encoder(s) of its family (V1–V3:
    text_encoder/ + tokenizer/ (T5); V5.1: text_encoder/ + tokenizer/ (Qwen2-VL); V5: text_encoder/ +
    tokenizer/ (Bert) and text_encoder_2/ + tokenizer_2/ (mT5)), and V3 InP's image_encoder/. A transformer and
    a VAE of different families are refused before the text encoder is loaded."""
    from .loading import load_transformer
    from .vae import load_vae

    root = Path(path)
    transformer = load_transformer(root, dtype=dtype, device=device, motion_module=motion_module, personalized=personalized)
    vae = load_vae(root, dtype=dtype, device=device)
    check_pair(transformer, vae)
    family = transformer.config.family
    encoder = None
    if text_encoder:
        if not (root / "text_encoder").is_dir():
            raise EasyAnimateError(
                f"'{root}' has no text_encoder/ folder; load the text encoder separately or pass "
                "text_encoder=False and encode prompts yourself."
            )
        if family in ("v5", "v51"):
            from .text_v5 import load_text_encoder_v5

            encoder = load_text_encoder_v5(root, dtype=dtype, device=device)
        else:
            from .text import load_text_encoder

            encoder = load_text_encoder(root, dtype=dtype, device=device)
    clip = None
    if image_encoder and transformer.config.has_clip_projection and (root / "image_encoder").is_dir():
        from .image_encoder import load_image_encoder

        clip = load_image_encoder(root, dtype=dtype, device=device)
    scheduler = root / "scheduler" if (root / "scheduler" / "scheduler_config.json").is_file() else None
    return EasyAnimateModel(family, transformer, vae, encoder, clip, scheduler, torch.device(device))


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
    host=None,
    loras: Sequence = (),
    **generate_options,
) -> torch.Tensor:
    """Prompt (and optional start/end images or input video) -> video (1, 3, F, H, W) in [0, 1], on the CPU:
    the four stages in order.

    `host` (e.g. `StandaloneHost(MemoryOptions("offload"), compute="cuda")`) places each model for its
    stage; None: the models stay on the device they were loaded on. `loras`: [(ResolvedLoRA, strength)]
    applied to the transformer and the text encoder while they run (the loaded weights never change)."""
    from .host import fixed_device

    placement = Placement(fixed_device(model.device), {})
    if host is not None:
        components = {kind: host.wrap(module, kind) for kind, module in model.modules().items() if module is not None}
        for lora, strength in loras:
            for kind in ("transformer", "text_encoder"):
                if kind in components and lora.patch_for(components[kind].module) is not None:
                    components[kind] = host.with_lora(components[kind], lora, strength)
        placement = host.placement(**components)
    elif loras:
        raise EasyAnimateError("LoRAs are applied by a host: pass host=StandaloneHost(...) with loras.")
    stages = stages_for(model.transformer, model.vae, model.image_encoder, model.text_encoder)
    generate_options.setdefault("scheduler_config", model.scheduler_config)
    seed = check_seed(generate_options.setdefault("seed", 0) or 0)
    # Every input, and whether the request fits in memory, checked before the text encoder runs.
    request = stages.request(frames=frames, height=height, width=width,
                             **{k: v for k, v in generate_options.items() if k in _REQUEST_OPTIONS})
    placement.check_memory(stages.memory_estimate(request, 1, placement.budget_bytes),
                           f"{request.frames} frames at {request.width}x{request.height}")
    text_loras = model.text_encoder is not None and any(
        lora.patch_for(model.text_encoder.model) is not None for lora, _ in loras)
    if text_loras:
        model.text_encoder.clear_cache()  # cached embeddings were made without these LoRAs
    try:
        positive, negative = stages.prepare_text(prompt, negative_prompt, placement, clean_caption=clean_caption)
    finally:
        if text_loras:
            model.text_encoder.clear_cache()  # and these must not be reused without them
    generate_options.setdefault("image_encoder", model.image_encoder)
    latents = generate(model.transformer, model.vae, positive, negative, frames=frames, height=height, width=width,
                       placement=placement, **generate_options)
    decode_generator = torch.Generator().manual_seed(seed + 2) if smooth else None
    return stages.decode(latents, placement, smooth=smooth, generator=decode_generator, tiling=tiling)


_REQUEST_OPTIONS = ("steps", "guidance_scale", "sampler", "scheduler_config", "strength", "start_images",
                    "end_images", "video", "clip_apply_ratio", "round_frames", "control_video", "reference_image",
                    "control_camera", "teacache")
