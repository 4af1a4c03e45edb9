"""The command line: `python -m easyanimate <command> --help`.

    generate     prompt -> video (mp4 / gif / webp / png frames); the embedded demo model by default
    info         what a model folder or file is: family, dtype, sizes, what is missing
    make-data    write a synthetic data folder (clips + captions + ground truth)
    train-vae    train the V3 slice VAE on a data folder
    train-text   train the tokenizer and build the tiny T5 encoder for a data folder's captions
    train-dit    train the V3 InP transformer and write a release folder
    train-lora   train a LoRA on a data folder, written in the EasyAnimate LoRA format
    evaluate     prompt adherence of a model (and a LoRA) on the synthetic vocabulary
    multi-train  train MuLTI (video-language understanding) on synthetic clips: pretrain, finetune, all
    multi-eval   MuLTI retrieval / QA / tagging benchmark on held-out synthetic clips

Nothing heavy is imported until a command runs, so `--help` is instant.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEMO_NAME = "EasyAnimateV3-demo-64px"
DEMO_LORA = "loras/magenta.safetensors"  # inside the demo folder: turns every object magenta
# Used when a model folder has no generation.json: the V3 reference's defaults (spec §5.3).
RELEASE_DEFAULTS = {"frames": 144, "height": 384, "width": 672, "steps": 25, "guidance_scale": 7.0,
                    "sampler": "Euler", "fps": 24, "seed": 43, "negative_prompt": ""}


def demo_model_path() -> Path:
    return Path(__file__).resolve().parent / "demo" / DEMO_NAME


def generation_defaults(model_path: Path) -> dict:
    """A model folder's `generation.json` (the demo ships one with its best settings) over the release defaults."""
    defaults = dict(RELEASE_DEFAULTS)
    file = Path(model_path) / "generation.json"
    if file.is_file():
        defaults.update({k: v for k, v in json.loads(file.read_text()).items() if not k.startswith("_")})
    return defaults


# ------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    from .train.synthetic import PATHS  # numpy only: cheap

    parser = argparse.ArgumentParser(prog="python -m easyanimate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Run `python -m easyanimate <command> --help` for a command's options.")
    commands = parser.add_subparsers(dest="command", metavar="command")

    g = commands.add_parser("generate", help="make a video from a prompt (demo model by default)",
                            description="Generate a video. Unset options come from the model folder's generation.json "
                                        "(the demo's best settings), else from the V3 reference defaults.")
    g.add_argument("--prompt", "-p", required=True, help='e.g. "a red circle moving right on a black background"')
    g.add_argument("--negative", "--negative-prompt", dest="negative_prompt", default=None, help="negative prompt")
    g.add_argument("--seed", type=int, default=None, help="random seed (default 43)")
    g.add_argument("--out", "-o", default="easyanimate.mp4", help="output: .mp4, .gif, .webp, or .png (one file per frame)")
    g.add_argument("--model", "-m", default=None, help=f"release folder (default: the embedded demo, {DEMO_NAME})")
    g.add_argument("--frames", type=int, default=None, help="frame count (V3: 1 or a multiple of 8)")
    g.add_argument("--size", default=None, metavar="HxW", help="frame size in pixels, e.g. 64x64 (multiples of 8 x patch)")
    g.add_argument("--steps", type=int, default=None, help="sampling steps")
    g.add_argument("--cfg", "--guidance-scale", dest="guidance_scale", type=float, default=None, help="classifier-free guidance scale")
    g.add_argument("--sampler", default=None, choices=["Euler", "Euler A", "DPM++", "PNDM", "DDIM"])
    g.add_argument("--start-image", default=None, help="image file to start from (image-to-video; V3 InP models)")
    g.add_argument("--lora", action="append", default=[], metavar="PATH[:STRENGTH]",
                   help="apply a LoRA (repeatable), strength default 1.0, e.g. --lora magenta.safetensors:0.8")
    g.add_argument("--fps", type=int, default=None, help="frames per second of the written video")
    g.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="compute dtype (fp32 on CPU)")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's own choice)")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.add_argument("--memory-mode", default="none", choices=["none", "offload", "block-swap", "fp8"],
                   help="none: every model on --device; offload: each model (text encoder, transformer, VAE) on "
                        "--device only for its stage, otherwise in CPU RAM; block-swap: like offload, and the "
                        "transformer's blocks stream through --device, at most --swap-blocks at a time; fp8: the "
                        "transformer's linear weights stored as float8 e4m3fn (a quarter of fp32), each layer upcast "
                        "while it runs (2e-2 to 4e-2 relative difference per step from fp32). The others give the same video.")
    g.add_argument("--swap-blocks", type=int, default=4, metavar="N",
                   help="block-swap: most transformer blocks on --device at once (default 4; >= 2 overlaps the next "
                        "block's copy with compute on a GPU)")
    g.add_argument("--memory-budget", type=float, default=None, metavar="MB",
                   help="activation memory budget in MiB: the transformer runs the CFG batch and its global attention "
                        "in chunks that fit (same result), and the VAE decodes in tiles sized to fit (tiles blend "
                        "their borders, which changes pixels slightly)")

    i = commands.add_parser("info", help="describe a model folder or weights file")
    i.add_argument("path", nargs="?", default=None, help="release folder, component folder or file (default: the demo)")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")

    d = commands.add_parser("make-data", help="write a synthetic clip folder")
    d.add_argument("--out", required=True)
    d.add_argument("--count", type=int, default=3000)
    d.add_argument("--seed", type=int, default=2)
    d.add_argument("--frames", type=int, default=16)
    d.add_argument("--size", type=int, default=64)
    d.add_argument("--all-shapes", action="store_true", help="include the star and the held-out colour/shape pairs (VAE data)")
    d.add_argument("--draw-shape", default=None, help="draw this shape whatever the caption says (LoRA data, e.g. star)")
    d.add_argument("--draw-colour", default=None, help="paint every object this colour whatever the caption says (LoRA data)")
    d.add_argument("--paths", choices=PATHS, default=PATHS[0],
                   help="outward: shapes start near the centre and head for the named side; across: a path "
                        "anywhere it fits (the clips the demo VAE was trained on)")

    v = commands.add_parser("train-vae", help="train the V3 slice VAE")
    v.add_argument("--data", required=True, help="data folder (clips.npy + captions.txt, or videos + .txt)")
    v.add_argument("--out", required=True, help="run folder (checkpoints, loss.jsonl, vae/)")
    v.add_argument("--steps", type=int, default=800)
    v.add_argument("--lr", type=float, default=1e-3)
    v.add_argument("--kl-weight", type=float, default=1e-4)
    v.add_argument("--object-weight", type=float, default=9.0)
    v.add_argument("--temporal-weight", type=float, default=0.0,
                   help="weight of the latents' frame-to-frame change (makes latent frames follow moving objects)")
    v.add_argument("--preview-weight", type=float, default=0.0,
                   help="weight of a linear RGB preview of each latent frame matching its own frames "
                        "(makes latent frames show where a moving object is at their time)")
    v.add_argument("--init-from", default=None, help="start from this VAE (vae/ folder or a train-vae run): fine-tuning")
    v.add_argument("--decoder-only", action="store_true",
                   help="with --init-from: train the decoder alone, keeping the encoder, its latents and the "
                        "scaling factor, so a transformer trained on them still fits")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--threads", type=int, default=2)
    v.add_argument("--stop-at", type=int, default=None, help="stop after this step (run again to resume)")
    v.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps")

    t = commands.add_parser("train-text", help="train the tokenizer and build the tiny T5 encoder")
    t.add_argument("--data", default=None, help="data folder whose captions define the vocabulary")
    t.add_argument("--out", required=True, help="writes OUT/tokenizer and OUT/text_encoder")
    t.add_argument("--synthetic-vocabulary", action="store_true",
                   help="also add every caption the synthetic generator can write (all shapes, templates)")
    t.add_argument("--vocab-size", type=int, default=200)
    t.add_argument("--seed", type=int, default=0)

    dt = commands.add_parser("train-dit", help="train the V3 InP transformer; writes OUT/model (a release folder)")
    dt.add_argument("--data", required=True)
    dt.add_argument("--vae", required=True, help="folder with vae/ (a train-vae run)")
    dt.add_argument("--text", required=True, help="folder with text_encoder/ and tokenizer/ (a train-text run)")
    dt.add_argument("--out", required=True, help="run folder (checkpoints, loss.jsonl, latents.pt, model/)")
    dt.add_argument("--steps", type=int, default=5000)
    dt.add_argument("--lr", type=float, default=5e-4)
    dt.add_argument("--warmup", type=int, default=200, help="steps of linear learning-rate warm-up")
    dt.add_argument("--init-from", default=None,
                    help="start from this release folder's transformer (fine-tuning; same text encoder and VAE)")
    dt.add_argument("--video-batch", type=int, default=16)
    dt.add_argument("--image-batch", type=int, default=32)
    dt.add_argument("--high-noise-fraction", type=float, default=0.0,
                    help="share of each batch with t from the noisier half [500, 1000) (0: uniform t)")
    dt.add_argument("--high-noise-from-step", type=int, default=0, help="... from this step on")
    dt.add_argument("--mse-weight-cap", type=float, default=0.0,
                    help="weight each sample's noise MSE by min(1 + 1/SNR, cap): more weight on the noisy steps where "
                         "colours and layout are decided (0: the reference's plain mean)")
    dt.add_argument("--first-frame-prob", type=float, default=0.5,
                    help="share of video samples that keep their first frame (image-to-video); the rest are text-to-video")
    dt.add_argument("--seed", type=int, default=0)
    dt.add_argument("--threads", type=int, default=2)
    dt.add_argument("--stop-at", type=int, default=None, help="stop after this step (run again to resume)")
    dt.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps")

    lo = commands.add_parser("train-lora", help="train a LoRA (EasyAnimate/kohya format)")
    lo.add_argument("--model", required=True, help="release folder to adapt")
    lo.add_argument("--data", required=True)
    lo.add_argument("--out", required=True, help="run folder; the LoRA is OUT/<name>")
    lo.add_argument("--name", default="lora.safetensors")
    lo.add_argument("--steps", type=int, default=600)
    lo.add_argument("--rank", type=int, default=8)
    lo.add_argument("--alpha", type=float, default=8.0)
    lo.add_argument("--lr", type=float, default=1e-3)
    lo.add_argument("--mse-weight-cap", type=float, default=0.0,
                    help="as for train-dit: weight the noise MSE by min(1 + 1/SNR, cap) (0: plain mean)")
    lo.add_argument("--seed", type=int, default=0)
    lo.add_argument("--threads", type=int, default=2)
    lo.add_argument("--stop-at", type=int, default=None, help="stop after this step (run again to resume)")
    lo.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps")

    e = commands.add_parser("evaluate", help="prompt adherence on the synthetic vocabulary (prints the table)")
    e.add_argument("--model", default=None, help="release folder (default: the demo)")
    e.add_argument("--lora", default=None, metavar="PATH[:STRENGTH]", help="LoRA to evaluate (default: the demo's magenta LoRA)")
    e.add_argument("--no-lora", action="store_true", help="skip the LoRA rows")
    e.add_argument("--repeats", type=int, default=1,
                   help="run the prompt set this many times with other seeds (1: the 48 + 40 videos of the table)")
    e.add_argument("--json", default=None, help="also write every video's analysis to this JSON file")
    e.add_argument("--threads", type=int, default=None)

    from .multi.cli import add_subcommands as add_multi_commands  # argparse only; the work is imported lazily

    add_multi_commands(commands)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    handler = {"generate": cmd_generate, "info": cmd_info, "make-data": cmd_make_data, "train-vae": cmd_train_vae,
               "train-text": cmd_train_text, "train-dit": cmd_train_dit, "train-lora": cmd_train_lora,
               "evaluate": cmd_evaluate}.get(args.command) or args.handler  # multi-*: set by multi.cli
    try:
        return handler(args) or 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as err:  # our errors carry a message meant for the user
        from .errors import EasyAnimateError

        if isinstance(err, (EasyAnimateError, FileNotFoundError, ValueError)):
            print(f"error: {err}", file=sys.stderr)
            return 2
        raise


# ------------------------------------------------------------------------------------------ generate
def parse_lora_arg(text: str) -> tuple[str, float]:
    """"path" or "path:strength" (a Windows drive letter's colon is not a strength)."""
    path, sep, strength = text.rpartition(":")
    if sep and path and not ("\\" in strength or "/" in strength):
        try:
            return path, float(strength)
        except ValueError:
            pass
    return text, 1.0


def cmd_generate(args) -> int:
    import torch

    from .pipeline import load_model, make_video
    from .train.common import Progress

    if args.threads:
        torch.set_num_threads(args.threads)
    model_path = Path(args.model) if args.model else demo_model_path()
    defaults = generation_defaults(model_path)
    frames = args.frames or defaults["frames"]
    height, width = _parse_size(args.size) if args.size else (defaults["height"], defaults["width"])
    options = dict(steps=args.steps or defaults["steps"],
                   guidance_scale=defaults["guidance_scale"] if args.guidance_scale is None else args.guidance_scale,
                   sampler=args.sampler or defaults["sampler"],
                   seed=defaults["seed"] if args.seed is None else args.seed)
    negative = defaults["negative_prompt"] if args.negative_prompt is None else args.negative_prompt
    fps = args.fps or defaults["fps"]

    from .memory import MemoryOptions, MemoryPlan

    memory = MemoryPlan(MemoryOptions(args.memory_mode, args.swap_blocks, args.memory_budget), compute=args.device)
    started = time.time()
    # Streaming and fp8 modes load into CPU RAM first; the plan then places each part.
    load_device = args.device if args.memory_mode == "none" else "cpu"
    model = load_model(model_path, dtype=args.dtype, device=load_device)
    memory.place_model(model)
    if args.start_image:
        options["start_images"] = _read_image(args.start_image)
    stack = []
    if args.lora:
        from .lora import resolve_lora

        for item in args.lora:
            path, strength = parse_lora_arg(item)
            stack.append((resolve_lora(path, model.transformer, model.text_encoder.model if model.text_encoder else None),
                          strength))
    progress = Progress(options["steps"], "sampling", enabled=not args.quiet)
    options["callback"] = lambda done, total, latents: progress.update(1)
    # fp8 weights cannot take a merged LoRA: it is computed on the side ("hooks") instead.
    lora_mode = "hooks" if args.memory_mode == "fp8" else "weights"
    video = _run_with_loras(model, stack, lora_mode=lora_mode,
                            run=lambda: make_video(model, args.prompt, negative, frames=frames, height=height,
                                                   width=width, memory=memory, **options))
    progress.close()
    frames_uint8 = (video[0].permute(1, 2, 3, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    written = write_video(frames_uint8, args.out, fps)
    seconds = time.time() - started
    mode = "" if args.memory_mode == "none" else f", memory mode {args.memory_mode}"
    print(f"wrote {written}: {frames_uint8.shape[0]} frames, {width}x{height}, {fps} fps, {seconds:.1f} s, "
          f"peak memory {_peak_memory_mb(args.device):.0f} MB{mode}")
    return 0


def _run_with_loras(model, stack, run, lora_mode="weights"):
    """Apply the LoRA stack to the transformer (and T5 parts, if any) for the duration of `run`."""
    if not stack:
        return run()
    from contextlib import ExitStack

    from .lora import lora_patches

    with ExitStack() as exits:
        exits.enter_context(lora_patches(model.transformer, stack, mode=lora_mode))
        encoder = model.text_encoder.model if model.text_encoder is not None else None
        if encoder is not None and any(r.patch_for(encoder) is not None for r, _ in stack):
            exits.enter_context(lora_patches(encoder, [(r, s) for r, s in stack if r.patch_for(encoder) is not None]))
            model.text_encoder.clear_cache()
        return run()


def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = text.lower().split("x")
        return int(h), int(w)
    except ValueError:
        raise ValueError(f"--size must look like HxW, e.g. 64x64; got {text!r}") from None


def _read_image(path):
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(pixels).permute(2, 0, 1)[None]


def _peak_memory_mb(device: str) -> float:
    import resource

    import torch

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    if str(device).startswith("cuda") and torch.cuda.is_available():
        peak += torch.cuda.max_memory_allocated() / 2**20
    return peak


def write_video(frames, out, fps: int) -> str:
    """frames (F, H, W, 3) uint8 -> out (.mp4 via PyAV; .gif/.webp via Pillow; .png: one file per frame)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    suffix = out.suffix.lower()
    if suffix in (".mp4", ".mov", ".mkv", ".webm"):
        _write_av(frames, out, fps)
        return str(out)
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    if suffix in (".gif", ".webp"):
        extra = {"lossless": True} if suffix == ".webp" else {}
        images[0].save(out, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0, **extra)
        return str(out)
    if suffix == ".png":
        for index, image in enumerate(images):
            image.save(out.with_name(f"{out.stem}_{index:04d}.png"))
        return str(out.with_name(f"{out.stem}_0000.png")) + f" ... _{len(images) - 1:04d}.png"
    raise ValueError(f"Unknown output type {suffix!r}; use .mp4, .gif, .webp or .png.")


def _write_av(frames, out: Path, fps: int) -> None:
    import av

    height, width = frames.shape[1:3]
    with av.open(str(out), mode="w") as container:
        codec = "libx264" if out.suffix.lower() != ".webm" else "libvpx-vp9"
        try:
            stream = container.add_stream(codec, rate=fps)
        except Exception:  # a PyAV build without x264
            stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = width + width % 2, height + height % 2
        stream.pix_fmt = "yuv420p"
        if stream.codec_context.name == "libx264":
            stream.options = {"crf": "12", "preset": "medium"}
        for pixels in frames:
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def read_video_frames(path):
    """(F, H, W, 3) uint8 of a video written by `write_video` (tests, evaluation of files)."""
    import numpy as np

    path = Path(path)
    if path.suffix.lower() in (".gif", ".webp"):
        from PIL import Image

        with Image.open(path) as image:
            frames = []
            for index in range(getattr(image, "n_frames", 1)):
                image.seek(index)
                frames.append(np.asarray(image.convert("RGB")))
        return np.stack(frames)
    import av

    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


# ------------------------------------------------------------------------------------------ info
def cmd_info(args) -> int:
    path = Path(args.path) if args.path else demo_model_path()
    report = describe_model(path)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_info(report))
    return 0


def _safetensors_summary(files) -> dict:
    from collections import Counter

    from .checkpoint import safetensors_keys

    dtypes, count, size = Counter(), 0, 0
    for f in files:
        if f.suffix != ".safetensors":
            continue
        for key, (shape, dtype) in safetensors_keys(f).items():
            n = 1
            for s in shape:
                n *= s
            dtypes[dtype] += n
            count += n
        size += f.stat().st_size
    return {"parameters": count, "dtype": ", ".join(d for d, _ in dtypes.most_common()) or "?", "bytes": size}


def describe_model(path: Path) -> dict:
    """A dict describing a release folder (each component) or a single file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"'{path}' does not exist.")
    if path.is_file():
        return _describe_file(path)
    report = {"path": str(path), "kind": "release folder", "components": {}, "missing": []}
    root = path
    if not (root / "transformer").is_dir() and (root / "config.json").is_file():
        return {"path": str(path), "kind": "component folder", "components": {path.name: _describe_component(path)}, "missing": []}
    for name in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler", "image_encoder"):
        folder = root / name
        if not folder.is_dir():
            why = {"image_encoder": "no CLIP image encoder: image-to-video runs without CLIP tokens (zeros, as in text-to-video)",
                   "scheduler": "samplers use the V3 YAML defaults"}.get(name, "required")
            report["missing"].append(f"{name}/ ({why})")
            continue
        try:
            report["components"][name] = _describe_component(folder)
        except Exception as err:  # describe what we can, say what failed
            report["components"][name] = {"error": str(err)}
    if (root / "transformer").is_dir():
        try:
            from .loading import detect_family

            source = detect_family(root)
            report["family"] = source.family
            report["description"] = source.description
        except Exception as err:
            report["family"] = f"unknown ({err})"
    total = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    report["total_bytes"] = total
    if (root / "generation.json").is_file():
        report["generation_defaults"] = json.loads((root / "generation.json").read_text())
    return report


def _describe_component(folder: Path) -> dict:
    from .checkpoint import weight_files

    name = folder.name
    if name == "tokenizer" or (folder / "spiece.model").is_file():
        from .text import T5PromptTokenizer

        tokenizer = T5PromptTokenizer.from_path(folder)
        return {"type": "T5 sentencepiece tokenizer", "vocab_size": tokenizer.vocab_size}
    if name == "scheduler" or (folder / "scheduler_config.json").is_file():
        config = json.loads((folder / "scheduler_config.json").read_text())
        return {"type": config.get("_class_name"), "timestep_spacing": config.get("timestep_spacing"),
                "beta_schedule": config.get("beta_schedule")}
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    stem = "model" if config.get("model_type") == "t5" or name in ("text_encoder", "image_encoder") else "diffusion_pytorch_model"
    weights = _safetensors_summary(weight_files(folder, stem=stem))
    info = {"type": config.get("_class_name") or (config.get("architectures") or ["?"])[0], **weights}
    if "num_layers" in config and "attention_head_dim" in config:
        info.update(layers=config["num_layers"], hidden=config["num_attention_heads"] * config["attention_head_dim"],
                    in_channels=config.get("in_channels"), patch_size=config.get("patch_size"),
                    caption_channels=config.get("caption_channels"), uvit=config.get("enable_uvit"))
    elif "ch_mult" in config or "block_out_channels" in config:
        info.update(widths=[config["ch"] * m for m in config["ch_mult"]] if "ch_mult" in config else config["block_out_channels"],
                    latent_channels=config.get("latent_channels"), scaling_factor=config.get("scaling_factor"),
                    slice_vae=config.get("slice_compression_vae"))
    elif config.get("model_type") == "t5":
        info.update(d_model=config.get("d_model"), layers=config.get("num_layers"), vocab_size=config.get("vocab_size"))
    return info


def _describe_file(path: Path) -> dict:
    from .checkpoint import file_key_shapes, safetensors_metadata

    shapes = file_key_shapes(path)
    report = {"path": str(path), "kind": "file", "tensors": len(shapes), "missing": [], "components": {}}
    if path.suffix == ".safetensors":
        report.update(_safetensors_summary([path]))
    if any(".lora_down." in k or ".lora_A." in k for k in shapes):
        report["kind"] = "LoRA"
        layers = {k.split(".lora_")[0] for k in shapes if ".lora_down." in k or ".lora_A." in k}
        ranks = {v[0] for k, v in shapes.items() if ".lora_down." in k or ".lora_A." in k}
        report.update(layers=len(layers), rank=sorted(ranks), text_encoder_layers=sum(l.startswith("lora_te") for l in layers))
        if path.suffix == ".safetensors":
            meta = safetensors_metadata(path)
            report["metadata"] = {k: v for k, v in meta.items() if k.startswith(("ss_network", "ss_base", "ss_steps"))}
        return report
    try:
        from .loading import detect_family

        source = detect_family(path)
        report.update(kind="transformer file", family=source.family, description=source.description)
        report["missing"] = ["config (read from the family preset and tensor shapes)", "vae", "text encoder"]
    except Exception as err:
        report["note"] = f"not a transformer checkpoint: {err}"
    return report


def format_info(report: dict) -> str:
    lines = [f"{report['path']}: {report['kind']}"]
    if "family" in report:
        lines.append(f"  family: EasyAnimate {str(report['family']).upper()} ({report.get('description', '')})")
    for name, info in report.get("components", {}).items():
        parts = []
        for key, value in info.items():
            if key == "bytes":
                value = f"{value / 2**20:.1f} MiB"
            elif key == "parameters":
                value = f"{value:,}"
            parts.append(f"{key} {value}")
        lines.append(f"  {name}: " + ", ".join(parts))
    for key in ("tensors", "parameters", "dtype", "layers", "rank", "metadata", "note"):
        if key in report and report["kind"] != "release folder":
            lines.append(f"  {key}: {report[key]}")
    if "total_bytes" in report:
        lines.append(f"  total size: {report['total_bytes'] / 2**20:.1f} MiB")
    if report.get("generation_defaults"):
        lines.append(f"  generation defaults: {report['generation_defaults']}")
    lines.append("  missing: " + ("; ".join(report["missing"]) if report.get("missing") else "nothing"))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ training
def cmd_make_data(args) -> int:
    from .train.synthetic import BASE_SHAPES, SHAPES, write_folder

    started = time.time()
    count = write_folder(args.out, args.count, args.seed, frames=args.frames, size=args.size,
                         shapes=SHAPES if args.all_shapes else BASE_SHAPES, force_shape=args.draw_shape,
                         force_colour=args.draw_colour,
                         include_held_out=args.all_shapes, paths=args.paths)
    print(f"wrote {count} clips to {args.out} in {time.time() - started:.0f} s")
    return 0


def _save_every(args) -> dict:
    return {"save_every": args.save_every} if args.save_every else {}


def cmd_train_vae(args) -> int:
    from .train.vae import VAETrainConfig, train_vae

    train_vae(VAETrainConfig(data=args.data, out=args.out, steps=args.steps, lr=args.lr, kl_weight=args.kl_weight,
                             object_weight=args.object_weight, temporal_weight=args.temporal_weight,
                             preview_weight=args.preview_weight,
                             init_from=args.init_from, decoder_only=args.decoder_only, seed=args.seed,
                             threads=args.threads, stop_at=args.stop_at, **_save_every(args)))
    return 0


def cmd_train_text(args) -> int:
    from .train.text import train_text

    captions = None
    if args.synthetic_vocabulary:
        from .train.synthetic import all_captions

        captions = all_captions()
    train_text(args.data, args.out, seed=args.seed, vocab_size=args.vocab_size, captions=captions)
    return 0


def cmd_train_dit(args) -> int:
    from .train.dit import DiTTrainConfig, train_dit

    folder = train_dit(DiTTrainConfig(data=args.data, vae=args.vae, text=args.text, out=args.out, steps=args.steps,
                                      lr=args.lr, warmup=args.warmup, init_from=args.init_from,
                                      video_batch=args.video_batch, image_batch=args.image_batch,
                                      high_noise_fraction=args.high_noise_fraction,
                                      high_noise_from_step=args.high_noise_from_step,
                                      first_frame_prob=args.first_frame_prob, mse_weight_cap=args.mse_weight_cap,
                                      seed=args.seed,
                                      threads=args.threads, stop_at=args.stop_at, **_save_every(args)))
    if folder is None:
        return 0
    print(f"release folder: {folder}")
    return 0


def cmd_train_lora(args) -> int:
    from .train.lora import LoRATrainConfig, train_lora

    train_lora(LoRATrainConfig(model=args.model, data=args.data, out=args.out, steps=args.steps, rank=args.rank,
                               alpha=args.alpha, lr=args.lr, mse_weight_cap=args.mse_weight_cap, seed=args.seed,
                               threads=args.threads, name=args.name,
                               stop_at=args.stop_at, **_save_every(args)))
    return 0


def cmd_evaluate(args) -> int:
    import torch

    from .evaluate import adherence_report
    from .pipeline import load_model
    from .train.common import Progress

    if args.repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {args.repeats}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model_path = Path(args.model) if args.model else demo_model_path()
    defaults = generation_defaults(model_path)
    lora, strength = None, 1.0
    if not args.no_lora:
        if args.lora:
            lora, strength = parse_lora_arg(args.lora)
        elif (model_path / DEMO_LORA).is_file():
            lora = model_path / DEMO_LORA
            strength = float(defaults.get("lora_strength", 1.0))
    model = load_model(model_path, dtype="fp32")
    total = (48 + (40 if lora else 0)) * args.repeats
    progress = Progress(total, "evaluate")
    table, data = adherence_report(
        model, lora, strength, progress=lambda done, n: progress.update(1), repeats=args.repeats,
        frames=defaults["frames"], height=defaults["height"], width=defaults["width"], steps=defaults["steps"],
        guidance_scale=defaults["guidance_scale"], sampler=defaults["sampler"])
    progress.close()
    seeds = f"; prompt set x {args.repeats} seeds" if args.repeats > 1 else ""
    print(f"model {model_path.name}; {defaults['sampler']}, {defaults['steps']} steps, CFG {defaults['guidance_scale']}; "
          f"LoRA {Path(lora).name + f' at {strength}' if lora else 'none'}{seeds}; {data['seconds']} s")
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2))
    return 0
