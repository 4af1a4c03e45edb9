"""Prompt adherence of the embedded demo model (and its LoRA): the table of issue 7.

Generates 48 fixed prompts (24 with colour/shape pairs seen in training, 24 with pairs held out of it),
once without and once with the LoRA, and reads colour, direction of motion and shape off every video
with the deterministic analyzer of `easyanimate.evaluate`. The demo LoRA changes one attribute: every
object becomes magenta, whatever colour the prompt names; "magenta seen" is, among videos whose prompt asks
for another colour, the fraction that shows a magenta object (the LoRA rows use those 40 prompts).

    python benchmarks/prompt_adherence.py                       # the demo model and its LoRA
    python benchmarks/prompt_adherence.py --model FOLDER --lora FILE:1.0 --json results.json
    python benchmarks/prompt_adherence.py --no-lora
    python benchmarks/prompt_adherence.py --repeats 3            # the same prompts with 3 seed sets (3x the videos)

Targets (held-out pairs, no LoRA): colour >= 90 %, direction >= 80 %, all three >= 60 %;
magenta seen >= 80 % with the LoRA and <= 10 % without; seen pairs, no LoRA: colour >= 75 % (what the
test suite asked of the demo before these checks moved here: 3 of 4 seen prompts in their colour). After the
table, each target is printed next to its figure with PASS or MISS. About 2-4 minutes on 2 CPU cores.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from easyanimate.cli import main  # noqa: E402

# (group, figure, ">=" or "<=", target fraction)
TARGETS = [
    ("held-out pairs, no LoRA", "colour", ">=", 0.90),
    ("held-out pairs, no LoRA", "direction", ">=", 0.80),
    ("held-out pairs, no LoRA", "all_three", ">=", 0.60),
    ("seen pairs, no LoRA", "colour", ">=", 0.75),
    ("other colours, with LoRA", "attribute_seen", ">=", 0.80),
    ("other colours, no LoRA", "attribute_seen", "<=", 0.10),
]


def target_table(groups: dict) -> str:
    """Each target next to its figure, with PASS / MISS (a group not run, e.g. with --no-lora: not run)."""
    lines = ["| videos | figure | value | target | result |", "|---|---|---:|---|---|"]
    for group, figure, op, target in TARGETS:
        name = "magenta seen" if figure == "attribute_seen" else figure.replace("_", " ")
        value = groups.get(group, {}).get(figure)
        if value is None:
            lines.append(f"| {group} | {name} | - | {op.replace('>=', '≥').replace('<=', '≤')} {100 * target:.0f} % | not run |")
            continue
        ok = value >= target if op == ">=" else value <= target
        lines.append(f"| {group} | {name} | {100 * value:.1f} % | {op.replace('>=', '≥').replace('<=', '≤')} "
                     f"{100 * target:.0f} % | {'PASS' if ok else 'MISS'} |")
    return "\n".join(lines)


def run(argv: list[str]) -> int:
    argv = list(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if "--json" not in argv:
            argv += ["--json", str(Path(tmp) / "adherence.json")]
        code = main(["evaluate", *argv])
        if code:
            return code
        groups = json.loads(Path(argv[argv.index("--json") + 1]).read_text())["groups"]
    print("\nTargets\n" + target_table(groups))
    return 0


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
