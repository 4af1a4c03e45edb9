"""The stages of a generation for EasyAnimate V5 and V5.1 (the MMDiT transformers; see easyanimate/pipeline.py
for the stage contract and docs/numerics.md for the reference behaviours reproduced).

What differs from V1–V3 (`pipeline.DiTStages`):

* text: V5.1 encodes with Qwen2-VL, V5 with Bert + mT5 (`Conditioning.t5_embeds`); the transformer attends
  every text token (no mask);
* the transformer predicts a flow velocity (V5.1, the "Flow" sampler) or noise (V5, the DDPM samplers);
  a sampler of the other kind is refused;
* the input channels say what the model is conditioned on: 16 text-to-video; 33 inpainting
  ([mask 1 | masked video 16]); 48 Control ([control video 16 | reference image 16]; V5: 32, control only);
  38 Control-Camera ([Plücker rays 6 | reference image 16]);
* every conditioning encode takes the posterior mode; an inpainting model told to generate everything
  (text-to-video, video-to-video without a mask) gets zero inpaint latents; the known pixels of the masked
  video get a little noise (0.0563, from the caller's generator, after the start noise);
* the mask channel is 1 − mask resized to the latent grid (frame 0 on its own, the other frames together,
  trilinear), times the VAE's scaling factor; Plücker rays are resized the same way and scaled by 6.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .errors import EasyAnimateError, check_finite
from .host import MemoryEstimate
from .pipeline import (
    Conditioning, Denoising, ModelInputs, ProgressFn, VideoRequest, _as_frames, check_guidance_text, check_size,
    conditioning_video, inpaint_pixels, request_memory,
)
from .sampling import build_sampler, check_sampler_for_family, check_strength, denoise, first_step_for_strength, \
    scheduler_prediction, start_latents
from .teacache import TeaCacheRun, resolve as resolve_teacache, running as teacache_running

# The reference's generation settings for V5/V5.1 (its predict scripts and Gradio UI): 49 frames (1 + 4k) at
# 384x672, played at 8 fps, 50 steps, guidance 6, seed 43. The Python API's and the command line's defaults.
GENERATION_DEFAULTS = {"frames": 49, "height": 384, "width": 672, "fps": 8, "steps": 50, "guidance_scale": 6.0,
                       "seed": 43}
# The sampler when none is named: V5.1 is a flow model (the UI offers only "Flow"); V5 as the Gradio UI.
DEFAULT_SAMPLER = {"v51": "Flow", "v5": "Euler"}

# The pipelines' `noise_aug_strength`: the noise put on the known pixels of an inpainting model's input.
NOISE_AUG_STRENGTH = 0.0563
# Plücker ray channels are scaled by this before they enter a Control-Camera model, as the pipelines do.
CAMERA_SCALE = 6
CONTROL_IMAGE_CHANNELS = 3
CAMERA_CHANNELS = 6


def resize_to_latents(pixels: torch.Tensor, latent_frames: int, height: int, width: int) -> torch.Tensor:
    """(B, C, F, H, W) -> (B, C, L, h, w), trilinear (align_corners False): frame 0 on its own, the other
    frames together onto the other L − 1 latent frames, as the VAE compresses time."""
    first = F.interpolate(pixels[:, :, :1], size=(1, height, width), mode="trilinear", align_corners=False)
    if latent_frames == 1:
        return first
    rest = F.interpolate(pixels[:, :, 1:], size=(latent_frames - 1, height, width), mode="trilinear",
                         align_corners=False)
    return torch.cat([first, rest], dim=2)


class MMDiTStages:
    """The four stages for EasyAnimate V5 and V5.1."""

    def __init__(self, transformer, vae, image_encoder=None, text_encoder=None):
        self.transformer, self.vae, self.text_encoder = transformer, vae, text_encoder
        cfg = transformer.config
        self.family = cfg.family
        extra = cfg.in_channels - vae.latent_channels
        self.inpaint_model = extra == 1 + vae.latent_channels
        self.camera_model = extra == CAMERA_CHANNELS + vae.latent_channels
        self.reference_channels = cfg.raw.get("add_ref_latent_in_control_model", self.family == "v51")
        self.control_model = not self.inpaint_model and not self.camera_model and extra > 0

    # ------------------------------------------------------------------ checks
    def request(self, *, frames, height, width, steps=GENERATION_DEFAULTS["steps"],
                guidance_scale=GENERATION_DEFAULTS["guidance_scale"], sampler=None, scheduler_config=None,
                strength=1.0, start_images=None, end_images=None, video=None, control_video=None,
                reference_image=None, control_camera=None, clip_apply_ratio=None, round_frames=False,
                teacache=None) -> VideoRequest:
        """Check every input against the models before any of them runs: sizes are multiples of 16 (the VAE's
        8x times the 2x2 patches) and frame counts 1 + 4k, each refused with the nearest valid values."""
        strength = check_strength(strength)
        check_size(self.transformer, height, width)
        count = self.vae.rules.round_frames(frames) if round_frames else self.vae.rules.check_frames(frames)
        cache = resolve_teacache(teacache, self.transformer.config)
        if not isinstance(guidance_scale, (int, float)) or not 0 <= guidance_scale < float("inf"):
            raise EasyAnimateError(
                f"The guidance scale (cfg) must be a finite number ≥ 0 (1 or less: no guidance); got {guidance_scale!r}."
            )
        sampler = sampler or DEFAULT_SAMPLER[self.family]
        prediction = scheduler_prediction(scheduler_config) if scheduler_config is not None else None
        check_sampler_for_family(sampler, self.family, prediction)
        name = self.transformer.config.name
        if (start_images is not None or end_images is not None) and not self.inpaint_model:
            raise EasyAnimateError(f"Image-to-video needs an InP model (33 input channels); {name} is not one.")
        if control_video is not None and not self.control_model:
            raise EasyAnimateError(f"A control video needs a Control model; {name} is not one.")
        if control_camera is not None and not self.camera_model:
            raise EasyAnimateError(f"Camera control needs a Control-Camera model; {name} is not one.")
        if reference_image is not None and not ((self.control_model or self.camera_model) and self.reference_channels):
            raise EasyAnimateError(f"A reference image needs a V5.1 Control or Control-Camera model; {name} is not one.")
        if strength < 1 and video is None:
            raise EasyAnimateError("A denoise strength below 1 needs an input video (video-to-video).")
        if video is not None and (self.control_model or self.camera_model):
            raise EasyAnimateError(f"{name} takes a control video, not an input video to redraw.")
        first_step_for_strength(steps, strength)
        build_sampler(sampler, scheduler_config)
        for tensor, what in ((control_video, "control video"), (control_camera, "camera control")):
            if tensor is not None:
                _check_video(tensor, what, CONTROL_IMAGE_CHANNELS if tensor is control_video else CAMERA_CHANNELS)
        return VideoRequest(count.frames, count.latents, height, width, steps, float(guidance_scale), sampler,
                            scheduler_config, strength, start_images, end_images, video, 0.0,
                            control_video=control_video, reference_image=reference_image, control_camera=control_camera,
                            teacache=cache)

    def _check_text(self, request: VideoRequest, positive: Conditioning, negative: Optional[Conditioning]) -> None:
        cfg = self.transformer.config
        for name, cond in (("prompt", positive), ("negative prompt", negative)):
            if cond is None:
                continue
            if cond.embeds.shape[-1] != cfg.text_embed_dim:
                encoder = "Qwen2-VL" if self.family == "v51" else "Bert"
                raise EasyAnimateError(
                    f"The {name} embeddings have width {cond.embeds.shape[-1]}, but {cfg.name} expects {cfg.text_embed_dim} "
                    f"({encoder} states); encode it with the model's own text encoder."
                )
            if (cfg.text_embed_dim_t5 is None) != (cond.t5_embeds is None):
                raise EasyAnimateError(
                    f"{cfg.name} takes {'Bert and mT5' if cfg.text_embed_dim_t5 else 'Qwen2-VL'} text states; the {name} "
                    f"conditioning has {'no mT5 part' if cond.t5_embeds is None else 'an mT5 part'}."
                )
        check_guidance_text(request, positive, negative)

    def latent_shape(self, request: VideoRequest, batch: int = 1) -> tuple[int, ...]:
        return (batch, self.vae.latent_channels, request.latent_frames, *request.latent_hw)

    def memory_estimate(self, request: VideoRequest, batch: int = 1, budget: Optional[int] = None) -> MemoryEstimate:
        """As `DiTStages.memory_estimate`: latents and conditioning, the larger of the transformer and VAE
        stages (each model's own `activation_bytes`), the pixels kept in RAM."""
        transformer = self.transformer
        b, _, f, h, w = self.latent_shape(request, batch)
        rows = 2 * b if request.guided else b
        text_tokens = 256 + (77 if transformer.config.text_embed_dim_t5 else 0)
        planes = 10 if self.inpaint_model else 6 if (request.video is not None or self.control_model) else 0
        return request_memory(request, self.latent_shape(request, batch), self.vae, transformer.config.in_channels,
                              transformer.activation_bytes(rows, f, h, w, text_tokens),
                              transformer.activation_bytes(1, f, h, w, text_tokens), encodes=True,
                              conditioning_planes=planes, budget=budget)

    # ------------------------------------------------------------------ 1. text
    def prepare_text(self, prompt: str, negative_prompt: str, placement, *, clean_caption: bool = True):
        """The release's text encoder(s) on both prompts -> (positive, negative) Conditioning."""
        if self.text_encoder is None:
            raise EasyAnimateError("This model was loaded without its text encoder; encode prompts and call generate().")
        with placement.stage("text_encoder", self.text_encoder.activation_bytes(1)):
            text = self.text_encoder.encode([prompt], [negative_prompt])
        if hasattr(text, "bert"):  # V5: Bert + mT5
            bert, t5 = text.bert, text.t5
            return (Conditioning(bert.embeds, bert.mask, t5.embeds, t5.mask),
                    Conditioning(bert.negative_embeds, bert.negative_mask, t5.negative_embeds, t5.negative_mask))
        return Conditioning(text.embeds, text.mask), Conditioning(text.negative_embeds, text.negative_mask)

    # ------------------------------------------------------------------ 2. latents and conditioning
    def prepare_latents(self, request: VideoRequest, positive: Conditioning, negative: Optional[Conditioning],
                        placement, *, generator: torch.Generator, noise=None, vae_generator=None, vae_noise=None,
                        clip_image_embeds=None, noise_aug_strength: float = NOISE_AUG_STRENGTH) -> Denoising:
        """The sampler, the start latents and the model's conditioning channels, in the reference's order of
        random draws: (video-to-video: the input video's encode), the start noise, then the noise on the
        known pixels of an inpainting model's masked video, all from `generator`. Conditioning encodes take
        the posterior mode; `vae_noise` (recorded draws) turns the video-to-video encode into a sample."""
        self._check_text(request, positive, negative)
        transformer, vae = self.transformer, self.vae
        sampler = build_sampler(request.sampler, request.scheduler_config)
        sampler.set_timesteps(request.steps)
        start = first_step_for_strength(request.steps, request.strength)
        batch = positive.embeds.shape[0]
        shape = self.latent_shape(request, batch)
        if noise is not None and tuple(noise.shape) != shape:
            raise EasyAnimateError(f"noise has shape {tuple(noise.shape)}; this run needs {shape}.")
        device, dtype = placement.device, transformer.dtype
        draws = list(vae_noise) if vae_noise is not None else []

        def encode(pixels):
            """Pixels in [-1, 1] -> scaled latents: the mode, or a sample with a recorded draw."""
            draw = draws.pop(0) if draws else None
            with placement.stage("vae", vae.activation_bytes(pixels.shape[-2:], decode=False)):
                return vae.encode_latents(pixels, sample=draw is not None, noise=draw)

        cond = conditioning_video(request.frames, request.height, request.width,
                                  request.start_images, request.end_images, request.video)
        video_latents = encode(cond.video * 2 - 1) if request.strength < 1 else None
        if noise is None:
            noise = self.start_noise(request, batch, generator)
        noise = noise.to(device, dtype)
        latents = start_latents(sampler, noise, start,
                                video_latents.to(device, dtype).expand(shape) if video_latents is not None else None)

        inpaint, control = self.conditioning_latents(request, cond, generator, encode, noise_aug_strength)
        inpaint, control = (None if t is None else t.to(device, dtype) for t in (inpaint, control))
        guided = request.guided
        text = torch.cat([negative.embeds, positive.embeds]) if guided else positive.embeds
        mask = torch.cat([negative.mask, positive.mask]) if guided else positive.mask
        t5 = None
        if positive.t5_embeds is not None:
            t5 = torch.cat([negative.t5_embeds, positive.t5_embeds]) if guided else positive.t5_embeds
            t5 = t5.to(device, dtype)
        rows = 2 * batch if guided else batch
        # One conditioning video for every row of the model batch (both halves of the guidance batch).
        every_row = (lambda t: None if t is None else t.expand(rows, -1, -1, -1, -1))
        inputs = ModelInputs(text.to(device, dtype), mask.to(device), inpaint=every_row(inpaint),
                             control=every_row(control), t5=t5)
        tokens = text.shape[1] + (0 if t5 is None else t5.shape[1])
        memory = transformer.activation_bytes(rows, *shape[2:], tokens)
        return Denoising(sampler, start, latents, inputs, request.guidance_scale, generator, vae.latent_channels, memory,
                         teacache=request.teacache)

    def start_noise(self, request: VideoRequest, batch: int, generator: torch.Generator) -> torch.Tensor:
        """The start noise of `batch` videos: the first draw from the run's generator."""
        return torch.randn(self.latent_shape(request, batch), generator=generator, device=generator.device,
                           dtype=self.transformer.dtype)

    def conditioning_latents(self, request: VideoRequest, cond, generator: torch.Generator, encode,
                             noise_aug_strength: float = NOISE_AUG_STRENGTH):
        """(inpaint, control): the channels the model's input width calls for, for one video (batch 1), each
        None when the model takes none. `cond` is the request's `conditioning_video`; `encode(pixels in
        [-1, 1])` gives scaled latents (the posterior mode); an inpainting model's noise on the known pixels is
        drawn from `generator`, which has drawn the start noise before (the reference's order)."""
        if self.inpaint_model:
            return self._inpaint_latents(cond, request, generator, noise_aug_strength, encode), None
        if self.control_model or self.camera_model:
            return None, self._control_latents(request, encode)
        return None, None

    def _inpaint_latents(self, cond, request, generator, noise_aug_strength, encode) -> torch.Tensor:
        """[mask 1 | masked video 16] of an inpainting model, for one video (batch 1)."""
        vae, scale = self.vae, self.vae.scaling_factor
        shape = (1, vae.latent_channels, request.latent_frames, *request.latent_hw)
        if bool((cond.mask == 1).all()):  # everything to generate: zeros, not the encodings of a black video
            return torch.zeros(1, 1 + vae.latent_channels, *shape[2:])
        _, masked = inpaint_pixels(cond)
        masked = masked.to(self.transformer.dtype)  # the reference adds the noise in the working dtype
        if self.transformer.config.raw.get("add_noise_in_inpaint_model", True) and noise_aug_strength:
            aug = torch.randn(masked.shape, generator=generator, device=generator.device, dtype=masked.dtype)
            masked = masked + torch.where(masked == -1, torch.zeros_like(aug), aug * noise_aug_strength)
        masked_latents = encode(masked)
        mask_latents = resize_to_latents(1 - cond.mask, *shape[2:]) * scale
        return torch.cat([mask_latents.to(masked_latents), masked_latents], dim=1)

    def _control_latents(self, request, encode) -> torch.Tensor:
        """[control video 16 | reference 16] (V5.1 Control), [control 16] (V5 Control) or
        [Plücker rays 6 | reference 16] (Control-Camera), for one video."""
        vae = self.vae
        shape = (1, vae.latent_channels, request.latent_frames, *request.latent_hw)
        parts = []
        if self.camera_model:
            rays = request.control_camera
            rays = torch.zeros(1, CAMERA_CHANNELS, request.frames, request.height, request.width) if rays is None else rays
            parts.append(resize_to_latents(rays.float(), *shape[2:]) * CAMERA_SCALE)
        elif request.control_video is not None:
            parts.append(encode(_video_frames(request.control_video, request) * 2 - 1))
        else:
            parts.append(torch.zeros(shape))
        if self.reference_channels:
            reference = torch.zeros(shape)
            if request.reference_image is not None:
                image = _video_frames(request.reference_image, request, frames=1)
                reference[:, :, :1] = encode(image * 2 - 1)
            parts.append(reference.to(parts[0]))
        return torch.cat([p.to(parts[0]) for p in parts], dim=1)

    # ------------------------------------------------------------------ 3. denoise
    def denoise(self, denoising: Denoising, placement, callback: Optional[ProgressFn] = None) -> torch.Tensor:
        transformer, inputs = self.transformer, denoising.inputs
        dtype = transformer.dtype

        def model_fn(model_input, timestep, step):
            with torch.no_grad():
                return transformer(model_input.to(dtype), timestep, inputs.text,
                                   encoder_hidden_states_t5=inputs.t5, inpaint_latents=inputs.inpaint,
                                   control_latents=inputs.control)

        # TeaCache state for this run alone, sized by the calls it makes (one per step actually run).
        calls = len(denoising.sampler.timesteps) - denoising.start_index
        cache = None if denoising.teacache is None else TeaCacheRun(denoising.teacache, calls)
        with placement.stage("transformer", denoising.memory_required), teacache_running(cache):
            return denoise(model_fn, denoising.latents, denoising.sampler, denoising.guidance_scale,
                           start_index=denoising.start_index, generator=denoising.generator,
                           latent_channels=denoising.latent_channels, callback=callback)

    # ------------------------------------------------------------------ 4. decode
    def decode(self, latents: torch.Tensor, placement, *, smooth: bool = False, generator=None, tiling=None,
               out_device="cpu", progress=None) -> torch.Tensor:
        if smooth:
            raise EasyAnimateError("EasyAnimate V5/V5.1 decode has no smoothing pass (its VAE is causal over time).")
        budget = placement.budget_bytes if tiling is None else None
        with placement.stage("vae", self.vae.activation_bytes(latents.shape[-2:], decode=True, batch=latents.shape[0],
                                                              tiling=tiling)):
            return self.vae.decode_video(latents, tiling=tiling, memory_budget=budget, out_device=out_device,
                                         progress=progress)


def _check_video(video: torch.Tensor, what: str, channels: int) -> None:
    if video.ndim != 5 or video.shape[0] != 1 or video.shape[1] != channels:
        raise EasyAnimateError(
            f"The {what} must be (1, {channels}, frames, height, width); got {tuple(video.shape)}."
        )
    check_finite(video, what)


def _video_frames(video: torch.Tensor, request: VideoRequest, frames: Optional[int] = None) -> torch.Tensor:
    """A (1, 3, F', H', W') video in [0, 1] as (1, 3, frames, height, width): the first frames, resized
    like the start images (Pillow bicubic through 8-bit pixels) when the size differs."""
    frames = request.frames if frames is None else frames
    if video.ndim == 4:
        video = video[:, :, None]
    if video.ndim != 5 or video.shape[1] != 3 or video.shape[2] < frames:
        raise EasyAnimateError(f"Expected a (1, 3, ≥{frames}, H, W) video in [0, 1]; got {tuple(video.shape)}.")
    clip = _as_frames(video[0, :, :frames].transpose(0, 1), request.height, request.width, "control video")
    return clip.transpose(0, 1)[None]
