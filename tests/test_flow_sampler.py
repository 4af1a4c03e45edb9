"""Unit tests for the flow-matching sampler ("Flow", EasyAnimate V5.1) and the sampler/model family rules.

The closed forms: with shift 1 the N timesteps are linspace(1000, 1, N) and σ = t/1000 with a terminal
0; a model that returns the exact velocity v = ε − x0 of the straight path x_σ = (1 − σ)·x0 + σ·ε makes
every Euler step exact, so a run lands on x0. The reference arithmetic itself (float32 tables, the double
shift, one step, the v2v noising) is checked bit for bit in tests/parity/test_flow_scheduler_parity.py.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from easyanimate.errors import EasyAnimateError
from easyanimate.samplers.base import scheduler_class_families
from easyanimate.sampling import (
    DDPM_SAMPLER_NAMES,
    FLOW_SAMPLER_NAMES,
    SAMPLERS,
    build_sampler,
    check_sampler_for_family,
    denoise,
    first_step_for_strength,
    resolved_sampler_config,
    sampler_classes,
    sampler_name_for,
    samplers_for_family,
    scheduler_prediction,
    start_latents,
    with_flow_shift,
)

SHAPE = (1, 4, 2, 4, 4)
# What a V5.1 release's scheduler/scheduler_config.json holds (its shift value is read from the file).
FLOW_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.31.0",
               "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False,
               "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}
# The V3 release's scheduler folder (a DPM-Solver config, DDPM family).
V3_CONFIG = {"_class_name": "DPMSolverMultistepScheduler", "beta_start": 0.0001, "beta_end": 0.02,
             "beta_schedule": "linear", "num_train_timesteps": 1000, "timestep_spacing": "linspace",
             "steps_offset": 0, "prediction_type": "epsilon", "variance_type": None}
# A V5-style scheduler folder: a DDPM-family config with every key a saved DDPMScheduler carries. The
# released V5 values are not known here; these are plausible ones (HunyuanDiT lineage).
V5_STYLE_CONFIG = {
    "_class_name": "DDPMScheduler", "_diffusers_version": "0.31.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "clip_sample_range": 1.0,
    "dynamic_thresholding_ratio": 0.995, "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "rescale_betas_zero_snr": False, "sample_max_value": 1.0, "steps_offset": 1, "thresholding": False,
    "timestep_spacing": "leading", "trained_betas": None, "variance_type": "fixed_small",
}


def flow(steps=None, **overrides):
    sampler = build_sampler("Flow", dict(FLOW_CONFIG, **overrides))
    if steps is not None:
        sampler.set_timesteps(steps)
    return sampler


def clean_latents(seed=0, dtype=torch.float32):
    return torch.rand(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 1.8 - 0.9


def unit_noise(seed=1, dtype=torch.float32):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def velocity_oracle(x0, eps, calls=None):
    """The exact velocity of the straight path from x0 to ε, for every CFG half."""
    def model_fn(model_input, timestep, step):
        if calls is not None:
            calls.append((step, timestep.clone()))
        return (eps - x0).expand_as(model_input).to(model_input.dtype)
    return model_fn


# ----------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [25, 50])
def test_shift_one_tables_are_the_closed_form(steps):
    sampler = flow(steps)
    closed = np.linspace(1000, 1, steps)
    assert sampler.timesteps.dtype == torch.float32 and sampler.sigmas.dtype == torch.float32
    assert len(sampler.timesteps) == steps and len(sampler.sigmas) == steps + 1
    assert np.allclose(sampler.timesteps.numpy(), closed, rtol=1e-6, atol=0)
    assert np.allclose(sampler.sigmas[:-1].numpy(), closed / 1000, rtol=1e-6, atol=0)
    assert sampler.sigmas[-1].item() == 0.0 and sampler.timesteps[0].item() == 1000.0
    assert sampler.timesteps[-1].item() == pytest.approx(1.0, rel=1e-6)


def test_published_values_for_25_and_50_steps():
    fifty, twenty_five = flow(50), flow(25)
    assert fifty.timesteps[:3].tolist() == pytest.approx([1000, 979.612, 959.224], abs=1e-3)
    assert fifty.timesteps[-3:].tolist() == pytest.approx([41.776, 21.388, 1.0], abs=1e-3)
    assert twenty_five.timesteps[:3].tolist() == pytest.approx([1000, 958.375, 916.75], abs=1e-3)
    assert twenty_five.timesteps[-2:].tolist() == pytest.approx([42.625, 1.0], abs=1e-3)


def test_shift_is_applied_twice_like_the_reference():
    shift, steps = 3.0, 10
    sampler = flow(steps, shift=shift)

    def shifted(s):
        return shift * s / (1 + (shift - 1) * s)

    # The class shifts its training table once (ends σ_max = 1, σ_min = shift(0.001)), then
    # set_timesteps spaces between those ends and shifts again.
    sigma_min = shifted(0.001)
    expected = shifted(np.linspace(1000 * 1.0, 1000 * sigma_min, steps) / 1000)
    assert np.allclose(sampler.sigmas[:-1].numpy(), expected, rtol=1e-6)
    assert np.allclose(sampler.timesteps.numpy(), expected * 1000, rtol=1e-6)
    single = shifted(np.linspace(1000, 1, steps) / 1000)
    assert not np.allclose(sampler.sigmas[:-1].numpy(), single, rtol=1e-4)     # a "fixed" single shift differs
    assert sampler.sigmas[-2].item() == pytest.approx(shifted(sigma_min), rel=1e-6)


def test_dynamic_shifting_uses_mu_and_ignores_shift():
    steps = 8
    base = np.linspace(1000, 1, steps) / 1000          # the training table is not shifted with dynamic shifting
    for mu in (1.0, 0.5):
        sampler = flow(shift=5.0, use_dynamic_shifting=True)
        sampler.set_timesteps(steps, mu=mu)
        expected = math.exp(mu) / (math.exp(mu) + (1 / base - 1))
        assert np.allclose(sampler.sigmas[:-1].numpy(), expected, rtol=1e-6)
    default = flow(shift=5.0, use_dynamic_shifting=True)
    default.set_timesteps(steps)                       # the pipelines' mu = 1
    one = flow(use_dynamic_shifting=True)
    one.set_timesteps(steps, mu=1.0)
    assert torch.equal(default.sigmas, one.sigmas)


def test_shift_terminal_stretches_to_the_last_sigma():
    sampler = flow(6, shift_terminal=0.1)
    assert sampler.sigmas[-2].item() == pytest.approx(0.1, rel=1e-6)
    assert sampler.sigmas[0].item() == pytest.approx(1.0) and sampler.sigmas[-1].item() == 0.0


def test_no_noise_scaling_and_float_timesteps():
    sampler = flow(5)
    x = unit_noise()
    assert sampler.init_noise_sigma == 1.0
    assert torch.equal(sampler.scale_model_input(x, 2), x)
    assert torch.equal(start_latents(sampler, x), x)
    assert sampler.timesteps.dtype == torch.float32


# ----------------------------------------------------------------------------------------------------
# Steps and the loop
# ----------------------------------------------------------------------------------------------------

def test_step_closed_form_and_no_randomness():
    sampler = flow(5)
    x, v = unit_noise(), unit_noise(2)
    expected = x + (sampler.sigmas[2] - sampler.sigmas[1]) * v
    assert torch.equal(sampler.step(v, 1, x), expected)
    state = torch.random.get_rng_state()
    generator = torch.Generator().manual_seed(3)
    before = generator.get_state()
    assert torch.equal(sampler.step(v, 1, x, generator=generator), expected)
    assert torch.equal(generator.get_state(), before) and torch.equal(state, torch.random.get_rng_state())


def test_bf16_step_is_float32_then_cast():
    sampler = flow(5)
    x, v = unit_noise(dtype=torch.bfloat16), unit_noise(2, dtype=torch.bfloat16)
    out = sampler.step(v, 0, x)
    assert out.dtype == torch.bfloat16
    # Sample upcast to float32; (σ_next − σ)·v stays in v's dtype (a 0-d float32 factor); cast back once.
    dt = sampler.sigmas[1] - sampler.sigmas[0]
    assert torch.equal(out, (x.float() + dt * v).to(torch.bfloat16))


@pytest.mark.parametrize("guidance", [1.0, 6.0])
def test_exact_velocity_lands_on_the_clean_latents(guidance):
    sampler = flow(12, shift=3.0)
    x0, eps = clean_latents(), unit_noise()
    calls = []
    result = denoise(velocity_oracle(x0, eps, calls), start_latents(sampler, eps), sampler, guidance)
    assert torch.allclose(result, x0, atol=1e-5), (result - x0).abs().max()
    assert [step for step, _ in calls] == list(range(12))
    assert all(t.dtype == torch.float32 and t.shape == (2 if guidance > 1 else 1,) for _, t in calls)
    assert torch.equal(torch.stack([t[0] for _, t in calls]), sampler.timesteps)


def test_guidance_combines_velocities():
    sampler = flow(3)
    uncond, cond = unit_noise(3), unit_noise(4)

    def model_fn(model_input, timestep, step):
        assert model_input.shape[0] == 2
        return torch.cat([uncond, cond])

    x = unit_noise()
    result = denoise(model_fn, x, sampler, 5.0)
    guided = uncond + 5.0 * (cond - uncond)
    expected = x
    for index in range(3):
        expected = sampler.step(guided, index, expected)
    assert torch.equal(result, expected)


# ----------------------------------------------------------------------------------------------------
# Video-to-video
# ----------------------------------------------------------------------------------------------------

def test_strength_keeps_the_last_timesteps_and_noises_the_video():
    sampler = flow(50)
    start = first_step_for_strength(50, 0.7)
    assert start == 15 and len(sampler.timesteps) - start == 35
    assert sampler.timesteps[start].item() == pytest.approx(694.18, abs=1e-2)
    x0, eps = clean_latents(), unit_noise()
    sigma = sampler.sigmas[start]
    noised = start_latents(sampler, eps, start, x0)
    assert torch.equal(noised, sigma * eps + (1.0 - sigma) * x0)
    # From there the exact velocity still walks straight to x0, in the remaining 35 calls.
    calls = []
    result = denoise(velocity_oracle(x0, eps, calls), noised, sampler, 1.0, start_index=start)
    assert len(calls) == 35 and calls[0][1].item() == sampler.timesteps[start].item()
    assert torch.allclose(result, x0, atol=1e-5)


def test_strength_one_noises_to_pure_noise():
    sampler = flow(10)
    x0, eps = clean_latents(), unit_noise()
    assert torch.equal(sampler.add_noise(x0, eps, 0), eps)     # σ = 1 at the first timestep


# ----------------------------------------------------------------------------------------------------
# Configs: what is read, what is refused
# ----------------------------------------------------------------------------------------------------

def test_registered_with_its_diffusers_class():
    assert "Flow" in SAMPLERS and FLOW_SAMPLER_NAMES == ("Flow",)
    assert DDPM_SAMPLER_NAMES == ("Euler", "Euler A", "DPM++", "PNDM", "DDIM")
    assert sampler_name_for("FlowMatchEulerDiscreteScheduler") == "Flow"
    families = scheduler_class_families()
    for name, entry in sampler_classes().items():
        assert families[entry["diffusers_class"]] == SAMPLERS[name].family, name


def test_release_config_keys_are_read():
    config = resolved_sampler_config("Flow", dict(FLOW_CONFIG, shift=7.0))
    assert config["shift"] == 7.0 and config["use_dynamic_shifting"] is False
    assert config["time_shift_type"] == "exponential" and config["shift_terminal"] is None
    assert "_class_name" not in config
    # A key the saver marked as its own default is not carried over (diffusers `_use_default_values`).
    marked = dict(FLOW_CONFIG, shift=7.0, _use_default_values=["shift"])
    assert resolved_sampler_config("Flow", marked)["shift"] == 1.0
    assert resolved_sampler_config("Flow", {}) == sampler_classes()["Flow"]["defaults"]


@pytest.mark.parametrize("key, value", [
    ("invert_sigmas", True), ("use_karras_sigmas", True), ("use_exponential_sigmas", True),
    ("use_beta_sigmas", True), ("stochastic_sampling", True), ("time_shift_type", "cubic"),
])
def test_unreproduced_flow_settings_are_refused(key, value):
    with pytest.raises(EasyAnimateError, match=key):
        build_sampler("Flow", dict(FLOW_CONFIG, **{key: value}))


def test_linear_time_shift_refused_only_where_it_acts():
    with pytest.raises(EasyAnimateError, match="time_shift_type"):
        build_sampler("Flow", dict(FLOW_CONFIG, use_dynamic_shifting=True, time_shift_type="linear"))
    unused = flow(5, time_shift_type="linear")                  # without dynamic shifting it is never read
    assert torch.equal(unused.sigmas, flow(5).sigmas)


@pytest.mark.parametrize("overrides", [{"shift": 0}, {"shift": -2.0}, {"shift": "3"}, {"shift_terminal": 1.5},
                                       {"num_train_timesteps": 0}])
def test_bad_flow_numbers_are_refused(overrides):
    with pytest.raises(EasyAnimateError):
        build_sampler("Flow", dict(FLOW_CONFIG, **overrides))


def test_configs_of_the_other_kind_are_refused():
    with pytest.raises(EasyAnimateError, match=r"flow-matching config.*'Euler'.*Use 'Flow'"):
        build_sampler("Euler", FLOW_CONFIG)
    with pytest.raises(EasyAnimateError, match=r"DDPM config.*'Flow'"):
        build_sampler("Flow", V3_CONFIG)
    with pytest.raises(EasyAnimateError, match="needs the model's own scheduler config"):
        build_sampler("Flow")                                    # the V1–V3 YAML route is DDPM
    build_sampler("Flow", {})                                    # class defaults, no class to check


def test_flow_folder_route(tmp_path):
    import json

    folder = tmp_path / "EasyAnimateV5.1-tiny" / "scheduler"
    folder.mkdir(parents=True)
    (folder / "scheduler_config.json").write_text(json.dumps(dict(FLOW_CONFIG, shift=2.5)))
    assert build_sampler("Flow", folder.parent).shift == 2.5
    with pytest.raises(EasyAnimateError, match="Use 'Flow'"):
        build_sampler("DDIM", folder.parent)
    assert scheduler_prediction(folder.parent) == "flow"


def test_a_shift_replaces_the_release_configs_own(tmp_path):
    """`with_flow_shift` (the sampler node's and the command line's shift) gives the tables of a config written
    with that shift: the double shift of test_shift_is_applied_twice_like_the_reference, from the folder route."""
    import json

    folder = tmp_path / "EasyAnimateV5.1-tiny" / "scheduler"
    folder.mkdir(parents=True)
    (folder / "scheduler_config.json").write_text(json.dumps(FLOW_CONFIG))
    config = with_flow_shift(folder.parent, 3.0)
    assert config == {**FLOW_CONFIG, "shift": 3.0} and json.loads((folder / "scheduler_config.json").read_text()) == FLOW_CONFIG
    shifted, written = build_sampler("Flow", config), flow(10, shift=3.0)
    shifted.set_timesteps(10)
    assert torch.equal(shifted.sigmas, written.sigmas) and torch.equal(shifted.timesteps, written.timesteps)
    for bad in (0, -1.0, float("nan"), float("inf"), True, "2"):
        with pytest.raises(EasyAnimateError, match="shift must be a finite number above 0"):
            with_flow_shift(FLOW_CONFIG, bad)
    with pytest.raises(EasyAnimateError, match="flow-matching scheduler configs.*DPMSolverMultistepScheduler"):
        with_flow_shift(V3_CONFIG, 3.0)
    with pytest.raises(EasyAnimateError, match="dynamic shifting.*ignores the shift"):
        with_flow_shift(dict(FLOW_CONFIG, use_dynamic_shifting=True), 3.0)


# ----------------------------------------------------------------------------------------------------
# V5: the five DDPM samplers from a DDPMScheduler-style folder
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", DDPM_SAMPLER_NAMES)
def test_five_samplers_build_from_a_v5_style_config(name):
    sampler = build_sampler(name, V5_STYLE_CONFIG)
    sampler.set_timesteps(25)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float32) ** 2
    assert torch.equal(sampler.schedule.betas, betas)            # scaled_linear, read from the file
    assert sampler.config["timestep_spacing"] == "leading" and sampler.config["steps_offset"] == 1
    x = unit_noise()
    out = denoise(lambda m, t, s: torch.tanh(m) * 0.5, start_latents(sampler, x), sampler, 1.0,
                  generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all()


def test_v5_style_config_tables():
    ddim = build_sampler("DDIM", V5_STYLE_CONFIG)
    ddim.set_timesteps(25)
    assert ddim.timesteps.tolist() == list(range(961, 0, -40))  # leading, steps_offset 1
    assert ddim.config["clip_sample"] is False                   # DDPMScheduler's value carried over
    euler = build_sampler("Euler", V5_STYLE_CONFIG)
    euler.set_timesteps(25)
    assert euler.timesteps[0].item() == 961.0
    assert euler.init_noise_sigma == pytest.approx((euler.sigmas.max().item() ** 2 + 1) ** 0.5)
    assert build_sampler("DPM++", V5_STYLE_CONFIG).config["variance_type"] == "fixed_small"


@pytest.mark.parametrize("name", DDPM_SAMPLER_NAMES)
def test_v_prediction_is_refused_with_the_setting_named(name):
    with pytest.raises(EasyAnimateError, match=r"prediction_type='v_prediction' is not supported"):
        build_sampler(name, dict(V5_STYLE_CONFIG, prediction_type="v_prediction"))


def test_learned_variance_is_refused_by_dpm():
    with pytest.raises(EasyAnimateError, match="variance_type"):
        build_sampler("DPM++", dict(V5_STYLE_CONFIG, variance_type="learned_range"))


# ----------------------------------------------------------------------------------------------------
# Family rules
# ----------------------------------------------------------------------------------------------------

def test_samplers_for_each_family():
    assert samplers_for_family("v5.1") == ("Flow",)
    for family in ("v1", "v2", "v3", "v5"):
        assert samplers_for_family(family) == DDPM_SAMPLER_NAMES
    assert samplers_for_family("V5.1") == samplers_for_family("v51") == ("Flow",)


def test_matching_samplers_pass():
    assert check_sampler_for_family("Flow", "v5.1") == "Flow"
    assert check_sampler_for_family("Flow", "v5.1", "flow") == "Flow"
    for family in ("v1", "v2", "v3", "v5"):
        for name in DDPM_SAMPLER_NAMES:
            assert check_sampler_for_family(name, family) == name
            assert check_sampler_for_family(name, family, "epsilon") == name


@pytest.mark.parametrize("name", DDPM_SAMPLER_NAMES)
def test_ddpm_sampler_on_v51_names_both_and_the_fix(name):
    with pytest.raises(EasyAnimateError) as error:
        check_sampler_for_family(name, "v5.1")
    message = str(error.value)
    assert repr(name) in message and "V5.1" in message and "'Flow'" in message


@pytest.mark.parametrize("family", ["v1", "v2", "v3", "v5"])
def test_flow_on_a_ddpm_model_names_both_and_the_fix(family):
    with pytest.raises(EasyAnimateError) as error:
        check_sampler_for_family("Flow", family)
    message = str(error.value)
    assert "'Flow'" in message and family.upper() in message
    assert all(repr(name) in message for name in DDPM_SAMPLER_NAMES)


def test_prediction_must_agree_with_the_family():
    with pytest.raises(EasyAnimateError, match="does not belong to this model"):
        check_sampler_for_family("Flow", "v5.1", "epsilon")
    with pytest.raises(EasyAnimateError, match="does not belong to this model"):
        check_sampler_for_family("DDIM", "v5", "flow")
    with pytest.raises(EasyAnimateError, match="v_prediction"):
        check_sampler_for_family("DDIM", "v5", "v_prediction")
    assert scheduler_prediction(V5_STYLE_CONFIG) == "epsilon"
    assert scheduler_prediction(dict(V5_STYLE_CONFIG, prediction_type="v_prediction")) == "v_prediction"
    assert scheduler_prediction(FLOW_CONFIG) == "flow"


def test_unknown_family_and_sampler():
    with pytest.raises(EasyAnimateError, match="v5.1"):
        check_sampler_for_family("Flow", "v4")
    with pytest.raises(EasyAnimateError, match="Flow"):
        check_sampler_for_family("Heun", "v5.1")
