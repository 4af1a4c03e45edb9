"""Peak memory and time of V3 slice-VAE decoding against video length.

For a full-width V3 VAE (ch 128, ch_mult [1, 2, 4, 4], random weights; no checkpoint needed) this
decodes 16, 48 and 144 frames at 128x128, with and without the reference's smoothing pass (and,
with `--budget`, with the tile size a memory budget picks), and prints the peak memory beyond the
weights and the output tensor, and the median time.

Each configuration runs in two fresh processes, so no measurement inherits another's heap; both
build the model and first decode a few slices of the same shapes (oneDNN builds a kernel per shape,
thread pools start: once per process, not decode memory):

* the memory run then resets its peak-RSS counter (Linux `/proc/self/clear_refs`) and decodes once,
  with glibc told to unmap freed tensors (`MALLOC_MMAP_THRESHOLD_`), so the figure is what is live;
* the time run, with glibc's defaults (unmapping every tensor costs page faults), times `--repeats`
  decodes and reports their median; its own peak is shown as well.

    python benchmarks/vae_memory.py                 # 128x128, 16/48/144 frames, 3 timed runs each
    python benchmarks/vae_memory.py --size 64       # faster on small CPUs
    python benchmarks/vae_memory.py --budget 100    # adds rows decoded in the tiles a 100 MiB budget picks
    python benchmarks/vae_memory.py --smoke         # tiny model, seconds (what the test suite runs)
    python benchmarks/vae_memory.py --plot out.png  # also a chart of memory and time against frames

The claim checked at the end: the peak beyond the output stays within 15 % from the shortest to the
longest video (exit status 1 otherwise).
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
TOLERANCE = 0.15
NOISE_MIB = 2.0
FULL = {"ch": 128, "ch_mult": [1, 2, 4, 4], "norm_num_groups": 32}
SMOKE = {"ch": 8, "ch_mult": [1, 2, 4, 4], "norm_num_groups": 4}
# The original EasyAnimate V3 code on the same kind of machine (2 cores, float32, 2 threads), 128x128,
# smoothing off, as given in the issue that asked for this work: frames -> (MB beyond weights and output, s).
REFERENCE_128 = {16: (652, 25), 48: (687, 77), 144: (722, 207)}








def child(args) -> None:
    """One configuration, in its own process; prints one JSON line."""
    sys.path.insert(0, str(ROOT))
    import torch

    from easyanimate.memory import release_freed_memory

    from easyanimate.vae import build_vae

    torch.set_num_threads(args.threads) if args.threads else None
    torch.manual_seed(0)
    arch = SMOKE if args.smoke else FULL
    vae = build_vae("v3", {**arch, "use_tiling": False})
    latent = args.size // 8
    latents = torch.randn(1, 4, vae.rules.latent_frames(args.frames), latent, latent) * vae.scaling_factor

    budget = int(args.budget * 2**20) if args.budget else None

    def run():
        generator = torch.Generator().manual_seed(1) if args.smooth else None
        return vae.decode_video(latents, smooth=bool(args.smooth), generator=generator, memory_budget=budget)

    # One decode of the same slice shapes first (a first, middle and last slice, and with smoothing the
    # encode of their middle): oneDNN builds and caches a kernel per shape, thread pools start and lazy
    # imports run once per process; that is not decode memory.
    warm = latents[:, :, : 1 + 4 * vae.rules.latents_per_chunk]
    vae.decode_video(warm, smooth=bool(args.smooth), generator=torch.Generator().manual_seed(1), memory_budget=budget)
    del warm
    gc.collect()
    release_freed_memory()
    before = status_kib("VmRSS")
    reset = reset_peak()
    start = time.perf_counter()
    out = run()
    first = time.perf_counter() - start
    peak = status_kib("VmHWM")
    output_bytes = out.numel() * out.element_size()
    del out
    times = [first]
    for _ in range(args.repeats - 1 if args.purpose == "time" else 0):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
        peak = max(peak, status_kib("VmHWM"))
    tiling = vae.tiling_for_budget(budget, (latent, latent), 8, decode=True) if budget else None
    result = {
        "frames": args.frames,
        "latent_frames": int(latents.shape[2]),
        "smooth": bool(args.smooth),
        "budget_mib": args.budget or None,
        "tile": tiling.sample_size if tiling else None,
        "output_mib": output_bytes / 2**20,
        "peak_beyond_output_mib": ((peak - before) * 1024 - output_bytes) / 2**20,
        "peak_reset": reset,
        "median_s": statistics.median(times),
        "runs": len(times),
    }
    print(json.dumps(result))


def _run_child(args, frames: int, smooth: bool, budget, purpose: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--frames", str(frames), "--smooth", str(int(smooth))]
    cmd += ["--size", str(args.size), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    cmd += ["--purpose", purpose] + (["--budget", str(budget)] if budget else [])
    cmd += ["--smoke"] if args.smoke else []
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if purpose == "memory":
        # Tensors above 128 KiB get their own mapping and are unmapped when freed, so RSS tracks the
        # live tensors instead of glibc's cached heap.
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise SystemExit(f"benchmark child failed ({' '.join(cmd)}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(args, frames: int, smooth: bool, budget=None) -> dict:
    """One row: the memory run's peak, the time run's median time and peak (smoke: one run for both)."""
    row = _run_child(args, frames, smooth, budget, "memory")
    timed = row if args.smoke else _run_child(args, frames, smooth, budget, "time")
    row.update(median_s=timed["median_s"], runs=timed["runs"], peak_default_mib=timed["peak_beyond_output_mib"])
    return row


def table(rows: list[dict], args) -> str:
    arch = SMOKE if args.smoke else FULL
    reference = not args.smoke and args.size == 128
    lines = [
        f"V3 slice VAE decode, ch {arch['ch']} ch_mult {arch['ch_mult']}, random weights, "
        f"{args.size}x{args.size} px, float32, CPU, {args.threads or 'default'} threads, "
        f"median of {rows[0]['runs']} timed run(s)",
        "",
        "| frames | latent frames | smoothing | tiles | output MiB | peak beyond output MiB | "
        "same, default malloc | time s | s / frame |" + (" reference MB / s |" if reference else ""),
        "|---:|---:|:---:|:---:|---:|---:|---:|---:|---:|" + ("---:|" if reference else ""),
    ]
    for r in rows:
        tiles = f"{r['tile']} px ({r['budget_mib']:g} MiB budget)" if r.get("tile") else (
            f"none ({r['budget_mib']:g} MiB budget)" if r.get("budget_mib") else "none")
        line = (
            f"| {r['frames']} | {r['latent_frames']} | {'on' if r['smooth'] else 'off'} | {tiles} | {r['output_mib']:.1f} | "
            f"{r['peak_beyond_output_mib']:.1f} | {r['peak_default_mib']:.1f} | {r['median_s']:.2f} | "
            f"{r['median_s'] / r['frames']:.3f} |"
        )
        if reference:
            ref = REFERENCE_128.get(r["frames"]) if not r["smooth"] and not r.get("budget_mib") else None
            line += f" {ref[0]} / {ref[1]} |" if ref else " - |"
        lines.append(line)
    if reference:
        lines += ["", "reference: the original EasyAnimate V3 code on a 2-core machine (figures from the issue)."]
    return "\n".join(lines)


def check(rows: list[dict]) -> list[str]:
    failures = []
    for smooth in (False, True):
        series = [r for r in rows if r["smooth"] == smooth and not r.get("budget_mib")]
        if len(series) < 2:
            continue
        low, high = series[0]["peak_beyond_output_mib"], series[-1]["peak_beyond_output_mib"]
        growth = (high - low) / low
        # differences below NOISE_MIB are measurement noise (the smoke model's activations are about 1 MiB)
        verdict = "ok" if growth <= TOLERANCE or high - low <= NOISE_MIB else "FAIL"
        failures += [] if verdict == "ok" else [f"smoothing {smooth}"]
        print(
            f"smoothing {'on ' if smooth else 'off'}: peak beyond output {low:.1f} -> {high:.1f} MiB "
            f"({series[0]['frames']} -> {series[-1]['frames']} frames): {growth:+.1%} (limit +{TOLERANCE:.0%}) {verdict}"
        )
    return failures


def _chart(draw, box, series, xlabel, ylabel, font):
    """One line chart in `box` (x0, y0, x1, y1) of the image: axes from 0, ticks, one polyline per series."""
    x0, y0, x1, y1 = box
    xs = [x for _, points, _ in series for x, _ in points]
    ys = [y for _, points, _ in series for _, y in points]
    xmax, ymax = max(xs) * 1.05, max(ys) * 1.15 or 1
    px = lambda x: x0 + (x1 - x0) * x / xmax  # noqa: E731
    py = lambda y: y1 - (y1 - y0) * y / ymax  # noqa: E731
    draw.line([(x0, y0), (x0, y1), (x1, y1)], fill="black")
    for i in range(5):
        y = ymax * i / 4
        draw.line([(x0 - 4, py(y)), (x0, py(y))], fill="black")
        draw.text((x0 - 8, py(y)), f"{y:.3g}", fill="black", font=font, anchor="rm")
    for x in sorted(set(xs)):
        draw.line([(px(x), y1), (px(x), y1 + 4)], fill="black")
        draw.text((px(x), y1 + 6), str(x), fill="black", font=font, anchor="mt")
    draw.text(((x0 + x1) / 2, y1 + 22), xlabel, fill="black", font=font, anchor="mt")
    draw.text((x0, y0 - 16), ylabel, fill="black", font=font, anchor="lb")
    for n, (name, points, colour) in enumerate(series):
        coords = [(px(x), py(y)) for x, y in points]
        if len(coords) > 1:
            draw.line(coords, fill=colour, width=2)
        for cx, cy in coords:
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=colour)
        draw.line([(x0 + 10, y0 + 8 + 14 * n), (x0 + 30, y0 + 8 + 14 * n)], fill=colour, width=2)
        draw.text((x0 + 36, y0 + 8 + 14 * n), name, fill="black", font=font, anchor="lm")


def plot(rows, path):
    """A PNG with two charts, memory beyond the output and decode time against frames (Pillow only)."""
    from PIL import Image, ImageDraw, ImageFont

    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    memory, seconds = [], []
    groups = list(dict.fromkeys((r["smooth"], r.get("budget_mib")) for r in rows))
    for colour, (smooth, budget) in zip(colours, groups):
        series = [r for r in rows if r["smooth"] == smooth and r.get("budget_mib") == budget]
        name = f"smoothing {'on' if smooth else 'off'}" + (f", {budget:g} MiB budget" if budget else "")
        memory.append((name, [(r["frames"], r["peak_beyond_output_mib"]) for r in series], colour))
        seconds.append((name, [(r["frames"], r["median_s"]) for r in series], colour))
    if rows and rows[0].get("size") == 128 and not rows[0].get("smoke"):
        ref = sorted(REFERENCE_128.items())
        memory.append(("reference (issue)", [(f, m) for f, (m, _) in ref], "#7f7f7f"))
        seconds.append(("reference (issue)", [(f, t) for f, (_, t) in ref], "#7f7f7f"))
    image = Image.new("RGB", (900, 380), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    _chart(draw, (70, 40, 420, 320), memory, "frames", "peak beyond weights and output (MiB)", font)
    _chart(draw, (520, 40, 870, 320), seconds, "frames", "decode time (s)", font)
    image.save(path)
    print(f"plot written to {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model and sizes (seconds)")
    parser.add_argument("--size", type=int, default=None, help="frame edge in pixels (default 128; smoke 32)")
    parser.add_argument("--frames", type=int, nargs="+", default=None, help="frame counts (default 16 48 144)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per configuration (default 3; smoke 1)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG chart of memory and time against frames")
    parser.add_argument("--smoothing", choices=["off", "on", "both"], default="both",
                        help="rows without and/or with the smoothing pass (default both)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    parser.add_argument("--plot-json", type=Path, default=None, help=argparse.SUPPRESS)  # re-plot saved rows
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, default=None, metavar="MIB",
                        help="also decode with the tiles this memory budget picks (extra rows; tiling changes pixels "
                             "at tile borders)")
    parser.add_argument("--smooth", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--purpose", default="time", choices=["memory", "time"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.size = args.size or (32 if args.smoke else 128)
    args.repeats = args.repeats or (1 if args.smoke else 3)
    if args.child:
        args.frames = args.frames[0]
        return child(args)
    if args.plot_json:
        plot(json.loads(args.plot_json.read_text()), args.plot or args.plot_json.with_suffix(".png"))
        return 0
    frames = args.frames or ([16, 40] if args.smoke else [16, 48, 144])
    smoothing = {"off": (False,), "on": (True,), "both": (False, True)}[args.smoothing]
    rows = [measure(args, f, smooth) for smooth in smoothing for f in sorted(frames)]
    if args.budget:
        rows += [measure(args, f, False, args.budget) for f in sorted(frames)]
    for r in rows:
        r["size"], r["smoke"] = args.size, args.smoke
    print(table(rows, args))
    if not all(r["peak_reset"] for r in rows):
        print("note: could not reset the peak-RSS counter; peaks include model construction")
    failures = check(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.plot:
        plot(rows, args.plot)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
