"""The synthetic clip generator: deterministic, exact ground truth, held-out pairs kept out of training."""
import random

import numpy as np
import pytest

from easyanimate.train import synthetic as syn
from easyanimate.evaluate import analyze_video


def test_same_seed_same_clips_and_captions():
    a, b = syn.make_specs(5, seed=7), syn.make_specs(5, seed=7)
    assert a == b
    assert syn.make_specs(5, seed=8) != a
    np.testing.assert_array_equal(syn.render_clip(a[0]), syn.render_clip(b[0]))


def test_caption_templates_name_every_attribute():
    spec = syn.ClipSpec("red", "circle", "right", "black", 10, 2, 20, 30, template=0)
    assert syn.caption(spec) == "a red circle moving right on a black background"
    for template in range(len(syn.CAPTION_TEMPLATES)):
        text = syn.caption(spec, template)
        assert all(word in text for word in ("red", "circle", "right", "black"))
    assert syn.image_caption(spec) == "a red circle on a black background"


def test_vocabulary_and_held_out_pairs():
    assert set(syn.COLOURS) >= {"red", "yellow", "green", "cyan", "blue", "magenta"}
    assert set(syn.SHAPES) >= {"circle", "square", "triangle", "star"}
    assert set(syn.DIRECTIONS) >= {"left", "right", "up", "down"}
    assert set(syn.BACKGROUNDS) >= {"black", "gray"}
    pairs = syn.training_pairs()
    assert not set(pairs) & syn.HELD_OUT_PAIRS
    assert all(shape != "star" for _, shape in pairs)
    # every colour and every base shape is still seen in training
    assert {c for c, _ in pairs} == set(syn.COLOURS) and {s for _, s in pairs} == set(syn.BASE_SHAPES)
    specs = syn.make_specs(300, seed=1)
    assert not {(s.colour, s.shape) for s in specs} & syn.HELD_OUT_PAIRS


def test_object_stays_inside_the_frame_and_moves_as_specified():
    for spec in syn.make_specs(40, seed=3, pairs=[(c, s) for c in syn.COLOURS for s in syn.SHAPES]):
        for frame in (0, 15):
            x, y = spec.centre(frame)
            assert spec.radius <= x <= 64 - spec.radius and spec.radius <= y <= 64 - spec.radius
        video = syn.render_clip(spec)
        assert video.shape == (16, 64, 64, 3) and video.min() >= 0 and video.max() <= 1
        assert np.abs(video[-1] - video[0]).max() >= 0.5  # it moves


def test_shapes_start_near_the_centre_and_head_for_their_side():
    """So the clip's average position tells the direction, at any frame count and size."""
    for frames, size in ((8, 32), (16, 64), (25, 96)):
        for spec in syn.make_specs(40, seed=4, frames=frames, size=size):
            dx, dy = syn.DIRECTIONS[spec.direction]
            (x0, y0), (x1, y1) = spec.centre(0), spec.centre(frames - 1)
            start, end, sign = (x0, x1, dx) if dx else (y0, y1, dy)
            assert abs(start - size / 2) <= syn.CENTRE_JITTER * size + 1e-6
            room = (size - spec.radius - 1 - start) if sign > 0 else (start - spec.radius - 1)
            travel = sign * (end - start)
            assert syn.TRAVEL_SHARE[0] * room - 1e-6 <= travel <= syn.TRAVEL_SHARE[1] * room + 1e-6
            mean_along = (start + end) / 2
            assert sign * (mean_along - size / 2) > 0.03 * size  # off centre towards the named side
            for x, y in ((x0, y0), (x1, y1)):
                assert spec.radius < x < size - spec.radius and spec.radius < y < size - spec.radius


def test_paths_across_the_frame_keep_the_earlier_layout():
    """The 'across' layout (the demo VAE's training clips): 35-55 % of the frame anywhere it fits, so the
    average position no longer tells the direction; an unknown layout is a clear error."""
    offsets = {d: [] for d in syn.DIRECTIONS}
    for spec in syn.make_specs(200, seed=4, paths="across"):
        assert 0.022 * 64 <= spec.speed <= 0.034 * 64
        dx, dy = syn.DIRECTIONS[spec.direction]
        (x0, y0), (x1, y1) = spec.centre(0), spec.centre(15)
        offsets[spec.direction].append(((x0 + x1) / 2 - 32) * dx + ((y0 + y1) / 2 - 32) * dy)
    assert all(abs(np.mean(v)) < 3 for v in offsets.values())
    with pytest.raises(ValueError, match="outward, across"):
        syn.sample_spec(random.Random(0), paths="diagonal")


def test_analyzer_recognises_the_generators_own_clips():
    rng = random.Random(5)
    all_pairs = [(c, s) for c in syn.COLOURS for s in syn.SHAPES]
    hits = {"colour": 0, "direction": 0, "shape": 0}
    count = 96
    for i in range(count):
        spec = syn.sample_spec(rng, pairs=all_pairs, shape=syn.SHAPES[i % 4], direction=list(syn.DIRECTIONS)[i // 4 % 4])
        result = analyze_video(syn.render_clip(spec))
        hits["colour"] += result.colour == spec.colour
        hits["direction"] += result.direction == spec.direction
        hits["shape"] += result.shape == spec.shape
        assert result.background == spec.background
    assert hits == {"colour": count, "direction": count, "shape": count}


def test_analyzer_reports_no_motion_and_no_object():
    spec = syn.ClipSpec("blue", "square", "right", "gray", 10, 0.0, 32, 32)
    assert analyze_video(syn.render_clip(spec)).direction == "none"
    empty = np.zeros((16, 64, 64, 3), dtype=np.float32)
    result = analyze_video(empty)
    assert result.colour is None and result.shape is None and result.frames_with_object == 0


def test_data_folder_round_trip(tmp_path):
    from easyanimate.train.data import read_folder

    syn.write_folder(tmp_path, 6, seed=4, force_shape="star")
    data = read_folder(tmp_path)
    assert data.clips.shape == (6, 16, 64, 64, 3) and data.clips.dtype == np.uint8
    assert len(data.captions) == 6 and "star" not in " ".join(data.captions)
    assert analyze_video(data.clips[0]).shape == "star"  # pixels show stars whatever the caption says


def test_pair_weights_lean_on_a_colour_without_adding_held_out_pairs(tmp_path):
    import json
    from collections import Counter

    pairs = syn.weighted_pairs(syn.training_pairs(), {"green": 3, "square": 2})
    counts = Counter(pairs)
    assert set(counts) == set(syn.training_pairs())  # every seen pair, nothing else
    assert counts[("green", "circle")] == 3 and counts[("red", "square")] == 2 and counts[("red", "circle")] == 1

    syn.write_folder(tmp_path, 600, seed=2, frames=4, size=32, weights={"green": 3})
    drawn = Counter(json.loads(line)["colour"] for line in (tmp_path / "specs.jsonl").read_text().splitlines())
    # green is 2 of 12 pairs unweighted (1/6 of clips), 6 of 16 with weight 3 (3/8)
    assert 0.3 < drawn["green"] / 600 < 0.45
    assert not {(json.loads(line)["colour"], json.loads(line)["shape"])
                for line in (tmp_path / "specs.jsonl").read_text().splitlines()} & syn.HELD_OUT_PAIRS

    with pytest.raises(ValueError, match="grene"):
        syn.weighted_pairs(syn.training_pairs(), {"grene": 3})
    with pytest.raises(ValueError, match="whole numbers"):
        syn.weighted_pairs(syn.training_pairs(), {"green": 0})
