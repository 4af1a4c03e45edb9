"""Unit tests for the samplers and the denoising loop, against closed forms where they exist.

The "oracle" model below knows the clean latents x0 and returns the exact noise of whatever sample
it is given (ε = (x_t − √ᾱ_t·x0)/√(1−ᾱ_t)). Every sampler is exact for such a model, so a run must
land on x0 (or, for PNDM, on x0 noised to ᾱ_0, where its chain ends).
"""
from __future__ import annotations

import math

import pytest
import torch

from easyanimate.errors import EasyAnimateError, LayoutError
from easyanimate.sampling import (
    DDPM_SAMPLER_NAMES,
    SAMPLER_NAMES,
    SamplingCancelled,
    build_sampler,
    denoise,
    first_step_for_strength,
    resolved_sampler_config,
    sampler_name_for,
    start_latents,
)

SHAPE = (1, 4, 2, 4, 4)
# The release's scheduler folder: a DPM-Solver config that every sampler re-uses.
RELEASE_CONFIG = {
    "_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": "0.22.0.dev0",
    "algorithm_type": "dpmsolver++", "beta_end": 0.02, "beta_schedule": "linear", "beta_start": 0.0001,
    "dynamic_thresholding_ratio": 0.995, "euler_at_final": False, "lambda_min_clipped": -math.inf,
    "lower_order_final": True, "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "sample_max_value": 1.0, "solver_order": 2, "solver_type": "midpoint", "steps_offset": 0,
    "thresholding": False, "timestep_spacing": "linspace", "trained_betas": None,
    "use_karras_sigmas": False, "use_lu_lambdas": False, "variance_type": None,
}
# A V5.1 release's scheduler folder: flow matching (the "Flow" sampler; tests/test_flow_sampler.py).
FLOW_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}


def clean_latents(seed=0, dtype=torch.float32):
    # Inside [-1, 1] so DDIM's clip_sample never changes them.
    return torch.rand(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 1.8 - 0.9


def unit_noise(seed=1, dtype=torch.float32):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def oracle_model(sampler, x0):
    """ε-prediction that is exact for the sample it is shown (σ-scaled input for the Euler samplers)."""
    def model_fn(model_input, timestep, step):
        t = timestep[0]
        if sampler.name in ("Euler", "Euler A"):
            sigma = sampler.sigmas[(sampler.timesteps == t).nonzero()[0, 0]].double()
            x = model_input.double() * (sigma ** 2 + 1) ** 0.5     # undo scale_model_input
            eps = (x - x0.double()) / sigma
        else:
            alpha_bar = sampler.schedule.alphas_cumprod[int(t)].double()
            eps = (model_input.double() - alpha_bar ** 0.5 * x0.double()) / (1 - alpha_bar) ** 0.5
        return eps.to(model_input.dtype)
    return model_fn


def run(sampler, model_fn, latents, guidance=1.0, **kwargs):
    return denoise(model_fn, latents, sampler, guidance, generator=torch.Generator().manual_seed(7), **kwargs)


# ----------------------------------------------------------------------------------------------------
# Construction routes and timestep tables (docs/numerics.md#two-configuration-routes, 25 steps)
# ----------------------------------------------------------------------------------------------------

def test_timestep_tables_of_both_routes():
    expected = {  # (release folder, YAML): first timesteps, last timesteps, count
        "Euler": ([999.0, 957.375, 915.75], [41.625, 0.0], 25),
        "Euler A": ([999.0, 957.375, 915.75], [41.625, 0.0], 25),
        "DPM++": ([999, 959, 919], [80, 40], 25),
    }
    for name, (head, tail, count) in expected.items():
        for route in (RELEASE_CONFIG, None):
            sampler = build_sampler(name, route)
            sampler.set_timesteps(25)
            assert sampler.timesteps.tolist()[:3] == head and sampler.timesteps.tolist()[-2:] == tail
            assert len(sampler.timesteps) == count

    ddim_release, ddim_yaml = build_sampler("DDIM", RELEASE_CONFIG), build_sampler("DDIM")
    ddim_release.set_timesteps(25)
    ddim_yaml.set_timesteps(25)
    assert ddim_release.timesteps.tolist()[:3] == [999, 957, 916] and ddim_release.timesteps.tolist()[-2:] == [42, 0]
    assert ddim_yaml.timesteps.tolist() == list(range(961, 0, -40))

    pndm_release, pndm_yaml = build_sampler("PNDM", RELEASE_CONFIG), build_sampler("PNDM")
    pndm_release.set_timesteps(25)
    pndm_yaml.set_timesteps(25)
    assert len(pndm_release.timesteps) == len(pndm_yaml.timesteps) == 34  # 12 Runge–Kutta calls + 22 PLMS
    assert pndm_release.timesteps.tolist()[:4] == [999, 977, 977, 957]
    assert pndm_yaml.timesteps.tolist()[:4] == [961, 941, 941, 921]


def test_timestep_dtypes_and_five_step_tables():
    tables = {"Euler": [999.0, 749.25, 499.5, 249.75, 0.0], "DDIM": [999, 749, 500, 250, 0],
              "DPM++": [999, 799, 599, 400, 200]}
    for name, table in tables.items():
        sampler = build_sampler(name, RELEASE_CONFIG)
        sampler.set_timesteps(5)
        assert sampler.timesteps.tolist() == table
        assert sampler.timesteps.dtype == (torch.float32 if name == "Euler" else torch.int64)


def test_route_configs():
    yaml_ddim = resolved_sampler_config("DDIM")
    assert yaml_ddim["timestep_spacing"] == "leading" and yaml_ddim["steps_offset"] == 1
    assert yaml_ddim["clip_sample"] is True and yaml_ddim["set_alpha_to_one"] is True
    release_ddim = resolved_sampler_config("DDIM", RELEASE_CONFIG)
    assert release_ddim["timestep_spacing"] == "linspace" and release_ddim["steps_offset"] == 0
    assert release_ddim["clip_sample"] is True            # not in the file: class default
    assert "solver_order" not in release_ddim             # DPM-only keys are not carried over
    assert resolved_sampler_config("PNDM", RELEASE_CONFIG)["skip_prk_steps"] is False
    assert resolved_sampler_config("DPM++")["final_sigmas_type"] == "zero"
    # Keys the saver marked as its own defaults are not carried over (diffusers `_use_default_values`).
    marked = dict(RELEASE_CONFIG, timestep_spacing="trailing", _use_default_values=["timestep_spacing"])
    assert resolved_sampler_config("DDIM", marked)["timestep_spacing"] == "leading"


def test_scheduler_folder_route(tmp_path):
    import json

    folder = tmp_path / "model" / "scheduler"
    folder.mkdir(parents=True)
    (folder / "scheduler_config.json").write_text(json.dumps(RELEASE_CONFIG))
    for path in (tmp_path / "model", folder, folder / "scheduler_config.json"):
        assert build_sampler("DDIM", path).config["timestep_spacing"] == "linspace"
    with pytest.raises(LayoutError, match="scheduler_config.json"):
        build_sampler("Euler", tmp_path / "nowhere")


def test_init_noise_sigma():
    # ᾱ at t = 999 ≈ 4.0e-5, σ_max = √((1−ᾱ)/ᾱ) ≈ 157.407.
    euler = build_sampler("Euler")
    euler.set_timesteps(25)
    alpha_bar = euler.schedule.alphas_cumprod[-1].item()
    assert alpha_bar == pytest.approx(4.0e-5, rel=0.02)
    assert euler.init_noise_sigma == pytest.approx(157.4073, abs=1e-3)   # linspace: σ_max itself
    leading = build_sampler("Euler", dict(RELEASE_CONFIG, timestep_spacing="leading"))
    leading.set_timesteps(25)
    assert leading.init_noise_sigma == pytest.approx((leading.sigmas.max().item() ** 2 + 1) ** 0.5)
    for name in ("DPM++", "PNDM", "DDIM"):
        assert build_sampler(name).init_noise_sigma == 1.0


def test_euler_model_input_scaling():
    sampler = build_sampler("Euler", RELEASE_CONFIG)
    sampler.set_timesteps(5)
    x = unit_noise()
    sigma = sampler.sigmas[2].item()
    assert torch.allclose(sampler.scale_model_input(x, 2), x / math.sqrt(sigma ** 2 + 1))
    for name in ("DPM++", "PNDM", "DDIM"):
        other = build_sampler(name, RELEASE_CONFIG)
        other.set_timesteps(5)
        assert torch.equal(other.scale_model_input(x, 1), x)


def test_diffusers_class_names():
    assert sampler_name_for("EulerDiscreteScheduler") == "Euler"
    assert sampler_name_for("EulerAncestralDiscreteScheduler") == "Euler A"
    assert sampler_name_for("DPMSolverMultistepScheduler") == "DPM++"
    with pytest.raises(EasyAnimateError):
        sampler_name_for("LMSDiscreteScheduler")


# ----------------------------------------------------------------------------------------------------
# Closed forms
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["Euler", "DPM++", "DDIM"])
def test_exact_noise_prediction_recovers_clean_latents(name):
    # DDIM from the YAML route: with `leading` spacing each step really lands on its next timestep.
    sampler = build_sampler(name, None if name == "DDIM" else RELEASE_CONFIG)
    sampler.set_timesteps(8)
    x0 = clean_latents()
    latents = start_latents(sampler, unit_noise())
    if name == "DDIM":
        latents = sampler.add_noise(x0, unit_noise(), 0)
    result = run(sampler, oracle_model(sampler, x0), latents)
    assert torch.allclose(result, x0, atol=2e-3), (result - x0).abs().max()


def test_ddim_step_is_the_forward_process_at_the_target():
    sampler = build_sampler("DDIM")           # leading spacing, steps_offset 1
    sampler.set_timesteps(10)
    x0, eps = clean_latents(dtype=torch.float64), unit_noise(dtype=torch.float64)
    alpha_bars = sampler.schedule.alphas_cumprod.double()
    t = int(sampler.timesteps[3])
    x_t = alpha_bars[t] ** 0.5 * x0 + (1 - alpha_bars[t]) ** 0.5 * eps
    x_prev = sampler.step(eps, 3, x_t)
    target = t - 100
    assert torch.allclose(x_prev, alpha_bars[target] ** 0.5 * x0 + (1 - alpha_bars[target]) ** 0.5 * eps, atol=1e-6)
    # Last step: past the start of the chain ᾱ = 1, so the result is the clean sample itself.
    t_last = int(sampler.timesteps[-1])
    x_last = alpha_bars[t_last] ** 0.5 * x0 + (1 - alpha_bars[t_last]) ** 0.5 * eps
    assert torch.allclose(sampler.step(eps, len(sampler.timesteps) - 1, x_last), x0, atol=1e-6)


def test_ddim_linspace_aims_at_t_minus_T_over_steps():
    # Reference quirk: with the release's linspace table 999, 749, … the first step goes to 799.
    sampler = build_sampler("DDIM", RELEASE_CONFIG)
    sampler.set_timesteps(5)
    x0, eps = clean_latents(dtype=torch.float64), unit_noise(dtype=torch.float64)
    alpha_bars = sampler.schedule.alphas_cumprod.double()
    x_t = alpha_bars[999] ** 0.5 * x0 + (1 - alpha_bars[999]) ** 0.5 * eps
    expected = alpha_bars[799] ** 0.5 * x0 + (1 - alpha_bars[799]) ** 0.5 * eps
    assert torch.allclose(sampler.step(eps, 0, x_t), expected, atol=1e-6)


def test_ddim_clips_predicted_clean_latents():
    sampler = build_sampler("DDIM", RELEASE_CONFIG)
    sampler.set_timesteps(5)
    x = torch.full(SHAPE, 50.0)
    # Predicting zero noise means x0 = x/√ᾱ (huge); clip_sample caps it at 1 before moving on.
    alpha_bar_prev = sampler.schedule.alphas_cumprod[999 - 200]
    assert torch.allclose(sampler.step(torch.zeros(SHAPE), 0, x), torch.full(SHAPE, alpha_bar_prev.item() ** 0.5))


def test_euler_step_closed_form():
    sampler = build_sampler("Euler", RELEASE_CONFIG)
    sampler.set_timesteps(5)
    x0, eps = clean_latents(), unit_noise()
    sigma, sigma_next = sampler.sigmas[1], sampler.sigmas[2]
    assert torch.allclose(sampler.step(eps, 1, x0 + sigma * eps), x0 + sigma_next * eps, atol=1e-5)


def test_dpm_first_step_is_ddim_and_second_uses_previous_prediction():
    sampler = build_sampler("DPM++", RELEASE_CONFIG)
    sampler.set_timesteps(6)
    s = sampler.sigmas.double()
    alpha = 1 / (s ** 2 + 1) ** 0.5
    sigma = s * alpha
    lam = torch.log(alpha) - torch.log(sigma)
    x = unit_noise(dtype=torch.float64) * 3
    eps0, eps1 = unit_noise(2, torch.float64), unit_noise(3, torch.float64)

    # First order: x0 = (x − σ_s ε)/α_s, then exactly α_t·x0 + σ_t·ε (a DDIM move).
    x1 = sampler.step(eps0, 0, x)
    m0 = (x - sigma[0] * eps0) / alpha[0]
    assert torch.allclose(x1, alpha[1] * m0 + sigma[1] * eps0, atol=1e-5)

    # Second order (midpoint): extrapolates x0 with the previous prediction, weight h/(2·h_prev).
    x2 = sampler.step(eps1, 1, x1)
    m1 = (x1 - sigma[1] * eps1) / alpha[1]
    h, h_prev = lam[2] - lam[1], lam[1] - lam[0]
    x0_extrapolated = m1 + (h / (2 * h_prev)) * (m1 - m0)
    expected = (sigma[2] / sigma[1]) * x1 + alpha[2] * (1 - torch.exp(-h)) * x0_extrapolated
    assert torch.allclose(x2, expected, atol=1e-4)


@pytest.mark.parametrize("steps", [3, 20])  # below and above the 15-step lower_order_final limit
def test_dpm_last_step_returns_the_clean_prediction(steps):
    # The final σ is zero, so the last step is first order and returns the x0 prediction itself.
    sampler = build_sampler("DPM++", RELEASE_CONFIG)
    sampler.set_timesteps(steps)
    x, eps = unit_noise(dtype=torch.float64), unit_noise(2, torch.float64)
    for index in range(steps - 1):
        x = sampler.step(eps * (1 + 0.1 * index), index, x)
    last_sigma = sampler.sigmas[steps - 1].double()
    alpha = 1 / (last_sigma ** 2 + 1) ** 0.5
    expected = (x - last_sigma * alpha * eps) / alpha
    assert torch.allclose(sampler.step(eps, steps - 1, x), expected, atol=1e-5)


@pytest.mark.parametrize("skip_prk", [False, True])
def test_pndm_exact_noise_lands_at_the_chain_start(skip_prk):
    config = dict(resolved_sampler_config("PNDM"), skip_prk_steps=skip_prk)   # YAML route: leading spacing
    sampler = build_sampler("PNDM", config)
    # 10 steps: an even step ratio (100), so the Runge–Kutta half steps land on whole timesteps. With an
    # odd ratio the reference evaluates the model one timestep off the sample's level (a quirk we keep).
    sampler.set_timesteps(10)
    assert len(sampler.timesteps) == (10 + 1 if skip_prk else 10 + 9)
    x0, eps = clean_latents(dtype=torch.float64), unit_noise(dtype=torch.float64)
    calls = []
    oracle = oracle_model(sampler, x0)

    def model_fn(model_input, timestep, step):
        calls.append(step)
        return oracle(model_input, timestep, step)

    result = run(sampler, model_fn, sampler.add_noise(x0, eps, 0))
    assert len(calls) == len(sampler.timesteps)
    # The last transfer goes below t = 0, where PNDM uses ᾱ_0 (set_alpha_to_one is False).
    alpha_bar0 = sampler.schedule.alphas_cumprod[0].double()
    expected_eps = (result - alpha_bar0 ** 0.5 * x0) / (1 - alpha_bar0) ** 0.5
    # (float32 ᾱ coefficients, error divided by √(1−ᾱ_0) ≈ 0.01 here: ~1e-4 is the float floor)
    assert torch.allclose(expected_eps, eps, atol=1e-3), (expected_eps - eps).abs().max()


def test_euler_ancestral_adds_generator_noise():
    sampler = build_sampler("Euler A", RELEASE_CONFIG)
    sampler.set_timesteps(5)
    x0, eps = clean_latents(), unit_noise()
    sigma, sigma_next = sampler.sigmas[1], sampler.sigmas[2]
    sigma_up = (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5
    sigma_down = (sigma_next ** 2 - sigma_up ** 2) ** 0.5
    out = sampler.step(eps, 1, x0 + sigma * eps, generator=torch.Generator().manual_seed(5))
    fresh = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(out, x0 + sigma_down * eps + sigma_up * fresh, atol=1e-4)
    assert torch.isclose(sigma_down ** 2 + sigma_up ** 2, sigma_next ** 2, rtol=1e-5)
    # Exact noise predictions still end on the clean latents: the last step adds no noise.
    result = run(sampler, oracle_model(sampler, x0), start_latents(sampler, unit_noise()))
    assert torch.allclose(result, x0, atol=2e-3)


def test_add_noise_for_video_to_video():
    x0, eps = clean_latents(), unit_noise()
    euler = build_sampler("Euler", RELEASE_CONFIG)
    euler.set_timesteps(10)
    assert torch.allclose(start_latents(euler, eps, 4, x0), x0 + euler.sigmas[4] * eps)
    ddim = build_sampler("DDIM", RELEASE_CONFIG)
    ddim.set_timesteps(10)
    alpha_bar = ddim.schedule.alphas_cumprod[int(ddim.timesteps[4])]
    assert torch.allclose(start_latents(ddim, eps, 4, x0), alpha_bar ** 0.5 * x0 + (1 - alpha_bar) ** 0.5 * eps)
    dpm = build_sampler("DPM++", RELEASE_CONFIG)
    dpm.set_timesteps(10)
    alpha_bar = dpm.schedule.alphas_cumprod[int(dpm.timesteps[4])]
    assert torch.allclose(start_latents(dpm, eps, 4, x0), alpha_bar ** 0.5 * x0 + (1 - alpha_bar) ** 0.5 * eps,
                          atol=1e-6)
    assert torch.equal(start_latents(euler, eps), eps * euler.init_noise_sigma)


# ----------------------------------------------------------------------------------------------------
# Randomness
# ----------------------------------------------------------------------------------------------------

def noisy_model(model_input, timestep, step):
    return torch.tanh(model_input) * 0.7


@pytest.mark.parametrize("name, eta", [("Euler A", 0.0), ("DDIM", 1.0)])
def test_same_seed_same_result_other_seed_other_result(name, eta):
    def sample(seed):
        sampler = build_sampler(name, RELEASE_CONFIG)
        sampler.set_timesteps(4)
        latents = start_latents(sampler, unit_noise())
        return denoise(noisy_model, latents, sampler, 1.0, eta=eta, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(11), sample(11))
    assert not torch.allclose(sample(11), sample(12))


def test_deterministic_samplers_ignore_the_seed():
    for name in ("Euler", "DPM++", "PNDM", "DDIM"):
        results = []
        for seed in (1, 2):
            sampler = build_sampler(name, RELEASE_CONFIG)
            sampler.set_timesteps(4)
            results.append(denoise(noisy_model, start_latents(sampler, unit_noise()), sampler, 1.0,
                                   generator=torch.Generator().manual_seed(seed)))
        assert torch.equal(*results), name


def test_noise_needs_an_explicit_generator():
    sampler = build_sampler("Euler A", RELEASE_CONFIG)
    sampler.set_timesteps(3)
    with pytest.raises(EasyAnimateError, match="Generator"):
        sampler.step(unit_noise(), 0, unit_noise())
    state = torch.random.get_rng_state()
    sampler.step(unit_noise(), 0, unit_noise(), generator=torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.random.get_rng_state())      # the global RNG is never used


# ----------------------------------------------------------------------------------------------------
# The denoising loop
# ----------------------------------------------------------------------------------------------------

def test_cfg_batch_guidance_and_learned_sigma():
    sampler = build_sampler("DDIM", RELEASE_CONFIG)
    sampler.set_timesteps(3)
    latents = unit_noise()
    uncond = torch.randn((1, 8) + SHAPE[2:], generator=torch.Generator().manual_seed(3))
    cond = torch.randn((1, 8) + SHAPE[2:], generator=torch.Generator().manual_seed(4))
    seen = []

    def model_fn(model_input, timestep, step):
        seen.append((model_input.clone(), timestep.clone(), step))
        return torch.cat([uncond, cond])

    result = denoise(model_fn, latents, sampler, 6.0)
    assert [s[2] for s in seen] == [0, 1, 2]
    first_input, first_t, _ = seen[0]
    assert first_input.shape == (2,) + SHAPE[1:] and torch.equal(first_input[0], first_input[1])
    assert torch.equal(first_input[:1], latents)
    assert first_t.tolist() == [999, 999] and first_t.dtype == torch.int64

    reference = build_sampler("DDIM", RELEASE_CONFIG)
    reference.set_timesteps(3)
    guided = (uncond + 6.0 * (cond - uncond))[:, :4]              # all 8 channels guided, first 4 kept
    expected = latents
    for index in range(3):
        expected = reference.step(guided, index, expected)
    assert torch.equal(result, expected)


def test_no_cfg_batch_at_guidance_one_or_below():
    sampler = build_sampler("Euler", RELEASE_CONFIG)
    sampler.set_timesteps(2)
    sizes = []

    def model_fn(model_input, timestep, step):
        sizes.append(model_input.shape[0])
        assert timestep.dtype == torch.float32
        return torch.zeros_like(model_input)

    denoise(model_fn, unit_noise(), sampler, 1.0)
    assert sizes == [1, 1]


def test_callback_progress_and_cancel():
    sampler = build_sampler("DPM++", RELEASE_CONFIG)
    sampler.set_timesteps(5)
    latents = start_latents(sampler, unit_noise())
    before = latents.clone()
    progress = []

    def stop_after_two(done, total, current):
        progress.append((done, total))
        return done < 2

    with pytest.raises(SamplingCancelled, match="after 2 of 5 steps") as cancelled:
        denoise(noisy_model, latents, sampler, 1.0, callback=stop_after_two)
    assert cancelled.value.steps_done == 2 and progress == [(1, 5), (2, 5)]
    assert torch.equal(latents, before)                      # the caller's latents are untouched

    # The same sampler then runs as if the cancelled run never happened.
    after_cancel = denoise(noisy_model, latents, sampler, 1.0)
    fresh = build_sampler("DPM++", RELEASE_CONFIG)
    fresh.set_timesteps(5)
    assert torch.equal(after_cancel, denoise(noisy_model, latents, fresh, 1.0))


def test_callback_exception_propagates():
    sampler = build_sampler("Euler", RELEASE_CONFIG)
    sampler.set_timesteps(3)

    class Interrupted(Exception):
        pass

    def interrupt(done, total, current):
        raise Interrupted

    with pytest.raises(Interrupted):
        denoise(noisy_model, unit_noise(), sampler, 1.0, callback=interrupt)


def test_start_index_runs_only_the_remaining_steps():
    sampler = build_sampler("Euler", RELEASE_CONFIG)
    sampler.set_timesteps(10)
    start = first_step_for_strength(10, 0.6)
    seen = []

    def model_fn(model_input, timestep, step):
        seen.append((step, timestep[0].item()))
        return torch.zeros_like(model_input)

    denoise(model_fn, unit_noise(), sampler, 1.0, start_index=start)
    assert start == 4 and [s for s, _ in seen] == list(range(6))
    assert [t for _, t in seen] == sampler.timesteps[4:].tolist()


# ----------------------------------------------------------------------------------------------------
# Strength and bad inputs
# ----------------------------------------------------------------------------------------------------

def test_strength_rule():
    assert first_step_for_strength(25, 1.0) == 0
    assert first_step_for_strength(5, 0.5) == 3          # keeps ⌊2.5⌋ = 2 steps
    assert first_step_for_strength(100, 0.29) == 72      # float truncation as the reference: 28.999… → 28
    assert first_step_for_strength(5, 0.2) == 4


@pytest.mark.parametrize("strength", [0, -0.5, 1.01, float("nan"), True, "0.5", None])
def test_strength_outside_range(strength):
    with pytest.raises(EasyAnimateError, match=r"strength must be in \(0, 1\]"):
        first_step_for_strength(10, strength)


def test_strength_too_small_for_steps():
    with pytest.raises(EasyAnimateError, match="leaves no step"):
        first_step_for_strength(5, 0.1)


@pytest.mark.parametrize("steps", [0, -3, 2.5, 1001])
def test_bad_step_counts(steps):
    for name in SAMPLER_NAMES:
        with pytest.raises(EasyAnimateError, match="steps"):
            build_sampler(name, None if name in DDPM_SAMPLER_NAMES else {}).set_timesteps(steps)
    if isinstance(steps, int) and steps < 1:
        with pytest.raises(EasyAnimateError, match="steps"):
            first_step_for_strength(steps, 1.0)


def test_pndm_needs_four_steps():
    with pytest.raises(EasyAnimateError, match="at least 4 steps"):
        build_sampler("PNDM").set_timesteps(3)


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(EasyAnimateError) as error:
        build_sampler("euler_ancestral")
    for name in SAMPLER_NAMES:
        assert name in str(error.value)


def test_unsupported_scheduler_setting_is_refused():
    with pytest.raises(EasyAnimateError, match="prediction_type"):
        build_sampler("Euler", dict(RELEASE_CONFIG, prediction_type="v_prediction"))
    with pytest.raises(EasyAnimateError, match="use_karras_sigmas"):
        build_sampler("DPM++", dict(RELEASE_CONFIG, use_karras_sigmas=True))


def test_sampling_before_set_timesteps():
    sampler = build_sampler("DDIM")
    with pytest.raises(RuntimeError, match="set_timesteps"):
        denoise(noisy_model, unit_noise(), sampler, 1.0)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_half_precision_latents_stay_in_their_dtype(name):
    # The reference keeps latents in the working dtype (bf16/fp16) between steps (docs/numerics.md#latents-dtype).
    sampler = build_sampler(name, RELEASE_CONFIG if name in DDPM_SAMPLER_NAMES else FLOW_CONFIG)
    sampler.set_timesteps(5)
    latents = start_latents(sampler, unit_noise().to(torch.bfloat16))
    seen = []

    def model_fn(model_input, timestep, step):
        seen.append(model_input.dtype)
        return torch.cat([noisy_model(model_input, timestep, step)] * 2, dim=1)   # 8 channels

    result = denoise(model_fn, latents, sampler, 4.5, generator=torch.Generator().manual_seed(0))
    assert result.dtype == torch.bfloat16 and set(seen) == {torch.bfloat16}
    assert torch.isfinite(result.float()).all()
