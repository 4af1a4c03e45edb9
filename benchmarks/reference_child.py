"""The reference side of a side-by-side benchmark run (see reference_compare.py).

`dit` and `vae` run in the environment of the original EasyAnimate V3 code, whose checkout `--src` is put
first on the import path (this repository's package, also named `easyanimate`, is not importable here);
`mmdit` and `vae5` run in an environment with diffusers (>= 0.33) and need no checkout. Each loads the
weights a benchmark wrote with the reference's loader, runs what our child runs on the inputs written
beside them, saves the output and prints one JSON line:

    dit   Transformer3DModel.from_pretrained_2d(folder, transformer_additional_kwargs={}); one warm-up
          forward and `--repeats` timed ones under torch.inference_mode(), called as the original
          pipeline calls it
    vae   AutoencoderKLMagvit.from_pretrained(folder); `--latents` / scaling_factor decoded by `vae.decode`
          under torch.no_grad() (what the original pipeline's decode_latents runs before its optional
          smoothing), after a warm-up decode of the first latents
    mmdit EasyAnimateTransformer3DModel.from_pretrained(folder) (diffusers layout, float32); every weight page
          read once (resident), one small warm-up forward, then `--repeats` timed forwards under
          torch.inference_mode() on the folder's inputs.safetensors; the peak is counted from just before them
    vae5  AutoencoderKLMagvit.from_pretrained(folder) (diffusers layout, float32); `--latents` / scaling_factor
          decoded by `vae.decode` under torch.no_grad() after a warm-up decode of the first latents
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import sys
import time
from pathlib import Path

from process_memory import OtherLoad, reset_peak, status_kib


def _release_freed_memory() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _load_common(args):
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    return torch, status_kib("VmRSS") * 1024


def dit(args) -> dict:
    torch, base = _load_common(args)
    from safetensors.torch import load_file, save_file

    from easyanimate.models.transformer3d import Transformer3DModel

    start = time.perf_counter()
    model = Transformer3DModel.from_pretrained_2d(str(args.folder), transformer_additional_kwargs={})
    model.eval().requires_grad_(False)
    load_s = time.perf_counter() - start
    gc.collect()
    _release_freed_memory()
    built, load_peak = status_kib("VmRSS") * 1024, status_kib("VmHWM") * 1024
    x = load_file(str(args.folder / "inputs.safetensors"))
    call = dict(
        hidden_states=x["x"], inpaint_latents=x["inpaint_latents"], encoder_hidden_states=x["encoder_hidden_states"],
        encoder_attention_mask=x["encoder_attention_mask"], timestep=x["timestep"],
        clip_encoder_hidden_states=x["clip_encoder_hidden_states"], clip_attention_mask=x["clip_attention_mask"],
        added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False,
    )
    reset = reset_peak()
    times = []
    with torch.inference_mode():
        for i in range(args.repeats + 1):  # the first is the warm-up
            if i == 1:
                load = OtherLoad()
            start = time.perf_counter()
            out = model(**call)[0]
            times.append(time.perf_counter() - start)
    save_file({"out": out.contiguous()}, str(args.out))
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "base_rss": base, "built_rss": built, "load_peak": load_peak, "load_s": load_s,
        "peak_rss": status_kib("VmHWM") * 1024, "peak_reset": reset,
        "median_s": statistics.median(times[1:]), "warmup_s": times[0], "runs": len(times) - 1,
        "other_load": load.cores(),
    }


def timed_decode(torch, model, z, warm: int):
    """A diffusers-style VAE's `decode(z).sample`, after a warm-up on the first `warm` latents (kernels per shape,
    thread pools: not decode memory) and with freed heap given back: (out, VmRSS before in KiB, whether the peak
    counter was reset, seconds, VmHWM in KiB, other processes' cores)."""
    with torch.no_grad():
        model.decode(z[:, :, :warm]).sample
        gc.collect()
        _release_freed_memory()
        before = status_kib("VmRSS")
        reset = reset_peak()
        load, start = OtherLoad(), time.perf_counter()
        out = model.decode(z).sample
        seconds, other = time.perf_counter() - start, load.cores()
        peak = status_kib("VmHWM")
    return out, before, reset, seconds, peak, other


def vae(args) -> dict:
    torch, base = _load_common(args)
    from safetensors.torch import load_file, save_file

    from easyanimate.models.autoencoder_magvit import AutoencoderKLMagvit

    model = AutoencoderKLMagvit.from_pretrained(str(args.folder))
    model.eval().requires_grad_(False)
    data = load_file(str(args.latents))
    z = data["latents"] * (1 / model.config.scaling_factor)
    out, before, reset, seconds, peak, other = timed_decode(torch, model, z, int(data["warm"]))
    output_bytes = out.numel() * out.element_size()
    save_file({"out": out.contiguous()}, str(args.out))
    return {
        "base_rss": base, "before_rss": before * 1024, "peak_rss": peak * 1024, "peak_reset": reset,
        "output_mib": output_bytes / 2**20, "peak_beyond_output_mib": ((peak - before) * 1024 - output_bytes) / 2**20,
        "median_s": seconds, "runs": 1, "other_load": other,
    }


def make_resident(model) -> None:
    """Read one value of every 4 KiB page of every parameter and buffer, so a loader that maps the weights file
    and one that copies it both hold the whole model in RAM before anything is measured."""
    import torch

    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.numel():
                flat = t.detach().reshape(-1)
                flat[:: max(1, 4096 // t.element_size())].float().sum()


def vae5(args) -> dict:
    torch, base = _load_common(args)
    from safetensors.torch import load_file, save_file

    import diffusers
    from diffusers import AutoencoderKLMagvit

    model = AutoencoderKLMagvit.from_pretrained(str(args.folder), torch_dtype=torch.float32)
    model.eval().requires_grad_(False)
    data = load_file(str(args.latents))
    z = data["latents"] * (1 / model.config.scaling_factor)
    out, before, reset, seconds, peak, other = timed_decode(torch, model, z, int(data["warm"]))
    output_bytes = out.numel() * out.element_size()
    save_file({"out": out.contiguous()}, str(args.out))
    return {
        "implementation": f"diffusers {diffusers.__version__}", "base_rss": base, "before_rss": before * 1024,
        "peak_rss": peak * 1024, "peak_reset": reset, "output_mib": output_bytes / 2**20,
        "peak_beyond_output_mib": ((peak - before) * 1024 - output_bytes) / 2**20, "median_s": seconds, "runs": 1,
        "other_load": other, "frames": int(out.shape[2]),
        "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }


def mmdit(args) -> dict:
    torch, base = _load_common(args)
    from safetensors.torch import load_file, save_file

    from diffusers import EasyAnimateTransformer3DModel

    start = time.perf_counter()
    model = EasyAnimateTransformer3DModel.from_pretrained(str(args.folder), torch_dtype=torch.float32)
    model.eval().requires_grad_(False)
    load_s = time.perf_counter() - start
    load_peak = status_kib("VmHWM") * 1024
    make_resident(model)
    x = load_file(str(args.folder / "inputs.safetensors"))
    call = lambda prefix: dict(  # noqa: E731
        hidden_states=x[prefix + "x"], timestep=x[prefix + "timestep"],
        encoder_hidden_states=x[prefix + "encoder_hidden_states"], return_dict=False)
    with torch.inference_mode():
        model(**call("warm_"))  # thread pools, kernels: once per process, not the forward's cost
    gc.collect()
    _release_freed_memory()
    before = status_kib("VmRSS") * 1024
    reset = reset_peak()
    times = []
    with torch.inference_mode():
        load = OtherLoad()
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = model(**call(""))[0]
            times.append(time.perf_counter() - start)
        other = load.cores()
    peak = status_kib("VmHWM") * 1024
    save_file({"out": out.contiguous()}, str(args.out))
    import diffusers

    return {
        "implementation": f"diffusers {diffusers.__version__}",
        "params": sum(p.numel() for p in model.parameters()),
        "weights_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "base_rss": base, "load_peak": load_peak, "load_s": load_s, "before_rss": before, "peak_rss": peak,
        "peak_reset": reset, "activation_bytes": peak - before, "median_s": statistics.median(times),
        "runs": len(times), "other_load": other,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["dit", "vae", "mmdit", "vae5"])
    parser.add_argument("--src", type=Path, default=None,
                        help="checkout of the original EasyAnimate code (dit, vae; not for diffusers' mmdit, vae5)")
    parser.add_argument("--folder", type=Path, required=True, help="weights (release layout) and inputs")
    parser.add_argument("--latents", type=Path, default=None, help="vae: the latents (and the warm-up length)")
    parser.add_argument("--out", type=Path, required=True, help="where to save the output (safetensors)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's choice)")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args(argv)
    if args.what in ("dit", "vae"):
        if args.src is None:
            parser.error(f"{args.what} needs --src (the original EasyAnimate checkout)")
        sys.path.insert(0, str(args.src.resolve()))
    result = {"dit": dit, "vae": vae, "mmdit": mmdit, "vae5": vae5}[args.what](args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
