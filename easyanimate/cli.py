"""The command line: `python -m easyanimate <command> --help`.

    generate     prompt -> video (mp4 / gif / webp / png frames); the embedded demo model by default
    info         what a model folder or file is: family, dtype, sizes, what is missing
    make-data    write a synthetic data folder (clips + captions + ground truth)
    train-vae    train the V3 slice VAE (or, --family v51, the V5/V5.1 VAE) on a data folder
    train-text   train the tokenizer and build the tiny T5 (or, --family v51, Qwen2-VL) encoder for the captions
    train-dit    train the V3 InP transformer (or, --family v51, the V5.1 InP MMDiT) and write a release folder
    train-lora   train a LoRA on a data folder, written in the EasyAnimate LoRA format
    evaluate     prompt adherence of a model (and a LoRA) on the synthetic vocabulary
    multi-train  train MuLTI (video-language understanding) on synthetic clips: pretrain, finetune, all
    multi-eval   MuLTI retrieval / QA / tagging benchmark on held-out synthetic clips

Nothing heavy is imported until a command runs, so `--help` is instant.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

DEMO_NAME = "EasyAnimateV3-demo-64px"
TRAINING_FAMILIES = ("v3", "v51")  # train-vae / train-text / train-dit --family
# Limits of the generate options (refused outside them, before anything is loaded).
MAX_GUIDANCE = 100.0
MAX_FPS = 240
MAX_STEPS = 1000  # the samplers' 1000-step training schedule
VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm")
OUTPUT_SUFFIXES = VIDEO_SUFFIXES + (".gif", ".webp", ".png")
# Used when a V1–V3 model folder has no generation.json: the defaults of the EasyAnimate V3 reference's
# predict script (144 frames at 384x672, 25 steps, CFG 7, 24 fps, seed 43). V5/V5.1 folders take theirs
# from `stages_v5.GENERATION_DEFAULTS` (49 frames at 384x672, 50 steps, CFG 6, 8 fps, seed 43).
RELEASE_DEFAULTS = {"frames": 144, "height": 384, "width": 672, "steps": 25, "guidance_scale": 7.0,
                    "sampler": "Euler", "fps": 24, "seed": 43, "negative_prompt": ""}
MMDIT_FAMILIES = ("v5", "v51")
SAMPLER_CHOICES = ["Euler", "Euler A", "DPM++", "PNDM", "DDIM", "Flow"]
# Video-to-video strength when --input-video is given without --strength (the reference's 0.70).
DEFAULT_STRENGTH = 0.7


def demo_model_path() -> Path:
    return Path(__file__).resolve().parent / "demo" / DEMO_NAME


def release_defaults(family: str | None) -> dict:
    """The defaults of a family's reference scripts (V1–V3: the V3 predict script's)."""
    if family in MMDIT_FAMILIES:
        from .stages_v5 import DEFAULT_SAMPLER, GENERATION_DEFAULTS

        return {**GENERATION_DEFAULTS, "sampler": DEFAULT_SAMPLER[family], "negative_prompt": ""}
    return dict(RELEASE_DEFAULTS)


def model_family(model_path: Path) -> str | None:
    """The family of a release folder's transformer ("v3", "v51", ...), or None when it cannot be told."""
    try:
        from .loading import detect_family

        return detect_family(model_path).family
    except Exception:  # describing or loading the folder names the problem
        return None


def generation_defaults(model_path: Path, family: str | None = None) -> dict:
    """A model folder's `generation.json` (the demo ships one with its best settings) over the release defaults
    of its family (`family` None: read from the folder)."""
    from .checkpoint import read_json_config

    defaults = release_defaults(family or model_family(model_path))
    file = Path(model_path) / "generation.json"
    if file.is_file():
        defaults.update({k: v for k, v in read_json_config(file, what="generation settings file").items()
                         if not k.startswith("_")})
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
                                        "(the demo's best settings), else from the reference defaults of the model's "
                                        "family (V3: 144 frames at 384x672, 25 steps, CFG 7, Euler, 24 fps; V5/V5.1: "
                                        "49 frames at 384x672, 50 steps, CFG 6, 8 fps, sampler Flow for V5.1 and "
                                        "Euler for V5; seed 43).")
    g.add_argument("--prompt", "-p", required=True, help='e.g. "a red circle moving right on a black background"')
    g.add_argument("--negative", "--negative-prompt", dest="negative_prompt", default=None, help="negative prompt")
    g.add_argument("--seed", type=int, default=None, help=f"random seed, 0 to {2**63 - 1} (default 43)")
    g.add_argument("--out", "-o", default="easyanimate.mp4",
                   help="output: .mp4, .mov, .mkv, .webm, .gif, .webp, or .png (one file per frame: NAME_0000.png, ...); "
                        "checked before generating, written to a temporary file and renamed at the end")
    g.add_argument("--model", "-m", default=None, help=f"release folder (default: the embedded demo, {DEMO_NAME})")
    g.add_argument("--frames", type=int, default=None,
                   help="frame count, at least 1 (V3: 1 or a multiple of 8; V5/V5.1: 1 + 4k, e.g. 49)")
    g.add_argument("--size", default=None, metavar="HxW",
                   help="frame size in pixels, e.g. 64x64 (multiples of 8 x patch: 16 for V3 and V5/V5.1)")
    g.add_argument("--steps", type=int, default=None, help="sampling steps, 1 to 1000")
    g.add_argument("--cfg", "--guidance-scale", dest="guidance_scale", type=float, default=None,
                   help=f"classifier-free guidance scale, 0 to {MAX_GUIDANCE:g} (1 or less: no guidance)")
    g.add_argument("--sampler", default=None, choices=SAMPLER_CHOICES,
                   help="sampler: Flow for V5.1 (a flow-matching model, it runs no other); Euler, Euler A, DPM++, "
                        "PNDM or DDIM for V1–V3 and V5 (default: the model's, see above)")
    g.add_argument("--shift", type=float, default=None,
                   help="Flow sampler (V5.1): the noise schedule's shift s, sigma -> s*sigma/(1 + (s-1)*sigma), "
                        "applied as the release's scheduler applies its own (default: the model's "
                        "scheduler_config.json, 1.0 in the releases; above 1 spends more steps at high noise)")
    g.add_argument("--teacache", type=float, default=None, metavar="THRESH",
                   help="V5.1: TeaCache, skip transformer calls whose input barely changed since the last computed "
                        "one and reuse its residual; the threshold sets how much change may add up before a call is "
                        "computed again (0.05 to 0.1; the reference uses 0.08, its ComfyUI nodes 0.1; higher is "
                        "faster and less exact). Off by default")
    g.add_argument("--teacache-coefficients", default=None, metavar="NAME|LIST",
                   help="TeaCache's rescaling polynomial: v5.1-12b, v5.1-7b, v5-7b-inp, or comma-separated numbers, "
                        "highest degree first (default: the model's own, 7B or 12B by its size; V5 has none, as the "
                        "reference turns TeaCache off for V5: give one to force it)")
    g.add_argument("--start-image", default=None,
                   help="image file to start from (image-to-video; V3 and V5/V5.1 InP models); resized to the video "
                        "size, at most 64 megapixels")
    g.add_argument("--end-image", default=None,
                   help="image file the video ends on (with --start-image; InP models), resized like --start-image")
    g.add_argument("--input-video", default=None,
                   help="video file to redraw (video-to-video): its first frames, every (its fps // --fps)-th as the "
                        "reference samples them, resized to the video size; see --strength")
    g.add_argument("--strength", type=float, default=None,
                   help=f"video-to-video denoise strength, above 0 up to 1: how much of --input-video is redrawn "
                        f"(the last strength x steps steps run; default {DEFAULT_STRENGTH} with --input-video, as the "
                        "reference)")
    g.add_argument("--control-video", default=None,
                   help="control video for a V5/V5.1 Control model (the canny, depth, pose, ... frames you made), "
                        "sampled and resized like --input-video")
    g.add_argument("--reference-image", default=None,
                   help="reference image for a V5.1 Control or Control-Camera model: what the first frame should "
                        "look like (resized to the video size)")
    g.add_argument("--camera-poses", default=None, metavar="FILE",
                   help="camera path for a V5.1 Control-Camera model: a CameraCtrl / RealEstate10K pose file (first "
                        "line skipped, then per frame: timestamp fx fy cx cy 0 0 and the 3x4 world-to-camera matrix), "
                        "turned into Plücker rays per pixel")
    g.add_argument("--camera-stride", type=int, default=1, metavar="N",
                   help="with --camera-poses: use every N-th pose line (default 1, as the reference's ComfyUI nodes; "
                        "its predict script uses 24 // fps, 3 at 8 fps)")
    g.add_argument("--lora", action="append", default=[], metavar="PATH[:STRENGTH]",
                   help="apply a LoRA (repeatable), strength -100 to 100, default 1.0. A name that is not a file is "
                        "looked up in the model folder's loras/ (.safetensors may be left out): with the demo model, "
                        "--lora magenta:0.8 applies its loras/magenta.safetensors (every object magenta)")
    g.add_argument("--fps", type=int, default=None, help=f"frames per second of the written video, 1 to {MAX_FPS}")
    g.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="compute dtype (fp32 on CPU)")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for torch, at least 1 (default: torch's own choice)")
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
    d.add_argument("--weight", action="append", default=[], metavar="NAME=N",
                   help="draw pairs with this colour or shape N times as often (repeatable; a fine-tuning set "
                        "that leans on e.g. green=3 still shows every seen pair and no held-out one)")

    v = commands.add_parser("train-vae", help="train the V3 slice VAE, or the V5/V5.1 VAE (--family v51)")
    v.add_argument("--data", required=True, help="data folder (clips.npy + captions.txt, or videos + .txt)")
    v.add_argument("--out", required=True, help="run folder (checkpoints, loss.jsonl, vae/)")
    v.add_argument("--family", choices=TRAINING_FAMILIES, default="v3",
                   help="v3: the V3 slice VAE (16-frame clips); v51: the causal VAE of V5/V5.1 (1 + 4k frames, 17 by default)")
    v.add_argument("--frames", type=int, default=None, help="frames per clip (default: 16 for v3, 17 for v51)")
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

    t = commands.add_parser("train-text", help="train the tokenizer and build the tiny T5 (or Qwen2-VL) encoder")
    t.add_argument("--data", default=None, help="data folder whose captions define the vocabulary")
    t.add_argument("--out", required=True, help="writes OUT/tokenizer and OUT/text_encoder")
    t.add_argument("--family", choices=TRAINING_FAMILIES, default="v3",
                   help="v3: sentencepiece words + T5; v51: Qwen2 byte-level BPE + Qwen2-VL with its chat template")
    t.add_argument("--synthetic-vocabulary", action="store_true",
                   help="also add every caption the synthetic generator can write (all shapes, templates)")
    t.add_argument("--vocab-size", type=int, default=None,
                   help="upper bound of the vocabulary (default: 200 for v3; 1000 for v51, bytes and merges)")
    t.add_argument("--seed", type=int, default=0)

    dt = commands.add_parser("train-dit", help="train the V3 InP transformer, or the V5.1 InP MMDiT (--family v51); "
                                               "writes OUT/model (a release folder)")
    dt.add_argument("--data", required=True)
    dt.add_argument("--vae", required=True, help="folder with vae/ (a train-vae run of the same family)")
    dt.add_argument("--text", required=True, help="folder with text_encoder/ and tokenizer/ (a train-text run of the same family)")
    dt.add_argument("--out", required=True, help="run folder (checkpoints, loss.jsonl, latents.pt, model/)")
    dt.add_argument("--family", choices=TRAINING_FAMILIES, default="v3",
                    help="v3: the V3 InP DiT, DDPM objective; v51: the V5.1 InP MMDiT, flow matching")
    dt.add_argument("--frames", type=int, default=None, help="frames per clip (default: 16 for v3, 17 for v51)")
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
    dt.add_argument("--sigma-shift", type=float, default=1.0,
                    help="v51: shift of the sampled noise levels, s*sigma/(1+(s-1)*sigma); above 1 more samples at the "
                         "noisy end, where layout and colours are decided (1: the reference's uniform sigma)")
    dt.add_argument("--end-frame-prob", type=float, default=0.25,
                    help="v51: share of the image-to-video samples that also keep their last frame (start + end images)")
    dt.add_argument("--seed", type=int, default=0)
    dt.add_argument("--threads", type=int, default=2)
    dt.add_argument("--stop-at", type=int, default=None, help="stop after this step (run again to resume)")
    dt.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps")

    lo = commands.add_parser("train-lora", help="train a LoRA (EasyAnimate/kohya format) for a V3 or V5.1 release")
    lo.add_argument("--model", required=True, help="release folder to adapt")
    lo.add_argument("--data", required=True)
    lo.add_argument("--out", required=True, help="run folder; the LoRA is OUT/<name>")
    lo.add_argument("--name", default="lora.safetensors")
    lo.add_argument("--steps", type=int, default=600)
    lo.add_argument("--rank", type=int, default=8)
    lo.add_argument("--alpha", type=float, default=8.0)
    lo.add_argument("--lr", type=float, default=1e-3)
    lo.add_argument("--mse-weight-cap", type=float, default=0.0,
                    help="V3 models, as for train-dit: weight the noise MSE by min(1 + 1/SNR, cap) (0: plain mean)")
    lo.add_argument("--sigma-shift", type=float, default=1.0,
                    help="V5.1 models, as for train-dit --family v51: more samples at the noisy end (1: uniform sigma)")
    lo.add_argument("--frames", type=int, default=None, help="frames per clip (default: 16 for V3 models, 17 for V5.1)")
    lo.add_argument("--seed", type=int, default=0)
    lo.add_argument("--threads", type=int, default=2)
    lo.add_argument("--stop-at", type=int, default=None, help="stop after this step (run again to resume)")
    lo.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps")

    e = commands.add_parser("evaluate", help="prompt adherence on the synthetic vocabulary (prints the table)")
    e.add_argument("--model", default=None, help="release folder (default: the demo)")
    e.add_argument("--lora", default=None, metavar="PATH[:STRENGTH]",
                   help="LoRA to evaluate, a file or a name in the model folder's loras/ (default: the demo's magenta LoRA)")
    e.add_argument("--no-lora", action="store_true", help="skip the LoRA rows")
    e.add_argument("--repeats", type=int, default=1,
                   help="run the prompt set this many times with other seeds (1: the 48 + 40 videos of the table)")
    e.add_argument("--json", default=None, help="also write every video's analysis to this JSON file")
    e.add_argument("--threads", type=int, default=None)
    e.add_argument("--teacache", type=float, default=None, metavar="THRESH",
                   help="V5/V5.1: generate with TeaCache at this threshold (the model family's coefficients)")

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
        if isinstance(err, OSError):  # a file that cannot be read or written: the system's reason and the file
            where = f" '{err.filename}'" if err.filename else ""
            print(f"error: {err.strerror or err}{where}", file=sys.stderr)
            return 2
        raise


# ------------------------------------------------------------------------------------------ generate
def parse_lora_arg(text: str) -> tuple[str, float]:
    """"path" or "path:strength" (a Windows drive letter's colon is not a strength).

    A strength that is not a number, or not finite, or beyond +-100, is refused naming the strength (not
    reported as a missing file); a path that itself contains a colon is kept whole when it exists.
    """
    from .lora import check_lora_strength

    path, sep, strength = text.rpartition(":")
    drive_letter = len(path) == 1 and path.isalpha()
    if not sep or not path or drive_letter or "\\" in strength or "/" in strength or Path(text).exists():
        return text, 1.0
    try:
        value = float(strength)
    except ValueError:
        raise ValueError(
            f"--lora {text!r}: the strength {strength!r} is not a number. Write PATH or PATH:STRENGTH, "
            "e.g. --lora magenta:0.8."
        ) from None
    return path, check_lora_strength(value, f"strength in --lora {text!r}")


def find_lora(name: str, model_path: Path) -> Path:
    """A LoRA file: `name` as a path, else the model folder's `loras/<name>` (with or without `.safetensors`)."""
    from .lora import LoRAFileError

    path = Path(name)
    if path.exists():
        return path  # read_lora names the problem if it is a folder or not a LoRA
    folder = Path(model_path) / "loras"
    tries = [name] if path.suffix else [name, name + ".safetensors"]
    for candidate in [folder / t for t in tries] + ([Path(name + ".safetensors")] if not path.suffix else []):
        if candidate.is_file():
            return candidate
    shipped = sorted(p.stem for p in folder.glob("*.safetensors")) if folder.is_dir() else []
    known = f"; it holds: {', '.join(shipped)}" if shipped else " (it has none)"
    raise LoRAFileError(
        f"LoRA '{name}' not found: no such file, and no '{tries[-1]}' in the model folder's loras/ ({folder}){known}."
    )


def demo_lora(model_path: Path, defaults: dict) -> Path | None:
    """The LoRA a demo folder's `generation.json` names as its own (`demo_lora`, a name in its loras/: what
    `evaluate` measures when no --lora is given; `generate` applies a LoRA only when asked), or None."""
    name = defaults.get("demo_lora")
    return find_lora(name, model_path) if name else None


def evaluated_lora(lora_arg: str | None, no_lora: bool, model_path: Path, defaults: dict) -> tuple[Path | None, float]:
    """(file, strength) of the LoRA an adherence evaluation measures: --lora PATH[:STRENGTH], else the folder's
    own (`demo_lora` at `lora_strength`); (None, 1.0) with --no-lora or when the folder has none."""
    if no_lora:
        return None, 1.0
    if lora_arg:
        name, strength = parse_lora_arg(lora_arg)
        return find_lora(name, model_path), strength
    return demo_lora(model_path, defaults), float(defaults.get("lora_strength", 1.0))


def _whole_number(value, option: str, low: int, high: int | None = None, source: str = "") -> int:
    """`value` as an int within [low, high], or an error naming the option, the range and the value."""
    span = f"from {low} to {high}" if high is not None else f"at least {low}"
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise ValueError(f"{option} must be a whole number {span}; got {value!r}{source}.")
    return value


def _from(args_value, defaults_file: Path, file_keys: set, key: str) -> str:
    """Where an option's value came from, for messages about values the user did not type."""
    if args_value is not None:
        return ""
    return f" (from {defaults_file})" if key in file_keys else " (the release default)"


def check_device(text: str):
    """A torch device that exists on this machine, or an error saying what is wrong and what to use."""
    import torch

    from .errors import EasyAnimateError

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise EasyAnimateError(f"--device {text!r} is not a torch device; use cpu, cuda, cuda:1 or mps.") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EasyAnimateError(
                f"--device {text}: no CUDA GPU is usable here (torch {torch.__version__}, built for CUDA "
                f"{torch.version.cuda or 'none'}). Use --device cpu, or install a CUDA build of torch."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise EasyAnimateError(
                f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                f"cuda:0 to cuda:{torch.cuda.device_count() - 1}."
            )
        return device
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise EasyAnimateError(f"--device {text}: Apple MPS is not available here. Use --device cpu.")
    try:
        torch.empty(1, device=device)
    except Exception as err:  # other backends (xpu, ...): try it
        raise EasyAnimateError(f"--device {text} cannot be used here ({str(err).splitlines()[0]}). Use --device cpu.") from None
    return device


def _check_generate_options(args, model_path: Path, defaults: dict, source) -> dict:
    """Every generate option that can be checked without loading the model, checked before anything is loaded.
    `source`: what `loading.detect_family` read from the folder (the family and the transformer's config)."""
    from .checkpoint import read_json_config
    from .errors import check_seed
    from .memory import MemoryOptions
    from .sampling import build_sampler, check_sampler_for_family

    file = Path(model_path) / "generation.json"
    file_keys = set(read_json_config(file, what="generation settings file")) if file.is_file() else set()
    source_of = lambda value, key: _from(value, file, file_keys, key)
    if args.threads is not None:
        _whole_number(args.threads, "--threads", 1, 1024)
    check_device(args.device)
    memory = MemoryOptions(args.memory_mode, args.swap_blocks, args.memory_budget)  # refuses bad values
    pick = lambda value, key: defaults[key] if value is None else value
    frames = _whole_number(pick(args.frames, "frames"), "--frames", 1, None, source_of(args.frames, "frames"))
    steps = _whole_number(pick(args.steps, "steps"), "--steps", 1, MAX_STEPS, source_of(args.steps, "steps"))
    fps = _whole_number(pick(args.fps, "fps"), "--fps", 1, MAX_FPS, source_of(args.fps, "fps"))
    guidance = pick(args.guidance_scale, "guidance_scale")
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not 0 <= guidance <= MAX_GUIDANCE:
        raise ValueError(
            f"--cfg (guidance scale) must be a number from 0 to {MAX_GUIDANCE:g} (1 or less: no guidance; "
            f"5 to 8 is usual); got {guidance!r}{source_of(args.guidance_scale, 'guidance_scale')}."
        )
    seed = pick(args.seed, "seed")
    check_seed(seed, "--seed" + source_of(args.seed, "seed"))
    height, width = _parse_size(args.size) if args.size else (defaults["height"], defaults["width"])
    family = source.family
    sampler = check_sampler_for_family(args.sampler or defaults["sampler"], family)
    scheduler = _scheduler_config(model_path, sampler, args.shift)
    build_sampler(sampler, scheduler).set_timesteps(steps)  # the sampler's own limits (PNDM needs 4 steps)
    options = dict(steps=steps, guidance_scale=float(guidance), sampler=sampler, seed=seed)
    if scheduler is not None:
        options["scheduler_config"] = scheduler
    config = None
    if family in MMDIT_FAMILIES:
        config = _mmdit_config(source)
        _check_video_shape(frames, height, width, config)
    if args.teacache is not None or args.teacache_coefficients is not None:
        options["teacache"] = _teacache_option(args, config or source)
    strength = args.strength if args.strength is not None else (DEFAULT_STRENGTH if args.input_video else 1.0)
    from .sampling import check_strength, first_step_for_strength

    try:
        first_step_for_strength(steps, check_strength(strength))
    except Exception as err:
        raise ValueError(f"--strength: {err}") from None
    if strength < 1 and not args.input_video:
        raise ValueError("--strength below 1 redraws an input video: give one with --input-video.")
    if args.input_video:
        options["strength"] = strength
    if args.end_image and not args.start_image:
        raise ValueError("--end-image needs --start-image too (the model is conditioned on both).")
    if args.camera_stride != 1 and not args.camera_poses:
        raise ValueError("--camera-stride applies to --camera-poses; give a pose file.")
    return dict(frames=frames, height=height, width=width, fps=fps, memory=memory, options=options)


def _scheduler_config(model_path: Path, sampler: str, shift):
    """What the sampler is built from: the folder's scheduler/ (None without one: the V1–V3 YAML defaults), or
    with --shift its config with that shift (Flow only; `sampling.with_flow_shift` checks the value)."""
    from .errors import EasyAnimateError
    from .sampling import FLOW_SAMPLER_NAMES, with_flow_shift

    folder = Path(model_path) / "scheduler"
    scheduler = folder if (folder / "scheduler_config.json").is_file() else None
    if shift is None:
        return scheduler
    if sampler not in FLOW_SAMPLER_NAMES:
        raise ValueError(f"--shift shapes the Flow sampler's schedule (V5.1); sampler {sampler!r} has none.")
    if scheduler is None:
        raise ValueError(f"--shift changes the model's scheduler config, and '{model_path}' has no "
                         "scheduler/scheduler_config.json.")
    try:
        return with_flow_shift(scheduler, shift)
    except EasyAnimateError as err:
        raise ValueError(f"--shift: {err}") from None


def _mmdit_config(source):
    """The V5/V5.1 transformer config a release folder's config.json describes (missing keys: the released)."""
    from .models.mmdit import MMDiTConfig

    return MMDiTConfig.from_dict(source.config or {}, source.family)


def _check_video_shape(frames: int, height: int, width: int, config) -> None:
    """V5/V5.1 frame counts (1 + 4k) and sizes (multiples of 16), refused with the nearest valid values before
    loading; the loaded models check them again."""
    from .frames import SPATIAL_FACTOR, frame_rule
    from .pipeline import check_pixel_size

    frame_rule(config.family).check_frames(frames)
    check_pixel_size(height, width, SPATIAL_FACTOR * config.patch_size, config.name)


def _teacache_option(args, config):
    """--teacache and --teacache-coefficients -> the TeaCache settings of this model (refused for a model
    TeaCache does not apply to, and for V5 without coefficients)."""
    from .teacache import COEFFICIENTS, TeaCache, resolve

    if args.teacache is None:
        raise ValueError("--teacache-coefficients needs --teacache THRESH (the threshold; 0.08 is the reference's).")
    coefficients = None
    if args.teacache_coefficients is not None:
        text = args.teacache_coefficients.strip()
        if text.lower() in COEFFICIENTS:
            coefficients = COEFFICIENTS[text.lower()]
        else:
            try:
                coefficients = [float(v) for v in text.split(",")]
            except ValueError:
                raise ValueError(
                    f"--teacache-coefficients {text!r}: give {', '.join(COEFFICIENTS)} or comma-separated numbers "
                    "(highest degree first)."
                ) from None
    return resolve(TeaCache(args.teacache, coefficients), config)


def _unknown_prompt_words(encoder, prompts) -> tuple:
    """The prompt words the text encoder cannot spell (V5's encoders answer per vocabulary: flattened)."""
    ask = getattr(encoder, "unknown_words", None)
    if ask is None:  # Qwen2-VL's byte-level vocabulary spells every word
        return ()
    words = []
    for item in ask(prompts):
        for word in (item if isinstance(item, tuple) else (item,)):
            if word not in words:
                words.append(word)
    return tuple(words)


def _read_generate_inputs(args, frames: int, height: int, width: int, fps: int) -> dict:
    """The image, video and pose files of a generate run, read and checked before any model is loaded."""
    from .images import read_video

    inputs = {}
    if args.start_image:
        inputs["start_images"] = _read_image(args.start_image, (height, width))
    if args.end_image:
        inputs["end_images"] = _read_image(args.end_image, (height, width))
    if args.input_video:
        inputs["video"] = read_video(args.input_video, frames=frames, fps=fps, size=(height, width))
    if args.control_video:
        inputs["control_video"] = read_video(args.control_video, frames=frames, fps=fps, size=(height, width))
    if args.reference_image:
        inputs["reference_image"] = _read_image(args.reference_image, (height, width))
    if args.camera_poses:
        from .camera import plucker_rays

        inputs["control_camera"] = plucker_rays(args.camera_poses, height, width, frames=frames,
                                                stride=args.camera_stride)
    return inputs


def cmd_generate(args) -> int:
    import torch

    from .loading import detect_family
    from .lora import read_lora
    from .pipeline import load_model, make_video
    from .teacache import record_runs
    from .train.common import Progress

    # Everything that needs no model is checked before anything is loaded or sampled: the options, the
    # output path (a video is never generated only to fail at writing), the image, video and pose files
    # and the LoRA files.
    model_path = Path(args.model) if args.model else demo_model_path()
    source = detect_family(model_path)
    defaults = generation_defaults(model_path, source.family)
    checked = _check_generate_options(args, model_path, defaults, source)
    frames, height, width, fps, options, memory = (
        checked[k] for k in ("frames", "height", "width", "fps", "options", "memory"))
    negative = defaults["negative_prompt"] if args.negative_prompt is None else args.negative_prompt
    out = check_output(args.out)
    options.update(_read_generate_inputs(args, frames, height, width, fps))
    loras = []
    for item in args.lora:
        name, strength = parse_lora_arg(item)
        loras.append((read_lora(find_lora(name, model_path)), strength))
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    from .host import StandaloneHost

    host = StandaloneHost(memory, compute=args.device)
    started = time.time()
    # Streaming and fp8 modes load into CPU RAM first; the host then places each part for its stage.
    load_device = args.device if args.memory_mode == "none" else "cpu"
    model = load_model(model_path, dtype=args.dtype, device=load_device)
    host.prepare(host.wrap(model.transformer, "transformer"))
    host.place_all(model.modules().values())
    unknown = _unknown_prompt_words(model.text_encoder, [args.prompt, negative]) if model.text_encoder else ()
    if unknown:
        from .text import describe_unknown_words

        print(f"note: {describe_unknown_words(unknown)}")
    stack = []
    if loras:
        from .lora import resolve_lora

        for weights, strength in loras:
            stack.append((resolve_lora(weights, model.transformer, model.text_encoder.model if model.text_encoder else None),
                          strength))
    steps_run = options["steps"] - _first_step(options)
    progress = Progress(steps_run, "sampling", enabled=not args.quiet)
    options["callback"] = lambda done, total, latents: progress.update(1)
    with record_runs() as teacache_runs:
        video = make_video(model, args.prompt, negative, frames=frames, height=height, width=width, host=host,
                           loras=stack, **options)
    progress.close()
    frames_uint8 = (video[0].permute(1, 2, 3, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    written = write_video(frames_uint8, out, fps)
    seconds = time.time() - started
    mode = "" if args.memory_mode == "none" else f", memory mode {args.memory_mode}"
    cache = "".join(f", TeaCache {run.threshold:g}: {run.computed_calls} of {len(run.decisions)} transformer calls "
                    f"computed" for run in teacache_runs)
    print(f"wrote {written}: {frames_uint8.shape[0]} frames, {width}x{height}, {fps} fps, {seconds:.1f} s, "
          f"peak memory {_peak_memory_mb(args.device):.0f} MB{mode}{cache}")
    return 0


def _first_step(options: dict) -> int:
    from .sampling import first_step_for_strength

    return first_step_for_strength(options["steps"], options.get("strength", 1.0))


def _parse_size(text: str) -> tuple[int, int]:
    try:
        h, w = text.lower().split("x")
        h, w = int(h), int(w)
    except ValueError:
        raise ValueError(f"--size must look like HxW, e.g. 64x64; got {text!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"--size must be positive, e.g. 64x64; got {text!r}")
    return h, w


def _read_image(path, size=None):
    """The start image (1, 3, H, W) in [0, 1], resized to `size` (height, width) while still 8-bit; refused
    over 64 megapixels before decoding (see `easyanimate.images.read_image`)."""
    from .images import read_image

    return read_image(path, size=size)


def _peak_memory_mb(device: str) -> float:
    import resource

    import torch

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    if str(device).startswith("cuda") and torch.cuda.is_available():
        peak += torch.cuda.max_memory_allocated() / 2**20
    return peak


def check_output(out) -> Path:
    """The output path, checked before any work: a known extension, not a folder, not under a file, and a
    folder that can be written (created at write time if missing). Raises ValueError saying what to change."""
    out = Path(out)
    suffix = out.suffix.lower()
    if out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a folder; give a file name in it, e.g. {out / ('video' + (suffix or '.mp4'))}.")
    if suffix not in OUTPUT_SUFFIXES:
        raise ValueError(
            f"--out {str(out)!r}: unknown output type {suffix or '(no extension)'}; use one of {', '.join(OUTPUT_SUFFIXES)} "
            "(.png writes one file per frame)."
        )
    if out.exists() and not out.is_file():
        raise ValueError(f"--out {str(out)!r} exists and is not a regular file; choose another output name.")
    folder = out.absolute().parent
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--out {str(out)!r}: '{existing}' is a file, not a folder, so nothing can be written under it.")
    if existing == folder:
        import tempfile

        try:
            handle, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".probe", dir=folder)
            os.close(handle)
            os.unlink(probe)
        except OSError as err:
            raise ValueError(f"--out {str(out)!r}: cannot create a file in '{folder}' ({err.strerror or err}); choose a writable folder.") from None
    elif not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {str(out)!r}: cannot create folders in '{existing}' (not writable); choose a writable folder.")
    if suffix in VIDEO_SUFFIXES:
        try:
            import av  # noqa: F401
        except ImportError:
            raise ValueError(f"Writing {suffix} needs PyAV (pip install av); or write .gif, .webp or .png.") from None
    return out


def write_video(frames, out, fps: int) -> str:
    """frames (F, H, W, 3) uint8 -> out (.mp4/.mov/.mkv/.webm via PyAV; .gif/.webp via Pillow; .png: one file per
    frame, NAME_0000.png ...). Returns what was written, and says when it replaced an existing output.

    Nothing is lost on failure or Ctrl-C: a file is written to a temporary name beside the target and renamed
    over it only when complete; a .png set is written into a temporary folder beside it, then moved in, and
    frames of an earlier, longer set with the same name pattern are removed.
    """
    out = check_output(out)
    _whole_number(fps, "fps", 1, MAX_FPS)
    out.parent.mkdir(parents=True, exist_ok=True)
    suffix = out.suffix.lower()
    if suffix == ".png":
        return _write_frame_set(frames, out)
    existed = out.exists()
    temporary = out.with_name(f".{out.stem}.partial-{os.getpid()}-{time.time_ns()}{out.suffix}")
    try:
        if suffix in VIDEO_SUFFIXES:
            _write_av(frames, temporary, fps)
        else:
            from PIL import Image

            images = [Image.fromarray(f) for f in frames]
            extra = {"lossless": True} if suffix == ".webp" else {}
            images[0].save(temporary, format=suffix[1:].upper(), save_all=True, append_images=images[1:],
                           duration=round(1000 / fps), loop=0, **extra)
        os.replace(temporary, out)
    finally:
        if temporary.exists():
            temporary.unlink()
    return f"{out} (replaced the existing file)" if existed else str(out)


def _write_frame_set(frames, out: Path) -> str:
    import shutil
    import tempfile

    from PIL import Image

    folder, stem = out.parent, out.stem
    pattern = re.compile(re.escape(stem) + r"_\d{4,}\.png")
    earlier = {p.name for p in folder.iterdir() if pattern.fullmatch(p.name) and p.is_file()}
    staging = Path(tempfile.mkdtemp(prefix=f".{stem}.partial-", dir=folder))
    try:
        names = [f"{stem}_{index:04d}.png" for index in range(len(frames))]
        for name, pixels in zip(names, frames):
            Image.fromarray(pixels).save(staging / name)
        for name in names:
            os.replace(staging / name, folder / name)
        stale = sorted(earlier - set(names))
        for name in stale:
            (folder / name).unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    written = f"{folder / names[0]} ... _{len(names) - 1:04d}.png"
    replaced = len(earlier & set(names))
    if replaced or stale:
        written += f" (replaced {replaced} existing frame{'s' if replaced != 1 else ''}"
        written += f", removed {len(stale)} stale frame{'s' if len(stale) != 1 else ''} of an earlier run)" if stale else ")"
    return written


def _write_av(frames, out: Path, fps: int) -> None:
    import av

    height, width = frames.shape[1:3]
    container_format = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm"}[out.suffix.lower()]
    with av.open(str(out), mode="w", format=container_format) as container:
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
    problems = report_problems(report)
    if problems:
        print(f"error: '{path}' cannot be loaded:\n" + "\n".join(f"  {p}" for p in problems), file=sys.stderr)
        return 1
    return 0


def report_problems(report: dict) -> list[str]:
    """What makes a described model unusable: components that failed to read, an unknown family, a
    required part missing."""
    problems = [f"{name}: {info['error']}" for name, info in report.get("components", {}).items() if "error" in info]
    if report.get("family_error") and "error" not in report.get("components", {}).get("transformer", {}):
        problems.append(f"transformer: {report['family_error']}")
    problems += [f"{m.split(' ')[0]} is missing" for m in report.get("missing", []) if m.endswith("(required)")]
    return problems


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
    from .errors import LayoutError

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"'{path}' does not exist.")
    if path.is_file():
        return _describe_file(path)
    if not path.is_dir():
        raise LayoutError(f"'{path}' is neither a regular file nor a folder; pass a model folder or a weights file.")
    report = {"path": str(path), "kind": "release folder", "components": {}, "missing": []}
    root = path
    if not (root / "transformer").is_dir() and (root / "config.json").is_file():
        return {"path": str(path), "kind": "component folder", "components": {path.name: _describe_component(path)}, "missing": []}
    if not any((root / name).is_dir() for parts in RELEASE_PARTS.values() for name, _ in parts):
        found = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())[:10]
        raise LayoutError(
            f"'{path}' is not a model folder: a release folder holds transformer/, vae/, text_encoder/, tokenizer/ "
            f"(and scheduler/, image_encoder/), a component folder a config.json; found: {', '.join(found) or 'nothing'}. "
            "Pass a release folder, a component folder or a weights file."
        )
    family = None
    if (root / "transformer").is_dir():
        try:
            from .loading import detect_family

            source = detect_family(root)
            family = report["family"] = source.family
            report["description"] = source.description
        except Exception as err:
            report["family"] = "unknown"
            report["family_error"] = str(err)
    for name, why in RELEASE_PARTS.get(family or "v3", RELEASE_PARTS["v3"]):
        folder = root / name
        if not folder.is_dir():
            report["missing"].append(f"{name}/ ({why})")
            continue
        try:
            report["components"][name] = _describe_component(folder)
        except Exception as err:  # describe what we can, say what failed
            report["components"][name] = {"error": str(err)}
    vae = report["components"].get("vae", {})
    if family and "family" in vae:
        from .pipeline import FAMILY_NAMES, VAE_FOR_FAMILY

        if VAE_FOR_FAMILY.get(family) != vae["family"]:
            vae["error"] = (f"this is the {FAMILY_NAMES.get(vae['family'], vae['family'])} VAE; the "
                            f"{FAMILY_NAMES.get(family, family)} transformer needs the "
                            f"{FAMILY_NAMES.get(VAE_FOR_FAMILY.get(family), '?')} one")
    total = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    report["total_bytes"] = total
    if (root / "generation.json").is_file():
        try:
            report["generation_defaults"] = generation_defaults(root)
        except Exception as err:
            report["components"]["generation.json"] = {"error": str(err)}
    return report


# The parts of a release folder per family, and what each is (said when it is missing; "(required)" ones
# make the folder unusable).
_V1_V3_PARTS = [
    ("transformer", "required"), ("vae", "required"),
    ("text_encoder", "the T5 text encoder (required)"), ("tokenizer", "T5's sentencepiece tokenizer (required)"),
    ("scheduler", "samplers use the V3 YAML defaults"),
]
RELEASE_PARTS = {
    "v1": _V1_V3_PARTS, "v2": _V1_V3_PARTS,
    "v3": _V1_V3_PARTS + [("image_encoder", "no CLIP image encoder: image-to-video runs without CLIP tokens "
                                           "(zeros, as in text-to-video)")],
    "v51": [("transformer", "required"), ("vae", "required"),
            ("text_encoder", "the Qwen2-VL text encoder (required)"), ("tokenizer", "Qwen2-VL's tokenizer (required)"),
            ("scheduler", "the flow-matching scheduler config (required)")],
    "v5": [("transformer", "required"), ("vae", "required"),
           ("text_encoder", "the Bert text encoder (required)"), ("tokenizer", "Bert's tokenizer (required)"),
           ("text_encoder_2", "the mT5 text encoder (required)"), ("tokenizer_2", "mT5's tokenizer (required)"),
           ("scheduler", "samplers use the V3 YAML defaults")],
}


def _describe_component(folder: Path) -> dict:
    from .checkpoint import read_json_config, weight_files

    name = folder.name
    if name.startswith("tokenizer"):
        return _describe_tokenizer(folder)
    if name == "scheduler" or (folder / "scheduler_config.json").is_file():
        config = read_json_config(folder / "scheduler_config.json", what="scheduler config")
        info = {"type": config.get("_class_name")}
        if config.get("_class_name") == "FlowMatchEulerDiscreteScheduler":
            info.update(sampler="Flow", shift=config.get("shift"), dynamic_shifting=config.get("use_dynamic_shifting"))
        else:
            info.update(timestep_spacing=config.get("timestep_spacing"), beta_schedule=config.get("beta_schedule"),
                        prediction_type=config.get("prediction_type"))
        return info
    config = read_json_config(folder / "config.json") if (folder / "config.json").is_file() else {}
    model_type = config.get("model_type")
    stem = "model" if model_type or name.startswith(("text_encoder", "image_encoder")) else "diffusion_pytorch_model"
    weights = _safetensors_summary(weight_files(folder, stem=stem))
    info = {"type": TEXT_ENCODER_NAMES.get(model_type) or config.get("_class_name")
            or (config.get("architectures") or ["?"])[0], **weights}
    if config.get("_class_name") == "EasyAnimateTransformer3DModel":
        info.update(layers=config.get("num_layers"), mmdit_layers=config.get("mmdit_layers", config.get("num_layers")),
                    hidden=config["num_attention_heads"] * config["attention_head_dim"],
                    in_channels=config.get("in_channels"), text_width=config.get("text_embed_dim"))
    elif "num_layers" in config and "attention_head_dim" in config:
        info.update(layers=config["num_layers"], hidden=config["num_attention_heads"] * config["attention_head_dim"],
                    in_channels=config.get("in_channels"), patch_size=config.get("patch_size"),
                    caption_channels=config.get("caption_channels"), uvit=config.get("enable_uvit"))
    elif "ch_mult" in config or "block_out_channels" in config:
        from .vae import detect_family as vae_family

        info.update(family=vae_family(config), widths=[config["ch"] * m for m in config["ch_mult"]]
                    if "ch_mult" in config else config["block_out_channels"],
                    latent_channels=config.get("latent_channels"), scaling_factor=config.get("scaling_factor"))
    elif model_type in ("t5", "mt5"):
        info.update(d_model=config.get("d_model"), layers=config.get("num_layers"), vocab_size=config.get("vocab_size"))
    elif model_type in ("qwen2_vl", "bert"):
        info.update(hidden=config.get("hidden_size", config.get("text_config", {}).get("hidden_size")),
                    layers=config.get("num_hidden_layers", config.get("text_config", {}).get("num_hidden_layers")),
                    vocab_size=config.get("vocab_size", config.get("text_config", {}).get("vocab_size")))
    return info


TEXT_ENCODER_NAMES = {"qwen2_vl": "Qwen2-VL (its language model; the vision tower is not used)",
                      "bert": "Bert (HunyuanDiT's bilingual text tower)", "t5": "T5 encoder", "mt5": "mT5 encoder"}


def _describe_tokenizer(folder: Path) -> dict:
    """The kind of tokenizer a folder holds, from its files: T5/mT5 sentencepiece, Qwen2 byte-level BPE, Bert
    WordPiece."""
    if (folder / "spiece.model").is_file():
        from .text import T5PromptTokenizer

        return {"type": "sentencepiece tokenizer (T5 / mT5)", "vocab_size": T5PromptTokenizer.from_path(folder).vocab_size}
    if (folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file():
        from .checkpoint import read_json_config

        vocab = read_json_config(folder / "vocab.json", what="tokenizer vocabulary") if (folder / "vocab.json").is_file() \
            else read_json_config(folder / "tokenizer.json", what="tokenizer file").get("model", {}).get("vocab", {})
        return {"type": "Qwen2-VL byte-level BPE tokenizer", "vocab_size": len(vocab)}
    if (folder / "vocab.txt").is_file():
        words = sum(1 for line in (folder / "vocab.txt").read_text(encoding="utf-8").splitlines() if line)
        return {"type": "Bert WordPiece tokenizer", "vocab_size": words}
    from .errors import LayoutError

    raise LayoutError(f"'{folder}' holds no tokenizer files (spiece.model, vocab.json / tokenizer.json or vocab.txt).")


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
    if report.get("family_error"):
        lines.append(f"  family: unknown: {report['family_error']}")
    elif "family" in report:
        from .pipeline import FAMILY_NAMES

        family = FAMILY_NAMES.get(report["family"], str(report["family"]).upper())
        lines.append(f"  family: EasyAnimate {family} ({report.get('description', '')})")
    for name, info in report.get("components", {}).items():
        if "error" in info:
            lines.append(f"  {name}: error: {info['error']}")
            continue
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
            value = report[key]
            if isinstance(value, dict):
                value = ", ".join(f"{k} {v}" for k, v in value.items() if not str(k).startswith("_")) or "none"
            elif isinstance(value, (list, tuple)):
                value = ", ".join(str(v) for v in value)
            elif key == "parameters":
                value = f"{value:,}"
            lines.append(f"  {key}: {value}")
    if "total_bytes" in report:
        lines.append(f"  total size: {report['total_bytes'] / 2**20:.1f} MiB")
    if report.get("generation_defaults"):
        settings = ", ".join(f"{k} {v!r}" if isinstance(v, str) else f"{k} {v}"
                             for k, v in report["generation_defaults"].items() if not str(k).startswith("_"))
        lines.append(f"  generation defaults: {settings}")
    lines.append("  missing: " + ("; ".join(report["missing"]) if report.get("missing") else "nothing"))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ training
def cmd_make_data(args) -> int:
    from .train.synthetic import BASE_SHAPES, SHAPES, write_folder

    weights = {}
    for item in args.weight:
        name, _, number = item.partition("=")
        if not number.isdigit():
            raise ValueError(f"--weight {item!r} is not NAME=N: write a colour or shape and a whole number, "
                             "e.g. --weight green=3.")
        weights[name.strip()] = int(number)
    started = time.time()
    count = write_folder(args.out, args.count, args.seed, frames=args.frames, size=args.size,
                         shapes=SHAPES if args.all_shapes else BASE_SHAPES, force_shape=args.draw_shape,
                         force_colour=args.draw_colour, include_held_out=args.all_shapes, paths=args.paths,
                         weights=weights)
    print(f"wrote {count} clips to {args.out} in {time.time() - started:.0f} s")
    return 0


def _save_every(args) -> dict:
    return {"save_every": args.save_every} if args.save_every else {}


def cmd_train_vae(args) -> int:
    from .train.vae import VAETrainConfig, train_vae

    train_vae(VAETrainConfig(data=args.data, out=args.out, family=args.family, frames=args.frames, steps=args.steps,
                             lr=args.lr, kl_weight=args.kl_weight,
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
    train_text(args.data, args.out, seed=args.seed, vocab_size=args.vocab_size, captions=captions, family=args.family)
    return 0


def cmd_train_dit(args) -> int:
    if args.family == "v51":
        return _train_dit_v51(args)
    if args.sigma_shift != 1.0 or args.end_frame_prob != 0.25:
        raise ValueError("--sigma-shift and --end-frame-prob are options of --family v51 (flow matching)")
    from .train.dit import DiTTrainConfig, train_dit

    folder = train_dit(DiTTrainConfig(data=args.data, vae=args.vae, text=args.text, out=args.out, steps=args.steps,
                                      frames=args.frames or 16, lr=args.lr, warmup=args.warmup, init_from=args.init_from,
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


def _train_dit_v51(args) -> int:
    if args.high_noise_fraction or args.high_noise_from_step or args.mse_weight_cap:
        raise ValueError("--high-noise-fraction, --high-noise-from-step and --mse-weight-cap are options of the V3 "
                         "(DDPM) objective; for --family v51 use --sigma-shift")
    from .train.dit_v51 import FlowDiTTrainConfig, train_dit_v51

    folder = train_dit_v51(FlowDiTTrainConfig(
        data=args.data, vae=args.vae, text=args.text, out=args.out, frames=args.frames or 17, steps=args.steps,
        lr=args.lr, warmup=args.warmup, init_from=args.init_from, video_batch=args.video_batch,
        image_batch=args.image_batch, first_frame_prob=args.first_frame_prob, end_frame_prob=args.end_frame_prob,
        sigma_shift=args.sigma_shift, seed=args.seed, threads=args.threads, stop_at=args.stop_at,
        **_save_every(args)))
    if folder is not None:
        print(f"release folder: {folder}")
    return 0


def cmd_train_lora(args) -> int:
    from .train.lora import LoRATrainConfig, train_lora

    train_lora(LoRATrainConfig(model=args.model, data=args.data, out=args.out, steps=args.steps, rank=args.rank,
                               alpha=args.alpha, lr=args.lr, mse_weight_cap=args.mse_weight_cap,
                               sigma_shift=args.sigma_shift, frames=args.frames, seed=args.seed,
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
    if args.threads is not None:
        torch.set_num_threads(_whole_number(args.threads, "--threads", 1, 1024))
    model_path = Path(args.model) if args.model else demo_model_path()
    defaults = generation_defaults(model_path)
    lora, strength = evaluated_lora(args.lora, args.no_lora, model_path, defaults)
    teacache = {}
    if args.teacache is not None:
        from .loading import detect_family
        from .teacache import resolve

        # refused here, before any video, for a model TeaCache has no coefficients for (V1-V3)
        source = detect_family(model_path)
        config = _mmdit_config(source) if source.family in MMDIT_FAMILIES else source
        teacache = {"teacache": resolve(args.teacache, config)}
    model = load_model(model_path, dtype="fp32")
    total = (48 + (40 if lora else 0)) * args.repeats
    progress = Progress(total, "evaluate")
    table, data = adherence_report(
        model, lora, strength, progress=lambda done, n: progress.update(1), repeats=args.repeats,
        frames=defaults["frames"], height=defaults["height"], width=defaults["width"], steps=defaults["steps"],
        guidance_scale=defaults["guidance_scale"], sampler=defaults["sampler"], **teacache)
    progress.close()
    seeds = f"; prompt set x {args.repeats} seeds" if args.repeats > 1 else ""
    calls = data.get("transformer_calls")
    cache = (f"; TeaCache {args.teacache:g}: {calls['computed']} of {calls['scheduled']} transformer calls computed"
             if calls else "")
    print(f"model {model_path.name}; {defaults['sampler']}, {defaults['steps']} steps, CFG {defaults['guidance_scale']}; "
          f"LoRA {Path(lora).name + f' at {strength}' if lora else 'none'}{seeds}{cache}; {data['seconds']} s")
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(data, indent=2))
    return 0
