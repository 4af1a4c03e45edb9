"""Where models run: the host interface, and the host for running without ComfyUI.

Every runtime the pack runs in answers the same few questions through one small interface, a *host*:

  devices         `compute_device` (where models compute and their inputs go) and `intermediate_device`
                  (where results between steps and nodes are kept);
  operations      `operations()`, the layer classes models are built from (`torch.nn`, or a host's layers
                  that cast and stream weights);
  components      `wrap(module, kind)` turns a loaded model into a `Component` the host can place;
                  `with_lora(component, lora, strength)` returns a new component that also carries a LoRA
                  and shares the weights (the loaded weights never change);
  placement       `placed(components, memory_required)` puts components on the compute device for a block
                  of work that needs about `memory_required` bytes of activations (each model class
                  estimates its own: `activation_bytes`); `placement(...)` binds one generation's
                  components so the pipeline can place them stage by stage;
  progress        `progress(total)`, a progress report that also notices a cancel; `check_interrupt()`;
  model folders   `model_roots(kind)`, `list_files(kind)`, `resolve_file(kind, name)`,
                  `resolve_folder(kind, name)`: names are resolved inside the roots and never escape them;
  precision       `precision(choice)`: the weight dtype for "auto" on this host.

Two hosts implement it: `StandaloneHost` here (the command line, the Python API, the tests, and the
nodes when they run outside ComfyUI) and ComfyUI's host in `nodes/host.py`, the only code that imports
ComfyUI. The nodes pick one of them once (`nodes.host.current_host`). See docs/architecture.md.
"""
from __future__ import annotations

import os
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path, PurePath
from typing import Iterable, Optional

import torch
import torch.nn as nn

from .errors import EasyAnimateError
from .memory import BlockSwap, DeviceManager, MemoryOptions, to_fp8, transformer_budget

KINDS = ("transformer", "vae", "text_encoder", "image_encoder", "multi")
WEIGHT_SUFFIXES = (".safetensors", ".sft", ".pt", ".pth", ".bin", ".ckpt")

# Standalone: a models folder laid out like ComfyUI's (easyanimate/, loras/, multi/, text_encoders/).
MODELS_DIR_ENV = "EASYANIMATE_MODELS_DIR"
# Standalone nodes: the memory modes of `easyanimate.memory`, from the environment.
MEMORY_MODE_ENV = "EASYANIMATE_MEMORY_MODE"
MEMORY_BUDGET_ENV = "EASYANIMATE_MEMORY_BUDGET_MB"


class HostError(EasyAnimateError):
    """The runtime around the pack is not usable (e.g. ComfyUI's modules fail to import inside ComfyUI)."""


@dataclass(frozen=True)
class Component:
    """One model the host places: `module` and what the host needs to place it.

    `kind` is one of KINDS. A standalone host keeps the LoRAs to apply while placed in `loras`
    ((ResolvedLoRA, strength) pairs); ComfyUI's host keeps the model's `patcher` (LoRAs are its patches)
    and the prefix its state-dict keys have in the patcher (`key_prefix`).
    """

    module: nn.Module
    kind: str
    loras: tuple = ()
    patcher: object = None
    key_prefix: str = ""


class Placement:
    """One generation's components, placed by a host one stage at a time.

        placement = host.placement(transformer=..., vae=..., image_encoder=...)
        with placement.stage("vae", vae.activation_bytes(...)):
            latents = vae.encode_latents(pixels.to(placement.device))

    A stage whose kind has no component (e.g. no image encoder) places nothing.
    """

    def __init__(self, host, components: dict[str, Component]):
        self.host = host
        self.components = components

    @property
    def device(self) -> torch.device:
        return self.host.compute_device

    @property
    def budget_bytes(self) -> Optional[int]:
        """The activation budget the models should keep to (standalone memory budget), or None."""
        return getattr(self.host, "budget_bytes", None)

    def check_memory(self, estimate: "MemoryEstimate", what: str = "This request") -> None:
        """Refuse `estimate` if it cannot fit this host's device and RAM (or its memory budget)."""
        check_memory(estimate, self.host.memory_limits(), self.budget_bytes, what)

    def stage(self, kind: str, memory_required: int = 0):
        component = self.components.get(kind)
        if component is None:
            return nullcontext()
        return self.host.placed([component], memory_required)


@dataclass(frozen=True)
class _FixedDevice:
    """A host that places nothing: the models are wherever their owner put them."""

    compute_device: torch.device
    budget_bytes: Optional[int] = None

    def memory_limits(self) -> "MemoryLimits":
        ram = available_ram()
        if self.compute_device.type == "cuda":
            return MemoryLimits(self.compute_device, torch.cuda.mem_get_info(self.compute_device)[1], ram)
        return MemoryLimits(self.compute_device, ram if self.compute_device.type == "cpu" else None, ram)


def fixed_device(device) -> _FixedDevice:
    """For a `Placement` that moves no model and sends inputs to `device`."""
    return _FixedDevice(torch.device(device))


class StandaloneHost:
    """The host without ComfyUI: one compute device, the memory modes of `easyanimate.memory`, LoRAs
    applied while a model is placed, model folders under `$EASYANIMATE_MODELS_DIR`.

    `memory` is a `MemoryOptions` (none / offload / block-swap / fp8, and a budget), or
    `StandaloneHost.FROM_ENVIRONMENT` to read `EASYANIMATE_MEMORY_MODE` (`offload`, `block-swap:N`, `fp8`)
    and `EASYANIMATE_MEMORY_BUDGET_MB` at each use (what the nodes do outside ComfyUI).
    With mode "none" a placed model is moved to the compute device and stays there; the streaming modes
    keep weights in `storage` and give the compute device copies for the duration of a stage only, so a
    stopped run leaves every weight exactly where and as it was.
    """

    name = "standalone"
    FROM_ENVIRONMENT = "environment"

    def __init__(self, memory: MemoryOptions | str | None = None, compute=None, storage="cpu", *,
                 manager: DeviceManager | None = None, models_dir=None, memory_limit: int | None = None):
        if compute is None:
            compute = manager.compute if manager is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        self._memory = memory
        self.manager = manager or DeviceManager(compute, storage)
        self._models_dir = models_dir
        self._memory_limit = memory_limit  # bytes a request may use (tests set it low); None: measured
        self.fp8_report: dict = {}

    # ------------------------------------------------------------------ devices and memory options
    @property
    def compute_device(self) -> torch.device:
        return self.manager.compute

    @property
    def intermediate_device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def memory(self) -> MemoryOptions:
        if self._memory == self.FROM_ENVIRONMENT:
            return memory_options_from_environment()
        return self._memory or MemoryOptions()

    @property
    def budget_bytes(self) -> Optional[int]:
        return self.memory.budget_bytes

    def operations(self):
        return nn

    def memory_limits(self) -> "MemoryLimits":
        """What a request may use: the compute device's memory and the CPU RAM available now."""
        if self._memory_limit is not None:
            return MemoryLimits(self.compute_device, self._memory_limit, self._memory_limit)
        ram = available_ram()
        if self.compute_device.type == "cuda":
            return MemoryLimits(self.compute_device, torch.cuda.mem_get_info(self.compute_device)[1], ram)
        return MemoryLimits(self.compute_device, ram, ram)

    def precision(self, choice: str) -> str:
        """"auto": bf16 on a GPU that supports it (else fp16), fp32 on the CPU."""
        if choice != "auto":
            return choice
        if self.compute_device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"

    # ------------------------------------------------------------------ components
    def wrap(self, module: nn.Module, kind: str) -> Component:
        _check_kind(kind)
        return Component(module, kind)

    @property
    def weights_tag(self) -> str:
        """What `prepare` does to loaded weights ("fp8" or ""): loaders cache models per tag."""
        return "fp8" if self.memory.mode == "fp8" else ""

    def prepare(self, component: Component) -> Component:
        """Whatever a memory mode does once to a loaded model (fp8: store the transformer's linear weights
        as float8)."""
        if component.kind == "transformer" and self.memory.mode == "fp8":
            self.fp8_report = to_fp8(component.module)
        return component

    def with_lora(self, component: Component, lora, strength: float) -> Component:
        """A component that applies `lora` (a ResolvedLoRA) at `strength` while placed; 0 changes nothing."""
        from .lora import check_lora_strength

        check_lora_strength(strength)
        if strength == 0:
            return component
        return replace(component, loras=component.loras + ((lora, float(strength)),))

    def placement(self, **components) -> Placement:
        """Bind a generation's models (Components, or plain modules, wrapped under their keyword's kind)."""
        bound = {}
        for kind, value in components.items():
            if value is None:
                continue
            bound[kind] = value if isinstance(value, Component) else self.wrap(value, kind)
        return Placement(self, bound)

    @contextmanager
    def placed(self, components: Iterable[Component], memory_required: int = 0):
        """The components on the compute device (with their LoRAs) for the duration of the block."""
        options = self.memory
        with ExitStack() as stack:
            for component in components:
                module = component.module
                if options.streams_weights:
                    # LoRAs first, on the stored weights; the compute device then gets copies of the result.
                    stack.enter_context(self._loras(component, options))
                    if options.mode == "block-swap" and component.kind == "transformer":
                        stack.enter_context(BlockSwap(self.manager, module, module.transformer_blocks,
                                                      options.swap_blocks))
                    else:
                        stack.enter_context(self.manager.placed(module))
                else:
                    module.to(self.compute_device)
                    stack.enter_context(self._loras(component, options))
                if component.kind == "transformer" and options.budget_bytes is not None:
                    stack.enter_context(transformer_budget(module, options.budget_bytes))
            yield

    @staticmethod
    def _loras(component: Component, options: MemoryOptions):
        if not component.loras:
            return nullcontext()
        from .lora import lora_patches

        # fp8 weights cannot hold a merged LoRA: it is computed beside the layer instead.
        mode = "hooks" if options.mode == "fp8" else "weights"
        return lora_patches(component.module, component.loras, mode=mode)

    def place_all(self, modules: Iterable[nn.Module]) -> None:
        """Get loaded models ready before a run: mode "none" moves them to the compute device; the
        streaming modes leave them in storage (pinned, for asynchronous copies to a GPU)."""
        for module in modules:
            if module is None:
                continue
            if self.memory.streams_weights:
                self.manager.pin(module)
            else:
                module.to(self.compute_device)

    # ------------------------------------------------------------------ progress
    def progress(self, total: int) -> "Progress":
        return Progress(total, self)

    def check_interrupt(self) -> None:
        """Nothing to check: standalone runs are stopped by Ctrl-C or a progress callback returning False."""

    def latent_previewer(self, factors):
        """No previews without ComfyUI's UI (`factors` is not called)."""
        return None

    # ------------------------------------------------------------------ model folders
    def model_roots(self, kind: str) -> list[Path]:
        if self._models_dir is not None:
            return [Path(self._models_dir) / kind]
        env = os.environ.get(MODELS_DIR_ENV)
        return [Path(p) / kind for p in env.split(os.pathsep) if p] if env else []

    def list_files(self, kind: str) -> list[str]:
        names = set()
        for root in self.model_roots(kind):
            if root.is_dir():
                names |= {p.relative_to(root).as_posix() for p in root.rglob("*")
                          if p.is_file() and p.suffix in WEIGHT_SUFFIXES}
        return sorted(names)

    def resolve_file(self, kind: str, name: str) -> Path:
        return resolve_in_roots(self.model_roots(kind), kind, name, want="file")

    def resolve_folder(self, kind: str, name: str) -> Path:
        return resolve_in_roots(self.model_roots(kind), kind, name, want="folder")


class Progress:
    """Progress of a run: `update(done, total, preview)` records it and asks the host whether to stop
    (`check_interrupt` raises then); standalone nothing is drawn."""

    def __init__(self, total: int, host=None):
        self.total, self.done, self.host = total, 0, host

    def update(self, done: int, total: Optional[int] = None, preview=None) -> None:
        if self.host is not None:
            self.host.check_interrupt()
        self.done = done
        self.total = total or self.total


# ---------------------------------------------------------------------------------------- memory of a request
@dataclass(frozen=True)
class MemoryLimits:
    """What a request may use: `device` memory (its total, for a GPU; what is available, for the CPU) and
    CPU RAM available (None: unknown). On a CPU both are one pool."""

    device: torch.device
    device_bytes: Optional[int]
    ram_bytes: Optional[int]


@dataclass
class MemoryEstimate:
    """What a request needs beyond the weights, by part: on the compute device at its peak (`compute`),
    in CPU RAM (`ram`: pixels of the conditioning and the decoded video), the part of `compute` no chunking
    or tiling can avoid (`compute_minimum`), and the part a memory budget must cover (`budget_minimum`:
    the denoising stage in its smallest chunks; the VAE takes its smallest tiles under any budget)."""

    compute: dict
    ram: dict
    compute_minimum: int
    budget_minimum: int

    @property
    def compute_bytes(self) -> int:
        return sum(self.compute.values())

    @property
    def ram_bytes(self) -> int:
        return sum(self.ram.values())

    def describe(self, parts: dict) -> str:
        return ", ".join(f"{name} {_gib(size)}" for name, size in sorted(parts.items(), key=lambda kv: -kv[1]) if size)


def _gib(size: float) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**27 else f"{size / 2**20:.2f} MiB"


def check_memory(estimate: MemoryEstimate, limits: MemoryLimits, budget_bytes: Optional[int] = None,
                 what: str = "This request") -> None:
    """Refuse a request that cannot fit, before anything is allocated, with the estimate and the limit.

    On the CPU, compute and RAM are one pool: the whole estimate must fit the memory available. On a GPU the
    part no chunking can avoid must fit its memory (the estimate has margin, so a larger one may still run)
    and the pixels must fit the RAM available. A memory budget must cover the unavoidable part too.
    """
    hint = "Use fewer frames or a smaller size"
    shared = limits.device.type == "cpu"
    if shared and limits.ram_bytes is not None:
        need = estimate.compute_bytes + estimate.ram_bytes
        if need > limits.ram_bytes:
            raise EasyAnimateError(
                f"{what} needs about {_gib(need)} of memory ({estimate.describe({**estimate.compute, **estimate.ram})}), "
                f"but {_gib(limits.ram_bytes)} is available. {hint}."
            )
    else:
        if limits.device_bytes is not None and estimate.compute_minimum > limits.device_bytes:
            raise EasyAnimateError(
                f"{what} needs at least {_gib(estimate.compute_minimum)} on {limits.device} "
                f"({estimate.describe(estimate.compute)}), which has {_gib(limits.device_bytes)}. {hint}."
            )
        if limits.ram_bytes is not None and estimate.ram_bytes > limits.ram_bytes:
            raise EasyAnimateError(
                f"{what} needs about {_gib(estimate.ram_bytes)} of RAM ({estimate.describe(estimate.ram)}), but "
                f"{_gib(limits.ram_bytes)} is available. {hint}."
            )
    if budget_bytes is not None and estimate.budget_minimum > budget_bytes:
        raise EasyAnimateError(
            f"{what} needs at least {_gib(estimate.budget_minimum)} of working memory even in the smallest chunks, "
            f"over the memory budget of {_gib(budget_bytes)}. {hint}, or raise the budget."
        )


def available_ram() -> Optional[int]:
    """CPU RAM available to a new allocation (Linux: MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:
        return None


# ---------------------------------------------------------------------------------------- helpers
def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"Unknown component kind '{kind}'; one of {', '.join(KINDS)}.")


def memory_options_from_environment() -> MemoryOptions:
    """`EASYANIMATE_MEMORY_MODE` = none | offload | block-swap[:N] | fp8 and `EASYANIMATE_MEMORY_BUDGET_MB`."""
    mode = os.environ.get(MEMORY_MODE_ENV, "").strip()
    budget = os.environ.get(MEMORY_BUDGET_ENV, "").strip()
    name, _, blocks = mode.partition(":")
    try:
        swap_blocks = int(blocks) if blocks else 4
        budget_mb = float(budget) if budget else None
    except ValueError:
        raise EasyAnimateError(
            f"{MEMORY_MODE_ENV}={mode!r} / {MEMORY_BUDGET_ENV}={budget!r}: use e.g. 'block-swap:8' and a number of MiB."
        ) from None
    return MemoryOptions(name or "none", swap_blocks, budget_mb)


def safe_relative_name(name: str, what: str = "name") -> PurePath:
    """`name` as a relative path that stays inside the folder it is looked up in; refuses absolute
    paths, drive letters, `..` parts and empty names (a name from a workflow could be anything)."""
    text = str(name).replace("\\", "/")
    path = PurePath(text)
    if not text.strip() or path.is_absolute() or text.startswith("/") or ":" in path.parts[0] \
            or any(part in ("..", "") for part in text.split("/")) or "\x00" in text:
        raise EasyAnimateError(
            f"{what} {name!r} is not a name inside the model folders: use a name as the list shows it "
            "(relative, without '..'); put the model into a model folder instead of pointing outside it."
        )
    return path


def resolve_in_roots(roots: list[Path], kind: str, name: str, want: str) -> Path:
    """The file or folder `name` inside one of `roots`, refusing names that would leave them."""
    relative = safe_relative_name(name, f"The {kind} name")
    for root in roots:
        candidate = root / relative
        if (want == "file" and candidate.is_file()) or (want == "folder" and candidate.is_dir()):
            return candidate
    where = ", ".join(str(r) for r in roots) or f"(no model folder: set {MODELS_DIR_ENV})"
    raise FileNotFoundError(f"'{name}' was not found in the {kind} folders: {where}.")
