"""`python -m easyanimate generate --memory-mode ...`: every mode makes the plain run's video (fp8: close)."""
import numpy as np
import pytest
from PIL import Image

from easyanimate import cli

DEMO = cli.demo_model_path()
LORA = DEMO / "loras" / "magenta.safetensors"
needs_demo = pytest.mark.skipif(not (DEMO / "transformer").is_dir(), reason=f"demo model not found at {DEMO}")


def test_generate_help_documents_the_memory_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    out = capsys.readouterr().out
    for option in ("--memory-mode", "--swap-blocks", "--memory-budget", "block-swap", "offload", "fp8"):
        assert option in out


def _smallest_budget_mb(frames: int) -> float:
    """The smallest memory budget the pack accepts for the demo model's default size at `frames` frames."""
    from easyanimate.pipeline import load_model, stages_for

    model = load_model(DEMO, dtype="fp32", text_encoder=False)
    defaults = cli.generation_defaults(DEMO)
    stages = stages_for(model.transformer, model.vae)
    request = stages.request(frames=frames, height=defaults["height"], width=defaults["width"],
                             guidance_scale=defaults["guidance_scale"])
    return stages.memory_estimate(request).budget_minimum / 2**20


@needs_demo
def test_a_budget_below_what_the_request_needs_is_refused_before_sampling(tmp_path, capsys):
    budget = _smallest_budget_mb(frames=8) / 2
    out = tmp_path / "refused.png"
    code = cli.main(["generate", "--prompt", "a red circle", "--frames", "8", "--steps", "2", "--quiet",
                     "--memory-budget", f"{budget:.6f}", "--out", str(out)])
    assert code == 2 and "memory budget" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def _frames(folder, name):
    return np.stack([np.asarray(Image.open(p), dtype=np.int16) for p in sorted(folder.glob(f"{name}_*.png"))])


@needs_demo
@pytest.mark.parametrize("lora", [False, True])
def test_every_memory_mode_makes_the_same_video(tmp_path, lora):
    base = ["generate", "--prompt", "a red circle moving right on a black background", "--frames", "8",
            "--steps", "2", "--quiet", "--threads", "1"] + (["--lora", f"{LORA}:0.8"] if lora else [])
    runs = {"none": [], "offload": [], "block-swap": ["--swap-blocks", "2"],
            "budget": ["--memory-budget", str(_smallest_budget_mb(frames=8))], "fp8": []}
    for name, extra in runs.items():
        mode = "none" if name == "budget" else name
        assert cli.main(base + ["--out", str(tmp_path / f"{name}.png"), "--memory-mode", mode] + extra) == 0
    plain = _frames(tmp_path, "none")
    assert len(plain) == 8
    for name in ("offload", "block-swap"):
        assert np.array_equal(_frames(tmp_path, name), plain), name
    # the budget also tiles the VAE decode (64 px tiles), which blends tile borders
    assert np.abs(_frames(tmp_path, "budget") - plain).mean() < 8
    # fp8 runs and makes the video; its per-forward error is tested in test_memory_modes (two sampling
    # steps of the small demo model turn it into large pixel differences; 25 steps give about 1.4 / 255)
    assert _frames(tmp_path, "fp8").shape == plain.shape
