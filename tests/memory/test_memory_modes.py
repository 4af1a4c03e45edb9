"""Every memory mode and budget gives the plain run's output (fp8: close), on the reference fixtures and on
tiny random models (easyanimate.memory, the transformer's chunking, the VAE's working set)."""
import copy

import pytest
import torch

from conftest import fixture_cases, fixtures_dir, load_tensors, rel_error, rel_tolerance, transformer_inputs
from easyanimate.host import StandaloneHost
from easyanimate.loading import load_transformer
from easyanimate.memory import (
    FP8_DTYPE, BlockSwap, DeviceManager, Fp8Linear, MemoryOptions, to_fp8, transformer_budget,
)
from easyanimate.models.attention import query_chunks
from tiny import example_inputs, random_model, run

FP8_TOLERANCE = 3e-2
BUDGETS = [1, 2**12, 2**16, 2**20, 2**40]  # bytes: from "one sample and 64 queries at a time" to no limit


def _fixture(case):
    folder = fixtures_dir() / case
    io = load_tensors(folder / "io.safetensors")
    outputs = {k: v for k, v in io.items() if k.startswith("output.")}
    return load_transformer(folder, dtype="fp32"), transformer_inputs(io), outputs


def _check(case, out, outputs, tolerance=None):
    for key, ref in outputs.items():
        err = rel_error(out, ref)
        tol = tolerance if tolerance is not None else rel_tolerance(case, key)
        assert err <= tol, f"{case} {key}: rel error {err:.3e} > {tol:.1e}"


@pytest.mark.parametrize("case", fixture_cases("transformer"))
def test_every_mode_and_budget_matches_the_reference(case):
    model, inputs, outputs = _fixture(case)
    with torch.no_grad():
        plain = model(**inputs)
        _check(case, plain, outputs)
        for budget in BUDGETS:
            with transformer_budget(model, budget):
                _check(case, model(**inputs), outputs)
        blocks = len(model.transformer_blocks)
        for most in (1, 2, 3, blocks):
            manager = DeviceManager("cpu", "cpu", copy_same_device=True)
            with BlockSwap(manager, model, model.transformer_blocks, most):
                _check(case, model(**inputs), outputs)
        manager = DeviceManager("cpu", "cpu", copy_same_device=True)
        with manager.placed(model):
            _check(case, model(**inputs), outputs)
    # fp8 is not checked here: these fixture networks (every weight random, every path on) turn any 2-3 %
    # change of their weights, which is what float8 rounding is, into 8-20 % at the output; see below.


@pytest.mark.parametrize("family", ["v2", "v3"])
def test_budget_chunks_batch_and_queries_without_changing_results(family):
    model = random_model(family, num_layers=16)
    inputs = example_inputs(model, frames=3, height=6, width=8)
    plain = run(model, inputs)
    assert model.plan_chunks(2, 3, 6, 8) == (2, None)  # no budget: one pass, all queries
    rows, queries = model.plan_chunks(2, 3, 6, 8, budget=1)
    assert rows == 1 and queries == 64
    for budget in BUDGETS:
        with transformer_budget(model, budget):
            assert rel_error(run(model, inputs), plain) <= 1e-6
    assert model.memory_budget is None  # the budget is only set inside the block
    with query_chunks(5):  # smaller than any sequence here: every attention is split
        assert rel_error(run(model, inputs), plain) <= 1e-6


def test_feed_forward_row_chunks_are_exact(monkeypatch):
    import easyanimate.models.attention as attention

    model = random_model("v3", num_layers=16)
    inputs = example_inputs(model, frames=4, height=8, width=8)
    plain = run(model, inputs)
    calls = []
    hook = model.transformer_blocks[0].ff.net[0].register_forward_hook(lambda *args: calls.append(1))
    monkeypatch.setattr(attention, "MIN_CHUNK_ROWS", 7)  # several uneven chunks
    try:
        with attention.feed_forward_chunks(1):
            chunked = run(model, inputs)
    finally:
        hook.remove()
    assert len(calls) > 1  # the rows really ran in several chunks
    assert rel_error(chunked, plain) <= 1e-6


@pytest.mark.parametrize("family", ["v1", "v2", "v3"])
def test_fp8_storage_and_error(family):
    # weights at the scale of a real initialisation (std 0.02); e4m3 keeps 3 mantissa bits, so every
    # weight moves by up to 6 % (about 2.6 % rms) and the output by about as much
    model = random_model(family, num_layers=16, scale=0.02)
    inputs = example_inputs(model, height=8, width=8)  # (V1's motion cells need an even token grid)
    plain = run(model, inputs)
    linears = sum(type(m) is torch.nn.Linear for m in model.modules())
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    report = to_fp8(model)
    after = sum(p.numel() * p.element_size() for p in model.parameters())
    assert report["layers"] == linears and sum(isinstance(m, Fp8Linear) for m in model.modules()) == linears
    assert all(m.weight.dtype == FP8_DTYPE for m in model.modules() if isinstance(m, Fp8Linear))
    assert after < 0.35 * before
    assert to_fp8(model)["layers"] == 0  # already converted: nothing to do
    err = rel_error(run(model, inputs), plain)
    print(f"fp8 rel error vs fp32: {err:.2e}")
    assert 0 < err <= FP8_TOLERANCE


def test_offload_places_and_restores_exactly():
    model = random_model("v3", num_layers=16)
    before = {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}
    manager = DeviceManager("cpu", "cpu", copy_same_device=True)
    with manager.placed(model):
        assert manager.resident_bytes == sum(v.numel() * v.element_size() for v in model.state_dict().values())
        # every tensor is the compute copy while placed
        assert all(v.data_ptr() != before[k][0] for k, v in model.state_dict().items())
    assert manager.resident_bytes == 0 and not manager.resident
    for k, v in model.state_dict().items():
        assert v.data_ptr() == before[k][0] and torch.equal(v, before[k][1])


def test_same_device_without_copies_only_counts():
    model = random_model("v3", num_layers=16)
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
    manager = DeviceManager("cpu", "cpu")
    with manager.placed(model):
        assert manager.resident_bytes > 0
        assert {k: v.data_ptr() for k, v in model.state_dict().items()} == ptrs


def test_memory_options_are_checked():
    from easyanimate.errors import EasyAnimateError

    with pytest.raises(EasyAnimateError, match="memory mode"):
        MemoryOptions("lowvram")
    with pytest.raises(EasyAnimateError, match="swap-blocks"):
        MemoryOptions("block-swap", swap_blocks=0)
    with pytest.raises(EasyAnimateError, match="budget"):
        MemoryOptions(budget_mb=0)
    assert MemoryOptions(budget_mb=1.5).budget_bytes == int(1.5 * 2**20)


# ---------------------------------------------------------------------------------------- pipeline
TINY_VAE = {"ch": 8, "ch_mult": [1, 2, 4, 4], "norm_num_groups": 4, "use_tiling": False}


def _text(model, seed):
    from easyanimate.pipeline import Conditioning

    g = torch.Generator().manual_seed(seed)
    return Conditioning(torch.randn(1, 6, model.config.caption_channels, generator=g), torch.tensor([[1] * 4 + [0, 0]]))


@pytest.mark.parametrize("mode", ["offload", "block-swap", "fp8"])
def test_generate_with_a_memory_plan_equals_the_plain_run(mode):
    from easyanimate.pipeline import generate, stages_for
    from easyanimate.vae import build_vae

    transformer = random_model("v3", num_layers=16)
    torch.manual_seed(0)
    vae = build_vae("v3", TINY_VAE)
    # 32x32 px: 2x2 tokens a frame. (At 1x2 tokens the motion modules' group norms see two values a group, and
    # the last-bit differences between batch sizes of torch's kernels grow to 1e-3 through this random model.)
    options = dict(frames=8, height=32, width=32, steps=2, guidance_scale=6.0, seed=1)
    plain = generate(transformer, vae, _text(transformer, 0), _text(transformer, 1), **options)
    if mode == "fp8":
        transformer = copy.deepcopy(transformer)
    manager = DeviceManager("cpu", "cpu", copy_same_device=True)
    events = []
    manager.listeners.append(lambda m, event, module: events.append((event, m.resident_blocks)))
    # The smallest budget the pack accepts for this request: one row of the CFG batch per pass, chunked attention.
    stages = stages_for(transformer, vae)
    smallest = stages.memory_estimate(stages.request(**{k: v for k, v in options.items() if k != "seed"})).budget_minimum
    host = StandaloneHost(MemoryOptions(mode, swap_blocks=3, budget_mb=smallest / 2**20), manager=manager)
    host.prepare(host.wrap(transformer, "transformer"))
    placement = host.placement(transformer=transformer, vae=vae.model)
    out = generate(transformer, vae, _text(transformer, 0), _text(transformer, 1), placement=placement, **options)
    err = rel_error(out, plain)
    if mode == "fp8":
        assert err <= 5 * FP8_TOLERANCE  # two sampling steps compound the per-forward error
    else:
        assert err <= 1e-5  # the budget splits the CFG batch: equal up to float rounding
        assert transformer.plan_chunks(2, 2, 4, 4, host.budget_bytes)[0] == 1
        assert events and max(n for _, n in events) <= 3
        assert not manager.resident  # everything back in storage after the run


def test_fp8_upcasts_large_layers_a_block_of_rows_at_a_time(monkeypatch):
    import easyanimate.memory as memory

    layer = torch.nn.Linear(64, 300)
    x = torch.randn(5, 7, 64, generator=torch.Generator().manual_seed(0))
    to_fp8(layer)
    whole = layer(x)
    monkeypatch.setattr(memory, "FP8_UPCAST_BYTES", 64 * 4 * 37)  # 37 rows a block, the last one short
    assert rel_error(layer(x), whole) <= 1e-6
