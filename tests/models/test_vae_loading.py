"""Loading V2/V3 VAEs from the layouts users have, and the errors for bad files.

Tiny checkpoints are written in tmp_path in the released layouts: a release folder with `vae/`
(config.json + diffusion_pytorch_model.safetensors), old and rewritten configs, `loss.*` training
leftovers, single files, legacy `.bin`, and damaged files.
"""
import json

import pytest
import torch
from safetensors.torch import save_file

from easyanimate.errors import CheckpointMismatchError, CorruptCheckpointError, LayoutError, UnsupportedModelError
from easyanimate.frames import FrameCountError
from easyanimate.vae import build_vae, load_vae

TINY = {"ch": 8, "ch_mult": [1, 2, 4, 4], "norm_num_groups": 4}
BLOCKS = {
    "down_block_types": ["SpatialDownBlock3D"] + ["SpatialTemporalDownBlock3D"] * 3,
    "up_block_types": ["SpatialUpBlock3D"] + ["SpatialTemporalUpBlock3D"] * 3,
}
# The shape of the original (803 B) V3 config: PixArt's AutoencoderKL config plus MagViT keys, no ch/ch_mult.
OLD_V3_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.28.2", "act_fn": "silu",
    "block_out_channels": [8, 16, 32, 32], **BLOCKS, "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 4, "sample_size": 256, "scaling_factor": 0.18215, "force_upcast": True,
    "slice_compression_vae": True, "use_tiling": True, "mini_batch_encoder": 8, "mini_batch_decoder": 2,
    "mid_block_attention_type": "3d",
}
# A V5-era rewrite: more fields, some unknown to us.
REWRITTEN_V2_CONFIG = {
    "_class_name": "AutoencoderKLMagvit", "_diffusers_version": "0.30.1", **TINY, **BLOCKS,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "mid_block_type": "MidBlock3D",
    "mid_block_use_attention": True, "mid_block_attention_type": "3d", "mid_block_num_attention_heads": 1,
    "scaling_factor": 0.18215, "slice_compression_vae": False, "slice_mag_vae": True, "cache_compression_vae": False,
    "cache_mag_vae": False, "use_tiling_encoder": False, "use_tiling_decoder": False, "upcast_vae": False,
    "spatial_group_norm": False, "mini_batch_encoder": 9, "mini_batch_decoder": 3, "tile_sample_min_size": 384,
    "tile_overlap_factor": 0.25, "transformer_type": "Transformer3DModel",
}
LOSS_KEYS = {
    "loss.logvar": torch.zeros(()),
    "loss.discriminator.main.0.weight": torch.randn(4, 3, 4, 4),
    "loss.discriminator3d.blocks.1.norm.running_mean": torch.zeros(4),
    "loss.discriminator3d.blocks.1.norm.num_batches_tracked": torch.tensor(3),
    "loss.perceptual_loss.net.slice1.0.weight": torch.randn(4, 3, 3, 3),
}


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    return build_vae("v3", {**TINY, "use_tiling": False})


def _state(vae):
    return {k: v.contiguous() for k, v in vae.model.state_dict().items()}


def _write_release(root, state, config):
    folder = root / "vae"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    return folder


def _same_decode(a, b):
    z = torch.randn(1, 4, 4, 2, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.decode(z, tiling=False), b.decode(z, tiling=False), rtol=0, atol=0)


def test_release_folder_with_old_config_and_loss_keys(tmp_path, source):
    _write_release(tmp_path / "EasyAnimateV3", {**_state(source), **LOSS_KEYS}, OLD_V3_CONFIG)
    vae = load_vae(tmp_path / "EasyAnimateV3")
    assert vae.family == "v3" and vae.rules.frames_per_chunk == 8 and vae.rules.lone_first_frame
    assert vae.tiling is not None and vae.tiling.sample_size == 384  # use_tiling true, reference constants
    assert vae.config["ch"] == 8 and vae.config["ch_mult"] == [1, 2, 4, 4]  # read from the weights
    _same_decode(vae, source)


def test_rewritten_config_unknown_keys_are_ignored(tmp_path, source):
    folder = _write_release(tmp_path / "EasyAnimateV2", _state(source), REWRITTEN_V2_CONFIG)
    vae = load_vae(folder)
    assert vae.family == "v2" and vae.rules.frames_per_chunk == 9 and vae.rules.causal and vae.tiling is None
    z = torch.randn(1, 4, 3, 2, 3)
    assert vae.decode(z).shape[2] == 9


def test_single_file_needs_the_family(tmp_path, source):
    path = tmp_path / "easyanimate_v3_vae.safetensors"
    save_file({"vae." + k: v for k, v in _state(source).items()}, path)  # prefixed, as some exports are
    with pytest.raises(LayoutError, match="family='v2' or family='v3'"):
        load_vae(path)
    vae = load_vae(path, family="v3", config={"norm_num_groups": 4, "use_tiling": False})
    _same_decode(vae, source)


def test_legacy_bin_file(tmp_path, source):
    path = tmp_path / "vae.bin"
    torch.save({"state_dict": _state(source)}, path)
    vae = load_vae(path, family="v3", config={"norm_num_groups": 4})
    _same_decode(vae, source)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_low_precision_loading(tmp_path, source, dtype):
    folder = _write_release(tmp_path / "rel", _state(source), {**OLD_V3_CONFIG, "use_tiling": False})
    vae = load_vae(folder, dtype=dtype)
    weight = vae.model.decoder.conv_in.weight
    original = source.model.decoder.conv_in.weight
    if dtype == "bf16":
        assert weight.dtype == torch.bfloat16 and vae.compute_dtype == torch.bfloat16
    else:
        # fp16 as the reference does it: weights rounded to fp16, computed in float32 (`upcast_vae`)
        assert weight.dtype == torch.float32 and vae.compute_dtype == torch.float32
        assert torch.equal(weight, original.half().float())
    z = torch.randn(1, 4, 2, 2, 3)
    ours, full = vae.decode(z), source.decode(z)
    assert ours.dtype == torch.float32 and (ours - full).abs().max() / full.abs().max() < 0.05


def test_truncated_and_garbage_files(tmp_path, source):
    good = tmp_path / "good.safetensors"
    save_file(_state(source), good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        load_vae(truncated, family="v3")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 3)
    with pytest.raises(CorruptCheckpointError):
        load_vae(garbage, family="v3")


def test_missing_and_unexpected_keys_are_named(tmp_path, source):
    state = _state(source)
    del state["decoder.conv_out.bias"]
    folder = _write_release(tmp_path / "a", state, {**TINY, **BLOCKS, "slice_compression_vae": True})
    with pytest.raises(CheckpointMismatchError, match="decoder.conv_out.bias"):
        load_vae(folder)
    extra = {**_state(source), "decoder.extra_head.weight": torch.zeros(2)}
    folder = _write_release(tmp_path / "b", extra, {**TINY, **BLOCKS, "slice_compression_vae": True})
    with pytest.raises(CheckpointMismatchError, match="unexpected.*extra_head"):
        load_vae(folder)


def test_config_that_does_not_describe_the_weights(tmp_path, source):
    folder = _write_release(tmp_path / "c", _state(source), {**TINY, **BLOCKS, "ch": 16, "slice_compression_vae": True})
    with pytest.raises(CheckpointMismatchError, match="shape"):
        load_vae(folder)


def test_unsupported_and_unknown_layouts(tmp_path, source):
    folder = _write_release(tmp_path / "v5", _state(source), {**REWRITTEN_V2_CONFIG, "cache_mag_vae": True})
    with pytest.raises(UnsupportedModelError, match="V5"):
        load_vae(folder)
    with pytest.raises(LayoutError, match="does not exist"):
        load_vae(tmp_path / "nowhere")
    ldm = tmp_path / "ldm.safetensors"
    save_file({"encoder.down.0.block.0.norm1.weight": torch.zeros(4)}, ldm)
    with pytest.raises(LayoutError, match="LDM"):
        load_vae(ldm)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LayoutError, match="no weight files"):
        load_vae(empty)


def test_bad_sizes_are_refused_with_the_valid_ones(source):
    with pytest.raises(FrameCountError, match="multiples of 8"):
        source.encode(torch.zeros(1, 3, 8, 20, 24))


def test_explicit_family_overrides_the_configs_driving_mode(tmp_path, source):
    folder = _write_release(tmp_path / "d", _state(source), {**TINY, **BLOCKS, "slice_compression_vae": True})
    vae = load_vae(folder, family="v2")
    assert vae.family == "v2" and (vae.rules.frames_per_chunk, vae.rules.latents_per_chunk) == (9, 3)
    with pytest.raises(LayoutError, match="V3 VAE"):
        load_vae(folder, family="v1")
