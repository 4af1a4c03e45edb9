"""MuLTI nodes end to end, standalone, on a tiny random MuLTI (the shipped model: benchmarks/multi_quality.py)."""
import json

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


# Whether the shipped MuLTI keeps the prompt's clip (its retrieval quality) depends on its training: it is
# measured, with its targets, by benchmarks/multi_quality.py ("best of four"). Here the node's ranking is
# checked against the core's scores on the tiny random model.

@pytest.mark.parametrize("match", [True, False])
def test_score_node_ranks_videos_by_the_cores_scores(standalone, multi_tiny, match):
    """The node picks the video with the highest mean score over the texts (match probability, or cosine
    similarity), returns that video's frames, and picks the same clip whatever its place in the batch."""
    from easyanimate.multi.evaluate import score_texts

    model = load(standalone)
    texts = ["a red circle moving right on a black background", "a blue square moving up on a gray background"]
    clips = [videos(1, seed=seed) for seed in range(4)]
    core = [float(score_texts(model.bundle, clip, texts)["vtm" if match else "vtc"].mean()) for clip in clips]
    assert len({round(s, 6) for s in core}) == 4  # a strict ranking to check
    best = max(range(4), key=core.__getitem__)
    node = nodes(standalone)["MuLTIVideoTextScore"]()
    for order in ([0, 1, 2, 3], [3, 1, 0, 2]):
        frames, index, score, table = node.score(model, torch.cat([clips[i] for i in order]), "\n".join(texts), 8, match)
        rows = json.loads(table)["videos"]
        assert [r["video"] for r in rows] == [0, 1, 2, 3]
        assert [r["score"] for r in rows] == pytest.approx([core[i] for i in order], abs=1e-5)
        assert order[index] == best and score == pytest.approx(core[best], abs=1e-5)
        assert torch.equal(frames, clips[best])
