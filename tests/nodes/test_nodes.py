"""Every node end to end on tiny checkpoints in the release layout, standalone (no ComfyUI)."""
import pytest
import torch


def nodes(pack):
    return pack.nodes.NODE_CLASS_MAPPINGS


def load(pack, name="EasyAnimateV3-tiny", precision="fp32"):
    return nodes(pack)["LoadEasyAnimate"]().load(name, precision)


def encode(pack, t5, prompt="a red circle moving right", negative="blurry"):
    return nodes(pack)["EasyAnimateT5Encode"]().encode(prompt, negative, True, t5=t5)[0]


SAMPLE = dict(width=32, height=32, frames=8, seed=3, steps=3, cfg=6.0, sampler_name="Euler", denoise=1.0)


def sample(pack, model, embeds, vae, **kw):
    return nodes(pack)["EasyAnimateSampler"]().sample(model, embeds, vae, **{**SAMPLE, **kw})[0]


def decode(pack, vae, latent, **kw):
    options = {**dict(tiling="model default", tile_size=384, tile_overlap=0.25, smooth=False, smooth_seed=0), **kw}
    return nodes(pack)["EasyAnimateSliceVAEDecode"]().decode(vae, latent, **options)[0]


def test_every_input_has_a_tooltip_and_every_node_a_description(standalone):
    for name, cls in nodes(standalone).items():
        assert cls.DESCRIPTION and cls.CATEGORY.startswith("EasyAnimate"), name
        for section in cls.INPUT_TYPES().values():
            for input_name, spec in section.items():
                assert spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"


def test_loader_lists_models_and_caches(standalone):
    options = nodes(standalone)["LoadEasyAnimate"].INPUT_TYPES()["required"]["model"][0]
    assert "EasyAnimateV3-tiny" in options and "EasyAnimateV2-tiny" in options
    assert "demo" in options[0]  # the embedded demo model comes first
    files = nodes(standalone)["LoadEasyAnimate"].INPUT_TYPES()["optional"]["motion_module"][0]
    assert files == ["none"]  # the weights inside release folders are not offered as motion modules
    first, second = load(standalone), load(standalone)
    assert all(a is b for a, b in zip(first, second))


@pytest.mark.parametrize("mode", ["t2v", "i2v", "v2v"])
def test_text_image_and_video_to_video(standalone, mode):
    model, vae, t5 = load(standalone)
    embeds = encode(standalone, t5)
    extra = {}
    g = torch.Generator().manual_seed(5)
    if mode == "i2v":
        extra["start_image"] = torch.rand(1, 32, 32, 3, generator=g)
        extra["end_image"] = torch.rand(1, 32, 32, 3, generator=g)
    if mode == "v2v":
        extra["video"] = torch.rand(8, 32, 32, 3, generator=g)
        extra["denoise"] = 0.6
    latent = sample(standalone, model, embeds, vae, **extra)
    assert latent["samples"].shape == (1, 4, 2, 4, 4)
    frames = decode(standalone, vae, latent)
    assert frames.shape == (8, 32, 32, 3) and frames.dtype == torch.float32
    assert 0 <= frames.min() and frames.max() <= 1


def test_image_to_video_conditions_the_model_on_the_start_and_end_images(standalone):
    """The transformer's inpaint latents (captured by a forward pre-hook) are the VAE encodings of the mask
    (0 on the first and last frame) and of the video that keeps the node's start and end IMAGEs there."""
    model, vae, t5 = load(standalone)
    embeds = encode(standalone, t5)
    g = torch.Generator().manual_seed(11)
    start, end = torch.rand(1, 32, 32, 3, generator=g), torch.rand(1, 32, 32, 3, generator=g)
    seen = []
    handle = model.transformer.module.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inpaint_latents"].clone()), with_kwargs=True)
    try:
        sample(standalone, model, embeds, vae, start_image=start, end_image=end, steps=2)
    finally:
        handle.remove()

    s, e = start[0].permute(2, 0, 1), end[0].permute(2, 0, 1)  # IMAGE (1, H, W, 3) -> (3, H, W)
    video = torch.stack([s] * 7 + [e], dim=1)[None] * 2 - 1  # the start image on every frame but the last
    mask = torch.ones(1, 3, 8, 32, 32)
    mask[:, :, 0] = mask[:, :, -1] = 0
    masked = torch.full_like(video, -1.0)
    masked[:, :, 0], masked[:, :, -1] = s * 2 - 1, e * 2 - 1
    # The VAE samples come from a generator seeded with seed + 1, drawn for the video, the mask, the masked video.
    draws = torch.Generator().manual_seed(SAMPLE["seed"] + 1)
    vae.vae.encode_latents(video, generator=draws)
    expected = torch.cat([vae.vae.encode_latents(mask, generator=draws), vae.vae.encode_latents(masked, generator=draws)], 1)
    assert len(seen) == 2
    for inpaint in seen:
        assert inpaint.shape == (2, 8, 2, 4, 4)  # [negative, positive] rows (cfg 6)
        for row in inpaint:
            torch.testing.assert_close(row[None], expected)


DEMO_PROMPT = "a red circle moving right on a black background"
DEMO_RUN = dict(width=64, height=64, frames=16, steps=10, cfg=5.0, sampler_name="Euler", denoise=1.0)


def test_demo_image_to_video_through_the_nodes_keeps_its_start_image(standalone):
    """The nodes' image-to-video with the shipped (trained) demo: the first frame is the start image, within
    the tolerance measured for the pipeline (see DEMO_I2V_TOLERANCE in tests/test_pipeline.py: image-to-video
    0.012-0.015 mean abs error, text-to-video of the same seed 0.043-0.054)."""
    from test_pipeline import DEMO_I2V_TOLERANCE

    names = nodes(standalone)["LoadEasyAnimate"].INPUT_TYPES()["required"]["model"][0]
    if "demo" not in names[0]:
        pytest.skip("demo model not shipped")
    model, vae, t5 = load(standalone, names[0])
    embeds = encode(standalone, t5, prompt=DEMO_PROMPT, negative="")

    def video(seed, **extra):
        return decode(standalone, vae, nodes(standalone)["EasyAnimateSampler"]().sample(
            model, embeds, vae, seed=seed, **DEMO_RUN, **extra)[0])  # (16, 64, 64, 3)

    start = torch.round(video(1)[8:9] * 255) / 255  # a frame the demo makes, right of where its videos start
    for seed in (2, 3):
        t2v_error = (video(seed)[0] - start[0]).abs().mean().item()
        i2v = video(seed, start_image=start)
        i2v_error = (i2v[0] - start[0]).abs().mean().item()
        print(f"seed {seed}: first frame vs start image, mean abs error: i2v {i2v_error:.4f}, t2v {t2v_error:.4f}")
        assert i2v_error <= DEMO_I2V_TOLERANCE and i2v_error <= 0.5 * t2v_error, (seed, i2v_error, t2v_error)


def test_v2_release_and_frame_rounding(standalone, caplog):
    model, vae, t5 = load(standalone, "EasyAnimateV2-tiny")
    latent = sample(standalone, model, encode(standalone, t5), vae, frames=10)
    assert "generating 9" in caplog.text
    assert decode(standalone, vae, latent).shape == (9, 32, 32, 3)


def test_encode_node_and_smoothing_decode(standalone):
    model, vae, t5 = load(standalone)
    frames = torch.rand(16, 32, 32, 3)
    latent = nodes(standalone)["EasyAnimateVAEEncode"]().encode(vae, frames, "off", 384, 0.25, False, 0)[0]
    assert latent["samples"].shape == (1, 4, 4, 4, 4)
    smooth = decode(standalone, vae, latent, smooth=True, smooth_seed=5)
    plain = decode(standalone, vae, latent)
    assert smooth.shape == plain.shape == (16, 32, 32, 3)
    assert not torch.equal(smooth, plain)
    torch.testing.assert_close(decode(standalone, vae, latent, smooth=True, smooth_seed=5), smooth, rtol=0, atol=0)


def lora(pack, model, t5, name, strength):
    return nodes(pack)["EasyAnimateLoRALoader"]().apply(model, name, strength, 0.0, t5=t5)


def test_lora_branches_are_independent(standalone):
    model, vae, t5 = load(standalone)
    embeds = encode(standalone, t5)
    base_state = {k: v.clone() for k, v in model.transformer.module.state_dict().items()}
    base = sample(standalone, model, embeds, vae)["samples"]
    with_a, _ = lora(standalone, model, t5, "style_a.safetensors", 0.8)
    with_b, _ = lora(standalone, model, t5, "style_b.safetensors", 0.8)
    out_a = sample(standalone, with_a, embeds, vae)["samples"]
    out_b = sample(standalone, with_b, embeds, vae)["samples"]
    # Each branch equals its LoRA applied alone, on a fresh chain from the same base.
    alone_a, _ = lora(standalone, load(standalone)[0], t5, "style_a.safetensors", 0.8)
    torch.testing.assert_close(sample(standalone, alone_a, embeds, vae)["samples"], out_a, rtol=0, atol=0)
    assert not torch.allclose(out_a, base) and not torch.allclose(out_b, base) and not torch.allclose(out_a, out_b)
    # The base branch is unchanged, and so are the loaded weights.
    torch.testing.assert_close(sample(standalone, model, embeds, vae)["samples"], base, rtol=0, atol=0)
    for key, value in model.transformer.module.state_dict().items():
        assert torch.equal(value, base_state[key]), key
    # Strength 0 is the base model itself.
    zero, _ = lora(standalone, model, t5, "style_a.safetensors", 0.0)
    assert zero is model


def test_interrupt_stops_within_a_step_and_the_next_run_is_identical(standalone, monkeypatch):
    model, vae, t5 = load(standalone)
    embeds = encode(standalone, t5)
    reference = sample(standalone, model, embeds, vae, steps=5)["samples"]

    class Interrupted(Exception):
        pass

    calls = []
    host = standalone.nodes.host

    def interrupt_at_third_step():
        calls.append(1)
        if len(calls) == 3:
            raise Interrupted

    monkeypatch.setattr(host.current_host(), "check_interrupt", interrupt_at_third_step)
    steps_run = []
    original = model.transformer.module.forward

    def counting_forward(*args, **kwargs):
        steps_run.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(model.transformer.module, "forward", counting_forward)
    with pytest.raises(Interrupted):
        sample(standalone, model, embeds, vae, steps=5)
    assert len(steps_run) == 3  # stopped right after the step during which Cancel was pressed
    monkeypatch.undo()
    again = sample(standalone, model, embeds, vae, steps=5)["samples"]
    torch.testing.assert_close(again, reference, rtol=0, atol=0)


def test_bad_inputs_give_clear_errors(standalone):
    from easyanimate_pack.easyanimate.errors import EasyAnimateError

    model, vae, t5 = load(standalone)
    embeds = encode(standalone, t5)
    with pytest.raises(EasyAnimateError, match="multiples of 16"):
        sample(standalone, model, embeds, vae, width=40)
    with pytest.raises(ValueError, match="5-D"):
        decode(standalone, vae, {"samples": torch.zeros(1, 4, 4, 4)})
    with pytest.raises(ValueError, match="t5 output"):
        nodes(standalone)["EasyAnimateT5Encode"]().encode("x", "y", True)


def test_batch_of_candidates_are_the_single_runs_with_consecutive_seeds(standalone):
    model, vae, t5 = load(standalone)
    embeds = encode(standalone, t5)
    batch = sample(standalone, model, embeds, vae, seed=7, batch_size=3)["samples"]
    assert batch.shape == (3, 4, 2, 4, 4)
    for i in range(3):
        single = sample(standalone, model, embeds, vae, seed=7 + i)["samples"]
        assert torch.equal(batch[i:i + 1], single)
    frames = decode(standalone, vae, {"samples": batch})
    assert frames.shape == (3 * 8, 32, 32, 3)  # the videos back to back, as MuLTI Video-Text Score splits them
