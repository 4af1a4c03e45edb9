"""Time and peak memory of one V5/V5.1 transformer forward: ours in float32 and bfloat16, against diffusers'
`EasyAnimateTransformer3DModel` in float32, on the same config, weights and inputs.

The model is a V5.1 transformer of the 12B width (48 heads x 64, feed-forward 12288, Qwen2-VL text 3584,
time 512, every block MMDiT, 16 latent channels in and out) with `--blocks` blocks (default 4) and random
weights; the input is one sample of `--frames` frames (default 25: 7 latent frames) at `--size` pixels
(default 480x720: a 30x45 token grid, the RoPE base grid, so diffusers' RoPE positions equal the original
code's and the outputs must agree; at grids that are not 2:3 they differ on purpose, docs/numerics.md)
and `--text-tokens` text tokens (default 256): 9,450 video + 256 text tokens.

The weights are written once, in the diffusers layout (config.json + safetensors shards with their index),
with the inputs (inputs.safetensors), to a temporary folder (`--keep DIR` keeps and reuses it). Then
`--rounds` rounds (default 2) each run, alternating, one fresh process per run:

    ours fp32       easyanimate.loading.load_transformer(folder, dtype="fp32")
    diffusers fp32  EasyAnimateTransformer3DModel.from_pretrained(folder) in the `--diffusers-python`
                    environment (benchmarks/reference_child.py mmdit)
    ours bf16       load_transformer(folder, dtype="bf16"): the same weights cast while read

Every run loads the model, reads every weight page once (a loader that maps the file and one that copies it
both hold the whole model in RAM), runs one small warm-up forward (thread pools, kernels), gives freed heap
back to the system, resets its peak-RSS counter and runs `--repeats` timed forwards (default 1) under
torch.inference_mode(), with glibc's default malloc. "activations" is the peak resident set during the timed
forwards minus the resident set just before them (weights, interpreter and torch excluded); "peak RSS" is
the whole process. Before each run the 1-minute load average is read, and during the timed forwards the
child measures the CPU time other processes took (reference_compare.py; loaded runs are taken again
`--retries` times, default 0 here: a run takes minutes).

Targets checked at the end (PASS / MISS; ratios only from runs of this invocation): ours fp32 time <= 1.0x
diffusers', activations <= 0.8x diffusers', outputs within 1e-4 (max|a - b| / max|b|, judged on 2:3 grids
only), ours bf16 >= 1.7x faster than ours fp32 and within 2e-2 of it.

    python benchmarks/mmdit_forward.py --diffusers-python ENV/bin/python      # 4 blocks, 25 frames, 480x720
    python benchmarks/mmdit_forward.py --diffusers-python ENV/bin/python --rounds 3 --frames 13
    python benchmarks/mmdit_forward.py                                         # ours fp32 / bf16 only
    python benchmarks/mmdit_forward.py --smoke [--diffusers-python ENV/bin/python]   # tiny, seconds

The diffusers environment: a virtual environment with torch (a CPU build of the same version) and diffusers
>= 0.33 (EasyAnimateTransformer3DModel; transformers and accelerate as diffusers asks).
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
HERE = Path(__file__).resolve().parent

WIDTHS = {  # the 12B release's widths; smoke: tiny
    "full": dict(num_attention_heads=48, attention_head_dim=64, text_embed_dim=3584, time_embed_dim=512),
    "smoke": dict(num_attention_heads=2, attention_head_dim=16, text_embed_dim=24, time_embed_dim=16),
}
DEFAULTS = {  # blocks, frames, (height, width) pixels, text tokens
    "full": dict(blocks=4, frames=25, size=(480, 720), text_tokens=256),
    "smoke": dict(blocks=2, frames=5, size=(64, 96), text_tokens=8),
}
TARGETS = {"time": 1.0, "activations": 0.8, "parity": 1e-4, "bf16_speedup": 1.7, "bf16_error": 2e-2}
BLOCKS_PER_SHARD = 2


def latent_shape(frames: int, height: int, width: int) -> tuple[int, int, int]:
    """The V5 VAE's latent grid: 1 + 4k frames -> 1 + k latents, 8x in space."""
    return (frames - 1) // 4 + 1, height // 8, width // 8


def model_config(width: str, blocks: int) -> dict:
    """config.json in the diffusers layout: the released V5.1 config with these widths and blocks, T2V channels."""
    sys.path.insert(0, str(ROOT))
    from easyanimate.models.mmdit import family_preset

    raw = dict(family_preset("v51"), **WIDTHS[width], num_layers=blocks, mmdit_layers=blocks, in_channels=16,
               out_channels=16)
    raw["_class_name"] = "EasyAnimateTransformer3DModel"
    return raw


def write_folder(folder: Path, width: str, blocks: int, frames: int, size, text_tokens: int) -> None:
    """Random weights (linear weights and biases N(0, 0.02), norm weights 1 + N(0, 0.02)) in the diffusers
    layout, written shard by shard, and the inputs (inputs.safetensors, with a small warm-up input)."""
    sys.path.insert(0, str(ROOT))
    import torch
    from safetensors.torch import save_file

    from easyanimate.models.mmdit import DIFFUSERS_TEXT_STREAM, EasyAnimateMMDiT, MMDiTConfig

    raw = model_config(width, blocks)
    with torch.device("meta"):
        model = EasyAnimateMMDiT(MMDiTConfig.from_dict(raw, "v51"))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    del model

    def diffusers_name(key: str) -> str:
        for theirs, ours in DIFFUSERS_TEXT_STREAM.items():
            key = key.replace(f".{ours}.", f".{theirs}.")
        return key

    shards = max(1, -(-blocks // BLOCKS_PER_SHARD)) if width == "full" else 1
    shard_of = lambda key: (min(int(key.split(".")[1]) // BLOCKS_PER_SHARD, shards - 1)  # noqa: E731
                            if key.startswith("transformer_blocks.") else 0)
    names = [f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors" if shards > 1
             else "diffusion_pytorch_model.safetensors" for i in range(shards)]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    g, weight_map, total = torch.Generator().manual_seed(0), {}, 0
    for index in range(shards):
        tensors = {}
        for key, shape in shapes.items():
            if shard_of(key) != index:
                continue
            t = torch.empty(shape).normal_(0, 0.02, generator=g)
            if len(shape) == 1 and "norm" in key and key.endswith("weight"):
                t += 1
            tensors[diffusers_name(key)] = t
        total += sum(t.numel() * 4 for t in tensors.values())
        save_file(tensors, str(folder / names[index]), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, names[index]))
        del tensors
    if shards > 1:
        (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    f, h, w = latent_shape(frames, *size)
    text = raw["text_embed_dim"]
    inputs = {
        "x": torch.randn(1, 16, f, h, w, generator=g), "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, text_tokens, text, generator=g),
        "warm_x": torch.randn(1, 16, 1, 4, 6, generator=g), "warm_timestep": torch.tensor([500.0]),
        "warm_encoder_hidden_states": torch.randn(1, min(text_tokens, 8), text, generator=g),
    }
    save_file(inputs, str(folder / "inputs.safetensors"))
    (folder / "benchmark.json").write_text(json.dumps(
        {"width": width, "blocks": blocks, "frames": frames, "size": list(size), "text_tokens": text_tokens}))


def child(args) -> None:
    """One run of ours, in its own process; prints one JSON line."""
    sys.path.insert(0, str(ROOT))
    import torch
    from safetensors.torch import load_file, save_file

    from easyanimate.loading import load_transformer
    from easyanimate.memory import release_freed_memory
    from reference_child import make_resident

    if args.threads:
        torch.set_num_threads(args.threads)
    base = status_kib("VmRSS") * 1024
    start = time.perf_counter()
    model = load_transformer(args.folder, dtype=args.dtype)
    load_s = time.perf_counter() - start
    load_peak = status_kib("VmHWM") * 1024
    make_resident(model)
    x = load_file(str(Path(args.folder) / "inputs.safetensors"))
    call = lambda prefix: dict(x=x[prefix + "x"], timestep=x[prefix + "timestep"],  # noqa: E731
                               encoder_hidden_states=x[prefix + "encoder_hidden_states"])
    with torch.inference_mode():
        model(**call("warm_"))
    release_freed_memory()
    before = status_kib("VmRSS") * 1024
    reset = reset_peak()
    times = []
    with torch.inference_mode():
        load = OtherLoad()
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = model(**call(""))
            times.append(time.perf_counter() - start)
        other = load.cores()
    peak = status_kib("VmHWM") * 1024
    save_file({"out": out.float().contiguous()}, str(args.out))
    print(json.dumps({
        "implementation": f"ours {args.dtype}", "params": sum(p.numel() for p in model.parameters()),
        "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "base_rss": base, "load_peak": load_peak, "load_s": load_s, "before_rss": before, "peak_rss": peak,
        "peak_reset": reset, "activation_bytes": peak - before, "median_s": statistics.median(times),
        "runs": len(times), "other_load": other,
    }), flush=True)


def kernel_rates(args, setup: dict) -> None:
    """The two kernels a forward is made of, at this run's sizes, in float32 and bfloat16 (one fresh process):
    a feed-forward-sized linear over the video tokens and the joint attention (SDPA, contiguous q/k/v).
    Prints one JSON line of GFLOP/s: what bounds the bf16 speed-up."""
    import torch
    import torch.nn.functional as F

    if args.threads:
        torch.set_num_threads(args.threads)
    width = WIDTHS[setup["width"]]
    heads, head_dim = width["num_attention_heads"], width["attention_head_dim"]
    dim = heads * head_dim
    f, h, w = latent_shape(setup["frames"], *setup["size"])
    tokens = f * (h // 2) * (w // 2) + setup["text_tokens"]
    g = torch.Generator().manual_seed(0)
    rates = {"tokens": tokens}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x = torch.randn(tokens, dim, generator=g).to(dtype)
        weight, bias = torch.randn(4 * dim, dim, generator=g).to(dtype) * 0.02, torch.zeros(4 * dim, dtype=dtype)
        F.linear(x[:64], weight, bias)
        start = time.perf_counter()
        F.linear(x, weight, bias)
        rates[f"linear_{name}"] = 2 * tokens * dim * 4 * dim / (time.perf_counter() - start) / 1e9
        del x, weight, bias
        q, k, v = (torch.randn(1, heads, tokens, head_dim, generator=g).to(dtype) for _ in range(3))
        F.scaled_dot_product_attention(q[:, :, :64], k[:, :, :64], v[:, :, :64])
        start = time.perf_counter()
        F.scaled_dot_product_attention(q, k, v)
        rates[f"attention_{name}"] = 4 * tokens * tokens * dim / (time.perf_counter() - start) / 1e9
        del q, k, v
    print(json.dumps(rates), flush=True)


def rel_error(actual, reference) -> float:
    a, r = actual.double(), reference.double()
    return ((a - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()


def rope_grid_is_base_aspect(size) -> bool:
    """True when the token grid is 2:3 (the RoPE base grid's aspect): diffusers' positions equal the original's."""
    h, w = size[0] // 16, size[1] // 16
    return h * 3 == w * 2


def run(args, folder: Path, tmp: Path) -> dict:
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    commands = {}
    for dtype in args.dtypes:
        commands[f"ours {dtype}"] = ([sys.executable, __file__, "--child", "--folder", str(folder), "--dtype", dtype,
                                      "--out", str(tmp / f"ours-{dtype}.safetensors"), "--threads", str(args.threads),
                                      "--repeats", str(args.repeats)], env)
        if dtype == "fp32" and args.diffusers_python is not None:
            commands["diffusers fp32"] = (reference_compare.diffusers_command(
                args, "mmdit", "--folder", folder, "--out", tmp / "diffusers-fp32.safetensors",
                "--threads", args.threads, "--repeats", args.repeats), env)
    runs = reference_compare.alternate(args, commands)
    rates = None
    if args.kernel_rates:
        cmd = [sys.executable, __file__, "--kernel-rates-child", "--threads", str(args.threads)] + _setup_options(args)
        rates = reference_compare.run_child(cmd, env)
        rates = dict(rates["result"], load_before=rates["load_before"], other_load=rates["other_load_whole_run"])
    from safetensors.torch import load_file

    outputs = {name: load_file(str(tmp / f"{name.replace(' ', '-')}.safetensors"))["out"] for name in commands}
    errors = {}
    if "diffusers fp32" in outputs and "ours fp32" in outputs:
        errors["ours fp32 vs diffusers fp32"] = rel_error(outputs["ours fp32"], outputs["diffusers fp32"])
    if "ours bf16" in outputs and "ours fp32" in outputs:
        errors["ours bf16 vs ours fp32"] = rel_error(outputs["ours bf16"], outputs["ours fp32"])
    return {"runs": runs, "errors": errors, "kernel_rates": rates}


def table(result: dict, args, setup: dict) -> str:
    runs, errors = result["runs"], result["errors"]
    names = list(runs)
    med = lambda name, key: reference_compare.median([r["result"][key] for r in runs[name]])  # noqa: E731
    mib = lambda v: f"{v / 2**20:,.0f}"  # noqa: E731
    first = runs[names[0]][0]["result"]
    f, h, w = latent_shape(setup["frames"], *setup["size"])
    video_tokens = f * (h // 2) * (w // 2)
    base_grid = rope_grid_is_base_aspect(setup["size"])
    lines = [
        f"V5.1 transformer, {setup['width']} width ({WIDTHS[setup['width']]['num_attention_heads']} heads x "
        f"{WIDTHS[setup['width']]['attention_head_dim']}), {setup['blocks']} MMDiT blocks, {first['params'] / 1e9:.3f} B "
        f"parameters; 1 sample of {setup['frames']} frames at {setup['size'][0]}x{setup['size'][1]} (latents "
        f"{f}x{h}x{w}, token grid {h // 2}x{w // 2}{', 2:3' if base_grid else ', not 2:3'}): {video_tokens:,} video + "
        f"{setup['text_tokens']} text tokens; {args.threads} threads; fresh processes, alternating "
        + ", ".join(names) + f"; each run: {first['runs']} timed forward(s) after a small warm-up"
        + (f"; diffusers {args.diffusers_version}" if args.diffusers_python is not None else ""),
        "",
        "| round | " + " | ".join(f"{n} s" for n in names) + " | " + " | ".join(f"{n} activations MiB" for n in names)
        + " | " + " | ".join(f"{n} peak RSS MiB" for n in names) + " | load avg before | other load, cores |",
        "|---:|" + "---:|" * (3 * len(names)) + ":---|:---|",
    ]
    rounds = len(runs[names[0]])
    for i in range(rounds):
        row = [runs[n][i] for n in names]
        mark = lambda run: "*" if run["loaded"] else ""  # noqa: E731
        lines.append(
            f"| {i + 1} | " + " | ".join(f"{r['result']['median_s']:.2f}{mark(r)}" for r in row) + " | "
            + " | ".join(mib(r["result"]["activation_bytes"]) for r in row) + " | "
            + " | ".join(mib(r["result"]["peak_rss"]) for r in row) + " | "
            + ", ".join(f"{r['load_before']:.2f}" for r in row) + " | "
            + ", ".join(f"{r['other_load']:.2f}" for r in row) + " |")
    lines.append("| median | " + " | ".join(f"{med(n, 'median_s'):.2f}" for n in names) + " | "
                 + " | ".join(mib(med(n, "activation_bytes")) for n in names) + " | "
                 + " | ".join(mib(med(n, "peak_rss")) for n in names) + " | | |")
    lines += ["", "weights: " + ", ".join(f"{n} {mib(runs[n][0]['result']['weights_bytes'])} MiB" for n in names)
              + "; outputs: " + (", ".join(f"{k}: rel. error {v:.1e}" for k, v in errors.items()) or "-")
              + " (max|a - b| / max|b|)", ""]

    rates = result.get("kernel_rates")
    if rates:
        lines += [
            f"kernel rates at these sizes (one fresh process after the rounds; load avg before {rates['load_before']:.2f}, "
            f"other load {rates['other_load']:.2f} cores): feed-forward linear over {rates['tokens']:,} tokens "
            f"{rates['linear_fp32']:.0f} GFLOP/s fp32, {rates['linear_bf16']:.0f} bf16 "
            f"({rates['linear_bf16'] / rates['linear_fp32']:.2f}x); joint attention (SDPA) {rates['attention_fp32']:.0f} "
            f"GFLOP/s fp32, {rates['attention_bf16']:.0f} bf16 ({rates['attention_bf16'] / rates['attention_fp32']:.2f}x)",
            ""]
    checks = []
    if "diffusers fp32" in runs and "ours fp32" in runs:
        time_ratio = med("ours fp32", "median_s") / med("diffusers fp32", "median_s")
        act_ratio = med("ours fp32", "activation_bytes") / med("diffusers fp32", "activation_bytes")
        checks.append(("time, ours fp32 / diffusers fp32 (median)", f"{time_ratio:.2f}",
                       f"<= {TARGETS['time']:g}", time_ratio <= TARGETS["time"]))
        checks.append(("activations, ours fp32 / diffusers fp32 (median)", f"{act_ratio:.2f}",
                       f"<= {TARGETS['activations']:g}", act_ratio <= TARGETS["activations"]))
        err = errors["ours fp32 vs diffusers fp32"]
        checks.append(("output, ours fp32 vs diffusers fp32", f"{err:.1e}", f"<= {TARGETS['parity']:g}"
                       + ("" if base_grid else " (not judged: grid not 2:3)"), err <= TARGETS["parity"] if base_grid else None))
    if "ours bf16" in runs and "ours fp32" in runs:
        speedup = med("ours fp32", "median_s") / med("ours bf16", "median_s")
        checks.append(("speed-up, ours bf16 over ours fp32 (median)", f"{speedup:.2f}x",
                       f">= {TARGETS['bf16_speedup']:g}x", speedup >= TARGETS["bf16_speedup"]))
        err = errors["ours bf16 vs ours fp32"]
        checks.append(("output, ours bf16 vs ours fp32", f"{err:.1e}", f"<= {TARGETS['bf16_error']:g}",
                       err <= TARGETS["bf16_error"]))
    if checks:
        lines += ["| target | measured | limit | |", "|:---|---:|:---|:---|"]
        for what, value, limit, ok in checks:
            lines.append(f"| {what} | {value} | {limit} | {'-' if ok is None else ('PASS' if ok else 'MISS')} |")
        lines.append("")
    lines += [
        "MiB = 2**20 bytes. activations: peak RSS during the timed forward(s) minus the RSS just before them (the "
        "whole model resident, warm-up done, freed heap returned); peak RSS: the whole process (VmHWM, reset after "
        "loading).",
        reference_compare.load_note(args),
    ]
    if args.diffusers_python is None:
        lines.append(reference_compare.NO_DIFFUSERS + ".")
    return "\n".join(lines)


def _setup_options(args, setup: dict | None = None) -> list[str]:
    setup = setup or args.setup
    return ["--blocks", str(setup["blocks"]), "--frames", str(setup["frames"]), "--size",
            "x".join(map(str, setup["size"])), "--text-tokens", str(setup["text_tokens"])] + (["--smoke"] if args.smoke else [])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny widths and sizes (seconds)")
    parser.add_argument("--blocks", type=int, default=None, help="transformer blocks (default 4; smoke 2)")
    parser.add_argument("--frames", type=int, default=None, help="video frames, 1 + 4k (default 25; smoke 5)")
    parser.add_argument("--size", type=reference_compare.size_argument(16, "480x720"), default=None, help="HxW pixels (default 480x720; smoke 64x96)")
    parser.add_argument("--text-tokens", type=int, default=None, help="text tokens (default 256; smoke 8)")
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                        help="our runs (default fp32 bf16)")
    parser.add_argument("--repeats", type=int, default=1, help="timed forwards per run (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 2; smoke 1)")
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR",
                        help="write the weights and inputs here and keep them (reused when they match)")
    parser.add_argument("--json", type=Path, default=None, help="also write the runs to this JSON file")
    parser.add_argument("--kernel-rates", action=argparse.BooleanOptionalAction, default=True,
                        help="after the rounds, time a feed-forward linear and the attention alone in fp32 and bf16 "
                             "at these sizes (default on)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kernel-rates-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--write", type=Path, default=None, help=argparse.SUPPRESS)
    reference_compare.add_diffusers_options(parser, rounds=2, retries=0)
    args = parser.parse_args(argv)
    width = "smoke" if args.smoke else "full"
    setup = dict(DEFAULTS[width])
    setup.update({k: v for k, v in (("blocks", args.blocks), ("frames", args.frames), ("size", args.size),
                                    ("text_tokens", args.text_tokens)) if v is not None})
    setup["width"], setup["size"] = width, list(setup["size"])
    args.setup = setup
    args.threads = args.threads or (1 if args.smoke else 2)
    if args.child:
        return child(args)
    if args.kernel_rates_child:
        return kernel_rates(args, setup)
    if args.write:
        return write_folder(args.write, width, setup["blocks"], setup["frames"], setup["size"], setup["text_tokens"])
    if (setup["frames"] - 1) % 4:
        parser.error(f"--frames {setup['frames']}: the V5 VAE's frame counts are 1 + 4k (e.g. 13, 25, 49)")
    reference_compare.check_diffusers_options(parser, args)
    if not args.smoke and args.diffusers_python is None and "fp32" in args.dtypes:
        print("(ours only: " + reference_compare.NO_DIFFUSERS + ")", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp) / "transformer"
        marker = folder / "benchmark.json"
        if not (marker.is_file() and json.loads(marker.read_text()) == setup):
            start = time.perf_counter()
            cmd = [sys.executable, __file__, "--write", str(folder)] + _setup_options(args, setup)
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"writing the weights failed:\n{done.stderr[-4000:]}")
            print(f"weights and inputs written in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        result = run(args, folder, Path(tmp))
    print(table(result, args, setup))
    if args.json:
        args.json.write_text(json.dumps({"setup": setup, **result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
