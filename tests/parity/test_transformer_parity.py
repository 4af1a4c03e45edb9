"""Transformer parity against the reference fixtures: load each case with our loader, run its inputs."""
import json

import pytest
import torch

from conftest import fixture_cases, fixtures_dir, load_tensors, rel_error, rel_tolerance, transformer_inputs
from easyanimate.loading import load_transformer



@pytest.mark.parametrize("case", fixture_cases("transformer"))
def test_transformer_matches_reference(case):
    folder = fixtures_dir() / case
    model = load_transformer(folder, dtype="fp32")
    expected_family = json.loads((folder / "meta.json").read_text()).get("reference", {}).get("era")
    if expected_family:
        assert model.config.family == expected_family

    io = load_tensors(folder / "io.safetensors")
    kwargs = transformer_inputs(io)
    with torch.no_grad():
        out = model(**kwargs)

    outputs = {k: v for k, v in io.items() if k.startswith("output.")}
    assert outputs, f"{case}: no output.* tensors"
    for key, ref in outputs.items():
        err = rel_error(out, ref)
        tol = rel_tolerance(case, key)
        print(f"{case} {key}: rel error {err:.2e} (tolerance {tol:.0e})")
        assert err <= tol, f"{case} {key}: rel error {err:.3e} > {tol:.1e}"
