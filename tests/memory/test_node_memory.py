"""Outside ComfyUI the nodes take the core's memory modes from the environment and give the same results."""
import pytest
import torch


def _nodes(pack):
    return pack.nodes.NODE_CLASS_MAPPINGS


SAMPLE = dict(width=32, height=32, frames=8, seed=3, steps=2, cfg=6.0, sampler_name="Euler", denoise=1.0)


def _run(pack, lora=None):
    model, vae, t5 = _nodes(pack)["LoadEasyAnimate"]().load("EasyAnimateV3-tiny", "fp32")
    if lora:
        model, t5 = _nodes(pack)["EasyAnimateLoRALoader"]().apply(model, lora, 0.8, 0.0, t5=t5)
    embeds = _nodes(pack)["EasyAnimateT5Encode"]().encode("a red circle moving right", "blurry", True, t5=t5)[0]
    latents = _nodes(pack)["EasyAnimateSampler"]().sample(model, embeds, vae, **SAMPLE)[0]
    frames = _nodes(pack)["EasyAnimateSliceVAEDecode"]().decode(
        vae, latents, tiling="model default", tile_size=384, tile_overlap=0.25, smooth=False, smooth_seed=0)[0]
    weights = {k: v.clone() for k, v in model.transformer.module.state_dict().items()}
    return latents["samples"], frames, weights


@pytest.mark.parametrize("lora", [None, "style_a.safetensors"])
def test_offload_and_block_swap_from_the_environment(standalone, monkeypatch, lora):
    monkeypatch.delenv("EASYANIMATE_MEMORY_MODE", raising=False)
    monkeypatch.delenv("EASYANIMATE_MEMORY_BUDGET_MB", raising=False)
    assert standalone.nodes.host.current_host().memory.mode == "none"
    latents, frames, weights = _run(standalone, lora)
    for mode in ("offload", "block-swap:2"):
        monkeypatch.setenv("EASYANIMATE_MEMORY_MODE", mode)
        options = standalone.nodes.host.current_host().memory
        assert options.mode == mode.split(":")[0] and options.swap_blocks in (2, 4)
        got_latents, got_frames, got_weights = _run(standalone, lora)
        torch.testing.assert_close(got_latents, latents, rtol=0, atol=0)
        torch.testing.assert_close(got_frames, frames, rtol=0, atol=0)
        for key, value in got_weights.items():
            assert torch.equal(value, weights[key]), key


def test_fp8_and_budget_from_the_environment(standalone, monkeypatch):
    monkeypatch.delenv("EASYANIMATE_MEMORY_MODE", raising=False)
    latents, _, _ = _run(standalone)
    # The smallest budget the pack accepts for this request (one row of the CFG batch per pass); below it,
    # the sampler refuses the request.
    model, vae, _ = _nodes(standalone)["LoadEasyAnimate"]().load("EasyAnimateV3-tiny", "fp32")
    stages = standalone.easyanimate.pipeline.stages_for(model.transformer.module, vae.vae)
    request = stages.request(frames=SAMPLE["frames"], height=SAMPLE["height"], width=SAMPLE["width"],
                             steps=SAMPLE["steps"], guidance_scale=SAMPLE["cfg"])
    smallest = stages.memory_estimate(request).budget_minimum
    monkeypatch.setenv("EASYANIMATE_MEMORY_BUDGET_MB", str(smallest / 2**20 / 2))
    with pytest.raises(standalone.easyanimate.errors.EasyAnimateError, match="memory budget"):
        _run(standalone)
    monkeypatch.setenv("EASYANIMATE_MEMORY_BUDGET_MB", str(smallest / 2**20))
    budget_latents, _, _ = _run(standalone)
    assert ((budget_latents - latents).abs().max() / latents.abs().max()).item() <= 1e-5
    monkeypatch.delenv("EASYANIMATE_MEMORY_BUDGET_MB")
    monkeypatch.setenv("EASYANIMATE_MEMORY_MODE", "fp8")
    model = _nodes(standalone)["LoadEasyAnimate"]().load("EasyAnimateV3-tiny", "fp32")[0]
    # (the pack is imported under another package name here, so compare class names)
    assert any(type(m).__name__ == "Fp8Linear" for m in model.transformer.module.modules())
    fp8_latents, _, _ = _run(standalone)
    err = ((fp8_latents - latents).abs().max() / latents.abs().max()).item()
    assert 0 < err < 0.2  # two sampling steps of a tiny random model; the per-forward error is tested elsewhere
