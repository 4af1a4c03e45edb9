"""Invariants of the V5/V5.1 causal MagViT VAE and its driver on tiny random models (docs/numerics.md#v5-vae).

The streaming cache is exact (a chunked pass equals one pass over the whole sequence), chunk sizes do not
change the numbers, memory does not grow with the number of frames, samples and tiles are independent
streams, and loading follows the release's config and key names.
"""
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from easyanimate.errors import CheckpointMismatchError, EasyAnimateError, UnsupportedModelError
from easyanimate.frames import FrameCountError
from easyanimate.models.vae_magvit import DiagonalGaussian
from easyanimate.models import vae_magvit5
from easyanimate.models.vae_magvit5 import (
    UNUSED_ATTENTION_KEYS, MagvitV5Config, StreamCache, causal_conv, upsampled_conv,
)
from easyanimate.vae import Tiling, build_vae, family_defaults, load_vae

TINY = {"block_out_channels": [8, 8, 16, 16], "norm_num_groups": 4}


@pytest.fixture(scope="module")
def v5():
    torch.manual_seed(0)
    vae = build_vae("v5", TINY)
    with torch.no_grad():  # non-trivial norms, so every GroupNorm's affine part matters
        for module in vae.model.modules():
            if isinstance(module, nn.GroupNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return vae


def _latents(frames, h=2, w=3, seed=0, batch=1):
    return torch.randn(batch, 16, frames, h, w, generator=torch.Generator().manual_seed(seed))


def _video(frames, h=16, w=24, seed=0, batch=1):
    return torch.rand(batch, 3, frames, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# ------------------------------------------------------------------ the causal cache is exact
@torch.no_grad()
@pytest.mark.parametrize("stride, chunks", [(1, [1, 3, 2, 1, 4]), (2, [1, 2, 4, 2, 6])])
def test_streamed_causal_conv_equals_one_causal_conv_over_the_sequence(stride, chunks):
    torch.manual_seed(1)
    conv = nn.Conv3d(4, 5, 3, stride=(stride, 1, 1), padding=(0, 1, 1))
    x = torch.randn(1, 4, sum(chunks), 5, 6)
    whole = conv(torch.cat([x[:, :, :1], x[:, :, :1], x], dim=2))  # replicate 2 frames in front, once
    cache, parts, start = StreamCache(), [], 0
    for n in chunks:
        parts.append(causal_conv(conv, [x[:, :, start : start + n]], cache))
        start += n
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, rtol=0, atol=1e-6)
    # the cache keeps only what the next chunk needs: 2 frames (stride 1), 1 frame (stride 2)
    assert cache.frames(conv).shape[2] == 3 - stride
    # a fresh cache starts a new stream: the first chunk again pads with its own first frame
    torch.testing.assert_close(causal_conv(conv, [x[:, :, :1]], StreamCache()), whole[:, :, :1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype, layout, batch", [
    (torch.float64, torch.contiguous_format, 1),
    (torch.float32, torch.channels_last_3d, 1),
    (torch.float32, torch.contiguous_format, 2),
])
def test_upsampled_conv_equals_convolving_the_doubled_image(dtype, layout, batch):
    """The upsamplers' convolution computed from the small image (four 2x2 phase convolutions with
    summed taps) equals the reference's: nearest x2 in space, then the 3x3x3 convolution; values and
    gradients, on a non-square image whose borders exercise the zero padding of every phase."""
    torch.manual_seed(2)
    conv = nn.Conv3d(6, 5, 3, padding=(0, 1, 1)).to(dtype)
    x = torch.randn(batch, 6, 4, 5, 7, dtype=dtype).contiguous(memory_format=layout).requires_grad_()
    reference = conv(nn.functional.interpolate(x, scale_factor=(1, 2, 2), mode="nearest"))
    ours = upsampled_conv(conv, x)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(ours, reference, rtol=0, atol=tol * reference.abs().max().item())
    grad = torch.randn_like(reference)
    expected = torch.autograd.grad(reference, [x, conv.weight], grad)
    got = torch.autograd.grad(ours, [x, conv.weight], grad)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=tol * e.abs().max().item())
    # the small image is never doubled: a layer class this path does not know takes the plain one
    class Other(nn.Conv3d):
        pass
    other = Other(6, 5, 3, padding=(0, 1, 1)).to(dtype)
    other.load_state_dict(conv.state_dict())
    torch.testing.assert_close(upsampled_conv(other, x), reference, rtol=0, atol=tol * reference.abs().max().item())


@torch.no_grad()
def test_streamed_decode_equals_one_shot_decode_of_the_whole_sequence(v5):
    z = _latents(5, seed=2)
    streamed = v5.decode(z)  # latent 0 alone, then one latent at a time through the cache
    assert streamed.shape == (1, 3, 17, 16, 24)
    model = v5.model
    one_shot = model.decode_chunk(v5._compute(z), StreamCache())
    torch.testing.assert_close(streamed, one_shot, rtol=0, atol=1e-5)
    # the reference's own split: latent 0 alone, then all the rest in one call
    cache = StreamCache()
    first = model.decode_chunk(v5._compute(z[:, :, :1]), cache)
    split = torch.cat([first, model.decode_chunk(v5._compute(z[:, :, 1:]), cache)], 2)
    torch.testing.assert_close(streamed, split, rtol=0, atol=1e-5)
    # causal: the first frames do not depend on later latents
    changed = z.clone()
    changed[:, :, 3:] = 0
    assert torch.equal(v5.decode(changed)[:, :, :9], streamed[:, :, :9])
    # the cache is cleared between calls: decoding again gives the same frames
    assert torch.equal(v5.decode(z), streamed)


def test_doubled_frames_path_equals_the_plain_stream(v5, monkeypatch):
    """Inference runs the first block after each temporal upsampler once per distinct frame (2-frame taps
    for the two copies, `doubled_causal_conv`) and convolves a frame after two cached ones apart from them
    (`_next_frame_conv`); with autograd on, every frame copy goes through the plain causal convolutions.
    Both give the same frames, latent by latent and in one call."""
    calls, apart = [], []
    original, next_frame = vae_magvit5.doubled_causal_conv, vae_magvit5._next_frame_conv
    monkeypatch.setattr(vae_magvit5, "doubled_causal_conv", lambda *a: calls.append(a[-1]) or original(*a))
    monkeypatch.setattr(vae_magvit5, "_next_frame_conv", lambda *a: apart.append(1) or next_frame(*a))
    z = _latents(4, seed=3)
    for chunks in ([1, 1, 1, 1], [1, 3]):
        outputs = []
        for grad in (False, True):
            cache, parts, start = StreamCache(), [], 0
            with torch.set_grad_enabled(grad):
                for n in chunks:
                    parts.append(v5.model.decode_chunk(v5._compute(z[:, :, start : start + n]), cache).detach())
                    start += n
            outputs.append(torch.cat(parts, 2))
        torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=1e-5)
    # per inference run, two temporal upsamplers: 4 latents -> 4 distinct frames after the first (1 + 3 doubled),
    # 7 after the second (1 + 6 doubled); the stream's first frame is never doubled
    assert calls.count(False) == 2 * 2 and calls.count(True) == 2 * (3 + 2 * 3)
    assert apart  # and one frame after two cached ones convolved apart (`_next_frame_conv`)


@torch.no_grad()
def test_streamed_encode_equals_one_shot_encode(v5):
    video = _video(13, seed=3)
    streamed = v5.encode(video)
    assert streamed.mean.shape == (1, 16, 4, 2, 3)
    one_shot = DiagonalGaussian(v5.model.encode_chunk(v5._compute(video), StreamCache()))
    torch.testing.assert_close(streamed.mean, one_shot.mean, rtol=0, atol=1e-5)
    torch.testing.assert_close(streamed.logvar, one_shot.logvar, rtol=0, atol=1e-5)
    changed = video.clone()
    changed[:, :, 5:] = 0  # causal: latents 0 and 1 (frames 0-4) are unchanged
    assert torch.equal(v5.encode(changed).mean[:, :, :2], streamed.mean[:, :, :2])


@torch.no_grad()
def test_chunk_sizes_are_neutral(v5):
    other = build_vae("v5", {**TINY, "mini_batch_encoder": 8, "mini_batch_decoder": 3})
    other.model.load_state_dict(v5.model.state_dict())
    assert (other.rules.frames_per_chunk, other.rules.latents_per_chunk) == (8, 3)
    video, z = _video(17, seed=4), _latents(6, seed=5)
    assert len(other.rules.encode_plan(17)) == 3 and len(v5.rules.encode_plan(17)) == 5
    assert _rel(other.encode(video).mean, v5.encode(video).mean) < 1e-6
    assert _rel(other.decode(z), v5.decode(z)) < 1e-6


# ------------------------------------------------------------------ memory flat in frames
def _peak_bytes(fn) -> int:
    """Peak of the bytes the CPU allocator holds while `fn` runs (torch's profiler memory events), above
    what was held before."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@torch.no_grad()
def test_decode_memory_is_flat_in_frames_and_the_output_preallocated():
    torch.manual_seed(0)
    vae = build_vae("v5", {"block_out_channels": [8, 16, 32, 32], "norm_num_groups": 4})
    peaks = {}
    for length in (3, 8):
        z = _latents(length, h=8, w=8, seed=length)
        out = torch.full((1, 3, 1 + 4 * (length - 1), 64, 64), float("nan"))
        vae.decode(z, out=out)  # warm-up: kernels, the channels-last weights
        peaks[length] = _peak_bytes(lambda: vae.decode(z, out=out))
        assert not torch.isnan(out).any()  # written in place, chunk by chunk
    # 5 chunks more, 20 frames more: the same peak (one latent's activations and the causal caches)
    assert peaks[8] <= peaks[3] * 1.01 + 4096, peaks
    estimate = vae.activation_bytes((8, 8), decode=True)
    assert peaks[8] <= estimate, (peaks, estimate)  # the estimate the hosts load the VAE with covers it
    assert estimate == vae.activation_bytes((8, 8), decode=True, batch=4)  # samples run one after another


@torch.no_grad()
def test_encode_memory_is_flat_in_frames():
    torch.manual_seed(0)
    vae = build_vae("v5", {"block_out_channels": [8, 16, 32, 32], "norm_num_groups": 4})
    above_moments = {}
    for frames in (9, 29):
        video = _video(frames, h=64, w=64, seed=frames)
        vae.encode(video)
        moments = 2 * 16 * (1 + (frames - 1) // 4) * 8 * 8 * 4
        above_moments[frames] = _peak_bytes(lambda: vae.encode(video)) - moments
    assert above_moments[29] <= above_moments[9] * 1.01 + 4096, above_moments
    assert above_moments[29] <= vae.activation_bytes((64, 64), decode=False)


@torch.no_grad()
def test_cache_holds_what_the_estimate_counts(v5):
    for decode in (True, False):
        cache = StreamCache()
        if decode:
            first, rest, pixels = _latents(1), _latents(1, seed=1), 2 * 3
            v5.model.decode_chunk(first, cache)
            v5.model.decode_chunk(rest, cache)
        else:
            first, rest, pixels = _video(1), _video(4, seed=1), 16 * 24
            v5.model.encode_chunk(first, cache)
            v5.model.encode_chunk(rest, cache)
        cached, _ = MagvitV5Config.from_dict(v5.config).stream_elements_per_pixel(decode)
        counted = cached * pixels * 4
        # decode exact; encode up to the downsamplers' one-pixel padding
        assert counted <= cache.nbytes <= counted * (1 if decode else 1.1), (decode, cache.nbytes, counted)


# ------------------------------------------------------------------ batches, tiles, pipeline decode
@torch.no_grad()
def test_batch_samples_are_independent_streams(v5):
    z = _latents(3, batch=2, seed=6)
    together = v5.decode(z)
    for i in range(2):
        assert torch.equal(together[i : i + 1], v5.decode(z[i : i + 1]))
    video = _video(5, batch=2, seed=7)
    moments = v5.encode(video)
    for i in range(2):
        assert torch.equal(moments.mean[i : i + 1], v5.encode(video[i : i + 1]).mean)


def _reference_order_tiled(fn, x, tile, step, blend, keep, out_h, out_w):
    """diffusers' tiled_encode/decode: every tile over the whole clip first, then blends of the stored tiles
    in place (above, then left), each tile cropped to `keep`, the rows concatenated and cropped."""
    rows = [[fn(x[..., i : i + tile, j : j + tile]) for j in range(0, x.shape[-1], step)]
            for i in range(0, x.shape[-2], step)]

    def blend_v(a, b, e):
        e = min(a.shape[3], b.shape[3], e)
        for y in range(e):
            b[:, :, :, y, :] = a[:, :, :, -e + y, :] * (1 - y / e) + b[:, :, :, y, :] * (y / e)
        return b

    def blend_h(a, b, e):
        e = min(a.shape[4], b.shape[4], e)
        for y in range(e):
            b[:, :, :, :, y] = a[:, :, :, :, -e + y] * (1 - y / e) + b[:, :, :, :, y] * (y / e)
        return b

    out_rows = []
    for i, row in enumerate(rows):
        out_row = []
        for j, t in enumerate(row):
            if i > 0:
                t = blend_v(rows[i - 1][j], t, blend)
            if j > 0:
                t = blend_h(row[j - 1], t, blend)
            out_row.append(t[:, :, :, :keep, :keep])
        out_rows.append(torch.cat(out_row, dim=4))
    return torch.cat(out_rows, dim=3)[:, :, :, :out_h, :out_w]


@torch.no_grad()
def test_tiled_decode_equals_the_reference_tile_order(v5):
    # 32 px tiles (4 latents) every 24 px (3 latents), blended over 8 px, kept 24 px
    z = _latents(3, h=7, w=8, seed=8)
    ours = v5.decode(z, tiling=Tiling(32, stride=24))
    reference = _reference_order_tiled(lambda t: v5.decode(t, tiling=False), z, 4, 3, 8, 24, 56, 64)
    assert ours.shape == reference.shape == (1, 3, 9, 56, 64)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    assert (ours - v5.decode(z)).abs().max() > 1e-4  # tiling does change pixels
    # one tile covering the frame is no tiling
    torch.testing.assert_close(v5.decode(z, tiling=Tiling(64, force=True, stride=64)), v5.decode(z), rtol=0, atol=0)


@torch.no_grad()
def test_tiled_encode_keeps_stride_or_whole_tiles_like_the_reference(v5):
    video = _video(5, h=56, w=64, seed=9)

    def moments(t):
        posterior = v5.encode(t, tiling=False)
        return torch.cat([posterior.mean, posterior.logvar], 1)

    aligned = v5.encode(video, tiling=Tiling(32, stride=24))
    reference = _reference_order_tiled(moments, video, 32, 24, 1, 3, 7, 8)
    torch.testing.assert_close(aligned.mean, reference[:, :16], rtol=0, atol=1e-6)
    # diffusers keeps each encoded tile whole (4 latents where the stride is 3): the content shifts
    whole = v5.encode(video, tiling=Tiling(32, stride=24, whole_encode_tiles=True))
    reference = _reference_order_tiled(moments, video, 32, 24, 1, 4, 7, 8)
    torch.testing.assert_close(whole.mean, reference[:, :16], rtol=0, atol=1e-6)
    assert (whole.mean - aligned.mean).abs().max() > 1e-3


@torch.no_grad()
def test_pipeline_decode_and_encode(v5):
    z = _latents(3, seed=10) * v5.scaling_factor
    video = v5.decode_video(z)
    raw = v5.decode(1 / v5.scaling_factor * z)  # as the pipelines write it
    torch.testing.assert_close(video, (raw.clamp(-1, 1) / 2 + 0.5).clamp(0, 1), rtol=0, atol=1e-7)
    assert video.dtype == torch.float32 and video.shape == (1, 3, 9, 16, 24)
    # no smoothing pass for V5, whatever reference_parity asks
    assert torch.equal(v5.decode_video(z, reference_parity=True), video)
    with pytest.raises(EasyAnimateError, match="no smoothing"):
        v5.decode_video(z, smooth=True, generator=torch.Generator())
    frames = _video(9, seed=11)
    posterior = v5.encode(frames)
    torch.testing.assert_close(v5.encode_latents(frames), posterior.mode() * v5.scaling_factor)  # the mode
    noise = torch.randn(posterior.mean.shape)
    torch.testing.assert_close(v5.encode_latents(frames, sample=True, noise=noise),
                               (posterior.mean + posterior.std * noise) * v5.scaling_factor)
    drawn = v5.encode_latents(frames, sample=True, generator=torch.Generator().manual_seed(3))
    again = v5.encode_latents(frames, sample=True, generator=torch.Generator().manual_seed(3))
    assert torch.equal(drawn, again)


@torch.no_grad()
def test_progress_counts_plan_chunks_whatever_samples_and_tiles(v5):
    calls = []
    v5.decode(_latents(4, h=7, w=8, batch=2), tiling=Tiling(32, stride=24), progress=lambda d, n: calls.append((d, n)))
    assert calls == [(i, 4) for i in range(1, 5)]


@torch.no_grad()
def test_memory_budget_picks_tiles(v5):
    assert v5.tiling_for_budget(2**40, (6, 8), decode=True) is None
    tiles = v5.tiling_for_budget(2**20, (60, 80), decode=True)
    assert tiles is not None and tiles.sample_size >= 64 and tiles.sample_size % 32 == 0
    assert v5.activation_bytes((60, 80), decode=True, tiling=tiles) < v5.activation_bytes((60, 80), decode=True)
    out = v5.decode(_latents(2, h=12, w=12), memory_budget=2**18)
    assert out.shape == (1, 3, 5, 96, 96) and torch.isfinite(out).all()


# ------------------------------------------------------------------ bad input
def test_frame_counts_and_channels_are_checked_before_compute(v5):
    with pytest.raises(FrameCountError, match="5 and 9"):
        v5.encode(_video(6))
    with pytest.raises(FrameCountError, match=r"1 \+ 4k"):
        v5.encode(_video(4))
    with pytest.raises(EasyAnimateError, match="C = 16"):
        v5.decode(torch.zeros(1, 4, 2, 2, 3))
    with pytest.raises(EasyAnimateError, match="multiples of 8"):
        v5.decode(_latents(2), tiling=Tiling(20, stride=12, force=True))


# ------------------------------------------------------------------ layers from other operations
class _CastingConv3d(nn.Conv3d):
    pass


class _CastingGroupNorm(nn.GroupNorm):
    pass


@torch.no_grad()
def test_other_layer_classes_give_the_same_numbers(v5):
    """Hosts build the VAE from their own layer classes (ComfyUI's casting ones): the generic paths of
    the convolution and the per-frame GroupNorm give the numbers of the fast ones."""
    ops = SimpleNamespace(Conv3d=_CastingConv3d, GroupNorm=_CastingGroupNorm, Linear=nn.Linear)
    other = build_vae("v5", TINY, operations=ops)
    other.model.load_state_dict(v5.model.state_dict())
    assert isinstance(other.model.decoder.conv_norm_out, _CastingGroupNorm)
    z = _latents(3, seed=12)
    assert _rel(other.decode(z), v5.decode(z)) < 1e-5


# ------------------------------------------------------------------ loading
def _write(folder, state, config):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "diffusion_pytorch_model.safetensors")
    return folder


def _attention_keys(width=16):
    shapes = {"group_norm": (width,), "to_q": (width, width), "to_k": (width, width), "to_v": (width, width),
              "to_out": (width, width)}
    return {k: torch.randn(shapes[k.split(".")[-2]] if k.endswith("weight") else (width,))
            for k in UNUSED_ATTENTION_KEYS}


def _same_decode(a, b):
    z = _latents(2, seed=13)
    torch.testing.assert_close(a.decode(z), b.decode(z), rtol=0, atol=0)


def test_original_release_files_carry_unused_attention_keys(tmp_path, v5):
    assert len(UNUSED_ATTENTION_KEYS) == 20
    state = {k: v.contiguous() for k, v in v5.model.state_dict().items()}
    original = {**TINY, "cache_mag_vae": True, "mid_block_use_attention": False, "spatial_group_norm": True}
    folder = _write(tmp_path / "EasyAnimateV5.1-7b-zh" / "vae", {**state, **_attention_keys()}, original)
    vae = load_vae(tmp_path / "EasyAnimateV5.1-7b-zh")
    assert vae.family == "v5"
    _same_decode(vae, v5)
    # any other unexpected tensor is refused by name, attention-like or not
    for extra in ("decoder.mid_block.attentions.1.to_q.weight", "encoder.extra_head.weight"):
        bad = _write(tmp_path / extra, {**state, **_attention_keys(), extra: torch.zeros(2)}, original)
        with pytest.raises(CheckpointMismatchError, match=f"unexpected.*{extra.split('.')[-2]}"):
            load_vae(bad)
    missing = dict(state)
    del missing["decoder.conv_out.bias"]
    with pytest.raises(CheckpointMismatchError, match="decoder.conv_out.bias"):
        load_vae(_write(tmp_path / "missing", missing, original))
    assert folder.is_dir()


def test_missing_config_fields_take_the_v5_release_values(tmp_path, v5):
    state = v5.model.state_dict()
    folder = _write(tmp_path / "sparse", state, {**TINY, "cache_mag_vae": True})
    vae = load_vae(folder)
    released = family_defaults("v5")
    for key in ("mini_batch_encoder", "mini_batch_decoder", "scaling_factor", "spatial_group_norm", "latent_channels",
                "layers_per_block", "mid_block_use_attention", "use_tiling"):
        assert vae.config[key] == released[key], key
    # not the original class's V2-era defaults (9 / 3 frames, 0.1825, tiling 384 px)
    assert (vae.rules.frames_per_chunk, vae.rules.latents_per_chunk, vae.scaling_factor) == (4, 1, 0.7125)
    assert vae.tiling is None and vae.decode(_latents(3)).shape[2] == 9
    _same_decode(vae, v5)
    # a diffusers-format config (no mode switches) and config-less weights are V5 by their 16 latent channels
    diffusers = {"_class_name": "AutoencoderKLMagvit", **TINY, "latent_channels": 16, "spatial_group_norm": True,
                 "down_block_types": released["down_block_types"], "up_block_types": released["up_block_types"]}
    _same_decode(load_vae(_write(tmp_path / "diffusers", state, diffusers)), v5)
    single = tmp_path / "vae_v5.safetensors"
    save_file({k: v.contiguous() for k, v in {**state, **_attention_keys()}.items()}, single)
    loaded = load_vae(single, config={"norm_num_groups": 4})
    assert loaded.family == "v5" and loaded.config["block_out_channels"] == TINY["block_out_channels"]
    _same_decode(loaded, v5)


def test_configs_this_pack_does_not_compute_are_refused(tmp_path, v5):
    state = v5.model.state_dict()
    for wrong, match in (({"spatial_group_norm": False}, "spatial_group_norm"),
                         ({"mid_block_use_attention": True}, "mid_block_use_attention"),
                         ({"mini_batch_encoder": 6}, "mini_batch_encoder")):
        folder = _write(tmp_path / match / str(len(str(wrong))), state, {**TINY, "cache_mag_vae": True, **wrong})
        with pytest.raises(UnsupportedModelError, match=match):
            load_vae(folder)
    v4 = _write(tmp_path / "v4", state, {**TINY, "cache_compression_vae": True})
    with pytest.raises(UnsupportedModelError, match="V4"):
        load_vae(v4)
    folder = _write(tmp_path / "asked_v3", state, {**TINY, "cache_mag_vae": True})
    with pytest.raises(Exception, match="V5 VAE"):
        load_vae(folder, family="v3")
