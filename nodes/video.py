"""VAE nodes: decode latents to frames slice by slice, encode frames to latents."""
from __future__ import annotations

import itertools

import torch

from ..easyanimate.errors import MAX_SEED, EasyAnimateError
from . import host
from .handles import VAE
from .sampling import images_to_frames

TILING = ["model default", "off", "on"]


def _tiling(mode: str, tile_size: int, overlap: float):
    from ..easyanimate.vae import Tiling

    if mode not in TILING:
        raise EasyAnimateError(f"tiling must be one of {', '.join(repr(t) for t in TILING)}; got {mode!r}.")
    if mode == "off":
        return False
    if mode == "on":
        return Tiling(tile_size, overlap)
    return None


def _tiling_inputs():
    return {
        "tiling": (TILING, {"default": "model default", "tooltip": "Spatial tiling. model default: as the VAE config says "
                            "(on for V3, 384 px tiles). on: always, with the tile size below (less memory, slightly "
                            "different pixels at tile borders)."}),
        "tile_size": ("INT", {"default": 384, "min": 64, "max": 2048, "step": 32,
                              "tooltip": "Tile size in pixels when tiling is on."}),
        "tile_overlap": ("FLOAT", {"default": 0.25, "min": 0.0, "max": 0.75, "step": 0.05,
                                   "tooltip": "Fraction of a tile that overlaps its neighbour (blended)."}),
    }


class EasyAnimateSliceVAEDecode:
    DESCRIPTION = (
        "Decodes EasyAnimate latents into frames slice by slice (V3: 2 latents -> 8 frames; V5/V5.1: the causal VAE "
        "streams one latent at a time, 1 + 4k frames from 1 + k latents), writing each slice into the output and "
        "freeing it before the next, so memory does not grow with the video length. Stops on Cancel."
    )
    CATEGORY = "EasyAnimate"
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("frames",)
    OUTPUT_TOOLTIPS = ("The video as a batch of frames, ready for Create Video / Save Video.",)
    FUNCTION = "decode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": (VAE, {"tooltip": "The model's VAE (from Load EasyAnimate)."}),
                "samples": ("LATENT", {"tooltip": "Latents from the EasyAnimate Sampler."}),
                **_tiling_inputs(),
                "smooth": ("BOOLEAN", {"default": False, "tooltip": "V1–V3: the reference's seam-smoothing pass: "
                           "re-encode and decode the middle frames and average (about 2x the time; needed for pixel "
                           "parity with the reference). The V5/V5.1 VAE has no seams and no such pass: leave it off."}),
                "smooth_seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED,
                                        "tooltip": "Seed of the smoothing pass's sample (used only when smooth is on)."}),
            },
        }

    def decode(self, vae, samples, tiling, tile_size, tile_overlap, smooth, smooth_seed):
        from ..easyanimate.errors import check_seed

        latents = samples["samples"]
        if latents.ndim != 5:
            raise EasyAnimateError(f"EasyAnimate latents are 5-D (batch, channels, frames, height, width); got "
                                   f"{tuple(latents.shape)}. Connect the EasyAnimate Sampler's output.")
        if smooth and vae.vae.rules.streaming:
            raise EasyAnimateError("The EasyAnimate V5/V5.1 VAE has no smoothing pass (its causal decode has no seams "
                                   "between slices, and the V5 pipelines do not smooth): turn smooth off.")
        tiles = _tiling(tiling, tile_size, tile_overlap)
        generator = torch.Generator().manual_seed(check_seed(smooth_seed, "smooth_seed")) if smooth else None
        runtime = host.current_host()
        plan = vae.vae.rules.decode_plan(latents.shape[2])
        progress = runtime.progress(len(plan) * (3 if smooth else 1))
        slices_done = itertools.count(1)
        memory = vae.vae.activation_bytes(latents.shape[-2:], decode=True, batch=latents.shape[0], tiling=tiles)
        with runtime.placed([vae.component], memory):
            video = vae.vae.decode_video(
                latents, smooth=smooth, generator=generator, tiling=tiles, memory_budget=runtime.budget_bytes,
                out_device=runtime.intermediate_device, progress=lambda _i, _n: progress.update(next(slices_done)),
            )
        # (B, 3, F, H, W) -> IMAGE (B*F, H, W, 3)
        return (video.permute(0, 2, 3, 4, 1).reshape(-1, *video.shape[-2:], 3).float(),)


class EasyAnimateVAEEncode:
    DESCRIPTION = (
        "Encodes frames into EasyAnimate latents (scaled as the sampler uses them), slice by slice. V5/V5.1: 1 + 4k "
        "frames (1, 5, 9, ..., 49) give 1 + k latents with 16 channels."
    )
    CATEGORY = "EasyAnimate"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("samples",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae": (VAE, {"tooltip": "The model's VAE."}),
                "frames": ("IMAGE", {"tooltip": "Frames to encode (a video is a batch of frames; V5/V5.1: 1 + 4k "
                                                "of them)."}),
                **_tiling_inputs(),
                "sample": ("BOOLEAN", {"default": False, "tooltip": "Draw a sample of the posterior (as the V1–V3 "
                           "reference pipelines do) instead of taking its mean (the mode, as the V5/V5.1 pipelines do)."}),
                "sample_seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "tooltip": "Seed of that sample."}),
            },
        }

    def encode(self, vae, frames, tiling, tile_size, tile_overlap, sample, sample_seed):
        from ..easyanimate.errors import check_finite, check_seed

        tiles = _tiling(tiling, tile_size, tile_overlap)
        generator = torch.Generator().manual_seed(check_seed(sample_seed, "sample_seed")) if sample else None
        video = check_finite(images_to_frames(frames), "frames to encode").transpose(0, 1)[None] * 2 - 1
        runtime = host.current_host()
        progress = runtime.progress(len(vae.vae.rules.encode_plan(video.shape[2])))
        memory = vae.vae.activation_bytes(video.shape[-2:], decode=False, tiling=tiles)
        with runtime.placed([vae.component], memory):
            latents = vae.vae.encode_latents(
                video, sample=sample, generator=generator, tiling=tiles, memory_budget=runtime.budget_bytes,
                progress=lambda i, n: progress.update(i),
            )
        return ({"samples": latents.to(runtime.intermediate_device, torch.float32)},)
