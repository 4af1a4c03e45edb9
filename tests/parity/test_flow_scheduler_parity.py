"""Flow-matching sampler parity with the reference (diffusers FlowMatchEulerDiscreteScheduler, EasyAnimate V5.1).

For every fixture case of kind "scheduler" of era v5.1 (the V1–V3 samplers are checked by
test_scheduler_parity.py, which takes the V1–V3 eras only):
  * tables: for every config in meta.json `configs` and every step count recorded in io.safetensors
    (`output.<config>.steps<N>.timesteps / .sigmas`), our resolved config, timesteps and sigmas;
  * the release route: the case's `scheduler/` folder builds the sampler of the config it equals;
  * one Euler step and the video-to-video noising (`scale_noise`), set up as meta.json `calls` says.
For every case of kind "pipeline_v5" of era v5.1 with recorded model outputs: each run's sampling loop is
replayed through our unchanged `denoise` (guidance and Flow steps), without any model, comparing the
timesteps, model inputs, per-step latents and final latents.
Every config, step count and index is read from the case files.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import fixture_cases, fixture_index, fixtures_dir, load_tensors, rel_error, rel_tolerance
from easyanimate.samplers.flow import PIPELINE_MU
from easyanimate.sampling import build_sampler, denoise, first_step_for_strength, resolved_sampler_config, start_latents

FLOW_ERAS = ("v5.1",)
# The replay feeds recorded model outputs, so only the guidance and step arithmetic can differ: it is held
# to the scheduler tolerance of the fixtures (rel ≤ 1e-6), far below the pipelines' 2e-4.
REPLAY_TOLERANCE = 1e-6


def cases_of_eras(kind: str, eras) -> list:
    """fixture_cases(kind) restricted to cases whose `era` is one of `eras` (the no-fixtures skip kept)."""
    params = fixture_cases(kind)
    index = fixture_index()
    kept = [p for p in params if p.values[0] is None or index.get(p.values[0], {}).get("era") in eras]
    assert kept, f"fixtures folder {fixtures_dir()} has no case of kind '{kind}' and era {', '.join(eras)}"
    return kept


CASES = cases_of_eras("scheduler", FLOW_ERAS)


def _pipeline_cases():
    """The v5.1 pipeline cases (replayed here); none is not an error: their own tests require them."""
    folder = fixtures_dir()
    if not folder.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(reason=f"reference fixtures not found at {folder}"),
                             id="no-fixtures")]
    names = sorted(n for n, c in fixture_index().items() if c.get("kind") == "pipeline_v5" and c.get("era") in FLOW_ERAS)
    if not names:
        return [pytest.param(None, marks=pytest.mark.skip(reason="no v5.1 pipeline case in the fixtures"), id="none")]
    return [pytest.param(n, id=n) for n in names]


PIPELINE_CASES = _pipeline_cases()


# ----------------------------------------------------------------------------------------------------
# Reading a case
# ----------------------------------------------------------------------------------------------------

def case_dir(case: str) -> Path:
    return fixtures_dir() / case


def case_meta(case: str) -> dict:
    meta_file = case_dir(case) / "meta.json"
    assert meta_file.is_file(), f"{case}: meta.json missing, cannot tell how the outputs were made"
    return json.loads(meta_file.read_text())


def case_io(case: str) -> dict:
    io_file = case_dir(case) / "io.safetensors"
    assert io_file.is_file(), f"{case}: io.safetensors missing"
    return load_tensors(io_file)


TABLE_KEY = re.compile(r"^output\.(?P<config>.+)\.steps(?P<steps>\d+)\.(?P<what>timesteps|sigmas)$")


def recorded_tables(io: dict) -> dict:
    """{(config name, steps): {"timesteps": tensor, "sigmas": tensor}} from the output keys."""
    tables = {}
    for key, tensor in io.items():
        match = TABLE_KEY.match(key)
        if match:
            tables.setdefault((match["config"], int(match["steps"])), {})[match["what"]] = (key, tensor)
    return tables


def config_kwargs(meta: dict, name: str) -> dict:
    configs = meta.get("configs", {})
    assert name in configs, f"config {name!r} has recorded tables but is not described in meta.json configs"
    entry = configs[name]
    assert "constructor_kwargs" in entry, f"meta.json configs.{name} has no constructor_kwargs"
    return dict(entry["constructor_kwargs"])


def recorded_mu(meta: dict) -> float:
    """μ passed to set_timesteps, as meta.json `calls.timesteps` states it (the pipelines' 1 otherwise)."""
    match = re.search(r"\bmu\s*=\s*(-?[\d.]+)", meta.get("calls", {}).get("timesteps", ""))
    return float(match.group(1)) if match else PIPELINE_MU


def without_saver_notes(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def step_setup(meta: dict, io: dict, tables: dict) -> tuple[str, int, int]:
    """(config name, steps, index) of the recorded Euler step, from meta.json `calls.step`; if the prose
    does not say, the first recorded table holding input.step.timestep."""
    call = meta.get("calls", {}).get("step", "")
    config = re.search(r"configs\.(\w+)", call)
    steps = re.search(r"\bN\s*=\s*(\d+)", call)
    begin = re.search(r"set_begin_index\((\d+)\)", call)
    if config and steps and begin:
        return config.group(1), int(steps.group(1)), int(begin.group(1))
    assert "input.step.timestep" in io, "meta.json calls.step does not say how the step was made and no input.step.timestep"
    t = io["input.step.timestep"].reshape(-1)[0]
    for (name, count), table in sorted(tables.items()):
        hits = (table["timesteps"][1] == t).nonzero()
        if len(hits):
            return name, count, int(hits[0, 0])
    raise AssertionError(f"input.step.timestep {t.item()} is in no recorded table")


# ----------------------------------------------------------------------------------------------------
# Scheduler cases
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_flow_tables(case):
    """Every config × step count: resolved config, timesteps (N) and sigmas (N + 1, terminal 0)."""
    meta, io = case_meta(case), case_io(case)
    tables = recorded_tables(io)
    assert tables, f"{case}: no output.<config>.steps<N>.timesteps/sigmas in io.safetensors"
    mu = recorded_mu(meta)
    problems, worst, exact = [], 0.0, 0
    for name in sorted({name for name, _ in tables}):
        kwargs = config_kwargs(meta, name)
        reference = without_saver_notes(meta["configs"][name].get("resolved_config", {}))
        ours = resolved_sampler_config("Flow", kwargs)
        for key, value in reference.items():
            if key not in ours:
                problems.append(f"{name}: reference config key {key!r} is unknown to the Flow sampler")
            elif ours[key] != value:
                problems.append(f"{name}: config {key} = {ours[key]!r}, reference {value!r}")
    for (name, steps), table in sorted(tables.items()):
        assert set(table) == {"timesteps", "sigmas"}, f"{case}: {name} steps{steps} lacks timesteps or sigmas"
        sampler = build_sampler("Flow", config_kwargs(meta, name))
        sampler.set_timesteps(steps, mu=mu)
        for what, ours in (("timesteps", sampler.timesteps), ("sigmas", sampler.sigmas)):
            key, reference = table[what]
            if ours.shape != reference.shape:
                problems.append(f"{key}: shape {tuple(ours.shape)} != {tuple(reference.shape)}")
                continue
            if ours.dtype != reference.dtype:
                problems.append(f"{key}: dtype {ours.dtype} != {reference.dtype}")
            err = rel_error(ours, reference)
            worst, exact = max(worst, err), exact + torch.equal(ours, reference)
            if err > rel_tolerance(case, key):
                problems.append(f"{key}: rel error {err:.2e} > {rel_tolerance(case, key):.0e}")
    print(f"\n{case}: {2 * len(tables)} tables, worst rel {worst:.1e}, {exact} bit-identical")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("case", CASES)
def test_release_folder_route(case):
    """The case's scheduler/ folder (a saved FlowMatchEulerDiscreteScheduler) builds the sampler of the
    recorded config it equals, with the same tables."""
    folder = case_dir(case) / "scheduler"
    assert (folder / "scheduler_config.json").is_file(), f"{case}: scheduler/scheduler_config.json missing"
    meta, io = case_meta(case), case_io(case)
    ours = resolved_sampler_config("Flow", folder)
    matching = [name for name, entry in meta.get("configs", {}).items()
                if without_saver_notes(entry.get("resolved_config", {})) == ours]
    assert matching, f"{case}: the scheduler folder's config {ours} equals none of meta.json configs"
    tables = recorded_tables(io)
    sampler = build_sampler("Flow", folder)
    compared = 0
    for (name, steps), table in sorted(tables.items()):
        if name not in matching:
            continue
        compared += 1
        sampler.set_timesteps(steps, mu=recorded_mu(meta))
        for what, ours_table in (("timesteps", sampler.timesteps), ("sigmas", sampler.sigmas)):
            key, reference = table[what]
            assert rel_error(ours_table, reference) <= rel_tolerance(case, key), key
    assert compared, f"{case}: no table recorded for {', '.join(matching)}"


@pytest.mark.parametrize("case", CASES)
def test_flow_step_and_scale_noise(case):
    """One Euler step (x + (σ_next − σ)·v) and σ·ε + (1 − σ)·x0, at the recorded begin index."""
    meta, io = case_meta(case), case_io(case)
    name, steps, index = step_setup(meta, io, recorded_tables(io))
    sampler = build_sampler("Flow", config_kwargs(meta, name))
    sampler.set_timesteps(steps, mu=recorded_mu(meta))
    problems = []
    if "input.step.timestep" in io:
        t = io["input.step.timestep"].reshape(-1)[0]
        if rel_error(sampler.timesteps[index:index + 1], t.reshape(1)) > rel_tolerance(case, "output.step.prev_sample"):
            problems.append(f"timestep at index {index} is {sampler.timesteps[index].item()}, reference {t.item()}")
    for key in ("input.step.model_output", "input.step.sample"):
        assert key in io, f"{case}: {key} missing"
    outputs = {}
    if "output.step.prev_sample" in io:
        outputs["output.step.prev_sample"] = sampler.step(io["input.step.model_output"], index, io["input.step.sample"])
    if "output.scale_noise" in io:
        call = meta.get("calls", {}).get("scale_noise", "")
        args = re.search(r"scale_noise\(\s*([\w.]+)\s*,[^,]*,\s*([\w.]+)\s*\)", call)
        sample_key, noise_key = (args.group(1), args.group(2)) if args else ("input.step.sample", "input.scale_noise.noise")
        begin = re.search(r"set_begin_index\((\d+)\)", call)
        noise_index = int(begin.group(1)) if begin else index
        assert sample_key in io and noise_key in io, f"{case}: scale_noise inputs {sample_key}, {noise_key} missing"
        outputs["output.scale_noise"] = sampler.add_noise(io[sample_key], io[noise_key], noise_index)
    assert outputs, f"{case}: neither output.step.prev_sample nor output.scale_noise recorded"
    report = []
    for key, ours in outputs.items():
        err = rel_error(ours, io[key])
        report.append(f"{key} {err:.1e}{' (bit-identical)' if torch.equal(ours, io[key]) else ''}")
        if err > rel_tolerance(case, key):
            problems.append(f"{key}: rel error {err:.2e} > {rel_tolerance(case, key):.0e}")
    print(f"\n{case} ({name}, {steps} steps, index {index}): " + "; ".join(report))
    assert not problems, "\n".join(problems)


# ----------------------------------------------------------------------------------------------------
# V5.1 pipelines: the sampling loop replayed on the recorded model outputs
# ----------------------------------------------------------------------------------------------------

def number(value, what: str) -> float:
    """A numeric call argument; meta.json writes some as prose, e.g. "default 1.0"."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    match = re.search(r"-?\d+(\.\d+)?", str(value))
    assert match, f"cannot read {what} from meta.json value {value!r}"
    return float(match.group())


def run_strength(kwargs: dict, info: dict) -> float:
    for source in (info.get("strength"), kwargs.get("strength")):
        if isinstance(source, (int, float)) and not isinstance(source, bool):
            return float(source)
    return 1.0


def recorded_steps(tensors: dict) -> int:
    count = 0
    while f"debug.step{count}.model_output" in tensors:
        count += 1
    return count


def initial_noise(case: str, meta: dict, info: dict, tensors: dict, shape) -> torch.Tensor | None:
    """The unit noise a strength-1 run starts from: input.noise, or the run's first generator draw of the
    latents' shape."""
    inputs_file = case_dir(case) / meta.get("inputs_file", "inputs.safetensors")
    if inputs_file.is_file():
        inputs = load_tensors(inputs_file)
        if "input.noise" in inputs:
            return inputs["input.noise"]
    for draw in info.get("random_draws", []):
        if draw.get("source") == "generator" and tuple(draw.get("shape", ())) == tuple(shape) and draw["key"] in tensors:
            return tensors[draw["key"]]
    return None


@pytest.mark.parametrize("case", PIPELINE_CASES)
def test_pipeline_loop_replay(case):
    """`denoise` with "Flow" on the recorded transformer outputs reproduces every step of each run."""
    meta = case_meta(case)
    kwargs = meta.get("call", {}).get("kwargs", {})
    assert "num_inference_steps" in kwargs and "guidance_scale" in kwargs, f"{case}: call.kwargs incomplete"
    steps = int(number(kwargs["num_inference_steps"], "num_inference_steps"))
    guidance = float(number(kwargs["guidance_scale"], "guidance_scale"))
    runs = meta.get("runs", {})
    assert runs, f"{case}: meta.json lists no runs"
    problems, report, replayed = [], [], 0
    for run, info in runs.items():
        path = case_dir(case) / info["file"]
        assert path.is_file(), f"{case}/{run}: {info['file']} missing"
        tensors = load_tensors(path)
        calls = recorded_steps(tensors)
        if not calls:
            continue
        replayed += 1
        file_tolerance = rel_tolerance(case, "output.latents_final", run_file=path.name)
        tolerance = min(REPLAY_TOLERANCE, file_tolerance)
        sampler = build_sampler("Flow", case_dir(case) / "scheduler")
        sampler.set_timesteps(steps)
        if "timesteps" in info and rel_error(sampler.timesteps, torch.tensor(info["timesteps"])) > tolerance:
            problems.append(f"{run}: timesteps {sampler.timesteps.tolist()} != {info['timesteps']}")
        start = first_step_for_strength(steps, run_strength(kwargs, info))
        if calls != steps - start:
            problems.append(f"{run}: {calls} recorded calls, strength {run_strength(kwargs, info)} runs {steps - start}")
            continue
        final_ref = tensors["output.latents_final"]
        latents = tensors["debug.step0.model_input"][: final_ref.shape[0]]
        noise = initial_noise(case, meta, info, tensors, final_ref.shape) if start == 0 else None
        if noise is not None and not torch.equal(start_latents(sampler, noise), latents):
            problems.append(f"{run}: start latents are not the recorded unit noise as is")
        worst = {"model_input": 0.0, "latents": 0.0}

        def check(key, actual):
            if key in tensors:
                err = rel_error(actual, tensors[key])
                kind = key.rsplit(".", 1)[-1]
                worst[kind] = max(worst[kind], err)
                if err > tolerance:
                    problems.append(f"{run}: {key} rel error {err:.2e} > {tolerance:.0e}")

        def recorded_model(model_input, timestep, step):
            check(f"debug.step{step}.model_input", model_input)
            key = f"debug.step{step}.timestep"
            if key in tensors and not torch.equal(timestep, tensors[key]):
                problems.append(f"{run}: step {step} timestep {timestep.tolist()} != {tensors[key].tolist()}")
            return tensors[f"debug.step{step}.model_output"]

        def after_step(done, total, current):
            check(f"debug.step{done - 1}.latents", current)

        final = denoise(recorded_model, latents, sampler, guidance, start_index=start,
                        generator=torch.Generator().manual_seed(0), callback=after_step)
        err = rel_error(final, final_ref)
        if err > tolerance:
            problems.append(f"{run}: output.latents_final rel error {err:.2e} > {tolerance:.0e}")
        checked = ", start noise checked" if noise is not None else ""
        report.append(f"{run} (start {start}{checked}): final {err:.1e}, "
                      f"per-step latents {worst['latents']:.1e}, model input {worst['model_input']:.1e}")
    if not replayed:
        pytest.skip(f"{case}: no run records debug.stepN.model_output (optional in the fixture format)")
    print(f"\n{case}: " + "; ".join(report))
    assert not problems, "\n".join(problems)
