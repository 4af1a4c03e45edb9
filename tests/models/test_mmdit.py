"""The V5 / V5.1 MMDiT transformer: configs, key layouts, loading, errors, LoRA names, memory estimate.

Tiny random models stand in for the releases here; parity with the reference is in
tests/parity/test_v5_transformer_parity.py.
"""
import json

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from easyanimate.errors import CheckpointMismatchError, EasyAnimateError, LayoutError, UnsupportedModelError
from easyanimate.loading import detect_family, load_transformer
from easyanimate.lora import comfy_key_map, lora_patches, resolve_lora
from easyanimate.models.mmdit import (
    DIFFUSERS_TEXT_STREAM, EasyAnimateMMDiT, MMDiTConfig, family_preset, rope_crop_region, rope_positions,
    rope_tables, variant_name,
)
from tiny import write_folder

TEXT_DIMS = {"v51": {"text_embed_dim": 24}, "v5": {"text_embed_dim": 24, "text_embed_dim_t5": 20}}
TINY = {"num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 4, "mmdit_layers": 2, "time_embed_dim": 16,
        "in_channels": 16}


def tiny_config(family: str, **extra) -> dict:
    return {**family_preset(family), **TINY, **TEXT_DIMS[family], **extra}


def random_model(family: str, seed: int = 0, **extra) -> EasyAnimateMMDiT:
    model = EasyAnimateMMDiT(MMDiTConfig.from_dict(tiny_config(family, **extra), family)).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def to_diffusers(state_dict: dict) -> dict:
    out = {}
    for key, value in state_dict.items():
        for theirs, ours in DIFFUSERS_TEXT_STREAM.items():
            key = key.replace(f".{ours}.", f".{theirs}.")
        out[key] = value
    return out


def example_inputs(model, frames=2, height=4, width=6, batch=2, tokens=5, seed=1):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    kwargs = dict(
        x=torch.randn(batch, 16, frames, height, width, generator=g),
        timestep=torch.tensor([900.0, 120.5][:batch]),
        encoder_hidden_states=torch.randn(batch, tokens, cfg.text_embed_dim, generator=g),
    )
    if cfg.text_embed_dim_t5 is not None:
        kwargs["encoder_hidden_states_t5"] = torch.randn(batch, tokens + 2, cfg.text_embed_dim_t5, generator=g)
    extra = cfg.in_channels - 16
    if extra == 17:
        kwargs["inpaint_latents"] = torch.randn(batch, 17, frames, height, width, generator=g)
    elif extra:
        kwargs["control_latents"] = torch.randn(batch, extra, frames, height, width, generator=g)
    return kwargs


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs)


@pytest.fixture(scope="module", params=["v51", "v5"])
def reference(request):
    family = request.param
    model = random_model(family)
    inputs = example_inputs(model)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    return family, model, sd, inputs, run(model, inputs)


def assert_same(model, reference):
    family, _, _, inputs, expected = reference
    assert model.config.family == family
    torch.testing.assert_close(run(model, inputs), expected, rtol=0, atol=0)


# --- configs and presets --------------------------------------------------------------------------

@pytest.mark.parametrize("family,layers,mmdit,channels,parameters,keys", [
    ("v51", 48, 48, 33, 11_799_265_856, 1937),
    ("v5", 48, 48, 33, 11_797_692_480, 1938),
    ("v51", 36, 18, 48, 6_814_855_232, 1169),
    ("v51", 36, 18, 33, 6_814_670_912, 1169),
])
def test_released_sizes(family, layers, mmdit, channels, parameters, keys):
    cfg = MMDiTConfig.from_dict({**family_preset(family), "num_layers": layers, "mmdit_layers": mmdit,
                                 "in_channels": channels}, family)
    with torch.device("meta"):
        model = EasyAnimateMMDiT(cfg, dtype=torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == parameters
    assert len(model.state_dict()) == keys
    size = "12B" if layers == 48 else "7B"
    assert cfg.name == f"{'V5.1' if family == 'v51' else 'V5'} {size} {'InP' if channels == 33 else 'Control'}"


def test_config_defaults_unknown_keys_and_family():
    raw = {**tiny_config("v51"), "some_future_key": [1], "decay": 0.99}
    raw.pop("mmdit_layers")  # absent: every block is an MMDiT block (the reference's default)
    cfg = MMDiTConfig.from_dict(raw)
    assert cfg.family == "v51" and cfg.mmdit_layers == cfg.num_layers == 4
    assert MMDiTConfig.from_dict(tiny_config("v5")).family == "v5"
    assert MMDiTConfig.from_dict(tiny_config("v51", mmdit_layers=10000)).mmdit_layers == 4
    assert variant_name("v51", 36, 18, 3072, 38) == "V5.1 7B Control-Camera"
    assert variant_name("v5", 48, 48, 3072, 32) == "V5 12B Control"
    assert variant_name("v5", 48, 48, 3072, 16) == "V5 12B T2V"


@pytest.mark.parametrize("key,value,words", [
    ("ref_channels", 16, "ref_channels"),
    ("clip_channels", 768, "clip_channels"),
    ("swa_layers", [3, 5], "swa_layers"),
    ("after_norm", True, "after_norm"),
    ("time_position_encoding_type", "2d_rope", "2d_rope"),
    ("attention_head_dim", 24, "multiple of 16"),
    ("text_embed_dim_t5", 32, "V5.1 transformer config"),
])
def test_dead_features_are_refused_by_name(key, value, words):
    with pytest.raises(EasyAnimateError, match=words):
        MMDiTConfig.from_dict(tiny_config("v51", **{key: value}), "v51")


def test_empty_swa_list_is_no_feature():
    assert MMDiTConfig.from_dict(tiny_config("v51", swa_layers=[]), "v51").family == "v51"


# --- RoPE --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("grid,crop", [
    ((24, 42), ((2, 0), (28, 45))),    # 384x672
    ((32, 32), ((0, 8), (30, 38))),    # 512x512
    ((30, 45), ((0, 0), (30, 45))),    # 480x720
    ((42, 24), ((0, 14), (30, 31))),   # 672x384
    ((6, 4), ((0, 12), (30, 32))),     # left = round(12.5) = 12: Python rounds halves to even
])
def test_rope_crop_region(grid, crop):
    assert rope_crop_region(*grid, 30, 45) == crop


def test_rope_positions_are_an_open_linspace_over_the_crop():
    t, h, w = rope_positions(3, 24, 42)
    assert t.tolist() == [0.0, 1.0, 2.0]
    assert h[0] == 2 and abs(h[1].item() - (2 + 26 / 24)) < 1e-6 and abs(h[-1].item() - 26.9167) < 1e-4
    assert w[0] == 0 and abs(w[-1].item() - 43.9286) < 1e-4
    cos, sin = rope_tables(3, 4, 6, 16)
    assert cos.shape == sin.shape == (3 * 4 * 6, 16) and cos.dtype == torch.float32
    assert torch.equal(cos[:, 0::2], cos[:, 1::2])  # every angle serves one channel pair


# --- layouts, folders, single files ----------------------------------------------------------------

@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_both_key_layouts_load_the_same_model(tmp_path, reference, layout):
    family, _, sd, _, _ = reference
    weights = sd if layout == "original" else to_diffusers(sd)
    folder = write_folder(tmp_path / "transformer", tiny_config(family), weights)
    source = detect_family(folder)
    assert (source.family, source.layout) == (family, layout)
    assert "4-block (2 MMDiT, width 32) T2V" in source.description and layout in source.description
    assert_same(load_transformer(folder), reference)


@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_release_root_with_sharded_weights(tmp_path, reference, layout):
    family, _, sd, _, _ = reference
    weights = sd if layout == "original" else to_diffusers(sd)
    write_folder(tmp_path / "transformer", tiny_config(family), weights, shards=3)
    for sub in ("vae", "text_encoder", "tokenizer", "scheduler"):
        (tmp_path / sub).mkdir()
    if family == "v5":
        (tmp_path / "text_encoder_2").mkdir()  # V5's mT5: not a sign of V4 next to a V5 transformer
    assert_same(load_transformer(tmp_path), reference)


@pytest.mark.parametrize("prefix", ["", "transformer.", "model.diffusion_model."])
@pytest.mark.parametrize("layout", ["original", "diffusers"])
def test_single_file_without_config(tmp_path, reference, prefix, layout):
    family, _, sd, _, _ = reference
    weights = sd if layout == "original" else to_diffusers(sd)
    path = tmp_path / "model.safetensors"
    save_file({prefix + k: v for k, v in weights.items()}, str(path))
    assert detect_family(path).family == family
    assert_same(load_transformer(path), reference)  # every size read from the tensor shapes
    assert_same(load_transformer(path, config=tiny_config(family)), reference)


def test_legacy_pt_single_file(tmp_path, reference):
    family, _, sd, _, _ = reference
    path = tmp_path / "model.pt"
    torch.save({"state_dict": to_diffusers(sd)}, path)
    assert_same(load_transformer(path), reference)


def test_loaded_in_bf16_with_the_host_operations(tmp_path, reference):
    family, _, sd, inputs, expected = reference
    folder = write_folder(tmp_path, tiny_config(family), sd)
    model = load_transformer(folder, dtype="bf16", operations=nn)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    out = run(model, inputs)
    assert out.dtype == torch.bfloat16 and (out.float() - expected).abs().max() < 0.1 * expected.abs().max()


# --- errors -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("key,value,words", [
    ("num_layers", 6, "num_layers = 6, but the weights hold 4"),
    ("mmdit_layers", 3, r"mmdit_layers .* = 3, but the weights hold 2"),
    ("text_embed_dim", 40, "text_embed_dim = 40, but the weights hold 24"),
    ("in_channels", 33, "in_channels = 33, but the weights hold 16"),
    ("time_embed_dim", 32, "time_embed_dim = 32, but the weights hold 16"),
])
def test_config_contradicting_the_weights_is_refused_before_building(tmp_path, reference, key, value, words):
    family, _, sd, _, _ = reference
    write_folder(tmp_path, tiny_config(family, **{key: value}), sd)
    with pytest.raises(CheckpointMismatchError, match=f"config.json.*{words}"):
        load_transformer(tmp_path)


def test_missing_keys_are_named_in_the_files_layout(tmp_path, reference):
    family, _, sd, _, _ = reference
    weights = {k: v for k, v in to_diffusers(sd).items() if not k.startswith("transformer_blocks.1.attn1.add_")}
    write_folder(tmp_path, tiny_config(family), weights)
    with pytest.raises(CheckpointMismatchError, match=r"missing 6 \(transformer_blocks.1.attn1.add_k_proj.bias"):
        load_transformer(tmp_path)


def test_unexpected_keys_are_named(tmp_path, reference):
    family, _, sd, _, _ = reference
    extra = {f"ref_proj.{i}.weight": torch.ones(2) for i in range(3)}
    write_folder(tmp_path, tiny_config(family), {**sd, **extra})
    with pytest.raises(CheckpointMismatchError, match=r"3 \(ref_proj.0.weight"):
        load_transformer(tmp_path)


def test_mixed_layouts_are_refused(tmp_path, reference):
    family, _, sd, _, _ = reference
    mixed = dict(sd)
    mixed.update({k: v.clone() for k, v in to_diffusers(sd).items() if ".attn1.add_q_proj." in k})
    write_folder(tmp_path, tiny_config(family), mixed)
    with pytest.raises(LayoutError, match="mixes the two V5 key layouts"):
        detect_family(tmp_path)


def test_text_projection_decides_the_family(tmp_path, reference):
    family, _, sd, _, _ = reference
    path = tmp_path / "model.safetensors"
    save_file({k: v for k, v in sd.items() if not k.startswith(("text_proj", "text_proj_t5"))}, str(path))
    with pytest.raises(LayoutError, match="neither 'text_proj_t5.weight'.*nor 'text_proj.0.weight'"):
        detect_family(path)


def test_v4_is_refused_with_what_it_is(tmp_path):
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "HunyuanTransformer3DModel"}))
    with pytest.raises(UnsupportedModelError) as err:
        load_transformer(tmp_path)
    message = str(err.value)
    assert "V4" in message and "HunyuanTransformer3DModel" in message and "V1, V2 and V3" in message and "V5 / V5.1" in message
    path = tmp_path / "hunyuan.safetensors"
    save_file({"blocks.0.attn1.to_q.weight": torch.ones(2, 2), "text_embedding_padding": torch.ones(2)}, str(path))
    with pytest.raises(UnsupportedModelError, match="V4.*V5 / V5.1"):
        load_transformer(path)


def test_motion_module_arguments_are_refused(tmp_path, reference):
    family, _, sd, _, _ = reference
    write_folder(tmp_path, tiny_config(family), sd)
    with pytest.raises(LayoutError, match="V1 PixArt base"):
        load_transformer(tmp_path, motion_module=tmp_path / "mm.safetensors")


def test_bad_inputs_are_explained(reference):
    family, model, _, inputs, _ = reference
    with pytest.raises(EasyAnimateError, match="takes 16 input channels"):
        run(model, dict(inputs, inpaint_latents=torch.zeros(2, 17, 2, 4, 6)))
    with pytest.raises(EasyAnimateError, match="Text states"):
        run(model, dict(inputs, encoder_hidden_states=torch.zeros(2, 5, 7)))
    if family == "v5":
        with pytest.raises(EasyAnimateError, match="mT5 states"):
            run(model, {k: v for k, v in inputs.items() if k != "encoder_hidden_states_t5"})
    else:
        with pytest.raises(EasyAnimateError, match="one text input"):
            run(model, dict(inputs, encoder_hidden_states_t5=torch.zeros(2, 5, 20)))


# --- numerics that the float32 fixtures cannot see --------------------------------------------------

def test_timestep_is_rounded_to_the_working_dtype():
    model = random_model("v51").to(torch.bfloat16)
    model.dtype = torch.bfloat16
    inputs = example_inputs(model, batch=1)
    a = run(model, dict(inputs, timestep=torch.tensor([979.61])))
    b = run(model, dict(inputs, timestep=torch.tensor([980.0])))  # bf16 spacing is 4 in [512, 1024)
    c = run(model, dict(inputs, timestep=torch.tensor([976.0])))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_shared_blocks_project_the_text_part(reference):
    """Blocks >= mmdit_layers have no attn2/txt_ff; their text output goes through attn1.to_out.0."""
    family, model, _, inputs, expected = reference
    block = model.transformer_blocks[2]
    assert not block.joint and not hasattr(block, "attn2") and not hasattr(block, "txt_ff")
    calls = []
    hook = block.attn1.to_out[0].register_forward_hook(lambda m, args, out: calls.append(args[0].shape[1]))
    try:
        run(model, inputs)
    finally:
        hook.remove()
    assert sorted(calls) == sorted([2 * 4 * 6 // 4, inputs["encoder_hidden_states"].shape[1]
                                    + inputs.get("encoder_hidden_states_t5", torch.zeros(0, 0)).shape[1]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_path_computes_what_the_autograd_path_computes(reference, dtype, monkeypatch):
    """Outside autograd the blocks run their lean path (q/k/v written into joint buffers, row chunks, in-place
    modulation and residuals): the same operations in the same order, so the same numbers, in float32 and
    bf16; row chunks (forced here: 5 rows) only change which rows a matrix product sees at once. The block
    inputs are left as they were (forward hooks may keep them)."""
    import easyanimate.models.mmdit as mmdit

    family, model, _, _, _ = reference
    model = random_model(family).to(dtype)
    model.dtype = dtype
    inputs = example_inputs(model, frames=3)
    kept = []
    hook = model.transformer_blocks[1].register_forward_hook(
        lambda m, args, out: kept.append((args[0], args[0].clone(), out[0], out[0].clone())))
    try:
        with torch.enable_grad():
            plain = model(**inputs)
        with torch.no_grad():
            lean = model(**inputs)
        monkeypatch.setattr(mmdit, "BLOCK_MIN_CHUNK_ROWS", 5)
        with torch.no_grad():
            chunked = model(**inputs)
    finally:
        hook.remove()
    assert torch.equal(lean, plain)
    scale = plain.float().abs().max()
    assert (chunked.float() - plain.float()).abs().max() <= (1e-6 if dtype == torch.float32 else 1e-2) * scale
    for block_input, input_copy, block_output, output_copy in kept[1:]:
        assert torch.equal(block_input, input_copy) and torch.equal(block_output, output_copy)


# --- LoRA -------------------------------------------------------------------------------------------

def _lora_names(model):
    """Every Linear of the model under kohya/EasyAnimate names (original layout, double underscore) and
    under PEFT names in the diffusers layout."""
    reverse = {ours: theirs for theirs, ours in DIFFUSERS_TEXT_STREAM.items()}
    kohya, peft = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            kohya[name] = "lora_unet__" + name.replace(".", "_")
            diffusers_name = name
            for ours, theirs in reverse.items():
                diffusers_name = diffusers_name.replace(f".{ours}", f".{theirs}")
            peft[name] = "transformer." + diffusers_name
    return kohya, peft


def _lora_files(model, rank=2, seed=3):
    kohya_names, peft_names = _lora_names(model)
    gen = torch.Generator().manual_seed(seed)
    kohya, peft = {}, {}
    for name, module in model.named_modules():
        if name not in kohya_names:
            continue
        down = torch.randn(rank, module.in_features, generator=gen) * 0.1
        up = torch.randn(module.out_features, rank, generator=gen) * 0.1
        stem = kohya_names[name]
        kohya.update({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(1.0)})
        stem = peft_names[name]
        peft.update({f"{stem}.lora_A.weight": down, f"{stem}.lora_B.weight": up, f"{stem}.alpha": torch.tensor(1.0)})
    return kohya, peft


def test_lora_names_of_both_layouts_hit_the_same_modules(reference):
    family, model, _, inputs, expected = reference
    kohya, peft = _lora_files(model)
    for name in ("lora_unet__transformer_blocks_0_attn2_to_q", "lora_unet__transformer_blocks_1_txt_ff_net_0_proj",
                 "lora_unet__transformer_blocks_0_norm1_linear", "lora_unet__norm_out_linear", "lora_unet__proj_out",
                 "lora_unet__transformer_blocks_3_attn1_to_out_0",
                 "lora_unet__text_proj_1" if family == "v51" else "lora_unet__text_proj_t5"):
        assert f"{name}.lora_down.weight" in kohya
    assert "transformer.transformer_blocks.0.attn1.add_q_proj.lora_A.weight" in peft
    assert "transformer.transformer_blocks.1.attn1.to_add_out.lora_A.weight" in peft

    by_kohya, by_peft = resolve_lora(kohya, model), resolve_lora(peft, model)
    assert by_kohya.report.complete and by_peft.report.complete
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(by_kohya.transformer.layers) == set(by_peft.transformer.layers) == linears
    assert by_peft.transformer.layers["transformer_blocks.0.attn2.to_q"].layer.stem == \
        "transformer.transformer_blocks.0.attn1.add_q_proj"
    assert by_peft.transformer.layers["transformer_blocks.1.attn2.to_out.0"].layer.stem == \
        "transformer.transformer_blocks.1.attn1.to_add_out"

    with lora_patches(model, [(by_kohya, 0.8)]):
        with_kohya = run(model, inputs)
    with lora_patches(model, [(by_peft, 0.8)]):
        with_peft = run(model, inputs)
    assert torch.equal(with_kohya, with_peft) and not torch.equal(with_kohya, expected)
    torch.testing.assert_close(run(model, inputs), expected, rtol=0, atol=0)  # restored bit for bit

    kohya_map, peft_map = comfy_key_map(kohya, model), comfy_key_map(peft, model)
    assert kohya_map["lora_unet__transformer_blocks_0_attn2_to_q"] == "transformer_blocks.0.attn2.to_q.weight"
    assert peft_map["transformer.transformer_blocks.0.attn1.add_q_proj"] == "transformer_blocks.0.attn2.to_q.weight"
    assert sorted(kohya_map.values()) == sorted(peft_map.values())
    state = model.state_dict()
    assert all(key in state for key in kohya_map.values())
    assert by_kohya.report.model_description.startswith(f"EasyAnimate {'V5.1' if family == 'v51' else 'V5'} ")


def test_kohya_names_in_the_diffusers_layout_resolve_too(reference):
    _, model, _, _, _ = reference
    down, up = torch.ones(1, 32), torch.ones(32, 1)
    lora = {"lora_unet__transformer_blocks_0_attn1_add_q_proj.lora_down.weight": down,
            "lora_unet__transformer_blocks_0_attn1_add_q_proj.lora_up.weight": up}
    assert list(resolve_lora(lora, model).transformer.layers) == ["transformer_blocks.0.attn2.to_q"]


# --- memory estimate ----------------------------------------------------------------------------------

def test_activation_bytes_grows_with_tokens(reference):
    _, model, _, _, _ = reference
    base = model.activation_bytes(2, 3, 8, 12, 10)
    assert model.activation_bytes(2, 3, 8, 12, 40) > base  # more text tokens
    assert model.activation_bytes(2, 5, 8, 12, 10) > base  # more frames
    assert model.activation_bytes(2, 3, 16, 12, 10) > base  # more rows
    assert model.activation_bytes(4, 3, 8, 12, 10) > base  # larger batch
    tokens = 2 * (3 * 4 * 6 + 10) * model.config.hidden_size * 4
    assert base >= tokens * 8  # several working copies of every token activation


def test_release_estimate_is_plausible():
    with torch.device("meta"):
        model = EasyAnimateMMDiT(MMDiTConfig.from_dict(family_preset("v51"), "v51"), dtype=torch.bfloat16)
    # 49 frames at 576x1008: 13 latent frames of 72x126 -> 29,484 video tokens + 256 text tokens, CFG batch 2.
    estimate = model.activation_bytes(2, 13, 72, 126, 256)
    assert 2e9 < estimate < 1e10
