"""`python -m easyanimate generate` on tiny V5.1 releases: every mode end to end (the written frames are the frames
`make_video` makes with the same arguments), the V5.1 defaults, TeaCache, camera poses, and options that do not
fit the model refused before it is loaded."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from easyanimate import cli
from easyanimate.camera import plucker_rays
from easyanimate.images import read_image, read_video
from easyanimate.pipeline import load_model, make_video
from easyanimate.teacache import COEFFICIENTS
from release_v5 import make_release_v51

PROMPT = "a cat in the snow"
SMALL = ["--frames", "5", "--size", "32x48", "--steps", "3", "--seed", "3", "--quiet"]


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    root = tmp_path_factory.mktemp("v51")
    return {variant: make_release_v51(root / f"EasyAnimateV5.1-tiny-{variant}", variant)
            for variant in ("t2v", "inp", "control", "camera")}


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """Images, a video (8 fps) and a camera pose file (6 rows) at the video size 32x48; a damaged video."""
    folder = tmp_path_factory.mktemp("media")
    g = torch.Generator().manual_seed(11)
    for name in ("start", "end", "reference"):
        pixels = (torch.rand(32, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{name}.png")
    clip = (torch.rand(5, 32, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
    cli.write_video(clip, folder / "clip.mp4", 8)
    rows = ["0 0.47 0.84 0.5 0.5 0 0 1 0 0 0 0 1 0 0 0 0 1 0"]
    rows += [f"{i / 24} 0.47 0.84 0.5 0.5 0 0 1 0 0 {-0.1 * i} 0 1 0 0 0 0 1 {0.05 * i}" for i in range(1, 6)]
    (folder / "poses.txt").write_text("https://example.com/video\n" + "\n".join(rows) + "\n")
    (folder / "broken.mp4").write_bytes(b"not a video at all")
    return folder


def cli_frames(out: Path) -> np.ndarray:
    """The frames a .png run wrote (NAME_0000.png, ...)."""
    files = sorted(out.parent.glob(f"{out.stem}_*.png"))
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


def as_frames(video: torch.Tensor) -> np.ndarray:
    return (video[0].permute(1, 2, 3, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def generate(folder, out, *args):
    return cli.main(["generate", "--model", str(folder), "--prompt", PROMPT, "--out", str(out), *args])


def one_clear_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


MODES = {
    "t2v-teacache": ("t2v", ["--teacache", "0.1"], lambda m: dict(teacache=0.1)),
    "i2v-start-end": ("inp", ["--start-image", "start.png", "--end-image", "end.png"],
                      lambda m: dict(start_images=read_image(m / "start.png"), end_images=read_image(m / "end.png"))),
    "v2v": ("t2v", ["--input-video", "clip.mp4", "--strength", "0.5"],
            lambda m: dict(video=read_video(m / "clip.mp4", frames=5), strength=0.5)),
    "control-reference": ("control", ["--control-video", "clip.mp4", "--reference-image", "reference.png"],
                          lambda m: dict(control_video=read_video(m / "clip.mp4", frames=5),
                                         reference_image=read_image(m / "reference.png"))),
    "camera": ("camera", ["--camera-poses", "poses.txt", "--reference-image", "reference.png"],
               lambda m: dict(control_camera=plucker_rays(m / "poses.txt", 32, 48, frames=5),
                              reference_image=read_image(m / "reference.png"))),
}


@pytest.mark.parametrize("mode", MODES)
def test_every_v51_mode_writes_the_frames_make_video_makes(releases, media, tmp_path, capsys, mode):
    variant, args, inputs = MODES[mode]
    args = [str(media / a) if (media / a).is_file() else a for a in args]
    out = tmp_path / "video.png"  # lossless frames: the comparison is exact
    assert generate(releases[variant], out, *SMALL, *args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "5 frames, 48x32, 8 fps" in printed
    if "--teacache" in args:
        assert "TeaCache 0.1:" in printed and "of 3 transformer calls computed" in printed
    model = load_model(releases[variant], dtype="fp32")
    video = make_video(model, PROMPT, "", frames=5, height=32, width=48, steps=3, seed=3, guidance_scale=6.0,
                       sampler="Flow", **inputs(media))
    assert np.array_equal(cli_frames(out), as_frames(video))


@pytest.fixture
def captured(monkeypatch):
    """What the command hands `make_video` (the model is loaded; nothing is sampled)."""
    import easyanimate.pipeline as pipeline

    calls = []

    def fake_make_video(model, prompt, negative, *, frames, height, width, **options):
        calls.append(dict(options, frames=frames, height=height, width=width, negative=negative))
        return torch.zeros(1, 3, frames, height, width)

    monkeypatch.setattr(pipeline, "make_video", fake_make_video)
    return calls


def test_a_v51_folder_without_generation_json_gets_the_reference_defaults(releases, tmp_path, captured):
    """49 frames at 384x672, 50 steps, CFG 6, Flow, 8 fps, seed 43: the reference's predict scripts."""
    folder = releases["t2v"]
    defaults = cli.generation_defaults(folder)
    assert {k: defaults[k] for k in ("frames", "height", "width", "steps", "guidance_scale", "sampler", "fps", "seed")} \
        == dict(frames=49, height=384, width=672, steps=50, guidance_scale=6.0, sampler="Flow", fps=8, seed=43)
    assert generate(folder, tmp_path / "v.gif", "--quiet") == 0
    (call,) = captured
    assert (call["frames"], call["height"], call["width"]) == (49, 384, 672)
    assert (call["steps"], call["guidance_scale"], call["sampler"], call["seed"]) == (50, 6.0, "Flow", 43)
    assert "teacache" not in call and "strength" not in call


def test_generation_json_overrides_the_v51_defaults(releases, tmp_path, captured):
    folder = Path(shutil.copytree(releases["t2v"], tmp_path / "model"))
    (folder / "generation.json").write_text(json.dumps({"frames": 9, "height": 32, "width": 48, "steps": 4}))
    assert generate(folder, tmp_path / "v.gif", "--quiet") == 0
    assert (captured[0]["frames"], captured[0]["height"], captured[0]["steps"]) == (9, 32, 4)
    assert captured[0]["guidance_scale"] == 6.0


def test_shift_and_teacache_options_reach_the_run(releases, tmp_path, captured):
    assert generate(releases["t2v"], tmp_path / "v.gif", *SMALL, "--shift", "3", "--teacache", "0.08",
                    "--teacache-coefficients", "v5.1-7b") == 0
    call = captured[0]
    assert call["scheduler_config"]["shift"] == 3.0
    assert call["scheduler_config"]["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert call["teacache"].threshold == 0.08 and call["teacache"].coefficients == COEFFICIENTS["v5.1-7b"]
    assert generate(releases["t2v"], tmp_path / "v.gif", *SMALL, "--teacache", "0.1",
                    "--teacache-coefficients", "1,0.5,0") == 0
    assert captured[1]["teacache"].coefficients == (1.0, 0.5, 0.0)
    assert generate(releases["t2v"], tmp_path / "v.gif", *SMALL, "--input-video", "missing.mp4") == 2


@pytest.fixture
def no_model_loading(monkeypatch):
    import easyanimate.pipeline as pipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(pipeline, "load_model", refuse)


BAD = [
    ("t2v", ["--frames", "8"], "cannot make 8 frames: valid counts are 1 + 4k (1, 5, 9, 13, …) (the nearest valid "
                               "counts are 5 and 9)"),
    ("t2v", ["--frames", "48"], "the nearest valid counts are 45 and 49"),
    ("t2v", ["--size", "30x50"], "multiples of 16 pixels for V5.1 3-block (2 MMDiT, width 32) T2V (the VAE's 8x "
                                 "downsampling times 2x2 patches); got 30x50. The nearest valid sizes: 16x48, 16x64, "
                                 "32x48, 32x64"),
    ("t2v", ["--sampler", "DDIM"], "sampler 'DDIM' is a DDPM sampler and cannot run EasyAnimate V5.1"),
    ("demo", ["--sampler", "Flow"], "sampler 'Flow' is a flow-matching sampler and cannot run EasyAnimate V3"),
    ("demo", ["--teacache", "0.1"], "TeaCache is implemented for the EasyAnimate V5.1"),
    ("demo", ["--shift", "2"], "--shift shapes the Flow sampler's schedule (V5.1); sampler 'Euler' has none"),
    ("t2v", ["--shift", "0"], "--shift: The flow shift must be a finite number above 0"),
    ("t2v", ["--teacache", "-1"], "The TeaCache threshold must be a finite number ≥ 0"),
    ("t2v", ["--teacache-coefficients", "v5.1-7b"], "--teacache-coefficients needs --teacache THRESH"),
    ("t2v", ["--teacache", "0.1", "--teacache-coefficients", "fast"], "give v5.1-12b, v5.1-7b, v5-7b-inp or"),
    ("t2v", ["--strength", "0.5"], "--strength below 1 redraws an input video: give one with --input-video"),
    ("t2v", ["--strength", "1.5"], "--strength: denoise strength must be in (0, 1]"),
    ("inp", ["--end-image", "end.png"], "--end-image needs --start-image too"),
    ("t2v", ["--camera-stride", "3"], "--camera-stride applies to --camera-poses"),
    ("t2v", ["--input-video", "broken.mp4"], "cannot be decoded"),
    ("t2v", ["--input-video", "no-such.mp4"], "does not exist"),
    ("camera", ["--camera-poses", "bad-poses.txt"], "bad-poses.txt', line 3 has 18 numbers; a pose has 19"),
    ("camera", ["--camera-poses", "poses.txt", "--frames", "9"], "have 6 rows, which give 6 frames; the video has 9"),
]


@pytest.mark.parametrize("variant,args,words", BAD, ids=[" ".join(b[1]) for b in BAD])
def test_options_that_do_not_fit_the_model_are_refused_before_loading(releases, media, tmp_path, capsys,
                                                                     no_model_loading, variant, args, words):
    (media / "bad-poses.txt").write_text("header\n0 0.47 0.84 0.5 0.5 0 0 1 0 0 0 0 1 0 0 0 0 1 0\n"
                                         "0 0.47 0.84 0.5 0.5 0 0 1 0 0 0 0 1 0 0 0 0 1\n")
    folder = cli.demo_model_path() if variant == "demo" else releases[variant]
    if variant == "demo" and not (folder / "transformer").is_dir():
        pytest.skip("demo model not found")
    args = [str(media / a) if a.endswith((".png", ".txt", ".mp4")) else a for a in args]
    given = set(args[::2])
    small = [] if variant == "demo" else [x for pair in (("--frames", "5"), ("--size", "32x48"))
                                            if pair[0] not in given for x in pair]
    assert generate(folder, tmp_path / "v.mp4", *small, *args) == 2
    assert words in one_clear_line(capsys)
