"""Euler and Euler-ancestral samplers (k-diffusion style, diffusers EulerDiscrete / EulerAncestralDiscrete).

They work in the σ parameterisation x = x0 + σ·ε, where σ_t = √((1−ᾱ_t)/ᾱ_t). The DDPM latent x_t is
x/√(σ²+1), which is why the model input is scaled by 1/√(σ²+1) and the start noise has std σ_max.
Timesteps are floats (linspace keeps fractions such as 749.25); σ at a fractional timestep is
linearly interpolated in the training σ table.
"""
from __future__ import annotations

import numpy as np
import torch

from .base import Sampler, check_steps, draw_noise, spaced_timesteps


class EulerSampler(Sampler):
    name = "Euler"
    SUPPORTED = {
        "prediction_type": ["epsilon"],
        "interpolation_type": ["linear"],
        "use_karras_sigmas": [False],
        "rescale_betas_zero_snr": [False],
        "final_sigmas_type": ["zero", "sigma_min"],
    }

    def __init__(self, config: dict):
        super().__init__(config)
        self.sigmas: torch.Tensor | None = None  # (steps + 1,) float32, CPU; the last is the end level

    def set_timesteps(self, steps: int) -> None:
        steps = check_steps(steps, self.schedule.num_train_timesteps, self.name)
        timesteps = spaced_timesteps(self.config["timestep_spacing"], steps,
                                     self.schedule.num_train_timesteps, self.config["steps_offset"])
        timesteps = timesteps.astype(np.float32)
        # σ table of the training schedule (float32), interpolated at the (fractional) timesteps in float64.
        train_sigmas = self.schedule.sigmas.numpy()
        sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        sigmas = np.concatenate([sigmas, [self._final_sigma()]]).astype(np.float32)
        self.timesteps = torch.from_numpy(timesteps)
        self.sigmas = torch.from_numpy(sigmas)
        self.num_inference_steps = steps

    def _final_sigma(self) -> float:
        if self.config.get("final_sigmas_type", "zero") == "sigma_min":
            return float(self.schedule.sigmas[0])
        return 0.0

    @property
    def init_noise_sigma(self) -> float:
        # diffusers returns σ_max itself for linspace/trailing spacing and √(σ_max²+1) for leading.
        sigmas = self.sigmas if self.sigmas is not None else self.schedule.sigmas
        sigma_max = sigmas.max()
        if self.config["timestep_spacing"] in ("linspace", "trailing"):
            return float(sigma_max)
        return float((sigma_max ** 2 + 1) ** 0.5)

    def scale_model_input(self, sample: torch.Tensor, index: int) -> torch.Tensor:
        self.require_timesteps()
        sigma = self.sigmas[index]
        return sample / ((sigma ** 2 + 1) ** 0.5)

    def step(self, model_output, index, sample, generator=None, eta=0.0):
        self.require_timesteps()
        # The reference draws (and, with s_churn = 0, never uses) one noise tensor per step from the
        # caller's generator; drawing it too keeps a generator shared across calls in step with it.
        if generator is not None:
            draw_noise(model_output, generator, self.name)
        sigma, sigma_next = self.sigmas[index], self.sigmas[index + 1]
        x = sample.to(torch.float32)
        denoised = x - sigma * model_output
        derivative = (x - denoised) / sigma
        x_next = x + derivative * (sigma_next - sigma)
        return x_next.to(model_output.dtype)

    def add_noise(self, clean, noise, index):
        self.require_timesteps()
        sigma = self.sigmas.to(device=clean.device, dtype=clean.dtype)[index]
        return clean + noise * sigma


class EulerAncestralSampler(EulerSampler):
    """Euler to a lower level σ_down, then fresh noise σ_up back up to σ_next (σ_down² + σ_up² = σ_next²)."""

    name = "Euler A"
    SUPPORTED = {
        "prediction_type": ["epsilon"],
        "rescale_betas_zero_snr": [False],
    }

    def _final_sigma(self) -> float:
        return 0.0

    def step(self, model_output, index, sample, generator=None, eta=0.0):
        self.require_timesteps()
        sigma, sigma_next = self.sigmas[index], self.sigmas[index + 1]
        x = sample.to(torch.float32)
        denoised = x - sigma * model_output
        sigma_up = (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5
        sigma_down = (sigma_next ** 2 - sigma_up ** 2) ** 0.5
        derivative = (x - denoised) / sigma
        x_next = x + derivative * (sigma_down - sigma)
        x_next = x_next + draw_noise(model_output, generator, self.name) * sigma_up
        return x_next.to(model_output.dtype)
