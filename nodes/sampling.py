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


AUTO_SAMPLER = "auto"  # the model's own: Flow for V5.1, Euler for V1–V3 and V5


# The V5/V5.1 control inputs, shared by the EasyAnimate Sampler and EasyAnimate To Video (native).
CONTROL_INPUTS = {
    "control_video": ("IMAGE", {"tooltip": "V5/V5.1 Control models: the control frames you made (canny, "
                                           "depth, pose, trajectory, ...), at least as many as the video; "
                                           "resized to the video size."}),
    "reference_image": ("IMAGE", {"tooltip": "V5.1 Control and Control-Camera models: what the first frame "
                                             "should look like (its first image is used; resized)."}),
    "camera_poses": ("STRING", {"multiline": True, "default": "",
                                "tooltip": "V5.1 Control-Camera models: the camera path, one line per frame "
                                           "of 19 numbers (timestamp fx fy cx cy 0 0 and the 3x4 world-to-"
                                           "camera matrix; a CameraCtrl / RealEstate10K pose file's lines, "
                                           "whose first line, the source address, may be left in), or the "
                                           "name of such a file in ComfyUI's input folder. Empty: none."}),
    "camera_pose_stride": ("INT", {"default": 1, "min": 1, "max": 24,
                                   "tooltip": "Camera poses: use every N-th line (1, as the reference's "
                                              "ComfyUI nodes; its predict script takes every 3rd line of a "
                                              "24 fps pose file for an 8 fps video)."}),
}


class EasyAnimateSampler:
    DESCRIPTION = (
        "Generates video latents. Text-to-video with only the embeddings; image-to-video with a start image (and "
        "optionally an end image; InP models); video-to-video with an input video and denoise < 1. EasyAnimate "
        "V5/V5.1 also: a control video (Control models, with a reference image on V5.1), camera poses (V5.1 "
        "Control-Camera models, with a reference image), the Flow sampler's shift and TeaCache. Decode the result "
        "with Slice VAE Decode."
    )
    CATEGORY = "EasyAnimate"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("samples",)
    OUTPUT_TOOLTIPS = ("Video latents (batch, latent channels, latent frames, height/8, width/8).",)
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        from ..easyanimate.sampling import SAMPLER_NAMES

        # New inputs go at the end, as optional ones: saved UI workflows hold their widget values by position, so
        # an input added earlier would shift every value after it; the frontend gives missing trailing widgets
        # their defaults, and an API prompt that leaves an optional input out gets the function's default.
        return {
            "required": {
                "model": (MODEL, {"tooltip": "From Load EasyAnimate (optionally through LoRA loaders)."}),
                "embeds": (TEXT_EMBEDS, {"tooltip": "From T5 Encode (V1–V3) or Text Encode V5/V5.1 (V5/V5.1)."}),
                "vae": (VAE, {"tooltip": "The model's VAE: it encodes start images, input and control videos, reference "
                                         "images and the inpaint mask."}),
                "width": ("INT", {"default": 672, "min": 16, "max": 2048, "step": 16,
                                  "tooltip": "Video width in pixels, a multiple of 16 (V1: 32). 512-px models: 672x384; "
                                             "768: 1008x576; 960: 1280x720. V5/V5.1: 672x384 or 1008x576."}),
                "height": ("INT", {"default": 384, "min": 16, "max": 2048, "step": 16,
                                   "tooltip": "Video height in pixels, a multiple of 16 (V1: 32)."}),
                "frames": ("INT", {"default": 49, "min": 1, "max": 1024,
                                   "tooltip": "Number of frames. V5/V5.1 make 1 + 4k (49 as the reference), V3 1 or "
                                              "multiples of 8, V2 1 or multiples of 9; other counts are rounded down as "
                                              "the reference does (reported in the log)."}),
                "seed": ("INT", {"default": 43, "min": 0, "max": MAX_SEED, "control_after_generate": True,
                                 "tooltip": "Seed of the start noise (and of the VAE's samples)."}),
                "steps": ("INT", {"default": 25, "min": 1, "max": 1000,
                                  "tooltip": "Denoising steps (the reference: 25 for V3 and in its V5/V5.1 ComfyUI nodes, "
                                             "50 in its V5/V5.1 scripts)."}),
                "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 50.0, "step": 0.1,
                                  "tooltip": "Classifier-free guidance scale; 1 or less turns guidance off (reference: 7; "
                                             "6 in the V5/V5.1 scripts)."}),
                "sampler_name": ([AUTO_SAMPLER, *SAMPLER_NAMES], {
                    "default": AUTO_SAMPLER,
                    "tooltip": "auto: the model's own (Flow for V5.1, Euler for V1–V3 and V5). Flow runs only V5.1 (a "
                               "flow-matching model); Euler, Euler A, DPM++, PNDM and DDIM run V1–V3 and V5. A sampler "
                               "of the other kind is refused."}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01,
                                      "tooltip": "1 = from pure noise. Below 1 needs an input video: how much of it is "
                                                 "redrawn (the video-to-video strength; the V5/V5.1 reference uses 0.7)."}),
            },
            "optional": {
                "start_image": ("IMAGE", {"tooltip": "Image-to-video: the first frame(s) (InP models: V3, V5, V5.1)."}),
                "end_image": ("IMAGE", {"tooltip": "Image-to-video: the last frame (needs a start image)."}),
                "video": ("IMAGE", {"tooltip": "Video-to-video: the input frames (use with denoise < 1)."}),
                "clip_apply_ratio": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05,
                                               "tooltip": "V3 image-to-video: fraction of the last steps that see the "
                                                          "CLIP image tokens (reference 0.5). V5/V5.1 have no CLIP image."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64,
                                       "tooltip": "Number of videos (candidates), one after the other with seeds seed, "
                                                  "seed+1, ...; decoded, they come out back to back (pick one with "
                                                  "MuLTI Video-Text Score)."}),
                "shift": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.1,
                                    "tooltip": "V5.1 Flow sampler: the noise schedule's shift s (sigma -> s*sigma/(1 + "
                                               "(s-1)*sigma)); above 1 spends more steps at high noise. 0: the release's "
                                               "scheduler_config.json (1.0 in the releases)."}),
                **CONTROL_INPUTS,
                "teacache_threshold": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                                                 "tooltip": "V5.1 TeaCache: skip transformer steps whose input barely "
                                                            "changed and reuse the last computed one's residual. 0 = off; "
                                                            "0.05 to 0.1 (the reference: 0.08 in its scripts, 0.1 in its "
                                                            "ComfyUI nodes); higher is faster and less exact."}),
            },
        }

    def sample(self, model, embeds, vae, width, height, frames, seed, steps, cfg, sampler_name, denoise,
               start_image=None, end_image=None, video=None, clip_apply_ratio=0.5, batch_size=1, shift=0.0,
               control_video=None, reference_image=None, camera_poses="", camera_pose_stride=1, teacache_threshold=0.0):
        from ..easyanimate.errors import check_seed
        from ..easyanimate.pipeline import generate, stages_for

        runtime = host.current_host()
        if batch_size < 1:
            raise EasyAnimateError(f"batch_size must be at least 1 (the number of videos to make); got {batch_size}.")
        check_seed(seed)
        check_seed(seed + batch_size - 1, "seed of the last video (seed + batch_size - 1)")
        transformer = model.transformer.module
        stages = stages_for(transformer, vae.vae)  # refuses a VAE of another family before anything runs
        scheduler = scheduler_with_shift(model, shift)
        teacache = teacache_setting(model.family, teacache_threshold)
        count = vae.vae.rules.round_frames(frames)
        if count.changed:
            log.warning("EasyAnimate: %d frames is not a count this model makes; generating %d.", frames, count.frames)
        rays = camera_rays(stages, camera_poses, camera_pose_stride, height, width, count.frames)
        video_in = images_to_video(video)
        starts = images_to_frames(start_image) if start_image is not None else None
        ends = images_to_frames(end_image[-1:]) if end_image is not None else None
        control = images_to_video(control_video)
        reference = images_to_frames(reference_image[:1]) if reference_image is not None else None
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
                sampler=None if sampler_name == AUTO_SAMPLER else sampler_name, scheduler_config=scheduler,
                seed=seed + candidate, start_images=starts, end_images=ends, video=video_in, strength=denoise,
                image_encoder=image_encoder, clip_apply_ratio=clip_apply_ratio,
                control_video=control, reference_image=reference, control_camera=rays, teacache=teacache,
                callback=report.for_candidate(candidate, batch_size), placement=placement,
            )
            results.append(latents.to(runtime.intermediate_device, torch.float32))
        return ({"samples": torch.cat(results)},)


def images_to_video(images) -> "torch.Tensor | None":
    """ComfyUI IMAGE frames (F, H, W, 3) -> the core's video (1, 3, F, H, W) in [0, 1]; None stays None."""
    return None if images is None else images_to_frames(images).transpose(0, 1)[None]


def scheduler_with_shift(model, shift: float):
    """The release's scheduler config, with the Flow sampler's shift replaced when `shift` is not 0."""
    from ..easyanimate.pipeline import FAMILY_NAMES
    from ..easyanimate.sampling import with_flow_shift

    if not shift:
        return model.scheduler_config
    if model.family != "v51":
        raise EasyAnimateError(f"shift is a setting of the Flow sampler of EasyAnimate V5.1 models; this model is "
                               f"{FAMILY_NAMES[model.family]}. Set shift to 0.")
    if model.scheduler_config is None:
        raise EasyAnimateError("This model folder has no scheduler/scheduler_config.json for the Flow sampler to "
                               "shift; add the release's scheduler/ folder.")
    return with_flow_shift(model.scheduler_config, shift)


def teacache_setting(family: str, threshold: float):
    """The `teacache` argument of `generate`: None for 0 (off), else the threshold (V5.1 only from the node)."""
    from ..easyanimate.pipeline import FAMILY_NAMES

    if not threshold:
        return None
    if family != "v51":
        raise EasyAnimateError(
            f"teacache_threshold works with EasyAnimate V5.1 models (its coefficients were fitted on them, and the "
            f"reference turns TeaCache off for V5); this model is {FAMILY_NAMES[family]}. Set teacache_threshold to 0."
        )
    return float(threshold)


def camera_rays(stages, poses: str, stride: int, height: int, width: int, frames: int):
    """Plücker rays (1, 6, frames, height, width) from the camera_poses text (or file name), or None when it is
    empty. Refused before any compute for a model that takes no camera (checked first: the rays of a 49-frame
    576x1008 video take about 0.7 GB)."""
    from ..easyanimate.camera import plucker_rays

    if not poses or not poses.strip():
        return None
    if not getattr(stages, "camera_model", False):
        name = getattr(stages.transformer.config, "name", "this model")
        raise EasyAnimateError(f"camera_poses need an EasyAnimate V5.1 Control-Camera model; {name} is not one. "
                               "Clear camera_poses.")
    return plucker_rays(pose_source(poses), height, width, frames=frames, stride=stride)


def pose_source(text: str):
    """Pose rows (lists of number strings) from pasted lines, or a pose file in ComfyUI's input folder when the
    text is one line that is not numbers (a file name). Of several lines, a first one that is not numbers (a pose
    file's source address) is skipped, as in a pose file; the rows are checked by `camera.pose_rows`."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if len(lines) == 1 and not _all_numbers(lines[0]):
        return host.resolve_input_file(lines[0])
    if lines and not _all_numbers(lines[0]):
        lines = lines[1:]
    return [line.split() for line in lines]


def _all_numbers(line: str) -> bool:
    return all(_is_number(value) for value in line.split())


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


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
