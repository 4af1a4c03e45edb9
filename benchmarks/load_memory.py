"""Peak memory and time of loading a transformer checkpoint: our loader vs. the naive route.

Each measurement runs in a fresh process. Peak memory is the high-water mark of the process's
anonymous resident memory (RssAnon, sampled every millisecond) above what it held before loading,
i.e. what loading costs beyond the page cache. "naive" builds the model with random init and then
calls `load_state_dict` on a fully read state dict, as most loaders do.

    python benchmarks/load_memory.py            # full-width V3 blocks (hidden 1152), about 1.3 GB fp32
    python benchmarks/load_memory.py --smoke    # tiny, for CI
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_CHILD = r"""
import json, sys, threading, time
sys.path.insert(0, {root!r})
import torch
from easyanimate.loading import load_transformer

def rss():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["RssAnon"].split()[0]) * 1024, int(fields["VmRSS"].split()[0]) * 1024
peak = [0, 0]
stop = threading.Event()
def sample():
    while not stop.is_set():
        anon, total = rss()
        peak[0], peak[1] = max(peak[0], anon), max(peak[1], total)
        time.sleep(0.001)
base, base_total = rss()
thread = threading.Thread(target=sample, daemon=True)
thread.start()
t0 = time.perf_counter()
if {method!r} == "ours":
    model = load_transformer({folder!r}, dtype={dtype!r})
else:
    from safetensors.torch import load_file
    from easyanimate.models.transformer import EasyAnimateTransformer3D, TransformerConfig
    cfg = TransformerConfig.from_dict(json.load(open({folder!r} + "/config.json")), "v3")
    model = EasyAnimateTransformer3D(cfg).to({{"fp32": torch.float32, "bf16": torch.bfloat16}}[{dtype!r}])
    state = load_file({folder!r} + "/diffusion_pytorch_model.safetensors")
    model.load_state_dict({{k: v for k, v in state.items() if not k.endswith(".pe")}}, strict=False)
    del state
elapsed = time.perf_counter() - t0
stop.set(); thread.join()
anon, total = rss()
peak[0], peak[1] = max(peak[0], anon), max(peak[1], total)
size = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({{"seconds": elapsed, "peak_beyond_base": peak[0] - base, "peak_rss_beyond_base": peak[1] - base_total,
                  "model_bytes": size}}))
"""


def make_checkpoint(folder: Path, hidden_heads: int, layers: int) -> int:
    """A V3-layout folder with random weights; returns the file size."""
    sys.path.insert(0, str(ROOT))
    import torch
    from safetensors.torch import save_file

    from easyanimate.models.transformer import EasyAnimateTransformer3D, TransformerConfig, family_preset

    raw = dict(family_preset("v3"), num_layers=layers, num_attention_heads=hidden_heads)
    raw["cross_attention_dim"] = hidden_heads * raw["attention_head_dim"]
    model = EasyAnimateTransformer3D(TransformerConfig.from_dict(raw, "v3"))
    sd = {k: torch.randn(v.shape) * 0.02 for k, v in model.state_dict().items()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(raw))
    return (folder / "diffusion_pytorch_model.safetensors").stat().st_size


def measure(folder: Path, method: str, dtype: str) -> dict:
    code = _CHILD.format(root=str(ROOT), folder=str(folder), method=method, dtype=dtype)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(smoke: bool, repeats: int) -> list[dict]:
    heads, layers = (4, 4) if smoke else (16, 4)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "transformer"
        file_bytes = make_checkpoint(folder, heads, layers)
        for method, dtype in (("ours", "fp32"), ("naive", "fp32"), ("ours", "bf16"), ("naive", "bf16")):
            runs = sorted((measure(folder, method, dtype) for _ in range(repeats)), key=lambda r: r["seconds"])
            best = runs[len(runs) // 2]
            rows.append(dict(method=method, dtype=dtype, file_mb=file_bytes / 2**20,
                             model_mb=best["model_bytes"] / 2**20, peak_mb=best["peak_beyond_base"] / 2**20,
                             peak_rss_mb=best["peak_rss_beyond_base"] / 2**20,
                             seconds=best["seconds"]))
    return rows


def meets_target(row: dict) -> bool:
    """Our loader holds one copy of the weights at most: peak anon <= 1.15 x weights + 8 MB."""
    return row["peak_mb"] <= 1.15 * row["model_mb"] + 8


def print_table(rows: list[dict]) -> None:
    base = {r["dtype"]: r["seconds"] for r in rows if r["method"] == "naive"}
    print(f"{'loader':<7}{'dtype':<6}{'file MB':>9}{'weights MB':>12}{'peak anon MB':>14}{'peak RSS MB':>13}"
          f"{'anon/weights':>14}{'time s':>8}{'time/naive':>12}  target (ours: anon <= 1.15 x weights + 8 MB)")
    for r in rows:
        verdict = ("PASS" if meets_target(r) else "MISS") if r["method"] == "ours" else "-"
        print(f"{r['method']:<7}{r['dtype']:<6}{r['file_mb']:>9.1f}{r['model_mb']:>12.1f}{r['peak_mb']:>14.1f}"
              f"{r['peak_rss_mb']:>13.1f}{r['peak_mb'] / r['model_mb']:>14.2f}{r['seconds']:>8.2f}"
              f"{r['seconds'] / base[r['dtype']]:>12.2f}  {verdict}")
    print("anon = anonymous memory (what loading costs); RSS also counts file pages mapped from the checkpoint,"
          " which the kernel can drop and re-read. fp32 weights stay mapped from the file until first moved.")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print_table(run(args.smoke, 1 if args.smoke else args.repeats))


if __name__ == "__main__":
    main()
