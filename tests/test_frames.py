"""Frame arithmetic of the families (docs/numerics.md#frame-arithmetic): counts, rounding, slicing plans."""
import pytest

from easyanimate.errors import EasyAnimateError
from easyanimate.frames import (
    CAUSAL, SINGLE, SLICE, STREAM, STREAM_START, FrameCountError, frame_rule, latent_size, pixel_size,
)


@pytest.mark.parametrize(
    "family, frames, latents",
    [("v3", 144, 36), ("v3", 72, 18), ("v3", 8, 2), ("v3", 1, 1), ("v2", 144, 48), ("v2", 72, 24), ("v2", 9, 3),
     ("v2", 1, 1), ("v1", 80, 80), ("v1", 5, 5), ("v5", 49, 13), ("v5", 25, 7), ("v5", 5, 2), ("v5", 1, 1),
     ("v5.1", 49, 13)],
)
def test_latent_frames_of_valid_counts(family, frames, latents):
    rule = frame_rule(family)
    assert rule.latent_frames(frames) == latents
    assert rule.check_frames(frames).frames == frames
    assert rule.pixel_frames(latents) == frames


@pytest.mark.parametrize("family, requested, frames, latents", [("v3", 20, 16, 4), ("v3", 143, 136, 34), ("v2", 100, 99, 33),
                                                                ("v5", 48, 45, 12), ("v5", 4, 1, 1), ("v5", 50, 49, 13)])
def test_rounding_follows_the_reference_and_reports_the_count(family, requested, frames, latents):
    count = frame_rule(family).round_frames(requested)
    assert (count.frames, count.latents, count.changed) == (frames, latents, True)


def test_strict_check_names_the_valid_counts():
    with pytest.raises(FrameCountError, match="multiple of 8") as err:
        frame_rule("v3").check_frames(20)
    assert "16" in str(err.value)
    with pytest.raises(FrameCountError, match="multiple of 9"):
        frame_rule("v2").check_frames(10)
    with pytest.raises(FrameCountError, match="too short"):
        frame_rule("v3").round_frames(5)
    with pytest.raises(FrameCountError, match="at least 1"):
        frame_rule("v1").round_frames(0)
    assert issubclass(FrameCountError, EasyAnimateError)


def test_what_the_vae_itself_does_with_any_count():
    v3, v2 = frame_rule("v3"), frame_rule("v2")
    # V3: odd counts encode frame 0 alone; partial slices shrink by 4 (rounded up)
    assert [v3.encoded_latents(f) for f in (1, 16, 17, 12, 3)] == [1, 4, 5, 3, 2]
    assert [v3.pixel_frames(n) for n in (1, 4, 5, 3)] == [1, 16, 17, 9]
    # V2: causal chunks, 9 -> 3 -> 9, a partial chunk of n latents gives 4n - 3 frames
    assert [v2.encoded_latents(f) for f in (27, 1, 10)] == [9, 1, 4]
    assert [v2.pixel_frames(n) for n in (9, 1, 4, 5)] == [27, 1, 10, 14]


def test_decode_plans_carry_modes_and_neighbour_context():
    plan = frame_rule("v3").decode_plan(7)  # lone first latent, then 3 slices of 2
    assert [(c.start, c.stop, c.mode) for c in plan] == [(0, 1, SINGLE), (1, 3, SLICE), (3, 5, SLICE), (5, 7, SLICE)]
    # the lone first latent is not a neighbour of slice 1; inner slices see both neighbours
    assert [(c.context_start, c.context_stop) for c in plan] == [(0, 1), (1, 5), (1, 7), (3, 7)]
    assert [(c.out_start, c.out_stop) for c in plan] == [(0, 1), (1, 9), (9, 17), (17, 25)]
    v2 = frame_rule("v2").decode_plan(6)
    assert [(c.start, c.stop, c.mode, c.context_start, c.context_stop) for c in v2] == [(0, 3, CAUSAL, 0, 3), (3, 6, CAUSAL, 3, 6)]
    # encoder slices never share features
    assert all((c.context_start, c.context_stop) == (c.start, c.stop) for c in frame_rule("v3").encode_plan(33))


def test_v5_counts_are_one_plus_four_k_with_the_first_frame_alone():
    v5 = frame_rule("v5")
    with pytest.raises(FrameCountError, match=r"1 \+ 4k .*nearest valid counts are 45 and 49"):
        v5.check_frames(47)
    with pytest.raises(FrameCountError, match="nearest valid counts are 1 and 5"):
        v5.check_frames(3)
    with pytest.raises(FrameCountError, match="at least 1"):
        v5.round_frames(0)
    # frame 0 alone, then 4 frames -> 1 latent; latent 0 alone, then 1 latent -> 4 frames
    assert [(c.start, c.stop, c.mode, c.out_start, c.out_stop) for c in v5.encode_plan(9)] == [
        (0, 1, STREAM_START, 0, 1), (1, 5, STREAM, 1, 2), (5, 9, STREAM, 2, 3)]
    assert [(c.start, c.stop, c.mode, c.out_start, c.out_stop) for c in v5.decode_plan(3)] == [
        (0, 1, STREAM_START, 0, 1), (1, 2, STREAM, 1, 5), (2, 3, STREAM, 5, 9)]
    assert all((c.context_start, c.context_stop) == (c.start, c.stop) for c in v5.decode_plan(13))
    assert [v5.pixel_frames(n) for n in (1, 2, 13)] == [1, 5, 49]
    assert [v5.encoded_latents(f) for f in (1, 5, 49)] == [1, 2, 13]


def test_spatial_factor():
    assert latent_size(384, 672) == (48, 84)
    assert pixel_size(48, 84) == (384, 672)
    with pytest.raises(FrameCountError, match="multiples of 8"):
        latent_size(100, 64)


def test_unknown_family():
    with pytest.raises(EasyAnimateError, match="v1, v2, v3"):
        frame_rule("v4")
