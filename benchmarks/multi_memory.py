"""Peak memory and time of MuLTI's fusion stage: Text-Guided MultiWay-Sampler vs flatten-and-concatenate fusion.

Both fusion modules have the same width and depth (ViT-B / BERT-base: d 768, 12 heads, K = 4 layers, FFN 4d
per modality; random weights, float32, CPU) and both use `scaled_dot_product_attention`. The inputs are random
encoder outputs: T frames of 197 tokens (ViT-B/16 at 224 px: [CLS] + 14x14 patches) and L text tokens (the last
batch item padded to 3/4 of L). One measurement = one training step of the fusion stage: forward, a scalar
loss on every output token, backward with respect to the fusion parameters and both inputs.

    python benchmarks/multi_memory.py                    # full grid (about 15-20 min on 2 CPU cores)
    python benchmarks/multi_memory.py --batch 1 --repeats 1
    python benchmarks/multi_memory.py --smoke            # tiny widths, seconds (what the test suite runs)
    python benchmarks/multi_memory.py --plot out.png     # also a chart, if matplotlib is installed

Grid: frames {4, 8, 16, 32, 64} at L = 32; L {32, 128, 512} at T = 16; T = 64 at L = 512 unless the flatten
step is predicted to need more than --max-mib. The sampler condenses text beyond 64 tokens (its default), so
long text costs it little; MLM, which keeps all text tokens, is not what is measured here.

Each configuration runs in a fresh process, so one measurement cannot inherit another's heap: the process
builds the module and inputs, runs a small warm-up step, frees everything it can, resets its peak-RSS counter
(Linux `/proc/self/clear_refs`), runs the step once for the memory figure (peak VmHWM minus the RSS before the
step: activations, gradients and temporaries; not the inputs or weights), then repeats it for the timing.
glibc is told to unmap freed tensors (`MALLOC_MMAP_THRESHOLD_`), so RSS follows live tensors. Time is the median
of --repeats steps, the first included; a step slower than --slow-seconds is run once only (marked * in the table).

Claims checked at the end (exit status 1 if one fails): the sampler's peak grows at most linearly in the number
of frames (its memory per added frame in the last interval is at most 1.25x the largest earlier one) and, at
64 frames (L = 32), stays at or below a quarter of the flatten baseline's.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from process_memory import reset_peak, status_kib

ROOT = Path(__file__).resolve().parent.parent
FULL = {"dim": 768, "heads": 12, "layers": 4, "grid": [16, 4, 4], "patch_side": 14, "guide_dim": 256, "keep": 64,
        "frames": [4, 8, 16, 32, 64], "texts": [32, 128, 512], "text_at": 16, "long": (64, 512)}
SMOKE = {"dim": 32, "heads": 2, "layers": 2, "grid": [4, 2, 2], "patch_side": 4, "guide_dim": 16, "keep": 16,
         "frames": [2, 3, 4], "texts": [8, 24], "text_at": 2, "long": None}
GROWTH_TOLERANCE = 1.25
RATIO_LIMIT = 0.25








def child(args) -> None:
    """One (fusion, T, L) configuration in its own process; prints one JSON line."""
    sys.path.insert(0, str(ROOT))
    import torch

    from easyanimate.memory import release_freed_memory

    from easyanimate.multi.config import SamplerConfig
    from easyanimate.multi.sampler import build_fusion

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    arch = SMOKE if args.smoke else FULL
    d, side = arch["dim"], arch["patch_side"]
    config = SamplerConfig(layers=arch["layers"], heads=arch["heads"], ffn_mult=4, grid=tuple(arch["grid"]),
                           residual_mode="text_guided_pool", guide_dim=arch["guide_dim"], text_keep_max=arch["keep"],
                           fusion=args.fusion)
    module = build_fusion(config, d).train()
    if args.fusion == "sampler":  # as after training: the text guidance is active (W_q != 0)
        torch.nn.init.normal_(module.guide_query.weight, std=0.02)

    def inputs(batch, frames, length):
        video = torch.randn(batch, frames, 1 + side * side, d, requires_grad=True)
        text = torch.randn(batch, length, d, requires_grad=True)
        mask = torch.ones(batch, length, dtype=torch.bool)
        mask[-1, max(1, (3 * length) // 4):] = False
        return video, text, mask

    def step(video, text, mask):
        module.zero_grad(set_to_none=True)
        video.grad = text.grad = None
        fused = module(video, text, mask, grid_hw=(side, side))
        loss = fused.video.square().mean() + fused.text.square().mean()
        loss.backward()

    step(*inputs(1, 2, 8))  # kernels, thread pools, lazy imports: once per process, not step memory
    video, text, mask = inputs(args.batch, args.frames, args.text)
    module.zero_grad(set_to_none=True)
    gc.collect()
    release_freed_memory()
    before = status_kib("VmRSS")
    reset = reset_peak()
    start = time.perf_counter()
    step(video, text, mask)
    times = [time.perf_counter() - start]
    peak = status_kib("VmHWM")
    if times[0] <= args.slow_seconds:
        for _ in range(args.repeats - 1):
            start = time.perf_counter()
            step(video, text, mask)
            times.append(time.perf_counter() - start)
    print(json.dumps({
        "fusion": args.fusion, "frames": args.frames, "text": args.text, "batch": args.batch,
        "video_tokens": args.frames * (1 + side * side), "peak_mib": (peak - before) / 1024, "peak_reset": reset,
        "median_s": statistics.median(times), "runs": len(times),
    }))


def measure(args, fusion: str, frames: int, text: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--fusion", fusion, "--frames", str(frames), "--text", str(text),
           "--batch", str(args.batch), "--repeats", str(args.repeats), "--threads", str(args.threads),
           "--slow-seconds", str(args.slow_seconds)]
    cmd += ["--smoke"] if args.smoke else []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise SystemExit(f"benchmark child failed ({' '.join(cmd)}):\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {fusion:8s} T={frames:3d} L={text:4d}: peak {result['peak_mib']:9.1f} MB, "
          f"{result['median_s']:8.2f} s ({result['runs']} run(s))", flush=True)
    return result


def grid(arch) -> list[tuple[int, int]]:
    rows = [(t, arch["texts"][0]) for t in arch["frames"]]
    rows += [(arch["text_at"], length) for length in arch["texts"][1:]]
    return rows + ([tuple(arch["long"])] if arch["long"] else [])


def slopes(rows: list[dict], fusion: str, text: int) -> list[tuple[int, int, float]]:
    """(T_a, T_b, MB per added frame) between consecutive frame counts at text length `text`."""
    series = sorted((r["frames"], r[fusion]["peak_mib"]) for r in rows if r["text"] == text and fusion in r)
    return [(a, b, (pb - pa) / (b - a)) for (a, pa), (b, pb) in zip(series, series[1:])]


def report(rows: list[dict], args, arch) -> tuple[str, list[str]]:
    def time_cell(r):
        return f"{r['median_s']:.2f}" + ("*" if r["runs"] < args.repeats else "")

    lines = [
        f"Fusion stage, one training step (forward + backward w.r.t. fusion params and inputs), batch {args.batch}, "
        f"d {arch['dim']}, {arch['heads']} heads, K = {arch['layers']}, FFN 4d, {1 + arch['patch_side'] ** 2} tokens/frame, "
        f"float32, CPU ({args.threads} threads), SDPA in both, random weights; time = median of {args.repeats} "
        "steps (* = one step only: slower than --slow-seconds)",
        "",
        "| frames T | text L | video tokens | sampler peak MB | flatten peak MB | sampler / flatten | sampler s | flatten s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s, f = r["sampler"], r.get("flatten")
        lines.append(
            f"| {r['frames']} | {r['text']} | {s['video_tokens']} | {s['peak_mib']:.1f} | "
            + (f"{f['peak_mib']:.1f} | {s['peak_mib'] / f['peak_mib']:.3f} | {time_cell(s)} | {time_cell(f)} |" if f
               else f"skipped ({r.get('skipped')}) | - | {time_cell(s)} | - |"))
    text = arch["texts"][0]
    sampler_slopes, flatten_slopes = slopes(rows, "sampler", text), dict(((a, b), v) for a, b, v in slopes(rows, "flatten", text))
    lines += ["", f"Linear-growth check (L = {text}): peak memory per added frame",
              "", "| frames | sampler MB/frame | flatten MB/frame |", "|---|---:|---:|"]
    for a, b, v in sampler_slopes:
        lines.append(f"| {a} -> {b} | {v:.2f} | {flatten_slopes.get((a, b), float('nan')):.2f} |")

    failures = []
    if len(sampler_slopes) >= 2:
        last, earlier = sampler_slopes[-1][2], max(v for _, _, v in sampler_slopes[:-1])
        ok = last <= GROWTH_TOLERANCE * max(earlier, 0.0) + 1e-9
        lines.append(f"\nsampler growth: {last:.2f} MB/frame in the last interval vs at most {earlier:.2f} before "
                     f"(limit {GROWTH_TOLERANCE}x): {'OK, at most linear' if ok else 'FAILED: superlinear'}")
        if not ok:
            failures.append("sampler peak grows faster than linearly in the number of frames")
    longest = max(arch["frames"])
    at = next((r for r in rows if r["frames"] == longest and r["text"] == text and "flatten" in r), None)
    if at is not None:
        ratio = at["sampler"]["peak_mib"] / at["flatten"]["peak_mib"]
        ok = ratio <= RATIO_LIMIT
        lines.append(f"sampler / flatten peak at {longest} frames: {ratio:.3f} (limit {RATIO_LIMIT}): {'OK' if ok else 'FAILED'}")
        if not ok:
            failures.append(f"sampler peak at {longest} frames is {ratio:.2f} of flatten's (> {RATIO_LIMIT})")
    return "\n".join(lines), failures


def plot(rows: list[dict], path: str, arch) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; no plot written")
        return
    text = arch["texts"][0]
    fig, ax = plt.subplots(figsize=(6, 4))
    for fusion in ("sampler", "flatten"):
        series = sorted((r["frames"], r[fusion]["peak_mib"]) for r in rows if r["text"] == text and fusion in r)
        ax.plot([t for t, _ in series], [m for _, m in series], marker="o", label=fusion)
    ax.set_xlabel("frames")
    ax.set_ylabel("peak memory of a fusion training step (MB)")
    ax.set_title(f"MuLTI fusion memory, L = {text}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot written to {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny widths, a few seconds; claims are reported, not enforced")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slow-seconds", type=float, default=90.0, help="a step slower than this is timed once only")
    parser.add_argument("--max-mib", type=float, default=10240.0, help="skip flatten rows predicted to need more")
    parser.add_argument("--plot", help="write a chart of peak memory against frames to this PNG")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fusion", default="sampler", help=argparse.SUPPRESS)
    parser.add_argument("--frames", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--text", type=int, default=32, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    arch = SMOKE if args.smoke else FULL
    rows = [{"frames": t, "text": length} for t, length in grid(arch)]
    if args.smoke:  # every child at once (their timings mean nothing here); each still has its own process
        from concurrent.futures import ThreadPoolExecutor

        args.repeats, args.batch, args.threads = 1, 1, 1
        with ThreadPoolExecutor(max_workers=4) as pool:
            jobs = {(row["frames"], row["text"], fusion): pool.submit(measure, args, fusion, row["frames"], row["text"])
                    for row in rows for fusion in ("sampler", "flatten")}
        for row in rows:
            for fusion in ("sampler", "flatten"):
                row[fusion] = jobs[(row["frames"], row["text"], fusion)].result()
        table, _ = report(rows, args, arch)
        print("\n" + table + "\n\nsmoke run: claims reported, not enforced")
        return 0
    print("sampler rows:", flush=True)
    for row in rows:
        row["sampler"] = measure(args, "sampler", row["frames"], row["text"])
    print("flatten rows:", flush=True)
    for row in sorted(rows, key=lambda r: r["frames"] * (1 + arch["patch_side"] ** 2) + r["text"]):
        tokens = row["frames"] * (1 + arch["patch_side"] ** 2) + row["text"]
        done = [r for r in rows if "flatten" in r]
        if done:  # flatten memory is about linear in the token count (SDPA never builds the S x S matrix)
            ref = max(done, key=lambda r: r["flatten"]["video_tokens"] + r["text"])
            predicted = ref["flatten"]["peak_mib"] * tokens / (ref["flatten"]["video_tokens"] + ref["text"])
            if predicted > args.max_mib:
                row["skipped"] = f"predicted {predicted / 1024:.1f} GB > --max-mib"
                print(f"  flatten  T={row['frames']:3d} L={row['text']:4d}: {row['skipped']}", flush=True)
                continue
        row["flatten"] = measure(args, "flatten", row["frames"], row["text"])
    table, failures = report(rows, args, arch)
    print()
    print(table)
    if args.plot:
        plot(rows, args.plot, arch)
    if not all(r["sampler"]["peak_reset"] for r in rows):
        print("\nwarning: /proc/self/clear_refs was not writable; peaks include process start-up")
    if failures:
        print("\nFAILED: " + "; ".join(failures))
        return 1
    print("\nall claims hold")
    return 0


if __name__ == "__main__":
    sys.exit(main())
