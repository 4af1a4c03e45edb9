"""Synthetic clips with exact ground truth: one coloured shape moving in a straight line on a plain background.

    spec = sample_spec(random.Random(3))           # colour, shape, direction, background, size, speed, start
    video = render_clip(spec, frames=16, size=64)   # (16, 64, 64, 3) float32 in [0, 1]
    caption(spec)                                   # "a red circle moving right on a black background"

Every clip is a pure function of its `ClipSpec`, and every spec of a seed, so a data set is reproducible
from its seed alone. Shapes are drawn without rotation (triangles and stars point up) and anti-aliased by
4x supersampling; the frame analyzer in `easyanimate.evaluate` draws the same outlines to recognise them.

Some colour/shape pairs (`HELD_OUT_PAIRS`) never appear in training, and the star only appears in the
LoRA data set: evaluation asks the model for both.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

import numpy as np

# Saturated hues, RGB in [0, 1]. Order = hue order (0, 60, ..., 300 degrees), which the analyzer uses.
COLOURS = {
    "red": (1.0, 0.0, 0.0),
    "yellow": (1.0, 1.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "blue": (0.0, 0.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
}
BACKGROUNDS = {"black": (0.0, 0.0, 0.0), "gray": (0.5, 0.5, 0.5)}
SHAPES = ("circle", "square", "triangle", "star")
BASE_SHAPES = ("circle", "square", "triangle")  # what the base model is trained on; the star is the LoRA's
# Unit steps in image coordinates (x right, y down).
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}

# One pair per colour and two per shape, so every colour and every shape is still seen with others.
HELD_OUT_PAIRS = frozenset({
    ("red", "triangle"), ("yellow", "circle"), ("green", "square"),
    ("cyan", "triangle"), ("blue", "circle"), ("magenta", "square"),
})

CAPTION_TEMPLATES = (
    "a {colour} {shape} moving {direction} on a {background} background",
    "a {colour} {shape} moves {direction} over a {background} background",
    "{background} background, a {colour} {shape} going {direction}",
)
IMAGE_TEMPLATE = "a {colour} {shape} on a {background} background"

# Shapes start near the centre (within CENTRE_JITTER of the frame size along the motion axis) and cover
# TRAVEL_SHARE of the way to the edge they head for. So where a shape is, averaged over the clip, already
# tells its direction ("right" = right of centre): a word-to-layout rule of the kind a small transformer
# learns from captions, as it learns colours. (With shapes anywhere on a path across the frame, the clip's
# average position is the same for every direction, and direction is only the product of word, frame time
# and position; the demo transformer trained 10000 steps on such clips and never used the direction word.)
CENTRE_JITTER = 0.06
TRAVEL_SHARE = (0.8, 1.0)
# `paths="across"` gives those earlier clips (same seed, same clips): a straight path of 35-55 % of the
# frame placed anywhere it fits. The demo's VAE was trained on them.
PATHS = ("outward", "across")

SUPERSAMPLE = 4
STAR_INNER_RATIO = 0.5  # inner / outer radius: a fat star stays recognisable at 64 px


@dataclass(frozen=True)
class ClipSpec:
    colour: str
    shape: str
    direction: str
    background: str
    radius: float  # half the shape's width, pixels
    speed: float  # pixels per frame
    x0: float  # centre at frame 0, pixels
    y0: float
    template: int = 0

    def centre(self, frame: int) -> tuple[float, float]:
        dx, dy = DIRECTIONS[self.direction]
        return self.x0 + dx * self.speed * frame, self.y0 + dy * self.speed * frame

    def as_dict(self) -> dict:
        return asdict(self)


def is_held_out(colour: str, shape: str) -> bool:
    return (colour, shape) in HELD_OUT_PAIRS


def training_pairs(shapes=BASE_SHAPES) -> list[tuple[str, str]]:
    return [(c, s) for c in COLOURS for s in shapes if not is_held_out(c, s)]


def weighted_pairs(pairs, weights: dict[str, int]) -> list[tuple[str, str]]:
    """`pairs` with each pair repeated (its colour's weight) x (its shape's weight) times, so drawing from the
    list picks it that much more often. A fine-tuning set leans on a colour or shape this way while every
    seen pair still appears and no held-out pair is added."""
    unknown = sorted(set(weights) - set(COLOURS) - set(SHAPES))
    if unknown:
        raise ValueError(f"Unknown colour or shape {', '.join(unknown)} in the pair weights: use one of "
                         f"{', '.join(list(COLOURS) + list(SHAPES))}.")
    if any(not isinstance(w, int) or w < 1 for w in weights.values()):
        raise ValueError(f"Pair weights must be whole numbers of at least 1, got {weights}.")
    return [pair for pair in pairs for _ in range(weights.get(pair[0], 1) * weights.get(pair[1], 1))]


def sample_spec(rng: random.Random, *, frames: int = 16, size: int = 64, pairs=None, shape: str | None = None,
                colour: str | None = None, direction: str | None = None, background: str | None = None,
                template: int | None = None, paths: str = "outward") -> ClipSpec:
    """A random clip whose shape stays entirely inside the frame for all `frames` frames; `paths` (PATHS)
    says where its path lies."""
    if paths not in PATHS:
        raise ValueError(f"Unknown path layout '{paths}': use one of {', '.join(PATHS)}.")
    if colour is None or shape is None:
        c, s = rng.choice(pairs or training_pairs())
        colour, shape = colour or c, shape or s
    direction = direction or rng.choice(list(DIRECTIONS))
    background = background or rng.choice(list(BACKGROUNDS))
    radius = rng.uniform(0.14, 0.18) * size
    if paths == "outward":
        x0, y0, travel = outward_path(rng, direction, radius, size)
        speed = travel / max(frames - 1, 1)
    else:
        speed = rng.uniform(0.022, 0.034) * size  # 16 frames travel 35-55 % of the frame
        x0, y0 = start_position(rng, direction, radius, speed * (frames - 1), size)
    if template is None:
        template = 0 if rng.random() < 0.6 else rng.randrange(1, len(CAPTION_TEMPLATES))
    return ClipSpec(colour, shape, direction, background, radius, speed, x0, y0, template)


def start_position(rng: random.Random, direction: str, radius: float, travel: float, size: int) -> tuple[float, float]:
    """A random centre at frame 0 from which a shape of `radius` travels `travel` pixels towards
    `direction` without leaving the frame: along the motion axis the whole path must fit; across it, anywhere."""
    margin = radius + 1
    dx, dy = DIRECTIONS[direction]

    def axis_start(step):
        if step > 0:
            return rng.uniform(margin, size - margin - travel)
        if step < 0:
            return rng.uniform(margin + travel, size - margin)
        return rng.uniform(margin, size - margin)

    return axis_start(dx), axis_start(dy)


def outward_path(rng: random.Random, direction: str, radius: float, size: int) -> tuple[float, float, float]:
    """Start (x, y) near the centre along the motion axis (anywhere across it) and the travel in pixels
    towards `direction` that keeps a shape of `radius` inside the frame."""
    margin = radius + 1
    dx, dy = DIRECTIONS[direction]
    along = size / 2 + rng.uniform(-CENTRE_JITTER, CENTRE_JITTER) * size
    room = (size - margin - along) if (dx or dy) > 0 else (along - margin)
    travel = rng.uniform(*TRAVEL_SHARE) * room
    across = rng.uniform(margin, size - margin)
    return (along, across, travel) if dx else (across, along, travel)


def caption(spec: ClipSpec, template: int | None = None) -> str:
    text = CAPTION_TEMPLATES[spec.template if template is None else template]
    return text.format(colour=spec.colour, shape=spec.shape, direction=spec.direction, background=spec.background)


def image_caption(spec: ClipSpec) -> str:
    return IMAGE_TEMPLATE.format(colour=spec.colour, shape=spec.shape, background=spec.background)


def prompt_for(colour: str, shape: str, direction: str, background: str) -> str:
    return CAPTION_TEMPLATES[0].format(colour=colour, shape=shape, direction=direction, background=background)


# ------------------------------------------------------------------------------------------ drawing
def shape_outline(shape: str) -> np.ndarray | None:
    """Polygon vertices (N, 2) in a unit box [-1, 1]^2 (x right, y down); None for the circle."""
    if shape == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)
    if shape == "triangle":
        return np.array([[0, -1], [1, 1], [-1, 1]], dtype=np.float64)
    if shape == "star":
        angles = -math.pi / 2 + np.arange(10) * math.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, STAR_INNER_RATIO)
        points = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
        # stretch to fill the unit box exactly, as the analyzer's templates are fitted to a bounding box
        low, high = points.min(0), points.max(0)
        return (points - low) / (high - low) * 2 - 1
    if shape == "circle":
        return None
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def shape_mask(shape: str, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Boolean mask of `shape` at points (xs, ys) given in its unit box [-1, 1]^2."""
    outline = shape_outline(shape)
    if outline is None:
        return xs**2 + ys**2 <= 1.0
    return _inside_polygon(outline, xs, ys)


def _inside_polygon(poly: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Even-odd rule, vectorised over the points (works for the non-convex star)."""
    inside = np.zeros(xs.shape, dtype=bool)
    for (x1, y1), (x2, y2) in zip(poly, np.roll(poly, -1, axis=0)):
        crosses = (y1 > ys) != (y2 > ys)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_cross = x1 + (ys - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (xs < x_cross)
    return inside


def render_clip(spec: ClipSpec, frames: int = 16, size: int = 64) -> np.ndarray:
    """(frames, size, size, 3) float32 in [0, 1]; coverage is anti-aliased by supersampling."""
    s = SUPERSAMPLE
    grid = (np.arange(size * s) + 0.5) / s  # supersample centres in pixel units
    background = np.array(BACKGROUNDS[spec.background], dtype=np.float32)
    colour = np.array(COLOURS[spec.colour], dtype=np.float32)
    video = np.empty((frames, size, size, 3), dtype=np.float32)
    for f in range(frames):
        cx, cy = spec.centre(f)
        xs = (grid[None, :] - cx) / spec.radius
        ys = (grid[:, None] - cy) / spec.radius
        xs, ys = np.broadcast_arrays(xs, ys)
        coverage = shape_mask(spec.shape, xs, ys).astype(np.float32)
        coverage = coverage.reshape(size, s, size, s).mean(axis=(1, 3))[..., None]
        video[f] = background * (1 - coverage) + colour * coverage
    return video


def make_specs(count: int, seed: int, *, frames: int = 16, size: int = 64, pairs=None, paths: str = "outward",
               **fixed) -> list[ClipSpec]:
    rng = random.Random(seed)
    return [sample_spec(rng, frames=frames, size=size, pairs=pairs, paths=paths, **fixed) for _ in range(count)]


def write_folder(folder, count: int, seed: int, *, frames: int = 16, size: int = 64, shapes=BASE_SHAPES,
                 force_shape: str | None = None, force_colour: str | None = None, include_held_out: bool = False,
                 paths: str = "outward", weights: dict[str, int] | None = None) -> int:
    """Write `count` clips as a data folder (`clips.npy` uint8 (N, F, H, W, 3) + `captions.txt`, one a line,
    + `specs.jsonl` with the ground truth). `force_shape` draws that shape whatever the caption says (the
    LoRA data: captions name circles, squares and triangles, the pixels show stars); `force_colour` likewise
    paints every object in that colour (the demo LoRA: captions name any colour, the pixels are magenta). `include_held_out`
    also draws the held-out colour/shape pairs (the VAE, which knows nothing of captions, sees everything);
    `paths` is passed to `sample_spec`; `weights` ({colour or shape: n}) draws some pairs more often
    (`weighted_pairs`)."""
    import json
    from pathlib import Path

    pairs = [(c, s) for c in COLOURS for s in shapes] if include_held_out else training_pairs(shapes)
    if weights:
        pairs = weighted_pairs(pairs, weights)  # refuses unknown names before anything is written
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    specs = make_specs(count, seed, frames=frames, size=size, pairs=pairs, paths=paths)
    clips = np.empty((count, frames, size, size, 3), dtype=np.uint8)
    for i, spec in enumerate(specs):
        drawn = ClipSpec(**{**spec.as_dict(), "shape": force_shape or spec.shape, "colour": force_colour or spec.colour})
        clips[i] = np.round(render_clip(drawn, frames, size) * 255).astype(np.uint8)
    np.save(folder / "clips.npy", clips)
    (folder / "captions.txt").write_text("\n".join(caption(s) for s in specs) + "\n")
    (folder / "image_captions.txt").write_text("\n".join(image_caption(s) for s in specs) + "\n")
    with open(folder / "specs.jsonl", "w") as out:
        for spec in specs:
            out.write(json.dumps(spec.as_dict()) + "\n")
    return count


def all_captions() -> list[str]:
    """Every caption the generator can write (all shapes and templates): the tokenizer's vocabulary."""
    texts = []
    for colour in COLOURS:
        for shape in SHAPES:
            for background in BACKGROUNDS:
                texts.append(IMAGE_TEMPLATE.format(colour=colour, shape=shape, background=background))
                for direction in DIRECTIONS:
                    texts += [t.format(colour=colour, shape=shape, direction=direction, background=background)
                              for t in CAPTION_TEMPLATES]
    return texts
