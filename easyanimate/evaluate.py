"""Prompt adherence: does a generated video show what its prompt asks?

A deterministic frame analyzer reads three attributes off a video of one object on a plain background:

    colour     the hue of the object's pixels, nearest of red/yellow/green/cyan/blue/magenta
    direction  the sign and axis of the object's centroid motion over the clip (or "none")
    shape      which outline (circle, square, triangle, star), placed on the object's centroid, scaled to
               its area and blurred as much as fits best, explains the object's soft coverage best

`evaluate_model` generates a fixed list of prompts (colour/shape pairs seen in training and pairs held
out of it) and scores each attribute against the prompt; with a LoRA it also counts how often the
LoRA's attribute (for the demo LoRA: a magenta object) appears. `benchmarks/prompt_adherence.py` prints the table.

Two sampling-free diagnostics explain a low score: `caption_sensitivity` (does the transformer's noise
prediction get worse when one attribute word of the caption is swapped? a word it ignores, it cannot follow)
and `latent_motion_profile` (how the VAE's latent frames carry an object's motion);
`benchmarks/caption_sensitivity.py` prints both.
"""
from __future__ import annotations

import colorsys
import time
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from typing import Sequence

import numpy as np

from .train.synthetic import (BACKGROUNDS, BASE_SHAPES, COLOURS, DIRECTIONS, HELD_OUT_PAIRS, SHAPES, prompt_for,
                              shape_mask, training_pairs)

HUES = {name: colorsys.rgb_to_hsv(*rgb)[0] * 360 for name, rgb in COLOURS.items()}
OBJECT_THRESHOLD = 0.3  # max channel difference from the background that counts as object
MIN_AREA = 12  # pixels; smaller blobs are noise
MIN_TRAVEL = 0.08  # fraction of the frame size the centroid must travel to count as motion


@dataclass
class Analysis:
    colour: str | None
    direction: str | None
    shape: str | None
    background: str | None
    frames_with_object: int
    travel: tuple[float, float] = (0.0, 0.0)  # centroid displacement over the clip (x, y), pixels
    shape_scores: dict = field(default_factory=dict)  # fitting error per shape (lower = better)


def analyze_video(video) -> Analysis:
    """`video`: (F, H, W, 3) in [0, 1] (numpy or torch, or uint8), one object on a plain background."""
    video = _as_float_frames(video)
    frames, height, width, _ = video.shape
    background = np.median(np.concatenate([video[:, 0], video[:, -1], video[:, :, 0], video[:, :, -1]], axis=1)
                           .reshape(-1, 3), axis=0)
    difference = np.abs(video - background).max(axis=-1)
    masks = [_largest_component(m) for m in difference > OBJECT_THRESHOLD]
    present = [f for f in range(frames) if masks[f].sum() >= MIN_AREA]
    bg_name = min(BACKGROUNDS, key=lambda n: np.abs(np.array(BACKGROUNDS[n]) - background).sum())
    if not present:
        return Analysis(None, None, None, bg_name, 0)

    pixels = np.concatenate([video[f][masks[f]] for f in present])
    colour = _nearest_colour(pixels.mean(axis=0))

    centroids = np.array([[np.nonzero(masks[f])[1].mean(), np.nonzero(masks[f])[0].mean()] for f in present])
    if len(present) >= 2:
        slope = np.polyfit(np.array(present, dtype=float), centroids, 1)[0]  # pixels per frame, (x, y)
        travel = slope * (frames - 1)
    else:
        travel = np.zeros(2)
    if np.abs(travel).max() < MIN_TRAVEL * max(height, width):
        direction = "none"
    elif abs(travel[0]) >= abs(travel[1]):
        direction = "right" if travel[0] > 0 else "left"
    else:
        direction = "down" if travel[1] > 0 else "up"

    scores = _shape_scores(difference, masks, present)
    shape = min(scores, key=scores.get)
    return Analysis(colour, direction, shape, bg_name, len(present), (float(travel[0]), float(travel[1])),
                    {k: round(v, 3) for k, v in scores.items()})


def _as_float_frames(video) -> np.ndarray:
    if hasattr(video, "detach"):
        video = video.detach().cpu().float().numpy()
    video = np.asarray(video)
    if video.dtype == np.uint8:
        video = video.astype(np.float32) / 255
    if video.ndim == 5:  # (1, 3, F, H, W) as the pipeline returns it
        video = video[0].transpose(1, 2, 3, 0)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"expected a video (F, H, W, 3) or (1, 3, F, H, W); got shape {video.shape}")
    return video.astype(np.float32)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = ndimage.sum(mask, labels, index=range(1, count + 1))
    return labels == (1 + int(np.argmax(sizes)))


def _nearest_colour(rgb) -> str | None:
    hue, saturation, value = colorsys.rgb_to_hsv(*[float(c) for c in np.clip(rgb, 0, 1)])
    if saturation < 0.25 or value < 0.2:
        return None
    hue *= 360
    return min(HUES, key=lambda n: min(abs(hue - HUES[n]), 360 - abs(hue - HUES[n])))


SHAPE_FIT_FRAMES = 8  # frames (evenly spread over those with an object) used to fit the outline
BLURS = (0.0, 1.0, 2.0, 3.0)  # pixels: a decoder may draw a sharp or a soft edge


def _shape_scores(difference: np.ndarray, masks, present) -> dict[str, float]:
    """Mean squared error of the best fit of each outline to the object's soft coverage (lower = better).

    Each outline is placed with its centroid on the object's, scaled to the object's area, and blurred
    by each of `BLURS`; the best blur counts. Blurring keeps area, so a soft-edged square still fits a
    square better than a circle of the same area, and a sharp one fits at blur 0.
    """
    chosen = [present[i] for i in np.linspace(0, len(present) - 1, min(SHAPE_FIT_FRAMES, len(present))).astype(int)]
    totals = {shape: 0.0 for shape in SHAPES}
    for f in chosen:
        coverage = _coverage(difference[f], masks[f])
        for shape, error in _fit_outlines(coverage).items():
            totals[shape] += error / len(chosen)
    return totals


def _coverage(difference: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """How much of each pixel the object covers, 0..1: the colour difference over the object's full contrast,
    kept only near the object (its mask grown by 3 pixels, so soft edges count and far-away noise does not)."""
    from scipy import ndimage

    contrast = np.percentile(difference[mask], 90) if mask.any() else 1.0
    near = ndimage.binary_dilation(mask, iterations=3)
    return np.clip(difference / max(contrast, 1e-6), 0, 1) * near


def _fit_outlines(coverage: np.ndarray) -> dict[str, float]:
    from scipy import ndimage

    height, width = coverage.shape
    area = coverage.sum()
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    cx, cy = (coverage * xs).sum() / area, (coverage * ys).sum() / area
    errors = {}
    for shape in SHAPES:
        unit_area, (ux, uy) = _unit_outline_stats(shape)
        radius = np.sqrt(area / unit_area)
        template = _draw(shape, (xs - cx) / radius + ux, (ys - cy) / radius + uy)
        errors[shape] = min(float(np.mean(((ndimage.gaussian_filter(template, b) if b else template) - coverage) ** 2))
                            for b in BLURS)
    return errors


def _draw(shape: str, ux: np.ndarray, uy: np.ndarray, supersample: int = 3) -> np.ndarray:
    """Coverage of `shape` at pixel grid coordinates given in its unit box, anti-aliased."""
    step = (ux[0, 1] - ux[0, 0]) if ux.shape[1] > 1 else 1.0
    offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
    total = np.zeros(ux.shape)
    for oy in offsets:
        for ox in offsets:
            total += shape_mask(shape, ux + ox * step, uy + oy * step)
    return total / supersample**2


_UNIT_STATS: dict = {}


def _unit_outline_stats(shape: str) -> tuple[float, tuple[float, float]]:
    """Area of the outline in its unit box (in unit-radius squared) and its centroid."""
    if shape not in _UNIT_STATS:
        grid = (np.arange(400) + 0.5) / 200 - 1
        gx, gy = np.meshgrid(grid, grid)
        inside = shape_mask(shape, gx, gy)
        _UNIT_STATS[shape] = (inside.mean() * 4, (float(gx[inside].mean()), float(gy[inside].mean())))
    return _UNIT_STATS[shape]


# ------------------------------------------------------------------------------------ the prompt set
@dataclass(frozen=True)
class PromptCase:
    colour: str
    shape: str
    direction: str
    background: str
    held_out: bool
    seed: int

    @property
    def prompt(self) -> str:
        return prompt_for(self.colour, self.shape, self.direction, self.background)


REPEAT_SEED_STEP = 5000  # repeat k of the prompt set uses seeds 1000 + 5000 k onwards


def prompt_cases(repeats: int = 1) -> list[PromptCase]:
    """48 fixed cases: the 12 seen colour/shape pairs x 2 directions, the 6 held-out pairs x 4 directions;
    directions and backgrounds rotate so each appears equally often in each group. `repeats` > 1 appends
    the same prompts with other seeds: with 24 videos a group moves in steps of 4.2 %, and a single seed
    set can sit several steps from the model's rate."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    directions, backgrounds = list(DIRECTIONS), list(BACKGROUNDS)
    cases = []
    for i, (colour, shape) in enumerate(training_pairs()):
        for j in range(2):
            d = directions[(i + 2 * j) % 4]
            cases.append(PromptCase(colour, shape, d, backgrounds[(i + j) % 2], False, 1000 + len(cases)))
    for i, (colour, shape) in enumerate(sorted(HELD_OUT_PAIRS)):
        for j, d in enumerate(directions):
            cases.append(PromptCase(colour, shape, d, backgrounds[(i + j) % 2], True, 1000 + len(cases)))
    return [replace(c, seed=c.seed + REPEAT_SEED_STEP * k) for k in range(repeats) for c in cases]


@dataclass
class CaseResult:
    case: PromptCase
    analysis: Analysis
    lora: bool

    @property
    def colour_ok(self) -> bool:
        return self.analysis.colour == self.case.colour

    @property
    def direction_ok(self) -> bool:
        return self.analysis.direction == self.case.direction

    @property
    def shape_ok(self) -> bool:
        return self.analysis.shape == self.case.shape

    @property
    def all_ok(self) -> bool:
        return self.colour_ok and self.direction_ok and self.shape_ok

    def row(self) -> dict:
        return {"prompt": self.case.prompt, "held_out": self.case.held_out, "seed": self.case.seed, "lora": self.lora,
                **{k: v for k, v in asdict(self.analysis).items() if k != "shape_scores"},
                "colour_ok": self.colour_ok, "direction_ok": self.direction_ok, "shape_ok": self.shape_ok}


def evaluate_model(model, cases: Sequence[PromptCase] | None = None, *, lora_stack=(), frames: int = 16,
                   height: int = 64, width: int = 64, steps: int = 20, guidance_scale: float = 6.0,
                   sampler: str = "DPM++", teacache=None, progress=None) -> list[CaseResult]:
    """Generate every case with `model` (an `EasyAnimateModel`), optionally inside a LoRA stack
    [(ResolvedLoRA, strength), ...] and with TeaCache (`teacache`: a threshold or `teacache.TeaCache`, V5/V5.1
    only), and analyse the videos."""
    from contextlib import nullcontext

    from .pipeline import make_video

    cases = list(cases or prompt_cases())
    context = nullcontext()
    if lora_stack:
        from .lora import lora_patches

        context = lora_patches(model.transformer, list(lora_stack))
    results = []
    with context:
        for index, case in enumerate(cases):
            video = make_video(model, case.prompt, "", frames=frames, height=height, width=width, steps=steps,
                               guidance_scale=guidance_scale, sampler=sampler, seed=case.seed, teacache=teacache)
            results.append(CaseResult(case, analyze_video(video), bool(lora_stack)))
            if progress:
                progress(index + 1, len(cases))
    return results


# What the demo LoRA changes: every object becomes magenta, whatever colour the prompt asks for.
LORA_ATTRIBUTE = ("colour", "magenta")


def asks_for(case: PromptCase, attribute=LORA_ATTRIBUTE) -> bool:
    kind, value = attribute
    return getattr(case, kind) == value


def summarize(results: Sequence[CaseResult], attribute=LORA_ATTRIBUTE) -> dict:
    """Accuracies (fractions) of a group of results, and `attribute_seen`: among the videos whose prompt
    does not ask for the LoRA's attribute (e.g. colour magenta), the fraction that shows it anyway."""
    n = len(results)
    if not n:
        return {"videos": 0}
    mean = lambda flags: sum(flags) / n
    kind, value = attribute
    others = [r for r in results if not asks_for(r.case, attribute)]
    return {
        "videos": n,
        "colour": mean(r.colour_ok for r in results),
        "direction": mean(r.direction_ok for r in results),
        "shape": mean(r.shape_ok for r in results),
        "all_three": mean(r.all_ok for r in results),
        "attribute_seen": sum(getattr(r.analysis, kind) == value for r in others) / len(others) if others else float("nan"),
    }


def format_table(groups: dict[str, dict], attribute=LORA_ATTRIBUTE) -> str:
    seen = f"{attribute[1]} seen*"
    header = f"| {'videos':<34} | {'n':>3} | {'colour':>7} | {'direction':>9} | {'shape':>7} | {'all three':>9} | {seen:>13} |"
    lines = [header, "|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|"]
    for name, s in groups.items():
        if not s.get("videos"):
            continue
        pct = lambda v: f"{100 * v:6.1f}%" if v == v else "    n/a"
        lines.append(f"| {name:<34} | {s['videos']:>3} | {pct(s['colour']):>7} | {pct(s['direction']):>9} | "
                     f"{pct(s['shape']):>7} | {pct(s['all_three']):>9} | {pct(s['attribute_seen']):>13} |")
    lines.append(f"* {seen[:-1]}: among videos whose prompt asks for another {attribute[0]}, the fraction showing "
                 f"{attribute[0]} {attribute[1]} (the LoRA's attribute).")
    return "\n".join(lines)


def adherence_report(model, lora_path=None, lora_strength: float = 1.0, progress=None, repeats: int = 1,
                     **options) -> tuple[str, dict]:
    """Run the whole evaluation (with and without the LoRA when given) on `prompt_cases(repeats)`;
    returns (table, data)."""
    from .teacache import record_runs

    started = time.time()
    cases = prompt_cases(repeats)
    with record_runs() as teacache_runs:
        base = evaluate_model(model, cases, progress=progress, **options)
        with_lora = None
        if lora_path is not None:
            from .lora import resolve_lora

            resolved = resolve_lora(str(lora_path), model.transformer)
            with_lora = evaluate_model(model, [c for c in cases if not asks_for(c)],
                                       lora_stack=[(resolved, lora_strength)], progress=progress, **options)
    groups = {
        "seen pairs, no LoRA": summarize([r for r in base if not r.case.held_out]),
        "held-out pairs, no LoRA": summarize([r for r in base if r.case.held_out]),
    }
    rows = [r.row() for r in base]
    if with_lora is not None:
        groups["other colours, no LoRA"] = summarize([r for r in base if not asks_for(r.case)])
        groups["other colours, with LoRA"] = summarize(with_lora)
        rows += [r.row() for r in with_lora]
    data = {"groups": groups, "videos": rows, "seconds": round(time.time() - started, 1),
            "options": {**{k: asdict(v) if is_dataclass(v) else v for k, v in options.items()}, "repeats": repeats}}
    if teacache_runs:  # TeaCache on: how many of the transformer calls it computed
        data["transformer_calls"] = {"computed": sum(run.computed_calls for run in teacache_runs),
                                     "scheduled": sum(len(run.decisions) for run in teacache_runs)}
    return format_table(groups), data


# ------------------------------------------------------------------------------------ caption sensitivity
SENSITIVITY_ATTRIBUTES = ("colour", "shape", "direction", "background")
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def swapped_caption(spec, attribute: str) -> str:
    """The clip's caption (template 0) with one attribute word replaced: the next colour in hue order, the
    next base shape, the opposite direction, the other background."""
    values = {"colour": spec.colour, "shape": spec.shape, "direction": spec.direction, "background": spec.background}
    if attribute == "colour":
        names = list(COLOURS)
        values["colour"] = names[(names.index(spec.colour) + 1) % len(names)]
    elif attribute == "shape":
        values["shape"] = BASE_SHAPES[(BASE_SHAPES.index(spec.shape) + 1) % len(BASE_SHAPES)]
    elif attribute == "direction":
        values["direction"] = OPPOSITE[spec.direction]
    elif attribute == "background":
        values["background"] = next(b for b in BACKGROUNDS if b != spec.background)
    else:
        raise ValueError(f"unknown attribute {attribute!r}; expected one of {SENSITIVITY_ATTRIBUTES}")
    return prompt_for(values["colour"], values["shape"], values["direction"], values["background"])


def _synthetic_clips(count: int, seed: int, frames: int, size: int):
    """(specs, pixels (N, 3, F, H, W) in [-1, 1]) of `count` clips of seen colour/shape pairs, through
    8-bit pixels as a data folder stores them."""
    from .train.data import to_model_pixels
    from .train.synthetic import make_specs, render_clip

    specs = make_specs(count, seed, frames=frames, size=size)
    videos = np.stack([np.round(render_clip(s, frames, size) * 255).astype(np.uint8) for s in specs])
    return specs, to_model_pixels(videos)


def caption_sensitivity(model, *, clips: int = 48, seed: int = 11, timesteps: Sequence[int] = (300, 600, 800),
                        modes: Sequence[str] = ("text-to-video", "image-to-video"), frames: int = 16,
                        size: int = 64) -> dict:
    """Does the transformer use each word of its caption? For synthetic clips with known attributes (seen
    colour/shape pairs, seeds training never uses): the noise-prediction error with the true caption, and
    its relative rise when one attribute word is swapped (same clip, noise and timestep). A word the model
    ignores rises by ~0 %: e.g. a model that cannot tell "left" from "right" in its loss cannot follow them.

    Returns {(mode, t): {"error": mean error with the true caption, attribute: rise in %, ...}}.
    `modes`: "text-to-video" (nothing kept) and/or "image-to-video" (first frame kept, as `generate` builds it)."""
    import torch

    from .pipeline import conditioning_video, inpaint_pixels
    from .train.dit import Diffusion
    from .train.synthetic import caption

    with torch.no_grad():
        transformer, vae = model.transformer, model.vae
        dtype = transformer.dtype
        specs, pixels = _synthetic_clips(clips, seed, frames, size)
        gen = torch.Generator().manual_seed(seed)
        x0 = vae.encode_latents(pixels, generator=gen)

        def inpaint_latents(keep_first: bool) -> torch.Tensor:
            parts = []
            for i in range(len(specs)):
                start = (pixels[i:i + 1, :, 0] + 1) / 2 if keep_first else None
                cond = conditioning_video(frames, size, size, start_images=start)
                parts.append(torch.cat([vae.encode_latents(v, generator=gen) for v in inpaint_pixels(cond)], dim=1))
            return torch.cat(parts)

        prompts = {"true": [caption(s, 0) for s in specs]}
        for attribute in SENSITIVITY_ATTRIBUTES:
            prompts[attribute] = [swapped_caption(s, attribute) for s in specs]
        text = {k: model.text_encoder.encode_prompts(v) for k, v in prompts.items()}

        diffusion = Diffusion()
        size_batch = len(specs)
        zeros_clip = torch.zeros(size_batch, 768, dtype=dtype), torch.zeros(size_batch, 8)
        results = {}
        for mode in modes:
            if mode not in ("text-to-video", "image-to-video"):
                raise ValueError(f"unknown mode {mode!r}; expected text-to-video or image-to-video")
            inpaint = inpaint_latents(mode == "image-to-video").to(dtype)
            for t_value in timesteps:
                t = torch.full((size_batch,), int(t_value))
                noise = torch.randn(x0.shape, generator=gen)
                x_t = diffusion.add_noise(x0, noise, t).to(dtype)
                errors = {}
                for kind, (embeds, mask) in text.items():
                    out = transformer(x_t, t, embeds.to(dtype), mask, inpaint_latents=inpaint,
                                      clip_encoder_hidden_states=zeros_clip[0], clip_attention_mask=zeros_clip[1])
                    errors[kind] = (out[:, :x0.shape[1]].float() - noise).square().mean().item()
                row = {"error": errors["true"]}
                row.update({a: 100 * (errors[a] / errors["true"] - 1) for a in SENSITIVITY_ATTRIBUTES})
                results[(mode, int(t_value))] = row
    return results


def format_sensitivity(results: dict) -> str:
    header = "| caption given to | t | noise error | " + " | ".join(f"{a} swapped" for a in SENSITIVITY_ATTRIBUTES) + " |"
    lines = [header, "|" + "---|" * (3 + len(SENSITIVITY_ATTRIBUTES))]
    for (mode, t), row in results.items():
        cells = " | ".join(f"{row[a]:+.1f}%" for a in SENSITIVITY_ATTRIBUTES)
        lines.append(f"| {mode} | {t} | {row['error']:.5f} | {cells} |")
    return "\n".join(lines)


def latent_motion_profile(vae, *, clips: int = 48, seed: int = 11, frames: int = 16, size: int = 64) -> dict:
    """Where the VAE's latents carry a clip's motion: for synthetic clips moving left/right/up/down, the
    mean step (in latent cells, along the motion) of the object's centroid between consecutive latent
    frames. The centroid weights each latent cell by its distance from the latent background (the median).
    A VAE whose latents follow the object moves it a little at every step; one that only moves it between
    slices puts the motion into the channels of each slice instead, where the transformer must learn to
    write it. Returns {"steps": [mean step per latent frame pair], "clips": n}."""
    import torch

    specs, pixels = _synthetic_clips(clips, seed, frames, size)
    with torch.no_grad():
        latents = vae.encode_latents(pixels, sample=False).float()
    background = latents.flatten(3).median(dim=3).values[..., None, None]
    energy = (latents - background).abs().sum(1)  # (N, F_latent, h, w)
    h, w = energy.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    total = energy.sum((-2, -1))
    centre_x, centre_y = (energy * xs).sum((-2, -1)) / total, (energy * ys).sum((-2, -1)) / total
    along = []
    for i, spec in enumerate(specs):
        dx, dy = DIRECTIONS[spec.direction]
        along.append((centre_x[i].diff() * dx + centre_y[i].diff() * dy).numpy())
    return {"steps": [round(float(v), 3) for v in np.mean(along, axis=0)], "clips": clips}
