"""LoRA: every file format gives the same result, stacks, strengths, exact restoration, errors, T5 parts.

All LoRAs here are written in tmp_path from one set of random factors for a tiny random V3 InP model
(every Linear, motion modules, U-ViT skips, CLIP projection and the patch-embedding conv included).
"""
import copy
import json
import re

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from easyanimate import lora as lora_module
from easyanimate.lora import (
    LoRAError, LoRAFileError, LoRAMismatchError, LoRAStack, LoRAWarning,
    comfy_key_map, lora_patches, read_lora, resolve_lora,
)
from tiny import example_inputs, random_model, run

RANK, ALPHA = 4, 2.0  # scale 0.5: a power of two, so folding it into `up` changes no bit


# ---------------------------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def model():
    return random_model("v3", num_layers=16)


@pytest.fixture(scope="module")
def inputs(model):
    return example_inputs(model, frames=2, height=4, width=4)


def make_factors(model, seed=0, rank=RANK, only=None):
    """{module name: (down, up)} for every Linear and Conv2d of `model` (or the names matching `only`)."""
    gen = torch.Generator().manual_seed(seed)
    factors = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or (only and not re.search(only, name)):
            continue
        w = module.weight
        down_shape = (rank, *w.shape[1:]) if w.ndim == 4 else (rank, w.shape[1])
        up_shape = (w.shape[0], rank, 1, 1) if w.ndim == 4 else (w.shape[0], rank)
        factors[name] = (torch.randn(down_shape, generator=gen) * 0.1, torch.randn(up_shape, generator=gen) * 0.1)
    return factors


def kohya_dict(factors, prefix, alpha=ALPHA):
    sd = {}
    for name, (down, up) in factors.items():
        stem = prefix + name.replace(".", "_")
        sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"] = down, up
        sd[f"{stem}.alpha"] = torch.tensor(alpha)
    return sd


def peft_dict(factors, prefix):
    return {f"{prefix}{name}.{role}.weight": t for name, (down, up) in factors.items()
            for role, t in (("lora_A", down), ("lora_B", up))}


def old_diffusers_dict(factors, scale=ALPHA / RANK):
    """Attention layers as attention-processor LoRAs, the rest as `.lora.down/up`; no alpha, scale in `up`."""
    sd = {}
    for name, (down, up) in factors.items():
        match = re.fullmatch(r"(.*)\.(to_q|to_k|to_v|to_out\.0)", name)
        if match:
            proj = "to_out" if match.group(2) == "to_out.0" else match.group(2)
            stem = f"{match.group(1)}.processor.{proj}_lora"
            sd[f"{stem}.down.weight"], sd[f"{stem}.up.weight"] = down, up * scale
        else:
            sd[f"{name}.lora.down.weight"], sd[f"{name}.lora.up.weight"] = down, up * scale
    return sd


def write(tmp_path, filename, sd, metadata=None):
    path = tmp_path / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def all_formats(tmp_path, factors):
    """The same LoRA in every supported format: {format name: path}."""
    peft_meta = {"lora_alpha": str(ALPHA), "r": str(RANK)}
    files = {
        "easyanimate (lora_unet__)": write(tmp_path, "ea.safetensors", kohya_dict(factors, "lora_unet__")),
        "kohya (lora_unet_)": write(tmp_path, "kohya.safetensors", kohya_dict(factors, "lora_unet_")),
        "onetrainer (lora_transformer_)": write(tmp_path, "ot.safetensors", kohya_dict(factors, "lora_transformer_")),
        "lycoris (lycoris_)": write(tmp_path, "lyco.safetensors", kohya_dict(factors, "lycoris_")),
        "peft transformer. + metadata": write(tmp_path, "peft1.safetensors", peft_dict(factors, "transformer."), peft_meta),
        "peft base_model.model. + metadata": write(
            tmp_path, "peft2.safetensors", peft_dict(factors, "base_model.model."), peft_meta),
        "peft diffusion_model. + metadata": write(
            tmp_path, "peft3.safetensors", peft_dict(factors, "diffusion_model."), peft_meta),
        "peft no prefix, no alpha (scale in up)": write(
            tmp_path, "peft4.safetensors",
            peft_dict({n: (d, u * (ALPHA / RANK)) for n, (d, u) in factors.items()}, "")),
        "peft + adapter_config.json": write(tmp_path, "peft5/adapter_model.safetensors", peft_dict(factors, "")),
        "old diffusers attn-procs (scale in up)": write(tmp_path, "procs.safetensors", old_diffusers_dict(factors)),
    }
    (tmp_path / "peft5" / "adapter_config.json").write_text(json.dumps({"r": RANK, "lora_alpha": ALPHA}))
    return files


def merged_copy(model, stack):
    """A deep copy with W += (strength * scale) * (up @ down) per LoRA, in order (the reference's merge)."""
    merged = copy.deepcopy(model)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for factors, strength, scale in stack:
            for name, (down, up) in factors.items():
                w = modules[name].weight
                w += (strength * scale) * torch.mm(up.flatten(1), down.flatten(1)).reshape(w.shape)
    return merged


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {k: p for k, p in model.named_parameters()}


def assert_restored(model, snap):
    values, params = snap
    now = model.state_dict()
    changed = [k for k in values if not torch.equal(values[k], now[k])]
    assert not changed, f"weights changed: {changed[:5]}"
    swapped = [k for k, p in model.named_parameters() if params[k] is not p]
    assert not swapped, f"Parameter objects not restored: {swapped[:5]}"
    hooked = [n for n, m in model.named_modules() if m._forward_hooks]
    assert not hooked, f"hooks left behind on {hooked[:5]}"
    assert not hasattr(model, "_easyanimate_lora_active")


def tiny_t5():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, feed_forward_proj="gated-gelu",
                      vocab_size=128, decoder_start_token_id=0)
    return T5EncoderModel(config).eval()


def t5_output(t5, ids):
    with torch.no_grad():
        return t5(input_ids=ids).last_hidden_state


# ---------------------------------------------------------------------------------------------- formats

@pytest.mark.parametrize("mode", ["weights", "hooks"])
def test_every_format_gives_the_same_output(tmp_path, model, inputs, mode):
    factors = make_factors(model)
    files = all_formats(tmp_path, factors)
    expected = run(merged_copy(model, [(factors, 0.8, ALPHA / RANK)]), inputs)
    base = run(model, inputs)
    outputs = {}
    for fmt, path in files.items():
        resolved = resolve_lora(path, model)
        assert resolved.report.complete, f"{fmt}: {resolved.report.summary()}"
        assert set(resolved.transformer.layers) == set(factors), fmt
        scale_in_up = "scale in up" in fmt or "old diffusers" in fmt
        assert {b.scale for b in resolved.transformer.layers.values()} == {1.0 if scale_in_up else ALPHA / RANK}, fmt
        with lora_patches(model, [(resolved, 0.8)], mode=mode):
            outputs[fmt] = run(model, inputs)
    for fmt, out in outputs.items():
        if mode != "hooks":  # the same float32 operations as the reference merge: bit-identical
            assert torch.equal(out, expected), fmt
        else:
            assert (out - expected).abs().max() <= 1e-5 * expected.abs().max(), fmt
    assert (expected - base).abs().max() > 0.05 * base.abs().max()  # the LoRA matters
    assert torch.equal(run(model, inputs), base)


def test_targets_include_motion_modules_uvit_clip_projection_and_conv(tmp_path, model):
    resolved = resolve_lora(write(tmp_path, "ea.safetensors", kohya_dict(make_factors(model), "lora_unet__")), model)
    names = set(resolved.transformer.layers)
    for expected in (
        "transformer_blocks.1.attn_temporal.temporal_transformer.transformer_blocks.0.attention_blocks.1.to_out.0",
        "transformer_blocks.0.attn_temporal.temporal_transformer.proj_in",
        "long_connect_fc.12", "clip_projection.linear_1", "caption_projection.linear_2",
        "adaln_single.emb.timestep_embedder.linear_1", "proj_out", "transformer_blocks.3.ff.net.0.proj",
        "transformer_blocks.3.ff.net.2", "pos_embed.proj",
    ):
        assert expected in names, expected


def test_kohya_alpha_absent_or_zero_means_scale_one(tmp_path, model):
    factors = make_factors(model, only=r"attn1\.to_q$")
    sd = kohya_dict(factors, "lora_unet_")
    no_alpha = {k: v for k, v in sd.items() if not k.endswith(".alpha")}
    zero_alpha = {k: (torch.tensor(0.0) if k.endswith(".alpha") else v) for k, v in sd.items()}
    for sd in (no_alpha, zero_alpha):
        resolved = resolve_lora(read_lora(sd), model)
        assert {b.scale for b in resolved.transformer.layers.values()} == {1.0}


def test_peft_alpha_pattern_and_rslora(tmp_path, model):
    factors = make_factors(model, only=r"transformer_blocks\.0\.attn1\.to_[qk]$")
    config = {"r": RANK, "lora_alpha": 8, "alpha_pattern": {"attn1.to_k": 2}, "use_rslora": False}
    path = write(tmp_path, "a/adapter_model.safetensors", peft_dict(factors, "base_model.model."))
    (path.parent / "adapter_config.json").write_text(json.dumps(config))
    scales = {n: b.scale for n, b in resolve_lora(path, model).transformer.layers.items()}
    assert scales == {"transformer_blocks.0.attn1.to_q": 2.0, "transformer_blocks.0.attn1.to_k": 0.5}
    (path.parent / "adapter_config.json").write_text(json.dumps(dict(config, alpha_pattern={}, use_rslora=True)))
    scales = {b.scale for b in resolve_lora(path, model).transformer.layers.values()}
    assert scales == {8 / RANK**0.5}


def test_legacy_pt_file(tmp_path, model, inputs):
    factors = make_factors(model, only=r"attn2")
    torch.save(kohya_dict(factors, "lora_unet__"), tmp_path / "old.pt")
    write(tmp_path, "same.safetensors", kohya_dict(factors, "lora_unet__"))
    a, b = (resolve_lora(tmp_path / f, model) for f in ("old.pt", "same.safetensors"))
    with lora_patches(model, [(a, 1.0)]):
        out_a = run(model, inputs)
    with lora_patches(model, [(b, 1.0)]):
        assert torch.equal(run(model, inputs), out_a)


# ---------------------------------------------------------------------------------------------- stacking, strengths

@pytest.mark.parametrize("mode", ["weights", "hooks"])
def test_stack_with_negative_strength_matches_sequential_merge(tmp_path, model, inputs, mode):
    first, second = make_factors(model, seed=1), make_factors(model, seed=2, only=r"attn|ff")
    a = resolve_lora(write(tmp_path, "a.safetensors", kohya_dict(first, "lora_unet__")), model)
    b = resolve_lora(write(tmp_path, "b.safetensors", peft_dict(second, "transformer."),
                           {"lora_alpha": "1", "r": str(RANK)}), model)
    expected = run(merged_copy(model, [(first, 0.75, ALPHA / RANK), (second, -0.3, 1 / RANK)]), inputs)
    snap = snapshot(model)
    with lora_patches(model, [(a, 0.75), (b, -0.3)], mode=mode):
        out = run(model, inputs)
    if mode != "hooks":
        assert torch.equal(out, expected)
    else:
        assert (out - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert_restored(model, snap)


@pytest.mark.parametrize("mode", ["weights", "hooks"])
def test_zero_strength_is_exactly_no_effect_and_strengths_need_no_reload(tmp_path, model, inputs, mode):
    resolved = resolve_lora(write(tmp_path, "a.safetensors", kohya_dict(make_factors(model), "lora_unet__")), model)
    base = run(model, inputs)
    with lora_patches(model, [(resolved, 0.0)], mode=mode):
        assert torch.equal(run(model, inputs), base)
    outs = []
    for strength in (1.0, 0.5, -1.0):  # the same resolved LoRA and the same base model, three strengths
        with lora_patches(model, [(resolved, strength)], mode=mode):
            outs.append(run(model, inputs))
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    expected = run(merged_copy(model, [(make_factors(model), -1.0, ALPHA / RANK)]), inputs)
    assert (outs[2] - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert torch.equal(run(model, inputs), base)


def test_lora_stack_handle_is_chainable_and_immutable(tmp_path, model, inputs):
    a = resolve_lora(write(tmp_path, "a.safetensors", kohya_dict(make_factors(model, seed=1), "lora_unet__")), model)
    b = resolve_lora(write(tmp_path, "b.safetensors", kohya_dict(make_factors(model, seed=2), "lora_unet__")), model)
    empty = LoRAStack(model)
    one = empty.with_lora(a, 0.75)
    two = one.with_lora(b, -0.3)
    assert len(empty.loras) == 0 and len(one.loras) == 1 and len(two.loras) == 2
    with two.applied():
        out_stack = run(model, inputs)
    with lora_patches(model, [(a, 0.75), (b, -0.3)]):
        assert torch.equal(run(model, inputs), out_stack)
    with empty.applied():
        assert torch.equal(run(model, inputs), run(model, inputs))


# ---------------------------------------------------------------------------------------------- restoration

def test_hundred_apply_restore_cycles_are_bit_exact(tmp_path, model, inputs):
    a = resolve_lora(write(tmp_path, "a.safetensors", kohya_dict(make_factors(model, seed=1), "lora_unet__")), model)
    b = resolve_lora(write(tmp_path, "b.safetensors", kohya_dict(make_factors(model, seed=2), "lora_unet_")), model)
    snap = snapshot(model)
    probe = "transformer_blocks.0.attn1.to_q"
    probe_module = model.get_submodule(probe)
    base_probe = probe_module.weight
    for cycle in range(100):
        mode = ("weights", "hooks")[cycle % 2]
        with lora_patches(model, [(a, 0.7), (b, -0.45)], mode=mode):
            if mode == "weights":
                assert probe_module.weight is not base_probe and not torch.equal(probe_module.weight, base_probe)
            else:  # not patched at all: the low-rank product is added to the layer's output
                assert probe_module.weight is base_probe and probe_module._forward_hooks
        assert probe_module.weight is base_probe
    assert_restored(model, snap)


@pytest.mark.parametrize("mode", ["weights", "hooks"])
@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_interrupted_body_restores_the_model(tmp_path, model, inputs, mode, error):
    resolved = resolve_lora(write(tmp_path, "a.safetensors", kohya_dict(make_factors(model), "lora_unet__")), model)
    snap = snapshot(model)
    # The forward of this adapted layer raises, while the LoRA is applied.
    block = model.transformer_blocks[7].attn2.to_k
    calls = []

    def interrupt(module, args):  # raises in the middle of a forward pass
        calls.append(1)
        raise error("stop")

    handle = block.register_forward_pre_hook(interrupt)
    try:
        with pytest.raises(error):
            with lora_patches(model, [(resolved, 0.9)], mode=mode):
                run(model, inputs)
    finally:
        handle.remove()
    assert calls
    assert_restored(model, snap)


@pytest.mark.parametrize("mode", ["weights", "hooks"])
def test_interrupted_application_restores_the_layers_already_patched(tmp_path, model, monkeypatch, mode):
    resolved = resolve_lora(write(tmp_path, "a.safetensors", kohya_dict(make_factors(model), "lora_unet__")), model)
    snap = snapshot(model)
    target = {"weights": "_low_rank_product", "hooks": "_low_rank_hook"}[mode]
    real, calls = getattr(lora_module, target), []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 50:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(lora_module, target, interrupted)
    with pytest.raises(KeyboardInterrupt):
        with lora_patches(model, [(resolved, 0.9)], mode=mode):
            pytest.fail("the body must not run")
    assert len(calls) == 50
    assert_restored(model, snap)


def test_nested_blocks_on_one_model_are_refused(tmp_path, model):
    resolved = resolve_lora(write(tmp_path, "a.safetensors", kohya_dict(make_factors(model), "lora_unet__")), model)
    snap = snapshot(model)
    with lora_patches(model, [(resolved, 1.0)]):
        with pytest.raises(LoRAError, match="one stack"):
            with lora_patches(model, [(resolved, 1.0)]):
                pass
    assert_restored(model, snap)


def test_weights_mode_keeps_no_second_copy_of_the_model(tmp_path, model):
    """While applied, the new tensors are exactly the adapted layers' weights; nothing else is duplicated."""
    factors = make_factors(model, only=r"attn1\.to_[qv]$")
    resolved = resolve_lora(write(tmp_path, "a.safetensors", kohya_dict(factors, "lora_unet__")), model)
    before = {p.data_ptr() for p in model.parameters()}
    with lora_patches(model, [(resolved, 1.0)], mode="weights"):
        new = [p for p in model.parameters() if p.data_ptr() not in before]
        target_bytes = sum(model.get_submodule(n).weight.nbytes for n in factors)
        assert sum(p.nbytes for p in new) == target_bytes
    with lora_patches(model, [(resolved, 1.0)], mode="hooks"):
        assert {p.data_ptr() for p in model.parameters()} == before


# ---------------------------------------------------------------------------------------------- reporting

def test_no_match_names_keys_and_model_family(tmp_path, model):
    sd = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32),
          "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 4)}
    with pytest.raises(LoRAError) as info:
        resolve_lora(read_lora(sd, name="sd15.safetensors"), model)
    message = str(info.value)
    assert "sd15.safetensors" in message and "EasyAnimate V3 transformer" in message
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in message and "Stable Diffusion" in message


def test_partial_match_is_applied_with_a_warning(tmp_path, model, inputs):
    factors = make_factors(model, only=r"attn2")
    sd = kohya_dict(factors, "lora_unet__")
    sd["lora_unet__transformer_blocks_99_attn1_to_q.lora_down.weight"] = torch.zeros(RANK, 32)
    sd["lora_unet__transformer_blocks_99_attn1_to_q.lora_up.weight"] = torch.zeros(32, RANK)
    sd["lora_unet__proj_out.hada_w1_a"] = torch.zeros(2, 2)
    with pytest.warns(LoRAWarning, match="transformer_blocks_99") as record:
        resolved = resolve_lora(read_lora(sd, name="partial"), model)
    assert "LoHa" in str(record[0].message)
    report = resolved.report
    assert report.unmatched == ["lora_unet__transformer_blocks_99_attn1_to_q"]
    assert report.unsupported == {"lora_unet__proj_out.hada_w1_a": "LoHa (not supported)"}
    assert report.applied == {"transformer": len(factors)} and not report.complete
    full = resolve_lora(read_lora(kohya_dict(factors, "lora_unet__")), model)
    with lora_patches(model, [(resolved, 1.0)]):
        partial_out = run(model, inputs)
    with lora_patches(model, [(full, 1.0)]):
        assert torch.equal(run(model, inputs), partial_out)


def test_shape_and_rank_mismatch_name_module_and_shapes(model):
    down, up = torch.zeros(RANK, 64), torch.zeros(32, RANK)  # trained for hidden size 64
    sd = {"lora_unet__transformer_blocks_0_attn1_to_q.lora_down.weight": down,
          "lora_unet__transformer_blocks_0_attn1_to_q.lora_up.weight": up}
    with pytest.raises(LoRAMismatchError) as info:
        resolve_lora(read_lora(sd), model)
    message = str(info.value)
    assert "transformer_blocks.0.attn1.to_q" in message and "(32, 32)" in message and "(4, 64)" in message
    sd["lora_unet__transformer_blocks_0_attn1_to_q.lora_down.weight"] = torch.zeros(8, 32)
    with pytest.raises(LoRAMismatchError, match=r"up \(32, 4\) and down \(8, 32\)"):
        resolve_lora(read_lora(sd), model)


def test_corrupt_or_missing_file_is_named(tmp_path, model):
    good = write(tmp_path, "good.safetensors", kohya_dict(make_factors(model, only="attn1"), "lora_unet__"))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(LoRAFileError, match="broken.safetensors"):
        read_lora(broken)
    with pytest.raises(LoRAFileError, match="missing.safetensors"):
        read_lora(tmp_path / "missing.safetensors")
    with pytest.raises(LoRAError, match="no LoRA layers"):
        read_lora({"some.weight": torch.zeros(2)}, name="not_a_lora.safetensors")


# ---------------------------------------------------------------------------------------------- T5 parts

def t5_lora(model, t5):
    te = {}
    gen = torch.Generator().manual_seed(5)
    for name, module in t5.named_modules():
        if isinstance(module, nn.Linear):
            stem = "lora_te_" + name.replace(".", "_")
            te[f"{stem}.lora_down.weight"] = torch.randn(RANK, module.in_features, generator=gen) * 0.3
            te[f"{stem}.lora_up.weight"] = torch.randn(module.out_features, RANK, generator=gen) * 0.3
            te[f"{stem}.alpha"] = torch.tensor(ALPHA)
    return {**kohya_dict(make_factors(model, only=r"\.attn1\.to_q$"), "lora_unet__"), **te}


@pytest.mark.parametrize("mode", ["weights", "hooks"])
def test_text_encoder_parts_apply_to_t5_only_when_asked(tmp_path, model, inputs, mode):
    t5 = tiny_t5()
    lora = read_lora(write(tmp_path, "te.safetensors", t5_lora(model, t5)))
    ids = torch.tensor([[5, 17, 3, 99, 1, 0]])
    t5_base, transformer_base = t5_output(t5, ids), run(model, inputs)
    t5_snap = snapshot(t5)

    without = resolve_lora(lora, model)
    assert len(without.report.skipped_text_encoder) == 14 and without.text_encoder is None
    assert without.report.skipped_text_encoder[0].startswith("lora_te_encoder_block_0_layer_0_SelfAttention")

    with_te = resolve_lora(lora, model, t5)
    assert with_te.report.applied == {"transformer": 16, "text_encoder": 14}
    assert "encoder.block.1.layer.1.DenseReluDense.wi_0" in with_te.text_encoder.layers
    with LoRAStack(model, t5).with_lora(with_te, 0.0, 0.8).applied(mode):
        assert torch.equal(run(model, inputs), transformer_base)  # transformer strength 0
        t5_lora_out = t5_output(t5, ids)
    assert_restored(t5, t5_snap)

    merged = copy.deepcopy(t5)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for name, bound in with_te.text_encoder.layers.items():
            modules[name].weight += (0.8 * bound.scale) * (bound.layer.up @ bound.layer.down)
    expected = t5_output(merged, ids)
    assert not torch.allclose(expected, t5_base, atol=1e-3)
    assert (t5_lora_out - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert torch.equal(t5_output(t5, ids), t5_base)


def test_text_encoder_inside_a_wrapper_and_te_only_lora(tmp_path, model):
    t5 = tiny_t5()
    wrapper = nn.Module()
    wrapper.model = t5
    te_only = {k: v for k, v in t5_lora(model, t5).items() if k.startswith("lora_te_")}
    resolved = resolve_lora(read_lora(te_only), None, wrapper)
    assert "model.encoder.block.0.layer.0.SelfAttention.q" in resolved.text_encoder.layers
    with pytest.raises(LoRAError, match="only adapts the text encoder"):
        resolve_lora(read_lora(te_only), model)
    key_map = comfy_key_map(read_lora(te_only), t5, part="text_encoder")
    assert key_map["lora_te_encoder_block_0_layer_1_DenseReluDense_wo"] == "encoder.block.0.layer.1.DenseReluDense.wo.weight"


# ---------------------------------------------------------------------------------------------- ComfyUI key map

def definition_weights64(model, factors, strength, scale):
    """{module.weight: W + strength * scale * (up @ down)} in float64, from the LoRA definition and the factors
    the test files were written from (no code under test, no float32 order of operations)."""
    out = {}
    for name, (down, up) in factors.items():
        w = model.get_submodule(name).weight.detach().double()
        delta = (up.double().flatten(1) @ down.double().flatten(1)).reshape(w.shape)
        out[f"{name}.weight"] = w + strength * scale * delta
    return out


# The tensor names of a plain LoRA layer `x` in a LoRA state dict, as ComfyUI's LoRA adapter
# (comfy/weight_adapter/lora.py) looks them up: (up, down); alpha is `x.alpha` (absent: alpha = rank).
COMFY_LORA_NAMES = ((".lora_up.weight", ".lora_down.weight"), ("_lora.up.weight", "_lora.down.weight"),
                    (".lora_B.weight", ".lora_A.weight"), (".lora.up.weight", ".lora.down.weight"))


def lora_deltas64(lora_sd, key_map):
    """{model key: (alpha / rank) * (up @ down)} in float64 for every `key_map` entry of a LoRA state dict."""
    deltas = {}
    for x, model_key in key_map.items():
        names = [(x + u, x + d) for u, d in COMFY_LORA_NAMES if x + u in lora_sd]
        assert names, f"no up/down tensors for {x}"
        up, down = (lora_sd[n].double() for n in names[0])
        alpha = lora_sd[x + ".alpha"].item() if x + ".alpha" in lora_sd else down.shape[0]
        deltas[model_key] = (alpha / down.shape[0]) * (up.flatten(1) @ down.flatten(1))
    return deltas


def merge64(model, deltas, strength, prefix=""):
    """{module.weight: W + strength * delta} in float64 for deltas keyed by (prefixed) state-dict keys."""
    out = {}
    for key, delta in deltas.items():
        key = key.removeprefix(prefix)
        w = model.get_submodule(key[:-len(".weight")]).weight.detach().double()
        out[key] = w + strength * delta.reshape(w.shape)
    return out


def assert_weights_close(got: dict, expected: dict, rel: float, what: str):
    assert set(got) == set(expected), (what, sorted(set(got) ^ set(expected))[:3])
    for key, value in expected.items():
        err = (got[key].double() - value).abs().max().item() / value.abs().max().item()
        assert err <= rel, f"{what}: {key} rel error {err:.2e} > {rel:.0e}"


def test_comfy_export_describes_the_lora_for_every_format(tmp_path, model, inputs):
    """`comfy_state_dict()` + `comfy_key_map()` (and, when the scale is in the file, the file's own tensors
    + `comfy_key_map(path)`) name every adapted weight and give its float64 LoRA delta; our merge is that
    delta in float32."""
    from safetensors.torch import load_file

    factors = make_factors(model)
    expected = definition_weights64(model, factors, 0.6, ALPHA / RANK)
    for fmt, path in all_formats(tmp_path, factors).items():
        resolved = resolve_lora(path, model)
        key_map = resolved.comfy_key_map(model_key_prefix="diffusion_model.")
        if fmt.startswith("easyanimate"):
            assert key_map["lora_unet__long_connect_fc_3"] == "diffusion_model.long_connect_fc.3.weight"
        if fmt.startswith("old diffusers"):
            assert key_map["transformer_blocks.2.attn2.processor.to_out"] == "diffusion_model.transformer_blocks.2.attn2.to_out.0.weight"
        merged = merge64(model, lora_deltas64(resolved.comfy_state_dict(), key_map), 0.6, "diffusion_model.")
        assert_weights_close(merged, expected, 1e-12, fmt)  # float32 factors, float64 products: exact
        if "metadata" not in fmt and "adapter_config" not in fmt:
            merged = merge64(model, lora_deltas64(load_file(str(path)), comfy_key_map(path, model)), 0.6)
            assert_weights_close(merged, expected, 1e-12, f"{fmt} (file tensors)")
        with lora_patches(model, [(resolved, 0.6)], mode="weights"):
            ours = {k: model.get_submodule(k[:-len(".weight")]).weight.detach().clone() for k in expected}
        assert_weights_close(ours, expected, 1e-6, f"{fmt} (our float32 merge)")


# ComfyUI's own LoRA loading, in ComfyUI's interpreter: `comfy.lora.load_lora(lora_sd, key_map)`, then a
# ModelPatcher over a module tree holding the model's weights under their (prefixed) state-dict keys,
# `add_patches(patches, strength)` + `patch_model()`; the patched weights are written back for the test.
COMFY_LORA_SCRIPT = r"""
import json, logging, sys
sys.path.insert(0, sys.argv[1])
import comfy.cli_args
comfy.cli_args.args.cpu = True
import torch
import comfy.lora, comfy.model_patcher
from safetensors.torch import load_file, save_file

not_loaded = []
class Watch(logging.Handler):
    def emit(self, record):
        if "lora key not loaded" in record.getMessage():
            not_loaded.append(record.getMessage())
logging.getLogger().addHandler(Watch())

def module_tree(state):
    root = torch.nn.Module()
    for key, value in state.items():
        *path, name = key.split(".")
        module = root
        for part in path:
            if part not in module._modules:
                module.add_module(part, torch.nn.Module())
            module = module._modules[part]
        module.register_parameter(name, torch.nn.Parameter(value.clone(), requires_grad=False))
    return root

manifest = json.loads(open(sys.argv[2]).read())
base = load_file(manifest["model"])
for job in manifest["jobs"]:
    patches = comfy.lora.load_lora(load_file(job["lora"]), job["key_map"])
    tree = module_tree({job["prefix"] + k: v for k, v in base.items()})
    patcher = comfy.model_patcher.ModelPatcher(tree, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
    applied = patcher.add_patches(patches, job["strength"])
    patcher.patch_model()
    assert len(patches) == len(job["key_map"]) == len(applied), (job["name"], len(patches), len(applied))
    save_file({k.removeprefix(job["prefix"]): v.contiguous() for k, v in tree.state_dict().items()}, job["out"])
assert not not_loaded, not_loaded[:3]
print("ok")
"""


def test_comfyui_merges_our_exports_as_we_do(tmp_path):
    """ComfyUI's `load_lora` + ModelPatcher on `comfy_state_dict()` + `comfy_key_map()` (every format) and on
    the file's own tensors + `comfy_key_map(path)` (formats with the scale in the file) patch the same weights
    as our merge, to float32 rounding, and the model gives the same output. Needs COMFYUI_DIR (ComfyUI's
    interpreter: COMFYUI_PYTHON, default this one)."""
    from comfyui_script import COMFYUI_DIR, run_comfyui_script
    from safetensors.torch import load_file

    if not COMFYUI_DIR:
        pytest.skip("COMFYUI_DIR is not set: no ComfyUI to merge the LoRAs with (set it, and COMFYUI_PYTHON)")
    model = random_model("v3", num_layers=4)  # U-ViT skips included; small, as ComfyUI patches each job anew
    inputs = example_inputs(model, frames=2, height=4, width=4)
    factors = make_factors(model)
    files = all_formats(tmp_path / "loras", factors)
    write(tmp_path, "model.safetensors", model.state_dict())
    jobs, ours = [], {}
    for index, (fmt, path) in enumerate(files.items()):
        resolved = resolve_lora(path, model)
        with lora_patches(model, [(resolved, 0.6)], mode="weights"):
            ours[fmt] = {k: v.clone() for k, v in model.state_dict().items()}
        export = write(tmp_path, f"export{index}.safetensors", resolved.comfy_state_dict())
        jobs.append(dict(name=fmt, lora=str(export), prefix="diffusion_model.", strength=0.6,
                         key_map=resolved.comfy_key_map(model_key_prefix="diffusion_model."),
                         out=str(tmp_path / f"comfy{index}.safetensors")))
        if "metadata" not in fmt and "adapter_config" not in fmt:
            jobs.append(dict(name=fmt + " (file tensors)", lora=str(path), prefix="", strength=0.6,
                             key_map=comfy_key_map(path, model), out=str(tmp_path / f"comfy{index}_raw.safetensors")))
    (tmp_path / "jobs.json").write_text(json.dumps({"model": str(tmp_path / "model.safetensors"), "jobs": jobs}))
    run_comfyui_script(tmp_path, "comfy_lora.py", COMFY_LORA_SCRIPT, tmp_path / "jobs.json")

    base = run(model, inputs)
    for job in jobs:
        fmt = job["name"].removesuffix(" (file tensors)")
        comfy = load_file(job["out"])
        assert set(comfy) == set(ours[fmt]), job["name"]
        changed = [k for k in comfy if not torch.equal(comfy[k], model.state_dict()[k])]
        assert len(changed) == len(factors), (job["name"], len(changed))
        for key, value in ours[fmt].items():
            scale = value.abs().max().clamp_min(1e-30)
            assert (comfy[key] - value).abs().max() <= 1e-6 * scale, (job["name"], key)
        merged = copy.deepcopy(model)
        merged.load_state_dict(comfy)
        out = run(merged, inputs)
        with lora_patches(model, [(resolve_lora(files[fmt], model), 0.6)], mode="weights"):
            expected = run(model, inputs)
        assert (out - expected).abs().max() <= 1e-5 * expected.abs().max(), job["name"]
        assert (out - base).abs().max() > 0.05 * base.abs().max(), job["name"]  # the LoRA matters
    print(f"ComfyUI merged {len(jobs)} LoRA exports as we do")


# ---------------------------------------------------------------------------------------------- bad values

@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_lora_file_holding_non_finite_weights_is_refused_naming_the_tensors(tmp_path, model, bad):
    sd = kohya_dict(make_factors(model, only="attn1"), "lora_unet__")
    key = "lora_unet__transformer_blocks_0_attn1_to_q.lora_up.weight"
    sd[key] = sd[key].clone()
    sd[key][0, 0] = bad
    path = write(tmp_path, "diverged.safetensors", sd)
    with pytest.raises(LoRAError, match=rf"'diverged.safetensors' holds NaN or infinite values in 1 \({key}\)"):
        read_lora(path)
    sd[key.replace("lora_up.weight", "alpha")] = torch.tensor(float("nan"))
    with pytest.raises(LoRAError, match=r"in 2 \("):
        read_lora(sd, name="in memory")


@pytest.mark.parametrize("strength", [float("nan"), float("inf"), -float("inf"), 1e30, 101.0, "abc"])
def test_non_finite_or_absurd_strengths_are_refused_and_nothing_changes(tmp_path, model, inputs, strength):
    lora = resolve_lora(read_lora(kohya_dict(make_factors(model, only="attn1"), "lora_unet__")), model)
    before = run(model, inputs)
    with pytest.raises(LoRAError, match="from -100 to 100"):
        with lora_patches(model, [(lora, strength)]):
            pytest.fail("entered the block with a bad strength")
    with pytest.raises(LoRAError, match="from -100 to 100"):
        LoRAStack(model).with_lora(lora, strength)
    with pytest.raises(LoRAError, match="text encoder strength"):
        LoRAStack(model).with_lora(lora, 1.0, text_encoder_strength=strength)
    assert not getattr(model, "_easyanimate_lora_active", False)
    assert torch.equal(run(model, inputs), before)
    assert lora_module.check_lora_strength(-100) == -100.0 and lora_module.check_lora_strength("0.5") == 0.5


def test_lora_path_that_is_a_folder_is_named_as_such(tmp_path, model):
    write(tmp_path / "loras", "mine.safetensors", kohya_dict(make_factors(model, only="attn1"), "lora_unet__"))
    with pytest.raises(LoRAFileError, match=r"is a folder, not a LoRA file.*holds mine.safetensors"):
        read_lora(tmp_path / "loras")
    with pytest.raises(LoRAFileError, match="does not exist"):
        read_lora(tmp_path / "loras" / "other.safetensors")
