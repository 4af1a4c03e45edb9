"""A whole V5.1 release folder through the public API: loading, generation in every mode the model takes,
mismatched parts refused before any compute, and what `info` says about it (tiny folders in the real layout)."""
import inspect
import json
import shutil

import pytest
import torch

from easyanimate import cli
from easyanimate.errors import EasyAnimateError
from easyanimate.pipeline import Conditioning, generate, load_model, make_video
from release import make_release
from release_v5 import make_release_v5, make_release_v51


@pytest.fixture(scope="module")
def v51_inp(tmp_path_factory):
    return make_release_v51(tmp_path_factory.mktemp("v51") / "EasyAnimateV5.1-tiny-InP", "inp")


@pytest.fixture(scope="module")
def v3(tmp_path_factory):
    return make_release(tmp_path_factory.mktemp("v3") / "EasyAnimateV3-tiny", "v3")


def test_a_v51_release_loads_with_its_own_text_encoder_and_flow_scheduler(v51_inp):
    model = load_model(v51_inp, dtype="fp32")
    assert model.family == "v51" and model.vae.family == "v5"
    assert type(model.text_encoder).__name__ == "Qwen2VLTextEncoder"
    assert model.scheduler_config == v51_inp / "scheduler"


@pytest.mark.parametrize("mode", ["t2v", "i2v", "i2v_end", "v2v"])
def test_every_inpainting_mode_generates(v51_inp, mode):
    model = load_model(v51_inp, dtype="fp32")
    g = torch.Generator().manual_seed(3)
    extra = {}
    if mode.startswith("i2v"):
        extra["start_images"] = torch.rand(1, 3, 32, 32, generator=g)
        if mode == "i2v_end":
            extra["end_images"] = torch.rand(1, 3, 32, 32, generator=g)
    if mode == "v2v":
        extra.update(video=torch.rand(1, 3, 5, 32, 32, generator=g), strength=0.5)
    video = make_video(model, "a red circle", "blurry", frames=5, height=32, width=32, steps=2, seed=4, **extra)
    assert video.shape == (1, 3, 5, 32, 32) and torch.isfinite(video).all()


@pytest.fixture(scope="module")
def v5_inp(tmp_path_factory):
    return make_release_v5(tmp_path_factory.mktemp("v5") / "EasyAnimateV5-tiny-InP", "inp")


def test_a_v5_release_generates_with_bert_and_mt5_beside_each_other(v5_inp):
    """V5: the transformer gets the Bert states as its text stream and the mT5 states beside them, as the two
    encoders give them (negative prompt first under CFG), and samples with V5's DDPM-family default."""
    model = load_model(v5_inp, dtype="fp32")
    assert model.family == "v5" and type(model.text_encoder).__name__ == "BertMT5TextEncoder"
    text = model.text_encoder.encode(["a cat walks in the snow"], ["blurry"])
    seen = []
    signature = inspect.signature(model.transformer.forward)
    hook = model.transformer.register_forward_pre_hook(
        lambda m, a, k: seen.append(signature.bind(*a, **k).arguments), with_kwargs=True)
    try:
        video = make_video(model, "a cat walks in the snow", "blurry", frames=5, height=32, width=32, steps=2,
                           seed=4, start_images=torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    finally:
        hook.remove()
    assert video.shape == (1, 3, 5, 32, 32) and torch.isfinite(video).all()
    assert len(seen) == 2
    call = seen[0]
    torch.testing.assert_close(call["encoder_hidden_states"], torch.cat([text.bert.negative_embeds, text.bert.embeds]))
    torch.testing.assert_close(call["encoder_hidden_states_t5"], torch.cat([text.t5.negative_embeds, text.t5.embeds]))


def test_v51_defaults_are_the_flow_sampler_and_ddpm_samplers_are_refused(v51_inp):
    model = load_model(v51_inp, dtype="fp32", text_encoder=False)
    text = Conditioning(torch.randn(1, 6, model.transformer.config.text_embed_dim), torch.ones(1, 6))
    generate(model.transformer, model.vae, text, text, frames=5, height=32, width=32, steps=1,
             scheduler_config=model.scheduler_config)
    with pytest.raises(EasyAnimateError, match="'Euler' is a DDPM sampler.*use 'Flow'"):
        generate(model.transformer, model.vae, text, text, frames=5, height=32, width=32, steps=1, sampler="Euler")


@pytest.mark.parametrize("frames,words", [(8, "5 and 9"), (48, "45 and 49")])
def test_frame_counts_follow_the_v5_rule(v51_inp, frames, words):
    model = load_model(v51_inp, dtype="fp32", text_encoder=False)
    text = Conditioning(torch.randn(1, 6, model.transformer.config.text_embed_dim), torch.ones(1, 6))
    with pytest.raises(EasyAnimateError, match=words):
        generate(model.transformer, model.vae, text, text, frames=frames, height=32, width=32, steps=1)


@pytest.mark.parametrize("size,words", [((40, 32), "got 40x32. The nearest valid sizes: 32x32, 48x32"),
                                        ((32, 8), "got 32x8. The nearest valid sizes: 32x16"),
                                        ((384, 680), "384x672, 384x688")])
def test_sizes_must_be_multiples_of_16_and_the_nearest_valid_ones_are_named(v51_inp, size, words):
    """The VAE halves height and width three times and the transformer cuts 2x2 patches: multiples of 16; refused
    before the VAE or the transformer runs."""
    model = load_model(v51_inp, dtype="fp32", text_encoder=False)
    calls = []
    for module in (model.transformer, model.vae.model):
        module.register_forward_pre_hook(lambda *a: calls.append(1))
    text = Conditioning(torch.randn(1, 6, model.transformer.config.text_embed_dim), torch.ones(1, 6))
    with pytest.raises(EasyAnimateError, match="multiples of 16 pixels for V5.1 .* InP .*" + words):
        generate(model.transformer, model.vae, text, text, frames=5, height=size[0], width=size[1], steps=1)
    assert calls == []


def test_a_transformer_and_vae_of_different_families_are_refused_before_compute(tmp_path, v51_inp, v3):
    mixed = tmp_path / "mixed"
    shutil.copytree(v51_inp, mixed)
    shutil.rmtree(mixed / "vae")
    shutil.copytree(v3 / "vae", mixed / "vae")
    with pytest.raises(EasyAnimateError, match=r"transformer is EasyAnimate V5\.1 but the VAE is the V3 one"):
        load_model(mixed, dtype="fp32")
    v51 = load_model(v51_inp, dtype="fp32", text_encoder=False)
    v3_model = load_model(v3, dtype="fp32", text_encoder=False)
    calls = []
    v51.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    text = Conditioning(torch.randn(1, 6, v51.transformer.config.text_embed_dim), torch.ones(1, 6))
    with pytest.raises(EasyAnimateError, match="needs the V5 VAE"):
        generate(v51.transformer, v3_model.vae, text, text, frames=8, height=32, width=32, steps=1)
    with pytest.raises(EasyAnimateError, match="needs the V3 VAE"):
        generate(v3_model.transformer, v51.vae, text, text, frames=5, height=32, width=32, steps=1)
    assert calls == []


def test_info_names_the_v51_variant_and_its_parts(v51_inp, capsys):
    assert cli.main(["info", str(v51_inp)]) == 0
    out = capsys.readouterr().out
    assert "V5.1" in out and "InP" in out and "Qwen2-VL" in out and "Flow" in out
    assert cli.main(["info", str(v51_inp), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["family"] == "v51" and not report["missing"]


def test_info_says_what_a_v51_release_lacks(tmp_path, v51_inp, capsys):
    partial = tmp_path / "partial"
    shutil.copytree(v51_inp, partial)
    shutil.rmtree(partial / "text_encoder")
    assert cli.main(["info", str(partial)]) == 0
    out = capsys.readouterr().out
    assert "text_encoder/" in out and "Qwen2-VL" in out
