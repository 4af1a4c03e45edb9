"""The nodes with EasyAnimate V5.1 releases, standalone (no ComfyUI), on tiny folders in the release layout.

The core is proven against the reference (tests/parity, tests/test_v5_release.py); here the node chain
Load EasyAnimate -> Text Encode V5/V5.1 -> EasyAnimate Sampler -> Slice VAE Decode must give what `make_video`
gives with the same arguments, in every mode (text-, image- (start + end), video-to-video, control video with a
reference image, camera poses, the Flow shift, TeaCache): the nodes add nothing. Also: the text encoder is
released after encoding and not loaded again for prompts it has encoded; the V5 VAE through the VAE nodes; and
what the nodes refuse before any compute.
"""
import pytest
import torch

from release import make_release
from release_v5 import make_release_v51
from test_nodes import SAMPLE, decode, nodes
from test_nodes import encode as encode_t5
from test_text_v5 import v5  # noqa: F401  (fixture: a tiny V5 text_encoder/ + text_encoder_2/ folder)

SIZE, FRAMES = 32, 5
PROMPT, NEGATIVE = "a red circle moving right", "blurry"
RUN = dict(width=SIZE, height=SIZE, frames=FRAMES, seed=3, steps=3, cfg=6.0, sampler_name="auto", denoise=1.0)
VARIANTS = {"InP": "inp", "Control": "control", "Camera": "camera"}


@pytest.fixture(scope="session")
def v51_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models_v51")
    for name, variant in VARIANTS.items():
        make_release_v51(root / "easyanimate" / f"EasyAnimateV5.1-tiny-{name}", variant)
    make_release(root / "easyanimate" / "EasyAnimateV3-tiny", "v3")  # for what a V3 model refuses
    return root


@pytest.fixture()
def v51(v51_models, monkeypatch, pack):
    monkeypatch.setenv("EASYANIMATE_MODELS_DIR", str(v51_models))
    return pack


def load(pack, variant="InP"):
    return nodes(pack)["LoadEasyAnimate"]().load(f"EasyAnimateV5.1-tiny-{variant}", "fp32")


def encode(pack, text_encoder, prompt=PROMPT, negative=NEGATIVE):
    return nodes(pack)["EasyAnimateV5TextEncode"]().encode(text_encoder, prompt, negative)[0]


def sample(pack, model, embeds, vae, **kw):
    return nodes(pack)["EasyAnimateSampler"]().sample(model, embeds, vae, **{**RUN, **kw})[0]


def node_video(pack, variant="InP", **kw):
    """Load -> Text Encode V5/V5.1 -> Sampler -> Slice VAE Decode: frames (F, H, W, 3)."""
    model, vae, text_encoder = load(pack, variant)
    return decode(pack, vae, sample(pack, model, encode(pack, text_encoder), vae, **kw))


def pipeline_video(pack, models_dir, variant="InP", **kw):
    """`make_video` on the same release and arguments, as frames (F, H, W, 3)."""
    core = pack.easyanimate.pipeline  # the pack's own copy of the core, as the nodes use it
    model = core.load_model(models_dir / "easyanimate" / f"EasyAnimateV5.1-tiny-{variant}", dtype="fp32")
    options = dict(frames=FRAMES, height=SIZE, width=SIZE, steps=RUN["steps"], guidance_scale=RUN["cfg"],
                   seed=RUN["seed"])
    video = core.make_video(model, PROMPT, NEGATIVE, **{**options, **kw})
    return video[0].permute(1, 2, 3, 0)


def images(count, seed):
    """ComfyUI IMAGE frames (count, H, W, 3) in [0, 1]."""
    return torch.rand(count, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(seed))


def as_core(image_frames):
    """IMAGE (N, H, W, 3) -> the core's images (N, 3, H, W)."""
    return image_frames.permute(0, 3, 1, 2)


def as_core_video(image_frames):
    """IMAGE (F, H, W, 3) -> the core's video (1, 3, F, H, W)."""
    return image_frames.permute(3, 0, 1, 2)[None]


def pose_lines(frames=FRAMES):
    """A camera path in the pose-file format: a source line, then per frame timestamp fx fy cx cy 0 0 and a 3x4
    world-to-camera matrix (turning about the vertical axis while moving right and forward)."""
    import math

    lines = ["https://example.com/source-video"]
    for i in range(frames):
        angle = 0.05 * i
        c, s = math.cos(angle), math.sin(angle)
        rows = [[c, 0, s, -0.1 * i], [0, 1, 0, 0.02 * i], [-s, 0, c, -0.05 * i]]
        numbers = [i * 1000, 0.53, 0.95, 0.5, 0.5, 0, 0] + [v for row in rows for v in row]
        lines.append(" ".join(f"{v:.6g}" for v in numbers))
    return "\n".join(lines)


def pose_rows(text):
    return [[float(v) for v in line.split()] for line in text.splitlines()[1:]]


# ---------------------------------------------------------------------------------------------- loading and text

def test_a_v51_release_loads_with_the_same_sockets_and_its_qwen_encoder_unloaded(v51):
    model, vae, text_encoder = load(v51)
    assert model.family == "v51" and vae.vae.family == "v5" and vae.vae.latent_channels == 16
    assert text_encoder.encoder == "qwen2-vl" and text_encoder.source.model is None  # loaded on first use
    assert nodes(v51)["LoadEasyAnimate"].RETURN_TYPES == ("EASYANIMATE_MODEL", "EASYANIMATE_VAE", "EASYANIMATE_T5")
    assert all(a is b for a, b in zip(load(v51), (model, vae, text_encoder)))  # loading again: the same objects


def test_text_encoding_equals_the_encoder_and_the_encoder_is_released_and_not_reloaded(v51, v51_models, monkeypatch):
    from easyanimate_pack.easyanimate.text_v5 import load_text_encoder_v5

    _, _, text_encoder = load(v51)
    source = text_encoder.source
    loads, placements = [], []
    load_original = source._load
    monkeypatch.setattr(source, "_load", lambda: loads.append(1) or load_original())
    runtime = v51.nodes.host.current_host()
    placed_original = runtime.placed

    def placed(components, memory_required=0):
        placements.append((components[0].kind, memory_required))
        return placed_original(components, memory_required)

    monkeypatch.setattr(runtime, "placed", placed)
    first = encode(v51, text_encoder)
    assert len(loads) == 1 and source.model is None  # standalone: the weights are dropped after encoding
    again = encode(v51, text_encoder)
    assert len(loads) == 1 and source.model is None  # the same prompts: from the cache, nothing loaded
    other = encode(v51, text_encoder, prompt="a blue square")
    assert len(loads) == 2 and source.model is None

    reference = load_text_encoder_v5(v51_models / "easyanimate" / "EasyAnimateV5.1-tiny-InP", dtype="fp32")
    assert placements == [("text_encoder", reference.activation_bytes(1))] * 2  # placed with its own estimate
    text = reference.encode([PROMPT], [NEGATIVE])
    for embeds in (first, again):
        assert torch.equal(embeds.positive.embeds, text.embeds) and torch.equal(embeds.positive.mask, text.mask)
        assert torch.equal(embeds.negative.embeds, text.negative_embeds)
        assert embeds.positive.t5_embeds is None
    assert torch.equal(other.positive.embeds, reference.encode(["a blue square"]).embeds)


def test_a_failed_encoding_still_releases_the_encoder(v51, monkeypatch):
    _, _, text_encoder = load(v51)
    source = text_encoder.source
    load_original = source._load

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory")

    def broken_encoder():
        encoder = load_original()
        monkeypatch.setattr(encoder, "encode", out_of_memory)
        return encoder

    monkeypatch.setattr(source, "_load", broken_encoder)
    with pytest.raises(RuntimeError, match="out of memory"):
        encode(v51, text_encoder, prompt="a prompt that fails")
    assert source.model is None and source.component is None
    monkeypatch.setattr(source, "_load", load_original)
    assert encode(v51, text_encoder, prompt="a prompt that fails").positive.embeds.shape[0] == 1


def test_v5_bert_and_mt5_encoding_through_the_node(pack, v5):
    """V5's two encoders: the node's conditioning carries the Bert states with the mT5 states beside them, as the
    encoders give them; a V5.1 transformer with these encoders is refused when the folder is loaded."""
    from easyanimate_pack.easyanimate.text_v5 import load_text_encoder_v5

    release = v5[0]
    handle = pack.nodes.loaders.text_encoder_handle(release, "v5", "fp32")
    assert handle.encoder == "bert+mt5"
    embeds = encode(pack, handle)
    text = load_text_encoder_v5(release, dtype="fp32").encode([PROMPT], [NEGATIVE])
    for cond, bert, bert_mask, t5, t5_mask in (
            (embeds.positive, text.bert.embeds, text.bert.mask, text.t5.embeds, text.t5.mask),
            (embeds.negative, text.bert.negative_embeds, text.bert.negative_mask, text.t5.negative_embeds,
             text.t5.negative_mask)):
        assert torch.equal(cond.embeds, bert) and torch.equal(cond.mask, bert_mask)
        assert torch.equal(cond.t5_embeds, t5) and torch.equal(cond.t5_mask, t5_mask)
    assert handle.source.model is None  # released after encoding
    with pytest.raises(pack.easyanimate.errors.LayoutError, match=r"transformer is EasyAnimate V5\.1 but text_encoder/ "
                                                                  r"holds the EasyAnimate V5 text encoder"):
        pack.nodes.loaders.text_encoder_handle(release, "v51", "fp32")


def load_v3(pack):
    return nodes(pack)["LoadEasyAnimate"]().load("EasyAnimateV3-tiny", "fp32")


def test_each_text_node_refuses_the_other_families_encoder(v51):
    _, _, qwen = load(v51)
    with pytest.raises(ValueError, match=r"Qwen2-VL \(EasyAnimate V5\.1\).*Text Encode V5/V5\.1"):
        nodes(v51)["EasyAnimateT5Encode"]().encode("x", "y", True, t5=qwen)
    _, _, t5 = load_v3(v51)
    with pytest.raises(ValueError, match=r"T5 \(EasyAnimate V1–V3\).*T5 Encode"):
        encode(v51, t5)


# ---------------------------------------------------------------------------------------------- every mode

def test_text_to_video_equals_make_video(v51, v51_models):
    torch.testing.assert_close(node_video(v51), pipeline_video(v51, v51_models), rtol=0, atol=1e-6)


def test_image_to_video_with_start_and_end_image_equals_make_video(v51, v51_models):
    start, end = images(1, 1), images(1, 2)
    ours = node_video(v51, start_image=start, end_image=end)
    theirs = pipeline_video(v51, v51_models, start_images=as_core(start), end_images=as_core(end))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert not torch.allclose(ours, node_video(v51))  # the images reach the model


def test_video_to_video_equals_make_video(v51, v51_models):
    clip = images(FRAMES, 3)
    ours = node_video(v51, video=clip, denoise=0.6)
    torch.testing.assert_close(ours, pipeline_video(v51, v51_models, video=as_core_video(clip), strength=0.6),
                               rtol=0, atol=1e-6)


def test_control_video_with_reference_image_equals_make_video(v51, v51_models):
    control, reference = images(FRAMES, 4), images(1, 5)
    ours = node_video(v51, "Control", control_video=control, reference_image=reference)
    theirs = pipeline_video(v51, v51_models, "Control", control_video=as_core_video(control),
                            reference_image=as_core(reference))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    without_reference = node_video(v51, "Control", control_video=control)
    torch.testing.assert_close(without_reference, pipeline_video(v51, v51_models, "Control",
                                                                 control_video=as_core_video(control)), rtol=0, atol=1e-6)
    assert not torch.allclose(ours, without_reference)


def test_camera_poses_as_text_or_file_equal_make_video_with_the_rays(v51, v51_models, tmp_path):
    from easyanimate_pack.easyanimate.camera import plucker_rays

    text, reference = pose_lines(), images(1, 6)
    rays = plucker_rays(pose_rows(text), SIZE, SIZE, frames=FRAMES)
    theirs = pipeline_video(v51, v51_models, "Camera", control_camera=rays, reference_image=as_core(reference))
    torch.testing.assert_close(node_video(v51, "Camera", camera_poses=text, reference_image=reference), theirs,
                               rtol=0, atol=1e-6)
    without_header = "\n".join(text.splitlines()[1:])  # pasted rows without the pose file's source line
    torch.testing.assert_close(node_video(v51, "Camera", camera_poses=without_header, reference_image=reference),
                               theirs, rtol=0, atol=1e-6)
    pose_file = tmp_path / "orbit.txt"
    pose_file.write_text(text + "\n")
    torch.testing.assert_close(node_video(v51, "Camera", camera_poses=str(pose_file), reference_image=reference),
                               theirs, rtol=0, atol=1e-6)
    every_other = pose_lines(2 * FRAMES)  # stride 2 takes rows 0, 2, 4, ...
    strided = plucker_rays(pose_rows(every_other), SIZE, SIZE, frames=FRAMES, stride=2)
    torch.testing.assert_close(
        node_video(v51, "Camera", camera_poses=every_other, camera_pose_stride=2, reference_image=reference),
        pipeline_video(v51, v51_models, "Camera", control_camera=strided, reference_image=as_core(reference)),
        rtol=0, atol=1e-6)


def test_flow_shift_and_teacache_equal_make_video(v51, v51_models):
    from easyanimate_pack.easyanimate.sampling import with_flow_shift
    from easyanimate_pack.easyanimate.teacache import record_runs

    release = v51_models / "easyanimate" / "EasyAnimateV5.1-tiny-InP"
    shifted = node_video(v51, shift=3.0)
    torch.testing.assert_close(shifted, pipeline_video(v51, v51_models, scheduler_config=with_flow_shift(release, 3.0)),
                               rtol=0, atol=1e-6)
    assert not torch.allclose(shifted, node_video(v51))
    with record_runs() as runs:
        cached = node_video(v51, steps=6, teacache_threshold=0.5)
    assert runs[-1].skipped_calls > 0  # with 6 steps and this threshold some transformer calls are skipped
    torch.testing.assert_close(cached, pipeline_video(v51, v51_models, steps=6, teacache=0.5), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- defaults, VAE

def test_the_default_sampler_is_the_models_own(v51):
    model, vae, text_encoder = load(v51)
    embeds = encode(v51, text_encoder)
    assert torch.equal(sample(v51, model, embeds, vae)["samples"],
                       sample(v51, model, embeds, vae, sampler_name="Flow")["samples"])
    defaults = {name: spec[1].get("default") for section in nodes(v51)["EasyAnimateSampler"].INPUT_TYPES().values()
                for name, spec in section.items()}
    assert defaults["sampler_name"] == "auto" and defaults["frames"] == 49  # V5/V5.1: 1 + 4k frames
    # The same defaults on a V3 model: auto is Euler, and 9 frames (like 49) are rounded down to V3's 8.
    v3, v3_vae, t5 = load_v3(v51)
    t5_embeds = encode_t5(v51, t5)
    run = nodes(v51)["EasyAnimateSampler"]().sample
    auto = run(v3, t5_embeds, v3_vae, **{**SAMPLE, "sampler_name": "auto", "frames": 9})[0]["samples"]
    assert torch.equal(auto, run(v3, t5_embeds, v3_vae, **{**SAMPLE, "sampler_name": "Euler", "frames": 8})[0]["samples"])


def test_vae_nodes_encode_and_decode_v5_latents(v51):
    _, vae, _ = load(v51)
    frames = images(9, 7)
    latent = nodes(v51)["EasyAnimateVAEEncode"]().encode(vae, frames, "model default", 384, 0.25, False, 0)[0]
    expected = vae.vae.encode_latents(as_core_video(frames) * 2 - 1)  # the posterior's mode, scaled
    assert latent["samples"].shape == (1, 16, 3, SIZE // 8, SIZE // 8)
    torch.testing.assert_close(latent["samples"], expected, rtol=0, atol=0)
    decoded = decode(v51, vae, latent)
    assert decoded.shape == (9, SIZE, SIZE, 3)
    torch.testing.assert_close(decoded, vae.vae.decode_video(expected)[0].permute(1, 2, 3, 0), rtol=0, atol=0)
    with pytest.raises(v51.easyanimate.errors.EasyAnimateError, match="5 and 9"):
        nodes(v51)["EasyAnimateVAEEncode"]().encode(vae, images(8, 7), "model default", 384, 0.25, False, 0)
    with pytest.raises(v51.easyanimate.errors.EasyAnimateError, match="no smoothing pass.*turn smooth off"):
        decode(v51, vae, latent, smooth=True)


# ---------------------------------------------------------------------------------------------- refused before compute

def _refused(pack, model, run, words):
    calls = []
    hook = model.transformer.module.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(pack.easyanimate.errors.EasyAnimateError, match=words):
            run()
    finally:
        hook.remove()
    assert calls == [], "the transformer ran before the input was refused"


def test_v51_sampler_refuses_what_the_model_cannot_do_before_any_compute(v51):
    model, vae, text_encoder = load(v51)
    embeds = encode(v51, text_encoder)
    cases = [
        (dict(sampler_name="Euler"), r"'Euler' is a DDPM sampler.*use 'Flow'"),
        (dict(camera_poses=pose_lines()), r"camera_poses need an EasyAnimate V5\.1 Control-Camera model"),
        (dict(control_video=images(FRAMES, 1)), "A control video needs a Control model"),
        (dict(frames=5, camera_poses="orbit.txt"), "Control-Camera"),
        (dict(shift=float("inf")), "shift must be a finite number"),
    ]
    for change, words in cases:
        _refused(v51, model, lambda: sample(v51, model, embeds, vae, **change), words)
    camera, camera_vae, _ = load(v51, "Camera")
    _refused(v51, camera, lambda: sample(v51, camera, embeds, camera_vae, camera_poses=pose_lines(3)),
             "3 frames; the video has 5")
    _refused(v51, camera, lambda: sample(v51, camera, embeds, camera_vae, camera_poses="1 2 3"),
             "has 3 numbers; a pose has 19")


def test_v3_sampler_refuses_the_v51_inputs_before_any_compute(v51):
    model, vae, t5 = load_v3(v51)
    embeds = encode_t5(v51, t5)
    run = nodes(v51)["EasyAnimateSampler"]().sample
    cases = [
        (dict(sampler_name="Flow"), r"'Flow' is a flow-matching sampler and cannot run EasyAnimate V3"),
        (dict(shift=3.0), r"shift is a setting of the Flow sampler of EasyAnimate V5\.1 models; this model is V3"),
        (dict(teacache_threshold=0.1), r"teacache_threshold works with EasyAnimate V5\.1 models.*V3"),
        (dict(camera_poses=pose_lines()), "Control-Camera"),
        (dict(reference_image=images(1, 1)), "Control"),
    ]
    for change, words in cases:
        _refused(v51, model, lambda: run(model, embeds, vae, **{**SAMPLE, **change}), words)
