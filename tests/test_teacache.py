"""TeaCache on a tiny V5.1 release: the skip rule recomputed independently from the recorded calls, skipped calls
skip the blocks and reuse the last computed residual, first and last calls forced, fresh state per run, the
coefficient set chosen from the geometry, bad settings refused before any compute."""
import math

import numpy as np
import pytest
import torch

from easyanimate.errors import EasyAnimateError
from easyanimate.models.embeddings import timestep_sinusoid
from easyanimate.models.mmdit import MMDiTConfig, family_preset
from easyanimate.pipeline import Conditioning, generate, load_model
from easyanimate.teacache import COEFFICIENTS, TeaCache, TeaCacheRun, coefficients_for, record_runs, resolve, running
from release import make_release
from release_v5 import make_release_v51


@pytest.fixture(scope="module")
def v51(tmp_path_factory):
    folder = make_release_v51(tmp_path_factory.mktemp("v51") / "EasyAnimateV5.1-tiny", "t2v")
    return load_model(folder, dtype="fp32", text_encoder=False)


def texts(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = model.transformer.config.text_embed_dim
    return [Conditioning(torch.randn(1, 6, width, generator=g), torch.ones(1, 6)) for _ in range(2)]


def run(model, steps=12, seed=1, **options):
    positive, negative = texts(model)
    return generate(model.transformer, model.vae, positive, negative, frames=5, height=32, width=48, steps=steps,
                    seed=seed, scheduler_config=model.scheduler_config, **options)


def count_calls(module) -> list:
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


def horner(coefficients, r):
    value = 0.0
    for c in coefficients:
        value = value * r + c
    return value


def modulated_input(model, x, timestep, text):
    """Block 0's modulated video input of one call, built here from the model's layers: patch tokens (frame-major,
    then row, column), the projected text, the timestep embedding, then block 0's norm1."""
    b, _, f, h, w = x.shape
    tokens = model.proj(x.transpose(1, 2).reshape(b * f, -1, h, w))  # (b f, D, h/2, w/2)
    tokens = tokens.reshape(b, f, *tokens.shape[1:]).permute(0, 1, 3, 4, 2).reshape(b, -1, tokens.shape[1])
    temb = model.time_embedding(timestep_sinusoid(timestep.to(model.dtype), tokens.shape[-1]))
    return model.transformer_blocks[0].norm1(tokens, model.text_proj(text), temb)[0]


def reference_decisions(modulated, threshold, coefficients):
    """The reference's rule in float64: first and last call computed with the accumulator reset; otherwise the
    relative L1 change, rescaled by the polynomial, added up; below the threshold the call is skipped."""
    decisions, distances, accumulated, previous = [], [], 0.0, None
    for index, current in enumerate(modulated):
        current = current.double().numpy()
        if index in (0, len(modulated) - 1):
            compute, accumulated, distance = True, 0.0, None
        else:
            distance = np.abs(current - previous).mean() / np.abs(previous).mean()
            accumulated += horner(coefficients, distance)
            compute = accumulated >= threshold
            if compute:
                accumulated = 0.0
        decisions.append(compute)
        distances.append(distance)
        previous = current
    return decisions, distances


def test_threshold_zero_skips_nothing_and_equals_the_plain_run_bit_for_bit(v51):
    """With a polynomial that is never negative (here P(r) = r), threshold 0 computes every call. (The released
    polynomials turn negative for large changes, see test_large_changes_are_skipped_as_the_reference_skips_them.)"""
    plain = run(v51)
    blocks = count_calls(v51.transformer.transformer_blocks[0])
    with record_runs() as runs:
        cached = run(v51, teacache=TeaCache(0.0, coefficients=(1.0, 0.0)))
    assert runs[0].decisions == [True] * 12 and len(blocks) == 12
    assert torch.equal(cached, plain)


def test_skip_decisions_match_an_independent_recomputation(v51):
    transformer = v51.transformer
    recorded = []
    hook = transformer.register_forward_pre_hook(lambda m, args, kwargs: recorded.append(args[:3]), with_kwargs=True)
    blocks = [count_calls(block) for block in transformer.transformer_blocks]
    norm_out = count_calls(transformer.norm_out)
    threshold = 0.1
    with record_runs() as runs:
        run(v51, teacache=threshold)
    hook.remove()
    (cache,) = runs
    with torch.no_grad():
        modulated = [modulated_input(transformer, *call) for call in recorded]
    decisions, distances = reference_decisions(modulated, threshold, COEFFICIENTS["v5.1-12b"])
    assert cache.decisions == decisions
    assert 0 < cache.skipped_calls < 10  # both paths taken
    for ours, theirs in zip(cache.distances, distances):
        assert (ours is None) == (theirs is None) and (ours is None or math.isclose(ours, theirs, rel_tol=1e-5))
    assert all(len(calls) == cache.computed_calls for calls in blocks) and len(norm_out) == cache.computed_calls


def test_large_changes_are_skipped_as_the_reference_skips_them(v51):
    """The 12B polynomial is negative above r ≈ 0.806: a call whose input changed that much lowers the accumulator,
    so the reference skips it even at threshold 0. The tiny random model changes that much between steps."""
    coefficients = COEFFICIENTS["v5.1-12b"]
    assert horner(coefficients, 0.8) > 0 > horner(coefficients, 0.81)
    with record_runs() as runs:
        run(v51, teacache=0.0)
    (cache,) = runs
    negative = [i for i, d in enumerate(cache.distances) if d is not None and horner(coefficients, d) < 0]
    assert negative and not all(cache.decisions)
    assert not cache.decisions[negative[0]]


def test_a_skipped_call_adds_the_last_computed_residual_to_its_tokens(v51):
    """Three calls, the middle one skipped: its output is proj_out(tokens_2 + (norm_out_1 − tokens_1)),
    unpatchified; the first and last equal plain calls."""
    transformer = v51.transformer
    g = torch.Generator().manual_seed(5)
    text = torch.randn(1, 6, transformer.config.text_embed_dim, generator=g)
    calls = [(torch.randn(1, 16, 2, 4, 6, generator=g), torch.tensor([t])) for t in (900.0, 800.0, 700.0)]
    seen = {}
    hooks = [transformer.proj.register_forward_hook(lambda m, a, out: seen.__setitem__("patches", out)),
             transformer.proj_out.register_forward_pre_hook(lambda m, a: seen.__setitem__("normed", a[0]))]
    plain, tokens, normed = [], [], []
    with torch.no_grad():
        for x, t in calls:
            plain.append(transformer(x, t, text))
            patches = seen["patches"]  # (frames, D, h, w) for batch 1
            tokens.append(patches.permute(0, 2, 3, 1).reshape(1, -1, patches.shape[1]))
            normed.append(seen["normed"])
        for hook in hooks:
            hook.remove()
        cache = TeaCacheRun(TeaCache(1e9, COEFFICIENTS["v5.1-12b"]), calls=3)
        with running(cache):
            cached = [transformer(x, t, text) for x, t in calls]
        out = transformer.proj_out(tokens[1] + (normed[0] - tokens[0]))  # (1, F*h*w, 2*2*16), channel-major
        expected = out.reshape(1, 2, 2, 3, 16, 2, 2).permute(0, 4, 1, 2, 5, 3, 6).reshape(1, 16, 2, 4, 6)
    assert cache.decisions == [True, False, True]
    assert torch.equal(cached[0], plain[0]) and torch.equal(cached[2], plain[2])
    torch.testing.assert_close(cached[1], expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(cached[1], plain[1])


def test_first_and_last_calls_are_always_computed(v51):
    blocks = count_calls(v51.transformer.transformer_blocks[-1])
    with record_runs() as runs:
        run(v51, steps=6, teacache=1e9)
    assert runs[0].decisions == [True, False, False, False, False, True]
    assert len(blocks) == 2


def test_state_is_fresh_per_run_and_sized_by_the_steps_actually_run(v51):
    with record_runs() as runs:
        first = run(v51, teacache=0.3)
        run(v51, seed=7, teacache=0.3)
        again = run(v51, teacache=0.3)
    assert torch.equal(first, again) and runs[0].decisions == runs[2].decisions
    assert len({id(r) for r in runs}) == 3
    g = torch.Generator().manual_seed(2)
    video = torch.rand(1, 3, 5, 32, 48, generator=g)
    with record_runs() as runs:
        run(v51, steps=8, video=video, strength=0.5, teacache=1e9)  # the last 4 of 8 steps run
    assert runs[0].calls == 4 and runs[0].decisions == [True, False, False, True]


def test_a_run_refuses_more_calls_than_it_was_sized_for(v51):
    transformer = v51.transformer
    x, text = torch.randn(1, 16, 1, 4, 6), torch.randn(1, 6, transformer.config.text_embed_dim)
    cache = TeaCacheRun(TeaCache(0.1, COEFFICIENTS["v5.1-12b"]), calls=1)
    with torch.no_grad(), running(cache):
        transformer(x, torch.tensor([500.0]), text)
        with pytest.raises(EasyAnimateError, match="set up for 1 transformer calls"):
            transformer(x, torch.tensor([400.0]), text)


def test_coefficients_follow_the_geometry_and_v5_needs_them_given():
    twelve = MMDiTConfig.from_dict(family_preset("v51"), "v51")
    seven = MMDiTConfig.from_dict({**family_preset("v51"), "num_layers": 36, "mmdit_layers": 18}, "v51")
    other = MMDiTConfig.from_dict({**family_preset("v51"), "num_layers": 3, "mmdit_layers": 2}, "v51")
    assert coefficients_for(twelve) == COEFFICIENTS["v5.1-12b"] == (-10.47857366, 8.33844143, -0.78477557,
                                                                     0.68798618, 0.0136149)
    assert coefficients_for(seven) == COEFFICIENTS["v5.1-7b"] == (1.07862322, -4.19362456, 3.06725828,
                                                                  0.33161686, 0.02374758)
    assert coefficients_for(other) == COEFFICIENTS["v5.1-12b"]
    v5 = MMDiTConfig.from_dict(family_preset("v5"), "v5")
    with pytest.raises(EasyAnimateError, match="turns TeaCache off for V5.*v5-7b-inp"):
        resolve(0.1, v5)
    assert resolve(TeaCache(0.1, COEFFICIENTS["v5-7b-inp"]), v5).coefficients == COEFFICIENTS["v5-7b-inp"]
    assert resolve(None, v5) is None


@pytest.mark.parametrize("value,words", [(-0.1, "finite number ≥ 0"), (float("nan"), "finite number ≥ 0"),
                                         ("fast", "finite number ≥ 0"),
                                         (lambda: TeaCache(0.1, (1.0, float("inf"))), "must be finite numbers")],
                         ids=["negative", "nan", "text", "coefficients"])
def test_bad_settings_are_refused_before_any_compute(v51, value, words):
    calls = count_calls(v51.transformer)
    with pytest.raises(EasyAnimateError, match=words):
        run(v51, teacache=value() if callable(value) else value)
    assert calls == []


def test_v1_to_v3_models_refuse_teacache(tmp_path):
    v3 = load_model(make_release(tmp_path / "v3", "v3"), dtype="fp32", text_encoder=False)
    text = Conditioning(torch.randn(1, 120, v3.transformer.config.caption_channels), torch.ones(1, 120))
    with pytest.raises(EasyAnimateError, match="TeaCache is implemented for the EasyAnimate V5.1"):
        generate(v3.transformer, v3.vae, text, text, frames=8, height=32, width=32, steps=1, teacache=0.1)
