"""Pretraining and fine-tuning losses (docs/numerics.md#losses-and-heads).

* VTC: symmetric InfoNCE on the unimodal embeddings, f_v · f_t / tau.
* VTM: for every positive pair, one hard-negative text per video and one hard-negative video per text,
  drawn from the in-batch VTC softmax with the diagonal masked; cross-entropy over the 3B pairs.
* MLM: BERT masking (15 %: 80 % [MASK], 10 % random token, 10 % unchanged), predicted from the fused
  text slots with the text kept at full length.
* MCM: one fused sequence per (video, option); the MCM head's scalar scores make a K-way softmax.
* QA: softmax over the answer vocabulary; tags: per-tag sigmoid (BCE).

`pretrain_step_losses` runs one pretraining step's forward: VTC + VTM + MLM (+ MCM when the batch has
`mcm_ids`). Every random draw takes a `torch.Generator`, so a step is reproducible from its seed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def _rand(shape, generator, device) -> torch.Tensor:
    """Uniform [0, 1) drawn on the generator's device, returned on `device`."""
    where = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=where).to(device)


def same_text(input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, B) bool: pairs of batch items whose texts are identical (they are positives for each other)."""
    tokens = input_ids * mask
    return (tokens[:, None, :] == tokens[None, :, :]).all(-1)


def vtc_loss(v_emb: torch.Tensor, t_emb: torch.Tensor, temperature, positives: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE over the batch. `positives` (B, B) bool marks extra matching pairs (duplicate
    captions); the target is then uniform over a row's positives instead of the diagonal alone."""
    sim = v_emb @ t_emb.T / temperature
    eye = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    targets = (eye if positives is None else (positives.to(sim.device) | eye)).to(sim.dtype)
    video_to_text = F.cross_entropy(sim, targets / targets.sum(1, keepdim=True))
    text_to_video = F.cross_entropy(sim.T, targets.T / targets.T.sum(1, keepdim=True))
    return (video_to_text + text_to_video) / 2


def hard_negatives(sim: torch.Tensor, generator: torch.Generator | None = None,
                   positives: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(neg_text_idx, neg_video_idx), each (B,): for video i a text j != i drawn with probability
    softmax_j(sim[i]) over the non-matching texts, and for text j a video likewise from sim[:, j].
    Rows with no non-matching candidate left (every caption identical) draw uniformly from j != i."""
    B = sim.shape[0]
    if B < 2:
        raise ValueError("VTM needs at least 2 pairs in a batch (negatives are drawn from the other items).")
    eye = torch.eye(B, dtype=torch.bool, device=sim.device)
    exclude = eye if positives is None else (positives.to(sim.device) | eye)

    def draw(scores: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
        probs = scores.detach().float().masked_fill(excluded, float("-inf")).softmax(-1)
        stuck = excluded.all(-1)
        probs[stuck] = (~eye[stuck]).float()
        probs = torch.nan_to_num(probs, nan=0.0)
        where = generator.device if generator is not None else probs.device
        picked = torch.multinomial(probs.to(where), 1, generator=generator).squeeze(1)
        return picked.to(sim.device)

    return draw(sim, exclude), draw(sim.T, exclude.T)


def vtm_loss(model, video_feats, text_feats, mask, sim, generator=None, positives=None) -> torch.Tensor:
    """Cross-entropy of the VTM head over B positives, B (video, hard text) and B (hard video, text) pairs."""
    B = video_feats.shape[0]
    neg_text, neg_video = hard_negatives(sim, generator, positives)
    video = torch.cat([video_feats, video_feats, video_feats[neg_video]])
    text = torch.cat([text_feats, text_feats[neg_text], text_feats])
    masks = torch.cat([mask, mask[neg_text], mask])
    logits = model.vtm_logits(model.fuse(video, text, masks))
    labels = torch.cat([torch.ones(B), torch.zeros(2 * B)]).long().to(logits.device)
    return F.cross_entropy(logits, labels)


def mlm_mask(input_ids: torch.Tensor, mask: torch.Tensor, vocab_size: int, special_ids, generator=None,
             prob: float = 0.15, *, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking -> (masked_ids, labels); labels are IGNORE (-100) except at the chosen positions.

    Candidates: real tokens (mask 1) that are not special tokens. Each is chosen with probability `prob`;
    a chosen token becomes [MASK] (80 %), a random non-special token (10 %), or stays (10 %)."""
    device = input_ids.device
    special_set = {int(i) for i in special_ids}
    special = torch.tensor(sorted(special_set), dtype=input_ids.dtype, device=device)
    candidates = mask.bool() & ~torch.isin(input_ids, special)
    chosen = candidates & (_rand(input_ids.shape, generator, device) < prob)
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE))
    action = _rand(input_ids.shape, generator, device)
    allowed = torch.tensor([i for i in range(vocab_size) if i not in special_set], device=device)
    pick = (_rand(input_ids.shape, generator, device) * len(allowed)).long().clamp(max=len(allowed) - 1)
    masked = torch.where(chosen & (action < 0.8), torch.full_like(input_ids, mask_id), input_ids)
    masked = torch.where(chosen & (action >= 0.8) & (action < 0.9), allowed[pick].to(input_ids.dtype), masked)
    return masked, labels


def mlm_loss(model, video_feats, masked_ids, mask, labels) -> torch.Tensor:
    """Cross-entropy of the MLM head at the labelled positions (0, still in the graph, if there are none)."""
    text = model.encode_text(masked_ids, mask)
    fused = model.fuse(video_feats, text, mask, condense_text=False)
    picked = labels != IGNORE
    if not picked.any():
        return fused.text.sum() * 0.0
    logits = model.mlm_head(fused.text[picked], model.word_embeddings)  # only where there is a label
    return F.cross_entropy(logits, labels[picked])


def mcm_loss(model, video_feats, option_ids, option_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """option_ids, option_mask (B, K, L): one "[CLS] question [SEP] option [SEP]" per option; labels (B,)
    the right option. The video features are computed once and reused for all K options.
    Returns (loss, logits (B, K))."""
    B, K, L = option_ids.shape
    text = model.encode_text(option_ids.reshape(B * K, L), option_mask.reshape(B * K, L))
    video = video_feats.repeat_interleave(K, dim=0)
    logits = model.mcm_logits(model.fuse(video, text, option_mask.reshape(B * K, L))).view(B, K)
    return F.cross_entropy(logits, labels), logits


def qa_loss(model, video_feats, question_ids, question_mask, answer_labels) -> torch.Tensor:
    """Open-ended QA: cross-entropy over the answer vocabulary; label -100 (answer not in the
    vocabulary) is ignored. 0 (in the graph) when every label is ignored."""
    logits = model.qa_logits(model.fuse(video_feats, model.encode_text(question_ids, question_mask), question_mask))
    if not (answer_labels != IGNORE).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, answer_labels, ignore_index=IGNORE)


def tag_loss(model, video_feats, text_ids, text_mask, targets) -> torch.Tensor:
    """Multi-label tags: mean binary cross-entropy of the per-tag logits against 0/1 `targets` (B, n_tags)."""
    logits = model.tag_logits(model.fuse(video_feats, model.encode_text(text_ids, text_mask), text_mask))
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))


def pretrain_step_losses(model, batch: dict, generator=None, weights: dict | None = None) -> dict[str, torch.Tensor]:
    """Forward of one pretraining step. batch: `frames` (B, T, 3, S, S), `text_ids`, `text_mask` (B, L),
    optional `mcm_ids`, `mcm_mask` (B, K, L') and `mcm_labels` (B,).

    Returns {"vtc", "vtm", "mlm", ["mcm"], "loss"}: each loss, and their sum weighted by `weights`
    (missing entries fall back to config.loss_weights). A loss with weight 0 is not computed."""
    weights = {**model.config.loss_weights, **(weights or {})}
    ids, mask = batch["text_ids"], batch["text_mask"]
    video = model.encode_video(batch["frames"])
    text = model.encode_text(ids, mask)
    positives = same_text(ids, mask)
    losses = {}
    if weights.get("vtc", 1.0) or weights.get("vtm", 1.0):
        v_emb, t_emb = model.video_embedding(video), model.text_embedding(text)
        temperature = model.temperature
        if weights.get("vtc", 1.0):
            losses["vtc"] = vtc_loss(v_emb, t_emb, temperature, positives)
        if weights.get("vtm", 1.0):
            sim = (v_emb @ t_emb.T / temperature).detach()
            losses["vtm"] = vtm_loss(model, video, text, mask, sim, generator, positives)
    if weights.get("mlm", 1.0):
        vocab = int(model.config.text.get("vocab_size", model.word_embeddings.shape[0]))
        masked, labels = mlm_mask(ids, mask, vocab, model.config.special_token_ids, generator,
                                  model.config.mlm_prob, mask_id=model.config.mask_token_id)
        losses["mlm"] = mlm_loss(model, video, masked, mask, labels)
    if "mcm_ids" in batch and weights.get("mcm", 1.0):
        losses["mcm"], _ = mcm_loss(model, video, batch["mcm_ids"], batch["mcm_mask"], batch["mcm_labels"])
    losses["loss"] = sum(weights.get(name, 1.0) * value for name, value in losses.items())
    return losses
