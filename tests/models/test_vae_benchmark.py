"""The VAE memory benchmark runs end to end on tiny sizes (`--smoke`), in fresh processes."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_smoke():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "vae_memory.py"), "--smoke", "--threads", "1"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| frames | latent frames | smoothing |" in done.stdout
    assert done.stdout.count("| on |") == 2 and done.stdout.count("| off |") == 2
    assert "limit +15%" in done.stdout
