"""The native ComfyUI route's V5/V5.1 parts that need no ComfyUI (standalone, tiny models and releases): the
MMDiT's attention and joint-block hooks, the flow settings the route reads from a release, its memory estimate,
and the conditioning nodes against what the EasyAnimate Sampler prepares. The route itself runs in a real ComfyUI
in `test_comfyui_native_v51.py`."""
import math

import pytest
import torch
import torch.nn.functional as F

from test_nodes import nodes
from test_nodes_v51 import FRAMES, NEGATIVE, PROMPT, SIZE, as_core, as_core_video, encode, images, load, load_v3, \
    pose_lines
from test_nodes_v51 import v51, v51_models  # noqa: F401  (fixtures: tiny V5.1 InP, Control, Camera releases)


def native(pack):
    return pack.nodes.native


def mmdit(family="v51", seed=0):
    """A tiny MMDiT (3 blocks, the last a shared-weight block) with every parameter random."""
    from easyanimate.models.mmdit import EasyAnimateMMDiT, MMDiTConfig, family_preset

    text = {"v51": {"text_embed_dim": 24}, "v5": {"text_embed_dim": 24, "text_embed_dim_t5": 20}}[family]
    config = {**family_preset(family), "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 3,
              "mmdit_layers": 2, "time_embed_dim": 16, "in_channels": 16, **text}
    model = EasyAnimateMMDiT(MMDiTConfig.from_dict(config, family)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model


def mmdit_inputs(model, batch=2):
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    kwargs = dict(x=torch.randn(batch, 16, 2, 4, 6, generator=g), timestep=torch.tensor([900.0, 120.5][:batch]),
                  encoder_hidden_states=torch.randn(batch, 5, cfg.text_embed_dim, generator=g))
    if cfg.text_embed_dim_t5 is not None:
        kwargs["encoder_hidden_states_t5"] = torch.randn(batch, 7, cfg.text_embed_dim_t5, generator=g)
    return kwargs


def run(model, kwargs, grad=False):
    with torch.set_grad_enabled(grad):
        return model(**kwargs).detach()


# ---------------------------------------------------------------------------------------- core hooks

@pytest.mark.parametrize("grad", [False, True], ids=["inference path", "autograd path"])
def test_the_mmdit_uses_a_host_attention_function_and_sdpa_stays_the_default(grad):
    from easyanimate.models.attention import attention_function

    model = mmdit()
    kwargs = mmdit_inputs(model)
    base = run(model, kwargs, grad)
    calls = []

    def sdpa(q, k, v, heads, bias):
        calls.append((heads, bias))
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(q.shape[0], -1, heads * q.shape[-1])

    with attention_function(sdpa):
        same = run(model, kwargs, grad)
    assert calls == [(2, None)] * 3  # one joint (unmasked) attention per block
    assert torch.allclose(same, base, rtol=1e-5, atol=1e-6)
    model.attention_function = lambda q, k, v, heads, bias: sdpa(q, k, v, heads, bias) * 0  # a host's, on the module
    try:
        assert not torch.allclose(run(model, kwargs, grad), base)
        with attention_function(sdpa):  # a caller's scope wins over the module's
            assert torch.allclose(run(model, kwargs, grad), base, rtol=1e-5, atol=1e-6)
    finally:
        model.attention_function = None
    assert torch.equal(run(model, kwargs, grad), base)


@pytest.mark.parametrize("family", ["v51", "v5"])
def test_comfyui_double_block_patches_reach_the_joint_blocks(pack, family):
    """`patches_replace["dit"][("double_block", i)]` (SkipLayerGuidanceDiT's, Flux's convention) reach MMDiT block i
    with {"img", "txt", "vec", "pe", "transformer_options"}; `original_block` runs the block itself."""
    from easyanimate.models.transformer import block_replacements

    model = mmdit(family)
    kwargs = mmdit_inputs(model)
    base = run(model, kwargs)
    received = []

    def skip(args, extra):  # what SkipLayerGuidanceDiT installs for a double block
        received.append((sorted(args), args["img"].shape, args["txt"].shape, len(args["pe"])))
        return args

    def through(args, extra):
        return extra["original_block"](args)

    options = {"patches_replace": {"dit": {("double_block", 0): skip, ("double_block", 2): through}}}
    patches = native(pack).joint_block_patches(options, model)
    assert sorted(patches) == [0, 2]
    with block_replacements(patches):
        skipped = run(model, kwargs)
    text_tokens = 5 + (7 if family == "v5" else 0)
    assert received == [(["img", "pe", "transformer_options", "txt", "vec"], (2, 12, 32), (2, text_tokens, 32), 2)]
    with block_replacements({2: patches[2]}):
        assert torch.equal(run(model, kwargs), base)
    assert not torch.allclose(skipped, base)


# ---------------------------------------------------------------------------------------- sampling and memory

def test_flow_settings_are_read_as_the_flow_sampler_reads_them(pack):
    from easyanimate_pack.easyanimate.samplers.flow import PIPELINE_MU
    from easyanimate_pack.easyanimate.sampling import with_flow_shift
    from release_v5 import FLOW_SCHEDULER

    family = native(pack).MMDiTFamily
    assert family.flow_shift(FLOW_SCHEDULER) == (1.0, 1000)
    assert family.flow_shift(with_flow_shift(FLOW_SCHEDULER, 3.0)) == (3.0, 1000)
    assert family.flow_shift({**FLOW_SCHEDULER, "num_train_timesteps": 500}) == (1.0, 500)
    # dynamic shifting: σ' = e^μ / (e^μ + 1/σ − 1) is the shift formula with shift e^μ (μ = 1 in the pipelines)
    assert family.flow_shift({**FLOW_SCHEDULER, "use_dynamic_shifting": True}) == (math.exp(PIPELINE_MU), 1000)
    with pytest.raises(pack.easyanimate.errors.EasyAnimateError, match="shift_terminal"):
        family.flow_shift({**FLOW_SCHEDULER, "shift_terminal": 0.1})
    with pytest.raises(pack.easyanimate.errors.EasyAnimateError, match="shift"):
        family.flow_shift({**FLOW_SCHEDULER, "shift": -1})
    assert family.is_flow(mmdit("v51")) and not family.is_flow(mmdit("v5"))


@pytest.mark.parametrize("family", ["v51", "v5"])
def test_memory_estimate_is_the_mmdits_own_with_the_conditionings_text_tokens(pack, family):
    route = native(pack).MMDiTFamily()
    model = mmdit(family)
    cross, t5 = torch.zeros(1, 5, 24), torch.zeros(1, 7, 20) if family == "v5" else None
    shapes = route.extra_conds_shapes(None, {"cross_attn": cross, "t5_embeds": t5})
    assert shapes == ({"c_crossattn": [1, 5, 24], "t5_embeds": [1, 7, 20]} if t5 is not None else {"c_crossattn": [1, 5, 24]})
    # as ComfyUI gathers them: one list of shapes per key, over the conditionings of the batch
    gathered = {key: [shape, shape] for key, shape in shapes.items()}
    tokens = 5 + (7 if family == "v5" else 0)
    assert route.activation_bytes(model, 2, 2, 4, 6, gathered) == model.activation_bytes(2, 2, 4, 6, tokens)


# ---------------------------------------------------------------------------------------- the nodes

def test_text_node_gives_the_v51_encoding_as_native_conditioning(v51):
    _, _, text_encoder = load(v51)
    embeds = encode(v51, text_encoder)
    positive, negative = nodes(v51)["EasyAnimateV5TextEncodeConditioning"]().encode_conditioning(
        text_encoder, PROMPT, NEGATIVE)
    for cond, ours in ((positive, embeds.positive), (negative, embeds.negative)):
        assert len(cond) == 1 and torch.equal(cond[0][0], ours.embeds)
        assert torch.equal(cond[0][1]["attention_mask"], ours.mask) and "t5_embeds" not in cond[0][1]
    node = nodes(v51)["EasyAnimateV5TextEncodeConditioning"]
    assert node.INPUT_TYPES() == nodes(v51)["EasyAnimateV5TextEncode"].INPUT_TYPES()


def test_text_options_carry_v5s_mt5_states(pack):
    from easyanimate_pack.easyanimate.pipeline import Conditioning

    cond = Conditioning(torch.rand(1, 5, 24), torch.ones(1, 5), torch.rand(1, 7, 20), torch.ones(1, 7))
    options = native(pack).text_options(cond)
    assert torch.equal(options["t5_embeds"], cond.t5_embeds) and torch.equal(options["attention_mask"], cond.mask)


MODES = {"t2v": ("InP", {}),
         "i2v": ("InP", {"start_image": (1, 1), "end_image": (1, 2)}),
         "v2v": ("InP", {"video": (FRAMES, 3)}),
         "control": ("Control", {"control_video": (FRAMES, 4), "reference_image": (1, 5)}),
         "camera": ("Camera", {"reference_image": (1, 5)})}


@pytest.mark.parametrize("mode", list(MODES))
def test_to_video_gives_the_conditioning_channels_the_sampler_prepares(v51, mode):
    """The inpaint / control / camera channels equal what `MMDiTStages.prepare_latents` prepares for the EasyAnimate
    Sampler with the same inputs (vae_seed = the Sampler's seed: the noise on the known pixels is drawn after the
    start noise), on both conditionings; the latent is empty, or the input video's latents for video-to-video."""
    core = v51.easyanimate
    variant, sources = MODES[mode]
    model, vae, text_encoder = load(v51, variant)
    inputs = {name: images(*args) for name, args in sources.items()}
    if mode == "camera":
        inputs["camera_poses"] = pose_lines()
    seed = 3
    positive, negative = nodes(v51)["EasyAnimateV5TextEncodeConditioning"]().encode_conditioning(
        text_encoder, PROMPT, NEGATIVE)
    pos, neg, latent = nodes(v51)["EasyAnimateToVideo"]().prepare(positive, negative, model, vae, SIZE, SIZE, FRAMES,
                                                                  2, seed, **inputs)

    transformer = model.transformer.module
    stages = core.pipeline.stages_for(transformer, vae.vae)
    rays = v51.nodes.sampling.camera_rays(stages, inputs.get("camera_poses", ""), 1, SIZE, SIZE, FRAMES)
    request = stages.request(
        frames=FRAMES, height=SIZE, width=SIZE, scheduler_config=model.scheduler_config,
        start_images=as_core(inputs["start_image"]) if "start_image" in inputs else None,
        end_images=as_core(inputs["end_image"]) if "end_image" in inputs else None,
        video=as_core_video(inputs["video"]) if "video" in inputs else None, strength=0.6 if mode == "v2v" else 1.0,
        control_video=as_core_video(inputs["control_video"]) if "control_video" in inputs else None,
        reference_image=as_core(inputs["reference_image"]) if "reference_image" in inputs else None,
        control_camera=rays)
    embeds = encode(v51, text_encoder)
    denoising = stages.prepare_latents(request, embeds.positive, embeds.negative,
                                       core.pipeline.models_in_place(transformer),
                                       generator=torch.Generator().manual_seed(seed))
    key, expected = ("inpaint_latents", denoising.inputs.inpaint) if variant == "InP" else \
        ("control_latents", denoising.inputs.control)
    assert expected is not None
    for cond, row in ((neg, 0), (pos, 1)):  # the Sampler's [negative, positive] rows
        assert torch.equal(cond[0][1][key][0], expected[row]), mode
        assert torch.equal(cond[0][1]["attention_mask"], (negative if row == 0 else positive)[0][1]["attention_mask"])
    if mode == "t2v":
        assert torch.count_nonzero(expected) == 0  # an InP model told to generate everything: zeros
    elif mode in ("i2v", "control", "camera"):
        assert torch.count_nonzero(expected) > 0
    assert latent["samples"].shape == (2, 16, (FRAMES - 1) // 4 + 1, SIZE // 8, SIZE // 8)
    if mode == "v2v":  # video-to-video starts from the video latents (KSampler's denoise noises them)
        sigma = denoising.sampler.sigmas[denoising.start_index]
        noise = stages.start_noise(request, 1, torch.Generator().manual_seed(seed))
        video_latents = (denoising.latents - sigma * noise) / (1 - sigma)
        assert torch.allclose(latent["samples"], video_latents.expand(2, -1, -1, -1, -1), atol=1e-4)
    else:
        assert torch.count_nonzero(latent["samples"]) == 0


def test_to_video_refuses_v5_inputs_for_a_v3_model_and_images_for_a_control_model(v51):
    errors = v51.easyanimate.errors
    node = nodes(v51)["EasyAnimateToVideo"]()
    model, vae, t5 = load_v3(v51)
    positive, negative = nodes(v51)["EasyAnimateT5EncodeConditioning"]().encode_conditioning("a red circle", "", True,
                                                                                            t5=t5)
    with pytest.raises(errors.EasyAnimateError, match=r"control_video, camera_poses: inputs of EasyAnimate V5/V5\.1"):
        node.prepare(positive, negative, model, vae, 32, 32, 8, 1, 0, control_video=images(8, 1), camera_poses="x")
    model, vae, text_encoder = load(v51, "Control")
    positive, negative = nodes(v51)["EasyAnimateV5TextEncodeConditioning"]().encode_conditioning(
        text_encoder, PROMPT, NEGATIVE)
    with pytest.raises(errors.EasyAnimateError, match="Image-to-video needs an InP model"):
        node.prepare(positive, negative, model, vae, SIZE, SIZE, FRAMES, 1, 0, start_image=images(1, 1))
    with pytest.raises(errors.EasyAnimateError, match="camera_poses need an EasyAnimate V5.1 Control-Camera model"):
        node.prepare(positive, negative, model, vae, SIZE, SIZE, FRAMES, 1, 0, camera_poses=pose_lines())


def test_every_input_of_the_new_and_extended_nodes_has_a_tooltip(pack):
    for name in ("EasyAnimateV5TextEncodeConditioning", "EasyAnimateToVideo", "EasyAnimateNativeModel"):
        spec = nodes(pack)[name].INPUT_TYPES()
        for group in spec.values():
            for input_name, (_, options) in group.items():
                assert options.get("tooltip"), (name, input_name)
