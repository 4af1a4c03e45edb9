"""Generation through the public API on tiny random models: conditioning layout, randomness, bad input."""
import pytest
import torch

from easyanimate.errors import EasyAnimateError
from easyanimate.pipeline import Conditioning, conditioning_video, generate, generate_long, segment_plan
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


def test_inpaint_latents_are_the_vae_encodings_of_mask_and_masked_video(v3):
    model, vae = v3
    spy = Spy(model)
    noise = [torch.randn(1, 4, 2, 2, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    image = torch.rand(1, 3, 16, 32)
    run(spy, vae, start_images=image, vae_noise=noise, guidance_scale=1.0)

    cond = conditioning_video(8, 16, 32, start_images=image)
    pixels = cond.video * 2 - 1
    mask3 = cond.mask.repeat(1, 3, 1, 1, 1)
    masked = torch.where(mask3 < 0.5, pixels, torch.full_like(pixels, -1.0))
    expected = torch.cat([vae.encode_latents(mask3, noise=noise[1]), vae.encode_latents(masked, noise=noise[2])], 1)
    torch.testing.assert_close(spy.calls[0]["inpaint_latents"], expected)


def test_text_to_video_through_the_inp_model_encodes_the_all_masked_video(v3):
    model, vae = v3
    spy = Spy(model)
    run(spy, vae)
    inpaint = spy.calls[0]["inpaint_latents"]
    assert inpaint.shape[1] == 8 and inpaint.abs().sum() > 0  # not zeros: the reference encodes them


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


def test_long_video_has_the_requested_length_and_crossfades(v3):
    model, vae = v3
    kw = dict(frames=12, height=16, width=32, segment_frames=8, overlap=4, steps=2, seed=3)
    video = generate_long(model, vae, text(model), text(model, 1), start_images=torch.rand(1, 3, 16, 32), **kw)
    assert video.shape == (1, 3, 12, 16, 32)
    again = generate_long(model, vae, text(model), text(model, 1), start_images=torch.rand(1, 3, 16, 32), **kw)
    assert video.shape == again.shape


def test_preview_factors_are_fitted_deterministically(v3):
    _, vae = v3
    factors, bias = vae.latent_rgb_factors()
    assert factors.shape == (vae.latent_channels, 3) and bias.shape == (3,)
    again = vae.latent_rgb_factors()  # same fit (least squares may differ in the last bits across threads)
    torch.testing.assert_close(again[0], factors, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again[1], bias, rtol=1e-4, atol=1e-5)
