"""Parity of the V5/V5.1 VAE with the reference fixtures (kind "vae_v5" in the fixtures' index).

Every `output.*` tensor of a case is reproduced from the matching `input.*` through the public API
(`load_vae`, `VideoVAE.encode/decode/decode_video`):

* `latent_{mean,logvar,std}<S>` from encoding `input.video<S>`, `latent_sample<S>` = mean + std x the
  recorded `noise.latent_sample<S>` (injected); the suffix `_slicing` is the reference's batch encoded one
  sample at a time (what we always do), `_tiled` the reference's spatial tiling;
* `decoded<S>` from decoding `input.latents<S>` (`_tiled`: with tiling);
* `pipeline_decode` from `decode_video(input.pipeline_decode_latents)`, whose (B, C, F, H, W) layout is
  compared with the reference's (B, F, C, H, W).

The tile sizes are the ones the case's meta.json records for its `enable_tiling(...)` call; all other
sizes come from the tensors. An output this file does not know how to produce fails the case.
"""
import ast
import json
import re

import pytest

from easyanimate.vae import Tiling, load_vae
from conftest import fixture_cases, fixtures_dir, load_tensors, rel_error, rel_tolerance

CASES = fixture_cases("vae_v5")


def _case(case):
    folder = fixtures_dir() / case
    io = load_tensors(folder / "io.safetensors")
    meta = json.loads((folder / "meta.json").read_text()) if (folder / "meta.json").is_file() else {}
    return folder, io, meta


def _reference_tiling(meta) -> Tiling:
    """The case's `enable_tiling(tile_sample_min_height=…, …)` arguments as our Tiling: square tiles of
    that size every `stride` pixels, each encoded tile kept whole as diffusers' tiled encode does."""
    call = meta.get("calls", {}).get("tiled", "")
    found = re.search(r"\{[^{}]*\}", call)
    assert found, f"meta.json records no enable_tiling arguments for the tiled outputs: {call!r}"
    kwargs = ast.literal_eval(found.group(0))
    size, stride = kwargs["tile_sample_min_height"], kwargs["tile_sample_stride_height"]
    assert (kwargs["tile_sample_min_width"], kwargs["tile_sample_stride_width"]) == (size, stride), kwargs
    return Tiling(size, stride=stride, whole_encode_tiles=True)


def _produce(vae, io, meta, key, cache):
    """The tensor our implementation gives for fixture output `key`."""
    name = key[len("output.") :]
    tiled = name.endswith("_tiled")
    tiling = _reference_tiling(meta) if tiled else None
    base = name.removesuffix("_tiled").removesuffix("_slicing")
    if base.startswith("latent_"):
        field, _, suffix = base[len("latent_") :].partition("_")
        source = f"input.video_{suffix}"
        memo = (source, tiled)
        if memo not in cache:
            cache[memo] = vae.encode(io[source], tiling=tiling)
        posterior = cache[memo]
        if field == "sample":
            return posterior.sample(noise=io[f"noise.latent_sample_{suffix}"])
        return {"mean": posterior.mean, "logvar": posterior.logvar, "std": posterior.std}[field]
    if base.startswith("decoded_"):
        return vae.decode(io["input.latents_" + base[len("decoded_") :]], tiling=tiling)
    if name == "pipeline_decode":
        video = vae.decode_video(io["input.pipeline_decode_latents"])  # (B, C, F, H, W) in [0, 1]
        return video.permute(0, 2, 1, 3, 4)
    raise AssertionError(f"fixture output '{key}' has no known producer in this test; extend _produce")


@pytest.mark.parametrize("case", CASES)
def test_v5_vae_outputs_match_reference(case):
    folder, io, meta = _case(case)
    vae = load_vae(folder)
    assert vae.family == "v5" and vae.latent_channels == 16 and vae.tiling is None
    assert vae.scaling_factor == pytest.approx(meta.get("config", {}).get("scaling_factor", 0.7125))
    outputs = sorted(k for k in io if k.startswith("output."))
    assert outputs, f"case {case} has no output.* tensors"
    cache, report, failures = {}, [], []
    for key in outputs:
        ours = _produce(vae, io, meta, key, cache)
        err = rel_error(ours, io[key])
        tol = rel_tolerance(case, key)
        report.append(f"{key}: rel {err:.2e} (tol {tol:.0e})")
        if not err <= tol:
            failures.append(key)
    print(f"\n[{case}] " + "; ".join(report))
    assert not failures, f"{case}: {failures} outside tolerance:\n" + "\n".join(report)


@pytest.mark.parametrize("case", CASES)
def test_v5_pipeline_encode_is_the_scaled_mode(case):
    """What the V5 pipelines feed the transformer: `latent_dist.mode()` x scaling factor (the default of
    `encode_latents` for V5), or with sampling, the scaled sample."""
    folder, io, _ = _case(case)
    vae = load_vae(folder)
    suffixes = [k.removeprefix("input.video_") for k in sorted(io) if k.startswith("input.video_")]
    suffix = next(s for s in suffixes if io[f"input.video_{s}"].shape[2] > 1 and f"output.latent_mean_{s}" in io)
    video, mean = io[f"input.video_{suffix}"], io[f"output.latent_mean_{suffix}"]
    scaled = vae.encode_latents(video)
    assert rel_error(scaled, mean * vae.scaling_factor) <= rel_tolerance(case, f"output.latent_mean_{suffix}")
    noise_key = f"noise.latent_sample_{suffix}"
    if noise_key in io:
        sampled = vae.encode_latents(video, sample=True, noise=io[noise_key])
        reference = io[f"output.latent_sample_{suffix}"] * vae.scaling_factor
        assert rel_error(sampled, reference) <= rel_tolerance(case, f"output.latent_sample_{suffix}")
