"""Invariants of the V2/V3 MagViT VAE drivers on tiny random models (docs/numerics.md#vae)."""
import pytest
import torch

from easyanimate.errors import EasyAnimateError
from easyanimate.frames import CAUSAL, SINGLE, SLICE
from easyanimate.models.vae_magvit import DiagonalGaussian
from easyanimate.vae import Tiling, build_vae

TINY = {"ch": 8, "ch_mult": [1, 2, 4, 4], "norm_num_groups": 4, "use_tiling": False}


@pytest.fixture(scope="module")
def v3():
    torch.manual_seed(0)
    return build_vae("v3", TINY)


@pytest.fixture(scope="module")
def v2():
    torch.manual_seed(1)
    return build_vae("v2", {**TINY, "ch_mult": [1, 2, 2, 4]})


def _latents(frames, h=2, w=3, seed=0):
    return torch.randn(1, 4, frames, h, w, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_sliced_decode_equals_each_slice_decoded_by_hand_with_its_neighbours(v3):
    z = _latents(6)
    model = v3.model
    # the layout the VAE computes in (channels-last on a CPU), so both sides run the same kernels
    z = v3._compute(z)
    # three slices of two latents: conv_in + mid block see (prev, cur, next), the up blocks only cur
    by_hand = torch.cat(
        [
            model.decode_chunk(z[:, :, 0:4], SLICE, before=0, after=2),
            model.decode_chunk(z[:, :, 0:6], SLICE, before=2, after=2),
            model.decode_chunk(z[:, :, 2:6], SLICE, before=2, after=0),
        ],
        dim=2,
    )
    torch.testing.assert_close(v3.decode(z), by_hand, rtol=0, atol=1e-6)
    # the neighbours matter: slice 1 alone decodes differently
    alone = model.decode_chunk(z[:, :, 2:4], SLICE)
    assert (alone - by_hand[:, :, 8:16]).abs().max() > 1e-3


@torch.no_grad()
def test_odd_latent_count_decodes_the_first_latent_alone(v3):
    z = v3._compute(_latents(5))  # in the layout the VAE computes in
    first = v3.model.decode_chunk(z[:, :, :1], SINGLE)
    rest = torch.cat(
        [v3.model.decode_chunk(z[:, :, 1:5], SLICE, 0, 2), v3.model.decode_chunk(z[:, :, 1:5], SLICE, 2, 0)], dim=2
    )
    out = v3.decode(z)
    assert out.shape[2] == 17
    torch.testing.assert_close(out, torch.cat([first, rest], dim=2), rtol=0, atol=1e-6)


@torch.no_grad()
def test_v2_chunks_are_independent_and_causal(v2):
    z = v2._compute(_latents(6, seed=2))  # in the layout the VAE computes in
    by_hand = torch.cat([v2.model.decode_chunk(z[:, :, :3], CAUSAL), v2.model.decode_chunk(z[:, :, 3:], CAUSAL)], dim=2)
    torch.testing.assert_close(v2.decode(z), by_hand, rtol=0, atol=1e-6)
    video = torch.rand(1, 3, 18, 16, 24) * 2 - 1
    moments = torch.cat([v2.model.encode_chunk(v2._compute(video[:, :, :9]), CAUSAL),
                         v2.model.encode_chunk(v2._compute(video[:, :, 9:]), CAUSAL)], 2)
    torch.testing.assert_close(v2.encode(video).mean, moments.chunk(2, 1)[0], rtol=0, atol=1e-6)
    # no state crosses chunks: changing the second chunk leaves the first chunk's latents alone
    changed = video.clone()
    changed[:, :, 9:] = 0
    assert torch.equal(v2.encode(changed).mean[:, :, :3], v2.encode(video).mean[:, :, :3])
    assert not torch.equal(v2.encode(changed).mean[:, :, 3:], v2.encode(video).mean[:, :, 3:])


@torch.no_grad()
def test_one_tile_equals_no_tiling(v3):
    z = _latents(4, h=3, w=4)
    untiled = v3.decode(z, tiling=False)
    one_tile = v3.decode(z, tiling=Tiling(sample_size=64, overlap=0.25, force=True))
    torch.testing.assert_close(one_tile, untiled, rtol=0, atol=0)
    video = torch.rand(1, 3, 8, 24, 32) * 2 - 1
    torch.testing.assert_close(
        v3.encode(video, tiling=Tiling(64, 0.25, force=True)).mean, v3.encode(video, tiling=False).mean, rtol=0, atol=0
    )


def _reference_order_tiled(fn, x, tile, step, blend, keep):
    """The reference's tiled_encode/decode: every tile over the whole clip first, then blends of the
    stored tiles in place (above, then left), crops, and concatenation."""
    rows = [[fn(x[..., i : i + tile, j : j + tile]) for j in range(0, x.shape[-1], step)] for i in range(0, x.shape[-2], step)]

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
    return torch.cat(out_rows, dim=3)


@torch.no_grad()
def test_bounded_tiled_decode_equals_the_reference_tile_order(v3):
    # 32 px tiles (4 latents), overlap 0.25: tiles start every 3 latents, blend 8 px, keep 24 px
    z = _latents(5, h=6, w=8, seed=3)
    ours = v3.decode(z, tiling=Tiling(32, 0.25))
    reference = _reference_order_tiled(lambda t: v3.decode(t, tiling=False), z, tile=4, step=3, blend=8, keep=24)
    assert ours.shape == reference.shape == (1, 3, 17, 48, 64)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)
    assert (ours - v3.decode(z, tiling=False)).abs().max() > 1e-4  # tiling does change pixels


@torch.no_grad()
def test_bounded_tiled_encode_equals_the_reference_tile_order(v3):
    video = torch.rand(1, 3, 9, 48, 64, generator=torch.Generator().manual_seed(4)) * 2 - 1
    ours = v3.encode(video, tiling=Tiling(32, 0.25))
    moments = _reference_order_tiled(
        lambda t: torch.cat([v3.encode(t, tiling=False).mean, v3.encode(t, tiling=False).logvar], 1),
        video, tile=32, step=24, blend=1, keep=3,
    )
    reference = DiagonalGaussian(moments)
    torch.testing.assert_close(ours.mean, reference.mean, rtol=0, atol=1e-6)


@torch.no_grad()
def test_decode_is_deterministic_given_a_generator(v3):
    z = _latents(4) * v3.scaling_factor
    first = v3.decode_video(z, reference_parity=True, generator=torch.Generator().manual_seed(7))
    again = v3.decode_video(z, reference_parity=True, generator=torch.Generator().manual_seed(7))
    other = v3.decode_video(z, reference_parity=True, generator=torch.Generator().manual_seed(8))
    plain = v3.decode_video(z)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert first.min() >= 0 and first.max() <= 1 and first.dtype == torch.float32
    # the smoothing pass only touches frames [4 : -4]
    assert torch.equal(first[:, :, :4], plain[:, :, :4]) and torch.equal(first[:, :, -4:], plain[:, :, -4:])
    assert not torch.equal(first[:, :, 4:-4], plain[:, :, 4:-4])


def test_smoothing_needs_randomness(v3):
    with pytest.raises(EasyAnimateError, match="generator"):
        v3.decode_video(_latents(4), reference_parity=True)
    with pytest.raises(EasyAnimateError, match="generator"):
        v3.encode_latents(torch.zeros(1, 3, 8, 16, 24))


@torch.no_grad()
def test_encode_latents_scale_and_sample(v3):
    video = torch.rand(1, 3, 8, 16, 24) * 2 - 1
    posterior = v3.encode(video)
    mean = v3.encode_latents(video, sample=False)
    torch.testing.assert_close(mean, posterior.mean * v3.scaling_factor)
    noise = torch.randn(posterior.mean.shape)
    sampled = v3.encode_latents(video, noise=noise)
    torch.testing.assert_close(sampled, (posterior.mean + posterior.std * noise) * v3.scaling_factor)


def test_posterior_clamps_logvar_and_checks_noise():
    moments = torch.cat([torch.zeros(1, 4, 1, 2, 2), torch.full((1, 4, 1, 2, 2), 50.0)], 1)
    posterior = DiagonalGaussian(moments)
    assert posterior.logvar.max() == 20.0
    with pytest.raises(ValueError, match="shape"):
        posterior.sample(noise=torch.zeros(1, 4, 2, 2, 2))
    with pytest.raises(ValueError, match="Generator"):
        posterior.sample()


@torch.no_grad()
def test_decode_writes_into_a_given_buffer_and_memory_budget_tiles(v3):
    z = _latents(4, h=6, w=8)
    buffer = torch.full((1, 3, 16, 48, 64), float("nan"))
    out = v3.decode(z, out=buffer)
    assert out is buffer and not torch.isnan(buffer).any()
    with pytest.raises(EasyAnimateError, match="shape"):
        v3.decode(z, out=torch.empty(1, 3, 8, 48, 64))
    assert v3.tiling_for_budget(2**40, (6, 8), decode=True) is None
    small = v3.tiling_for_budget(2**20, (60, 80), decode=True)
    assert small is not None and small.sample_size >= 64
    budgeted = v3.decode(_latents(2, h=12, w=12), memory_budget=2**20)
    assert budgeted.shape == (1, 3, 8, 96, 96) and torch.isfinite(budgeted).all()


@torch.no_grad()
def test_low_precision_modes():
    torch.manual_seed(0)
    full = build_vae("v3", TINY)
    half = build_vae("v3", TINY, dtype="fp16")
    assert half.compute_dtype == torch.float32 and next(half.model.parameters()).dtype == torch.float32
    bf16 = build_vae("v3", TINY, dtype="bf16")
    bf16.model.load_state_dict(full.model.state_dict())
    z = _latents(2)
    out = bf16.decode(z)
    assert out.dtype == torch.float32
    assert (out - full.decode(z)).abs().max() / full.decode(z).abs().max() < 0.1
