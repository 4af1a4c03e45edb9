"""V5.1 training code on tiny configs: the Qwen2 tokenizer and text encoder load as a release's, the V5 VAE
and the flow-matching MMDiT learn, runs resume exactly, and the result is a V5.1 release folder."""
import json

import pytest
import torch

from easyanimate.train import synthetic
from easyanimate.train.common import read_loss_log
from easyanimate.train.dit_v51 import (FlowDiTTrainConfig, build_flow_cache, build_mmdit, demo_mmdit_config,
                                       flow_loss, flow_timesteps, make_flow_batch, train_dit_v51)
from easyanimate.train.vae import DEMO_V51_VAE_CONFIG, VAETrainConfig, build_trainable_vae, train_vae, vae_loss

FRAMES, SIZE = 9, 32  # 3 latent frames of 4 x 4
TINY_VAE = dict(DEMO_V51_VAE_CONFIG, block_out_channels=[4, 8, 8, 8])
TINY_MMDIT = {"num_layers": 2, "mmdit_layers": 1, "num_attention_heads": 1, "attention_head_dim": 32, "time_embed_dim": 16}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """8 clips of 9 frames at 32 px, a V5 VAE trained for 3 steps, the Qwen2-VL text side."""
    from easyanimate.train.text import train_text

    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("train_v51")
    synthetic.write_folder(root / "data", 8, seed=1, frames=FRAMES, size=SIZE)
    train_vae(VAETrainConfig(data=str(root / "data"), out=str(root / "vae"), family="v51", steps=3, clips_per_batch=2,
                             images_per_batch=2, frames=FRAMES, model=TINY_VAE, print_every=1000))
    train_text(None, str(root / "text"), captions=synthetic.all_captions(), family="v51")
    return root


def dit_config(workspace, out, **changes):
    settings = dict(steps=6, video_batch=2, image_batch=2, image_every=3, frames=FRAMES, save_every=100,
                    print_every=1000, warmup=2, model=TINY_MMDIT)
    return FlowDiTTrainConfig(data=str(workspace / "data"), vae=str(workspace / "vae"), text=str(workspace / "text"),
                              out=str(workspace / out), **{**settings, **changes})


# ------------------------------------------------------------------------------------------ text
def test_tokenizer_spells_each_caption_word_as_one_token_inside_the_chat_template(workspace):
    from easyanimate.text_v5 import load_text_encoder_v5
    from easyanimate.train.text_v51 import TEXT_TOKENS, chat_text

    encoder = load_text_encoder_v5(workspace / "text", dtype="fp32")
    assert type(encoder).__name__ == "Qwen2VLTextEncoder" and encoder.max_length == TEXT_TOKENS
    prompt = "gray background, a blue triangle going up"
    assert encoder.chat_text(prompt) == chat_text(prompt)  # the release-layout chat_template.json is the one used
    ids, mask = encoder.tokenize([prompt])
    pieces = encoder.tokenizer.convert_ids_to_tokens(ids[0][: int(mask.sum())].tolist())
    user = pieces.index("user")
    assert pieces[user + 2: user + 10] == ["gray", "Ġbackground", ",", "Ġa", "Ġblue", "Ġtriangle", "Ġgoing", "Ġup"]
    assert pieces[:3] == ["<|im_start|>", "system", "Ċ"] and pieces[-3:] == ["<|im_start|>", "assistant", "Ċ"]
    longest = max(synthetic.all_captions(), key=lambda c: len(encoder.tokenizer(chat_text(c)).input_ids))
    assert len(encoder.tokenizer(chat_text(longest)).input_ids) <= TEXT_TOKENS  # no caption is cut off
    # words it never saw still encode (byte by byte), padded with <|endoftext|>
    ids, mask = encoder.tokenize(["a purple cat"])
    assert encoder.tokenizer.pad_token == "<|endoftext|>" and ids[0, -1].item() == encoder.tokenizer.pad_token_id
    embeds = encoder.encode(["a red circle moving right on a black background"]).embeds
    assert embeds.shape == (1, TEXT_TOKENS, 64) and torch.isfinite(embeds).all()


def test_tokenizer_folder_has_the_files_of_a_release(workspace):
    folder = workspace / "text" / "tokenizer"
    for name in ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "chat_template.json"):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert "chat_template" not in config
    decoder = {entry["content"]: int(index) for index, entry in config["added_tokens_decoder"].items()}
    vocab = json.loads((folder / "vocab.json").read_text())
    assert decoder["<|endoftext|>"] == len(vocab)  # the special tokens follow the learnt vocabulary, Qwen's order
    text_config = json.loads((workspace / "text" / "text_encoder" / "config.json").read_text())
    assert text_config["model_type"] == "qwen2_vl" and text_config["pad_token_id"] == decoder["<|endoftext|>"]
    assert text_config["rope_scaling"] == {"type": "mrope", "mrope_section": [2, 3, 3]}


# ------------------------------------------------------------------------------------------ VAE
def test_v51_vae_steps_reduce_the_loss():
    torch.manual_seed(0)
    vae = build_trainable_vae(TINY_VAE, "v51")
    specs = synthetic.make_specs(2, seed=3, frames=5, size=SIZE)
    pixels = torch.stack([torch.from_numpy(synthetic.render_clip(s, 5, SIZE)) for s in specs]).permute(0, 4, 1, 2, 3) * 2 - 1
    optimizer = torch.optim.Adam(vae.model.parameters(), lr=5e-3)
    losses = []
    for _ in range(20):
        loss, _ = vae_loss(vae, pixels, 1e-4, 9.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_v51_vae_training_encodes_as_the_inference_driver_does(workspace):
    """Training runs each clip as one causal stream; inference feeds frame 0, then 4 frames at a time."""
    from easyanimate.train.vae import decode_latents, encode_moments
    from easyanimate.vae import load_vae

    vae = load_vae(workspace / "vae", dtype="fp32")
    assert vae.family == "v5" and vae.latent_channels == 16
    pixels = torch.rand(2, 3, FRAMES, SIZE, SIZE) * 2 - 1
    with torch.no_grad():
        moments = encode_moments(vae, pixels)
        torch.testing.assert_close(moments, torch.cat([vae.encode(pixels).mean, vae.encode(pixels).logvar], 1),
                                   rtol=1e-5, atol=1e-5)
        z = moments[:, :16]
        torch.testing.assert_close(decode_latents(vae, z), vae.decode(z), rtol=1e-5, atol=1e-5)
    assert moments.shape == (2, 32, 3, 4, 4)
    config = json.loads((workspace / "vae" / "vae" / "config.json").read_text())
    assert config["cache_mag_vae"] is True and config["scaling_factor"] != 1.0
    assert [row["step"] for row in read_loss_log(workspace / "vae")] == [1, 2, 3]


def test_v51_vae_refuses_v3_terms_frame_counts_and_v3_vaes(workspace, tmp_path):
    from easyanimate.train.common import save_weights
    from easyanimate.train.vae import DEMO_VAE_CONFIG

    v3_config = dict(DEMO_VAE_CONFIG, ch=4)
    save_weights(tmp_path / "v3" / "vae", build_trainable_vae(v3_config, "v3").model.state_dict(), v3_config)
    base = dict(data=str(workspace / "data"), family="v51", steps=1, model=TINY_VAE)
    with pytest.raises(ValueError, match="V3 slice VAE"):
        train_vae(VAETrainConfig(out=str(tmp_path / "a"), temporal_weight=0.1, frames=FRAMES, **base))
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        train_vae(VAETrainConfig(out=str(tmp_path / "b"), frames=8, **base))
    with pytest.raises(ValueError, match="holds a v3 VAE"):  # a V3 VAE cannot seed a V5.1 run
        train_vae(VAETrainConfig(out=str(tmp_path / "c"), frames=FRAMES, init_from=str(tmp_path / "v3"), **base))
    assert not any((tmp_path / name).exists() for name in "abc")  # refused before any run folder is made


# ------------------------------------------------------------------------------------------ flow objective
def test_flow_timesteps_are_the_reference_table_and_shift_moves_them_to_the_noisy_end():
    sigma, t = flow_timesteps(20000, torch.Generator().manual_seed(0))
    assert torch.equal(t, t.round()) and t.min() >= 1 and t.max() <= 1000
    torch.testing.assert_close(sigma, t / 1000)
    assert abs((sigma > 0.775).float().mean().item() - 0.225) < 0.02  # uniform
    shifted, t3 = flow_timesteps(20000, torch.Generator().manual_seed(0), shift=3.0)
    torch.testing.assert_close(shifted, 3 * sigma / (1 + 2 * sigma))
    torch.testing.assert_close(t3, shifted * 1000)
    assert abs((shifted > 0.775).float().mean().item() - 0.466) < 0.02


def test_flow_loss_is_the_velocity_error_and_steps_reduce_it(workspace):
    cache = build_flow_cache(workspace / "data", workspace / "vae" / "vae", workspace / "text", FRAMES, seed=0)
    model = build_mmdit(demo_mmdit_config(cache.text.shape[-1], TINY_MMDIT), seed=0).train()
    cfg = dit_config(workspace, "unused", video_batch=4)
    batch = make_flow_batch(cache, cfg, step=0)
    assert batch["x0"].shape == (4, 16, 3, 4, 4) and batch["inpaint"].shape == (4, 17, 3, 4, 4)
    # the zero-initialised output layer predicts 0: the loss is the mean square of noise - x0
    expected = (batch["noise"] - batch["x0"]).square().mean()
    torch.testing.assert_close(flow_loss(model, batch)["loss"], expected)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = flow_loss(model, batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0]


def test_inpaint_channels_are_those_generate_builds(workspace):
    """Text-to-video and images: zeros; image-to-video: the pipeline's mask latents and masked video."""
    from easyanimate.pipeline import conditioning_video, inpaint_pixels
    from easyanimate.stages_v5 import resize_to_latents
    from easyanimate.train.dit_v51 import _known_frames

    cache = build_flow_cache(workspace / "data", workspace / "vae" / "vae", workspace / "text", FRAMES, seed=0)
    cfg = dit_config(workspace, "unused", video_batch=64, first_frame_prob=0.5, end_frame_prob=0.5)
    batch = make_flow_batch(cache, cfg, step=0)
    # (the last frame never reaches the mask channel, as in the pipeline: start + end images differ from
    # a start image only in the masked-video latents)
    torch.testing.assert_close(cache.mask_ends, cache.mask_first)
    kinds = []
    for clip, inpaint in zip(batch["ids"], batch["inpaint"]):
        mask, masked = inpaint[:1], inpaint[1:]
        if mask.abs().sum() == 0 and masked.abs().sum() == 0:
            kinds.append("t2v")
            continue
        assert torch.equal(mask, cache.mask_first[0])
        kinds.append("first" if torch.equal(masked, cache.first_masked[clip]) else
                     "ends" if torch.equal(masked, cache.ends_masked[clip]) else "other")
    assert sorted(set(kinds)) == ["ends", "first", "t2v"]
    image_batch = make_flow_batch(cache, cfg, step=2)
    assert image_batch["image_step"] and image_batch["inpaint"].abs().sum() == 0

    clip = torch.rand(1, 3, FRAMES, SIZE, SIZE)
    cond = conditioning_video(FRAMES, SIZE, SIZE, start_images=clip[:, :, 0])
    scale = cache.scaling_factor
    torch.testing.assert_close(cache.mask_first, resize_to_latents(1 - cond.mask, 3, 4, 4) * scale)
    _, masked = inpaint_pixels(cond)
    known = _known_frames(clip * 2 - 1, False, torch.Generator().manual_seed(0))
    noise = known - masked
    assert torch.equal(noise[:, :, 1:], torch.zeros_like(noise[:, :, 1:]))  # unknown frames: -1, no noise
    assert 0 < noise.std().item() < 0.3


# ------------------------------------------------------------------------------------------ runs
def test_v51_run_resumes_exactly_and_exports_a_release(workspace):
    from easyanimate.cli import describe_model
    from easyanimate.pipeline import load_model, make_video

    assert train_dit_v51(dit_config(workspace, "dit_split", stop_at=3)) is None  # interrupted after step 3
    assert [r["step"] for r in read_loss_log(workspace / "dit_split")] == [1, 2, 3]
    split = train_dit_v51(dit_config(workspace, "dit_split"))  # resumes at step 4
    whole = train_dit_v51(dit_config(workspace, "dit_whole"))
    a = torch.load(workspace / "dit_split" / "checkpoint.pt", weights_only=True)
    b = torch.load(workspace / "dit_whole" / "checkpoint.pt", weights_only=True)
    for key in b["ema"]:
        torch.testing.assert_close(a["ema"][key], b["ema"][key], rtol=0, atol=0)
    split_log, whole_log = read_loss_log(workspace / "dit_split"), read_loss_log(workspace / "dit_whole")
    assert [r["loss"] for r in split_log] == [r["loss"] for r in whole_log]  # the same batches, the same losses
    assert [r["kind"] for r in whole_log] == ["video", "video", "image"] * 2

    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (split / sub).is_dir() and (whole / sub).is_dir()
    report = describe_model(whole)
    assert report["family"] == "v51" and "V5.1" in report["description"] and not report["missing"]
    model = load_model(whole, dtype="fp32")
    assert model.family == "v51" and model.transformer.config.in_channels == 33
    start = torch.rand(1, 3, SIZE, SIZE)
    video = make_video(model, "a red circle moving right on a black background", frames=FRAMES, height=SIZE,
                       width=SIZE, steps=2, guidance_scale=3.0, seed=1, start_images=start)
    assert video.shape == (1, 3, FRAMES, SIZE, SIZE) and torch.isfinite(video).all()


def test_v51_fine_tuning_starts_from_the_given_release(workspace):
    from easyanimate.loading import load_transformer

    release = workspace / "dit_whole" / "model"
    if not release.exists():
        pytest.skip("needs the release of the resume test")
    tuned = train_dit_v51(dit_config(workspace, "dit_tuned", steps=2, lr=0.0, warmup=0, init_from=str(release)))
    source = load_transformer(release, dtype="fp32").state_dict()
    result = load_transformer(tuned, dtype="fp32").state_dict()
    assert source.keys() == result.keys()
    for key in source:
        torch.testing.assert_close(result[key], source[key], rtol=0, atol=0)


def test_train_commands_pass_the_v51_family(monkeypatch):
    from easyanimate import cli
    from easyanimate.train import dit_v51, text, vae

    seen = {}
    monkeypatch.setattr(dit_v51, "train_dit_v51", lambda cfg: seen.setdefault("dit", cfg) and None)
    monkeypatch.setattr(vae, "train_vae", lambda cfg: seen.setdefault("vae", cfg) and None)
    monkeypatch.setattr(text, "train_text", lambda *a, **k: seen.setdefault("text", k))
    assert cli.main(["train-dit", "--family", "v51", "--data", "d", "--vae", "v", "--text", "t", "--out", "o",
                     "--sigma-shift", "3", "--end-frame-prob", "0.1"]) == 0
    assert seen["dit"].sigma_shift == 3.0 and seen["dit"].end_frame_prob == 0.1 and seen["dit"].frames == 17
    assert cli.main(["train-vae", "--family", "v51", "--data", "d", "--out", "o"]) == 0
    assert seen["vae"].family == "v51"
    assert cli.main(["train-text", "--family", "v51", "--out", "o", "--synthetic-vocabulary"]) == 0
    assert seen["text"]["family"] == "v51"
    # options of the other objective are refused, not ignored
    assert cli.main(["train-dit", "--family", "v51", "--data", "d", "--vae", "v", "--text", "t", "--out", "o",
                     "--mse-weight-cap", "100"]) == 2
    assert cli.main(["train-dit", "--data", "d", "--vae", "v", "--text", "t", "--out", "o", "--sigma-shift", "3"]) == 2


def test_v51_lora_has_the_official_key_names_and_loads_back(workspace):
    from safetensors.torch import load_file

    from easyanimate.loading import load_transformer
    from easyanimate.lora import lora_patches, resolve_lora
    from easyanimate.train.lora import LoRATrainConfig, train_lora

    release = workspace / "dit_whole" / "model"
    if not release.exists():
        pytest.skip("needs the release of the resume test")
    path = train_lora(LoRATrainConfig(model=str(release), data=str(workspace / "data"), out=str(workspace / "lora"),
                                      steps=3, rank=2, alpha=1.0, video_batch=2, image_batch=2, print_every=1000,
                                      warmup=1, lr=1e-2, frames=FRAMES))
    tensors = load_file(str(path))
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    # every Linear of the MMDiT, under the names of the official V5.1 LoRAs (original layout: attn2, txt_ff)
    expected = {"lora_unet__time_embedding_linear_1", "lora_unet__time_embedding_linear_2", "lora_unet__text_proj_1",
                "lora_unet__norm_out_linear", "lora_unet__proj_out"}
    block0 = [f"lora_unet__transformer_blocks_0_{n}" for n in (
        "norm1_linear", "attn1_to_q", "attn1_to_k", "attn1_to_v", "attn1_to_out_0", "attn2_to_q", "attn2_to_k",
        "attn2_to_v", "attn2_to_out_0", "norm2_linear", "ff_net_0_proj", "ff_net_2", "txt_ff_net_0_proj", "txt_ff_net_2")]
    block1 = [n.replace("blocks_0", "blocks_1") for n in block0 if "attn2" not in n and "txt_ff" not in n]
    assert modules == expected | set(block0) | set(block1)  # block 1 shares its text-stream weights
    assert tensors["lora_unet__transformer_blocks_0_attn2_to_q.lora_down.weight"].shape == (2, 32)

    transformer = load_transformer(release, dtype="fp32")
    resolved = resolve_lora(str(path), transformer)
    assert resolved.report.complete, resolved.report.summary()
    x = torch.randn(1, 16, 3, 4, 4)
    text, inpaint = torch.randn(1, 5, 64), torch.zeros(1, 17, 3, 4, 4)
    with torch.no_grad():
        base = transformer(x, torch.tensor([500.0]), text, inpaint_latents=inpaint)
        with lora_patches(transformer, [(resolved, 1.0)]):
            adapted = transformer(x, torch.tensor([500.0]), text, inpaint_latents=inpaint)
    assert not torch.allclose(base, adapted)  # 3 steps at lr 1e-2 moved the zero-initialised up factors
