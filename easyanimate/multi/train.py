"""Training MuLTI on the synthetic clips: pretraining (VTC + VTM + MLM + MCM) and finetuning for
retrieval, multiple-choice + open-ended QA and tagging, resumable, with a progress bar.

    python -m easyanimate multi-train all --out RUN          # pretrain, then finetune all tasks jointly
    python -m easyanimate multi-train pretrain --out RUN
    python -m easyanimate multi-train qa --init RUN/model --out RUN2     # one finetuning task from a model

A run folder holds `data/` (the rendered training clips, uint8, made once; `--data` shares one between
runs), `tokenizer/`, `checkpoint.pt`, `loss.jsonl` (one line per step), `train_config.json`, and at the
end `model/` (io.save_multi: config.json + model.safetensors fp16 + tokenizer) and `eval.json`.

Stages: task "all" runs `steps` pretraining steps, then `finetune_steps` joint finetuning steps (each batch
trains every downstream task at once: VTC + VTM for retrieval, MC-QA through the MCM head, open QA, tags);
each stage has its own warm-up + cosine learning rate. The step counter runs across the stages, so
`--stop-at` and resuming work anywhere. Every random choice of step s (clips, frame positions, MLM masks,
hard negatives, questions, MCM distractors) comes from generators seeded by (seed, s), so a resumed run
makes exactly the batches an unbroken one would.

MCM items (our choice of distractors, `mcm_distractors`):
    "hard":  3 captions of other batch clips, drawn in proportion to their VTC similarity to the video
             (softmax, the clip itself and clips with the same caption excluded) - MCM as we reconstruct it;
    "swap":  3 captions of the clip itself with one attribute replaced (colour, shape, direction,
             background or speed) - fine-grained distractors that a bag-of-words match cannot reject;
    "mixed": each distractor slot is "swap" or "hard" with probability 1/2 (default: the hard negatives
             keep the reconstructed task, the swapped ones teach per-attribute alignment, which MC-QA needs).
Options are `[CLS] question [SEP] caption [SEP]` with a template question (data.MCM_QUESTIONS), the same
format as the downstream multiple-choice questions.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import data as D
from .evaluate import frames_from_uint8, tokenize

TASKS = ("motion", "pretrain", "retrieval", "qa", "mcqa", "openqa", "tags", "finetune", "all")
# The losses each finetuning task trains ("finetune" = all of them at once).
TASK_LOSSES = {
    "motion": ("motion",),
    "retrieval": ("vtc", "vtm"),
    "qa": ("mcqa", "openqa"),
    "mcqa": ("mcqa",),
    "openqa": ("openqa",),
    "tags": ("tags",),
    "finetune": ("vtc", "vtm", "mcqa", "openqa", "tags"),
}


@dataclass
class MultiTrainConfig:
    out: str
    task: str = "all"
    config: str = "multi-tiny"  # preset name or JSON file (ignored when `init` is given)
    init: str | None = None  # model folder (io.save_multi) to start from
    # model folder whose video encoder (ViT, temporal embedding, temporal layers) starts a fresh model, e.g.
    # one trained with task "motion": like starting from a video-pretrained backbone (see MOTION_TYPES)
    init_vision: str | None = None
    steps: int = 1000  # pretraining steps ("all", "pretrain") or finetuning steps (a finetuning task)
    finetune_steps: int = 500  # "all": joint finetuning steps after pretraining
    batch: int = 32
    lr: float = 3e-4
    finetune_lr: float | None = None  # default: lr
    warmup: int = 100
    weight_decay: float = 0.02
    grad_clip: float = 1.0
    clips: int = 4000  # training clips (rendered once into the data folder)
    data: str | None = None  # data folder (default OUT/data)
    data_seed: int = 1
    held_out_pairs: bool = False  # also train on the held-out colour/shape pairs (data.train_clips)
    # Fraction of each batch drawn as "twins": a clip plus one that differs from it in exactly one attribute
    # (make_batch). Random batches of 32 rarely hold two clips that differ only in direction, so VTC and VTM
    # would almost never have to tell directions apart; twins make every attribute a hard negative.
    twin_fraction: float = 0.0
    mcm: bool = True  # MCM in pretraining (False: the "w/o MCM" ablation)
    mcm_distractors: str = "mixed"  # "hard" | "swap" | "mixed"
    residual_mode: str | None = None  # override the config's sampler.residual_mode (ablation)
    eval_clips: int = 128  # evaluation at the end (0: none)
    seed: int = 0
    threads: int | None = 1
    stop_at: int | None = None
    save_every: int = 200
    log_every: int = 50
    quiet: bool = False
    dtype: str = "fp16"  # of the written model weights

    def stages(self) -> list[tuple[str, int, float]]:
        """(stage, steps, peak lr) in order."""
        ft_lr = self.finetune_lr or self.lr
        if self.task == "all":
            return [("pretrain", self.steps, self.lr), ("finetune", self.finetune_steps, ft_lr)]
        if self.task == "pretrain":
            return [("pretrain", self.steps, self.lr)]
        return [(self.task, self.steps, ft_lr)]


# Task "motion": open-ended direction and speed questions only. Motion is the one thing a from-scratch
# model does not pick up inside the joint objectives at this scale (they give it a small share of the
# gradient; direction stayed at chance through 1700 joint steps), while on its own it is learned in a few
# hundred steps. A short motion run, used as `init_vision` of the real run, plays the part a
# video-pretrained backbone plays for the paper's models.
MOTION_TYPES = ("direction", "speed")

# ------------------------------------------------------------------------------------------ building
def build_config(cfg: MultiTrainConfig, tokenizer):
    """The model config: the preset with the tokenizer's vocabulary, the synthetic tags and answers."""
    from .config import load_config

    config = load_config(cfg.config)
    config.text = {**config.text, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    config.mask_token_id = tokenizer.mask_token_id
    config.special_token_ids = tuple(sorted(set(tokenizer.all_special_ids)))
    config.tags = list(D.TAGS)
    config.answers = list(D.ANSWERS)
    if cfg.residual_mode:
        config.sampler.residual_mode = cfg.residual_mode
    return config


def build(cfg: MultiTrainConfig, run: Path):
    """(model, tokenizer, config) for a run: from `init` or fresh from the preset."""
    from .model import MuLTI
    from .tokenizer import build_tokenizer, load_tokenizer

    if cfg.init:
        from .io import load_multi

        bundle = load_multi(cfg.init)
        model, tokenizer, config = bundle.model.float(), bundle.tokenizer, bundle.config
        if cfg.residual_mode and cfg.residual_mode != config.sampler.residual_mode:
            raise ValueError("--residual-mode cannot change a model given by --init")
        return model, tokenizer, config
    if (run / "tokenizer" / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(run / "tokenizer")
    else:
        tokenizer = build_tokenizer(D.vocabulary_words(), run / "tokenizer")
    config = build_config(cfg, tokenizer)
    model = MuLTI(config)
    if cfg.init_vision:
        copy_video_encoder(cfg.init_vision, model)
    return model, tokenizer, config


def copy_video_encoder(folder, model) -> list[str]:
    """Copy the video encoder (ViT, temporal embedding, temporal layers) of the MuLTI model in `folder`
    into `model`; returns the copied names. The configs' video parts must match."""
    from ..errors import CheckpointMismatchError
    from .io import load_multi

    source = load_multi(folder).model.float().state_dict()
    target = model.state_dict()
    names = [n for n in target if n.startswith(("vision_encoder.", "temporal_embed", "temporal_encoder."))]
    bad = [n for n in names if n not in source or source[n].shape != target[n].shape]
    if bad:
        raise CheckpointMismatchError(f"init_vision '{folder}': its video encoder differs from this model's "
                                      f"({len(bad)} tensors missing or of another shape, e.g. {bad[:3]}); "
                                      "use a model trained with the same config.")
    model.load_state_dict({n: source[n] for n in names}, strict=False)
    return names


def make_optimizer(model, cfg: MultiTrainConfig):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "embed" not in name.lower() else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))


# ------------------------------------------------------------------------------------------ batches
class Batch:
    """One training batch: clips (specs), model frames, and the generators every random choice uses."""

    def __init__(self, specs, frames, generator, rng):
        self.specs, self.frames, self.generator, self.rng = specs, frames, generator, rng


def make_batch(data, specs, config, cfg: MultiTrainConfig, step: int, twins: dict | None = None) -> Batch:
    """Batch `step`: `cfg.batch` random clips, or with `cfg.twin_fraction` that share of them in twin pairs
    (`twins` = twin_index(specs))."""
    seed = cfg.seed * 1_000_003 + step
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    index = torch.randint(len(specs), (cfg.batch,), generator=generator).tolist()
    pairs = int(cfg.batch * cfg.twin_fraction) // 2
    if pairs:
        twins = twins if twins is not None else twin_index(specs)
        for slot in range(pairs):
            anchor = specs[index[2 * slot]]
            attribute = rng.choice(list(D.ATTRIBUTES))
            partners = []
            for value in D.ATTRIBUTES[attribute]:
                if value != getattr(anchor, attribute):
                    key = tuple(value if a == attribute else getattr(anchor, a) for a in D.ATTRIBUTES)
                    partners += twins.get(key, [])
            if partners:
                index[2 * slot + 1] = rng.choice(partners)
    clips = data[sorted(index)] if hasattr(data, "shape") else [data[i] for i in sorted(index)]
    frames = frames_from_uint8(clips, config, train=True, generator=generator)
    return Batch([specs[i] for i in sorted(index)], frames, generator, rng)


def twin_index(specs) -> dict[tuple, list[int]]:
    """(colour, shape, direction, background, speed) -> indices of the clips with exactly these attributes."""
    index: dict[tuple, list[int]] = {}
    for i, spec in enumerate(specs):
        index.setdefault(tuple(getattr(spec, a) for a in D.ATTRIBUTES), []).append(i)
    return index


def _encode_texts(model, tokenizer, config, texts, pairs=None):
    from .evaluate import max_text_len

    ids, mask = tokenize(tokenizer, texts, pairs, max_text_len(config))
    return ids, mask, model.encode_text(ids, mask)


def mcm_items(batch: Batch, sim: torch.Tensor | None, mode: str) -> tuple[list[str], list[str], list[int]]:
    """MCM items for the batch: (questions, options, labels), 4 options per clip, flattened row-major."""
    specs, rng, g = batch.specs, batch.rng, batch.generator
    captions = [D.caption(s) for s in specs]
    meaning = [D.caption(s, template=0) for s in specs]  # same attributes = same meaning, whatever the template
    questions, options, labels = [], [], []
    for i, spec in enumerate(specs):
        true = captions[i]
        chosen: list[str] = []
        # hard-negative pool: clips that differ in some attribute, drawn by VTC similarity (uniform if no sim)
        others = [j for j in range(len(specs)) if meaning[j] != meaning[i]]
        if others and sim is not None:
            weights = torch.softmax(sim[i, others].float(), 0)
        elif others:
            weights = torch.full((len(others),), 1.0 / len(others))
        for _ in range(3):
            use_swap = mode == "swap" or (mode == "mixed" and rng.random() < 0.5) or not others
            text = None
            if not use_swap:
                for _ in range(5):
                    j = others[int(torch.multinomial(weights, 1, generator=g))]
                    if captions[j] not in chosen:
                        text = captions[j]
                        break
            if text is None:
                text = D.swapped_caption(spec, rng, avoid=set(chosen) | {true})
            chosen.append(text)
        opts = chosen + [true]
        rng.shuffle(opts)
        questions += [rng.choice(D.MCM_QUESTIONS)] * 4
        options += opts
        labels.append(opts.index(true))
    return questions, options, labels


def _mc_loss(model, tokenizer, config, video_feats, questions, options, labels):
    from .losses import mcm_loss

    ids, mask = tokenize(tokenizer, questions, options, _max_len(config))
    B, K = len(labels), len(options) // len(labels)
    loss, logits = mcm_loss(model, video_feats, ids.view(B, K, -1), mask.view(B, K, -1), torch.tensor(labels))
    acc = (logits.argmax(-1) == torch.tensor(labels)).float().mean()
    return loss, acc


def _max_len(config) -> int:
    from .evaluate import max_text_len

    return max_text_len(config)


def step_losses(model, tokenizer, config, batch: Batch, losses: tuple[str, ...], cfg: MultiTrainConfig) -> dict:
    """The named losses (and a few accuracies, keys starting with "acc_") of one batch."""
    from .losses import mlm_loss, mlm_mask, qa_loss, tag_loss, vtc_loss, vtm_loss

    out: dict[str, torch.Tensor] = {}
    g = batch.generator
    video_feats = model.encode_video(batch.frames)
    B = len(batch.specs)
    if {"vtc", "vtm", "mlm", "mcm"} & set(losses):
        ids, mask, text_feats = _encode_texts(model, tokenizer, config, [D.caption(s) for s in batch.specs])
        # clips with the same attributes are positives of each other whatever their caption templates
        meaning = [D.caption(s, template=0) for s in batch.specs]
        positives = torch.tensor([[a == b for b in meaning] for a in meaning]) & ~torch.eye(B, dtype=torch.bool)
        v_emb, t_emb = model.video_embedding(video_feats), model.text_embedding(text_feats)
        sim = (v_emb @ t_emb.T).detach() / model.temperature.detach()  # video x text
        if "vtc" in losses:
            out["vtc"] = vtc_loss(v_emb, t_emb, model.temperature, positives)
            out["acc_vtc"] = (sim.argmax(1) == torch.arange(B)).float().mean()
        if "vtm" in losses:
            out["vtm"] = vtm_loss(model, video_feats, text_feats, mask, sim, g, positives)
        if "mlm" in losses:
            masked, labels = mlm_mask(ids, mask, config.text["vocab_size"], list(config.special_token_ids), g,
                                      config.mlm_prob, mask_id=config.mask_token_id)
            out["mlm"] = mlm_loss(model, video_feats, masked, mask, labels)
        if "mcm" in losses:
            questions, options, labels = mcm_items(batch, sim, cfg.mcm_distractors)
            out["mcm"], out["acc_mcm"] = _mc_loss(model, tokenizer, config, video_feats, questions, options, labels)
    if "mcqa" in losses:
        questions, options, labels = [], [], []
        for spec in batch.specs:
            q, opts, label = D.mc_question(spec, batch.rng.choice(D.MC_TYPES), batch.rng)
            questions += [q] * len(opts)
            options += opts
            labels.append(label)
        out["mcqa"], out["acc_mcqa"] = _mc_loss(model, tokenizer, config, video_feats, questions, options, labels)
    for name, kinds in (("openqa", D.OPEN_TYPES), ("motion", MOTION_TYPES)):
        if name in losses:
            answers = list(config.answers)
            qa = [D.open_question(s, batch.rng.choice(kinds)) for s in batch.specs]
            ids, mask = tokenize(tokenizer, [q for q, _ in qa], None, _max_len(config))
            out[name] = qa_loss(model, video_feats, ids, mask, torch.tensor([answers.index(a) for _, a in qa]))
    if "tags" in losses:
        ids, mask = tokenize(tokenizer, [D.TAG_PROMPT] * B, None, _max_len(config))
        target = torch.stack([torch.from_numpy(D.tag_vector(s, config.tags)) for s in batch.specs])
        out["tags"] = tag_loss(model, video_feats, ids, mask, target)
    return out


def stage_losses(stage: str, cfg: MultiTrainConfig) -> tuple[str, ...]:
    if stage == "pretrain":
        return ("vtc", "vtm", "mlm") + (("mcm",) if cfg.mcm else ())
    return TASK_LOSSES[stage]


def locate(step: int, stages) -> tuple[str, int, int, float]:
    """(stage, step within it, its length, its peak lr) of global step `step`."""
    start = 0
    for name, steps, lr in stages:
        if step < start + steps:
            return name, step - start, steps, lr
        start += steps
    name, steps, lr = stages[-1]
    return name, steps - 1, steps, lr


# ------------------------------------------------------------------------------------------ loop
def train_multi(cfg: MultiTrainConfig) -> Path | None:
    """Run (or resume) a training run. Returns the written model folder, or None when stopped early."""
    from ..train.common import LossLog, Progress, load_checkpoint, save_checkpoint, start_run, warmup_cosine

    if cfg.task not in TASKS:
        raise ValueError(f"unknown task {cfg.task!r}; expected one of {TASKS}")
    if cfg.init and cfg.init_vision:
        raise ValueError("give either init (a whole model) or init_vision (its video encoder), not both")
    if cfg.mcm_distractors not in ("hard", "swap", "mixed"):
        raise ValueError(f"mcm_distractors must be hard, swap or mixed, got {cfg.mcm_distractors!r}")
    run, _ = start_run(cfg)
    model, tokenizer, config = build(cfg, run)
    model.train()
    weights = dict(config.loss_weights)

    data_dir = Path(cfg.data) if cfg.data else run / "data"
    clips = D.train_clips(cfg.clips, cfg.data_seed, frames=16, size=config.image_size,
                          held_out_pairs=cfg.held_out_pairs)
    render_bar = Progress(len(clips), "rendering clips", enabled=not cfg.quiet)
    data, specs = D.cached_dataset(data_dir, clips, frames=16, size=config.image_size,
                                   progress=lambda n: render_bar.update(n))
    if render_bar.done:
        render_bar.close()

    twins = twin_index(specs) if cfg.twin_fraction else None
    optimizer = make_optimizer(model, cfg)
    step, _ = load_checkpoint(run, model, optimizer)
    stages = cfg.stages()
    total = sum(s for _, s, _ in stages)
    stop = min(total, cfg.stop_at) if cfg.stop_at is not None else total
    log = LossLog(run, print_every=cfg.log_every, quiet=cfg.quiet, resume_step=step)
    bar = Progress(total, f"multi-train {cfg.task}", start=step, enabled=not cfg.quiet)
    started = time.time()
    while step < stop:
        stage, local, length, peak = locate(step, stages)
        lr = warmup_cosine(local, length, peak, min(cfg.warmup, max(1, length // 5)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = make_batch(data, specs, config, cfg, step, twins)
        terms = step_losses(model, tokenizer, config, batch, stage_losses(stage, cfg), cfg)
        loss = sum(weights.get(k, 1.0) * v for k, v in terms.items() if not k.startswith("acc_"))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        step += 1
        log.write(step, loss=loss.item(), stage=stage, lr=lr, **{k: v.item() for k, v in terms.items()})
        bar.update(1, loss=loss.item())
        if step % cfg.save_every == 0 and step < stop:
            save_checkpoint(run, step, model, optimizer)
    bar.close()
    save_checkpoint(run, step, model, optimizer)
    if step < total:
        print(f"stopped at step {step}/{total} after {time.time() - started:.0f} s; run again to continue")
        return None
    return finish(cfg, run, model, tokenizer, config)


def finish(cfg: MultiTrainConfig, run: Path, model, tokenizer, config) -> Path:
    """Write `run/model` and, when `eval_clips`, `run/eval.json` (metrics of the written weights)."""
    from .io import load_multi, save_multi

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[cfg.dtype]
    folder = run / "model"
    save_multi(folder, model, tokenizer, dtype=dtype)
    if cfg.eval_clips:
        from .evaluate import evaluate_bundle, format_metrics

        bundle = load_multi(folder)
        clips = D.eval_clips(cfg.eval_clips)
        data, specs = D.cached_dataset(run / "eval_data", clips, frames=16, size=config.image_size)
        metrics = evaluate_bundle(bundle, data, specs)
        (run / "eval.json").write_text(json.dumps(metrics, indent=2) + "\n")
        if not cfg.quiet:
            print(format_metrics(metrics))
    return folder
