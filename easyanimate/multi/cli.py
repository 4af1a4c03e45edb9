"""MuLTI commands of `python -m easyanimate` (registered by easyanimate/cli.py; nothing heavy at import):

    multi-train {pretrain,retrieval,qa,tags,finetune,all}   train on the synthetic clips (resumable)
    multi-eval                                             benchmark a model on held-out synthetic clips
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

DEMO_NAME = "MuLTI-demo-64px"


def demo_model_path() -> Path:
    """The small MuLTI model shipped with the pack (the nodes' default)."""
    return Path(__file__).resolve().parent / "demo" / DEMO_NAME


def add_subcommands(commands) -> None:
    """Add `multi-train` and `multi-eval` to an argparse subparsers object."""
    t = commands.add_parser(
        "multi-train", help="train MuLTI on synthetic clips (pretrain, finetune, all)",
        description="Train MuLTI on synthetic moving-shape clips. 'all' = pretraining (VTC+VTM+MLM+MCM) then "
                    "joint finetuning (retrieval, multiple-choice and open-ended QA, tags). Finetuning tasks alone "
                    "start from --init. Runs resume from OUT/checkpoint.pt when started again.")
    t.add_argument("task", choices=["motion", "pretrain", "retrieval", "qa", "tags", "finetune", "all"],
                   help="what to train (qa = multiple-choice + open-ended; finetune = every downstream task; "
                        "motion = direction and speed questions only, to start the video encoder of a run)")
    t.add_argument("--out", required=True, help="run folder (data/, checkpoint.pt, loss.jsonl, model/, eval.json)")
    t.add_argument("--config", default="multi-tiny", help="model preset name or JSON file (default multi-tiny)")
    t.add_argument("--init", default=None, help="model folder to start from (finetuning tasks)")
    t.add_argument("--init-vision", default=None,
                   help="model folder whose video encoder starts a fresh model (e.g. a 'motion' run's model)")
    t.add_argument("--steps", type=int, default=1000, help="pretraining steps (all, pretrain) or finetuning steps")
    t.add_argument("--finetune-steps", type=int, default=500, help="joint finetuning steps after pretraining (all)")
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--lr", type=float, default=3e-4)
    t.add_argument("--finetune-lr", type=float, default=None, help="peak lr of the finetuning stage (default --lr)")
    t.add_argument("--warmup", type=int, default=100)
    t.add_argument("--clips", type=int, default=4000, help="training clips to render (once, into the data folder)")
    t.add_argument("--data", default=None, help="data folder to use/share (default OUT/data)")
    t.add_argument("--data-seed", type=int, default=1)
    t.add_argument("--twin-fraction", type=float, default=0.0,
                   help="share of each batch drawn as pairs of clips differing in one attribute (hard negatives)")
    t.add_argument("--held-out-pairs", action="store_true",
                   help="train on every colour/shape pair, the held-out ones included (as the shipped model)")
    t.add_argument("--no-mcm", action="store_true", help="pretrain without MCM (ablation)")
    t.add_argument("--mcm-distractors", default="mixed", choices=["hard", "swap", "mixed"],
                   help="MCM distractor captions: VTC hard negatives, attribute swaps, or half/half (default)")
    t.add_argument("--residual-mode", default=None,
                   choices=["adapt_pool", "text_guided_pool", "attn_pool", "learned_query"],
                   help="override the sampler's residual mode (ablation: adapt_pool = no text guidance)")
    t.add_argument("--eval-clips", type=int, default=128, help="evaluate on this many held-out clips at the end (0: skip)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared 2-core box)")
    t.add_argument("--stop-at", type=int, default=None, help="stop after this step (run again to resume)")
    t.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps")
    t.add_argument("--log-every", type=int, default=50, help="print a loss line every N steps")
    t.add_argument("--quiet", action="store_true", help="no progress bar or loss lines")
    t.set_defaults(handler=cmd_multi_train)

    e = commands.add_parser("multi-eval", help="evaluate a MuLTI model on held-out synthetic clips",
                            description="Text-to-video retrieval, multiple-choice and open-ended QA, tag mAP on "
                                        "held-out synthetic clips (distinct captions; half held-out colour/shape pairs).")
    e.add_argument("--model", default=None, help=f"model folder (default: the shipped {DEMO_NAME})")
    e.add_argument("--clips", type=int, default=128, help="gallery size (at least 64 for the benchmark)")
    e.add_argument("--seed", type=int, default=0, help="evaluation set seed")
    e.add_argument("--rerank-k", type=int, default=16, help="VTM re-ranking of the top k (0: VTC only)")
    e.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    e.add_argument("--threads", type=int, default=1)
    e.set_defaults(handler=cmd_multi_eval)


def cmd_multi_train(args) -> int:
    from .train import MultiTrainConfig, train_multi

    cfg = MultiTrainConfig(out=args.out, task=args.task, config=args.config, init=args.init,
                           init_vision=args.init_vision, steps=args.steps,
                           finetune_steps=args.finetune_steps, batch=args.batch, lr=args.lr,
                           finetune_lr=args.finetune_lr, warmup=args.warmup, clips=args.clips, data=args.data,
                           data_seed=args.data_seed, held_out_pairs=args.held_out_pairs, mcm=not args.no_mcm,
                           mcm_distractors=args.mcm_distractors, twin_fraction=args.twin_fraction,
                           residual_mode=args.residual_mode, eval_clips=args.eval_clips, seed=args.seed,
                           threads=args.threads, stop_at=args.stop_at, save_every=args.save_every,
                           log_every=args.log_every, quiet=args.quiet)
    if cfg.task not in ("all", "pretrain", "motion") and not cfg.init:
        print("note: finetuning from a fresh model (no --init)")
    folder = train_multi(cfg)
    if folder is not None:
        print(f"model folder: {folder}")
    return 0


def cmd_multi_eval(args) -> int:
    import time

    import torch

    from ..train.common import Progress
    from . import data as D
    from .evaluate import evaluate_bundle, format_metrics, progress_steps
    from .io import load_multi

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(args.model) if args.model else demo_model_path()
    started = time.time()
    bundle = load_multi(folder)
    specs = D.eval_clips(args.clips, args.seed)
    clips = __import__("numpy").stack([D.render(s) for s in specs])
    bar = Progress(progress_steps(len(specs), rerank=bool(args.rerank_k)), "multi-eval")
    metrics = evaluate_bundle(bundle, clips, specs, rerank_k=args.rerank_k, progress=lambda n=1: bar.update(n))
    bar.close()
    print(f"model {folder.name}; {time.time() - started:.0f} s")
    print(format_metrics(metrics))
    if args.json:
        Path(args.json).write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m easyanimate.multi.cli")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.handler(args) or 0
