"""The VAE memory benchmark runs end to end on tiny sizes (`--smoke`), in fresh processes."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_smoke(tmp_path):
    chart = tmp_path / "chart.png"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "vae_memory.py"), "--smoke", "--threads", "1", "--plot", str(chart),
         "--budget", "0.05"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| frames | latent frames | smoothing |" in done.stdout
    assert done.stdout.count("| on |") == 2 and done.stdout.count("| off |") == 4  # + the two budget rows
    assert "MiB budget" in done.stdout
    assert "limit +15%" in done.stdout
    from PIL import Image

    with Image.open(chart) as image:
        assert image.size[0] > 100
