"""Block swap keeps at most N blocks on the compute device (by the device manager's own accounting, checked
at every step), runs every block from its compute copy, and leaves the model exactly as it was, also
when a run fails half-way."""
import pytest
import torch

from conftest import rel_error
from easyanimate.errors import EasyAnimateError
from easyanimate.memory import BlockSwap, DeviceManager
from tiny import example_inputs, random_model, run


@pytest.fixture(scope="module")
def model():
    return random_model("v3", num_layers=16)


def _snapshot(model):
    return {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict().items()}


def _assert_unchanged(model, snapshot):
    state = model.state_dict()
    assert set(state) == set(snapshot)
    for key, value in state.items():
        ptr, saved = snapshot[key]
        assert value.data_ptr() == ptr, f"{key} is not its stored tensor any more"
        assert torch.equal(value, saved), f"{key} changed"
    for block in model.transformer_blocks:
        assert not block._forward_hooks and not block._forward_pre_hooks


@pytest.mark.parametrize("most", [1, 2, 3, 5, 16, 40])
def test_never_more_than_n_blocks_on_the_compute_device(model, most):
    inputs = example_inputs(model)
    plain = run(model, inputs)
    snapshot = _snapshot(model)
    stored = {id(b): {n: p.data_ptr() for n, p in b.named_parameters()} for b in model.transformer_blocks}
    manager = DeviceManager("cpu", "cpu", copy_same_device=True)
    seen, ran = [], []
    manager.listeners.append(lambda m, event, module: seen.append(m.resident_blocks))

    def check_running(block, args):
        # the manager says so, and the weights the block computes with are the compute copies
        assert manager.is_resident(block)
        assert all(p.data_ptr() != stored[id(block)][n] for n, p in block.named_parameters())
        assert manager.resident_blocks <= most
        ran.append(manager.resident_blocks)

    with BlockSwap(manager, model, model.transformer_blocks, most) as swap:
        # registered after the swap's own hooks, so they see each block as it is about to compute
        hooks = [b.register_forward_pre_hook(check_running) for b in model.transformer_blocks]
        try:
            out1 = run(model, inputs)
            out2 = run(model, inputs)  # a second forward (next step) starts from the wrapped-around prefetch
        finally:
            for h in hooks:
                h.remove()
    assert rel_error(out1, plain) == 0 and rel_error(out2, plain) == 0
    assert seen and max(seen) <= min(most, 16) and manager.peak_blocks <= most
    assert len(ran) == 2 * 16
    if most < 16:
        assert len(swap.streamed) > 0 and max(seen) == most  # the slots are used, not more
    assert not manager.resident and manager.max_blocks is None
    _assert_unchanged(model, snapshot)


def test_the_manager_refuses_a_block_over_the_limit(model):
    manager = DeviceManager("cpu", "cpu", copy_same_device=True, max_blocks=2)
    manager.load(model.transformer_blocks[0], block=True)
    manager.load(model.transformer_blocks[1], block=True)
    with pytest.raises(EasyAnimateError, match="limit is 2"):
        manager.load(model.transformer_blocks[2], block=True)
    manager.offload_all()
    assert not manager.resident


@pytest.mark.parametrize("fail_at", [0, 5, 15])
def test_an_exception_mid_run_leaves_the_model_exactly_as_before(model, fail_at):
    inputs = example_inputs(model)
    plain = run(model, inputs)
    snapshot = _snapshot(model)
    manager = DeviceManager("cpu", "cpu", copy_same_device=True)

    class Stop(Exception):
        pass

    def explode(block, args):
        raise Stop

    hook = model.transformer_blocks[fail_at].register_forward_pre_hook(explode)
    try:
        with pytest.raises(Stop):
            with BlockSwap(manager, model, model.transformer_blocks, 3):
                run(model, inputs)
    finally:
        hook.remove()
    assert not manager.resident and manager.resident_bytes == 0
    _assert_unchanged(model, snapshot)
    assert rel_error(run(model, inputs), plain) == 0


def test_interrupt_from_the_sampler_callback_leaves_the_model_as_before(model):
    from easyanimate.host import StandaloneHost
    from easyanimate.memory import MemoryOptions
    from easyanimate.pipeline import Conditioning, generate
    from easyanimate.sampling import SamplingCancelled
    from easyanimate.vae import build_vae

    torch.manual_seed(0)
    vae = build_vae("v3", {"ch": 8, "ch_mult": [1, 2, 4, 4], "norm_num_groups": 4, "use_tiling": False})
    g = torch.Generator().manual_seed(0)
    text = Conditioning(torch.randn(1, 6, model.config.caption_channels, generator=g), torch.ones(1, 6))
    snapshot = _snapshot(model)
    vae_snapshot = {k: v.data_ptr() for k, v in vae.model.state_dict().items()}
    manager = DeviceManager("cpu", "cpu", copy_same_device=True)
    host = StandaloneHost(MemoryOptions("block-swap", swap_blocks=2), manager=manager)
    with pytest.raises(SamplingCancelled):
        generate(model, vae, text, text, frames=8, height=16, width=16, steps=3, seed=0,
                 placement=host.placement(transformer=model, vae=vae.model),
                 callback=lambda done, total, latents: done < 2)
    assert not manager.resident
    _assert_unchanged(model, snapshot)
    assert {k: v.data_ptr() for k, v in vae.model.state_dict().items()} == vae_snapshot
