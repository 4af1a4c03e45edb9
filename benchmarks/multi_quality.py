"""Quality of the shipped small MuLTI model on held-out synthetic clips, with the two ablations.

For each variant: text-to-video retrieval R@1 / R@5 over a gallery of distinct-caption clips (VTC ranking,
VTM re-ranking of the top 16; R@1 of VTC alone too), multiple-choice QA accuracy per question type
(colour / shape / direction / background, 4 word options scored by the MCM head) and overall, open-ended
QA accuracy, and tag mAP. The evaluation clips come from seeds training never uses; half of them show
the colour/shape pairs held out of the demo EasyAnimate model's training (the MuLTI models here train on
every pair, `--held-out-pairs`, so they can score any prompt; the columns "held-out"/"seen" split by pair).

Variants (the shipped model's schedule, see its training.json, with one change each):
    shipped       video encoder started from a "motion" run, text-guided pooling, VTC + VTM + MLM + MCM
    no motion     the same without the motion run (fresh video encoder): the baseline of the two ablations
    no MCM        no motion run, pretrained without MCM (finetuning identical)
    plain pool    no motion run, sampler residual "adapt_pool": adaptive average pooling, no text guidance
The ablations leave out the motion run because they were trained alongside it on a 2-core CPU; compare
them with "no motion", which differs from them in the ablated part only.

    python benchmarks/multi_quality.py                                   # shipped model only
    python benchmarks/multi_quality.py --runs RUNS                       # + RUNS/{no-motion,no-mcm,adapt-pool}/model
    python benchmarks/multi_quality.py --train-ablations --runs RUNS     # train the missing ablations first
    python benchmarks/multi_quality.py --model FOLDER --clips 256 --json out.json

Targets for the shipped model: R@1 >= 50 %, MC-QA >= 85 %, tag mAP >= 0.9; and "best of four": the match score
(what the MuLTI Video-Text Score node ranks by) keeps the prompt's clip among four that differ from it in colour,
or in direction and shape, in at least 5 of 6 trials each (clips drawn like the training data, unseen seeds).
They are printed after the table with PASS / MISS (`--no-best-of-four` skips that part).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ABLATIONS = {"no-motion": ("no motion run", {"init_vision": None}),
             "no-mcm": ("no motion run, no MCM", {"init_vision": None, "mcm": False}),
             "adapt-pool": ("no motion run, plain pool (no text guidance)",
                            {"init_vision": None, "residual_mode": "adapt_pool"})}


# (summary column, target): R@1 and MC in %, tag mAP in [0, 1]
TARGETS = [("R@1", 50.0), ("MC all", 85.0), ("tag mAP", 0.9)]
# (fields the three other clips differ in, trials, least number of trials that must keep the prompt's clip)
BEST_OF_FOUR = [(("colour",), 6, 5), (("direction", "shape"), 6, 5)]


def best_of_four(bundle, fields, trials: int = 6, seed: int = 12345) -> int:
    """In how many of `trials` the highest mean match probability (the MuLTI Video-Text Score node's choice) is
    the prompt's clip, among four clips: the prompt's and three that differ from it in `fields` (in turn)."""
    import random

    import torch

    from easyanimate.multi.evaluate import score_texts
    from easyanimate.train import synthetic as S

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
        prompt = S.prompt_for(target.colour, target.shape, target.direction, target.background)
        scores = [float(score_texts(bundle, torch.from_numpy(S.render_clip(spec, frames=16, size=64)), [prompt])["vtm"].mean())
                  for spec in order]
        picked += order[max(range(4), key=scores.__getitem__)] is target
    return picked


def target_table(row: dict, best: list[tuple[tuple[str, ...], int, int, int]] | None) -> str:
    lines = ["| figure | value | target | result |", "|---|---:|---|---|"]
    for key, target in TARGETS:
        value = row[key]
        shown = f"{value:.3f}" if key == "tag mAP" else f"{value:.1f} %"
        wanted = f">= {target:g}" if key == "tag mAP" else f">= {target:g} %"
        lines.append(f"| {key} | {shown} | {wanted} | {'PASS' if value >= target else 'MISS'} |")
    for fields, trials, least, picked in best or []:
        lines.append(f"| best of four, others differ in {' and '.join(fields)} | {picked} of {trials} | >= {least} of "
                     f"{trials} | {'PASS' if picked >= least else 'MISS'} |")
    return "\n".join(lines)


def train_ablation(name: str, runs: Path, schedule: dict, data: str | None, threads: int) -> Path:
    """Train ablation `name` with the shipped model's schedule into runs/name (resumes if started)."""
    from easyanimate.multi.train import MultiTrainConfig, train_multi

    fields = {k: v for k, v in schedule.items() if k in MultiTrainConfig.__dataclass_fields__}
    fields.update(out=str(runs / name), threads=threads, eval_clips=0, stop_at=None, init=None,
                  **ABLATIONS[name][1])
    if data:
        fields["data"] = data
    elif fields.get("data") and not Path(fields["data"]).is_dir():
        fields["data"] = None
    folder = train_multi(MultiTrainConfig(**fields))
    return folder


def main(argv=None) -> int:
    import numpy as np
    import torch

    from easyanimate.multi import data as D
    from easyanimate.multi.cli import demo_model_path
    from easyanimate.multi.evaluate import evaluate_bundle, format_metrics, summary_row
    from easyanimate.multi.io import load_multi

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="the main model folder (default: the shipped MuLTI-demo-64px)")
    p.add_argument("--runs", default=None,
                   help="folder with the variant runs (no-motion/model, no-mcm/model, adapt-pool/model)")
    p.add_argument("--train-ablations", action="store_true", help="train ablations missing from --runs first")
    p.add_argument("--data", default=None, help="training data folder to share with the ablation runs")
    p.add_argument("--clips", type=int, default=128, help="evaluation gallery size (>= 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rerank-k", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write every variant's metrics to this file")
    p.add_argument("--verbose", action="store_true", help="print every metric of every variant")
    p.add_argument("--no-best-of-four", action="store_true", help="skip the best-of-four trials of the main model")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    main_folder = Path(args.model) if args.model else demo_model_path()
    variants = [("shipped" if args.model is None else main_folder.name, main_folder)]
    if args.runs or args.train_ablations:
        runs = Path(args.runs or "runs/multi-ablations")
        schedule_file = main_folder / "training.json"
        schedule = json.loads(schedule_file.read_text())["train_config"] if schedule_file.is_file() else {}
        for name, (label, _) in ABLATIONS.items():
            folder = runs / name / "model"
            if not (folder / "config.json").is_file():
                if not args.train_ablations:
                    print(f"skipping '{label}': no model at {folder} (use --train-ablations)")
                    continue
                started = time.time()
                print(f"training ablation '{label}' into {runs / name}")
                train_ablation(name, runs, schedule, args.data, args.threads)
                print(f"trained '{label}' in {time.time() - started:.0f} s")
            variants.append((label, folder))

    specs = D.eval_clips(args.clips, args.seed)
    clips = np.stack([D.render(s) for s in specs])
    rows, everything = [], {}
    for label, folder in variants:
        started = time.time()
        bundle = load_multi(folder)
        metrics = evaluate_bundle(bundle, clips, specs, rerank_k=args.rerank_k, seed=args.seed)
        everything[label] = metrics
        rows.append((label, summary_row(metrics), time.time() - started))
        if args.verbose:
            print(f"== {label} ({folder})\n{format_metrics(metrics)}")

    n_held = sum(s.held_out for s in specs)
    print(f"MuLTI quality on {len(specs)} held-out synthetic clips ({n_held} with held-out colour/shape pairs), "
          f"gallery of {len(specs)} distinct captions, VTM re-rank top {args.rerank_k}")
    columns = list(rows[0][1])
    head = "| variant | " + " | ".join(columns) + " |"
    print(head)
    print("|" + "---|" * (len(columns) + 1))
    for label, row, _ in rows:
        cells = [f"{v:.3f}" if k == "tag mAP" else f"{v:.1f}" for k, v in row.items()]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("(R@k and QA in %; MC chance 25 %; open QA over", len(bundle.config.answers), "answers)")
    best = None
    if not args.no_best_of_four:
        main_bundle = load_multi(main_folder)
        best = [(fields, trials, least, best_of_four(main_bundle, fields, trials)) for fields, trials, least in BEST_OF_FOUR]
    print(f"\nTargets ({rows[0][0]})\n" + target_table(rows[0][1], best))
    if args.json:
        Path(args.json).write_text(json.dumps(everything, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
