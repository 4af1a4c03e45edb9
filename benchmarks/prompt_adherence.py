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
magenta seen >= 80 % with the LoRA and <= 10 % without. About 2-4 minutes on 2 CPU cores.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from easyanimate.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
