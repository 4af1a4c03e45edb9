"""Parity of the V2/V3 VAEs with the reference fixtures (kind "vae" in the fixtures' index).

Every `output.*` tensor of a case is reproduced from the matching `input.*` through the public API:
`output.latent_mean<S>`/`output.latent_logvar<S>` from encoding `input.video<S>` (`input.image` for
`_image`), `output.decoded<S>` from decoding `input.latents<S>`, and `output.pipeline_decode` from the
pipeline decode with the reference's smoothing pass, fed the recorded `noise.*` draws in order.
Sizes come from the tensors. An output this file does not know how to produce fails the case.
"""
import json

import pytest
import torch

from easyanimate.vae import load_vae
from conftest import fixture_cases, fixtures_dir, load_tensors, rel_error, rel_tolerance

CASES = fixture_cases("vae")


def _case(case):
    folder = fixtures_dir() / case
    io = load_tensors(folder / "io.safetensors")
    meta = json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").is_file() else {}
    return folder, io, meta


def _recorded_noise(io, prefix):
    keys = sorted((k for k in io if k.startswith(prefix + ".")), key=lambda k: int(k.rsplit(".", 1)[1]))
    return [io[k] for k in keys]


def _produce(vae, io, key, cache):
    """The tensor our implementation gives for fixture output `key`."""
    name = key[len("output.") :]
    for stem, source, field in (("latent_mean", "video", "mean"), ("latent_logvar", "video", "logvar")):
        if name.startswith(stem):
            suffix = name[len(stem) :]
            source_key = "input.image" if suffix == "_image" else f"input.{source}{suffix}"
            if source_key not in cache:
                cache[source_key] = vae.encode(io[source_key])
            return getattr(cache[source_key], field)
    if name.startswith("decoded"):
        return vae.decode(io["input.latents" + name[len("decoded") :]])
    if name == "pipeline_decode":
        noise = _recorded_noise(io, "noise.pipeline_decode")
        return vae.decode_video(io["input.pipeline_decode_latents"], reference_parity=True, noise=noise)
    raise AssertionError(f"fixture output '{key}' has no known producer in this test; extend _produce")


@pytest.mark.parametrize("case", CASES)
def test_vae_outputs_match_reference(case):
    folder, io, _ = _case(case)
    vae = load_vae(folder)
    outputs = sorted(k for k in io if k.startswith("output."))
    assert outputs, f"case {case} has no output.* tensors"
    cache, report, failures = {}, [], []
    for key in outputs:
        ours = _produce(vae, io, key, cache)
        err = rel_error(ours, io[key])
        tol = rel_tolerance(case, key)
        report.append(f"{key}: rel {err:.2e} (tol {tol:.0e})")
        if not err <= tol:
            failures.append(key)
    print(f"\n[{case}] " + "; ".join(report))
    assert not failures, f"{case}: {failures} outside tolerance:\n" + "\n".join(report)


@pytest.mark.parametrize("case", CASES)
def test_generator_reproduces_recorded_smoothing_draws(case):
    """The reference draws its smoothing sample from the global RNG seeded just before the call; an
    explicit CPU generator with that seed draws the same numbers, in the same order and shapes."""
    folder, io, meta = _case(case)
    seed = meta.get("global_seed_for_pipeline_decode")
    noise = _recorded_noise(io, "noise.pipeline_decode")
    if seed is None or not noise or "output.pipeline_decode" not in io:
        pytest.skip("case records no global seed for its pipeline decode")
    vae = load_vae(folder)
    generator = torch.Generator().manual_seed(seed)
    ours = vae.decode_video(io["input.pipeline_decode_latents"], reference_parity=True, generator=generator)
    with_noise = vae.decode_video(io["input.pipeline_decode_latents"], reference_parity=True, noise=noise)
    assert torch.equal(ours, with_noise)
    assert rel_error(ours, io["output.pipeline_decode"]) <= rel_tolerance(case, "output.pipeline_decode")
