"""The EasyAnimate Sampler node: text-, image- and video-to-video in one node."""
from __future__ import annotations

import logging

import torch

from ..easyanimate.errors import MAX_SEED, EasyAnimateError
from . import host
from .handles import MODEL, TEXT_EMBEDS, VAE

log = logging.getLogger(__name__)


def images_to_frames(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE (N, H, W, 3) -> the core's (N, 3, H, W) in [0, 1]."""
    return images[..., :3].permute(0, 3, 1, 2).float()


class EasyAnimateSampler:
    DESCRIPTION = (
        "Generates video latents. Text-to-video with only the embeddings; image-to-video with a start image (and "
        "optionally an end image; V3 InP models); video-to-video with an input video and denoise < 1. Decode the "
        "result with Slice VAE Decode."
    )
    CATEGORY = "EasyAnimate"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("samples",)
    OUTPUT_TOOLTIPS = ("Video latents (batch, latent channels, latent frames, height/8, width/8).",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        from ..easyanimate.sampling import SAMPLER_NAMES

        return {
            "required": {
                "model": (MODEL, {"tooltip": "From Load EasyAnimate (optionally through LoRA loaders)."}),
                "embeds": (TEXT_EMBEDS, {"tooltip": "From T5 Encode (EasyAnimate)."}),
                "vae": (VAE, {"tooltip": "The model's VAE: it encodes start images / input videos and the inpaint mask."}),
                "width": ("INT", {"default": 672, "min": 16, "max": 2048, "step": 16,
                                  "tooltip": "Video width in pixels, a multiple of 16 (V1: 32). 512-px models: 672x384; "
                                             "768: 1008x576; 960: 1280x720."}),
                "height": ("INT", {"default": 384, "min": 16, "max": 2048, "step": 16,
                                   "tooltip": "Video height in pixels, a multiple of 16 (V1: 32)."}),
                "frames": ("INT", {"default": 48, "min": 1, "max": 1024,
                                   "tooltip": "Number of frames. V3 makes 1 or multiples of 8, V2 1 or multiples of 9; other "
                                              "counts are rounded down as the reference does (reported in the log)."}),
                "seed": ("INT", {"default": 43, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                                 "tooltip": "Seed of the start noise (and of the VAE's samples)."}),
                "steps": ("INT", {"default": 25, "min": 1, "max": 1000, "tooltip": "Denoising steps (reference: 25 for V3)."}),
                "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 50.0, "step": 0.1,
                                  "tooltip": "Classifier-free guidance scale; 1 or less turns guidance off (reference: 7)."}),
                "sampler_name": (list(SAMPLER_NAMES), {"default": "Euler",
                                                       "tooltip": "Sampler, as in the official nodes (Euler is their default)."}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                                      "tooltip": "1 = from pure noise. Below 1 needs an input video: how much of it is redrawn."}),
            },
            "optional": {
                "start_image": ("IMAGE", {"tooltip": "Image-to-video: the first frame(s) (V3 InP models)."}),
                "end_image": ("IMAGE", {"tooltip": "Image-to-video: the last frame (needs a start image)."}),
                "video": ("IMAGE", {"tooltip": "Video-to-video: the input frames (use with denoise < 1)."}),
                "clip_apply_ratio": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05,
                                               "tooltip": "Image-to-video: fraction of the last steps that see the CLIP "
                                                          "image tokens (reference 0.5)."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64,
                                       "tooltip": "Number of videos (candidates), one after the other with seeds seed, "
                                                  "seed+1, ...; decoded, they come out back to back (pick one with "
                                                  "MuLTI Video-Text Score)."}),
            },
        }

    def sample(self, model, embeds, vae, width, height, frames, seed, steps, cfg, sampler_name, denoise,
               start_image=None, end_image=None, video=None, clip_apply_ratio=0.5, batch_size=1):
        from ..easyanimate.errors import check_seed
        from ..easyanimate.pipeline import generate

        runtime = host.current_host()
        if batch_size < 1:
            raise EasyAnimateError(f"batch_size must be at least 1 (the number of videos to make); got {batch_size}.")
        check_seed(seed)
        check_seed(seed + batch_size - 1, "seed of the last video (seed + batch_size - 1)")
        transformer = model.transformer.module
        count = vae.vae.rules.round_frames(frames)
        if count.changed:
            log.warning("EasyAnimate: %d frames is not a count this model makes; generating %d.", frames, count.frames)
        video_in = images_to_frames(video).transpose(0, 1)[None] if video is not None else None
        starts = images_to_frames(start_image) if start_image is not None else None
        ends = images_to_frames(end_image[-1:]) if end_image is not None else None
        image_encoder = clip_component = None
        if starts is not None and transformer.config.has_clip_projection:
            if model.image_encoder is None:
                log.warning("EasyAnimate: this model folder has no image_encoder/; image-to-video runs without CLIP tokens.")
            else:
                image_encoder, clip_component = model.image_encoder.get()

        placement = runtime.placement(transformer=model.transformer, vae=vae.component, image_encoder=clip_component)
        report = StepReport(runtime.progress(steps * batch_size),
                            runtime.latent_previewer(lambda: preview_factors(runtime, vae)))
        results = []
        for candidate in range(batch_size):
            latents = generate(
                transformer, vae.vae, embeds.positive, embeds.negative,
                frames=count.frames, height=height, width=width, steps=steps, guidance_scale=cfg,
                sampler=sampler_name, scheduler_config=model.scheduler_config, seed=seed + candidate,
                start_images=starts, end_images=ends, video=video_in, strength=denoise,
                image_encoder=image_encoder, clip_apply_ratio=clip_apply_ratio,
                callback=report.for_candidate(candidate, batch_size), placement=placement,
            )
            results.append(latents.to(runtime.intermediate_device, torch.float32))
        return ({"samples": torch.cat(results)},)


def preview_factors(runtime, vae):
    """The VAE's latent->RGB preview factors, fitted once per loaded VAE."""
    cache = vae.preview_cache
    if "factors" not in cache:
        with runtime.placed([vae.component]):
            cache["factors"] = vae.vae.latent_rgb_factors()
    return cache["factors"]


class StepReport:
    """Turns the pipeline's step callbacks into the host's progress (one bar for all videos of a batch),
    with a preview of the middle latent frame, as ComfyUI's own previews show one image."""

    def __init__(self, progress, previewer=None):
        self.progress, self.previewer = progress, previewer

    def for_candidate(self, candidate: int, count: int):
        def on_step(done, total, latents):
            preview = None
            if self.previewer is not None:
                middle = latents.shape[2] // 2
                preview = self.previewer.decode_latent_to_preview_image("JPEG", latents[:, :, middle:middle + 1].float())
            self.progress.update(candidate * total + done, total * count, preview)
        return on_step
