"""Synthetic video-language data for MuLTI, built on `easyanimate.train.synthetic`.

Each clip is one shape moving in a straight line, fully described by five attributes:

    colour      red yellow green cyan blue magenta      (synthetic.COLOURS)
    shape       circle square triangle star             (synthetic.SHAPES)
    direction   left right up down                      (synthetic.DIRECTIONS)
    background  black gray white brown                  (synthetic's two + two more, so every
                                                         multiple-choice question has 4 options)
    speed       slow fast                               (pixels per frame, two separated ranges)

From the attributes come: captions ("a red circle moving left slowly on a black background"),
multiple-choice questions with 4 word options ("what colour is the shape?" red / blue / ...),
open-ended questions with a one-word answer, multi-label tags (one per attribute value), MCM items
for pretraining (template question + 4 captions), and retrieval galleries with distinct captions.

Splits: the evaluation set (`eval_clips`) mixes the synthetic module's `HELD_OUT_PAIRS` colour/shape
pairs and the other ("seen") pairs, drawn from a seed range that training never uses, with distinct
(colour, shape, direction, background) per clip, so every gallery caption is unique and R@1 is well
defined. Training clips show only seen pairs (`train_clips`), unless `held_out_pairs=True`: a scorer
for the demo model's videos must know every prompt it can be given, held-out ones included (a model
that never saw them answers 0 % of their shape questions: it learns which shapes each colour never has).

Clips are pure functions of their `MultiClip`, and `MultiClip`s of a seed (python's `random.Random`).
`render_dataset` writes the rendered clips once as uint8 (`clips.npy`, N x F x H x W x 3) plus
`specs.jsonl` into a folder; training memory-maps that file.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..train import synthetic as syn

COLOURS = tuple(syn.COLOURS)
SHAPES = tuple(syn.SHAPES)
DIRECTIONS = tuple(syn.DIRECTIONS)
BACKGROUND_RGB = {**syn.BACKGROUNDS, "white": (1.0, 1.0, 1.0), "brown": (0.45, 0.28, 0.12)}
BACKGROUNDS = tuple(BACKGROUND_RGB)
# Pixels per frame as a fraction of the frame size; 16 frames travel 18-28 % (slow) or 42-52 % (fast).
SPEED_RANGES = {"slow": (0.012, 0.018), "fast": (0.028, 0.034)}
SPEEDS = tuple(SPEED_RANGES)
SPEED_ADVERBS = {"slow": "slowly", "fast": "quickly"}
ATTRIBUTES = {"colour": COLOURS, "shape": SHAPES, "direction": DIRECTIONS, "background": BACKGROUNDS,
              "speed": SPEEDS}
HELD_OUT_PAIRS = syn.HELD_OUT_PAIRS

CAPTION_TEMPLATES = (
    "a {colour} {shape} moving {direction} {adverb} on a {background} background",
    "a {colour} {shape} moves {direction} {adverb} over a {background} background",
    "{background} background, a {colour} {shape} going {direction} {adverb}",
)

# Multiple-choice questions (4 word options, the true attribute among them) and open-ended questions
# (answer: one word of `ANSWERS`). Speed has two values, so it is asked open-ended only.
MC_QUESTIONS = {
    "colour": "what colour is the shape?",
    "shape": "what shape is it?",
    "direction": "which way does it move?",
    "background": "what is the background?",
}
MC_TYPES = tuple(MC_QUESTIONS)
OPEN_QUESTIONS = {**MC_QUESTIONS, "speed": "how fast does it move?"}
OPEN_TYPES = tuple(OPEN_QUESTIONS)
# Pretraining MCM (multiple-choice modelling): a template question, 4 captions as options.
MCM_QUESTIONS = ("what does the video show?", "which description matches the video?",
                 "what is happening in the video?")
# Tagging reads the video with this fixed text (the model always fuses the video with some text).
TAG_PROMPT = ""
TAGS = tuple(f"{v}" for values in ATTRIBUTES.values() for v in values)
ANSWERS = TAGS  # every attribute value is also an open-QA answer

# Seeds: training data uses `seed` itself; evaluation sets add this offset so they never overlap.
EVAL_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class MultiClip:
    colour: str
    shape: str
    direction: str
    background: str
    speed: str  # "slow" | "fast"
    radius: float  # pixels, half the shape's width
    step: float  # pixels per frame
    x0: float
    y0: float
    template: int = 0

    def centre(self, frame: int) -> tuple[float, float]:
        dx, dy = syn.DIRECTIONS[self.direction]
        return self.x0 + dx * self.step * frame, self.y0 + dy * self.step * frame

    def attributes(self) -> dict:
        return {k: getattr(self, k) for k in ATTRIBUTES}

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def held_out(self) -> bool:
        return (self.colour, self.shape) in HELD_OUT_PAIRS


def seen_pairs() -> list[tuple[str, str]]:
    return [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELD_OUT_PAIRS]


def sample_clip(rng: random.Random, *, frames: int = 16, size: int = 64, pairs=None, **fixed) -> MultiClip:
    """A random clip that stays inside the frame for `frames` frames; attributes in `fixed` are kept."""
    if "colour" not in fixed or "shape" not in fixed:
        colour, shape = rng.choice(pairs or seen_pairs())
        fixed.setdefault("colour", colour)
        fixed.setdefault("shape", shape)
    direction = fixed.get("direction") or rng.choice(DIRECTIONS)
    background = fixed.get("background") or rng.choice(BACKGROUNDS)
    speed = fixed.get("speed") or rng.choice(SPEEDS)
    radius = rng.uniform(0.14, 0.18) * size
    step = rng.uniform(*SPEED_RANGES[speed]) * size
    x0, y0 = syn.start_position(rng, direction, radius, step * (frames - 1), size)
    template = fixed.get("template")
    if template is None:
        template = rng.randrange(len(CAPTION_TEMPLATES))
    return MultiClip(fixed["colour"], fixed["shape"], direction, background, speed, radius, step, x0, y0, template)


def render(clip: MultiClip, frames: int = 16, size: int = 64) -> np.ndarray:
    """(frames, size, size, 3) uint8; the synthetic module's anti-aliased shapes on any background."""
    s = syn.SUPERSAMPLE
    grid = (np.arange(size * s) + 0.5) / s
    background = np.array(BACKGROUND_RGB[clip.background], dtype=np.float32)
    colour = np.array(syn.COLOURS[clip.colour], dtype=np.float32)
    video = np.empty((frames, size, size, 3), dtype=np.float32)
    for f in range(frames):
        cx, cy = clip.centre(f)
        xs, ys = np.broadcast_arrays((grid[None, :] - cx) / clip.radius, (grid[:, None] - cy) / clip.radius)
        coverage = syn.shape_mask(clip.shape, xs, ys).astype(np.float32)
        coverage = coverage.reshape(size, s, size, s).mean(axis=(1, 3))[..., None]
        video[f] = background * (1 - coverage) + colour * coverage
    return np.round(video * 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------ text
def caption(clip, template: int | None = None, **replace) -> str:
    """The clip's caption; `replace` swaps attributes (e.g. colour="blue") for distractor captions."""
    attrs = {**(clip.attributes() if isinstance(clip, MultiClip) else clip), **replace}
    text = CAPTION_TEMPLATES[(clip.template if isinstance(clip, MultiClip) else 0) if template is None else template]
    return text.format(colour=attrs["colour"], shape=attrs["shape"], direction=attrs["direction"],
                       background=attrs["background"], adverb=SPEED_ADVERBS[attrs["speed"]])


def swapped_caption(clip: MultiClip, rng: random.Random, avoid=()) -> str:
    """A caption of `clip` with one attribute replaced by another value (a fine-grained distractor)."""
    for _ in range(20):
        name = rng.choice(list(ATTRIBUTES))
        value = rng.choice([v for v in ATTRIBUTES[name] if v != getattr(clip, name)])
        text = caption(clip, **{name: value})
        if text not in avoid:
            return text
    return text


def mc_question(clip: MultiClip, kind: str, rng: random.Random) -> tuple[str, list[str], int]:
    """(question, 4 options, index of the true one) for question type `kind` in MC_TYPES."""
    truth = getattr(clip, kind)
    options = rng.sample([v for v in ATTRIBUTES[kind] if v != truth], 3) + [truth]
    rng.shuffle(options)
    return MC_QUESTIONS[kind], options, options.index(truth)


def open_question(clip: MultiClip, kind: str) -> tuple[str, str]:
    """(question, one-word answer) for question type `kind` in OPEN_TYPES."""
    return OPEN_QUESTIONS[kind], getattr(clip, kind)


def tag_vector(clip: MultiClip, tags=TAGS) -> np.ndarray:
    values = set(clip.attributes().values())
    return np.array([t in values for t in tags], dtype=np.float32)


def vocabulary_words() -> list[str]:
    """Every word the captions, questions, options, answers and templates use (the tokenizer's vocabulary)."""
    texts = [t.format(colour="", shape="", direction="", background="", adverb="") for t in CAPTION_TEMPLATES]
    texts += list(MC_QUESTIONS.values()) + list(OPEN_QUESTIONS.values()) + list(MCM_QUESTIONS)
    texts += [v for values in ATTRIBUTES.values() for v in values] + list(SPEED_ADVERBS.values())
    return texts


# ------------------------------------------------------------------------------------------ sets
def all_pairs() -> list[tuple[str, str]]:
    return [(c, s) for c in COLOURS for s in SHAPES]


def train_clips(count: int, seed: int, *, frames: int = 16, size: int = 64,
                held_out_pairs: bool = False) -> list[MultiClip]:
    """`count` random clips: of seen colour/shape pairs only, or with `held_out_pairs` of every pair."""
    rng = random.Random(seed)
    pairs = all_pairs() if held_out_pairs else seen_pairs()
    return [sample_clip(rng, frames=frames, size=size, pairs=pairs) for _ in range(count)]


def eval_clips(count: int = 128, seed: int = 0, *, held_out_fraction: float = 0.5, frames: int = 16,
               size: int = 64) -> list[MultiClip]:
    """`count` evaluation clips with distinct (colour, shape, direction, background), canonical captions
    (template 0): `held_out_fraction` of them show held-out colour/shape pairs, the rest seen pairs; all
    from seeds that training data never uses."""
    rng = random.Random(EVAL_SEED_OFFSET + seed)
    held = [(c, s, d, b) for (c, s) in sorted(HELD_OUT_PAIRS) for d in DIRECTIONS for b in BACKGROUNDS]
    seen = [(c, s, d, b) for (c, s) in seen_pairs() for d in DIRECTIONS for b in BACKGROUNDS]
    n_held = min(len(held), round(count * held_out_fraction))
    if count - n_held > len(seen):
        raise ValueError(f"at most {len(held) + len(seen)} distinct evaluation clips")
    combos = rng.sample(held, n_held) + rng.sample(seen, count - n_held)
    return [sample_clip(rng, frames=frames, size=size, colour=c, shape=s, direction=d, background=b, template=0)
            for c, s, d, b in combos]


def render_dataset(folder, clips: list[MultiClip], *, frames: int = 16, size: int = 64, progress=None) -> Path:
    """Render `clips` once into `folder` (clips.npy uint8 (N, F, H, W, 3), specs.jsonl, meta.json)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "clips.tmp.npy"
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(clips), frames, size, size, 3))
    for i, clip in enumerate(clips):
        out[i] = render(clip, frames, size)
        if progress:
            progress(1)
    out.flush()
    del out
    tmp.replace(folder / "clips.npy")
    with open(folder / "specs.jsonl", "w") as f:
        for clip in clips:
            f.write(json.dumps(clip.as_dict()) + "\n")
    (folder / "meta.json").write_text(json.dumps({"count": len(clips), "frames": frames, "size": size}) + "\n")
    return folder


def load_dataset(folder) -> tuple[np.ndarray, list[MultiClip]]:
    """(clips uint8 memory map (N, F, H, W, 3), specs) from `render_dataset`'s folder."""
    folder = Path(folder)
    clips = np.load(folder / "clips.npy", mmap_mode="r")
    specs = [MultiClip(**json.loads(line)) for line in (folder / "specs.jsonl").read_text().splitlines()]
    if len(specs) != len(clips):
        raise ValueError(f"'{folder}': {len(clips)} clips but {len(specs)} specs")
    return clips, specs


def cached_dataset(folder, clips: list[MultiClip], *, frames: int = 16, size: int = 64, progress=None):
    """`load_dataset(folder)` if it holds exactly `clips`, else render them there first."""
    folder = Path(folder)
    if (folder / "specs.jsonl").is_file() and (folder / "clips.npy").is_file():
        data, specs = load_dataset(folder)
        if specs == list(clips) and data.shape[1:] == (frames, size, size, 3):
            return data, specs
    render_dataset(folder, clips, frames=frames, size=size, progress=progress)
    return load_dataset(folder)
