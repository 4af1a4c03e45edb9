"""Shared test helpers: where the reference fixtures live and how outputs are compared.

Parity tests find the fixtures through `EASYANIMATE_FIXTURES` (default: `../shared/fixtures/easyanimate`
beside the project). Every size is read from the case files. Only a missing folder skips (with the
reason printed by `-ra`); a case that is present but cannot be run fails.
"""
from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

# The tests run tiny models: one thread is faster than two there, and it keeps the suite fast when the
# machine is busy (two spinning OpenMP threads on two shared cores slow tiny ops by an order of magnitude).
torch.set_num_threads(1)

# Fixtures for node tests (the pack imported as ComfyUI imports it, tiny model folders).
pytest_plugins = ["pack_fixtures"]


def fixtures_dir() -> Path:
    env = os.environ.get("EASYANIMATE_FIXTURES")
    return Path(env).resolve() if env else (ROOT.parent / "shared" / "fixtures" / "easyanimate").resolve()


def fixture_index() -> dict:
    folder = fixtures_dir()
    index_file = folder / "index.json"
    cases = json.loads(index_file.read_text())["cases"] if index_file.is_file() else {}
    # Case folders not (yet) in the index are picked up from their meta.json.
    for meta in folder.glob("*/meta.json"):
        name = meta.parent.name
        if name not in cases:
            info = json.loads(meta.read_text())
            cases[name] = {"kind": info.get("kind"), "era": info.get("reference", {}).get("era")}
    return cases


def fixture_cases(kind: str, having: str | None = None):
    """pytest parameters for every fixture case of `kind` (with the sub-path `having`, when given);
    one skipped parameter if the fixtures folder is absent."""
    folder = fixtures_dir()
    if not folder.is_dir():
        reason = f"reference fixtures not found at {folder} (set EASYANIMATE_FIXTURES to their folder)"
        return [pytest.param(None, marks=pytest.mark.skip(reason=reason), id="no-fixtures")]
    names = sorted(n for n, c in fixture_index().items()
                   if c.get("kind") == kind and (having is None or (folder / n / having).exists()))
    assert names, f"fixtures folder {folder} has no case of kind '{kind}'" + (f" with {having}" if having else "")
    return [pytest.param(n, id=n) for n in names]


def rel_tolerance(case: str, key: str, run_file: str | None = None, default: float = 1e-4) -> float:
    """The case's tolerance for tensor `key`; pipeline cases nest them per run file (e.g. "euler.safetensors")."""
    spec = fixture_index().get(case, {}).get("rel_tolerance", {})
    if run_file is not None and isinstance(spec.get(run_file), dict):
        spec = spec[run_file]
    for pattern, tol in spec.items():
        if fnmatch.fnmatch(key, pattern) and isinstance(tol, (int, float)):
            return float(tol)
    return default


def rel_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """max|a - r| / max|r| over the tensor, the measure the fixtures' tolerances use."""
    actual, reference = actual.double(), reference.double()
    assert actual.shape == reference.shape, f"shape {tuple(actual.shape)} != reference {tuple(reference.shape)}"
    return ((actual - reference).abs().max() / reference.abs().max().clamp_min(1e-30)).item()


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# The reference transformer's argument names (as the fixtures record its call) -> ours.
_TRANSFORMER_ARGUMENTS = {
    "hidden_states": "x",
    "timestep": "timestep",
    "encoder_hidden_states": "encoder_hidden_states",
    "encoder_attention_mask": "encoder_attention_mask",
    "inpaint_latents": "inpaint_latents",
    "clip_encoder_hidden_states": "clip_encoder_hidden_states",
    "clip_attention_mask": "clip_attention_mask",
}


def transformer_inputs(io: dict) -> dict:
    """Keyword arguments for our transformer from a fixture's `input.*` tensors; unknown inputs fail."""
    inputs = {k.removeprefix("input."): v for k, v in io.items() if k.startswith("input.")}
    unknown = set(inputs) - set(_TRANSFORMER_ARGUMENTS)
    assert not unknown, f"fixture inputs the tests do not know how to pass: {unknown}"
    return {_TRANSFORMER_ARGUMENTS[k]: v for k, v in inputs.items()}
