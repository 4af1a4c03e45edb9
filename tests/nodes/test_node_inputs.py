"""Node inputs outside what the nodes can do get a clear error naming the input and its valid range, before
anything runs (standalone, tiny checkpoints)."""
import pytest
import torch

from test_nodes import SAMPLE, decode, encode, load, nodes, sample


def _error(pack):
    return pack.easyanimate.errors.EasyAnimateError  # the pack's own copy of the class


def test_seeds_are_declared_and_checked_in_the_range_the_generators_take(standalone):
    max_seed = standalone.easyanimate.errors.MAX_SEED
    assert max_seed == 2**63 - 1
    sampler = nodes(standalone)["EasyAnimateSampler"].INPUT_TYPES()["required"]["seed"][1]
    assert sampler["max"] == max_seed  # ComfyUI refuses a larger widget value with the range
    for node, name in (("EasyAnimateSliceVAEDecode", "smooth_seed"), ("EasyAnimateVAEEncode", "sample_seed")):
        assert nodes(standalone)[node].INPUT_TYPES()["required"][name][1]["max"] == max_seed
    model, vae, t5 = load(standalone)
    embeds = encode(standalone, t5)
    with pytest.raises(_error(standalone), match=r"0 to 9223372036854775807"):
        sample(standalone, model, embeds, vae, seed=2**64 - 1)
    with pytest.raises(_error(standalone), match=r"seed \+ batch_size - 1"):
        sample(standalone, model, embeds, vae, seed=max_seed, batch_size=2)


@pytest.mark.parametrize("change,words", [
    (dict(batch_size=0), "batch_size must be at least 1"),
    (dict(cfg=-5.0), "guidance scale"),
    (dict(cfg=float("nan")), "guidance scale"),
    (dict(frames=100000), "needs about"),
])
def test_sampler_inputs_out_of_range(standalone, monkeypatch, change, words):
    import easyanimate_pack.easyanimate.host as pack_host

    monkeypatch.setattr(pack_host, "available_ram", lambda: 4 * 2**30)  # the machine's memory does not matter
    model, vae, t5 = load(standalone)
    embeds = encode(standalone, t5)
    calls = []
    hook = model.transformer.module.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(_error(standalone), match=words):
            sample(standalone, model, embeds, vae, **change)
    finally:
        hook.remove()
    assert calls == []


def test_a_nan_start_image_is_refused(standalone):
    model, vae, t5 = load(standalone)
    image = torch.rand(1, 32, 32, 3)
    image[0, 3, 4, 1] = float("nan")
    with pytest.raises(_error(standalone), match="start image holds 1 non-finite value"):
        sample(standalone, model, encode(standalone, t5), vae, start_image=image)


def test_vae_nodes_refuse_an_unknown_tiling_mode_and_latents_of_the_wrong_shape(standalone):
    model, vae, t5 = load(standalone)
    latent = sample(standalone, model, encode(standalone, t5), vae, steps=1)
    with pytest.raises(_error(standalone), match="tiling must be one of"):
        decode(standalone, vae, latent, tiling="bogus")
    with pytest.raises(_error(standalone), match="tiling must be one of"):
        nodes(standalone)["EasyAnimateVAEEncode"]().encode(vae, torch.rand(8, 32, 32, 3), "bogus", 384, 0.25, False, 0)
    wrong = {"samples": torch.zeros(1, 16, 2, 4, 4)}  # 16 channels: latents of another VAE
    with pytest.raises(_error(standalone), match="channels"):
        decode(standalone, vae, wrong)


def test_lora_strengths_out_of_range_are_refused(standalone):
    model, _, t5 = load(standalone)
    loader = nodes(standalone)["EasyAnimateLoRALoader"]()
    for strength in (float("nan"), float("inf"), 1e30):
        with pytest.raises(_error(standalone), match="strength_model"):
            loader.apply(model, "style_a.safetensors", strength, 0.0, t5=t5)
