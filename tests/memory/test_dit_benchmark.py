"""The transformer benchmark runs end to end on a tiny model (`--smoke`), every mode in fresh processes."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_dit_forward_benchmark_smoke(tmp_path):
    rows = tmp_path / "rows.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "dit_forward.py"), "--smoke", "--repeats", "1", "--json", str(rows)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "| mode | weights GB | peak RSS GB |" in out
    for label in ("plain fp32", "budget", "fp8 e4m3fn weights", "block-swap 4"):
        assert label in out
    assert "no comparison with the original EasyAnimate code in this run, so no ratio" in out
    import json

    table = {r["mode"]: r for r in json.loads(rows.read_text())}
    assert table["plain"]["error"] == 0 and table["budget"]["error"] <= 1e-5
    assert 0 < table["fp8"]["error"] <= 3e-2
    assert table["fp8"]["weights_bytes"] < 0.4 * table["plain"]["weights_bytes"]
    assert table["block-swap"]["most_blocks"] == 4 and table["block-swap"]["error"] == 0
