"""What the samplers share: the Sampler interface, config resolution, and for the five DDPM samplers the
training noise schedule and timestep spacing.

EasyAnimate V1–V3 were trained as a DDPM with 1000 steps and linear betas 1e-4 ... 0.02; the five DDPM
samplers walk that same schedule, only the choice of timesteps and the update rule differ. (V5.1 is a
flow-matching model; its sampler, samplers/flow.py, replaces the schedule with its own σ table.) The
numbers must match diffusers 0.28.2 bit for bit where the reference pipelines used it, so tables are built with the
same dtypes and the same numpy/torch operations (float32 betas, numpy `linspace`/`interp`/`round`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import EasyAnimateError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


# ----------------------------------------------------------------------------------------------------
# Config data
# ----------------------------------------------------------------------------------------------------

def sampler_classes() -> dict:
    """{sampler name: {"diffusers_class": ..., "defaults": {...}}} from configs/scheduler_classes.json."""
    data = json.loads((CONFIG_DIR / "scheduler_classes.json").read_text())
    return {name: entry for name, entry in data.items() if not name.startswith("_")}


def scheduler_class_families() -> dict:
    """{diffusers scheduler class name: "ddpm" | "flow"} (configs/scheduler_classes.json `_class_families`)."""
    data = json.loads((CONFIG_DIR / "scheduler_classes.json").read_text())
    return dict(data.get("_class_families", {}))


def yaml_scheduler_kwargs() -> dict:
    """The V1–V3 YAML `noise_scheduler_kwargs` (configs/scheduler_yaml_v1_v3.json)."""
    data = json.loads((CONFIG_DIR / "scheduler_yaml_v1_v3.json").read_text())
    return {key: value for key, value in data.items() if not key.startswith("_")}


def resolve_config(defaults: dict, given: dict) -> dict:
    """A class's full config from a partial one, following diffusers' `from_config` rule.

    Keys the class knows take the given value, everything else its default. Keys listed in the
    file's `_use_default_values` were defaults of whoever saved it, so they are not carried over.
    Keys the class does not know (e.g. DPM-Solver's `solver_order` when building DDIM) are dropped.
    """
    not_carried = set(given.get("_use_default_values", []))
    return {
        key: given[key] if key in given and key not in not_carried else default
        for key, default in defaults.items()
    }


def check_supported(config: dict, supported: dict, sampler_name: str) -> None:
    """Refuse config values this implementation does not reproduce, instead of sampling wrongly."""
    for key, allowed in supported.items():
        if key in config and config[key] not in allowed:
            raise EasyAnimateError(
                f"{sampler_name}: scheduler setting {key}={config[key]!r} is not supported "
                f"(supported: {', '.join(repr(a) for a in allowed)}); the released EasyAnimate configs this "
                f"sampler reproduces use {allowed[0]!r}. Fix the scheduler_config.json or pick another sampler."
            )


# ----------------------------------------------------------------------------------------------------
# Training noise schedule (docs/numerics.md#training-noise-schedule)
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NoiseSchedule:
    """The DDPM forward process the model was trained on, indexed by training timestep 0…T-1."""

    betas: torch.Tensor            # (T,) float32
    alphas_cumprod: torch.Tensor   # (T,) float32, ᾱ_t
    num_train_timesteps: int

    @property
    def sigmas(self) -> torch.Tensor:
        """σ_t = √((1−ᾱ_t)/ᾱ_t), the noise level of x_t/√ᾱ_t (the "Karras" / Euler parameterisation)."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5


def make_noise_schedule(config: dict) -> NoiseSchedule:
    """Betas exactly as diffusers builds them (float32 torch ops, so ᾱ matches to the last bit)."""
    count = int(config["num_train_timesteps"])
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
    elif config["beta_schedule"] == "linear":
        betas = torch.linspace(config["beta_start"], config["beta_end"], count, dtype=torch.float32)
    elif config["beta_schedule"] == "scaled_linear":
        betas = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, count, dtype=torch.float32) ** 2
    else:
        raise EasyAnimateError(
            f"beta_schedule {config['beta_schedule']!r} is not supported (use 'linear', as every "
            "EasyAnimate V1–V3 release does, or 'scaled_linear'). Fix the scheduler_config.json."
        )
    return NoiseSchedule(betas=betas, alphas_cumprod=torch.cumprod(1.0 - betas, dim=0), num_train_timesteps=count)


# ----------------------------------------------------------------------------------------------------
# Timestep spacing
# ----------------------------------------------------------------------------------------------------

def spaced_timesteps(spacing: str, steps: int, num_train: int, steps_offset: int) -> np.ndarray:
    """`steps` training timesteps from high to low, as float64, before each sampler rounds them.

    linspace: evenly from T−1 down to 0, both ends included (not rounded here: Euler keeps the
              fractions, DDIM/PNDM round half to even).
    leading:  0, r, 2r, … with r = T // steps, shifted up by steps_offset (the YAML route's 1).
    trailing: T, T − T/steps, … rounded, minus one, so the first is T−1.
    """
    if spacing == "linspace":
        return np.linspace(0, num_train - 1, steps)[::-1].copy()
    if spacing == "leading":
        ratio = num_train // steps
        return (np.arange(0, steps) * ratio).round()[::-1].copy() + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(num_train, 0, -num_train / steps)) - 1
    raise EasyAnimateError(f"timestep_spacing {spacing!r} is not supported; use 'linspace', 'leading' or 'trailing'.")


def check_steps(steps, num_train: int, sampler_name: str) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise EasyAnimateError(f"{sampler_name}: steps must be a whole number, got {steps!r}.")
    if not 1 <= steps <= num_train:
        raise EasyAnimateError(f"{sampler_name}: steps must be between 1 and {num_train}, got {steps}.")
    return int(steps)


# ----------------------------------------------------------------------------------------------------
# Random draws
# ----------------------------------------------------------------------------------------------------

def draw_noise(like: torch.Tensor, generator: torch.Generator | None, sampler_name: str) -> torch.Tensor:
    """Unit normal noise shaped like `like`, drawn on the generator's own device (as the reference's
    `randn_tensor` does: a CPU generator gives the same numbers whatever device the model runs on)."""
    if generator is None:
        raise EasyAnimateError(
            f"{sampler_name} adds fresh noise at every step: pass a torch.Generator (seeded) so the "
            "result is reproducible."
        )
    noise = torch.randn(like.shape, generator=generator, device=generator.device, dtype=like.dtype)
    return noise.to(like.device)


# ----------------------------------------------------------------------------------------------------
# Base class
# ----------------------------------------------------------------------------------------------------

class Sampler:
    """One sampler, configured; `set_timesteps` starts a run, then `step` is called once per timestep.

    Steps are addressed by their index into `timesteps` (0 = noisiest). Multistep samplers keep a
    short history of model outputs; it is cleared by `set_timesteps` and `reset`.
    """

    name: str = ""
    # What the model was trained as: "ddpm" (V1–V3, V5: a DDPM noise schedule) or "flow" (V5.1).
    family: str = "ddpm"
    # Settings this implementation reproduces: {config key: allowed values, the release's first}.
    SUPPORTED: dict = {}

    def __init__(self, config: dict):
        check_supported(config, self.SUPPORTED, self.name)
        self.config = dict(config)
        self.schedule = self.make_schedule(config)
        self.timesteps: torch.Tensor | None = None
        self.num_inference_steps: int | None = None

    def make_schedule(self, config: dict):
        """The training schedule the sampler walks (the DDPM betas here; flow samplers override it)."""
        return make_noise_schedule(config)

    # -- to be provided by each sampler ------------------------------------------------------------

    def set_timesteps(self, steps: int) -> None:
        raise NotImplementedError

    def step(self, model_output: torch.Tensor, index: int, sample: torch.Tensor,
             generator: torch.Generator | None = None, eta: float = 0.0) -> torch.Tensor:
        """x at timesteps[index] → x at the next timestep, given the model's ε prediction."""
        raise NotImplementedError

    def add_noise(self, clean: torch.Tensor, noise: torch.Tensor, index: int) -> torch.Tensor:
        """Noise clean latents to the level of timesteps[index] (video-to-video start)."""
        raise NotImplementedError

    # -- shared defaults ---------------------------------------------------------------------------

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the starting latents (unit noise is multiplied by it)."""
        return 1.0

    def scale_model_input(self, sample: torch.Tensor, index: int) -> torch.Tensor:
        """What the model sees at this step (identity except for the σ-parameterised Euler samplers)."""
        return sample

    def reset(self) -> None:
        """Forget the history of a previous (possibly cancelled) run; timesteps are kept."""

    def require_timesteps(self) -> torch.Tensor:
        if self.timesteps is None:
            raise RuntimeError(f"{self.name}: call set_timesteps(steps) before sampling.")
        return self.timesteps

    def __repr__(self) -> str:
        steps = None if self.timesteps is None else len(self.timesteps)
        return f"<{self.name} sampler, {steps} timesteps, spacing {self.config.get('timestep_spacing')!r}>"


def alpha_bar_at(schedule: NoiseSchedule, timestep: int, final: torch.Tensor) -> torch.Tensor:
    """ᾱ at a training timestep; below 0 (past the end of the chain) the sampler's final value."""
    return schedule.alphas_cumprod[timestep] if timestep >= 0 else final


def ddpm_add_noise(schedule: NoiseSchedule, clean: torch.Tensor, noise: torch.Tensor, timestep: int) -> torch.Tensor:
    """√ᾱ_t·x0 + √(1−ᾱ_t)·ε in the latents' dtype (DDIM/PNDM `add_noise`)."""
    alpha_bar = schedule.alphas_cumprod.to(device=clean.device, dtype=clean.dtype)[timestep]
    return alpha_bar ** 0.5 * clean + (1 - alpha_bar) ** 0.5 * noise
