"""`python -m easyanimate`: help of every command, `info` on the demo, one demo video end to end."""
import json
import os
import subprocess
import sys
from pathlib import Path

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
    lora = cli.demo_lora(DEMO, cli.generation_defaults(DEMO))
    if lora is None:
        pytest.skip("demo LoRA not shipped")
    report = cli.describe_model(lora)
    assert report["kind"] == "LoRA" and report["layers"] > 0


@needs_demo
def test_generate_demo_video_end_to_end(tmp_path):
    """The file holds the pipeline's video for the demo's settings (generation.json) and the given seed and
    steps: `make_video` with the same arguments, to within the mp4 encoding (crf 12: about 1.4 of 255 on
    average per frame here; a video of another seed differs by about 44)."""
    from easyanimate.pipeline import load_model, make_video

    out = tmp_path / "demo.mp4"
    prompt = "a yellow square moving left on a black background"
    result = run_cli("generate", "--prompt", prompt, "--seed", "3", "--out", str(out), "--steps", "10", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "16 frames, 64x64" in result.stdout and "peak memory" in result.stdout
    frames = cli.read_video_frames(out)
    assert frames.shape == (16, 64, 64, 3)
    defaults = cli.generation_defaults(DEMO)
    video = make_video(load_model(DEMO, dtype="fp32"), prompt, defaults["negative_prompt"], frames=16, height=64,
                       width=64, steps=10, seed=3, guidance_scale=defaults["guidance_scale"],
                       sampler=defaults["sampler"])
    expected = (video[0].permute(1, 2, 3, 0).clamp(0, 1) * 255).round().numpy()
    per_frame = np.abs(frames.astype(np.float64) - expected).mean(axis=(1, 2, 3))
    assert (per_frame < 4).all(), per_frame


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


@pytest.mark.parametrize("weight,words", [("green", "is not NAME=N"), ("grene=3", "Unknown colour or shape grene"),
                                          ("green=0", "whole numbers of at least 1")])
def test_make_data_refuses_bad_pair_weights_before_writing(tmp_path, capsys, weight, words):
    assert cli.main(["make-data", "--out", str(tmp_path / "data"), "--count", "2", "--weight", weight]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


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


# ------------------------------------------------------------------------------------------ bad input
@pytest.fixture
def no_model_loading(monkeypatch):
    """Bad options must be refused before any model is loaded."""
    import easyanimate.pipeline as pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(pipeline, "load_model", refuse)


@pytest.fixture
def demo_copy(tmp_path):
    import shutil

    if not (DEMO / "transformer").is_dir():
        pytest.skip(f"demo model not found at {DEMO}")
    return Path(shutil.copytree(DEMO, tmp_path / "model"))


def generate(out, *args):
    return cli.main(["generate", "--prompt", "a red circle moving right on a black background", "--quiet",
                     "--out", str(out), *args])


def one_clear_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


BAD_OPTIONS = [
    (["--steps", "0"], "--steps must be a whole number from 1 to 1000; got 0"),
    (["--frames", "0"], "--frames must be a whole number at least 1; got 0"),
    (["--fps", "0"], "--fps must be a whole number from 1 to 240; got 0"),
    (["--fps", "-3"], "--fps must be a whole number from 1 to 240; got -3"),
    (["--seed", str(2**64 - 1)], f"--seed must be a whole number from 0 to {2**63 - 1}"),
    (["--seed", "-1"], f"--seed must be a whole number from 0 to {2**63 - 1}"),
    (["--cfg", "-5"], "--cfg (guidance scale) must be a number from 0 to 100"),
    (["--cfg", "nan"], "--cfg (guidance scale) must be a number from 0 to 100"),
    (["--threads", "-1"], "--threads must be a whole number from 1 to 1024; got -1"),
    (["--device", "banana"], "--device 'banana' is not a torch device; use cpu, cuda"),
    (["--memory-budget", "nan"], "memory budget (--memory-budget) must be a positive number of MiB; got nan"),
    (["--lora", "magenta:abc"], "the strength 'abc' is not a number"),
    (["--lora", "magenta:nan"], "must be a finite number from -100 to 100"),
    (["--lora", "magenta:1e30"], "must be a finite number from -100 to 100"),
    (["--lora", "no-such-lora"], "LoRA 'no-such-lora' not found: no such file, and no 'no-such-lora.safetensors' in the model folder's loras/"),
    (["--size", "0x64"], "--size must be positive"),
    (["--sampler", "PNDM", "--steps", "2"], "PNDM needs at least 4 steps"),
]


@pytest.mark.parametrize("args,words", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_generate_options_are_refused_before_loading(tmp_path, capsys, no_model_loading, args, words):
    out = tmp_path / "video.mp4"
    out.write_bytes(b"an earlier video")
    assert generate(out, *args) == 2
    assert words in one_clear_line(capsys)
    assert out.read_bytes() == b"an earlier video"


def test_cuda_without_a_gpu_is_one_clear_line(tmp_path, capsys, no_model_loading):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is available")
    assert generate(tmp_path / "v.mp4", "--device", "cuda") == 2
    assert "--device cuda: no CUDA GPU is usable here" in one_clear_line(capsys)


def test_outputs_are_checked_before_loading(tmp_path, capsys, no_model_loading, monkeypatch):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    cases = [
        (tmp_path / "video.avi", "unknown output type .avi; use one of .mp4"),
        (tmp_path, "is a folder; give a file name in it"),
        (a_file / "video.mp4", "is a file, not a folder"),
    ]
    for out, words in cases:
        assert generate(out) == 2
        assert words in one_clear_line(capsys)
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        if os.access(read_only, os.W_OK):  # running as root: permissions do not stop writing
            import tempfile

            def denied(*args, **kwargs):
                raise PermissionError(13, "Permission denied")

            monkeypatch.setattr(tempfile, "mkstemp", denied)
        assert generate(read_only / "video.mp4") == 2
        assert "cannot create a file in" in one_clear_line(capsys)
    finally:
        read_only.chmod(0o755)
    assert a_file.read_text() == "keep me"


@pytest.mark.parametrize("kind", ["not_an_image", "folder", "device", "too_large"])
def test_bad_start_image_is_one_clear_line(tmp_path, capsys, no_model_loading, kind, monkeypatch):
    if kind == "not_an_image":
        image, words = tmp_path / "start.png", "is not an image file Pillow can read"
        image.write_text("not a picture")
    elif kind == "folder":
        image, words = tmp_path, "is a folder"
    elif kind == "device":
        image, words = Path(os.devnull), "is not a regular file"
    else:
        from PIL import Image

        import easyanimate.images as images

        image, words = tmp_path / "big.png", "100x80 pixels (0.0 megapixels), over the limit of 0.005 megapixels"
        Image.new("RGB", (100, 80)).save(image)
        monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 5000)
    assert generate(tmp_path / "v.mp4", "--start-image", str(image)) == 2
    assert words in one_clear_line(capsys)


def test_lora_folder_is_named_as_a_folder(tmp_path, capsys, no_model_loading):
    assert generate(tmp_path / "v.mp4", "--lora", str(tmp_path)) == 2
    assert "is a folder, not a LoRA file" in one_clear_line(capsys)


def test_lora_strength_parsing_names_the_real_problem():
    from easyanimate.lora import LoRAError

    with pytest.raises(ValueError, match="the strength 'abc' is not a number"):
        cli.parse_lora_arg("magenta:abc")
    with pytest.raises(LoRAError, match="finite number"):
        cli.parse_lora_arg("magenta:inf")
    assert cli.parse_lora_arg("magenta:0.8") == ("magenta", 0.8)
    assert cli.parse_lora_arg("C:x.safetensors") == ("C:x.safetensors", 1.0)


@needs_demo
def test_demo_lora_by_name_and_help_example(capsys):
    assert cli.find_lora("magenta", DEMO) == DEMO / "loras" / "magenta.safetensors"
    assert cli.find_lora("magenta.safetensors", DEMO) == DEMO / "loras" / "magenta.safetensors"
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--lora magenta:0.8 applies its loras/magenta.safetensors" in help_text


def test_broken_generation_json_names_the_file(demo_copy, tmp_path, capsys, no_model_loading):
    (demo_copy / "generation.json").write_text('{"frames": 16,')
    assert generate(tmp_path / "v.mp4", "--model", str(demo_copy)) == 2
    assert f"'{demo_copy / 'generation.json'}' is not valid JSON" in one_clear_line(capsys)


def test_broken_config_json_names_the_file(demo_copy, tmp_path, capsys):
    (demo_copy / "transformer" / "config.json").write_text('{"num_layers": 8')
    assert generate(tmp_path / "v.mp4", "--model", str(demo_copy)) == 2
    assert f"'{demo_copy / 'transformer' / 'config.json'}' is not valid JSON" in one_clear_line(capsys)


# ------------------------------------------------------------------------------------------ writing outputs
def _frames(count, value=0):
    """`count` frames, each a little brighter than the one before (GIF merges identical frames)."""
    return np.stack([np.full((16, 16, 3), min(255, value + 4 * i), dtype=np.uint8) for i in range(count)])


def _leftovers(folder):
    return [p.name for p in Path(folder).iterdir() if ".partial" in p.name or p.name.endswith(".probe")]


def test_write_video_replaces_atomically_and_says_so(tmp_path):
    for suffix in (".mp4", ".gif", ".webp"):
        out = tmp_path / f"video{suffix}"
        assert cli.write_video(_frames(8, 10), out, 8) == str(out)
        assert "(replaced the existing file)" in cli.write_video(_frames(8, 200), out, 8)
        frames = cli.read_video_frames(out)
        assert frames.shape == (8, 16, 16, 3) and abs(int(frames[0].mean()) - 200) < 8
    assert _leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="unknown output type .avi"):
        cli.write_video(_frames(8), tmp_path / "x.avi", 8)
    with pytest.raises(ValueError, match="fps must be a whole number from 1 to 240"):
        cli.write_video(_frames(8), tmp_path / "x.gif", 0)
    assert not (tmp_path / "x.gif").exists()


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_ctrl_c_while_writing_keeps_the_existing_file(tmp_path, monkeypatch, suffix):
    from PIL import Image

    out = tmp_path / f"video{suffix}"
    cli.write_video(_frames(8, 50), out, 8)
    before = out.read_bytes()

    def interrupted(*args, **kwargs):
        Path(args[1]).write_bytes(b"half a video")  # (frames, path, fps) or (image, path, ...)
        raise KeyboardInterrupt

    if suffix == ".mp4":
        monkeypatch.setattr(cli, "_write_av", interrupted)
    else:
        monkeypatch.setattr(Image.Image, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli.write_video(_frames(8, 200), out, 8)
    assert out.read_bytes() == before
    assert _leftovers(tmp_path) == []


def test_png_frames_interrupted_or_shorter_run(tmp_path, monkeypatch):
    from PIL import Image

    out = tmp_path / "clip.png"
    cli.write_video(_frames(5, 30), out, 8)
    earlier = {p.name: p.read_bytes() for p in tmp_path.glob("clip_*.png")}
    assert len(earlier) == 5
    real_save, calls = Image.Image.save, []

    def save_then_stop(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        cli.write_video(_frames(3, 220), out, 8)
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("clip_*.png")} == earlier
    assert _leftovers(tmp_path) == []

    written = cli.write_video(_frames(3, 220), out, 8)
    assert "replaced 3 existing frames, removed 2 stale frames of an earlier run" in written
    assert sorted(p.name for p in tmp_path.glob("clip_*.png")) == ["clip_0000.png", "clip_0001.png", "clip_0002.png"]
    assert int(np.asarray(Image.open(tmp_path / "clip_0002.png")).mean()) == 228
    (tmp_path / "clip_notes.png").write_bytes(b"not a frame")  # another name pattern: left alone
    cli.write_video(_frames(2, 1), out, 8)
    assert (tmp_path / "clip_notes.png").read_bytes() == b"not a frame"


@needs_demo
def test_ctrl_c_while_writing_a_generated_video_keeps_the_earlier_one(tmp_path, capsys, monkeypatch):
    out = tmp_path / "video.mp4"
    cli.write_video(_frames(8, 90), out, 8)
    before = out.read_bytes()

    def interrupted(frames, path, fps):
        Path(path).write_bytes(b"truncated")
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_write_av", interrupted)
    assert generate(out, "--steps", "1", "--frames", "8") == 130
    assert "interrupted" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert _leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------------ info
def test_info_on_things_that_are_not_models(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("x")
    assert cli.main(["info", str(tmp_path)]) == 2
    assert "is not a model folder" in one_clear_line(capsys)
    if Path("/dev/zero").exists():
        assert cli.main(["info", "/dev/zero"]) == 2
        assert "is neither a regular file nor a folder" in one_clear_line(capsys)
    claims = tmp_path / "claims.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 64]}}).encode()
    claims.write_bytes(len(header).to_bytes(8, "little") + header + bytes(64))
    assert cli.main(["info", str(claims)]) == 2
    assert "header is inconsistent" in one_clear_line(capsys)


def test_info_on_a_broken_model_exits_non_zero_and_prints_no_raw_dicts(demo_copy, capsys):
    (demo_copy / "vae" / "config.json").write_text('{"_comment": "x", "ch": 8,')
    assert cli.main(["info", str(demo_copy)]) == 1
    captured = capsys.readouterr()
    assert f"vae: error: The config file '{demo_copy / 'vae' / 'config.json'}' is not valid JSON" in captured.out
    assert "cannot be loaded" in captured.err and "vae/config.json" in captured.err
    assert "_comment" not in captured.out and "{'" not in captured.out and "UNKNOWN" not in captured.out
    (demo_copy / "transformer" / "config.json").write_text("[]")
    assert cli.main(["info", str(demo_copy)]) == 1
    out = capsys.readouterr().out
    assert "family: unknown: The transformer config" in out and "holds a JSON list" in out


@pytest.mark.parametrize("args", [["--frames", "100000"], ["--size", "100000x100000"]])
def test_requests_that_cannot_fit_in_memory_are_refused_before_sampling(tmp_path, capsys, monkeypatch, args):
    """The estimate of the request is checked against the memory available before anything is sampled
    (the available memory is set to 4 GiB here, so the test does not depend on this machine)."""
    import easyanimate.host

    monkeypatch.setattr(easyanimate.host, "available_ram", lambda: 4 * 2**30)
    out = tmp_path / "big.mp4"
    sampled = []
    monkeypatch.setattr("easyanimate.pipeline.denoise", lambda *a, **k: sampled.append(1))
    code = cli.main(["generate", "--prompt", "a red circle", "--out", str(out), "--quiet"] + args)
    err = capsys.readouterr().err
    assert code == 2 and "needs about" in err and "4.00 GiB is available" in err, err
    assert not out.exists() and not sampled


# --- the V5.1 demo ------------------------------------------------------------------------------------
V51_DEMO = DEMO.parent / "EasyAnimateV5.1-demo-64px"
needs_v51_demo = pytest.mark.skipif(not (V51_DEMO / "transformer").is_dir(), reason=f"V5.1 demo not found at {V51_DEMO}")


@needs_v51_demo
def test_info_names_the_v51_demo_and_it_is_small_and_listed(standalone):
    """A V5.1 InP release folder under 30 MB, listed by the pack's loader next to the V3 demo, with its LoRA."""
    host = standalone.nodes.host
    result = run_cli("info", str(V51_DEMO))
    assert result.returncode == 0, result.stderr
    assert "family: EasyAnimate V5.1" in result.stdout and "missing: nothing" in result.stdout
    report = cli.describe_model(V51_DEMO)
    assert report["total_bytes"] < 30 * 2**20
    assert report["components"]["transformer"]["in_channels"] == 33  # InP: image-to-video works
    assert {"EasyAnimateV3-demo-64px", V51_DEMO.name} <= set(host.demo_models())
    assert V51_DEMO.name in host.list_models()
    lora = cli.demo_lora(V51_DEMO, cli.generation_defaults(V51_DEMO))
    assert lora is not None and cli.describe_model(lora)["kind"] == "LoRA"
    # ComfyUI lists the LoRAs of every demo's loras/ by file name: the two demos' names differ
    assert lora.name != cli.demo_lora(DEMO, cli.generation_defaults(DEMO)).name
