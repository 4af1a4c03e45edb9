"""LoRA training for the EasyAnimate transformer, in the EasyAnimate (kohya) file format (docs/numerics.md#key-names).

    python -m easyanimate train-lora --model RELEASE --data DATA --out RUN --steps 600

The base transformer is frozen; each adapted `Linear` gets a low-rank bypass

    y = W x + (alpha / rank) * up(down(x))        down: Kaiming-uniform, up: zeros (starts as a no-op)

trained with the same objective and batches as the transformer itself: the V3 DDPM objective
(`easyanimate.train.dit`) or, for a V5.1 release (told by its transformer), flow matching
(`easyanimate.train.dit_v51`).
Adapted layers: V3, every Linear inside the transformer blocks, motion modules included (the V2/V3 scripts
set `add_lora_in_attn_temporal`), and `proj_out`; V5.1, every Linear of the transformer, as the V5.1
training code wraps them (timestep and text projections, both streams of every block, `norm_out`,
`proj_out`), with the original layout's names (`attn2`, `txt_ff`). The file holds, per layer,
`lora_unet__<module path with . as _>.lora_down.weight (rank, in)`, `.lora_up.weight (out, rank)` and
`.alpha`: the names the reference's training code writes (its root module has an empty name, hence
the double underscore), so `easyanimate.lora` and the reference's `merge_lora` both read it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

from .common import load_checkpoint, start_run

PREFIX = "lora_unet"


class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable low-rank bypass."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.rank, self.alpha = rank, alpha
        self.lora_down = nn.Linear(base.in_features, rank, bias=False)
        self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)

    def forward(self, x):
        return self.base(x) + self.lora_up(self.lora_down(x)) * (self.alpha / self.rank)


def lora_targets(model: nn.Module) -> list[str]:
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if _family(model) in ("v5", "v51"):
        return linears
    return [name for name in linears if name.startswith("transformer_blocks.") or name == "proj_out"]


def _family(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "family", None)


def add_lora(model: nn.Module, rank: int, alpha: float) -> dict[str, LoRALinear]:
    """Replace each target Linear by a `LoRALinear`; returns {module path: wrapper}."""
    model.requires_grad_(False)
    wrappers = {}
    for name in lora_targets(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapper = LoRALinear(getattr(parent, child), rank, alpha)
        setattr(parent, child, wrapper)
        wrappers[name] = wrapper
    return wrappers


def lora_state_dict(wrappers: dict[str, LoRALinear], dtype=torch.float16) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, wrapper in wrappers.items():
        key = f"{PREFIX}_.{name}".replace(".", "_")  # "lora_unet" + "." + "" + "." + path, dots -> "_"
        tensors[f"{key}.lora_down.weight"] = wrapper.lora_down.weight.detach().to(dtype).contiguous()
        tensors[f"{key}.lora_up.weight"] = wrapper.lora_up.weight.detach().to(dtype).contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(float(wrapper.alpha), dtype=dtype)
    return tensors


@dataclass
class LoRATrainConfig:
    model: str  # the release folder to adapt
    data: str
    out: str
    steps: int = 600
    rank: int = 8
    alpha: float = 8.0
    video_batch: int = 16
    image_batch: int = 32
    image_every: int = 4
    lr: float = 1e-3
    warmup: int = 50
    text_dropout: float = 0.1
    first_frame_prob: float = 0.5
    mse_weight_cap: float = 0.0  # V3, as in DiTTrainConfig: > 0 weights the noisy steps, where colour and layout form
    sigma_shift: float = 1.0  # V5.1, as in FlowDiTTrainConfig: > 1 samples more noisy steps
    end_frame_prob: float = 0.25  # V5.1: share of the image-to-video samples that keep the last frame too
    frames: int | None = None  # None: 16 for a V3 release, 17 for V5.1
    seed: int = 0
    threads: int = 2
    save_every: int = 100
    print_every: int = 50
    stop_at: int | None = None  # end this run after that step (a time-boxed part of a longer run; resume later)
    name: str = "lora.safetensors"


def train_lora(cfg: LoRATrainConfig) -> Path:
    """Train (or resume) a LoRA on a data folder; writes `<out>/<name>` and returns its path."""
    from safetensors.torch import save_file

    from ..loading import load_transformer
    from .dit import cached_latents, run_diffusion_training

    model = load_transformer(cfg.model, dtype="fp32")
    flow = _family(model) == "v51"
    if _family(model) == "v5":
        raise ValueError("LoRA training covers V1-V3 (DDPM) and V5.1 (flow matching) releases; V5 is neither")
    if not flow and cfg.sigma_shift != 1.0:
        raise ValueError("sigma_shift is an option of the V5.1 (flow matching) objective")
    if flow and cfg.mse_weight_cap:
        raise ValueError("mse_weight_cap is an option of the V3 (DDPM) objective; for V5.1 use sigma_shift")
    cfg = replace(cfg, frames=cfg.frames or (17 if flow else 16))
    run, _ = start_run(cfg)
    objective = None
    if flow:
        from .dit_v51 import cached_flow_latents, flow_objective

        cache = cached_flow_latents(run, cfg.data, Path(cfg.model) / "vae", cfg.model, cfg.frames, cfg.seed)
        objective = flow_objective(cache, cfg)
    else:
        cache = cached_latents(run, cfg.data, cfg.model, cfg.model, cfg.frames, cfg.seed)

    wrappers = add_lora(model, cfg.rank, cfg.alpha)
    model.train()
    trainable = [p for w in wrappers.values() for p in (w.lora_down.weight, w.lora_up.weight)]
    for p in trainable:
        p.requires_grad_(True)
    print(f"LoRA: {len(wrappers)} layers, rank {cfg.rank}, {sum(p.numel() for p in trainable):,} parameters", flush=True)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    start, _ = load_checkpoint(run, model, optimizer)
    if not run_diffusion_training(model, optimizer, cache, cfg, run, start, "lora", objective=objective):
        return None
    path = run / cfg.name
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(cfg.rank), "ss_network_alpha": str(cfg.alpha),
                "ss_base_model": Path(cfg.model).name, "ss_steps": str(cfg.steps), "easyanimate_format": "lora_unet"}
    save_file(lora_state_dict(wrappers), str(path), metadata=metadata)
    print(f"wrote {path}", flush=True)
    return path
