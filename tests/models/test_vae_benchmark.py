"""The VAE memory benchmark runs end to end on tiny sizes (`--smoke`), in fresh processes."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_benchmark_smoke(tmp_path):
    """What the rows hold is checked (their memory and time figures are measurements: the benchmark prints the
    15 % claim with its verdict, and a smoke run does not enforce it)."""
    import json

    chart, rows_file = tmp_path / "chart.png", tmp_path / "rows.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "vae_memory.py"), "--smoke", "--threads", "1", "--plot", str(chart),
         "--budget", "0.05", "--json", str(rows_file)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| frames | latent frames | smoothing |" in done.stdout
    rows = json.loads(rows_file.read_text())
    # smoothing off and on at 16 and 40 frames, then 16 and 40 frames in the tiles the 0.05 MiB budget picks
    assert [(r["frames"], r["smooth"], r["budget_mib"]) for r in rows] == [
        (16, False, None), (40, False, None), (16, True, None), (40, True, None), (16, False, 0.05), (40, False, 0.05)]
    for r in rows:
        assert r["latent_frames"] == {16: 4, 40: 10}[r["frames"]], r  # 8 frames -> 2 latents (V3 slices)
        assert r["output_mib"] == r["frames"] * 3 * 32 * 32 * 4 / 2**20, r  # float32 (1, 3, F, 32, 32)
        assert r["median_s"] > 0 and r["runs"] == 1, r
    assert "limit +15%" in done.stdout
    assert "no comparison with the original EasyAnimate code in this run, so no ratio" in done.stdout
    from PIL import Image

    with Image.open(chart) as image:
        assert image.size[0] > 100
