"""Sampling: the EasyAnimate samplers and the classifier-free-guidance denoising loop.

Five DDPM samplers ("Euler", "Euler A", "DPM++", "PNDM", "DDIM") for the noise-prediction models
(V1–V3, V5) and the flow-matching Euler sampler ("Flow") for V5.1; `check_sampler_for_family` says
which go with which model, and `build_sampler` refuses a scheduler config of the other kind.

Typical use (what the pipeline does):

    sampler = build_sampler("Euler", model_folder)          # or build_sampler("Euler") for the YAML route
    sampler.set_timesteps(steps)
    start = first_step_for_strength(steps, strength)         # 0 unless video-to-video
    latents = start_latents(sampler, noise, start, video_latents if strength < 1 else None)
    latents = denoise(model_fn, latents, sampler, guidance_scale, start_index=start,
                      generator=generator, callback=progress)

Two ways to configure a sampler exist in the reference (docs/numerics.md#two-configuration-routes) and they
give different timesteps for DDIM and PNDM:
  * from a release's `scheduler/scheduler_config.json` (V3 ComfyUI nodes, predict_t2v.py): the file
    is a DPM-Solver config; every sampler takes the keys it knows from it and its own defaults for the
    rest (so DDIM/PNDM use the file's `linspace` spacing and DDIM keeps its default `clip_sample`);
  * from the era's YAML `noise_scheduler_kwargs` (V1–V3 scripts, Gradio UI): four keys over each
    class's defaults (so DDIM/PNDM use `leading` spacing with steps_offset 1).
Both are data: configs/scheduler_classes.json and configs/scheduler_yaml_v1_v3.json. V5 and V5.1 have
no YAML route: their samplers are built from the release's scheduler folder only ("Flow" refuses the
V1–V3 YAML route; pass {} for the class defaults).

The loop is the same for both kinds of model: a flow model's output is a velocity instead of a noise
prediction, guided the same way, and its sampler's `init_noise_sigma` (1) and `scale_model_input`
(identity) make the start latents and model input the plain latents.

Everything random comes from the caller's torch.Generator; nothing here touches the global RNG.
"""
from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from .errors import EasyAnimateError, LayoutError
from .samplers.base import (Sampler, resolve_config, sampler_classes, scheduler_class_families,
                            yaml_scheduler_kwargs)
from .samplers.ddim import DDIMSampler
from .samplers.dpm import DPMSolverSampler
from .samplers.euler import EulerAncestralSampler, EulerSampler
from .samplers.flow import FlowMatchEulerSampler
from .samplers.pndm import PNDMSampler

# Names as the reference ComfyUI nodes and Gradio UI spell them (their order, too; V5.1's "Flow" last).
SAMPLERS = {
    "Euler": EulerSampler,
    "Euler A": EulerAncestralSampler,
    "DPM++": DPMSolverSampler,
    "PNDM": PNDMSampler,
    "DDIM": DDIMSampler,
    "Flow": FlowMatchEulerSampler,
}
SAMPLER_NAMES = tuple(SAMPLERS)
DDPM_SAMPLER_NAMES = tuple(name for name, cls in SAMPLERS.items() if cls.family == "ddpm")
FLOW_SAMPLER_NAMES = tuple(name for name, cls in SAMPLERS.items() if cls.family == "flow")

# What each model family was trained as: its samplers must be of the same kind.
FAMILY_OBJECTIVES = {"v1": "ddpm", "v2": "ddpm", "v3": "ddpm", "v5": "ddpm", "v5.1": "flow"}
_OBJECTIVE_WORDS = {"ddpm": "DDPM", "flow": "flow-matching"}

SCHEDULER_CONFIG_FILE = "scheduler_config.json"


class SamplingCancelled(RuntimeError):
    """The progress callback asked to stop. Raised between steps; the caller's tensors are untouched."""

    def __init__(self, steps_done: int, total: int):
        super().__init__(f"sampling cancelled after {steps_done} of {total} steps")
        self.steps_done = steps_done
        self.total = total


# ----------------------------------------------------------------------------------------------------
# Building a sampler
# ----------------------------------------------------------------------------------------------------

def check_sampler_name(name) -> str:
    if name not in SAMPLERS:
        raise EasyAnimateError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLER_NAMES)}.")
    return name


def sampler_name_for(diffusers_class: str) -> str:
    """The sampler name for a diffusers scheduler class name, e.g. 'EulerDiscreteScheduler' → 'Euler'."""
    for name, entry in sampler_classes().items():
        if entry["diffusers_class"] == diffusers_class:
            return name
    known = ", ".join(entry["diffusers_class"] for entry in sampler_classes().values())
    raise EasyAnimateError(f"scheduler class {diffusers_class!r} is not one of the samplers ({known}).")


# ----------------------------------------------------------------------------------------------------
# Which samplers go with which model (DDPM vs flow matching)
# ----------------------------------------------------------------------------------------------------

def model_family(family) -> str:
    """A model family name in its canonical spelling: "v1", "v2", "v3", "v5" or "v5.1"."""
    text = str(family).strip().lower().removeprefix("easyanimate").strip(" -_")
    text = {"v51": "v5.1"}.get(text, text)
    if text not in FAMILY_OBJECTIVES:
        raise EasyAnimateError(
            f"unknown EasyAnimate model family {family!r}; known: {', '.join(FAMILY_OBJECTIVES)}."
        )
    return text


def samplers_for_family(family) -> tuple[str, ...]:
    """The sampler names that can run a model of this family (V5.1: ("Flow",); the others: the five)."""
    objective = FAMILY_OBJECTIVES[model_family(family)]
    return FLOW_SAMPLER_NAMES if objective == "flow" else DDPM_SAMPLER_NAMES


def scheduler_config_family(config: dict) -> Optional[str]:
    """"ddpm" or "flow" from a scheduler config's `_class_name`; None when it has no known class."""
    return scheduler_class_families().get(config.get("_class_name")) if isinstance(config, dict) else None


def scheduler_prediction(scheduler_config: Union[str, Path, dict]) -> str:
    """What a model predicts according to its scheduler config: "flow" for a flow-matching config, else
    the config's `prediction_type` (diffusers' default "epsilon" when absent). For `check_sampler_for_family`."""
    config = scheduler_config if isinstance(scheduler_config, dict) else load_scheduler_config(scheduler_config)
    if scheduler_config_family(config) == "flow":
        return "flow"
    return config.get("prediction_type") or "epsilon"


def _family_label(family: str) -> str:
    return "EasyAnimate " + family.upper()


def check_sampler_for_family(sampler_name, family, prediction: Optional[str] = None) -> str:
    """Refuse a sampler that cannot run a model of `family`; return the sampler name.

    V5.1 is a flow-matching model and runs only "Flow"; V1–V3 and V5 are DDPM models and run only the
    five DDPM samplers. `prediction` (optional) is what the model's scheduler config
    says it predicts (`scheduler_prediction`): "flow", "epsilon", "v_prediction", …; it must agree with
    the family, and a DDPM sampler must reproduce that prediction type.
    """
    name = check_sampler_name(sampler_name)
    family = model_family(family)
    objective = FAMILY_OBJECTIVES[family]
    allowed = samplers_for_family(family)
    if prediction is not None:
        said = "flow" if prediction == "flow" else "ddpm"
        if said != objective:
            raise EasyAnimateError(
                f"{_family_label(family)} is a {_OBJECTIVE_WORDS[objective]} model, but its scheduler config is "
                f"{_OBJECTIVE_WORDS[said]} ({prediction!r}): the scheduler folder does not belong to this model. "
                f"Use the scheduler/ folder of the {family.upper()} release."
            )
    sampler_family = SAMPLERS[name].family
    if sampler_family != objective:
        raise EasyAnimateError(
            f"sampler {name!r} is a {_OBJECTIVE_WORDS[sampler_family]} sampler and cannot run {_family_label(family)}, "
            f"a {_OBJECTIVE_WORDS[objective]} model; use {' or '.join(repr(a) for a in allowed)}."
        )
    if prediction is not None and prediction != "flow":
        supported = SAMPLERS[name].SUPPORTED.get("prediction_type")
        if supported and prediction not in supported:
            raise EasyAnimateError(
                f"{_family_label(family)}'s scheduler config says prediction_type {prediction!r}; sampler {name!r} "
                f"reproduces only {', '.join(repr(s) for s in supported)} prediction, so it cannot run this model."
            )
    return name


def find_scheduler_config(path: Union[str, Path]) -> Path:
    """The scheduler_config.json for a model folder, its `scheduler/` folder, or the file itself."""
    path = Path(path)
    for candidate in (path, path / SCHEDULER_CONFIG_FILE, path / "scheduler" / SCHEDULER_CONFIG_FILE):
        if candidate.is_file():
            return candidate
    raise LayoutError(
        f"no scheduler config at {path}: expected {SCHEDULER_CONFIG_FILE} there or in its 'scheduler/' "
        "folder (every EasyAnimate release has scheduler/scheduler_config.json)."
    )


def load_scheduler_config(path: Union[str, Path]) -> dict:
    file = find_scheduler_config(path)
    try:
        config = json.loads(file.read_text())  # Python's json reads the file's -Infinity as diffusers wrote it
    except (OSError, ValueError) as error:
        raise EasyAnimateError(f"cannot read scheduler config {file}: {error}") from error
    if not isinstance(config, dict):
        raise EasyAnimateError(f"scheduler config {file} is not a JSON object.")
    return config


def resolved_sampler_config(name: str, scheduler_config: Union[None, str, Path, dict] = None) -> dict:
    """The full config the named sampler runs with (see the module docstring for the two routes).

    A config whose `_class_name` is of the other kind (a flow-matching config for a DDPM sampler, or the
    reverse) is refused, as is "Flow" on the V1–V3 YAML route.
    """
    defaults = sampler_classes()[check_sampler_name(name)]["defaults"]
    sampler_family = SAMPLERS[name].family
    if scheduler_config is None:
        if sampler_family != "ddpm":
            raise EasyAnimateError(
                f"sampler {name!r} is a {_OBJECTIVE_WORDS[sampler_family]} sampler and needs the model's own "
                "scheduler config (the release's scheduler/ folder); without one the V1–V3 YAML defaults "
                f"apply, which are for the DDPM samplers ({', '.join(DDPM_SAMPLER_NAMES)})."
            )
        given = yaml_scheduler_kwargs()
    elif isinstance(scheduler_config, dict):
        given = scheduler_config
    else:
        given = load_scheduler_config(scheduler_config)
    config_family = scheduler_config_family(given)
    if config_family is not None and config_family != sampler_family:
        where = "" if isinstance(scheduler_config, dict) else f" at {scheduler_config}"
        usable = FLOW_SAMPLER_NAMES if config_family == "flow" else DDPM_SAMPLER_NAMES
        raise EasyAnimateError(
            f"the scheduler config{where} is a {_OBJECTIVE_WORDS[config_family]} config ({given['_class_name']}), "
            f"so it belongs to a {_OBJECTIVE_WORDS[config_family]} model; sampler {name!r} is for "
            f"{_OBJECTIVE_WORDS[sampler_family]} models. Use {' or '.join(repr(u) for u in usable)}."
        )
    return resolve_config(defaults, given)


def with_flow_shift(scheduler_config: Union[str, Path, dict], shift) -> dict:
    """A flow-matching (V5.1) scheduler config with its `shift` replaced, for `build_sampler("Flow", ...)`.

    The release's own config says 1.0; a larger shift keeps σ higher for longer (the "Flow" sampler applies it
    as the reference's scheduler does, see `samplers/flow.py`). Refused: a shift that is not a finite number
    above 0, a DDPM config (V1–V3, V5), and a config with dynamic shifting, which maps σ with μ and ignores
    `shift`."""
    if isinstance(shift, bool) or not isinstance(shift, numbers.Real) or not math.isfinite(shift) or shift <= 0:
        raise EasyAnimateError(f"The flow shift must be a finite number above 0 (the releases use 1.0); got {shift!r}.")
    config = dict(scheduler_config) if isinstance(scheduler_config, dict) else load_scheduler_config(scheduler_config)
    if scheduler_config_family(config) != "flow":
        raise EasyAnimateError(
            f"A shift applies to flow-matching scheduler configs (EasyAnimate V5.1); this one is "
            f"{config.get('_class_name', 'not a flow-matching config')}. Leave the shift unset."
        )
    if config.get("use_dynamic_shifting"):
        raise EasyAnimateError(
            "This scheduler config uses dynamic shifting (σ mapped with μ = 1, as the pipelines pass it), which "
            "ignores the shift. Leave the shift unset, or set use_dynamic_shifting false in scheduler_config.json."
        )
    return {**config, "shift": float(shift)}


def build_sampler(name: str, scheduler_config: Union[None, str, Path, dict] = None) -> Sampler:
    """A sampler by its reference name ("Euler", "Euler A", "DPM++", "PNDM", "DDIM", "Flow").

    scheduler_config: None for the era's YAML defaults (V1–V3; DDPM samplers only); a model folder, its
    `scheduler/` folder or a scheduler_config.json path for the release route (as
    `<Class>.from_pretrained(model, subfolder="scheduler")`); or an already-loaded config dict ({} gives
    the class defaults). Keys a sampler does not know are ignored; values it does not reproduce (e.g.
    `prediction_type` "v_prediction") are refused with the setting named.
    """
    return SAMPLERS[check_sampler_name(name)](resolved_sampler_config(name, scheduler_config))


# ----------------------------------------------------------------------------------------------------
# Where a run starts (video-to-video strength) and with what
# ----------------------------------------------------------------------------------------------------

def check_strength(strength) -> float:
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0 < strength <= 1:
        raise EasyAnimateError(f"denoise strength must be in (0, 1], got {strength!r}.")
    return float(strength)


def first_step_for_strength(steps: int, strength: float = 1.0) -> int:
    """Index of the first timestep to run: strength 1 runs them all, strength s the last ⌊steps·s⌋.

    The reference's `get_timesteps` rule, kept exactly (including float truncation, 0.29·100 → 28).
    For PNDM the same index applies to its longer table (the reference slices it the same way).
    """
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise EasyAnimateError(f"steps must be a whole number ≥ 1, got {steps!r}.")
    strength = check_strength(strength)
    kept = min(int(steps * strength), steps)
    if kept == 0:
        raise EasyAnimateError(
            f"denoise strength {strength} with {steps} steps leaves no step to run; "
            f"use at least {math.ceil(1 / strength)} steps or a higher strength."
        )
    return int(steps - kept)


def start_latents(sampler: Sampler, noise: torch.Tensor, start_index: int = 0,
                  video_latents: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Latents to start denoising from.

    Pure noise (strength 1, `video_latents` None): unit noise × init_noise_sigma.
    Video-to-video: the clean `video_latents` noised to the level of timesteps[start_index].
    """
    if video_latents is None:
        return noise * sampler.init_noise_sigma
    if video_latents.shape != noise.shape:
        raise EasyAnimateError(
            f"video latents {tuple(video_latents.shape)} and noise {tuple(noise.shape)} differ in shape."
        )
    return sampler.add_noise(video_latents, noise, start_index)


# ----------------------------------------------------------------------------------------------------
# The denoising loop
# ----------------------------------------------------------------------------------------------------

def apply_guidance(model_output: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance on a [negative, positive] batch: u + g·(c − u), on every channel."""
    unconditional, conditional = model_output.chunk(2)
    return unconditional + guidance_scale * (conditional - unconditional)


ModelFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
ProgressFn = Callable[[int, int, torch.Tensor], Optional[bool]]


def denoise(model_fn: ModelFn, latents: torch.Tensor, sampler: Sampler, guidance_scale: float, *,
            start_index: int = 0, generator: Optional[torch.Generator] = None, eta: float = 0.0,
            latent_channels: Optional[int] = None, callback: Optional[ProgressFn] = None) -> torch.Tensor:
    """Run the sampler from timesteps[start_index] to the end and return the final latents.

    model_fn(model_input, timestep, step) -> model output
        model_input: with guidance_scale > 1, the batch [latents, latents] (2B, first half for the
            negative prompt, second for the positive) after `scale_model_input`; otherwise B rows.
        timestep: the sampler's timestep broadcast to the batch (float32 for Euler/Euler A/Flow,
            int64 for the others), on the latents' device.
        step: 0-based position in this run (for rules such as the CLIP `clip_apply_ratio`; the run
            has len(sampler.timesteps) - start_index steps).
        It returns (batch, C_out, …) with C_out ≥ latent channels; guidance is applied to all C_out
        channels, then only the first `latent_channels` (default: the latents' channel count) are
        kept, which drops a learned-sigma half. (For "Flow" the output is the velocity ε − x0.)
    callback(steps_done, total, latents) is called after every step; returning False stops the run
        with SamplingCancelled (an exception the callback raises itself propagates unchanged).
    generator feeds Euler A's fresh noise and DDIM with eta > 0 (and the draw Euler makes to stay
        in step with the reference); eta is used by DDIM only.
    The caller's `latents` tensor is never modified.
    """
    timesteps = sampler.require_timesteps()
    if not 0 <= start_index < len(timesteps):
        raise EasyAnimateError(f"start_index {start_index} is outside the {len(timesteps)} timesteps.")
    if not math.isfinite(guidance_scale):
        raise EasyAnimateError(f"guidance scale must be a finite number, got {guidance_scale!r}.")
    use_guidance = guidance_scale > 1.0
    keep_channels = latents.shape[1] if latent_channels is None else latent_channels
    total = len(timesteps) - start_index

    sampler.reset()
    try:
        for step, index in enumerate(range(start_index, len(timesteps))):
            batch = torch.cat([latents] * 2) if use_guidance else latents
            model_input = sampler.scale_model_input(batch, index)
            timestep = timesteps[index][None].to(latents.device).expand(model_input.shape[0])

            output = model_fn(model_input, timestep, step)
            if output.shape[0] != model_input.shape[0] or output.shape[1] < keep_channels:
                raise ValueError(
                    f"model output {tuple(output.shape)} does not fit input {tuple(model_input.shape)} "
                    f"(need the same batch and at least {keep_channels} channels)."
                )
            if use_guidance:
                output = apply_guidance(output, guidance_scale)
            epsilon = output[:, :keep_channels]

            latents = sampler.step(epsilon, index, latents, generator=generator, eta=eta)
            if callback is not None and callback(step + 1, total, latents) is False:
                raise SamplingCancelled(step + 1, total)
    finally:
        sampler.reset()  # a later run never sees this run's multistep history
    return latents
