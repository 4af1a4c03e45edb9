"""MuLTI evaluation metrics on hand-made tensors (reference values worked out by hand)."""
import math

import pytest
import torch

from easyanimate.multi.evaluate import (accuracy_by_type, average_precision, mean_average_precision, ranks,
                                        recall_at_k)


def test_ranks_and_recall_at_k():
    # 4 queries x 4 gallery items; query q's target is item q
    sim = torch.tensor([[0.9, 0.1, 0.2, 0.3],    # target first            -> rank 1
                        [0.5, 0.4, 0.1, 0.0],    # one item above          -> rank 2
                        [0.3, 0.2, 0.1, 0.4],    # three above             -> rank 4
                        [0.0, 0.0, 0.0, 0.0]])   # all tied: ties count against -> rank 4
    assert ranks(sim).tolist() == [1, 2, 4, 4]
    r = recall_at_k(sim, ks=(1, 2, 5))
    assert r["R@1"] == pytest.approx(25.0) and r["R@2"] == pytest.approx(50.0) and r["R@5"] == pytest.approx(100.0)
    assert r["MdR"] == 2.0  # torch's median of [1, 2, 4, 4] is the lower middle value
    # explicit targets
    assert ranks(sim, torch.tensor([3, 0, 3, 1])).tolist() == [2, 1, 1, 4]


def test_average_precision_by_hand():
    # sorted by score: pos, neg, pos, neg, pos -> precisions at positives 1/1, 2/3, 3/5
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    labels = torch.tensor([1, 0, 1, 0, 1])
    assert average_precision(scores, labels) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    # order of the input does not matter
    perm = torch.tensor([4, 2, 0, 3, 1])
    assert average_precision(scores[perm], labels[perm]) == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    # a tie between a positive and a negative is broken against the positive: neg first -> 1/2
    assert average_precision(torch.tensor([0.5, 0.5]), torch.tensor([1, 0])) == pytest.approx(0.5)
    assert math.isnan(average_precision(scores, torch.zeros(5)))


def test_mean_average_precision_skips_classes_without_positives():
    scores = torch.tensor([[0.9, 0.1, 0.3],
                           [0.2, 0.8, 0.2],
                           [0.4, 0.7, 0.1]])
    labels = torch.tensor([[1, 0, 0],
                           [0, 1, 0],
                           [1, 0, 0]])
    # class 0: order 0(+) 2(+) 1 -> AP 1; class 1: order 1(+) 2 0 -> AP 1; class 2: no positive -> skipped
    assert mean_average_precision(scores, labels) == pytest.approx(1.0)
    labels[2, 0], labels[2, 1] = 0, 1  # class 0: only item 0 -> AP 1; class 1: order 1(+) 2(+) -> AP 1
    assert mean_average_precision(scores, labels) == pytest.approx(1.0)
    labels = torch.tensor([[0, 0, 1], [1, 1, 0], [0, 0, 0]])
    # class 0: order 0, 2, 1(+) -> 1/3; class 1: order 1(+) -> 1; class 2: order 0(+) -> 1
    assert mean_average_precision(scores, labels) == pytest.approx((1 / 3 + 1 + 1) / 3)


def test_accuracy_by_type():
    out = accuracy_by_type([True, False, True, True], ["colour", "colour", "shape", "direction"])
    assert out == {"colour": 50.0, "shape": 100.0, "direction": 100.0, "overall": 75.0}


def test_per_clip_helpers_on_a_tiny_model(tmp_path):
    """The functions the nodes call: shapes, probabilities and answers from the config's vocabularies."""
    import json

    from easyanimate.multi import data as D
    from easyanimate.multi.evaluate import answer_choice, answer_open, predict_tags, score_texts
    from easyanimate.multi.io import MuLTIBundle
    from easyanimate.multi.train import MultiTrainConfig, build

    from .test_train import TINY

    (tmp_path / "tiny.json").write_text(json.dumps(TINY))
    cfg = MultiTrainConfig(out=str(tmp_path), config=str(tmp_path / "tiny.json"))
    torch.manual_seed(0)
    model, tokenizer, config = build(cfg, tmp_path)
    bundle = MuLTIBundle(model.eval(), tokenizer, config)
    clip = D.train_clips(1, seed=0)[0]
    video = torch.from_numpy(D.render(clip, 8, 32)).float() / 255  # ComfyUI IMAGE layout (F, H, W, 3)
    scores = score_texts(bundle, video, ["a red circle moving left slowly on a black background", "a blue star"])
    assert scores["vtc"].shape == scores["vtm"].shape == (2,)
    assert ((scores["vtm"] >= 0) & (scores["vtm"] <= 1)).all() and (scores["vtc"].abs() <= 1 + 1e-5).all()
    choice = answer_choice(bundle, video, "what shape is it?", ["circle", "square", "triangle", "star"])
    assert choice["answer"] in ("circle", "square", "triangle", "star")
    assert choice["probs"].shape == (4,) and abs(choice["probs"].sum().item() - 1) < 1e-5
    assert answer_open(bundle, video, "what colour is the shape?")["answer"] in D.ANSWERS
    tags = predict_tags(bundle, video, threshold=0.0)
    assert tags["tags"] == list(D.TAGS) and set(tags["probs"]) == set(D.TAGS)
