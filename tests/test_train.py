"""Training code on tiny configs: losses go down, runs resume exactly, outputs load as releases do."""
import json

import numpy as np
import pytest
import torch

from easyanimate.train import synthetic
from easyanimate.train.common import read_loss_log
from easyanimate.train.vae import (DEMO_VAE_CONFIG, VAETrainConfig, build_trainable_vae, preview_error,
                                   preview_target, temporal_change, train_vae, vae_loss)

TINY_VAE = dict(DEMO_VAE_CONFIG, ch=4)
TINY_DIT = {"num_layers": 2, "num_attention_heads": 1, "attention_head_dim": 32, "cross_attention_dim": 32,
            "sample_size": 4, "motion_module_kwargs_even": {"num_attention_heads": 2},
            "motion_module_kwargs_odd": {"num_attention_heads": 2}}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny data folder (8 clips of 8 frames, 32 px), a trained-for-4-steps VAE and the text encoder."""
    from easyanimate.train.text import train_text

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("train")
    synthetic.write_folder(root / "data", 8, seed=1, frames=8, size=32)
    train_vae(VAETrainConfig(data=str(root / "data"), out=str(root / "vae"), steps=4, clips_per_batch=2,
                             images_per_batch=2, frames=8, save_every=2, model=TINY_VAE, print_every=1000))
    train_text(None, str(root / "text"), captions=synthetic.all_captions())
    return root


def test_vae_steps_reduce_the_loss():
    torch.manual_seed(0)
    vae = build_trainable_vae(TINY_VAE)
    spec = synthetic.make_specs(2, seed=3, frames=8, size=32)
    pixels = torch.stack([torch.from_numpy(synthetic.render_clip(s, 8, 32)) for s in spec]).permute(0, 4, 1, 2, 3) * 2 - 1
    optimizer = torch.optim.Adam(vae.model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss, _ = vae_loss(vae, pixels, 1e-4, 9.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_temporal_change_is_the_scale_free_mean_square_step():
    torch.manual_seed(0)
    still = torch.randn(2, 4, 1, 3, 3).expand(2, 4, 5, 3, 3)
    assert temporal_change(still).item() == 0.0
    moving = torch.randn(2, 4, 5, 3, 3)
    expected = sum((moving[:, :, i + 1] - moving[:, :, i]).square().mean() for i in range(4)) / 4 / moving.var()
    assert temporal_change(moving).item() == pytest.approx(expected.item(), rel=1e-4)
    assert temporal_change(10 * moving).item() == pytest.approx(temporal_change(moving).item(), rel=1e-4)
    assert temporal_change(moving[:, :, :1]).item() == 0.0  # a lone frame has no step


def test_vae_temporal_weight_adds_the_term_and_steadies_the_latents():
    torch.manual_seed(0)
    vae = build_trainable_vae(TINY_VAE)
    spec = synthetic.make_specs(2, seed=3, frames=16, size=32)
    pixels = torch.stack([torch.from_numpy(synthetic.render_clip(s, 16, 32)) for s in spec]).permute(0, 4, 1, 2, 3) * 2 - 1
    torch.manual_seed(1)
    plain, plain_terms = vae_loss(vae, pixels, 1e-4, 9.0)
    torch.manual_seed(1)
    with_term, terms = vae_loss(vae, pixels, 1e-4, 9.0, temporal_weight=0.5)
    assert "temporal" not in plain_terms and terms["temporal"] > 0
    assert with_term.item() == pytest.approx(plain.item() + 0.5 * terms["temporal"], rel=1e-5)
    optimizer = torch.optim.Adam(vae.model.parameters(), lr=3e-3)
    for _ in range(15):
        loss, terms_now = vae_loss(vae, pixels, 1e-4, 9.0, temporal_weight=1.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert terms_now["temporal"] < 0.5 * terms["temporal"]


def test_preview_target_averages_each_latent_frames_own_pixels():
    torch.manual_seed(0)
    pixels = torch.rand(2, 3, 16, 32, 32) * 2 - 1
    target = preview_target(pixels, (2, 4, 4, 4, 4))
    assert target.shape == (2, 3, 4, 4, 4)
    # latent frame 2, cell (1, 3) stands for frames 8..11, pixels 8..15 x 24..31
    assert target[1, :, 2, 1, 3].tolist() == pytest.approx(pixels[1, :, 8:12, 8:16, 24:32].mean((1, 2, 3)).tolist(), abs=1e-6)
    assert preview_target(pixels[:, :, :1], (2, 4, 1, 4, 4)).shape == (2, 3, 1, 4, 4)
    with pytest.raises(ValueError, match="do not split evenly"):
        preview_target(pixels[:, :, :15], (2, 4, 4, 4, 4))


def test_preview_error_is_zero_for_latents_that_show_their_frames():
    torch.manual_seed(0)
    pixels = torch.rand(1, 3, 16, 32, 32) * 2 - 1
    target = preview_target(pixels, (1, 4, 4, 4, 4))
    latents = torch.cat([target, torch.randn(1, 1, 4, 4, 4)], dim=1)  # channels 0-2 are the preview
    head = torch.nn.Linear(4, 3)
    with torch.no_grad():
        head.weight.copy_(torch.eye(3, 4))
        head.bias.zero_()
    assert preview_error(latents, pixels, head, 9.0).item() < 1e-10
    shifted = latents.roll(1, dims=-1)  # the object one cell off
    assert preview_error(shifted, pixels, head, 9.0).item() > 1e-3


def test_vae_fine_tuning_starts_from_the_given_vae(workspace, tmp_path):
    from easyanimate.vae import load_vae

    source = load_vae(workspace / "vae", dtype="fp32").model.state_dict()
    cfg = VAETrainConfig(data=str(workspace / "data"), out=str(tmp_path / "tuned"), steps=1, clips_per_batch=1,
                         images_per_batch=1, frames=8, lr=0.0, warmup=0, model=TINY_VAE, print_every=1000,
                         init_from=str(workspace / "vae"), temporal_weight=0.1, preview_weight=1.0)
    train_vae(cfg)
    tuned = load_vae(tmp_path / "tuned", dtype="fp32").model.state_dict()
    assert all(torch.equal(tuned[k], source[k]) for k in source)  # lr 0: the weights are the source's
    assert {"temporal", "preview"} <= set(read_loss_log(tmp_path / "tuned")[0])
    assert "preview_head" in torch.load(tmp_path / "tuned" / "checkpoint.pt", weights_only=True)["extra"]


def test_vae_decoder_only_fine_tuning_keeps_the_encoder_and_the_latent_scale(workspace, tmp_path):
    from easyanimate.vae import load_vae

    source_vae = load_vae(workspace / "vae", dtype="fp32")
    source = source_vae.model.state_dict()
    train_vae(VAETrainConfig(data=str(workspace / "data"), out=str(tmp_path / "dec"), steps=3, clips_per_batch=1,
                             images_per_batch=1, frames=8, lr=1e-2, warmup=0, model=TINY_VAE, print_every=1000,
                             init_from=str(workspace / "vae"), decoder_only=True))
    tuned_vae = load_vae(tmp_path / "dec", dtype="fp32")
    tuned = tuned_vae.model.state_dict()
    for key in source:
        frozen = key.startswith(("encoder.", "quant_conv."))
        assert torch.equal(tuned[key], source[key]) == frozen, key
    assert tuned_vae.scaling_factor == source_vae.scaling_factor  # not re-measured: the latents are the same
    recorded = json.loads((tmp_path / "dec" / "train_config.json").read_text())
    assert recorded["decoder_only"] and recorded["model"]["scaling_factor"] == source_vae.scaling_factor
    pixels = torch.rand(1, 3, 8, 32, 32) * 2 - 1
    assert torch.equal(tuned_vae.encode_latents(pixels, sample=False), source_vae.encode_latents(pixels, sample=False))


def test_vae_decoder_only_needs_a_vae_to_start_from(workspace, tmp_path):
    with pytest.raises(ValueError, match="init_from"):
        train_vae(VAETrainConfig(data=str(workspace / "data"), out=str(tmp_path / "x"), steps=1, model=TINY_VAE,
                                 decoder_only=True))
    with pytest.raises(ValueError, match="frozen"):
        train_vae(VAETrainConfig(data=str(workspace / "data"), out=str(tmp_path / "y"), steps=1, model=TINY_VAE,
                                 decoder_only=True, init_from=str(workspace / "vae"), preview_weight=1.0))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # refused before any run folder is made


def test_vae_run_writes_a_loadable_v3_vae(workspace):
    from easyanimate.vae import load_vae

    vae = load_vae(workspace / "vae", dtype="fp32")
    assert vae.family == "v3" and vae.rules.frames_per_chunk == 8
    config = json.loads((workspace / "vae" / "vae" / "config.json").read_text())
    assert config["slice_compression_vae"] is True and config["scaling_factor"] > 0
    latents = vae.encode_latents(torch.zeros(1, 3, 8, 32, 32), sample=False)
    assert latents.shape == (1, 4, 2, 4, 4)
    assert [row["step"] for row in read_loss_log(workspace / "vae")] == [1, 2, 3, 4]


def test_dit_objective_learns_and_variance_term_is_finite(workspace):
    from easyanimate.train.dit import DiTTrainConfig, Diffusion, build_cache, build_transformer, demo_transformer_config
    from easyanimate.train.dit import make_batch, training_loss

    cache = build_cache(workspace / "data", workspace / "vae" / "vae", workspace / "text", frames=8, seed=0)
    config = demo_transformer_config(dict(TINY_DIT, caption_channels=int(cache.text.shape[-1])))
    model = build_transformer(config, seed=0).train()
    cfg = DiTTrainConfig(data="", vae="", text="", out="", video_batch=4, image_batch=4, frames=8)
    batch = make_batch(cache, cfg, step=0)
    assert batch["inpaint"].shape[1] == 8 and batch["x0"].shape == (4, 4, 2, 4, 4)
    diffusion = Diffusion()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(25):
        terms = training_loss(model, diffusion, batch)
        assert torch.isfinite(terms["vb"])
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        losses.append(terms["loss"].item())
    assert losses[-1] < 0.8 * losses[0]


def test_mse_weighting_follows_the_snr_and_is_off_by_default():
    from easyanimate.train.dit import Diffusion

    # SNR of the linear schedule, computed here from its definition: alpha_bar = prod(1 - beta).
    betas = np.linspace(1e-4, 0.02, 1000)
    alpha_bar = np.cumprod(1 - betas)
    snr = alpha_bar / (1 - alpha_bar)
    diffusion = Diffusion()
    t = torch.tensor([0, 100, 300, 500, 700, 999])
    cap = 20.0
    expected = np.minimum(1 + 1 / snr[t.numpy()], cap)
    expected = expected / expected.mean()
    np.testing.assert_allclose(diffusion.mse_weights(t, cap).numpy(), expected, rtol=1e-4)
    assert expected[-1] == expected[-2] > expected[2] > expected[0]  # capped at the noisy end, rising before it

    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 4, 2, 3, 3, generator=gen), torch.randn(6, 4, 2, 3, 3, generator=gen)
    output = torch.randn(6, 8, 2, 3, 3, generator=gen)
    x_t = diffusion.add_noise(x0, noise, t)
    per_sample = (output[:, :4] - noise).square().flatten(1).mean(1)
    plain = diffusion.losses(output, x0, x_t, noise, t)
    weighted = diffusion.losses(output, x0, x_t, noise, t, mse_weight_cap=cap)
    torch.testing.assert_close(plain["mse"], per_sample.mean())
    torch.testing.assert_close(weighted["mse"], (per_sample * torch.tensor(expected, dtype=torch.float32)).mean())
    torch.testing.assert_close(weighted["vb"], plain["vb"])  # the variance term is not reweighted


def test_dit_run_resumes_exactly_and_exports_a_release(workspace):
    from easyanimate.pipeline import load_model
    from easyanimate.train.dit import DiTTrainConfig, train_dit

    def config(out, **extra):
        return DiTTrainConfig(data=str(workspace / "data"), vae=str(workspace / "vae"), text=str(workspace / "text"),
                              out=str(workspace / out), steps=6, video_batch=2, image_batch=2, image_every=3, frames=8,
                              save_every=100, print_every=1000, warmup=2, model=TINY_DIT, **extra)

    assert train_dit(config("dit_split", stop_at=3)) is None  # interrupted after step 3
    assert [r["step"] for r in read_loss_log(workspace / "dit_split")] == [1, 2, 3]
    split = train_dit(config("dit_split"))  # resumes at step 4
    whole = train_dit(config("dit_whole"))
    a = torch.load(workspace / "dit_split" / "checkpoint.pt", weights_only=True)
    b = torch.load(workspace / "dit_whole" / "checkpoint.pt", weights_only=True)
    for key in b["ema"]:
        torch.testing.assert_close(a["ema"][key], b["ema"][key], rtol=0, atol=0)
    steps = [r["step"] for r in read_loss_log(workspace / "dit_split")]
    assert steps == [1, 2, 3, 4, 5, 6]

    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (split / sub).is_dir()
    model = load_model(split, dtype="fp32")
    assert model.family == "v3" and model.transformer.config.in_channels == 12
    workspace.joinpath("release").symlink_to(split)


def test_lora_training_writes_easyanimate_format(workspace):
    from safetensors.torch import load_file

    from easyanimate.train.lora import LoRATrainConfig, train_lora

    release = workspace / "release"
    if not release.exists():
        pytest.skip("needs the release of the resume test")
    path = train_lora(LoRATrainConfig(model=str(release), data=str(workspace / "data"), out=str(workspace / "lora"),
                                      steps=3, rank=2, alpha=2.0, video_batch=2, image_batch=2, frames=8,
                                      print_every=1000, warmup=1))
    tensors = load_file(str(path))
    assert "lora_unet__transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert "lora_unet__transformer_blocks_0_attn1_to_out_0.lora_up.weight" in tensors
    assert any("_attn_temporal_" in k for k in tensors) and "lora_unet__proj_out.alpha" in tensors
    assert tensors["lora_unet__transformer_blocks_0_attn1_to_q.lora_down.weight"].shape[0] == 2
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:  # the base model by name: no path of the training machine in the file
        assert f.metadata()["ss_base_model"] == "release"

    lora = pytest.importorskip("easyanimate.lora")
    from easyanimate.loading import load_transformer

    transformer = load_transformer(release, dtype="fp32")
    resolved = lora.resolve_lora(str(path), transformer)
    assert resolved.report.complete, resolved.report.summary()


def test_dit_fine_tuning_starts_from_the_given_release(workspace):
    """With a zero learning rate, a fine-tuning run's export is the release it started from."""
    from easyanimate.loading import load_transformer
    from easyanimate.train.dit import DiTTrainConfig, train_dit

    release = workspace / "release"
    if not release.exists():
        pytest.skip("needs the release of the resume test")
    tuned = train_dit(DiTTrainConfig(data=str(workspace / "data"), vae=str(workspace / "vae"),
                                     text=str(workspace / "text"), out=str(workspace / "dit_tuned"), steps=2,
                                     video_batch=2, image_batch=2, image_every=2, frames=8, save_every=100,
                                     print_every=1000, warmup=0, lr=0.0, init_from=str(release)))
    source = load_transformer(release, dtype="fp32").state_dict()
    result = load_transformer(tuned, dtype="fp32").state_dict()
    assert source.keys() == result.keys()
    for key in source:
        torch.testing.assert_close(result[key], source[key], rtol=0, atol=0)
    assert [r["step"] for r in read_loss_log(workspace / "dit_tuned")] == [1, 2]


def test_train_dit_command_passes_fine_tuning_options(monkeypatch):
    from easyanimate import cli
    from easyanimate.train import dit

    seen = {}
    monkeypatch.setattr(dit, "train_dit", lambda cfg: seen.setdefault("cfg", cfg) and None)
    assert cli.main(["train-dit", "--data", "d", "--vae", "v", "--text", "t", "--out", "o",
                     "--init-from", "release", "--warmup", "7"]) == 0
    assert seen["cfg"].init_from == "release" and seen["cfg"].warmup == 7


def test_train_vae_command_passes_decoder_only(monkeypatch):
    from easyanimate import cli
    from easyanimate.train import vae

    seen = {}
    monkeypatch.setattr(vae, "train_vae", lambda cfg: seen.setdefault("cfg", cfg) and None)
    assert cli.main(["train-vae", "--data", "d", "--out", "o", "--init-from", "release", "--decoder-only"]) == 0
    assert seen["cfg"].init_from == "release" and seen["cfg"].decoder_only is True
    seen.clear()
    assert cli.main(["train-vae", "--data", "d", "--out", "o2"]) == 0
    assert seen["cfg"].decoder_only is False
