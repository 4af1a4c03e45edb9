"""What every training loop here shares: threads and seeds, a progress bar, a per-step loss log,
resumable checkpoints, the learning-rate schedule, and writing weights in the release layout.

A run directory holds:
    checkpoint.pt   model + optimiser + EMA + step + RNG states (written every `save_every` steps and
                    at the end; a restarted run with the same directory resumes from it)
    loss.jsonl      one JSON line per logged step: {"step", "loss", ...terms, "lr", "seconds"}
"""
from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch


def setup(seed: int, threads: int | None = None) -> torch.Generator:
    """Seed python, torch (and numpy); cap torch's threads so a shared machine stays usable."""
    import numpy as np

    if threads:
        torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def subfolder_or_self(folder, sub: str) -> Path:
    """`folder/sub` when it exists (a run or release folder holding e.g. vae/), else `folder` itself."""
    folder = Path(folder)
    return folder / sub if (folder / sub).is_dir() else folder


def start_run(cfg) -> tuple[Path, torch.Generator]:
    """Seed and cap threads from a training config (a dataclass with seed, threads, out), create its run
    folder and record the config there. Returns (run folder, seeded generator)."""
    from dataclasses import asdict

    generator = setup(cfg.seed, cfg.threads)
    run = Path(cfg.out)
    run.mkdir(parents=True, exist_ok=True)
    (run / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
    return run, generator


class Progress:
    """A one-line text progress bar on stderr (no dependency): `  37% |#####     | 370/1000 loss 0.12 2.1 it/s`."""

    def __init__(self, total: int, desc: str = "", start: int = 0, stream=None, enabled: bool = True):
        self.total, self.done, self.desc = total, start, desc
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.started = time.time()
        self.first = start
        self.last_draw = 0.0

    def update(self, n: int = 1, **info) -> None:
        self.done += n
        now = time.time()
        if self.enabled and (now - self.last_draw > 0.2 or self.done >= self.total):
            self.last_draw = now
            self._draw(info)

    def _draw(self, info: dict) -> None:
        frac = self.done / max(self.total, 1)
        bar = "#" * int(frac * 20)
        rate = (self.done - self.first) / max(time.time() - self.started, 1e-9)
        extra = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items())
        left = (self.total - self.done) / rate if rate > 0 else 0
        self.stream.write(f"\r{self.desc} {frac:4.0%} |{bar:<20}| {self.done}/{self.total} {extra} "
                          f"{rate:.2f} it/s, {left:.0f} s left ")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


class LossLog:
    """Appends one JSON line per step to `run_dir/loss.jsonl` and prints every `print_every`-th one."""

    def __init__(self, run_dir: Path, print_every: int = 50, quiet: bool = False, resume_step: int = 0):
        self.path = Path(run_dir) / "loss.jsonl"
        self.print_every, self.quiet = print_every, quiet
        self.started = time.time()
        # A resumed run repeats the steps after its checkpoint: drop their old lines so each step is logged once.
        if self.path.is_file():
            rows = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(row + "\n" for row in rows))

    def write(self, step: int, **terms) -> None:
        row = {"step": step, **{k: (round(float(v), 6) if isinstance(v, (float, int, torch.Tensor)) else v)
                                 for k, v in terms.items()}, "seconds": round(time.time() - self.started, 1)}
        with open(self.path, "a") as out:
            out.write(json.dumps(row) + "\n")
        if not self.quiet and step % self.print_every == 0:
            text = " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items())
            print(text, flush=True)


def read_loss_log(run_dir) -> list[dict]:
    path = Path(run_dir) / "loss.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def warmup_cosine(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up to `peak`, then a cosine down to `floor * peak` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


# ------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(run_dir, step: int, model, optimizer, ema=None, extra: dict | None = None) -> Path:
    """Atomically write everything needed to continue: a crash mid-write leaves the old checkpoint."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        "extra": extra or {},
    }
    tmp = run_dir / "checkpoint.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, run_dir / "checkpoint.pt")
    return run_dir / "checkpoint.pt"


def load_checkpoint(run_dir, model, optimizer, ema=None) -> tuple[int, dict]:
    """Restore a run; returns (step to continue from, extra). (0, {}) when the run has no checkpoint."""
    path = Path(run_dir) / "checkpoint.pt"
    if not path.is_file():
        return 0, {}
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if ema is not None and state.get("ema") is not None:
        ema.load_state_dict(state["ema"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    return int(state["step"]), state.get("extra", {})


class EMA:
    """Exponential moving average of a model's trainable weights (what gets shipped)."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # short warm-up: early weights are forgotten fast
        for key, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                self.shadow[key].mul_(decay).add_(value.detach(), alpha=1 - decay)
            else:
                self.shadow[key].copy_(value)

    def state_dict(self) -> dict:
        return self.shadow

    def load_state_dict(self, state: dict) -> None:
        self.shadow = {k: v.clone() for k, v in state.items()}


# ------------------------------------------------------------------------------------ release layout
def save_weights(folder, state_dict: dict, config: dict, dtype: torch.dtype = torch.float16,
                 weights_name: str = "diffusion_pytorch_model.safetensors", config_name: str = "config.json") -> Path:
    """Write `config.json` + one safetensors file, floating tensors cast to `dtype` (fp16 keeps the demo small)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(folder / weights_name), metadata={"format": "pt"})
    (folder / config_name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
