"""Generation through the public API on tiny random models: conditioning layout, randomness, bad input."""
import pytest
import torch

from easyanimate.errors import EasyAnimateError
from easyanimate.pipeline import Conditioning, conditioning_video, generate, generate_long, inpaint_pixels, segment_plan
from easyanimate.sampling import SamplingCancelled
from easyanimate.vae import build_vae
from tiny import random_model

TINY_MAGVIT = {"ch": 8, "ch_mult": [1, 2, 4, 4], "norm_num_groups": 4, "use_tiling": False}
TINY_KL = {"block_out_channels": [8, 16, 32, 32], "norm_num_groups": 4}


def tiny_vae(family):
    torch.manual_seed(0)
    if family == "v1":
        return build_vae("v1", TINY_KL)
    return build_vae(family, TINY_MAGVIT if family == "v3" else {**TINY_MAGVIT, "ch_mult": [1, 2, 2, 4]})


@pytest.fixture(scope="module")
def v3():
    return random_model("v3", num_layers=2), tiny_vae("v3")


def text(model, seed=0, tokens=6):
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(1, tokens, model.config.caption_channels, generator=g)
    return Conditioning(embeds, torch.tensor([[1] * (tokens - 2) + [0, 0]]))


class Spy(torch.nn.Module):
    """Wraps a transformer and records what each call received."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []
        self.config, self.dtype = inner.config, inner.dtype
        self.activation_bytes = inner.activation_bytes

    def forward(self, x, timestep, text, mask, **kw):
        self.calls.append(dict(x=x.clone(), timestep=timestep.clone(), **{k: v for k, v in kw.items()}))
        return self.inner(x, timestep, text, mask, **kw)


def run(model, vae, **kw):
    options = dict(frames=8, height=16, width=32, steps=3, guidance_scale=6.0, seed=1)
    options.update(kw)
    return generate(model, vae, text(model), text(model, 1), **options)


# --- conditioning ---------------------------------------------------------------------------------

def test_conditioning_video_layouts():
    t2v = conditioning_video(8, 16, 16)
    assert t2v.video.abs().sum() == 0 and (t2v.mask == 1).all() and t2v.clip_image is None

    starts = torch.rand(2, 3, 16, 16)
    i2v = conditioning_video(8, 16, 16, start_images=starts, end_images=starts[1:])
    torch.testing.assert_close(i2v.video[0, :, :2].transpose(0, 1), starts)
    torch.testing.assert_close(i2v.video[0, :, 2:7], starts[0][:, None].expand(3, 5, 16, 16))
    torch.testing.assert_close(i2v.video[0, :, 7], starts[1])
    assert i2v.mask[0, 0, :, 0, 0].tolist() == [0, 0, 1, 1, 1, 1, 1, 0]
    torch.testing.assert_close(i2v.clip_image, starts[:1])

    clip = torch.rand(1, 3, 10, 16, 16)
    v2v = conditioning_video(8, 16, 16, video=clip)
    torch.testing.assert_close(v2v.video, clip[:, :, :8])
    assert (v2v.mask == 1).all()


def test_start_image_of_another_size_is_resized_like_pillow():
    from easyanimate.image_encoder import resize_like_pil, to_uint8_images

    image = torch.rand(1, 3, 20, 30)
    cond = conditioning_video(8, 16, 32, start_images=image)
    expected = resize_like_pil(to_uint8_images(image.permute(0, 2, 3, 1)), 16, 32)
    torch.testing.assert_close(cond.video[0, :, 0], expected[0].permute(2, 0, 1).float() / 255)


def image_to_video_pixels(start, end, frames):
    """What the reference's `get_image_to_video_latent` + inpaint pipeline hand the VAE for one start and one
    end image, written out frame by frame: the conditioning video (the start image on every frame but the
    last, the end image there) in [-1, 1]; the mask (0 = keep on the first and last frame, 1 = generate)
    as an image in [0, 1]; the masked video in [-1, 1], -1 on every frame to generate."""
    video = torch.stack([start] * (frames - 1) + [end], dim=1)[None] * 2 - 1
    mask = torch.ones(1, 3, frames, *start.shape[-2:])
    mask[:, :, 0] = mask[:, :, -1] = 0
    masked = torch.full_like(video, -1.0)
    masked[:, :, 0], masked[:, :, -1] = start * 2 - 1, end * 2 - 1
    return video, mask, masked


def test_inpaint_pixels_keep_the_start_and_end_images_with_mask_zero():
    g = torch.Generator().manual_seed(4)
    start, end = torch.rand(3, 16, 32, generator=g), torch.rand(3, 16, 32, generator=g)
    cond = conditioning_video(8, 16, 32, start_images=start[None], end_images=end[None])
    video, mask, masked = image_to_video_pixels(start, end, 8)
    torch.testing.assert_close(cond.video * 2 - 1, video, rtol=0, atol=0)
    assert cond.mask[0, 0, :, 0, 0].tolist() == [0, 1, 1, 1, 1, 1, 1, 0] and cond.mask.shape == (1, 1, 8, 16, 32)
    got_mask, got_masked = inpaint_pixels(cond)
    torch.testing.assert_close(got_mask, mask, rtol=0, atol=0)
    torch.testing.assert_close(got_masked, masked, rtol=0, atol=0)


def test_inpaint_latents_are_the_vae_encodings_of_mask_and_masked_video(v3):
    """The transformer's `inpaint_latents` (captured by a forward pre-hook) are the VAE encodings of the
    mask and the masked video that keep the start and end images, for both guidance rows."""
    model, vae = v3
    seen = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["inpaint_latents"].clone()),
                                             with_kwargs=True)
    g = torch.Generator().manual_seed(5)
    start, end = torch.rand(3, 16, 32, generator=g), torch.rand(3, 16, 32, generator=g)
    noise = [torch.randn(1, 4, 2, 2, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    try:
        run(model, vae, start_images=start[None], end_images=end[None], vae_noise=noise, steps=2)
    finally:
        handle.remove()

    video, mask, masked = image_to_video_pixels(start, end, 8)
    # The VAE draws in the reference's order: conditioning video (noise[0]), mask, masked video.
    expected = torch.cat([vae.encode_latents(mask, noise=noise[1]), vae.encode_latents(masked, noise=noise[2])], 1)
    assert len(seen) == 2
    for inpaint in seen:
        assert inpaint.shape == (2, 8, 2, 2, 4)  # [negative, positive] rows with guidance
        for row in inpaint:
            torch.testing.assert_close(row[None], expected)
    # The start and end images matter: other images, other latents.
    other = vae.encode_latents(image_to_video_pixels(end, start, 8)[2], noise=noise[2])
    assert (other - expected[:, 4:]).abs().max() > 1e-3


def test_text_to_video_through_the_inp_model_encodes_the_all_masked_video(v3):
    """Not zeros: the reference encodes the all-ones mask and the all -1 (everything to generate) video."""
    model, vae = v3
    spy = Spy(model)
    noise = [torch.randn(1, 4, 2, 2, 4, generator=torch.Generator().manual_seed(10 + i)) for i in range(3)]
    run(spy, vae, vae_noise=noise, guidance_scale=1.0)
    mask, masked = torch.ones(1, 3, 8, 16, 32), torch.full((1, 3, 8, 16, 32), -1.0)
    expected = torch.cat([vae.encode_latents(mask, noise=noise[1]), vae.encode_latents(masked, noise=noise[2])], 1)
    torch.testing.assert_close(spy.calls[0]["inpaint_latents"], expected)
    assert expected.abs().sum() > 0


def test_clip_tokens_are_off_for_the_first_steps_and_negative_branch(v3):
    model, vae = v3
    spy = Spy(model)
    embeds = torch.randn(1, 768)
    run(spy, vae, start_images=torch.rand(1, 3, 16, 32), clip_image_embeds=embeds, steps=4, clip_apply_ratio=0.5)
    masks = [call["clip_attention_mask"] for call in spy.calls]
    assert [m.sum().item() for m in masks] == [0, 0, 8, 8]  # 4 steps, ratio 0.5: steps 0-1 without CLIP
    assert (masks[-1][0] == 0).all() and (masks[-1][1] == 1).all()  # [negative, positive]
    torch.testing.assert_close(spy.calls[-1]["clip_encoder_hidden_states"][1], embeds[0])


# --- randomness -----------------------------------------------------------------------------------

def test_same_seed_same_video_other_seed_other_video(v3):
    model, vae = v3
    a, b, c = run(model, vae, seed=5), run(model, vae, seed=5), run(model, vae, seed=6)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


def test_no_global_rng_is_used(v3):
    model, vae = v3
    torch.manual_seed(0)
    a = run(model, vae, sampler="Euler A")
    torch.manual_seed(123)
    b = run(model, vae, sampler="Euler A")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- families and tasks ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["v1", "v2", "v3"])
@pytest.mark.parametrize("frames", ["video", "image"])
def test_every_family_generates_and_decodes(family, frames):
    model, vae = random_model(family, num_layers=2), tiny_vae(family)
    count = {"v1": 4, "v2": 9, "v3": 8}[family] if frames == "video" else 1
    latents = run(model, vae, frames=count, height=32, width=32, sampler="DPM++")
    assert latents.shape == (1, 4, vae.rules.latent_frames(count), 4, 4)
    video = vae.decode_video(latents)
    assert video.shape == (1, 3, count, 32, 32) and 0 <= video.min() and video.max() <= 1


def test_video_to_video_runs_the_last_steps_from_the_noised_video(v3):
    model, vae = v3
    spy = Spy(model)
    clip = torch.rand(1, 3, 8, 16, 32)
    run(spy, vae, video=clip, strength=0.5, steps=6)
    assert len(spy.calls) == 3


# --- stopping -------------------------------------------------------------------------------------

def test_cancel_stops_within_a_step_and_leaves_the_model_usable(v3):
    model, vae = v3
    state = {k: v.clone() for k, v in model.state_dict().items()}
    spy = Spy(model)
    with pytest.raises(SamplingCancelled):
        run(spy, vae, steps=5, callback=lambda done, total, latents: done < 2)
    assert len(spy.calls) == 2
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    torch.testing.assert_close(run(model, vae, steps=5), run(model, vae, steps=5), rtol=0, atol=0)


def test_an_exception_from_the_callback_propagates(v3):
    model, vae = v3

    def interrupt(done, total, latents):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(model, vae, callback=interrupt)


# --- bad input: refused before any model call -------------------------------------------------------

@pytest.mark.parametrize("options,words", [
    (dict(height=20), "multiples of 16"),
    (dict(frames=10), "cannot make 10 frames"),
    (dict(strength=0.0), "strength"),
    (dict(strength=1.5), "strength"),
    (dict(video=torch.rand(1, 3, 8, 16, 32), strength=1.5), "strength"),
    (dict(strength=0.5), "input video"),
    (dict(start_images=torch.rand(1, 16, 32)), "RGB images"),
    (dict(start_images=torch.rand(1, 4, 16, 32)), "RGB images"),
    (dict(sampler="Heun"), "Euler"),
    (dict(noise=torch.randn(1, 4, 1, 2, 4)), "noise has shape"),
    (dict(steps=0), "steps"),
])
def test_bad_input_is_refused_before_any_model_runs(v3, monkeypatch, options, words):
    model, vae = v3
    spy = Spy(model)
    encodes = []
    monkeypatch.setattr(vae, "encode_latents", lambda *a, **k: encodes.append(1))
    with pytest.raises(EasyAnimateError, match=words):
        run(spy, vae, **options)
    assert spy.calls == [] and encodes == []


def test_clip_text_embeddings_are_refused(v3):
    model, vae = v3
    spy = Spy(model)
    clip_l = Conditioning(torch.randn(1, 77, 768), torch.ones(1, 77))
    with pytest.raises(EasyAnimateError, match="T5"):
        generate(spy, vae, clip_l, clip_l, frames=8, height=16, width=32, steps=2)
    assert spy.calls == []


def test_image_to_video_needs_an_inp_model():
    model, vae = random_model("v2", num_layers=2), tiny_vae("v2")
    with pytest.raises(EasyAnimateError, match="InP"):
        run(model, vae, frames=9, start_images=torch.rand(1, 3, 16, 32))


def test_empty_prompt_is_allowed(v3):
    model, vae = v3
    empty = Conditioning(torch.zeros(1, 6, model.config.caption_channels), torch.tensor([[1, 0, 0, 0, 0, 0]]))
    latents = generate(model, vae, empty, empty, frames=8, height=16, width=32, steps=2)
    assert torch.isfinite(latents).all()


# --- long videos ----------------------------------------------------------------------------------

def test_segment_plan_cuts_like_the_reference():
    assert segment_plan(48, 24, 4, 8) == [24, 24, 8]  # starts 0, 20, 40 -> last 8 frames
    assert segment_plan(20, 24, 4, 8) == [16]
    assert segment_plan(44, 24, 4, 8) == [24, 24]


def test_long_video_is_its_segments_crossfaded_over_the_overlap(v3):
    """Rebuilt segment by segment with `generate` + `decode_video`, as the reference's `partial_video_length`
    loop does: each segment after the first starts from the last `overlap` frames of the video so far (the
    blended one, through 8-bit pixels), the overlapping frames are mixed with the reference's ratio
    k / overlap (k = 0 .. overlap-1) and every other frame is copied from its segment. Overlap 6 of 8 makes
    three segments, so the third one starts from frames the first cross-fade produced."""
    model, vae = v3
    positive, negative = text(model), text(model, 1)
    start = torch.rand(1, 3, 16, 32, generator=torch.Generator().manual_seed(7))
    options = dict(height=16, width=32, steps=2, guidance_scale=6.0)
    overlap, seed = 6, 3
    assert segment_plan(12, 8, overlap, vae.rules.frames_per_chunk) == [8, 8, 8]
    video = generate_long(model, vae, positive, negative, frames=12, segment_frames=8, overlap=overlap,
                          start_images=start, seed=seed, **options)
    assert video.shape == (1, 3, 12, 16, 32)

    # One generator for the noise (seeded with `seed`) and one for the VAE samples (seed + 1), each running
    # on through every segment, as `generate_long` documents.
    generator, vae_generator = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    ratio = torch.tensor([k / overlap for k in range(overlap)], dtype=torch.float64).view(1, 1, overlap, 1, 1)
    expected, images, parts = None, start, []
    for _ in range(3):
        latents = generate(model, vae, positive, negative, frames=8, start_images=images, generator=generator,
                           vae_generator=vae_generator, **options)
        part = vae.decode_video(latents, generator=vae_generator).cpu()
        parts.append(part)
        if expected is None:
            expected = part
        else:
            blended = expected[:, :, -overlap:].double() * (1 - ratio) + part[:, :, :overlap].double() * ratio
            expected = torch.cat([expected[:, :, :-overlap], blended.float(), part[:, :, overlap:]], dim=2)
        images = (torch.floor(expected[0, :, -overlap:] * 255) / 255).transpose(0, 1)  # uint8 truncation
    assert expected.shape == video.shape
    torch.testing.assert_close(video, expected, rtol=0, atol=1e-6)
    # Frames outside an overlap are the segments' own, bit for bit.
    assert torch.equal(video[:, :, :2], parts[0][:, :, :2])
    assert torch.equal(video[:, :, 10:], parts[2][:, :, overlap:])
    # The segments disagree where they overlap, so the blend is visible in the comparison above.
    assert (parts[0][:, :, 2:] - parts[1][:, :, :overlap]).abs().max() > 0.05
    # Same seed and start image: the same video.
    again = generate_long(model, vae, positive, negative, frames=12, segment_frames=8, overlap=overlap,
                          start_images=start, seed=seed, **options)
    assert torch.equal(again, video)


def test_preview_factors_are_fitted_deterministically(v3):
    _, vae = v3
    factors, bias = vae.latent_rgb_factors()
    assert factors.shape == (vae.latent_channels, 3) and bias.shape == (3,)
    again = vae.latent_rgb_factors()  # same fit (least squares may differ in the last bits across threads)
    torch.testing.assert_close(again[0], factors, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again[1], bias, rtol=1e-4, atol=1e-5)


# --- image-to-video with the trained demo model -------------------------------------------------------

def demo_folder():
    from easyanimate import cli

    return cli.demo_model_path()


needs_demo = pytest.mark.skipif(not (demo_folder() / "transformer").is_dir(), reason="demo model not shipped")
DEMO_PROMPT = "a red circle moving right on a black background"
DEMO_RUN = dict(frames=16, height=64, width=64, steps=10, guidance_scale=5.0, sampler="Euler")
# The largest mean |i2v first frame - start image| allowed. Measured with the shipped demo, start image =
# frame 8 of the seed-1 video of DEMO_PROMPT, seeds 2-6: 0.012-0.015 for image-to-video, 0.043-0.054 for
# text-to-video of the same seed (the circle is then near the centre, not where the start image has it), and
# 0.054 when the start image is left out of the inpaint channels. 0.03 is twice the worst image-to-video error
# and below every text-to-video one.
DEMO_I2V_TOLERANCE = 0.03


@pytest.fixture(scope="module")
def demo():
    from easyanimate.pipeline import load_model

    return load_model(demo_folder(), dtype="fp32")


def demo_start_image(model):
    """A frame the demo can make, away from where its videos start: frame 8 of a text-to-video run, 8-bit."""
    from easyanimate.pipeline import make_video

    video = make_video(model, DEMO_PROMPT, seed=1, **DEMO_RUN)
    return torch.round(video[:, :, 8] * 255) / 255  # (1, 3, 64, 64)


@needs_demo
def test_demo_image_to_video_keeps_its_start_image(demo):
    from easyanimate.pipeline import make_video

    start = demo_start_image(demo)
    for seed in (2, 3):
        t2v = make_video(demo, DEMO_PROMPT, seed=seed, **DEMO_RUN)
        i2v = make_video(demo, DEMO_PROMPT, seed=seed, start_images=start, **DEMO_RUN)
        t2v_error = (t2v[:, :, 0] - start).abs().mean().item()
        i2v_error = (i2v[:, :, 0] - start).abs().mean().item()
        print(f"seed {seed}: first frame vs start image, mean abs error: i2v {i2v_error:.4f}, t2v {t2v_error:.4f}")
        assert i2v_error <= DEMO_I2V_TOLERANCE and i2v_error <= 0.5 * t2v_error, (seed, i2v_error, t2v_error)
        assert (i2v[:, :, -1] - start).abs().mean() > 2 * i2v_error  # the video moves on from the start image


# --- image-to-video with the V5.1 demo (start image; start + end image) -------------------------------------
V51_DEMO_FOLDER = demo_folder().parent / "EasyAnimateV5.1-demo-64px"
needs_v51_demo = pytest.mark.skipif(not (V51_DEMO_FOLDER / "transformer").is_dir(), reason="V5.1 demo not shipped")
V51_DEMO_RUN = dict(frames=17, height=64, width=64, steps=25, guidance_scale=6.0, sampler="Flow")
# Mean |first frame - start image| allowed. Measured with the shipped V5.1 demo (seed 2, the two clips below):
# 0.054 and 0.024 for image-to-video (0.051 and 0.024 with the end image too), 0.087 and 0.065 for
# text-to-video of the same seed. 0.06 is above every image-to-video error and below both text-to-video ones;
# the end image brings the last frame from 0.059 / 0.046 to 0.053 / 0.043 of it.
V51_I2V_TOLERANCE = 0.06


def demo_clip(spec_seed: int, colour: str, shape: str, direction: str, background: str) -> torch.Tensor:
    """(1, 3, 17, 64, 64) in [0, 1], 8-bit: a clip of the kind the V5.1 demo was trained on."""
    import numpy as np

    from easyanimate.train.synthetic import make_specs, render_clip

    spec = make_specs(1, spec_seed, frames=17, colour=colour, shape=shape, direction=direction, background=background)[0]
    clip = np.round(render_clip(spec, 17, 64) * 255) / 255
    return torch.from_numpy(clip).permute(3, 0, 1, 2)[None].float()


@needs_v51_demo
def test_v51_demo_image_to_video_keeps_its_start_and_end_images():
    """The first frame of an image-to-video run is the start image (text-to-video's first frame of the same seed
    is not), also with an end image, which moves the last frame towards it; the video moves on from the start."""
    from easyanimate.pipeline import load_model, make_video

    model = load_model(V51_DEMO_FOLDER, dtype="fp32")
    error = lambda a, b: (a - b).abs().mean().item()  # noqa: E731
    for k, attributes in enumerate([("red", "circle", "right", "black"), ("blue", "square", "up", "gray")]):
        clip = demo_clip(5 + k, *attributes)
        prompt = "a {} {} moving {} on a {} background".format(*attributes)
        start, end = clip[:, :, 0], clip[:, :, -1]
        t2v = make_video(model, prompt, seed=2, **V51_DEMO_RUN)
        i2v = make_video(model, prompt, seed=2, start_images=start, **V51_DEMO_RUN)
        ends = make_video(model, prompt, seed=2, start_images=start, end_images=end, **V51_DEMO_RUN)
        figures = dict(i2v_first=error(i2v[:, :, 0], start), t2v_first=error(t2v[:, :, 0], start),
                       ends_first=error(ends[:, :, 0], start), ends_last=error(ends[:, :, -1], end),
                       i2v_last=error(i2v[:, :, -1], end))
        print(prompt, {k: round(v, 4) for k, v in figures.items()})
        assert figures["i2v_first"] <= V51_I2V_TOLERANCE < figures["t2v_first"], figures
        assert figures["ends_first"] <= V51_I2V_TOLERANCE, figures
        # The end image pulls the last frame towards it, but only a little (this demo's weak point: see its README)
        assert figures["ends_last"] < figures["i2v_last"], figures
        assert error(i2v[:, :, 0], i2v[:, :, -1]) > V51_I2V_TOLERANCE  # the video moves on from the start image
