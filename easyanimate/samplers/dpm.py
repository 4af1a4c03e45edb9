"""DPM-Solver++ multistep ("DPM++", diffusers DPMSolverMultistepScheduler, the release's own scheduler).

The solver works on the data prediction x0 = (x − σ_t ε)/α_t in log-SNR time λ = log(α/σ):
first order is DDIM-like, second order ("2M") corrects with the previous step's x0. Here α and σ are
those of the DDPM latent (α = 1/√(s²+1), σ = s·α for the table value s = √((1−ᾱ)/ᾱ)).
Final-step rules (diffusers 0.28.2): the last step is first order when the final σ is zero
(default `final_sigmas_type "zero"`), when `euler_at_final`, or with `lower_order_final` and fewer
than 15 steps; with `lower_order_final` and fewer than 15 steps the second-to-last is at most
second order (only relevant to order 3, which is not offered).
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import EasyAnimateError
from .base import Sampler, check_steps


def alpha_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(α_t, σ_t) of the DDPM latent for a table value s: α = 1/√(s²+1), σ = s·α."""
    alpha = 1 / ((sigma ** 2 + 1) ** 0.5)
    return alpha, sigma * alpha


def log_snr(sigma: torch.Tensor) -> torch.Tensor:
    """λ = log α − log σ (+inf at σ = 0, which makes the last step return x0 exactly)."""
    alpha, sigma_t = alpha_sigma(sigma)
    return torch.log(alpha) - torch.log(sigma_t)


class DPMSolverSampler(Sampler):
    name = "DPM++"
    SUPPORTED = {
        "prediction_type": ["epsilon"],
        "algorithm_type": ["dpmsolver++"],
        "solver_type": ["midpoint", "heun"],
        "solver_order": [2, 1],
        "thresholding": [False],
        "use_karras_sigmas": [False],
        "use_lu_lambdas": [False],
        # DPM-Solver only reads "learned"/"learned_range"; the DDPM values a DDPMScheduler config (V5)
        # carries over are ignored by the reference, so they are accepted here.
        "variance_type": [None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"],
        "final_sigmas_type": ["zero", "sigma_min"],
        "rescale_betas_zero_snr": [False],
    }

    def __init__(self, config: dict):
        super().__init__(config)
        self.sigmas: torch.Tensor | None = None
        self.reset()

    def reset(self) -> None:
        self.previous_x0: torch.Tensor | None = None   # data prediction of the previous step
        self.steps_done = 0

    def _last_timestep(self) -> int:
        """Timesteps whose λ is below `lambda_min_clipped` are never used (−inf by default: none cut)."""
        alpha_bar = self.schedule.alphas_cumprod
        lambdas = torch.log(torch.sqrt(alpha_bar)) - torch.log(torch.sqrt(1 - alpha_bar))
        clipped = torch.searchsorted(torch.flip(lambdas, [0]), self.config["lambda_min_clipped"])
        return int(self.schedule.num_train_timesteps - clipped)

    def set_timesteps(self, steps: int) -> None:
        num_train = self.schedule.num_train_timesteps
        steps = check_steps(steps, num_train, self.name)
        last = self._last_timestep()
        spacing = self.config["timestep_spacing"]
        # steps + 1 points from high to low, the lowest dropped: the solver ends at σ = final σ instead.
        if spacing == "linspace":
            timesteps = np.linspace(0, last - 1, steps + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif spacing == "leading":
            ratio = last // (steps + 1)
            timesteps = (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
            timesteps += self.config["steps_offset"]
        elif spacing == "trailing":
            timesteps = np.arange(last, 0, -num_train / steps).round().copy().astype(np.int64) - 1
        else:
            raise EasyAnimateError(f"timestep_spacing {spacing!r} is not supported; use 'linspace', 'leading' or 'trailing'.")
        train_sigmas = self.schedule.sigmas.numpy()
        sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        final = float(self.schedule.sigmas[0]) if self.config["final_sigmas_type"] == "sigma_min" else 0.0
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [final]]).astype(np.float32))
        self.timesteps = torch.from_numpy(timesteps)
        self.num_inference_steps = len(timesteps)
        self.reset()

    def _order_for(self, index: int) -> int:
        count = len(self.timesteps)
        few_steps = self.config["lower_order_final"] and count < 15
        is_last = index == count - 1
        last_is_first_order = is_last and (
            self.config["euler_at_final"] or few_steps or self.config["final_sigmas_type"] == "zero"
        )
        if self.config["solver_order"] == 1 or self.steps_done < 1 or last_is_first_order:
            return 1
        return 2

    def step(self, model_output, index, sample, generator=None, eta=0.0):
        self.require_timesteps()
        sigma_now, sigma_next = self.sigmas[index], self.sigmas[index + 1]
        alpha_s, sigma_s = alpha_sigma(sigma_now)
        x0 = (sample - sigma_s * model_output) / alpha_s   # in the latents' dtype, as the reference
        order = self._order_for(index)
        x = sample.to(torch.float32)

        alpha_t, sigma_t = alpha_sigma(sigma_next)
        h = log_snr(sigma_next) - log_snr(sigma_now)
        if order == 1:
            x_next = (sigma_t / sigma_s) * x - (alpha_t * (torch.exp(-h) - 1.0)) * x0
        else:
            h_prev = log_snr(sigma_now) - log_snr(self.sigmas[index - 1])
            slope = (1.0 / (h_prev / h)) * (x0 - self.previous_x0)  # D1, the x0 change per unit of h
            if self.config["solver_type"] == "midpoint":
                x_next = ((sigma_t / sigma_s) * x - (alpha_t * (torch.exp(-h) - 1.0)) * x0
                          - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * slope)
            else:  # heun
                x_next = ((sigma_t / sigma_s) * x - (alpha_t * (torch.exp(-h) - 1.0)) * x0
                          + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * slope)

        self.previous_x0 = x0
        self.steps_done += 1
        return x_next.to(model_output.dtype)

    def add_noise(self, clean, noise, index):
        self.require_timesteps()
        sigma = self.sigmas.to(device=clean.device, dtype=clean.dtype)[index]
        alpha_t, sigma_t = alpha_sigma(sigma)
        return alpha_t * clean + sigma_t * noise
