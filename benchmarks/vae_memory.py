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

These figures are ours alone. Against the original EasyAnimate code:

    python benchmarks/vae_memory.py --reference-python ENV/bin/python --reference-src EASYANIMATE_CHECKOUT

writes the VAE's random weights once (config.json + diffusion_pytorch_model.safetensors, the release layout
that `AutoencoderKLMagvit.from_pretrained(folder)` loads) and the latents of each length to a temporary
folder, then decodes each length (smoothing off, no tiling) `--rounds` times (default 3), alternating a
fresh process of ours (`easyanimate.vae.load_vae`, `decode_video`) and one of the original code in its
own environment (`vae.decode(latents / scaling_factor)`, what its pipeline decodes before its optional
smoothing), both after the same warm-up and with glibc unmapping freed tensors (the memory runs' setting,
so the time includes those page faults on both sides), and prints both peaks beyond the output, both
times, their ratio, the load average before each run and the other processes' load during it; loaded
runs are taken again (reference_compare.py says how, and how to set up the environment: the original V3
commit b54412c with diffusers 0.28.2 and transformers 4.42.4). Without these options no comparison with
the original code is printed.
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

import reference_compare
from process_memory import OtherLoad, reset_peak, status_kib

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 0.15
NOISE_MIB = 2.0
FULL = {"ch": 128, "ch_mult": [1, 2, 4, 4], "norm_num_groups": 32}
SMOKE = {"ch": 8, "ch_mult": [1, 2, 4, 4], "norm_num_groups": 4}
# config.json keys of the released V3 VAE that the original AutoencoderKLMagvit takes, besides ours
RELEASE_KEYS = ("in_channels", "out_channels", "ch", "ch_mult", "down_block_types", "up_block_types",
                "mid_block_use_attention", "mid_block_attention_type", "mid_block_num_attention_heads",
                "layers_per_block", "latent_channels", "norm_num_groups", "scaling_factor", "slice_compression_vae",
                "mini_batch_encoder", "mini_batch_decoder", "use_tiling")
RELEASE_EXTRA = {"_class_name": "AutoencoderKLMagvit", "use_gc_blocks": None, "mid_block_type": "MidBlock3D",
                 "act_fn": "silu", "num_attention_heads": 1, "upcast_vae": False}


def _build(args):
    from easyanimate.vae import build_vae

    torch_seed(0)
    arch = SMOKE if args.smoke else FULL
    return build_vae("v3", {**arch, "use_tiling": False})


def torch_seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def _latents(vae, size: int, frames: int):
    import torch

    latent = size // 8
    return torch.randn(1, 4, vae.rules.latent_frames(frames), latent, latent) * vae.scaling_factor


def _warm_latents(vae) -> int:
    """How many latent frames the warm-up decodes: a first, middle and last slice of every shape."""
    return 1 + 4 * vae.rules.latents_per_chunk


def write_release(args, folder: Path) -> None:
    """The random weights in the release layout, and latents-<frames>.safetensors for each length."""
    sys.path.insert(0, str(ROOT))
    import torch
    from safetensors.torch import save_file

    vae = _build(args)
    config = {**RELEASE_EXTRA, **{k: vae.config[k] for k in RELEASE_KEYS}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    save_file({k: v.contiguous() for k, v in vae.model.state_dict().items()},
              str(folder / "diffusion_pytorch_model.safetensors"))
    for frames in args.frames:
        torch_seed(frames)
        latents = _latents(vae, args.size, frames)
        save_file({"latents": latents, "warm": torch.tensor(_warm_latents(vae))},
                  str(folder / f"latents-{frames}.safetensors"))


def child(args) -> None:
    """One configuration, in its own process; prints one JSON line."""
    sys.path.insert(0, str(ROOT))
    import torch

    from easyanimate.memory import release_freed_memory

    torch.set_num_threads(args.threads) if args.threads else None
    if args.weights:  # the release folder written for a comparison with the original code
        from safetensors.torch import load_file

        from easyanimate.vae import load_vae

        vae = load_vae(args.weights)
        latents = load_file(str(Path(args.weights) / f"latents-{args.frames}.safetensors"))["latents"]
    else:
        vae = _build(args)
        latents = _latents(vae, args.size, args.frames)
    latent = args.size // 8

    budget = int(args.budget * 2**20) if args.budget else None

    def run():
        generator = torch.Generator().manual_seed(1) if args.smooth else None
        return vae.decode_video(latents, smooth=bool(args.smooth), generator=generator, memory_budget=budget)

    # One decode of the same slice shapes first (a first, middle and last slice, and with smoothing the
    # encode of their middle): oneDNN builds and caches a kernel per shape, thread pools start and lazy
    # imports run once per process; that is not decode memory.
    warm = latents[:, :, : _warm_latents(vae)]
    vae.decode_video(warm, smooth=bool(args.smooth), generator=torch.Generator().manual_seed(1), memory_budget=budget)
    del warm
    gc.collect()
    release_freed_memory()
    before = status_kib("VmRSS")
    reset = reset_peak()
    load, start = OtherLoad(), time.perf_counter()
    out = run()
    first = time.perf_counter() - start
    peak = status_kib("VmHWM")
    output_bytes = out.numel() * out.element_size()
    out = out if args.out else None
    times = [first]
    for _ in range(args.repeats - 1 if args.purpose == "time" else 0):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
        peak = max(peak, status_kib("VmHWM"))
    tiling = vae.tiling_for_budget(budget, (latent, latent), decode=True) if budget else None
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
        "other_load": load.cores(),
    }
    if args.out:
        from safetensors.torch import save_file

        save_file({"out": out.contiguous()}, args.out)
    print(json.dumps(result))


def _child_command(args, frames: int, smooth: bool, budget, purpose: str) -> list[str]:
    cmd = [sys.executable, __file__, "--child", "--frames", str(frames), "--smooth", str(int(smooth))]
    cmd += ["--size", str(args.size), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    cmd += ["--purpose", purpose] + (["--budget", str(budget)] if budget else [])
    cmd += ["--smoke"] if args.smoke else []
    return cmd


def _env(purpose: str) -> dict:
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if purpose == "memory":
        # Tensors above 128 KiB get their own mapping and are unmapped when freed, so RSS tracks the
        # live tensors instead of glibc's cached heap.
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"
    return env


def _run_child(args, frames: int, smooth: bool, budget, purpose: str) -> dict:
    cmd = _child_command(args, frames, smooth, budget, purpose)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=_env(purpose))
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
    lines = [
        f"V3 slice VAE decode, ch {arch['ch']} ch_mult {arch['ch_mult']}, random weights, "
        f"{args.size}x{args.size} px, float32, CPU, {args.threads or 'default'} threads, "
        f"median of {rows[0]['runs']} timed run(s)",
        "",
        "| frames | latent frames | smoothing | tiles | output MiB | peak beyond output MiB | "
        "same, default malloc | time s | s / frame |",
        "|---:|---:|:---:|:---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        tiles = f"{r['tile']} px ({r['budget_mib']:g} MiB budget)" if r.get("tile") else (
            f"none ({r['budget_mib']:g} MiB budget)" if r.get("budget_mib") else "none")
        line = (
            f"| {r['frames']} | {r['latent_frames']} | {'on' if r['smooth'] else 'off'} | {tiles} | {r['output_mib']:.1f} | "
            f"{r['peak_beyond_output_mib']:.1f} | {r['peak_default_mib']:.1f} | {r['median_s']:.2f} | "
            f"{r['median_s'] / r['frames']:.3f} |"
        )
        lines.append(line)
    return "\n".join(lines)


def compare(args, tmp: Path) -> list[dict]:
    """Ours and the original code on the same weights and latents, alternating (reference_compare.py)."""
    from safetensors.torch import load_file

    folder = tmp / "vae-release"
    cmd = [sys.executable, __file__, "--write-release", str(folder), "--size", str(args.size), "--frames",
           *map(str, args.frames)] + (["--smoke"] if args.smoke else [])
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"writing the weights failed:\n{done.stderr}")
    env = _env("memory")  # the same malloc setting on both sides
    results = []
    for frames in args.frames:
        ours = _child_command(args, frames, False, None, "memory") + [
            "--weights", str(folder), "--out", str(tmp / "ours.safetensors")]
        theirs = reference_compare.reference_command(
            args, "vae", "--folder", folder, "--latents", folder / f"latents-{frames}.safetensors",
            "--out", tmp / "reference.safetensors", "--threads", args.threads)
        runs = reference_compare.alternate(
            args, {"ours": (ours, env), "reference": (theirs, env)}, label=f"{frames} frames ",
            summary=lambda r: f"decode {r['median_s']:.1f} s, peak beyond output {r['peak_beyond_output_mib']:.0f} MiB")
        a = load_file(str(tmp / "ours.safetensors"))["out"]
        b = load_file(str(tmp / "reference.safetensors"))["out"].clamp(-1, 1).div(2).add(0.5)  # as decode_video
        error = ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
        results.append({"frames": frames, "runs": runs, "error": error})
        if args.json:  # what is done so far survives a stopped run
            args.json.write_text(json.dumps(results, indent=1))
    return results


def comparison_table(results: list[dict], args) -> str:
    arch = SMOKE if args.smoke else FULL
    lines = [
        f"V3 slice VAE decode, ch {arch['ch']} ch_mult {arch['ch_mult']}, random weights, {args.size}x{args.size} px, "
        f"float32, CPU, {args.threads or 'default'} threads, smoothing off, no tiling; ours vs the original "
        f"EasyAnimate V3 code ({reference_compare.REFERENCE_COMMIT[:7]}), fresh processes, alternating, one decode "
        "per run, glibc unmapping freed tensors on both sides",
        "",
        "| frames | round | ours: peak beyond output MiB | reference: peak beyond output MiB | ours s | reference s "
        "| ours / reference (time) | load avg before (ours, ref.) | other load, cores (ours, ref.) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    mark = lambda run: "*" if run["loaded"] else ""  # noqa: E731
    for result in results:
        runs = result["runs"]
        for ours, theirs in zip(runs["ours"], runs["reference"]):
            o, t = ours["result"], theirs["result"]
            lines.append(
                f"| {result['frames']} | {ours['round']} | {o['peak_beyond_output_mib']:.0f} | "
                f"{t['peak_beyond_output_mib']:.0f} | {o['median_s']:.1f}{mark(ours)} | {t['median_s']:.1f}{mark(theirs)} | "
                f"{o['median_s'] / t['median_s']:.2f} | {ours['load_before']:.2f}, {theirs['load_before']:.2f} | "
                f"{ours['other_load']:.2f}, {theirs['other_load']:.2f} |")
        med = lambda name, key: reference_compare.median([r["result"][key] for r in runs[name]])  # noqa: E731
        lines.append(
            f"| {result['frames']} | median | {med('ours', 'peak_beyond_output_mib'):.0f} | "
            f"{med('reference', 'peak_beyond_output_mib'):.0f} | {med('ours', 'median_s'):.1f} | "
            f"{med('reference', 'median_s'):.1f} | {med('ours', 'median_s') / med('reference', 'median_s'):.2f} | | |")
    lines += [
        "",
        "output MiB: " + ", ".join(f"{r['frames']} frames {r['runs']['ours'][0]['result']['output_mib']:.1f}" for r in results)
        + "; output, ours vs reference (mapped to [0, 1] as decode_video does): rel. error "
        + ", ".join(f"{r['error']:.1e}" for r in results) + " (max|a - b| / max|b|)",
        "MiB beyond output: the peak resident set during the decode above the resident set before it, less the "
        "output tensor (weights, interpreter and torch are in both).",
        reference_compare.load_note(args),
    ]
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
    parser.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--write-release", type=Path, default=None, help=argparse.SUPPRESS)
    reference_compare.add_options(parser)
    args = parser.parse_args(argv)
    args.size = args.size or (32 if args.smoke else 128)
    args.repeats = args.repeats or (1 if args.smoke else 3)
    if args.write_release:
        return write_release(args, args.write_release)
    if args.child:
        args.frames = args.frames[0]
        return child(args)
    if reference_compare.check_options(parser, args):
        import tempfile

        args.repeats = 1
        args.frames = sorted(args.frames or ([16, 40] if args.smoke else [16, 48, 144]))
        with tempfile.TemporaryDirectory() as tmp:
            results = compare(args, Path(tmp))
        print(comparison_table(results, args))
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        return 0
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
    print(reference_compare.NO_REFERENCE + ".")
    if not all(r["peak_reset"] for r in rows):
        print("note: could not reset the peak-RSS counter; peaks include model construction")
    failures = check(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    if args.plot:
        plot(rows, args.plot)
    if args.smoke:  # a tiny model on a possibly busy machine: the claim is reported, not enforced
        print("smoke run: claim reported, not enforced")
        return 0
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
