"""Loading the transformer from every released layout, and the errors for bad input."""
import json

import pytest
import torch
from safetensors.torch import save_file

from easyanimate.errors import (
    CheckpointMismatchError, CorruptCheckpointError, EasyAnimateError, LayoutError, UnsupportedModelError,
)
from easyanimate.loading import detect_family, load_transformer
from tiny import example_inputs, full_state_dict, random_model, run, tiny_config_dict, write_folder


@pytest.fixture(scope="module", params=["v1", "v2", "v3"])
def reference(request):
    """A tiny random model of each family, its state dict as released, and its output."""
    family = request.param
    model = random_model(family)
    inputs = example_inputs(model, height=4 if family == "v1" else 6)
    return family, model, full_state_dict(model), inputs, run(model, inputs)


def assert_same(model, reference):
    family, _, _, inputs, expected = reference
    assert model.config.family == family
    torch.testing.assert_close(run(model, inputs), expected, rtol=0, atol=0)


def test_diffusers_folder(tmp_path, reference):
    family, _, sd, _, _ = reference
    folder = write_folder(tmp_path / "transformer", tiny_config_dict(family), sd)
    assert detect_family(folder).family == family
    assert_same(load_transformer(folder), reference)


def test_release_root_with_sharded_weights(tmp_path, reference):
    family, _, sd, _, _ = reference
    write_folder(tmp_path / "transformer", tiny_config_dict(family), sd, shards=3)
    for sub in ("vae", "text_encoder", "tokenizer", "scheduler"):
        (tmp_path / sub).mkdir()
    assert_same(load_transformer(tmp_path), reference)


def test_rewritten_config_with_unknown_and_missing_keys(tmp_path, reference):
    family, _, sd, _, _ = reference
    config = tiny_config_dict(family)
    for key in ("norm_eps", "patch_size", "activation_fn", "norm_type", "motion_module_type", "basic_block_type"):
        config.pop(key)
    config.update(transformer_type="Transformer3DModel", decay=0.9999, optimization_step=4400, some_future_key=[1, 2])
    write_folder(tmp_path, config, sd)
    assert_same(load_transformer(tmp_path), reference)


def test_legacy_bin_folder_loads_with_weights_only(tmp_path, reference):
    family, _, sd, _, _ = reference
    tmp_path.joinpath("config.json").write_text(json.dumps(tiny_config_dict(family)))
    torch.save(sd, tmp_path / "diffusion_pytorch_model.bin")
    assert_same(load_transformer(tmp_path), reference)


@pytest.mark.parametrize("wrap", ["plain", "prefix_transformer", "prefix_comfy", "state_dict_pt"])
def test_single_file_variants(tmp_path, reference, wrap):
    family, _, sd, _, _ = reference
    config = tiny_config_dict(family)
    if wrap == "plain":
        path = tmp_path / "model.safetensors"
        save_file(sd, str(path))
    elif wrap == "prefix_transformer":
        path = tmp_path / "model.safetensors"
        save_file({f"transformer.{k}": v for k, v in sd.items()}, str(path))
    elif wrap == "prefix_comfy":
        path = tmp_path / "model.safetensors"
        save_file({f"model.diffusion_model.{k}": v for k, v in sd.items()}, str(path))
    else:
        path = tmp_path / "model.pt"
        torch.save({"state_dict": sd, "epoch": 3}, path)
    assert_same(load_transformer(path, config=config), reference)


def test_single_file_config_from_shapes(tmp_path, monkeypatch):
    """A config-less single file gets the family preset with sizes read from its tensors."""
    import easyanimate.loading as loading

    family = "v3"
    tiny = tiny_config_dict(family, num_layers=17)
    # Pretend the released V3 size is our tiny width so the preset's head count applies.
    monkeypatch.setattr(loading, "family_preset", lambda fam: dict(tiny, num_layers=28, in_channels=4, caption_channels=4096))
    model = random_model(family, num_layers=17)
    path = tmp_path / "EasyAnimateV3-tiny-bf16.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in full_state_dict(model).items()}, str(path))
    loaded = load_transformer(path, dtype="bf16")
    assert loaded.config.num_layers == 17 and loaded.config.in_channels == 12 and loaded.config.caption_channels == 24
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_while_loading(tmp_path, reference, dtype):
    family, _, sd, inputs, expected = reference
    folder = write_folder(tmp_path, tiny_config_dict(family), sd)
    model = load_transformer(folder, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    out = run(model, inputs).float()
    assert torch.isfinite(out).all()
    assert (out - expected).abs().max() / expected.abs().max() < 0.05  # same model, half precision


def test_v1_pixart_base_plus_motion_module_and_personalized(tmp_path):
    model = random_model("v1")
    sd = full_state_dict(model)
    motion = {k: v for k, v in sd.items() if ".attn_temporal." in k}
    base2d = {k: v for k, v in sd.items() if ".attn_temporal." not in k}
    # The base is a PixArt 2-D folder; the personalized checkpoint replaces its 2-D weights.
    stale = {k: torch.zeros_like(v) for k, v in base2d.items()}
    pixart_config = {k: v for k, v in tiny_config_dict("v1").items()
                     if not k.startswith(("motion_module", "basic_block", "enable_uvit"))}
    pixart_config["_class_name"] = "Transformer2DModel"
    write_folder(tmp_path / "PixArt" / "transformer", pixart_config, stale)
    save_file(motion, str(tmp_path / "mm.safetensors"))
    torch.save({"state_dict": base2d}, tmp_path / "portrait.pt")

    source = detect_family(tmp_path / "PixArt")
    assert source.family == "v1" and source.is_2d_base
    with pytest.raises(LayoutError, match="motion module"):
        load_transformer(tmp_path / "PixArt")
    tiny_motion = {"motion_module_kwargs": tiny_config_dict("v1")["motion_module_kwargs"]}
    loaded = load_transformer(tmp_path / "PixArt", motion_module=tmp_path / "mm.safetensors",
                              personalized=tmp_path / "portrait.pt", config=tiny_motion)
    inputs = example_inputs(model, height=4)
    torch.testing.assert_close(run(loaded, inputs), run(model, inputs), rtol=0, atol=0)


def test_motion_module_file_alone_is_explained(tmp_path):
    sd = full_state_dict(random_model("v1"))
    path = tmp_path / "easyanimate_v1_mm.safetensors"
    save_file({k: v for k, v in sd.items() if ".attn_temporal." in k}, str(path))
    with pytest.raises(LayoutError, match="motion-module"):
        load_transformer(path)


# --- refused models -------------------------------------------------------------------------------

def test_v4_is_refused_by_name(tmp_path):
    # V5/V5.1 (EasyAnimateTransformer3DModel) load: tests/models/test_mmdit.py.
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps({"_class_name": "HunyuanTransformer3DModel"}))
    with pytest.raises(UnsupportedModelError, match="V4.*V1, V2 and V3.*V5"):
        detect_family(tmp_path)


def test_text_encoder_2_means_v4(tmp_path, reference):
    family, _, sd, _, _ = reference
    write_folder(tmp_path / "transformer", tiny_config_dict(family), sd)
    (tmp_path / "text_encoder_2").mkdir()
    with pytest.raises(UnsupportedModelError, match="text_encoder_2"):
        load_transformer(tmp_path)


# --- bad input ------------------------------------------------------------------------------------

def test_unrecognised_folder_lists_what_was_found(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(LayoutError) as err:
        load_transformer(tmp_path)
    message = str(err.value)
    assert "unet/" in message and "readme.txt" in message and "transformer/config.json" in message


def test_missing_keys_are_named_with_counts(tmp_path, reference):
    family, _, sd, _, _ = reference
    dropped = sorted(k for k in sd if k.startswith("transformer_blocks.1."))
    write_folder(tmp_path, tiny_config_dict(family), {k: v for k, v in sd.items() if k not in dropped})
    with pytest.raises(CheckpointMismatchError) as err:
        load_transformer(tmp_path)
    n_missing = len([k for k in dropped if not k.endswith(".pe")])
    assert f"missing {n_missing} (" in str(err.value) and "transformer_blocks.1." in str(err.value)


def test_unexpected_keys_are_named_with_counts(tmp_path, reference):
    family, _, sd, _, _ = reference
    extra = {f"lora_extra.{i}.weight": torch.ones(2) for i in range(7)}
    write_folder(tmp_path, tiny_config_dict(family), {**sd, **extra})
    with pytest.raises(CheckpointMismatchError, match=r"7 \(lora_extra.0.weight.*and 2 more"):
        load_transformer(tmp_path)


def test_shape_mismatch_names_key_and_both_shapes(tmp_path, reference):
    family, _, sd, _, _ = reference
    wrong = {**sd, "caption_projection.linear_2.weight": torch.zeros(32, 40)}
    write_folder(tmp_path, tiny_config_dict(family), wrong)
    with pytest.raises(CheckpointMismatchError, match=r"caption_projection.linear_2.weight.*\(32, 40\).*\(32, 32\)"):
        load_transformer(tmp_path)


def test_config_size_contradicting_the_weights_is_refused_before_building(tmp_path, reference):
    family, _, sd, _, _ = reference
    write_folder(tmp_path, tiny_config_dict(family, caption_channels=40), sd)
    with pytest.raises(CheckpointMismatchError, match=r"config.json.*caption_channels = 40, but the weights hold 24"):
        load_transformer(tmp_path)


def test_truncated_safetensors_names_the_file(tmp_path, reference):
    family, _, sd, _, _ = reference
    folder = write_folder(tmp_path, tiny_config_dict(family), sd)
    weights = folder / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptCheckpointError, match="diffusion_pytorch_model.safetensors.*damaged or truncated"):
        load_transformer(folder)


def test_garbage_file_is_reported_as_damaged(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"<html>404 not found</html>" * 10)
    with pytest.raises(CorruptCheckpointError, match="model.safetensors"):
        load_transformer(path, config=tiny_config_dict("v3"))


class Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickle_with_code_is_never_executed(tmp_path, capsys):
    path = tmp_path / "model.pt"
    torch.save({"state_dict": {"x": torch.ones(1)}, "evil": Payload()}, path)
    with pytest.raises(CorruptCheckpointError, match="pickled Python objects"):
        load_transformer(path, config=tiny_config_dict("v3"))
    assert "pickled code ran" not in capsys.readouterr().out


def test_index_listing_a_missing_shard(tmp_path, reference):
    family, _, sd, _, _ = reference
    folder = write_folder(tmp_path, tiny_config_dict(family), sd, shards=2)
    next(folder.glob("*-00002-of-00002.safetensors")).unlink()
    with pytest.raises(LayoutError, match="00002-of-00002.*incomplete"):
        load_transformer(folder)


def test_not_a_transformer_checkpoint(tmp_path):
    path = tmp_path / "vae.safetensors"
    save_file({"encoder.conv_in.weight": torch.ones(2, 3)}, str(path))
    with pytest.raises(LayoutError, match="encoder.conv_in.weight"):
        load_transformer(path)


def test_unsupported_settings_are_refused(tmp_path, reference):
    family, _, sd, _, _ = reference
    write_folder(tmp_path, tiny_config_dict(family, qk_norm=True), sd)
    with pytest.raises(EasyAnimateError, match="qk_norm"):
        load_transformer(tmp_path)


def test_wrong_text_width_is_explained(reference):
    family, model, _, inputs, _ = reference
    bad = dict(inputs, encoder_hidden_states=torch.randn(2, 7, 768))
    with pytest.raises(EasyAnimateError, match="T5"):
        run(model, bad)
