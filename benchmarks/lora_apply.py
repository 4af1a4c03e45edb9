"""Memory and time of applying a LoRA in each mode of `easyanimate.lora.lora_patches`.

Each mode runs in a fresh process on a random V3-layout transformer of the released width (hidden 1152,
bf16 by default) with a rank-128 LoRA on every Linear (motion modules and U-ViT skips included), the
shape of the released EasyAnimate LoRAs. Memory is the process's anonymous resident memory (RssAnon,
sampled every millisecond), measured from a base taken after model and LoRA are in memory and after one
warm-up forward pass without LoRA:

  enter peak = high-water mark while entering the block (applying the LoRA)
  held       = memory held while the block is open, before any forward pass
  fwd peak   = high-water mark of one forward pass inside the block (held + activations + per-layer work);
               compare with "base fwd peak", the same forward pass without LoRA
  after      = what stays allocated after the block is left (0: nothing is kept)

"target MB" is the size of the weights of the adapted layers: a mode that kept a second copy of the
model would show held/peak of at least the model size. glibc's malloc is told to return large blocks at
once (MALLOC_MMAP_THRESHOLD_) so that freed tensors do not linger in the figures.

    python benchmarks/lora_apply.py               # 4 blocks at full width, bf16 (about 0.5 GB of weights)
    python benchmarks/lora_apply.py --smoke       # tiny, seconds
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_CHILD = r"""
import json, sys, threading, time
sys.path.insert(0, {root!r})
import torch
from easyanimate.lora import lora_patches, read_lora, resolve_lora
from easyanimate.models.transformer import EasyAnimateTransformer3D, TransformerConfig, family_preset

torch.manual_seed(0)
dtype = {{"fp32": torch.float32, "bf16": torch.bfloat16}}[{dtype!r}]
raw = dict(family_preset("v3"), num_layers={layers}, in_channels=4)
raw["num_attention_heads"] = {heads} or raw["num_attention_heads"]
raw["cross_attention_dim"] = raw["num_attention_heads"] * raw["attention_head_dim"]
model = EasyAnimateTransformer3D(TransformerConfig.from_dict(raw, "v3"), dtype=dtype).eval()
lora_sd = {{}}
for name, module in model.named_modules():
    if isinstance(module, torch.nn.Linear):
        stem = "lora_unet__" + name.replace(".", "_")
        lora_sd[stem + ".lora_down.weight"] = torch.randn({rank}, module.in_features, dtype=dtype) * 0.01
        lora_sd[stem + ".lora_up.weight"] = torch.randn(module.out_features, {rank}, dtype=dtype) * 0.01
        lora_sd[stem + ".alpha"] = torch.tensor({rank} / 2)
resolved = resolve_lora(read_lora(lora_sd, name="bench"), model)
targets = [model.get_submodule(n).weight for n in resolved.transformer.layers]
x = torch.randn(1, 4, 4, 16, 16, dtype=dtype)
call = dict(x=x, timestep=torch.tensor([500.0]), encoder_hidden_states=torch.randn(1, 12, raw["caption_channels"], dtype=dtype),
            encoder_attention_mask=torch.ones(1, 12, dtype=torch.long))

def rss():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(fields["RssAnon"].split()[0]) * 1024


def watch():
    stop = threading.Event()
    high = [rss()]
    def sample():
        while not stop.is_set():
            high[0] = max(high[0], rss())
            time.sleep(0.001)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    def done():
        stop.set(); thread.join()
        return max(high[0], rss()) - base
    return done

with torch.no_grad():
    model(**call)  # warm-up
    base = rss()
    done = watch()
    t0 = time.perf_counter(); model(**call); base_forward = time.perf_counter() - t0
    base_forward_peak = done()
    base = rss()
    done = watch()
    t0 = time.perf_counter()
    with lora_patches(model, [(resolved, 0.8)], mode={mode!r}):
        t_enter = time.perf_counter() - t0
        enter_peak = done()
        held = rss() - base
        done = watch()
        t0 = time.perf_counter(); model(**call); t_forward = time.perf_counter() - t0
        forward_peak = done()
        t0 = time.perf_counter()
    t_exit = time.perf_counter() - t0
    after = rss() - base
print(json.dumps(dict(
    model_bytes=sum(p.nbytes for p in model.parameters()), target_bytes=sum(w.nbytes for w in targets),
    lora_bytes=sum(t.nbytes for t in lora_sd.values()), layers=len(targets),
    held=held, enter_peak=enter_peak, forward_peak=forward_peak, base_forward_peak=base_forward_peak, after=after,
    enter_s=t_enter, forward_s=t_forward, exit_s=t_exit, base_forward_s=base_forward)))
"""


def measure(mode: str, dtype: str, heads: int, layers: int, rank: int) -> dict:
    code = _CHILD.format(root=str(ROOT), mode=mode, dtype=dtype, heads=heads, layers=layers, rank=rank)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"benchmark child for mode {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(smoke: bool = False, dtype: str = "bf16", layers: int = 4) -> list[dict]:
    heads, rank = (4, 8) if smoke else (0, 128)  # 0: the released 16 heads x 72 = hidden 1152
    layers = 2 if smoke else layers
    return [dict(mode=mode, dtype=dtype, **measure(mode, dtype, heads, layers, rank))
            for mode in ("weights", "hooks")]


def print_table(rows: list[dict]) -> None:
    mb = 2**20
    r0 = rows[0]
    print(f"model {r0['model_bytes'] / mb:.1f} MB ({r0['dtype']}), LoRA {r0['lora_bytes'] / mb:.1f} MB on "
          f"{r0['layers']} layers, target layers {r0['target_bytes'] / mb:.1f} MB; "
          f"one forward without LoRA: peak {r0['base_forward_peak'] / mb:.1f} MB, {r0['base_forward_s']:.3f} s")
    print(f"{'mode':<10}{'enter peak MB':>14}{'held MB':>9}{'fwd peak MB':>13}{'after MB':>10}"
          f"{'held/target':>13}{'enter s':>9}{'forward s':>11}{'exit s':>8}")
    for r in rows:
        print(f"{r['mode']:<10}{r['enter_peak'] / mb:>14.1f}{r['held'] / mb:>9.1f}{r['forward_peak'] / mb:>13.1f}"
              f"{r['after'] / mb:>10.1f}{r['held'] / r['target_bytes']:>13.2f}{r['enter_s']:>9.3f}"
              f"{r['forward_s']:>11.3f}{r['exit_s']:>8.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    print_table(run(args.smoke, args.dtype, args.layers))


if __name__ == "__main__":
    main()
