"""Sampler parity with the reference pipelines (diffusers 0.28.2 schedulers as EasyAnimate V3 used them).

For every fixture case of kind "pipeline" of the V1–V3 eras:
  * tables: each `scheduler/resolved_<sampler>.json` is rebuilt from the case's `scheduler/` folder
    (the release route) — resolved config, timesteps (exact), σ table and init_noise_sigma;
  * replay: each sampler run is replayed step by step without any model, by feeding the recorded
    `debug.stepN.model_output` (the CFG batch) through our guidance + sampler step, starting from the
    recorded unit noise × init_noise_sigma; model inputs, timesteps, per-step latents and the final
    latents are compared.
Every size, step count and guidance scale is read from the case files.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import fixture_cases, fixture_index, fixtures_dir, load_tensors, rel_error, rel_tolerance
from easyanimate.sampling import build_sampler, denoise, resolved_sampler_config, sampler_name_for, start_latents

# With the model outputs replayed from the recording, only the sampler's own float32 arithmetic can
# differ, so every sampler is held to the Euler/DPM++ bar here, DDIM included (its 2e-2 allowance is
# for a full pipeline, where model rounding is amplified by ~500x over the steps).
REPLAY_TOLERANCE = 2e-4
TABLE_TOLERANCE = 1e-6  # σ values are float32 numbers written to JSON

DDPM_ERAS = ("v1", "v2", "v3")  # the flow-matching (V5.1) sampler has its own test_flow_scheduler_parity.py


def cases_of_eras(kind: str, eras) -> list:
    """fixture_cases(kind) restricted to cases whose `era` is one of `eras` (the no-fixtures skip kept)."""
    params = fixture_cases(kind)
    index = fixture_index()
    kept = [p for p in params if p.values[0] is None or index.get(p.values[0], {}).get("era") in eras]
    assert kept, f"fixtures folder {fixtures_dir()} has no case of kind '{kind}' and era {', '.join(eras)}"
    return kept


CASES = cases_of_eras("pipeline", DDPM_ERAS)


# ----------------------------------------------------------------------------------------------------
# Reading a case
# ----------------------------------------------------------------------------------------------------

def case_dir(case: str) -> Path:
    return fixtures_dir() / case


def case_meta(case: str) -> dict:
    meta_file = case_dir(case) / "meta.json"
    assert meta_file.is_file(), f"{case}: meta.json missing, cannot tell how the runs were made"
    return json.loads(meta_file.read_text())


def call_kwargs(case: str) -> dict:
    kwargs = case_meta(case).get("call", {}).get("kwargs", {})
    assert "num_inference_steps" in kwargs, f"{case}: meta.json call.kwargs has no num_inference_steps"
    return kwargs


def number(value, what: str) -> float:
    """A numeric call argument; meta.json writes some as prose, e.g. "default 1.0"."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    match = re.search(r"-?\d+(\.\d+)?", str(value))
    assert match, f"cannot read {what} from meta.json value {value!r}"
    return float(match.group())


def resolved_files(case: str) -> list[Path]:
    files = sorted((case_dir(case) / "scheduler").glob("resolved_*.json"))
    assert files, f"{case}: no scheduler/resolved_*.json"
    return files


def resolved_for_class(case: str, diffusers_class: str) -> dict:
    for path in resolved_files(case):
        resolved = json.loads(path.read_text())
        if resolved.get("class") == diffusers_class:
            return resolved
    raise AssertionError(f"{case}: no scheduler/resolved_*.json for {diffusers_class}")


def sampler_runs(case: str) -> list[tuple[str, str, Path]]:
    """(run name, sampler name, run file) for every run recorded in meta.json."""
    runs = case_meta(case).get("runs", {})
    assert runs, f"{case}: meta.json lists no runs"
    found = []
    for run, info in runs.items():
        assert "scheduler_class" in info and "file" in info, f"{case}/{run}: run without scheduler_class/file"
        path = case_dir(case) / info["file"]
        assert path.is_file(), f"{case}/{run}: {info['file']} missing"
        found.append((run, sampler_name_for(info["scheduler_class"]), path))
    return found


def output_tolerance(case: str, file_name: str, key: str) -> float:
    """The index's tolerance for `key`; pipeline cases nest it per run file."""
    return rel_tolerance(case, key, run_file=file_name)


def recorded_noise(case: str, run_tensors: dict) -> torch.Tensor:
    if "input.noise" in run_tensors:
        return run_tensors["input.noise"]
    inputs_file = case_dir(case) / case_meta(case).get("inputs_file", "inputs.safetensors")
    assert inputs_file.is_file(), f"{case}: {inputs_file.name} missing"
    inputs = load_tensors(inputs_file)
    assert "input.noise" in inputs, f"{case}: no input.noise recorded"
    return inputs["input.noise"]


def recorded_steps(tensors: dict) -> int:
    count = 0
    while f"debug.step{count}.model_output" in tensors:
        count += 1
    return count


# ----------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_scheduler_tables(case):
    """Every resolved scheduler of the case: config, exact timesteps, σ table, init_noise_sigma."""
    steps = int(number(call_kwargs(case)["num_inference_steps"], "num_inference_steps"))
    problems = []
    for path in resolved_files(case):
        resolved = json.loads(path.read_text())
        name = sampler_name_for(resolved["class"])
        config = resolved_sampler_config(name, case_dir(case) / "scheduler")
        reference_config = resolved.get("resolved_config", {})
        for key, value in config.items():
            if key in reference_config and reference_config[key] != value:
                problems.append(f"{path.name}: config {key} = {value!r}, reference {reference_config[key]!r}")

        sampler = build_sampler(name, case_dir(case) / "scheduler")
        sampler.set_timesteps(resolved.get("num_inference_steps", steps))
        if sampler.timesteps.tolist() != resolved["timesteps"]:
            problems.append(f"{path.name}: timesteps {sampler.timesteps.tolist()} != {resolved['timesteps']}")
        integer_table = all(isinstance(t, int) for t in resolved["timesteps"])
        if integer_table != (sampler.timesteps.dtype == torch.int64):
            problems.append(f"{path.name}: timestep dtype {sampler.timesteps.dtype} (reference integers: {integer_table})")
        if "sigmas" in resolved:
            err = rel_error(sampler.sigmas, torch.tensor(resolved["sigmas"]))
            if err > TABLE_TOLERANCE:
                problems.append(f"{path.name}: sigmas rel error {err:.2e}")
        if "init_noise_sigma" in resolved:
            reference_sigma = resolved["init_noise_sigma"]
            if abs(sampler.init_noise_sigma - reference_sigma) > TABLE_TOLERANCE * abs(reference_sigma):
                problems.append(f"{path.name}: init_noise_sigma {sampler.init_noise_sigma} != {reference_sigma}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("case", CASES)
def test_step_replay(case):
    """Replay each run's sampling loop on the recorded model outputs and compare every step."""
    kwargs = call_kwargs(case)
    steps = int(number(kwargs["num_inference_steps"], "num_inference_steps"))
    guidance = float(number(kwargs["guidance_scale"], "guidance_scale"))
    assert number(kwargs.get("strength", 1.0), "strength") == 1.0, f"{case}: replay of strength < 1 runs is not implemented"
    runs = sampler_runs(case)
    replayable = [(run, name, path, load_tensors(path)) for run, name, path in runs]
    replayable = [r for r in replayable if recorded_steps(r[3])]
    if not replayable:
        pytest.skip(f"{case}: no run records debug.stepN.model_output (optional in the fixture format); "
                    "the scheduler tables are checked by test_scheduler_tables")

    problems, report = [], []
    for run, name, path, tensors in replayable:
        sampler = build_sampler(name, case_dir(case) / "scheduler")
        sampler.set_timesteps(steps)
        expected_calls = len(sampler.timesteps)
        if recorded_steps(tensors) != expected_calls:
            problems.append(f"{run}: {recorded_steps(tensors)} recorded steps, sampler makes {expected_calls}")
            continue
        tolerance = min(REPLAY_TOLERANCE, output_tolerance(case, path.name, "output.latents_final"))
        worst = {"model_input": 0.0, "latents": 0.0}

        def check(key, actual):
            if key not in tensors:
                return
            err = rel_error(actual, tensors[key])
            kind = key.rsplit(".", 1)[-1]
            worst[kind] = max(worst.get(kind, 0.0), err)
            if err > tolerance:
                problems.append(f"{run}: {key} rel error {err:.2e} > {tolerance:.0e}")

        def recorded_model(model_input, timestep, step):
            check(f"debug.step{step}.model_input", model_input)
            timestep_key = f"debug.step{step}.timestep"
            if timestep_key in tensors and not torch.equal(timestep, tensors[timestep_key]):
                problems.append(f"{run}: step {step} timestep {timestep.tolist()} != {tensors[timestep_key].tolist()}")
            return tensors[f"debug.step{step}.model_output"]

        def after_step(done, total, latents):
            check(f"debug.step{done - 1}.latents", latents)

        noise = recorded_noise(case, tensors)
        latents = start_latents(sampler, noise)
        final = denoise(recorded_model, latents, sampler, guidance,
                        generator=torch.Generator().manual_seed(0), callback=after_step)
        assert "output.latents_final" in tensors, f"{case}/{run}: no output.latents_final"
        final_err = rel_error(final, tensors["output.latents_final"])
        if final_err > tolerance:
            problems.append(f"{run}: output.latents_final rel error {final_err:.2e} > {tolerance:.0e}")
        report.append(f"{run} ({name}): final {final_err:.1e}, per-step latents {worst['latents']:.1e}, "
                      f"model input {worst['model_input']:.1e}")
    print(f"\n{case}: " + "; ".join(report))
    assert not problems, "\n".join(problems)
