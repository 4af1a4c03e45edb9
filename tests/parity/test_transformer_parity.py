"""Transformer parity against the reference fixtures: load each case with our loader, run its inputs."""
import json

import pytest
import torch

from conftest import fixture_cases, fixtures_dir, load_tensors, rel_error, rel_tolerance
from easyanimate.loading import load_transformer

# Reference argument names -> ours (the fixtures record the reference's call).
_ARGUMENTS = {
    "hidden_states": "x",
    "timestep": "timestep",
    "encoder_hidden_states": "encoder_hidden_states",
    "encoder_attention_mask": "encoder_attention_mask",
    "inpaint_latents": "inpaint_latents",
    "clip_encoder_hidden_states": "clip_encoder_hidden_states",
    "clip_attention_mask": "clip_attention_mask",
}


@pytest.mark.parametrize("case", fixture_cases("transformer"))
def test_transformer_matches_reference(case):
    folder = fixtures_dir() / case
    model = load_transformer(folder, dtype="fp32")
    expected_family = json.loads((folder / "meta.json").read_text()).get("reference", {}).get("era")
    if expected_family:
        assert model.config.family == expected_family

    io = load_tensors(folder / "io.safetensors")
    inputs = {k.removeprefix("input."): v for k, v in io.items() if k.startswith("input.")}
    unknown = set(inputs) - set(_ARGUMENTS)
    assert not unknown, f"fixture inputs this test does not know how to pass: {unknown}"
    kwargs = {_ARGUMENTS[k]: v for k, v in inputs.items()}
    with torch.no_grad():
        out = model(**kwargs)

    outputs = {k: v for k, v in io.items() if k.startswith("output.")}
    assert outputs, f"{case}: no output.* tensors"
    for key, ref in outputs.items():
        err = rel_error(out, ref)
        tol = rel_tolerance(case, key)
        print(f"{case} {key}: rel error {err:.2e} (tolerance {tol:.0e})")
        assert err <= tol, f"{case} {key}: rel error {err:.3e} > {tol:.1e}"
