"""DDIM (diffusers DDIMScheduler): predict x0, clip it, and move deterministically (eta = 0) or with
fresh noise of std eta·σ_DDPM to the previous timestep.

Reference quirk kept on purpose: the "previous" timestep is always t − T//steps, whatever the spacing.
With `linspace` spacing (the release's scheduler folder) the table is 999, 749, 500, … but each step
aims at 799, 549, 300, …; the last step aims below 0 and lands on ᾱ = 1 (`set_alpha_to_one`), i.e. x0.
"""
from __future__ import annotations

import numpy as np
import torch

from .base import Sampler, alpha_bar_at, check_steps, ddpm_add_noise, draw_noise, spaced_timesteps


class DDIMSampler(Sampler):
    name = "DDIM"
    SUPPORTED = {
        "prediction_type": ["epsilon"],
        "thresholding": [False],
        "rescale_betas_zero_snr": [False],
    }

    def __init__(self, config: dict):
        super().__init__(config)
        # ᾱ used past the end of the chain: exactly 1 (a clean sample) or ᾱ_0.
        self.final_alpha_bar = torch.tensor(1.0) if config["set_alpha_to_one"] else self.schedule.alphas_cumprod[0]

    def set_timesteps(self, steps: int) -> None:
        steps = check_steps(steps, self.schedule.num_train_timesteps, self.name)
        timesteps = spaced_timesteps(self.config["timestep_spacing"], steps,
                                     self.schedule.num_train_timesteps, self.config["steps_offset"])
        if self.config["timestep_spacing"] == "linspace":
            timesteps = timesteps.round()  # numpy rounds half to even: 499.5 → 500, 249.75 → 250
        self.timesteps = torch.from_numpy(timesteps.astype(np.int64))
        self.num_inference_steps = steps

    def step(self, model_output, index, sample, generator=None, eta=0.0):
        timesteps = self.require_timesteps()
        t = int(timesteps[index])
        t_prev = t - self.schedule.num_train_timesteps // self.num_inference_steps
        alpha_bar = self.schedule.alphas_cumprod[t]
        alpha_bar_prev = alpha_bar_at(self.schedule, t_prev, self.final_alpha_bar)
        beta_bar = 1 - alpha_bar

        x0 = (sample - beta_bar ** 0.5 * model_output) / alpha_bar ** 0.5
        if self.config["clip_sample"]:
            limit = self.config["clip_sample_range"]
            x0 = x0.clamp(-limit, limit)

        # σ_t of the DDPM posterior; eta = 0 makes the step deterministic.
        variance = ((1 - alpha_bar_prev) / beta_bar) * (1 - alpha_bar / alpha_bar_prev)
        std = eta * variance ** 0.5
        direction = (1 - alpha_bar_prev - std ** 2) ** 0.5 * model_output
        x_prev = alpha_bar_prev ** 0.5 * x0 + direction
        if eta > 0:
            x_prev = x_prev + std * draw_noise(model_output, generator, self.name)
        return x_prev

    def add_noise(self, clean, noise, index):
        return ddpm_add_noise(self.schedule, clean, noise, int(self.require_timesteps()[index]))
