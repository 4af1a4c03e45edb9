"""Evaluation for MuLTI: metrics on plain tensors, per-clip helpers the nodes reuse, and the full
synthetic benchmark (retrieval, multiple-choice QA, open-ended QA, tags).

Metrics (no sklearn):
    ranks(sim, targets)              1-based rank of each query's target; ties count against it
    recall_at_k(sim, targets, ks)    {"R@1": %, "R@5": %, ..., "MdR": median rank}
    average_precision(scores, labels)        AP of one class (mean precision at each positive)
    mean_average_precision(scores, labels)   macro mean over classes that have a positive

Per-clip helpers (`bundle` = anything with .model, .tokenizer, .config, e.g. io.load_multi's MuLTIBundle;
`video` = a ComfyUI IMAGE (F, H, W, 3) in [0, 1], or frames already prepared (B, T, 3, S, S)):
    score_texts(bundle, video, texts)               -> {"vtc": (n,) cosine, "vtm": (n,) match probability}
    answer_choice(bundle, video, question, options) -> {"index", "answer", "probs"}
    answer_open(bundle, video, question)            -> {"answer", "probs": {answer: p} (top 5)}
    predict_tags(bundle, video, threshold)          -> {"tags": [...], "probs": {tag: p}}

Benchmark: `evaluate_bundle(bundle, clips_uint8, specs)` -> dict of metrics (see `format_metrics`).
"""
from __future__ import annotations

import random

import numpy as np
import torch

from . import data as D


# ------------------------------------------------------------------------------------------ metrics
def ranks(sim: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """1-based rank of `targets[q]` in row q of `sim` (queries x gallery, higher = better). A tie with
    another item counts against the target (pessimistic), so a constant score never looks good."""
    sim = sim.float()
    if targets is None:
        targets = torch.arange(sim.shape[0])
    target_scores = sim.gather(1, targets.view(-1, 1))
    others = torch.ones_like(sim, dtype=torch.bool).scatter_(1, targets.view(-1, 1), False)
    return 1 + ((sim >= target_scores) & others).sum(1)


def recall_at_k(sim: torch.Tensor, targets: torch.Tensor | None = None, ks=(1, 5, 10)) -> dict:
    """Recall@k in percent for each k, and the median rank ("MdR")."""
    r = ranks(sim, targets)
    out = {f"R@{k}": 100.0 * (r <= k).float().mean().item() for k in ks}
    out["MdR"] = float(r.float().median().item())
    return out


def average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """AP of one class: the mean, over the positives, of the precision among the items scored at least as
    high (items sorted by score, ties broken against the positives). NaN when there is no positive."""
    scores, labels = scores.float().flatten(), labels.float().flatten()
    positives = labels.sum()
    if positives == 0:
        return float("nan")
    # sort by score descending; among equal scores put negatives first (pessimistic)
    order = sorted(range(len(scores)), key=lambda i: (-scores[i].item(), labels[i].item()))
    hits, total = 0, 0.0
    for position, i in enumerate(order, start=1):
        if labels[i] > 0:
            hits += 1
            total += hits / position
    return total / positives.item()


def mean_average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Macro mAP over the columns (classes) of (N, C) `scores` that have at least one positive label."""
    aps = [average_precision(scores[:, c], labels[:, c]) for c in range(scores.shape[1]) if labels[:, c].sum() > 0]
    return sum(aps) / len(aps) if aps else float("nan")


def accuracy_by_type(correct, types) -> dict:
    """{"<type>": %, ..., "overall": %} from parallel lists of booleans and type names."""
    out: dict[str, float] = {}
    for kind in dict.fromkeys(types):
        hits = [c for c, t in zip(correct, types) if t == kind]
        out[kind] = 100.0 * sum(hits) / len(hits)
    out["overall"] = 100.0 * sum(correct) / max(len(correct), 1)
    return out


# ------------------------------------------------------------------------------------------ helpers
def tokenize(tokenizer, texts, pairs=None, max_length: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of `texts` (or of `[CLS] text [SEP] pair [SEP]`), padded to the longest."""
    enc = tokenizer(list(texts), list(pairs) if pairs is not None else None, padding=True, truncation=True,
                    max_length=max_length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def max_text_len(config) -> int:
    return int(getattr(config, "max_text_len", 32) or 32)


def frames_from_uint8(clips, config, train: bool = False, generator=None) -> torch.Tensor:
    """uint8 (B, F, H, W, 3) clips of the model's frame size -> model frames (B, T, 3, S, S): one frame per
    segment (preprocess.sample_frame_indices: the middle one, or a random one when training; in order),
    normalised. No spatial crop: position, size and speed in pixels are what the captions describe."""
    from .preprocess import prepare_frames

    clips = torch.from_numpy(np.array(clips, dtype=np.uint8)) if not torch.is_tensor(clips) else clips
    fits = clips.shape[2] == clips.shape[3] == config.image_size
    return prepare_frames(clips, config, train=train, generator=generator, random_crop=not fits)


def _as_frames(bundle, video) -> torch.Tensor:
    video = torch.as_tensor(video)
    if video.ndim == 5 and video.shape[2] == 3 and video.shape[-1] != 3:  # already prepared
        return video.float()
    from .preprocess import prepare_frames

    return prepare_frames(video, bundle.config)  # float in [0, 1] or uint8


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def _repeat(feats: torch.Tensor, n: int) -> torch.Tensor:
    return feats.expand(n, *feats.shape[1:]) if feats.shape[0] == 1 else feats.repeat_interleave(n, 0)


@torch.no_grad()
def _video_feats(bundle, video) -> torch.Tensor:
    model = bundle.model
    frames = _as_frames(bundle, video).to(_device(model), _dtype(model))
    return model.encode_video(frames)


@torch.no_grad()
def _fuse_texts(bundle, video_feats, texts, pairs=None):
    """Fuse one video's features (1, ...) with each text (and pair) -> Fused for len(texts) sequences."""
    model = bundle.model
    ids, mask = tokenize(bundle.tokenizer, texts, pairs, max_text_len(bundle.config))
    ids, mask = ids.to(_device(model)), mask.to(_device(model))
    text_feats = model.encode_text(ids, mask)
    return model.fuse(_repeat(video_feats, len(texts)), text_feats, mask), text_feats


@torch.no_grad()
def score_texts(bundle, video, texts) -> dict:
    """VTC cosine similarity and VTM match probability of one video with each text."""
    model = bundle.model
    feats = _video_feats(bundle, video)[:1]
    fused, text_feats = _fuse_texts(bundle, feats, texts)
    v_emb = model.video_embedding(feats)
    t_emb = model.text_embedding(text_feats)
    return {"vtc": (t_emb @ v_emb.T).squeeze(1).float().cpu(),
            "vtm": model.vtm_logits(fused).float().softmax(-1)[:, 1].cpu()}


@torch.no_grad()
def answer_choice(bundle, video, question: str, options) -> dict:
    """Multiple choice: `[CLS] question [SEP] option [SEP]` scored by the MCM head, softmax over options."""
    feats = _video_feats(bundle, video)[:1]
    fused, _ = _fuse_texts(bundle, feats, [question] * len(options), list(options))
    probs = bundle.model.mcm_logits(fused).float().softmax(-1).cpu()
    index = int(probs.argmax())
    return {"index": index, "answer": options[index], "probs": probs}


@torch.no_grad()
def answer_open(bundle, video, question: str, top: int = 5) -> dict:
    """Open-ended QA over the config's answer vocabulary."""
    answers = list(bundle.config.answers)
    feats = _video_feats(bundle, video)[:1]
    fused, _ = _fuse_texts(bundle, feats, [question])
    probs = bundle.model.qa_logits(fused).float().softmax(-1)[0].cpu()
    best = probs.topk(min(top, len(answers)))
    return {"answer": answers[int(probs.argmax())],
            "probs": {answers[int(i)]: float(p) for p, i in zip(best.values, best.indices)}}


@torch.no_grad()
def predict_tags(bundle, video, threshold: float = 0.5, prompt: str = D.TAG_PROMPT) -> dict:
    """Multi-label tags of one video, read with the fixed tag prompt (empty text: `[CLS] [SEP]`)."""
    tags = list(bundle.config.tags)
    feats = _video_feats(bundle, video)[:1]
    fused, _ = _fuse_texts(bundle, feats, [prompt])
    probs = bundle.model.tag_logits(fused).float().sigmoid()[0].cpu()
    return {"tags": [t for t, p in zip(tags, probs) if p >= threshold],
            "probs": {t: float(p) for t, p in zip(tags, probs)}}


# ------------------------------------------------------------------------------------------ benchmark
@torch.no_grad()
def evaluate_bundle(bundle, clips, specs, *, rerank_k: int = 16, batch: int = 32, seed: int = 0,
                    progress=None) -> dict:
    """All metrics on an evaluation set (uint8 clips (N, F, H, W, 3) and their MultiClip specs).

    retrieval: text-to-video over the whole set with each clip's canonical caption as its query
    (VTC ranking, then VTM re-ranking of the top `rerank_k`: score = VTM prob + VTC cosine);
    mc: each clip x each MC question type, 4 options; open: each clip x each open question type;
    tags: macro mAP over the tags, and micro-F1 at 0.5."""
    model, tokenizer, config = bundle.model, bundle.tokenizer, bundle.config
    model.eval()
    device, dtype = _device(model), _dtype(model)
    L = max_text_len(config)
    n = len(specs)
    tick = progress or (lambda k=1: None)

    vfeats, v_emb = [], []
    for start in range(0, n, batch):
        frames = frames_from_uint8(clips[start:start + batch], config).to(device, dtype)
        f = model.encode_video(frames)
        vfeats.append(f)
        v_emb.append(model.video_embedding(f))
        tick(1)
    vfeats, v_emb = torch.cat(vfeats), torch.cat(v_emb)

    def fused_for(video_index, texts, pairs=None):
        ids, mask = tokenize(tokenizer, texts, pairs, L)
        ids, mask = ids.to(device), mask.to(device)
        tf = model.encode_text(ids, mask)
        return model.fuse(vfeats[video_index], tf, mask), tf

    # retrieval
    captions = [D.caption(s, template=0) for s in specs]
    ids, mask = tokenize(tokenizer, captions, None, L)
    tfeats = model.encode_text(ids.to(device), mask.to(device))
    t_emb = model.text_embedding(tfeats)
    sim = (t_emb @ v_emb.T).float().cpu()  # texts x videos
    out = {"n": n, "retrieval_vtc": recall_at_k(sim)}
    if rerank_k:
        k = min(rerank_k, n)
        top = sim.topk(k, dim=1).indices
        reranked = sim.clone()
        for q in range(n):
            mask_q = mask[q:q + 1].expand(k, -1).to(device)
            fused = model.fuse(vfeats[top[q]], tfeats[q:q + 1].expand(k, -1, -1), mask_q)
            vtm = model.vtm_logits(fused).float().softmax(-1)[:, 1].cpu()
            reranked[q, top[q]] = 10.0 + vtm + sim[q, top[q]]
        tick(1)
        out["retrieval"] = recall_at_k(reranked)
    else:
        out["retrieval"] = out["retrieval_vtc"]
    held = torch.tensor([s.held_out for s in specs])
    final = reranked if rerank_k else sim
    r = ranks(final)
    if held.any():
        out["retrieval"]["R@1 held-out"] = 100.0 * (r[held] <= 1).float().mean().item()
    if (~held).any():
        out["retrieval"]["R@1 seen"] = 100.0 * (r[~held] <= 1).float().mean().item()

    # multiple-choice QA
    rng = random.Random(seed)
    correct, types, owners = [], [], []
    for start in range(0, n, batch):
        index, questions, options, labels, kinds = [], [], [], [], []
        for i in range(start, min(n, start + batch)):
            for kind in D.MC_TYPES:
                q, opts, label = D.mc_question(specs[i], kind, rng)
                index += [i] * len(opts)
                questions += [q] * len(opts)
                options += opts
                labels.append(label)
                kinds.append(kind)
        fused, _ = fused_for(torch.tensor(index, device=device), questions, options)
        logits = model.mcm_logits(fused).float().view(len(labels), -1).cpu()
        correct += (logits.argmax(1) == torch.tensor(labels)).tolist()
        types += kinds
        owners += [i for i in range(start, min(n, start + batch)) for _ in D.MC_TYPES]
        tick(1)
    out["mc"] = accuracy_by_type(correct, types)
    for name, split in (("held-out", True), ("seen", False)):
        picked = [ok for ok, i in zip(correct, owners) if bool(held[i]) == split]
        if picked:
            out["mc"][f"overall {name}"] = 100.0 * sum(picked) / len(picked)

    # open-ended QA
    answers = list(config.answers)
    correct, types = [], []
    for start in range(0, n, batch):
        index, questions, gold, kinds = [], [], [], []
        for i in range(start, min(n, start + batch)):
            for kind in D.OPEN_TYPES:
                q, a = D.open_question(specs[i], kind)
                index.append(i)
                questions.append(q)
                gold.append(answers.index(a) if a in answers else -1)
                kinds.append(kind)
        fused, _ = fused_for(torch.tensor(index, device=device), questions)
        pred = model.qa_logits(fused).float().argmax(1).cpu()
        correct += (pred == torch.tensor(gold)).tolist()
        types += kinds
        tick(1)
    out["open"] = accuracy_by_type(correct, types)

    # tags
    tags = list(config.tags)
    scores = []
    for start in range(0, n, batch):
        m = min(n, start + batch) - start
        fused, _ = fused_for(torch.arange(start, start + m, device=device), [D.TAG_PROMPT] * m)
        scores.append(model.tag_logits(fused).float().sigmoid().cpu())
        tick(1)
    scores = torch.cat(scores)
    labels = torch.stack([torch.from_numpy(D.tag_vector(s, tags)) for s in specs])
    pred = scores >= 0.5
    tp = (pred & (labels > 0)).sum().item()
    f1 = 2 * tp / max(pred.sum().item() + labels.sum().item(), 1)
    out["tags"] = {"mAP": mean_average_precision(scores, labels), "F1@0.5": f1}
    return out


def progress_steps(n: int, batch: int = 32, rerank: bool = True) -> int:
    """How many times `evaluate_bundle` calls its progress callback."""
    chunks = -(-n // batch)
    return 4 * chunks + (1 if rerank else 0)


def summary_row(metrics: dict) -> dict:
    """The headline numbers of one evaluation (what the benchmark table shows)."""
    mc, op = metrics["mc"], metrics["open"]
    row = {"R@1": metrics["retrieval"]["R@1"], "R@5": metrics["retrieval"]["R@5"],
           "R@1 (VTC only)": metrics["retrieval_vtc"]["R@1"]}
    row.update({f"MC {k}": mc[k] for k in D.MC_TYPES if k in mc})
    row["MC all"] = mc["overall"]
    row["open QA"] = op["overall"]
    row["tag mAP"] = metrics["tags"]["mAP"]
    return row


def format_metrics(metrics: dict) -> str:
    r, mc, op, tags = metrics["retrieval"], metrics["mc"], metrics["open"], metrics["tags"]
    lines = [f"gallery {metrics['n']} clips",
             "retrieval (text->video): " + ", ".join(f"{k} {v:.1f}" for k, v in r.items()),
             "retrieval, VTC only:     " + ", ".join(f"{k} {v:.1f}" for k, v in metrics["retrieval_vtc"].items()),
             "multiple-choice QA:      " + ", ".join(f"{k} {v:.1f}%" for k, v in mc.items()),
             "open-ended QA:           " + ", ".join(f"{k} {v:.1f}%" for k, v in op.items()),
             f"tags:                    mAP {tags['mAP']:.3f}, F1@0.5 {tags['F1@0.5']:.3f}"]
    return "\n".join(lines)
