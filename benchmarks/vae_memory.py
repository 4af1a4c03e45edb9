"""Peak memory and time of V3 slice-VAE decoding against video length.

For a full-width V3 VAE (ch 128, ch_mult [1, 2, 4, 4], random weights; no checkpoint needed) this
decodes 16, 48 and 144 frames at a small resolution, with and without the reference's smoothing
pass, and prints the peak memory beyond the output tensor and the median time. Each configuration
runs in a fresh process, so one measurement cannot inherit another's heap: the process builds the
model, resets its peak-RSS counter (Linux `/proc/self/clear_refs`), decodes once for the memory
figure, then repeats the decode for the timing. A short warm-up decode runs before the reset, and glibc is
told to unmap freed tensors (`MALLOC_MMAP_THRESHOLD_`), so the figure is decode memory rather than
one-off library initialisation or cached heap.

    python benchmarks/vae_memory.py                 # 128x128, 16/48/144 frames, 3 timed runs each
    python benchmarks/vae_memory.py --size 64       # faster on small CPUs
    python benchmarks/vae_memory.py --smoke         # tiny model, seconds (what the test suite runs)
    python benchmarks/vae_memory.py --plot out.png  # also a chart, if matplotlib is installed

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

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 0.15
FULL = {"ch": 128, "ch_mult": [1, 2, 4, 4], "norm_num_groups": 32}
SMOKE = {"ch": 8, "ch_mult": [1, 2, 4, 4], "norm_num_groups": 4}


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _trim_heap() -> None:
    """Give freed heap memory back to the OS so RSS reflects live tensors only."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(args) -> None:
    """One configuration, in its own process; prints one JSON line."""
    sys.path.insert(0, str(ROOT))
    import torch

    from easyanimate.vae import build_vae

    torch.set_num_threads(args.threads) if args.threads else None
    torch.manual_seed(0)
    arch = SMOKE if args.smoke else FULL
    vae = build_vae("v3", {**arch, "use_tiling": False})
    latent = args.size // 8
    latents = torch.randn(1, 4, vae.rules.latent_frames(args.frames), latent, latent) * vae.scaling_factor

    def run():
        generator = torch.Generator().manual_seed(1) if args.smooth else None
        return vae.decode_video(latents, smooth=bool(args.smooth), generator=generator)

    # One short decode first: kernel selection, thread pools and lazy imports allocate once per
    # process and are not decode memory.
    warm = latents[:, :, : 2 * vae.rules.latents_per_chunk]
    vae.decode_video(warm, smooth=bool(args.smooth), generator=torch.Generator().manual_seed(1))
    del warm
    gc.collect()
    _trim_heap()
    before = _rss_kib("VmRSS")
    reset = _reset_peak()
    start = time.perf_counter()
    out = run()
    first = time.perf_counter() - start
    peak = _rss_kib("VmHWM")
    output_bytes = out.numel() * out.element_size()
    del out
    times = []
    for _ in range(max(args.repeats - 1, 0)):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    result = {
        "frames": args.frames,
        "latent_frames": int(latents.shape[2]),
        "smooth": bool(args.smooth),
        "output_mib": output_bytes / 2**20,
        "peak_beyond_output_mib": ((peak - before) * 1024 - output_bytes) / 2**20,
        "peak_reset": reset,
        # the first run pays one-off initialisation; it counts only when it is the only run
        "median_s": statistics.median(times) if times else first,
        "runs": len(times) or 1,
    }
    print(json.dumps(result))


def measure(args, frames: int, smooth: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", "--frames", str(frames), "--smooth", str(int(smooth))]
    cmd += ["--size", str(args.size), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    cmd += ["--smoke"] if args.smoke else []
    # Tensors above 128 KiB get their own mapping and are unmapped when freed, so RSS tracks the
    # live tensors instead of glibc's cached heap.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise SystemExit(f"benchmark child failed ({' '.join(cmd)}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict], args) -> str:
    arch = SMOKE if args.smoke else FULL
    lines = [
        f"V3 slice VAE decode, ch {arch['ch']} ch_mult {arch['ch_mult']}, random weights, "
        f"{args.size}x{args.size} px, float32, CPU, median of {rows[0]['runs']} timed run(s)",
        "",
        "| frames | latent frames | smoothing | output MiB | peak beyond output MiB | time s | s / frame |",
        "|---:|---:|:---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['frames']} | {r['latent_frames']} | {'on' if r['smooth'] else 'off'} | {r['output_mib']:.1f} | "
            f"{r['peak_beyond_output_mib']:.1f} | {r['median_s']:.2f} | {r['median_s'] / r['frames']:.3f} |"
        )
    return "\n".join(lines)


def check(rows: list[dict]) -> list[str]:
    failures = []
    for smooth in (False, True):
        series = [r for r in rows if r["smooth"] == smooth]
        if len(series) < 2:
            continue
        low, high = series[0]["peak_beyond_output_mib"], series[-1]["peak_beyond_output_mib"]
        growth = (high - low) / low
        verdict = "ok" if growth <= TOLERANCE else "FAIL"
        failures += [] if verdict == "ok" else [f"smoothing {smooth}"]
        print(
            f"smoothing {'on ' if smooth else 'off'}: peak beyond output {low:.1f} -> {high:.1f} MiB "
            f"({series[0]['frames']} -> {series[-1]['frames']} frames): {growth:+.1%} (limit +{TOLERANCE:.0%}) {verdict}"
        )
    return failures


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; no plot written")
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for smooth in (False, True):
        series = [r for r in rows if r["smooth"] == smooth]
        ax.plot([r["frames"] for r in series], [r["peak_beyond_output_mib"] for r in series], "o-",
                label=f"smoothing {'on' if smooth else 'off'}")
    ax.set_xlabel("frames")
    ax.set_ylabel("peak beyond output (MiB)")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot written to {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model and sizes (seconds)")
    parser.add_argument("--size", type=int, default=None, help="frame edge in pixels (default 128; smoke 32)")
    parser.add_argument("--frames", type=int, nargs="+", default=None, help="frame counts (default 16 48 144)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per configuration (default 3; smoke 1)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    parser.add_argument("--plot", type=Path, default=None, help="write a PNG chart (needs matplotlib)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--smooth", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.size = args.size or (32 if args.smoke else 128)
    args.repeats = args.repeats or (1 if args.smoke else 3)
    if args.child:
        args.frames = args.frames[0]
        return child(args)
    frames = args.frames or ([8, 24] if args.smoke else [16, 48, 144])
    rows = [measure(args, f, smooth) for smooth in (False, True) for f in sorted(frames)]
    print(table(rows, args))
    if not all(r["peak_reset"] for r in rows):
        print("note: could not reset the peak-RSS counter; peaks include model construction")
    failures = check(rows)
    if args.plot:
        plot(rows, args.plot)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
