"""`python -m easyanimate`: help of every command, `info` on the demo, one demo video end to end."""
import json
import subprocess
import sys
import time

import numpy as np
import pytest

from easyanimate import cli

COMMANDS = ["generate", "info", "make-data", "train-vae", "train-text", "train-dit", "train-lora", "evaluate"]
DEMO = cli.demo_model_path()
needs_demo = pytest.mark.skipif(not (DEMO / "transformer").is_dir(), reason=f"demo model not found at {DEMO}")


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "easyanimate", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cli.Path(__file__).resolve().parent.parent)


def test_top_level_help_lists_every_command():
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out and command in out


def test_lora_argument_parsing():
    assert cli.parse_lora_arg("a/b/star.safetensors:0.7") == ("a/b/star.safetensors", 0.7)
    assert cli.parse_lora_arg("star.safetensors") == ("star.safetensors", 1.0)
    assert cli.parse_lora_arg("C:/loras/x.safetensors") == ("C:/loras/x.safetensors", 1.0)


@needs_demo
def test_info_on_the_demo_folder():
    result = run_cli("info", str(DEMO))
    assert result.returncode == 0, result.stderr
    assert "family: EasyAnimate V3" in result.stdout
    for part in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert f"  {part}:" in result.stdout
    assert "image_encoder/" in result.stdout  # reported missing, with what that means
    report = cli.describe_model(DEMO)
    assert report["total_bytes"] < 30 * 2**20
    assert report["components"]["transformer"]["in_channels"] == 12


@needs_demo
def test_info_on_a_lora_file():
    lora = DEMO / cli.DEMO_LORA
    if not lora.is_file():
        pytest.skip("demo LoRA not shipped")
    report = cli.describe_model(lora)
    assert report["kind"] == "LoRA" and report["layers"] > 0


@needs_demo
def test_generate_demo_video_end_to_end(tmp_path):
    out = tmp_path / "demo.mp4"
    started = time.time()
    result = run_cli("generate", "--prompt", "a yellow square moving left on a black background", "--seed", "3",
                     "--out", str(out), "--steps", "10", "--quiet")
    seconds = time.time() - started
    assert result.returncode == 0, result.stderr
    assert seconds < 60
    assert "16 frames, 64x64" in result.stdout and "peak memory" in result.stdout
    frames = cli.read_video_frames(out)
    assert frames.shape == (16, 64, 64, 3)
    differences = np.abs(np.diff(frames.astype(np.int16), axis=0)).mean(axis=(1, 2, 3))
    assert (differences > 0.2).all(), differences  # every frame differs from the one before: motion


@needs_demo
def test_generate_gif_and_png_frames(tmp_path):
    result = run_cli("generate", "--prompt", "a red circle moving up on a gray background", "--out",
                     str(tmp_path / "v.gif"), "--steps", "4", "--frames", "8", "--quiet")
    assert result.returncode == 0, result.stderr
    assert cli.read_video_frames(tmp_path / "v.gif").shape == (8, 64, 64, 3)


def test_bad_size_is_a_clear_error(capsys):
    code = cli.main(["generate", "--prompt", "x", "--size", "big", "--model", str(DEMO)])
    assert code == 2
    assert "HxW" in capsys.readouterr().err


def test_evaluate_refuses_zero_repeats_before_loading_anything(capsys):
    assert cli.main(["evaluate", "--repeats", "0", "--model", "no-such-folder"]) == 2
    assert "--repeats must be at least 1" in capsys.readouterr().err


@needs_demo
def test_demo_transformer_is_a_plain_v3_checkpoint():
    """The demo loads through the release loader and matches the bare V3 model with its weights: no demo path."""
    import torch
    from safetensors.torch import load_file

    from easyanimate.loading import detect_family, load_transformer
    from easyanimate.models.transformer import EasyAnimateTransformer3D, TransformerConfig

    assert detect_family(DEMO).family == "v3"
    loaded = load_transformer(DEMO, dtype="fp32")
    config = json.loads((DEMO / "transformer" / "config.json").read_text())
    bare = EasyAnimateTransformer3D(TransformerConfig.from_dict(config, "v3"))
    state = load_file(str(DEMO / "transformer" / "diffusion_pytorch_model.safetensors"))
    bare.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    single_file = load_transformer(DEMO / "transformer" / "diffusion_pytorch_model.safetensors", dtype="fp32",
                                   config=DEMO / "transformer" / "config.json")
    g = torch.Generator().manual_seed(0)
    inputs = dict(x=torch.randn(2, 4, 4, 8, 8, generator=g), timestep=torch.tensor([999, 10]),
                  encoder_hidden_states=torch.randn(2, 120, config["caption_channels"], generator=g),
                  encoder_attention_mask=torch.ones(2, 120), inpaint_latents=torch.randn(2, 8, 4, 8, 8, generator=g),
                  clip_encoder_hidden_states=torch.zeros(2, 768), clip_attention_mask=torch.zeros(2, 8))
    with torch.no_grad():
        expected = bare.eval()(**inputs)
        assert torch.equal(loaded(**inputs), expected)
        assert torch.equal(single_file(**inputs), expected)
