"""The prompt-adherence evaluation: the fixed prompt set, the analyzer on imperfect videos, the table."""
import numpy as np
import pytest
import torch

from easyanimate import evaluate as ev
from easyanimate.train import synthetic as syn


def test_prompt_set_has_seen_and_held_out_cases():
    cases = ev.prompt_cases()
    assert len(cases) == 48 and cases == ev.prompt_cases()
    held = [c for c in cases if c.held_out]
    seen = [c for c in cases if not c.held_out]
    assert len(held) == 24 and len(seen) == 24
    assert {(c.colour, c.shape) for c in held} == set(syn.HELD_OUT_PAIRS)
    assert not {(c.colour, c.shape) for c in seen} & syn.HELD_OUT_PAIRS
    for group in (held, seen):  # every direction and background equally often
        assert sorted({sum(c.direction == d for c in group) for d in syn.DIRECTIONS}) == [6]
        assert sorted({sum(c.background == b for c in group) for b in syn.BACKGROUNDS}) == [12]
    assert cases[0].prompt.startswith("a ") and cases[0].prompt.endswith("background")


def test_repeated_prompt_set_keeps_the_prompts_and_changes_only_the_seeds():
    once, thrice = ev.prompt_cases(), ev.prompt_cases(3)
    assert thrice[:48] == once  # repeat 0 is the table's own prompt set
    assert len(thrice) == 144 and len({c.seed for c in thrice}) == 144
    for k in (1, 2):
        block = thrice[48 * k:48 * (k + 1)]
        assert [c.prompt for c in block] == [c.prompt for c in once]
        assert [c.held_out for c in block] == [c.held_out for c in once]
    with pytest.raises(ValueError, match="at least 1"):
        ev.prompt_cases(0)


def _blurred(video, passes=2):
    out = video.copy()
    for _ in range(passes):  # a 3x3 box blur, as a soft decoder would draw
        padded = np.pad(out, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
        out = sum(padded[:, dy:dy + 64, dx:dx + 64] for dy in range(3) for dx in range(3)) / 9
    return out


def test_analyzer_survives_blur_noise_and_torch_layout():
    rng = np.random.default_rng(0)
    for i, spec in enumerate(syn.make_specs(24, seed=9, pairs=[(c, s) for c in syn.COLOURS for s in syn.SHAPES])):
        video = _blurred(syn.render_clip(spec)) + rng.normal(0, 0.03, (16, 64, 64, 3)).astype(np.float32)
        video = np.clip(video, 0, 1)
        as_pipeline_output = torch.from_numpy(video).permute(3, 0, 1, 2)[None]  # (1, 3, F, H, W)
        result = ev.analyze_video(as_pipeline_output)
        assert (result.colour, result.direction) == (spec.colour, spec.direction), (spec, result)
        assert result.shape == spec.shape or spec.shape in ("star", "triangle"), (spec, result)


def test_summary_and_table():
    case = ev.prompt_cases()[0]
    right = ev.CaseResult(case, ev.Analysis(case.colour, case.direction, case.shape, case.background, 16), False)
    assert case.colour != "magenta"
    wrong = ev.CaseResult(case, ev.Analysis(case.colour, "none", "star", case.background, 16), True)
    summary = ev.summarize([right, wrong])
    assert summary == {"videos": 2, "colour": 1.0, "direction": 0.5, "shape": 0.5, "all_three": 0.5,
                       "attribute_seen": 0.0}
    star = ev.summarize([right, wrong], attribute=("shape", "star"))
    assert star["attribute_seen"] == 0.5
    table = ev.format_table({"seen": summary})
    assert "| seen" in table and "50.0%" in table and "100.0%" in table and "magenta seen" in table


def test_demo_model_follows_a_few_prompts():
    from easyanimate import cli

    if not (cli.demo_model_path() / "transformer").is_dir():
        pytest.skip("demo model not shipped")
    from easyanimate.pipeline import load_model

    model = load_model(cli.demo_model_path(), dtype="fp32")
    defaults = cli.generation_defaults(cli.demo_model_path())
    cases = [c for c in ev.prompt_cases() if not c.held_out][:4]
    results = ev.evaluate_model(model, cases, steps=defaults["steps"], guidance_scale=defaults["guidance_scale"],
                                sampler=defaults["sampler"])
    assert sum(r.colour_ok for r in results) >= 3


def test_swapped_caption_changes_exactly_one_word():
    spec = syn.make_specs(1, seed=3)[0]
    original = syn.caption(spec, 0).split()
    for attribute in ev.SENSITIVITY_ATTRIBUTES:
        swapped = ev.swapped_caption(spec, attribute).split()
        changed = [(a, b) for a, b in zip(original, swapped) if a != b]
        assert len(swapped) == len(original) and len(changed) == 1, (attribute, changed)
        assert changed[0][0] == getattr(spec, attribute)
    assert ev.swapped_caption(spec, "direction").split()[4] == ev.OPPOSITE[spec.direction]
    with pytest.raises(ValueError, match="unknown attribute"):
        ev.swapped_caption(spec, "speed")


def test_caption_sensitivity_sees_that_the_demo_model_reads_colour():
    from easyanimate import cli

    if not (cli.demo_model_path() / "transformer").is_dir():
        pytest.skip("demo model not shipped")
    from easyanimate.pipeline import load_model

    model = load_model(cli.demo_model_path(), dtype="fp32")
    kwargs = dict(clips=6, timesteps=(500,), modes=("text-to-video",))
    results = ev.caption_sensitivity(model, **kwargs)
    assert list(results) == [("text-to-video", 500)]
    row = results[("text-to-video", 500)]
    assert row["error"] > 0 and row["colour"] > 5.0  # a wrong colour word makes its prediction clearly worse
    assert ev.caption_sensitivity(model, **kwargs) == results  # deterministic
    assert "colour swapped" in ev.format_sensitivity(results)


def test_latent_motion_profile_follows_an_ideal_encoder():
    """An 'encoder' that keeps every 4th frame and averages 8x8 pixel cells moves the object by speed x 4 / 8
    cells per latent frame; the profile must measure that, along the direction, for every direction."""

    class PoolingEncoder:
        def encode_latents(self, pixels, sample=True):
            frames = pixels[:, :, ::4]
            return torch.nn.functional.avg_pool3d(frames, (1, 8, 8))

    specs = syn.make_specs(48, seed=11)
    expected = np.mean([s.speed * 4 / 8 for s in specs])
    steps = ev.latent_motion_profile(PoolingEncoder(), clips=48, seed=11)["steps"]
    assert len(steps) == 3
    np.testing.assert_allclose(steps, expected, rtol=0.25)
