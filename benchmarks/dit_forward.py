"""Time and peak memory of one transformer forward, per memory mode (easyanimate.memory).

For the full-size V3 InP transformer (1152 wide, 28 blocks; random weights, no checkpoint needed) and a
smaller one (576 wide), a CFG batch of 2, 4 latent frames of 16x16 (a 128 px clip of 13 frames), 120 T5
tokens of 4096 and the CLIP image tokens, this runs one forward per mode in a fresh process each:

    plain          float32 weights, the default forward
    budget         a memory budget: the CFG batch in halves, the global attention in query chunks and
                   the feed-forward layers in row chunks where they would not fit
    fp8            float8 e4m3fn weight storage, each layer upcast to float32 while it runs
    block-swap N   at most N blocks on the "compute device"; without a GPU the compute device is the CPU
                   itself, so this row copies each streamed block CPU -> CPU: it measures the streaming
                   overhead and checks the accounting, it cannot save memory on a CPU-only machine

Each row runs twice, each time in a fresh process that builds the model on `meta` and materialises its
weights (fp8: block by block, converting as it goes, so the float32 model never exists whole) and runs
one warm-up forward under `torch.inference_mode()`:

* the memory run then runs one forward with glibc told to give freed tensors back at once
  (`MALLOC_MMAP_THRESHOLD_`), so its peak is what is live rather than what the allocator keeps;
* the time run, with glibc's defaults (returning every tensor costs page faults, about 10 % of a
  forward), takes the median of `--repeats` forwards; its own peak is shown as well.

Peak memory is the process's peak resident set (VmHWM, the same figure as `ru_maxrss`), interpreter
and torch included, in GB = 1e9 bytes; "activations" is the memory run's peak minus its resident set
after building. The output of every row is compared with the plain row's (max|a - b| / max|b|).

    python benchmarks/dit_forward.py                      # full size + small, all modes (about 10 minutes)
    python benchmarks/dit_forward.py --config full --modes plain fp8
    python benchmarks/dit_forward.py --smoke              # tiny model, seconds (what the test suite runs)

This table compares our modes with each other only. Against the original EasyAnimate code:

    python benchmarks/dit_forward.py --reference-python ENV/bin/python --reference-src EASYANIMATE_CHECKOUT

writes the model's random weights once (config.json + diffusion_pytorch_model.safetensors, the release
layout that `Transformer3DModel.from_pretrained_2d(folder, transformer_additional_kwargs={})` loads) and the
inputs to a temporary folder, then runs, `--rounds` times (default 3) and alternating, a fresh process of
ours (`easyanimate.loading.load_transformer`, the plain float32 forward) and one of the original code in its
own environment, each one warm-up and `--repeats` timed forwards under torch.inference_mode() with
glibc's default malloc, and prints both times, their ratio, both peaks (the whole process, and the
forward's peak above the loaded model), the load average before each run and the other processes' load
during it; loaded runs are taken again (reference_compare.py says how, and how to set up the
environment: the original V3 commit b54412c with diffusers 0.28.2 and transformers 4.42.4). `--config`
picks the sizes (default: full; with --smoke: smoke). Without these options no ratio against the
original code is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import reference_compare
from process_memory import OtherLoad, reset_peak, status_kib

ROOT = Path(__file__).resolve().parent.parent

SIZES = {
    # hidden = heads x head_dim; caption_channels / cross_attention_dim as released (T5-XXL 4096)
    "full": dict(num_attention_heads=16, attention_head_dim=72, num_layers=28, caption_channels=4096),
    "small": dict(num_attention_heads=8, attention_head_dim=72, num_layers=28, caption_channels=4096),
    "smoke": dict(num_attention_heads=2, attention_head_dim=16, num_layers=16, caption_channels=24,
                  motion_heads=4),
}
SHAPES = {  # batch, latent frames, latent height, latent width, text tokens
    "full": (2, 4, 16, 16, 120), "small": (2, 4, 16, 16, 120), "smoke": (2, 2, 8, 8, 6),
}
DEFAULT_MODES = ["plain", "budget", "fp8", "block-swap"]
# Small enough to split the CFG batch and the attention at these shapes (256 tokens a sample).
BUDGET_MB = {"full": 8, "small": 4, "smoke": 0.05}
SWAP_BLOCKS = 4


def _config(name: str) -> dict:
    from easyanimate.models.transformer import family_preset

    size = dict(SIZES[name])
    motion_heads = size.pop("motion_heads", None)
    raw = dict(family_preset("v3"), **size)
    raw["cross_attention_dim"] = raw["num_attention_heads"] * raw["attention_head_dim"]
    if motion_heads:
        for key in ("motion_module_kwargs_even", "motion_module_kwargs_odd"):
            raw[key] = dict(raw[key], num_attention_heads=motion_heads)
    return raw


def _materialise(module, generator, fp8: bool) -> None:
    """Give every meta tensor of `module` random storage (normal, std 0.02), child by child; with `fp8`
    convert each child's linear weights before the next child is materialised."""
    import torch

    from easyanimate.memory import to_fp8

    def fill(owner):
        for store in (owner._parameters, owner._buffers):
            for name, value in store.items():
                if value is not None and value.is_meta:
                    data = torch.empty(value.shape, dtype=value.dtype).normal_(0, 0.02, generator=generator)
                    store[name] = torch.nn.Parameter(data, requires_grad=False) if owner._parameters is store else data

    def walk(owner):
        fill(owner)
        for child in owner.children():
            if isinstance(child, torch.nn.ModuleList):
                for item in child:
                    walk(item)
            else:
                walk(child)
            if fp8:
                to_fp8(child)

    walk(module)


def child(args) -> None:
    """One row, in its own process; prints one JSON line."""
    sys.path.insert(0, str(ROOT))
    import torch

    from easyanimate.memory import BlockSwap, DeviceManager, transformer_budget

    torch.set_num_threads(args.threads)
    base = status_kib("VmRSS") * 1024
    start = time.perf_counter()
    if args.weights:  # the release folder written for a comparison with the original code
        from safetensors.torch import load_file

        from easyanimate.loading import load_transformer

        model = load_transformer(args.weights, dtype="fp32")
        inputs = load_file(str(Path(args.weights) / "inputs.safetensors"))
    else:
        model = _build(args.config, fp8=args.mode == "fp8")
        inputs = _inputs(args.config, model.config)
    model.eval().requires_grad_(False)
    load_s = time.perf_counter() - start
    built, load_peak = status_kib("VmRSS") * 1024, status_kib("VmHWM") * 1024
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    # a comparison reports the forward's own peak: the two loaders' peaks differ, and are shown apart
    reset = reset_peak() if args.weights else False

    b, f, h, w, tokens = SHAPES[args.config]
    manager, most_blocks = None, None
    if args.mode == "block-swap":
        manager = DeviceManager("cpu", "cpu", copy_same_device=True)
        context = BlockSwap(manager, model, model.transformer_blocks, SWAP_BLOCKS)
    elif args.mode == "budget":
        context = transformer_budget(model, int(BUDGET_MB[args.config] * 2**20))
    else:
        from contextlib import nullcontext

        context = nullcontext()
    times, cpu = [], []
    with context, torch.inference_mode():
        plan = model.plan_chunks(b, f, h, w)
        feed_forward_bytes = model.plan_feed_forward(plan[0], f, h, w)
        for i in range((args.repeats if args.purpose == "time" else 1) + 1):  # the first is the warm-up
            if i == 1:
                load = OtherLoad()
            start, start_cpu = time.perf_counter(), time.process_time()
            out = model(**inputs)
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    if manager is not None:
        most_blocks = manager.peak_blocks
    torch.save(out.clone(), args.out)
    print(json.dumps({
        "config": args.config, "mode": args.mode, "weights_bytes": weights,
        "params": sum(p.numel() for p in model.parameters()),
        "base_rss": base, "built_rss": built, "load_peak": load_peak, "load_s": load_s,
        "peak_rss": status_kib("VmHWM") * 1024, "peak_reset": reset,
        "median_s": statistics.median(times[1:]), "runs": len(times) - 1, "warmup_s": times[0],
        "median_cpu_s": statistics.median(cpu[1:]), "other_load": load.cores(),
        "plan": plan, "feed_forward_bytes": feed_forward_bytes, "most_blocks": most_blocks,
        "budget_mb": BUDGET_MB[args.config] if args.mode == "budget" else None,
    }))


def _build(config: str, fp8: bool = False):
    """The V3 InP transformer of this size on `meta`, materialised with seeded random weights."""
    import torch

    from easyanimate.models.transformer import EasyAnimateTransformer3D, TransformerConfig

    cfg = TransformerConfig.from_dict(_config(config), "v3")
    with torch.device("meta"):
        model = EasyAnimateTransformer3D(cfg)
    _materialise(model, torch.Generator().manual_seed(0), fp8=fp8)
    return model


def _inputs(config: str, cfg) -> dict:
    """One CFG batch of the benchmark shape (the keyword arguments of our forward)."""
    import torch

    b, f, h, w, tokens = SHAPES[config]
    g = torch.Generator().manual_seed(1)
    return dict(
        x=torch.randn(b, 4, f, h, w, generator=g),
        timestep=torch.tensor([500.0] * b),
        encoder_hidden_states=torch.randn(b, tokens, cfg.caption_channels, generator=g),
        encoder_attention_mask=torch.ones(b, tokens),
        inpaint_latents=torch.randn(b, 8, f, h, w, generator=g),
        clip_encoder_hidden_states=torch.randn(b, 768, generator=g),
        clip_attention_mask=torch.ones(b, 8),
    )


def write_release(config: str, folder: Path) -> None:
    """The random weights in the release layout (config.json with the released keys and
    diffusion_pytorch_model.safetensors) and the inputs (inputs.safetensors), for both implementations."""
    sys.path.insert(0, str(ROOT))
    from safetensors.torch import save_file

    model = _build(config)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(_config(config), indent=1))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    save_file({k: v.contiguous() for k, v in _inputs(config, model.config).items()}, str(folder / "inputs.safetensors"))


def _child_command(args, config: str, mode: str, out: Path, purpose: str, weights: Path | None = None) -> list[str]:
    cmd = [sys.executable, __file__, "--child", "--config", config, "--mode", mode, "--out", str(out),
           "--repeats", str(args.repeats), "--threads", str(args.threads), "--purpose", purpose]
    return cmd + (["--weights", str(weights)] if weights else [])


def _run_child(args, config: str, mode: str, out: Path, purpose: str) -> dict:
    cmd = _child_command(args, config, mode, out, purpose)
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if purpose == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = "131072"  # tensors get their own mappings, unmapped when freed
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise SystemExit(f"benchmark child failed ({' '.join(cmd)}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(args, config: str, mode: str, out: Path) -> dict:
    """One row: the memory run's figures, with the time run's time and peak."""
    row = _run_child(args, config, mode, out, "memory")
    timed = row if config == "smoke" else _run_child(args, config, mode, out, "time")
    row.update(median_s=timed["median_s"], runs=timed["runs"], median_cpu_s=timed["median_cpu_s"],
               peak_rss_default=timed["peak_rss"])
    return row


def rel_error(actual, reference) -> float:
    a, r = actual.double(), reference.double()
    return ((a - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()


def label(row) -> str:
    if row["mode"] == "budget":
        rows, queries = row["plan"]
        ff = row.get("feed_forward_bytes")
        return (f"budget {row['budget_mb']:g} MiB (batch {rows}/pass, attention {queries or 'all'} queries, "
                f"feed-forward {f'{ff / 2**20:.3g} MiB chunks' if ff else 'whole'})")
    if row["mode"] == "block-swap":
        return f"block-swap {SWAP_BLOCKS} (CPU->CPU copies)"
    return {"plain": "plain fp32", "fp8": "fp8 e4m3fn weights"}[row["mode"]]


def table(rows: list[dict], args) -> str:
    lines = []
    for config in dict.fromkeys(r["config"] for r in rows):
        series = [r for r in rows if r["config"] == config]
        b, f, h, w, tokens = SHAPES[config]
        plain = next((r for r in series if r["mode"] == "plain"), None)
        first = series[0]
        lines += [
            f"**{config}**: V3 InP, {first['params'] / 1e9:.3f} B parameters, batch {b}, latents {f}x{h}x{w}, "
            f"{tokens} text tokens + CLIP, {args.threads} threads, median of {first['runs']} forwards",
            "",
            "| mode | weights GB | peak RSS GB | activations MB | peak RSS GB, default malloc | forward s "
            "| time / plain | rel. error vs plain |"
            + (" most blocks on compute |" if any(r["most_blocks"] is not None for r in series) else ""),
            "|:---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if any(r["most_blocks"] is not None for r in series) else ""),
        ]
        for r in series:
            ratio = f"{r['median_s'] / plain['median_s']:.2f}" if plain else "-"
            err = "-" if r.get("error") is None else ("0" if r["error"] == 0 else f"{r['error']:.1e}")
            line = (f"| {label(r)} | {r['weights_bytes'] / 1e9:.3f} | {r['peak_rss'] / 1e9:.3f} | "
                    f"{(r['peak_rss'] - r['built_rss']) / 1e6:.0f} | {r['peak_rss_default'] / 1e9:.3f} | "
                    f"{r['median_s']:.2f} | {ratio} | {err} |")
            if any(x["most_blocks"] is not None for x in series):
                line += f" {r['most_blocks'] if r['most_blocks'] is not None else '-'} |"
            lines.append(line)
        lines.append("")
    lines.append("GB = 1e9 bytes; peak RSS is the whole process (interpreter, torch, weights, activations); "
                 "ru_maxrss (KiB) = peak RSS / 1024.")
    return "\n".join(lines)


def compare(args, config: str, tmp: Path) -> dict:
    """Ours and the original code on the same weights and inputs, alternating (reference_compare.py)."""
    import torch
    from safetensors.torch import load_file

    folder = tmp / f"{config}-release"
    done = subprocess.run([sys.executable, __file__, "--write-release", str(folder), "--config", config],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"writing the weights failed:\n{done.stderr}")
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)  # glibc's defaults for both, as in the time runs
    commands = {
        "ours": (_child_command(args, config, "plain", tmp / "ours.pt", "time", weights=folder), env),
        "reference": (reference_compare.reference_command(
            args, "dit", "--folder", folder, "--out", tmp / "reference.safetensors", "--threads", args.threads,
            "--repeats", args.repeats), env),
    }
    runs = reference_compare.alternate(
        args, commands, label=f"{config} ",
        summary=lambda r: f"forward {r['median_s']:.2f} s, peak RSS {r['peak_rss'] / 1e9:.2f} GB")
    ours, theirs = torch.load(tmp / "ours.pt"), load_file(str(tmp / "reference.safetensors"))["out"]
    return {"config": config, "runs": runs, "error": rel_error(ours, theirs)}


def comparison_table(results: list[dict], args) -> str:
    gb = lambda v: f"{v / 1e9:.3f}"  # noqa: E731
    lines = []
    for result in results:
        config, runs = result["config"], result["runs"]
        b, f, h, w, tokens = SHAPES[config]
        first = runs["ours"][0]["result"]
        lines += [
            f"**{config}**: V3 InP, {first['params'] / 1e9:.3f} B parameters (float32), batch {b}, latents "
            f"{f}x{h}x{w}, {tokens} text tokens + CLIP, {args.threads} threads; ours vs the original EasyAnimate "
            f"V3 code ({reference_compare.REFERENCE_COMMIT[:7]}), fresh processes, alternating; each run: median "
            f"of {first['runs']} forward(s) after one warm-up",
            "",
            "| round | ours s | reference s | ours / reference | ours peak RSS GB (load / forward) | "
            "reference peak RSS GB (load / forward) | load avg before (ours, ref.) | other load, cores (ours, ref.) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for ours, theirs in zip(runs["ours"], runs["reference"]):
            mark = lambda run: "*" if run["loaded"] else ""  # noqa: E731
            o, t = ours["result"], theirs["result"]
            lines.append(
                f"| {ours['round']} | {o['median_s']:.2f}{mark(ours)} | {t['median_s']:.2f}{mark(theirs)} | "
                f"{o['median_s'] / t['median_s']:.2f} | {gb(o['load_peak'])} / {gb(o['peak_rss'])} | "
                f"{gb(t['load_peak'])} / {gb(t['peak_rss'])} | {ours['load_before']:.2f}, {theirs['load_before']:.2f} | "
                f"{ours['other_load']:.2f}, {theirs['other_load']:.2f} |")
        med = lambda name, key: reference_compare.median([r["result"][key] for r in runs[name]])  # noqa: E731
        lines += [
            f"| median | {med('ours', 'median_s'):.2f} | {med('reference', 'median_s'):.2f} | "
            f"{med('ours', 'median_s') / med('reference', 'median_s'):.2f} | {gb(med('ours', 'load_peak'))} / "
            f"{gb(med('ours', 'peak_rss'))} | {gb(med('reference', 'load_peak'))} / {gb(med('reference', 'peak_rss'))} | | |",
            "",
            f"weights {gb(first['weights_bytes'])} GB; RSS after loading: ours {gb(med('ours', 'built_rss'))} GB, "
            f"reference {gb(med('reference', 'built_rss'))} GB; output, ours vs reference: rel. error "
            f"{result['error']:.1e} (max|a - b| / max|b|)",
            "",
        ]
        for name in ("ours", "reference"):
            if med(name, "built_rss") < 0.5 * first["weights_bytes"]:
                lines += [f"{name}: the loader maps the weights file, so the weights become resident during the "
                          "warm-up forward: the load peak leaves them out, the forward peak has them.", ""]
    lines += [
        "GB = 1e9 bytes. Peak RSS: the whole process (interpreter, torch, weights, activations); load = the peak "
        "up to the loaded model (the original loader builds the model and reads the file: two copies), forward "
        "= the peak during the forwards (counter reset after loading).",
        reference_compare.load_note(args),
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model (seconds)")
    parser.add_argument("--config", nargs="+", default=None, choices=sorted(SIZES),
                        help="model sizes (default: full small; smoke: smoke)")
    parser.add_argument("--modes", nargs="+", default=DEFAULT_MODES, choices=DEFAULT_MODES)
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed forwards per row (default 3; per run in a comparison: 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 2; smoke 1)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="plain", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--purpose", default="time", choices=["memory", "time"], help=argparse.SUPPRESS)
    parser.add_argument("--weights", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--write-release", type=Path, default=None, help=argparse.SUPPRESS)
    reference_compare.add_options(parser)
    args = parser.parse_args(argv)
    # Tiny models run faster on one thread (and do not stall on a busy machine); the real sizes use two.
    args.threads = args.threads or (1 if args.smoke or args.config == ["smoke"] else 2)
    if args.write_release:
        return write_release(args.config[0], args.write_release)
    if args.child:
        args.repeats = args.repeats or 3
        args.config = args.config[0]
        return child(args)
    if reference_compare.check_options(parser, args):
        # a full-size forward takes about 10 s a side: one timed forward per run, the rounds repeat it
        args.repeats = args.repeats or 1
        configs = args.config or (["smoke"] if args.smoke else ["full"])
        with tempfile.TemporaryDirectory() as tmp:
            results = [compare(args, config, Path(tmp)) for config in configs]
        print(comparison_table(results, args))
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        return 0
    args.repeats = args.repeats or 3
    configs = args.config or (["smoke"] if args.smoke else ["full", "small"])
    modes = ["plain"] + [m for m in args.modes if m != "plain"]
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for config in configs:
            outputs = {}
            for mode in modes:
                path = Path(tmp) / f"{config}-{mode}.pt"
                row = measure(args, config, mode, path)
                outputs[mode] = torch.load(path)
                row["error"] = rel_error(outputs[mode], outputs["plain"])
                rows.append(row)
                print(f"{config} {mode}: {row['median_s']:.2f} s, peak RSS {row['peak_rss'] / 1e9:.3f} GB",
                      file=sys.stderr, flush=True)
    print(table(rows, args))
    print(reference_compare.NO_REFERENCE + ".")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
