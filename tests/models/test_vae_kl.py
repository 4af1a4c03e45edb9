"""V1: the SD image VAE applied frame by frame, on a tiny random model."""
import json

import pytest
import torch
from safetensors.torch import save_file

from easyanimate.models.vae_kl import OLD_ATTENTION_NAMES, rename_old_attention
from easyanimate.vae import build_vae, load_vae

TINY_KL = {"block_out_channels": [8, 16, 32, 32], "norm_num_groups": 4}


@pytest.fixture(scope="module")
def v1():
    torch.manual_seed(0)
    return build_vae("v1", TINY_KL)


@torch.no_grad()
def test_decode_is_the_2d_decoder_on_every_frame(v1):
    z = torch.randn(2, 4, 3, 2, 3)
    out = v1.decode(z)
    assert out.shape == (2, 3, 3, 16, 24)
    model = v1.model
    for f in range(3):
        frame = model.decoder(model.post_quant_conv(z[:, :, f]))
        torch.testing.assert_close(out[:, :, f], frame, rtol=0, atol=1e-6)


@torch.no_grad()
def test_encode_keeps_frames_and_divides_space_by_8(v1):
    video = torch.rand(1, 3, 5, 16, 24) * 2 - 1
    posterior = v1.encode(video)
    assert posterior.mean.shape == (1, 4, 5, 2, 3)
    single = v1.model.quant_conv(v1.model.encoder(video[:, :, 2]))
    torch.testing.assert_close(posterior.mean[:, :, 2], single[:, :4], rtol=0, atol=1e-6)


@torch.no_grad()
def test_pipeline_decode_has_no_smoothing_and_maps_to_unit_range(v1):
    z = torch.randn(1, 4, 12, 2, 3) * v1.scaling_factor
    video = v1.decode_video(z, reference_parity=True, generator=torch.Generator().manual_seed(0))
    expected = (v1.decode(z * (1 / v1.scaling_factor)) / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(video, expected, rtol=0, atol=1e-6)


def test_old_attention_names_are_mapped():
    assert rename_old_attention("encoder.mid_block.attentions.0.query.weight") == "encoder.mid_block.attentions.0.to_q.weight"
    assert rename_old_attention("decoder.mid_block.attentions.0.proj_attn.bias") == "decoder.mid_block.attentions.0.to_out.0.bias"
    assert rename_old_attention("encoder.down_blocks.0.resnets.0.conv1.weight") == "encoder.down_blocks.0.resnets.0.conv1.weight"


@torch.no_grad()
@pytest.mark.parametrize("old_names", [False, True], ids=["modern", "old-attention-names"])
def test_loads_a_diffusers_vae_folder(tmp_path, v1, old_names):
    state = {k: v.contiguous() for k, v in v1.model.state_dict().items()}
    if old_names:
        modern = {new: old for old, new in OLD_ATTENTION_NAMES.items()}
        renamed = {}
        for key, value in state.items():
            for new, old in modern.items():
                key = key.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
            renamed[key] = value
        assert any(".query." in k for k in renamed)
        state = renamed
    folder = tmp_path / "PixArt" / "vae"
    folder.mkdir(parents=True)
    config = {
        "_class_name": "AutoencoderKL", "_diffusers_version": "0.27.0", "act_fn": "silu",
        "block_out_channels": [8, 16, 32, 32], "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4, "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "layers_per_block": 2, "norm_num_groups": 4, "sample_size": 256, "scaling_factor": 0.18215, "force_upcast": True,
    }
    (folder / "config.json").write_text(json.dumps(config))
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    loaded = load_vae(tmp_path / "PixArt")
    assert loaded.family == "v1"
    z = torch.randn(1, 4, 2, 2, 3)
    torch.testing.assert_close(loaded.decode(z), v1.decode(z), rtol=0, atol=0)
    half = load_vae(folder, dtype="fp16")
    assert half.compute_dtype == torch.float32  # force_upcast
