"""MuLTI synthetic data: deterministic by seed, held-out pairs kept out of training, questions right."""
import random

import numpy as np

from easyanimate.multi import data as D
from easyanimate.multi.tokenizer import build_tokenizer, load_tokenizer


def test_same_seed_same_clips():
    a, b = D.train_clips(6, seed=3, frames=4, size=32), D.train_clips(6, seed=3, frames=4, size=32)
    assert a == b and D.train_clips(6, seed=4, frames=4, size=32) != a
    np.testing.assert_array_equal(D.render(a[0], 4, 32), D.render(b[0], 4, 32))
    assert D.eval_clips(64) == D.eval_clips(64) and D.eval_clips(64, seed=1) != D.eval_clips(64)


def test_held_out_pairs_in_evaluation_and_only_on_request_in_training():
    train = D.train_clips(400, seed=1)
    assert not any(c.held_out for c in train)
    assert {c.shape for c in train} == set(D.SHAPES) and {c.background for c in train} == set(D.BACKGROUNDS)
    gallery = D.eval_clips(96)
    assert sum(c.held_out for c in gallery) == 48
    captions = [D.caption(c) for c in gallery]
    assert len(set(captions)) == len(gallery) == 96
    # evaluation clips come from other seeds: no clip (position, size, speed) equals a training clip
    assert not {(c.x0, c.y0) for c in gallery} & {(c.x0, c.y0) for c in train}
    every = D.train_clips(400, seed=1, held_out_pairs=True)
    assert {(c.colour, c.shape) for c in every} == set(D.all_pairs())  # the held-out pairs too
    assert 0.15 < sum(c.held_out for c in every) / 400 < 0.35  # 6 of 24 pairs
    assert not {(c.x0, c.y0) for c in gallery} & {(c.x0, c.y0) for c in every}


def test_clip_renders_its_attributes():
    clip = D.MultiClip("red", "square", "right", "white", "fast", 8.0, 2.0, 12.0, 30.0)
    video = D.render(clip, frames=8, size=64)
    assert video.shape == (8, 64, 64, 3) and video.dtype == np.uint8
    assert tuple(video[0, 0, 0]) == (255, 255, 255)  # white background
    red = (video[..., 0] > 200) & (video[..., 1] < 50)
    xs = [np.nonzero(red[f])[1].mean() for f in range(8)]
    assert np.allclose(np.diff(xs), 2.0, atol=0.2)  # moves right at `step` px per frame
    assert D.caption(clip, template=0) == "a red square moving right quickly on a white background"


def test_speed_classes_are_separate_and_clips_stay_inside():
    for clip in D.train_clips(200, seed=5):
        lo, hi = D.SPEED_RANGES[clip.speed]
        assert lo * 64 <= clip.step <= hi * 64
        for f in (0, 15):
            x, y = clip.centre(f)
            assert clip.radius <= x <= 64 - clip.radius and clip.radius <= y <= 64 - clip.radius


def test_questions_have_the_true_attribute_as_the_labelled_option():
    rng = random.Random(0)
    for clip in D.train_clips(50, seed=2):
        for kind in D.MC_TYPES:
            question, options, label = D.mc_question(clip, kind, rng)
            assert question == D.MC_QUESTIONS[kind]
            assert len(options) == 4 == len(set(options)) and options[label] == getattr(clip, kind)
            assert set(options) <= set(D.ATTRIBUTES[kind])
        for kind in D.OPEN_TYPES:
            assert D.open_question(clip, kind)[1] == getattr(clip, kind) in D.ANSWERS
        tags = D.tag_vector(clip)
        assert tags.sum() == 5 and {t for t, v in zip(D.TAGS, tags) if v} == set(clip.attributes().values())
        swapped = D.swapped_caption(clip, rng)
        assert swapped != D.caption(clip) and len(swapped.split()) == len(D.caption(clip).split())


def test_tokenizer_round_trip(tmp_path):
    tok = build_tokenizer(D.vocabulary_words(), tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    assert len(tok) == len(again) < 100
    assert [tok.convert_ids_to_tokens(i) for i in range(5)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    for clip in D.train_clips(5, seed=0):
        text = D.caption(clip)
        ids = again(text)["input_ids"]
        assert tok.unk_token_id not in ids and ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
        assert again.decode(ids, skip_special_tokens=True) == text
    pair = again("what shape is it?", "star")["input_ids"]
    assert again.convert_ids_to_tokens(pair) == ["[CLS]", "what", "shape", "is", "it", "?", "[SEP]", "star", "[SEP]"]
    assert again("a purple dog")["input_ids"][2:4] == [tok.unk_token_id] * 2
    # a folder with only vocab.txt loads too, same ids
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "vocab.txt").write_text((tmp_path / "tok" / "vocab.txt").read_text())
    assert load_tokenizer(tmp_path / "bare")("a red star")["input_ids"] == again("a red star")["input_ids"]
