"""LoRA parity against the reference fixtures (cases of kind "lora", e.g. v3_lora).

Each case names its base model folder in meta.json ("base_model": "../v3_t2v ..."). The LoRA is applied
at the recorded strength in both modes; the reference's merged and run-time outputs must be reproduced,
and after the `with` block the base output and every base weight must be exactly as before.
"""
import json

import pytest
import torch

from conftest import fixture_cases, fixtures_dir, load_tensors, rel_error, rel_tolerance, transformer_inputs
from easyanimate.loading import load_transformer
from easyanimate.lora import lora_patches, read_lora, resolve_lora

# Which outputs the LoRA is applied for. Merged and run-time differ only by float rounding in the
# reference, so each mode is held to both.
_WITH_LORA = ("output.sample_merged", "output.sample_runtime_lora")
_WITHOUT_LORA = ("output.sample_base",)


def _case_files(case):
    folder = fixtures_dir() / case
    meta = json.loads((folder / "meta.json").read_text())
    lora_info = meta.get("lora", {})
    base = (meta.get("base_model") or "").split()[0] if meta.get("base_model") else ""
    assert base, f"{case}: meta.json names no base_model"
    base_folder = (folder / base).resolve()
    assert base_folder.is_dir(), f"{case}: base model folder {base_folder} (from meta.json) is missing"
    lora_file = folder / lora_info.get("file", "lora.safetensors")
    assert lora_file.is_file(), f"{case}: LoRA file {lora_file} is missing"
    assert "multiplier" in lora_info, f"{case}: meta.json records no LoRA multiplier (strength)"
    return folder, meta, base_folder, lora_file, float(lora_info["multiplier"])


@pytest.mark.parametrize("mode", ["weights", "hooks"])
@pytest.mark.parametrize("case", fixture_cases("lora"))
def test_lora_matches_reference(case, mode):
    folder, meta, base_folder, lora_file, strength = _case_files(case)
    model = load_transformer(base_folder, dtype="fp32")
    before = {k: v.clone() for k, v in model.state_dict().items()}

    resolved = resolve_lora(read_lora(lora_file), model)
    report = resolved.report
    print(report.summary())
    assert report.complete, report.summary()
    expected_layers = meta.get("lora", {}).get("num_lora_modules")
    if expected_layers is not None:
        assert report.applied == {"transformer": expected_layers}

    io = load_tensors(folder / "io.safetensors")
    kwargs = transformer_inputs(io)
    outputs = {k: v for k, v in io.items() if k.startswith("output.")}
    unknown = set(outputs) - set(_WITH_LORA) - set(_WITHOUT_LORA)
    assert not unknown, f"{case}: outputs this test does not know how to produce: {unknown}"
    assert any(k in outputs for k in _WITH_LORA), f"{case}: no LoRA output to compare"

    with torch.no_grad():
        with lora_patches(model, [(resolved, strength)], mode=mode):
            with_lora = model(**kwargs)
        without_lora = model(**kwargs)

    for key, ref in outputs.items():
        out = with_lora if key in _WITH_LORA else without_lora
        err = rel_error(out, ref)
        tol = rel_tolerance(case, key)
        print(f"{case} [{mode}] {key}: rel error {err:.2e} (tolerance {tol:.0e})")
        assert err <= tol, f"{case} [{mode}] {key}: rel error {err:.3e} > {tol:.1e}"

    after = model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"base weights changed after the LoRA block: {changed[:5]}"
