"""The native ComfyUI route's parts that need no ComfyUI (standalone, tiny checkpoints): the core's attention
and block hooks, the LoRA key names the route gives ComfyUI, the CLIP step rule on ComfyUI's schedules, and
the conditioning nodes against what the EasyAnimate Sampler prepares. The route itself runs in a real ComfyUI
in `test_comfyui_native.py`."""
import pytest
import torch
import torch.nn.functional as F

from test_nodes import encode, load, nodes
from tiny import example_inputs, random_model, run


def native(pack):
    return pack.nodes.native


# ---------------------------------------------------------------------------------------- core hooks

def test_a_host_attention_function_is_used_and_sdpa_stays_the_default(standalone):
    from easyanimate.models.attention import attention_function

    model = random_model("v3", num_layers=2)
    inputs = example_inputs(model, frames=2, height=4, width=4)
    base = run(model, inputs)
    calls = []

    def sdpa(q, k, v, heads, bias):
        calls.append(bias is not None)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return out.transpose(1, 2).reshape(q.shape[0], -1, heads * q.shape[-1])

    with attention_function(sdpa):
        same = run(model, inputs)
    assert calls and any(calls) and not all(calls)  # masked cross-attention and unmasked self/motion attention
    assert torch.allclose(same, base, rtol=1e-5, atol=1e-6)
    model.attention_function = lambda q, k, v, heads, bias: sdpa(q, k, v, heads, bias) * 0  # a host's, on the module
    try:
        assert not torch.allclose(run(model, inputs), base)
        with attention_function(sdpa):  # a caller's scope wins over the module's
            assert torch.allclose(run(model, inputs), base, rtol=1e-5, atol=1e-6)
    finally:
        model.attention_function = None
    assert torch.equal(run(model, inputs), base)


def test_block_replacements_wrap_the_blocks(standalone):
    from easyanimate.models.transformer import block_replacements

    model = random_model("v3", num_layers=16)  # with U-ViT skips
    inputs = example_inputs(model, frames=2, height=4, width=4)
    base = run(model, inputs)
    seen = []

    def passthrough(tokens, context, t6, original):
        seen.append((tokens.shape, context.shape, t6.shape))
        return original(tokens, context, t6)

    with block_replacements({0: passthrough, 14: passthrough}):
        assert torch.equal(run(model, inputs), base)
    assert len(seen) == 2
    with block_replacements({3: lambda tokens, context, t6, original: tokens}):  # skip block 3
        assert not torch.allclose(run(model, inputs), base)


def test_comfyui_block_patches_follow_its_dit_convention(standalone):
    """`patches_replace["dit"][("double_block", i)]` patches (SkipLayerGuidanceDiT's) reach block i."""
    from easyanimate.models.transformer import block_replacements

    model = random_model("v3", num_layers=4)
    inputs = example_inputs(model, frames=2, height=4, width=4)
    base = run(model, inputs)
    received = []

    def skip(args, extra):  # what SkipLayerGuidanceDiT installs
        received.append(sorted(args))
        return args

    def through(args, extra):
        return extra["original_block"](args)

    options = {"patches_replace": {"dit": {("double_block", 1): skip, ("double_block", 2): through}}}
    patches = native(standalone).block_patches(options, model)
    assert sorted(patches) == [1, 2]
    with block_replacements(patches):
        skipped = run(model, inputs)
    assert received == [["img", "pe", "transformer_options", "txt", "vec"]]
    with block_replacements({2: patches[2]}):
        assert torch.equal(run(model, inputs), base)
    assert not torch.allclose(skipped, base)


# ---------------------------------------------------------------------------------------- LoRA key names

def test_lora_key_map_names_every_format_the_pack_reads(standalone, tmp_path):
    from easyanimate.lora import read_lora, resolve_lora
    from test_lora import all_formats, make_factors

    model = random_model("v3", num_layers=16)
    key_map = native(standalone).lora_key_map(model)
    files = all_formats(tmp_path, make_factors(model))
    for fmt, path in files.items():
        lora = read_lora(path)
        resolved = resolve_lora(lora, model).patch_for(model)
        expected = {bound.layer.stem: f"diffusion_model.{name}.weight" for name, bound in resolved.layers.items()}
        assert len(expected) == len(lora.layers), fmt
        for stem, key in expected.items():
            assert key_map.get(stem) == key, (fmt, stem, key_map.get(stem), key)
    state = model.state_dict()
    assert all(key.removeprefix("diffusion_model.") in state for key in key_map.values())


# ---------------------------------------------------------------------------------------- the CLIP steps

@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 1.0])
def test_clip_step_rule_on_comfyui_schedules(standalone, ratio):
    from easyanimate.image_encoder import clip_is_applied
    from easyanimate.sampling import build_sampler

    sampler = build_sampler("Euler")
    sampler.set_timesteps(25)
    sigmas = sampler.sigmas
    applied = native(standalone).clip_is_applied_now
    for step in range(25):
        options = {"sample_sigmas": sigmas, "sigmas": sigmas[step:step + 1].expand(2)}
        assert applied(options, ratio) == clip_is_applied(step, 25, ratio), step
        if step < 24:  # a second-order sampler's evaluation between two schedule points is the same step
            between = {"sample_sigmas": sigmas, "sigmas": ((sigmas[step] + sigmas[step + 1]) / 2)[None]}
            assert applied(between, ratio) == clip_is_applied(step, 25, ratio), step
    assert applied({}, ratio)  # no schedule: the image is applied


# ---------------------------------------------------------------------------------------- the nodes

def test_conditioning_node_gives_the_t5_encode_as_native_conditioning(standalone):
    model, vae, t5 = load(standalone)
    embeds = encode(standalone, t5)
    positive, negative = nodes(standalone)["EasyAnimateT5EncodeConditioning"]().encode_conditioning(
        "a red circle moving right", "blurry", True, t5=t5)
    for cond, ours in ((positive, embeds.positive), (negative, embeds.negative)):
        assert len(cond) == 1 and torch.equal(cond[0][0], ours.embeds)
        assert torch.equal(cond[0][1]["attention_mask"], ours.mask)


@pytest.mark.parametrize("mode", ["t2v", "i2v", "v2v"])
def test_to_video_prepares_what_the_sampler_prepares(standalone, mode):
    """The inpaint channels, the CLIP image and the video latents equal the EasyAnimate Sampler's (same VAE
    draws: vae_seed = its seed + 1), so the two routes start from the same conditioning."""
    from easyanimate.pipeline import Conditioning, models_in_place, stages_for

    model, vae, t5 = load(standalone)
    embeds = encode(standalone, t5)
    g = torch.Generator().manual_seed(7)
    images = dict(start_image=torch.rand(1, 32, 32, 3, generator=g), end_image=torch.rand(1, 32, 32, 3, generator=g)) \
        if mode == "i2v" else dict(video=torch.rand(8, 32, 32, 3, generator=g)) if mode == "v2v" else {}
    positive, negative = nodes(standalone)["EasyAnimateT5EncodeConditioning"]().encode_conditioning(
        "a red circle moving right", "blurry", True, t5=t5)
    seed = 3
    pos, neg, latent = nodes(standalone)["EasyAnimateToVideo"]().prepare(
        positive, negative, model, vae, 32, 32, 8, 2, seed + 1, **images)

    transformer = model.transformer.module
    encoder = model.image_encoder.get()[0] if mode == "i2v" else None
    stages = stages_for(transformer, vae.vae, encoder)
    frames = {k: v.permute(0, 3, 1, 2) for k, v in images.items()}
    request = stages.request(frames=8, height=32, width=32, guidance_scale=6.0,
                             start_images=frames.get("start_image"), end_images=frames.get("end_image"),
                             video=frames["video"].transpose(0, 1)[None] if mode == "v2v" else None,
                             strength=0.6 if mode == "v2v" else 1.0)
    as_cond = lambda c: Conditioning(c.embeds, c.mask)
    denoising = stages.prepare_latents(request, as_cond(embeds.positive), as_cond(embeds.negative),
                                       models_in_place(transformer), generator=torch.Generator().manual_seed(seed),
                                       vae_generator=torch.Generator().manual_seed(seed + 1))
    inputs = denoising.inputs
    assert latent["samples"].shape == (2, 4, 2, 4, 4)
    assert torch.equal(pos[0][1]["inpaint_latents"][0], inputs.inpaint[0])  # [negative, positive] rows, same inpaint
    assert torch.equal(neg[0][1]["inpaint_latents"][0], inputs.inpaint[1])
    assert "clip_image_embeds" not in neg[0][1]
    if mode == "i2v":
        assert torch.equal(pos[0][1]["clip_image_embeds"][0], inputs.clip.states[1].float())
    else:
        assert "clip_image_embeds" not in pos[0][1]
        assert torch.count_nonzero(inputs.clip.mask) == 0
    if mode == "v2v":  # video-to-video starts from the video latents (KSampler's denoise noises them)
        noise = torch.randn(denoising.latents.shape, generator=torch.Generator().manual_seed(seed))
        video_latents = denoising.latents - noise * denoising.sampler.sigmas[denoising.start_index]
        assert torch.allclose(latent["samples"], video_latents, atol=1e-4)
    else:
        assert torch.count_nonzero(latent["samples"]) == 0


def test_to_video_refuses_images_for_a_text_to_video_model_and_gives_it_no_inpaint_channels(standalone):
    model, vae, t5 = load(standalone, "EasyAnimateV2-tiny")
    positive, negative = nodes(standalone)["EasyAnimateT5EncodeConditioning"]().encode_conditioning(
        "a red circle", "", True, t5=t5)
    node = nodes(standalone)["EasyAnimateToVideo"]()
    with pytest.raises(standalone.easyanimate.errors.EasyAnimateError, match="needs an EasyAnimate V3 InP model"):
        node.prepare(positive, negative, model, vae, 32, 32, 9, 1, 0, start_image=torch.rand(1, 32, 32, 3))
    pos, neg, latent = node.prepare(positive, negative, model, vae, 32, 32, 9, 1, 0)
    assert pos is positive and neg is negative and torch.count_nonzero(latent["samples"]) == 0


def test_native_model_node_needs_comfyui(standalone):
    model, _, _ = load(standalone)
    with pytest.raises(standalone.easyanimate.errors.EasyAnimateError, match="needs ComfyUI"):
        nodes(standalone)["EasyAnimateNativeModel"]().convert(model)
