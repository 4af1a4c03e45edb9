"""Losses (docs/numerics.md#losses-and-heads): each is finite on a tiny config, its gradients reach the
parameters it trains and not the heads it does not use, and the random parts behave as specified."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from easyanimate.multi.losses import (
    IGNORE,
    hard_negatives,
    mcm_loss,
    mlm_loss,
    mlm_mask,
    pretrain_step_losses,
    qa_loss,
    same_text,
    tag_loss,
    vtc_loss,
    vtm_loss,
)
from easyanimate.multi.model import MuLTI

from . import text_batch, tiny_config

HEADS = ("vtm_head", "mcm_head", "qa_head", "tag_head", "mlm_head", "video_proj", "text_proj")


def build() -> MuLTI:
    torch.manual_seed(0)
    return MuLTI(tiny_config()).train()


def frames(B=4, T=3, seed=0):
    return torch.randn(B, T, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def grads_of(model) -> dict[str, bool]:
    """For each head-level module: did any of its parameters get a non-zero gradient?"""
    return {name: any(p.grad is not None and p.grad.abs().sum() > 0 for p in getattr(model, name).parameters())
            for name in HEADS}


def assert_trains(model, loss, expected_heads):
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    got = grads_of(model)
    assert {h for h, g in got.items() if g} == set(expected_heads), got
    fusion = model.fusion.layers[0]
    assert fusion.attention.query.weight.grad.abs().sum() > 0  # the shared attention always trains
    assert model.text_encoder.embeddings.word_embeddings.weight.grad is not None


# --------------------------------------------------------------------------------------------------
# VTC and hard negatives
# --------------------------------------------------------------------------------------------------


def test_vtc_loss_matches_definition():
    v, t = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    sim = v @ t.T / 0.1
    expected = (F.cross_entropy(sim, torch.arange(5)) + F.cross_entropy(sim.T, torch.arange(5))) / 2
    torch.testing.assert_close(vtc_loss(v, t, 0.1), expected)
    assert vtc_loss(v, v, 0.01) < 1e-3  # perfectly aligned pairs
    # a duplicated caption: items 0 and 1 are positives for each other; the target is spread over both
    positives = torch.zeros(5, 5, dtype=torch.bool)
    positives[0, 1] = positives[1, 0] = True
    target = (torch.eye(5) + positives.float()) / (torch.eye(5) + positives.float()).sum(1, keepdim=True)
    expected = (F.cross_entropy(sim, target) + F.cross_entropy(sim.T, target.T)) / 2
    torch.testing.assert_close(vtc_loss(v, t, 0.1, positives), expected)


def test_hard_negatives_never_pick_positives_and_follow_similarity():
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(6, 6)
    positives = torch.zeros(6, 6, dtype=torch.bool)
    positives[2, 3] = positives[3, 2] = True
    for _ in range(50):
        neg_text, neg_video = hard_negatives(sim, g, positives)
        assert (neg_text != torch.arange(6)).all() and (neg_video != torch.arange(6)).all()
        assert neg_text[2] != 3 and neg_video[3] != 2
    peaked = torch.eye(4) * 0 + torch.tensor([[0, 50, 0, 0], [0, 0, 50, 0], [0, 0, 0, 50], [50, 0, 0, 0.0]])
    neg_text, neg_video = hard_negatives(peaked, g)
    assert neg_text.tolist() == [1, 2, 3, 0] and neg_video.tolist() == [3, 0, 1, 2]
    # reproducible from the generator; every caption identical -> uniform over the others, no NaN
    a = hard_negatives(sim, torch.Generator().manual_seed(5))
    b = hard_negatives(sim, torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    everything = torch.ones(3, 3, dtype=torch.bool)
    neg_text, _ = hard_negatives(torch.zeros(3, 3), g, everything)
    assert (neg_text != torch.arange(3)).all()
    with pytest.raises(ValueError, match="at least 2"):
        hard_negatives(torch.zeros(1, 1), g)


def test_same_text():
    ids, mask = text_batch(3, 5, valid=[5, 3, 3])
    ids[2, :3] = ids[1, :3]
    ids[2, 3:] = 9  # differs only in padding
    assert same_text(ids, mask).tolist() == [[True, False, False], [False, True, True], [False, True, True]]


def test_vtm_loss_trains_fusion_and_vtm_head():
    model = build()
    ids, mask = text_batch(4, 7, valid=[7, 5, 6, 4])
    video, text = model.encode_video(frames()), model.encode_text(ids, mask)
    sim = (model.video_embedding(video) @ model.text_embedding(text).T / model.temperature).detach()
    loss = vtm_loss(model, video, text, mask, sim, torch.Generator().manual_seed(0))
    assert_trains(model, loss, ["vtm_head"])


# --------------------------------------------------------------------------------------------------
# MLM
# --------------------------------------------------------------------------------------------------


def test_mlm_mask_statistics():
    g = torch.Generator().manual_seed(0)
    ids, mask = text_batch(64, 40, valid=[40] * 32 + [20] * 32, vocab=1000)
    masked, labels = mlm_mask(ids, mask, 1000, [0, 1, 2, 3, 4], g, prob=0.15, mask_id=4)
    chosen = labels != IGNORE
    assert not chosen[mask == 0].any() and not chosen[:, 0].any()  # no padding, no [CLS]
    assert not chosen[ids == 3].any()  # no [SEP]
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(masked[~chosen], ids[~chosen])
    candidates = (mask == 1).sum() - 2 * 64
    assert abs(chosen.sum().item() / candidates.item() - 0.15) < 0.02
    to_mask = (masked[chosen] == 4).float().mean().item()
    unchanged = (masked[chosen] == ids[chosen]).float().mean().item()
    assert abs(to_mask - 0.8) < 0.05 and 0.05 < unchanged < 0.16  # 10 % kept (+ random draws of the same id)
    assert not torch.isin(masked[chosen & (masked != 4)], torch.tensor([0, 1, 2, 3])).any()


def test_mlm_loss_trains_mlm_head_and_tied_embeddings():
    model = build()
    ids, mask = text_batch(4, 7, valid=[7, 5, 6, 4])
    masked, labels = mlm_mask(ids, mask, 64, [0, 1, 2, 3, 4], torch.Generator().manual_seed(0), prob=0.5, mask_id=4)
    assert (labels != IGNORE).any()
    loss = mlm_loss(model, model.encode_video(frames()), masked, mask, labels)
    assert abs(loss.item() - math.log(64)) < 1.5  # about uniform at initialisation
    assert_trains(model, loss, ["mlm_head"])


def test_mlm_loss_without_labels_is_zero_and_differentiable():
    model = build()
    ids, mask = text_batch(2, 5)
    loss = mlm_loss(model, model.encode_video(frames(B=2)), ids, mask, torch.full_like(ids, IGNORE))
    assert loss.item() == 0.0
    loss.backward()


def test_mlm_keeps_full_text_beyond_text_keep_max():
    model = build()
    ids, mask = text_batch(2, 30)  # text_keep_max is 16
    masked, labels = mlm_mask(ids, mask, 64, [0, 1, 2, 3, 4], torch.Generator().manual_seed(0), prob=0.3, mask_id=4)
    assert torch.isfinite(mlm_loss(model, model.encode_video(frames(B=2)), masked, mask, labels))


# --------------------------------------------------------------------------------------------------
# MCM, QA, tags
# --------------------------------------------------------------------------------------------------


def test_mcm_loss_scores_each_option_with_the_same_video():
    model = build()
    B, K, L = 3, 4, 9
    ids, mask = text_batch(B * K, L, valid=[9, 7, 5, 8] * B)
    video = model.encode_video(frames(B=B))
    loss, logits = mcm_loss(model, video, ids.view(B, K, L), mask.view(B, K, L), torch.tensor([0, 3, 1]))
    assert logits.shape == (B, K)
    # option k of item b is scored exactly as fusing (video b, option k) on its own
    text = model.encode_text(ids[5:6], mask[5:6])
    alone = model.mcm_logits(model.fuse(video[1:2], text, mask[5:6]))
    torch.testing.assert_close(logits[1, 1:2], alone, rtol=0, atol=1e-5)
    assert_trains(model, loss, ["mcm_head"])


def test_qa_loss_trains_qa_head_and_ignores_out_of_vocabulary():
    model = build()
    ids, mask = text_batch(4, 6)
    video = model.encode_video(frames())
    loss = qa_loss(model, video, ids, mask, torch.tensor([0, 4, IGNORE, 2]))
    assert_trains(model, loss, ["qa_head"])
    none = qa_loss(model, video.detach(), ids, mask, torch.full((4,), IGNORE))
    assert none.item() == 0.0


def test_tag_loss_trains_tag_head():
    model = build()
    ids, mask = text_batch(4, 6)
    targets = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]])
    loss = tag_loss(model, model.encode_video(frames()), ids, mask, targets)
    assert abs(loss.item() - math.log(2)) < 0.5
    assert_trains(model, loss, ["tag_head"])


# --------------------------------------------------------------------------------------------------
# one pretraining step
# --------------------------------------------------------------------------------------------------


def pretrain_batch(B=4, K=4):
    ids, mask = text_batch(B, 8, valid=[8, 6, 7, 5][:B] * (B // 4 or 1))
    mcm_ids, mcm_mask = text_batch(B * K, 10, seed=1)
    return {"frames": frames(B=B), "text_ids": ids, "text_mask": mask, "mcm_ids": mcm_ids.view(B, K, 10),
            "mcm_mask": mcm_mask.view(B, K, 10), "mcm_labels": torch.arange(B) % K}


def test_pretrain_step_losses():
    model = build()
    losses = pretrain_step_losses(model, pretrain_batch(), torch.Generator().manual_seed(0))
    assert set(losses) == {"vtc", "vtm", "mlm", "mcm", "loss"}
    assert all(torch.isfinite(v) for v in losses.values())
    torch.testing.assert_close(losses["loss"], losses["vtc"] + losses["vtm"] + losses["mlm"] + losses["mcm"])
    losses["loss"].backward()
    assert model.temp.grad is not None and all(grads_of(model)[h] for h in ("vtm_head", "mcm_head", "mlm_head", "video_proj"))

    weighted = pretrain_step_losses(model, pretrain_batch(), torch.Generator().manual_seed(0),
                                    {"vtm": 0.0, "mcm": 0.5})
    assert set(weighted) == {"vtc", "mlm", "mcm", "loss"}  # a zero weight skips the loss
    torch.testing.assert_close(weighted["loss"], weighted["vtc"] + weighted["mlm"] + 0.5 * weighted["mcm"])


def test_vtc_fits_a_small_batch():
    """VTC in-batch accuracy on 8 pairs reaches 100 %."""
    model = build()
    ids, mask = text_batch(8, 8, seed=3)
    batch = {"frames": frames(B=8, T=2, seed=3), "text_ids": ids, "text_mask": mask}
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        losses = pretrain_step_losses(model, batch, g, {"vtm": 0.0, "mlm": 0.0})
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
    assert losses["vtc"].item() < 0.1
    with torch.no_grad():
        video, text = model.encode_video(batch["frames"]), model.encode_text(ids, mask)
        sim = model.video_embedding(video) @ model.text_embedding(text).T
    assert (sim.argmax(1) == torch.arange(8)).all() and (sim.argmax(0) == torch.arange(8)).all()
