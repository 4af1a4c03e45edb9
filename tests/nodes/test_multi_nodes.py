"""MuLTI nodes end to end, standalone: a tiny random MuLTI for the mechanics, the shipped model for the job."""
import json
import random

import pytest
import torch


@pytest.fixture(scope="session")
def multi_tiny(models_dir):
    """A tiny random-weight MuLTI folder in models/multi, with the synthetic vocabulary, tags and answers."""
    from easyanimate.multi import data
    from easyanimate.multi.config import load_config
    from easyanimate.multi.io import save_multi
    from easyanimate.multi.model import MuLTI
    from easyanimate.multi.tokenizer import build_tokenizer

    folder = models_dir / "multi" / "MuLTI-tiny"
    tokenizer = build_tokenizer(data.vocabulary_words())
    config = load_config("multi-tiny")
    config.text["vocab_size"] = len(tokenizer)
    config.tags, config.answers = list(data.TAGS), list(data.ANSWERS)
    torch.manual_seed(0)
    save_multi(folder, MuLTI(config), tokenizer, dtype=torch.float32)
    return folder


def nodes(pack):
    return pack.nodes.NODE_CLASS_MAPPINGS


def load(pack, name="MuLTI-tiny"):
    return nodes(pack)["MuLTILoader"]().load(name, "fp32")[0]


def videos(count, frames=8, size=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(count * frames, size, size, 3, generator=g)


def test_loader_lists_the_shipped_model_first_and_caches(standalone, multi_tiny):
    options = nodes(standalone)["MuLTILoader"].INPUT_TYPES()["required"]["model"][0]
    assert "demo" in options[0] and "MuLTI-tiny" in options
    assert load(standalone) is load(standalone)


def test_score_splits_the_batch_and_returns_the_best_video(standalone, multi_tiny):
    from easyanimate.multi.evaluate import score_texts

    model = load(standalone)
    frames = videos(3)
    texts = "a red circle moving right on a black background\na blue square moving up on a gray background"
    best, index, score, table = nodes(standalone)["MuLTIVideoTextScore"]().score(model, frames, texts, 8, True)
    rows = json.loads(table)["videos"]
    assert len(rows) == 3 and 0 <= index < 3
    assert torch.equal(best, frames[index * 8:(index + 1) * 8])
    assert score == max(r["score"] for r in rows)
    # The node's numbers are the core's.
    direct = score_texts(model.bundle, frames[8:16], texts.splitlines())
    assert rows[1]["match"] == [round(float(p), 4) for p in direct["vtm"]]
    assert rows[1]["score"] == pytest.approx(float(direct["vtm"].mean()), abs=1e-6)
    # Contrastive cosine instead of the match head.
    _, _, score_vtc, table_vtc = nodes(standalone)["MuLTIVideoTextScore"]().score(model, frames, texts, 8, False)
    assert -1 <= score_vtc <= 1 and json.loads(table_vtc)["scored_by"] == "similarity"


def test_bad_inputs_name_the_fix(standalone, multi_tiny):
    model = load(standalone)
    with pytest.raises(ValueError, match="frames_per_video"):
        nodes(standalone)["MuLTIVideoTextScore"]().score(model, videos(1, frames=20), "a red circle", 8, True)
    with pytest.raises(ValueError, match="at least one text"):
        nodes(standalone)["MuLTIVideoTextScore"]().score(model, videos(1), "\n  \n", 0, True)
    with pytest.raises(FileNotFoundError, match="models/multi"):
        nodes(standalone)["MuLTILoader"]().load("no-such-model", "fp32")


def test_question_answering_and_tags(standalone, multi_tiny):
    from easyanimate.multi import data

    model = load(standalone)
    clip = videos(1)
    answer, index, probs = nodes(standalone)["MuLTIVideoQA"]().answer(model, clip, "what colour is the shape?",
                                                                      "red\ngreen\nblue\nyellow", 0)
    probs = json.loads(probs)
    assert answer == ["red", "green", "blue", "yellow"][index] and sum(probs.values()) == pytest.approx(1, abs=1e-3)
    answer, index, _ = nodes(standalone)["MuLTIVideoQA"]().answer(model, clip, "what colour is the shape?", "", 0)
    assert index == -1 and answer in data.ANSWERS
    tags, scores = nodes(standalone)["MuLTITags"]().tag(model, clip, 0.0, 0)
    assert set(tags.split(", ")) == set(data.TAGS) == set(json.loads(scores))
    tags, _ = nodes(standalone)["MuLTITags"]().tag(model, clip, 1.0, 0)
    assert tags == "" or all(t in data.TAGS for t in tags.split(", "))


def best_of_four(pack, fields, trials=6, seed=12345):
    """How often the score node keeps the prompt's clip among four that differ from it in `fields`
    (clips drawn like the training data, unseen seeds), with the shipped model."""
    from easyanimate.train import synthetic as S

    loader = nodes(pack)["MuLTILoader"]
    model = loader().load(loader.INPUT_TYPES()["required"]["model"][0][0], "fp32")[0]
    values = {"colour": list(S.COLOURS), "shape": list(S.BASE_SHAPES), "direction": list(S.DIRECTIONS),
              "background": list(S.BACKGROUNDS)}
    rng = random.Random(seed)
    picked = 0
    for _ in range(trials):
        target = S.sample_spec(rng)
        others = []
        for i in range(3):
            field = fields[i % len(fields)]
            wrong = [v for v in values[field] if v != getattr(target, field)
                     and all(getattr(o, field) != v for o in others)]
            others.append(S.ClipSpec(**{**target.as_dict(), field: rng.choice(wrong)}))
        order = [target] + others
        rng.shuffle(order)
        frames = torch.cat([torch.from_numpy(S.render_clip(spec, frames=16, size=64)) for spec in order])
        prompt = S.prompt_for(target.colour, target.shape, target.direction, target.background)
        _, index, _, _ = nodes(pack)["MuLTIVideoTextScore"]().score(model, frames, prompt, 16, True)
        picked += order[index] is target
    return picked, trials


def test_shipped_model_keeps_the_clip_of_the_prompts_colour(standalone):
    picked, trials = best_of_four(standalone, ["colour"])
    assert picked >= trials - 1, f"kept the prompt's clip in {picked} of {trials} trials"


def test_shipped_model_keeps_the_clip_of_the_prompts_direction_and_shape(standalone):
    picked, trials = best_of_four(standalone, ["direction", "shape"])
    assert picked >= trials - 1, f"kept the prompt's clip in {picked} of {trials} trials"
