"""Peak memory and time of loading a transformer checkpoint: our loader vs. the naive route.

Each measurement runs in a fresh process. Peak memory is the high-water mark of the process's
anonymous resident memory (RssAnon, sampled every millisecond) above what it held before loading,
i.e. what loading costs beyond the page cache. "naive" builds the model with random init and then
calls `load_state_dict` on a fully read state dict, as most loaders do.

    python benchmarks/load_memory.py            # full-width V3 blocks (hidden 1152), about 1.3 GB fp32
    python benchmarks/load_memory.py --smoke    # tiny, for CI

V5/V5.1 (`--v5`): a V5.1 transformer of the 12B width (48 heads x 64, feed-forward 12288, Qwen2-VL text 3584,
every block MMDiT) with `--blocks` blocks (default 16, about 7.9 GB), random weights written in the original
release layout (config.json + bf16 safetensors shards with their `.index.json`; `--shards 1`: one file), then
loaded with `load_transformer(folder, dtype="bf16")` in a fresh process, `--repeats` times. The figure is the
process's peak resident set (VmHWM, counter reset just before loading) minus its resident set before loading:
once right after `load_transformer` returns, and once more after every weight page has been read (the loader
maps the file, so file pages become resident when first used: the second figure is the loaded model in RAM).
The target is that second peak <= 1.05 x the weights' bytes.

    python benchmarks/load_memory.py --v5                  # 16 blocks, about 7.9 GB bf16 (a minute or two)
    python benchmarks/load_memory.py --v5 --blocks 20      # about 9.8 GB
    python benchmarks/load_memory.py --v5 --smoke          # tiny, for CI
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the parent process also builds a model (--v5 writes its release folder)

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


# --- V5 / V5.1 ---------------------------------------------------------------------------------------

V5_TARGET = 1.05  # peak resident set of loading, in weight bytes

_V5_CHILD = r"""
import json, sys, time
sys.path.insert(0, {root!r})
sys.path.insert(0, {here!r})
from process_memory import reset_peak, status_kib
import torch
from easyanimate.loading import load_transformer

base, base_anon, base_file = (status_kib(k) * 1024 for k in ("VmRSS", "RssAnon", "RssFile"))
reset = reset_peak()
t0 = time.perf_counter()
model = load_transformer({folder!r}, dtype="bf16")
seconds = time.perf_counter() - t0
loaded = {{k: status_kib(k) * 1024 for k in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}}
t0 = time.perf_counter()
with torch.no_grad():  # read one value of every 4 KiB page of every weight: the whole model resident
    for p in model.parameters():
        flat = p.detach().reshape(-1)
        flat[:: max(1, 4096 // p.element_size())].float().sum()
touch_s = time.perf_counter() - t0
resident = {{k: status_kib(k) * 1024 for k in ("VmHWM", "VmRSS", "RssAnon", "RssFile")}}
print(json.dumps({{
    "seconds": seconds, "touch_s": touch_s, "peak_reset": reset, "base_rss": base, "base_anon": base_anon,
    "base_file": base_file, "loaded": loaded, "resident": resident,
    "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    "params": sum(p.numel() for p in model.parameters()),
    "dtypes": sorted({{str(p.dtype) for p in model.parameters()}}),
}}))
"""


def v5_config(blocks: int, smoke: bool) -> dict:
    """The released V5.1 config (easyanimate/configs/transformer_v51.json: 12B width, InP channels, every block
    MMDiT) with `blocks` blocks; smoke: a tiny width."""
    sys.path.insert(0, str(ROOT))
    from easyanimate.models.mmdit import family_preset

    raw = dict(family_preset("v51"), num_layers=blocks, mmdit_layers=blocks)
    if smoke:
        raw.update(num_attention_heads=2, attention_head_dim=16, text_embed_dim=24, time_embed_dim=16)
    return raw


def make_v5_release(folder: Path, blocks: int, shards: int, smoke: bool = False) -> int:
    """A V5.1 transformer folder in the original release layout with random bf16 weights (std 0.02), written
    shard by shard (a shard's tensors are the only ones in memory); returns the bytes of all shards."""
    import torch
    from safetensors.torch import save_file

    from easyanimate.models.mmdit import EasyAnimateMMDiT, MMDiTConfig

    raw = v5_config(blocks, smoke)
    with torch.device("meta"):
        model = EasyAnimateMMDiT(MMDiTConfig.from_dict(raw, "v51"), dtype=torch.bfloat16)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    del model
    # blocks split evenly over the shards; the embeddings go with the first, the output layers with the last
    per_shard = -(-blocks // shards)
    def shard_of(key: str) -> int:
        if key.startswith("transformer_blocks."):
            return int(key.split(".")[1]) // per_shard
        return 0 if key.startswith(("time_embedding.", "proj.", "text_proj")) else shards - 1
    groups: dict[int, list[str]] = {}
    for key in shapes:
        groups.setdefault(min(shard_of(key), shards - 1), []).append(key)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    names = {i: (f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors" if shards > 1
                 else "diffusion_pytorch_model.safetensors") for i in range(shards)}
    generator, total, weight_map = torch.Generator().manual_seed(0), 0, {}
    for index in range(shards):
        tensors = {k: torch.empty(shapes[k], dtype=torch.bfloat16).normal_(0, 0.02, generator=generator)
                   for k in groups.get(index, [])}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(folder / names[index]), metadata={"format": "pt"})
        weight_map.update({k: names[index] for k in tensors})
        del tensors
    if shards > 1:
        index_file = folder / "diffusion_pytorch_model.safetensors.index.json"
        index_file.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


def measure_v5(folder: Path) -> dict:
    code = _V5_CHILD.format(root=str(ROOT), here=str(Path(__file__).resolve().parent), folder=str(folder))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_v5(smoke: bool, repeats: int, blocks: int, shards: int, folder: Path | None = None) -> dict:
    """Write the release folder (or reuse `folder` if it already holds one) and load it `repeats` times."""
    with tempfile.TemporaryDirectory() as tmp:
        where = folder or Path(tmp) / "transformer"
        start = time.perf_counter()
        if not (where / "config.json").is_file():
            file_bytes = make_v5_release(where, blocks, shards, smoke)
        else:
            file_bytes = sum(f.stat().st_size for f in where.glob("*.safetensors"))
        write_s = time.perf_counter() - start
        files = sorted(f.name for f in where.glob("*.safetensors"))
        runs = [measure_v5(where) for _ in range(repeats)]
    return {"blocks": blocks, "shards": len(files), "file_bytes": file_bytes, "write_s": write_s, "runs": runs,
            "load": Path("/proc/loadavg").read_text().split()[0]}


def v5_peak(run: dict, when: str) -> int:
    return run[when]["VmHWM"] - run["base_rss"]


def print_v5_table(result: dict) -> None:
    runs = result["runs"]
    first = runs[0]
    weights = first["model_bytes"]
    mib = lambda v: f"{v / 2**20:.0f}"  # noqa: E731
    print(f"V5.1, 12B width ({first['params'] / 1e9:.3f} B parameters, {result['blocks']} blocks, "
          f"{' '.join(first['dtypes'])}), original release layout in {result['shards']} safetensors file(s) of "
          f"{mib(result['file_bytes'])} MiB in all; load_transformer(folder, dtype=\"bf16\") in a fresh process; "
          f"1-minute load average {result['load']} when the table was printed")
    print()
    print("| run | weights MiB | load s | peak RSS after load MiB | peak RSS resident MiB | resident / weights "
          "| anon MiB | file-backed MiB | target |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|:---|")
    for i, run in enumerate(runs, 1):
        ratio = v5_peak(run, "resident") / weights
        verdict = "PASS" if ratio <= V5_TARGET else "MISS"
        anon = run["resident"]["RssAnon"] - run["base_anon"]
        mapped = run["resident"]["RssFile"] - run["base_file"]
        print(f"| {i} | {mib(weights)} | {run['seconds']:.2f} | {mib(v5_peak(run, 'loaded'))} | "
              f"{mib(v5_peak(run, 'resident'))} | {ratio:.3f} | {mib(anon)} | {mib(mapped)} | "
              f"<= {V5_TARGET:g} x weights: {verdict} |")
    print()
    print("MiB = 2**20 bytes. Peaks are the process's VmHWM (reset just before loading) minus its VmRSS before loading "
          "(interpreter and torch excluded). 'after load': when load_transformer returns; 'resident': after one "
          "value of every 4 KiB page of every weight was read. anon / file-backed: the resident set's anonymous and "
          "file-mapped parts beyond the baseline (bf16 tensors of a bf16 file stay mapped from the file; the page "
          "cache is shared with other processes, so the kernel may drop and re-read them).")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for CI")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--v5", action="store_true", help="a V5.1 transformer of the 12B width (see above)")
    parser.add_argument("--blocks", type=int, default=16, help="--v5: transformer blocks (default 16)")
    parser.add_argument("--shards", type=int, default=4, help="--v5: safetensors shards (default 4; 1: one file)")
    parser.add_argument("--folder", type=Path, default=None,
                        help="--v5: write the release folder here and keep it (reused when it exists)")
    args = parser.parse_args()
    if args.v5:
        blocks = 2 if args.smoke else args.blocks
        shards = min(args.shards, blocks)
        print_v5_table(run_v5(args.smoke, 1 if args.smoke else args.repeats, blocks, shards, args.folder))
        return
    print_table(run(args.smoke, 1 if args.smoke else args.repeats))


if __name__ == "__main__":
    main()
