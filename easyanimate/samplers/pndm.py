"""PNDM (diffusers PNDMScheduler): pseudo linear multistep (PLMS) on the DDIM-style transfer, warmed
up either with pseudo Runge–Kutta (PRK) steps or, with `skip_prk_steps`, with lower-order PLMS.

Neither the release's scheduler folder nor the YAML sets `skip_prk_steps`, so the class default
(False) applies: the run starts with three 4-stage PRK steps over the four noisiest timesteps
(12 model calls), then one PLMS call per remaining timestep: `steps + 9` model calls in all
(34 for 25 steps).

Every transfer uses ᾱ at training timesteps and, like DDIM, treats t − T//steps as the previous
timestep whatever the spacing.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import EasyAnimateError
from .base import Sampler, alpha_bar_at, check_steps, ddpm_add_noise, spaced_timesteps

RK_STAGES = 4   # model calls per PRK step


class PNDMSampler(Sampler):
    name = "PNDM"
    SUPPORTED = {"prediction_type": ["epsilon"]}

    def __init__(self, config: dict):
        super().__init__(config)
        self.final_alpha_bar = torch.tensor(1.0) if config["set_alpha_to_one"] else self.schedule.alphas_cumprod[0]
        self.prk_timesteps = np.array([], dtype=np.int64)
        self.reset()

    def reset(self) -> None:
        self.calls = 0                 # model outputs consumed so far in this run
        self.history = []              # one ε per finished step (PLMS memory)
        self.rk_sum = None             # running Runge–Kutta combination of the current PRK step
        self.step_start = None         # sample at the start of the current PRK / first PLMS step

    @property
    def ratio(self) -> int:
        return self.schedule.num_train_timesteps // self.num_inference_steps

    def set_timesteps(self, steps: int) -> None:
        steps = check_steps(steps, self.schedule.num_train_timesteps, self.name)
        skip_prk = self.config["skip_prk_steps"]
        if not skip_prk and steps < RK_STAGES:
            raise EasyAnimateError(f"PNDM needs at least {RK_STAGES} steps (its Runge–Kutta warm-up uses 4 timesteps); got {steps}.")
        self.num_inference_steps = steps
        spacing = self.config["timestep_spacing"]
        rising = spaced_timesteps(spacing, steps, self.schedule.num_train_timesteps, self.config["steps_offset"])[::-1]
        if spacing == "linspace":
            rising = rising.round()
        rising = rising.astype(np.int64)

        if skip_prk:
            # PLMS from the start; the second timestep is visited twice (the warm-up's half step).
            self.prk_timesteps = np.array([], dtype=np.int64)
            plms = np.concatenate([rising[:-1], rising[-2:-1], rising[-1:]])[::-1]
        else:
            # Each of the 3 highest transfers t → t−r is done as RK4 with stages at t, t−r/2, t−r/2, t−r.
            top = rising[-RK_STAGES:]
            stages = top.repeat(2) + np.tile(np.array([0, self.ratio // 2]), RK_STAGES)
            self.prk_timesteps = stages[:-1].repeat(2)[1:-1][::-1].copy()
            plms = rising[:-3][::-1]
        self.timesteps = torch.from_numpy(np.concatenate([self.prk_timesteps, plms]).astype(np.int64))
        self.reset()

    def _transfer(self, sample, t: int, t_prev: int, eps):
        """DDIM-like move from x_t to x_{t_prev} for a given ε (PNDM paper eq. 9)."""
        alpha_bar = self.schedule.alphas_cumprod[t]
        alpha_bar_prev = alpha_bar_at(self.schedule, t_prev, self.final_alpha_bar)
        beta_bar, beta_bar_prev = 1 - alpha_bar, 1 - alpha_bar_prev
        sample_coeff = (alpha_bar_prev / alpha_bar) ** 0.5
        eps_denominator = alpha_bar * beta_bar_prev ** 0.5 + (alpha_bar * beta_bar * alpha_bar_prev) ** 0.5
        return sample_coeff * sample - (alpha_bar_prev - alpha_bar) * eps / eps_denominator

    def step(self, model_output, index, sample, generator=None, eta=0.0):
        timesteps = self.require_timesteps()
        t = int(timesteps[index])
        if self.calls < len(self.prk_timesteps) and not self.config["skip_prk_steps"]:
            x_prev = self._prk_step(model_output, t, sample)
        else:
            x_prev = self._plms_step(model_output, t, sample)
        self.calls += 1
        return x_prev

    def _prk_step(self, eps, t: int, sample):
        stage = self.calls % RK_STAGES
        # Stages 0 and 2 aim half a step down, 1 and 3 a full step (t already is the half point there).
        t_prev = t - (0 if self.calls % 2 else self.ratio // 2)
        t_start = int(self.prk_timesteps[self.calls // RK_STAGES * RK_STAGES])
        if stage == 0:
            self.rk_sum = 1 / 6 * eps
            self.history.append(eps)
            self.step_start = sample
        elif stage in (1, 2):
            self.rk_sum = self.rk_sum + 1 / 3 * eps
        else:
            eps = self.rk_sum + 1 / 6 * eps
            self.rk_sum = None
        start = self.step_start if self.step_start is not None else sample
        return self._transfer(start, t_start, t_prev, eps)

    def _plms_step(self, eps, t: int, sample):
        if not self.config["skip_prk_steps"] and len(self.history) < 3:
            raise RuntimeError("PNDM: PLMS steps need the Runge–Kutta warm-up first (call steps in order).")
        t_prev = t - self.ratio
        if self.calls != 1:
            self.history = self.history[-3:] + [eps]
        else:
            # skip_prk warm-up, second call: redo the first transfer from its start with the mean ε.
            t_prev, t = t, t + self.ratio

        h = self.history
        if len(h) == 1 and self.calls == 0:
            self.step_start = sample
        elif len(h) == 1 and self.calls == 1:
            eps = (eps + h[-1]) / 2
            sample, self.step_start = self.step_start, None
        elif len(h) == 2:
            eps = (3 * h[-1] - h[-2]) / 2
        elif len(h) == 3:
            eps = (23 * h[-1] - 16 * h[-2] + 5 * h[-3]) / 12
        else:
            eps = (1 / 24) * (55 * h[-1] - 59 * h[-2] + 37 * h[-3] - 9 * h[-4])
        return self._transfer(sample, t, t_prev, eps)

    def add_noise(self, clean, noise, index):
        return ddpm_add_noise(self.schedule, clean, noise, int(self.require_timesteps()[index]))
