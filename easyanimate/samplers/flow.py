"""Flow-matching Euler ("Flow"): the sampler of EasyAnimate V5.1 (diffusers FlowMatchEulerDiscrete).

V5.1 is a rectified-flow model: training mixes x_σ = (1 − σ)·x0 + σ·ε with σ = t/1000 and the model
predicts the velocity v = ε − x0 at timestep t = 1000·σ. Sampling walks σ from 1 down to a terminal 0
with plain Euler steps x ← x + (σ_next − σ)·v. There is no noise scaling: the start latents are unit
noise (init_noise_sigma 1) and the model sees the latents as they are (scale_model_input is the identity).

The table reproduces the reference's arithmetic, quirks included:
  * the class first builds a 1000-entry training table t = 1000, 999, …, 1 in float32 and (without
    dynamic shifting) shifts it, σ' = s·σ/(1 + (s−1)·σ); only its ends σ_max, σ_min are used;
  * `set_timesteps(N)` spaces N timesteps evenly (float64) from 1000·σ_max to 1000·σ_min and shifts
    them **again** with the same formula. With shift 1 both shifts are the identity (1000, …, 1 and
    σ = t/1000); with shift ≠ 1 the second shift acts on already-shifted ends, so σ_min is not 0.001;
  * with `use_dynamic_shifting` the training table is not shifted and the N sigmas are mapped with
    σ' = e^μ/(e^μ + (1/σ − 1)); the EasyAnimate pipelines always pass μ = 1;
  * an optional `shift_terminal` stretches the schedule so its last σ equals that value;
  * timesteps = float32 σ × 1000, then a terminal σ = 0 is appended.
The Euler step runs in float32 (the sample is upcast; (σ_next − σ)·v keeps v's dtype) and is cast back
to the model output's dtype, so bf16 latents are rounded after every step as in the reference.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import EasyAnimateError
from .base import Sampler, check_steps

# μ the EasyAnimate V5.1 pipelines pass to set_timesteps (only used with use_dynamic_shifting).
PIPELINE_MU = 1.0


@dataclass(frozen=True)
class FlowSchedule:
    """The class's own 1000-entry table; only its two ends matter for sampling."""

    sigmas: torch.Tensor          # (T,) float32, σ for t = T, T−1, …, 1 (shifted unless dynamic)
    num_train_timesteps: int

    @property
    def sigma_max(self) -> float:
        return self.sigmas[0].item()

    @property
    def sigma_min(self) -> float:
        return self.sigmas[-1].item()


def _number(config: dict, key: str, sampler_name: str, *, positive: bool = True) -> float:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or (positive and value <= 0):
        raise EasyAnimateError(f"{sampler_name}: scheduler setting {key}={value!r} must be a finite number"
                               f"{' above 0' if positive else ''}. Fix the scheduler_config.json.")
    return float(value)


class FlowMatchEulerSampler(Sampler):
    name = "Flow"
    family = "flow"
    SUPPORTED = {
        "invert_sigmas": [False],
        "use_karras_sigmas": [False],
        "use_exponential_sigmas": [False],
        "use_beta_sigmas": [False],
        "stochastic_sampling": [False],
        "time_shift_type": ["exponential", "linear"],   # "linear" only while dynamic shifting is off
    }

    def __init__(self, config: dict):
        super().__init__(config)
        self.shift = _number(self.config, "shift", self.name)
        terminal = self.config.get("shift_terminal")
        if terminal is not None and terminal is not False:
            terminal = _number(self.config, "shift_terminal", self.name, positive=False)
            if terminal and not 0 < terminal < 1:
                raise EasyAnimateError(f"{self.name}: shift_terminal={terminal!r} must be between 0 and 1 "
                                       "(the last noise level of the schedule). Fix the scheduler_config.json.")
        time_shift = self.config.get("time_shift_type", "exponential")
        if self.config.get("use_dynamic_shifting") and time_shift != "exponential":
            raise EasyAnimateError(
                f"{self.name}: time_shift_type={self.config['time_shift_type']!r} with use_dynamic_shifting is not "
                "supported (supported: 'exponential', the default). Fix the scheduler_config.json."
            )
        self.sigmas: torch.Tensor | None = None  # (steps + 1,) float32, CPU; the last is the terminal 0

    def make_schedule(self, config: dict) -> FlowSchedule:
        count = config["num_train_timesteps"]
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 1:
            raise EasyAnimateError(f"{self.name}: num_train_timesteps must be a whole number ≥ 1, got {count!r}.")
        count = int(count)
        train_t = torch.from_numpy(np.linspace(1, count, count, dtype=np.float32)[::-1].copy())
        sigmas = train_t / count
        if not config["use_dynamic_shifting"]:
            shift = _number(config, "shift", self.name)
            sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)     # float32, as the reference's __init__
        return FlowSchedule(sigmas=sigmas, num_train_timesteps=count)

    def set_timesteps(self, steps: int, mu: float = PIPELINE_MU) -> None:
        """The N timesteps and N + 1 sigmas of a run; `mu` only matters with use_dynamic_shifting."""
        count = self.schedule.num_train_timesteps
        steps = check_steps(steps, count, self.name)
        timesteps = np.linspace(self.schedule.sigma_max * count, self.schedule.sigma_min * count, steps)
        sigmas = timesteps / count                                      # float64 from here on
        if self.config["use_dynamic_shifting"]:
            if isinstance(mu, bool) or not isinstance(mu, numbers.Real) or not math.isfinite(mu):
                raise EasyAnimateError(f"{self.name}: mu must be a finite number, got {mu!r}.")
            sigmas = math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
        else:
            sigmas = self.shift * sigmas / (1 + (self.shift - 1) * sigmas)   # the second shift
        terminal = self.config.get("shift_terminal")
        if terminal:
            one_minus = 1 - sigmas
            sigmas = 1 - one_minus / (one_minus[-1] / (1 - terminal))
        sigmas = torch.from_numpy(sigmas).to(torch.float32)
        self.timesteps = sigmas * count
        self.sigmas = torch.cat([sigmas, torch.zeros(1)])
        self.num_inference_steps = steps

    def step(self, model_output, index, sample, generator=None, eta=0.0):
        """x at σ_index → x at σ_index+1 given the velocity; no randomness (generator and eta unused)."""
        self.require_timesteps()
        x = sample.to(torch.float32)
        x_next = x + (self.sigmas[index + 1] - self.sigmas[index]) * model_output
        return x_next.to(model_output.dtype)

    def add_noise(self, clean, noise, index):
        """σ·ε + (1 − σ)·x0 at σ = sigmas[index], in the latents' dtype (the reference's `scale_noise`)."""
        self.require_timesteps()
        sigma = self.sigmas.to(device=clean.device, dtype=clean.dtype)[index]
        return sigma * noise + (1.0 - sigma) * clean

    def __repr__(self) -> str:
        steps = None if self.timesteps is None else len(self.timesteps)
        shifting = "dynamic" if self.config["use_dynamic_shifting"] else f"shift {self.shift:g}"
        return f"<{self.name} sampler, {steps} timesteps, {shifting}>"
