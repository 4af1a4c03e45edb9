"""Peak memory and time of the V5/V5.1 VAE decode against video length: ours against diffusers'
`AutoencoderKLMagvit`, on the same config, weights and latents.

The VAE is the released V5/V5.1 one (easyanimate/configs/vae_v5.json: block_out_channels 128/256/512/512,
16 latent channels, per-frame GroupNorm, causal streaming cache) with random weights, written once in the
diffusers layout (config.json + diffusion_pytorch_model.safetensors) with latents of each length (1 + 4k
frames: `--frames`, default 25 49 97, i.e. 7 / 13 / 25 latents) at `--size` pixels (default 128x128) to
a temporary folder (`--keep DIR` keeps and reuses it). For each length, `--rounds` rounds (default 2) run,
alternating, one fresh process each:

    ours       easyanimate.vae.load_vae(folder); vae.decode_video(latents) (latents / 0.7125 -> decoder,
               one latent at a time through the causal caches, straight into a preallocated output)
    diffusers  AutoencoderKLMagvit.from_pretrained(folder); vae.decode(latents / scaling_factor).sample
               under torch.no_grad() in the `--diffusers-python` environment (benchmarks/reference_child.py vae5)

Both first decode the first two latents (kernels, thread pools: once per process), give freed heap back,
reset their peak-RSS counter and decode once, timed, with glibc told to unmap freed tensors at once
(`MALLOC_MMAP_THRESHOLD_`, on both sides), so the peak is what is live. "activations" is that peak minus
the resident set just before the decode and minus the output tensor's bytes (float32 pixels: what neither
side can avoid). The outputs are compared ((x / 2 + 0.5) after clamping for diffusers, as decode_video).

Targets checked at the end (PASS / MISS, ratios only from runs of this invocation): our activations <= 0.5x
diffusers' at every length and flat (within 15 %) from the shortest to the longest video, our time <= 0.8x
diffusers' at every length.

    python benchmarks/vae5_decode.py --diffusers-python ENV/bin/python          # 128x128, 25/49/97 frames
    python benchmarks/vae5_decode.py --diffusers-python ENV/bin/python --size 256x256 --frames 25 97
    python benchmarks/vae5_decode.py                                             # ours only
    python benchmarks/vae5_decode.py --smoke [--diffusers-python ENV/bin/python]  # tiny, seconds

The diffusers environment: torch (a CPU build of the same version) and diffusers >= 0.33.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import reference_compare
from process_memory import OtherLoad, reset_peak, status_kib

ROOT = Path(__file__).resolve().parent.parent
FLATNESS = 0.15
TARGETS = {"activations": 0.5, "time": 0.8}
SMOKE_ARCH = {"block_out_channels": [8, 16, 32, 32], "norm_num_groups": 4}
# config.json keys that diffusers' AutoencoderKLMagvit takes
DIFFUSERS_KEYS = ("in_channels", "latent_channels", "out_channels", "block_out_channels", "down_block_types",
                  "up_block_types", "layers_per_block", "act_fn", "norm_num_groups", "scaling_factor",
                  "spatial_group_norm")


def write_folder(folder: Path, smoke: bool, size, frames: list[int]) -> None:
    """Random weights (our builder's initialisation) in the diffusers layout, and latents-<frames>.safetensors."""
    sys.path.insert(0, str(ROOT))
    import torch
    from safetensors.torch import save_file

    from easyanimate.vae import build_vae

    torch.manual_seed(0)
    vae = build_vae("v5", SMOKE_ARCH if smoke else None)
    config = {"_class_name": "AutoencoderKLMagvit", **{k: vae.config[k] for k in DIFFUSERS_KEYS}}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    save_file({k: v.contiguous() for k, v in vae.model.state_dict().items()},
              str(folder / "diffusion_pytorch_model.safetensors"))
    h, w = size[0] // 8, size[1] // 8
    for count in frames:
        g = torch.Generator().manual_seed(count)
        latents = torch.randn(1, vae.latent_channels, (count - 1) // 4 + 1, h, w, generator=g) * vae.scaling_factor
        save_file({"latents": latents, "warm": torch.tensor(2)}, str(folder / f"latents-{count}.safetensors"))
    (folder / "benchmark.json").write_text(json.dumps({"smoke": smoke, "size": list(size), "frames": frames}))


def child(args) -> None:
    """One decode of ours, in its own process; prints one JSON line."""
    sys.path.insert(0, str(ROOT))
    import torch
    from safetensors.torch import load_file, save_file

    from easyanimate.memory import release_freed_memory
    from easyanimate.vae import load_vae

    if args.threads:
        torch.set_num_threads(args.threads)
    base = status_kib("VmRSS") * 1024
    vae = load_vae(args.folder)
    data = load_file(str(args.latents))
    latents = data["latents"]
    vae.decode_video(latents[:, :, : int(data["warm"])])
    release_freed_memory()
    before = status_kib("VmRSS") * 1024
    reset = reset_peak()
    load, start = OtherLoad(), time.perf_counter()
    out = vae.decode_video(latents)
    seconds, other = time.perf_counter() - start, load.cores()
    peak = status_kib("VmHWM") * 1024
    output_bytes = out.numel() * out.element_size()
    save_file({"out": out.contiguous()}, str(args.out))
    print(json.dumps({
        "implementation": "ours", "base_rss": base, "before_rss": before, "peak_rss": peak, "peak_reset": reset,
        "output_mib": output_bytes / 2**20, "peak_beyond_output_mib": (peak - before - output_bytes) / 2**20,
        "median_s": seconds, "runs": 1, "other_load": other, "frames": int(out.shape[2]),
        "weights_bytes": sum(p.numel() * p.element_size() for p in vae.model.parameters()),
    }), flush=True)


def rel_error(actual, reference) -> float:
    a, r = actual.double(), reference.double()
    return ((a - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()


def run(args, folder: Path, tmp: Path) -> list[dict]:
    from safetensors.torch import load_file

    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "131072"  # freed tensors unmapped at once: the peak is what is live
    results = []
    for frames in args.frames:
        latents = folder / f"latents-{frames}.safetensors"
        commands = {"ours": ([sys.executable, __file__, "--child", "--folder", str(folder), "--latents", str(latents),
                              "--out", str(tmp / "ours.safetensors"), "--threads", str(args.threads)], env)}
        if args.diffusers_python is not None:
            commands["diffusers"] = (reference_compare.diffusers_command(
                args, "vae5", "--folder", folder, "--latents", latents, "--out", tmp / "diffusers.safetensors",
                "--threads", args.threads), env)
        runs = reference_compare.alternate(args, commands, label=f"{frames} frames ")
        error = None
        if "diffusers" in commands:
            ours = load_file(str(tmp / "ours.safetensors"))["out"]
            theirs = load_file(str(tmp / "diffusers.safetensors"))["out"].clamp(-1, 1).div(2).add(0.5)
            error = rel_error(ours, theirs)
        results.append({"frames": frames, "runs": runs, "error": error})
        if args.json:  # what is done so far survives a stopped run
            args.json.write_text(json.dumps(results, indent=1))
    return results


def table(results: list[dict], args) -> str:
    names = list(results[0]["runs"])
    med = lambda result, name, key: reference_compare.median([r["result"][key] for r in result["runs"][name]])  # noqa: E731
    first = results[0]["runs"]["ours"][0]["result"]
    lines = [
        f"V5/V5.1 VAE decode ({'smoke widths' if args.smoke else 'released widths, block_out_channels 128/256/512/512'}, "
        f"random weights, {first['weights_bytes'] / 2**20:.0f} MiB float32), {args.size[0]}x{args.size[1]} px, float32, "
        f"batch 1, {args.threads} threads; fresh processes, alternating " + " / ".join(names) + ", one decode per run "
        "after a warm-up of 2 latents" + (f"; diffusers {args.diffusers_version}" if args.diffusers_python else ""),
        "",
        "| frames | latents | round | " + " | ".join(f"{n} activations MiB" for n in names) + " | "
        + " | ".join(f"{n} s" for n in names) + " | output MiB | load avg before | other load, cores |",
        "|---:|---:|---:|" + "---:|" * (2 * len(names) + 1) + ":---|:---|",
    ]
    for result in results:
        rounds = len(result["runs"]["ours"])
        for i in range(rounds):
            row = [result["runs"][n][i] for n in names]
            mark = lambda run: "*" if run["loaded"] else ""  # noqa: E731
            lines.append(
                f"| {result['frames']} | {(result['frames'] - 1) // 4 + 1} | {i + 1} | "
                + " | ".join(f"{r['result']['peak_beyond_output_mib']:.0f}" for r in row) + " | "
                + " | ".join(f"{r['result']['median_s']:.2f}{mark(r)}" for r in row) + " | "
                + f"{row[0]['result']['output_mib']:.1f} | " + ", ".join(f"{r['load_before']:.2f}" for r in row)
                + " | " + ", ".join(f"{r['other_load']:.2f}" for r in row) + " |")
        lines.append(
            f"| {result['frames']} | | median | "
            + " | ".join(f"{med(result, n, 'peak_beyond_output_mib'):.0f}" for n in names) + " | "
            + " | ".join(f"{med(result, n, 'median_s'):.2f}" for n in names) + " | | | |")
    lines.append("")
    if any(r["error"] is not None for r in results):
        lines += ["outputs, ours vs diffusers (max|a - b| / max|b|): "
                  + ", ".join(f"{r['frames']} frames {r['error']:.1e}" for r in results), ""]

    checks = []
    ours = [med(r, "ours", "peak_beyond_output_mib") for r in results]
    if len(results) > 1:
        growth = max(ours) / max(min(ours), 1e-9) - 1
        checks.append((f"our activations, {results[0]['frames']} to {results[-1]['frames']} frames (max / min - 1)",
                       f"{growth:+.1%}", f"<= {FLATNESS:.0%}", growth <= FLATNESS))
    if "diffusers" in names:
        for r in results:
            act = med(r, "ours", "peak_beyond_output_mib") / med(r, "diffusers", "peak_beyond_output_mib")
            checks.append((f"activations, ours / diffusers, {r['frames']} frames", f"{act:.2f}",
                           f"<= {TARGETS['activations']:g}", act <= TARGETS["activations"]))
        for r in results:
            ratio = med(r, "ours", "median_s") / med(r, "diffusers", "median_s")
            checks.append((f"time, ours / diffusers, {r['frames']} frames", f"{ratio:.2f}", f"<= {TARGETS['time']:g}",
                           ratio <= TARGETS["time"]))
    if checks:
        lines += ["| target | measured | limit | |", "|:---|---:|:---|:---|"]
        lines += [f"| {what} | {value} | {limit} | {'PASS' if ok else 'MISS'} |" for what, value, limit, ok in checks]
        lines.append("")
    lines += [
        "MiB = 2**20 bytes. activations: peak RSS during the decode minus the RSS just before it (weights and "
        "interpreter excluded) minus the float32 output; glibc unmaps freed tensors at once in both processes.",
        reference_compare.load_note(args),
    ]
    if args.diffusers_python is None:
        lines.append(reference_compare.NO_DIFFUSERS + ".")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny widths and sizes (seconds)")
    parser.add_argument("--size", type=reference_compare.size_argument(8, "128x128"), default=None, help="HxW pixels (default 128x128; smoke 32x32)")
    parser.add_argument("--frames", type=int, nargs="+", default=None,
                        help="video lengths, 1 + 4k each (default 25 49 97; smoke 5 13)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 2; smoke 1)")
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR",
                        help="write the weights and latents here and keep them (reused when they match)")
    parser.add_argument("--json", type=Path, default=None, help="also write the runs to this JSON file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--latents", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--write", type=Path, default=None, help=argparse.SUPPRESS)
    reference_compare.add_diffusers_options(parser, rounds=2, retries=0)
    args = parser.parse_args(argv)
    args.size = args.size or ((32, 32) if args.smoke else (128, 128))
    args.frames = args.frames or ([5, 13] if args.smoke else [25, 49, 97])
    args.threads = args.threads or (1 if args.smoke else 2)
    if args.child:
        return child(args)
    if args.write:
        return write_folder(args.write, args.smoke, args.size, args.frames)
    bad = [f for f in args.frames if f < 1 or (f - 1) % 4]
    if bad:
        parser.error(f"--frames {bad}: the V5 VAE decodes 1 + 4k frames (e.g. 25, 49, 97)")
    reference_compare.check_diffusers_options(parser, args)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp) / "vae"
        marker = folder / "benchmark.json"
        wanted = {"smoke": args.smoke, "size": list(args.size), "frames": args.frames}
        if not (marker.is_file() and json.loads(marker.read_text()) == wanted):
            cmd = [sys.executable, __file__, "--write", str(folder), "--size", "x".join(map(str, args.size)),
                   "--frames", *map(str, args.frames)] + (["--smoke"] if args.smoke else [])
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"writing the weights failed:\n{done.stderr[-4000:]}")
        results = run(args, folder, Path(tmp))
    print(table(results, args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
