"""Memory modes for running EasyAnimate outside ComfyUI (inside ComfyUI its own model management decides).

Three small pieces, each usable alone:

* `DeviceManager` moves whole modules between a storage device (CPU RAM) and the compute device and keeps
  its own accounting of what it has put on the compute device (modules, bytes, blocks, and the peaks). A module
  is "loaded" by giving each of its tensors a copy on the compute device; it is "offloaded" by putting the
  stored tensors back. Nothing is copied back (inference does not change weights), so offloading is free
  and a run that stops half-way, for any reason, leaves the model exactly as it was: the same storage
  tensors, bit for bit.
* `BlockSwap` streams the transformer's blocks through the compute device: at most `max_blocks` blocks
  have weights there at any moment; the first `max_blocks - 2` stay, the rest pass through two slots, the
  next block's copy overlapping the current block's compute (a side CUDA stream and pinned storage on a
  GPU; on a CPU the copies are synchronous). The manager refuses a load that would break the limit.
* `to_fp8` stores the transformer's linear weights as float8 e4m3fn with one float32 scale per output
  channel and upcasts each layer's weight to the compute dtype only while that layer runs.

`MemoryOptions` names a mode: whole-model offload ("offload"), block swap ("block-swap"), fp8 weights ("fp8")
or none ("none"), and an optional activation budget (bytes) that lets the transformer split the CFG batch
and the global attention into chunks (same results) and the VAE choose its tile size (`easyanimate.vae`).
The standalone host (`easyanimate.host.StandaloneHost`) applies them stage by stage to a generation;
inside ComfyUI its own model management decides instead.
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import EasyAnimateError

log = logging.getLogger(__name__)

MODES = ("none", "offload", "block-swap", "fp8")
FP8_DTYPE = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0  # largest finite float8 e4m3fn
FP8_UPCAST_BYTES = 64 * 2**20  # the most of one layer's weight upcast at a time


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _owned_tensors(module: nn.Module, skip: Sequence[nn.Module] = ()) -> Iterator[tuple[nn.Module, str, str]]:
    """(owner, "param"/"buffer", name) of every tensor under `module`, leaving out the subtrees in `skip`."""
    skipped = {id(m) for m in skip}
    stack = [module]
    while stack:
        owner = stack.pop()
        if id(owner) in skipped:
            continue
        for name, value in owner._parameters.items():
            if value is not None:
                yield owner, "param", name
        for name, value in owner._buffers.items():
            if value is not None:
                yield owner, "buffer", name
        stack.extend(owner._modules.values())


def _get(owner, kind, name) -> torch.Tensor:
    return owner._parameters[name] if kind == "param" else owner._buffers[name]


def _set(owner, kind, name, tensor: torch.Tensor) -> None:
    if kind == "param":
        owner._parameters[name].data = tensor
    else:
        owner._buffers[name] = tensor


@dataclass
class _Resident:
    module: nn.Module
    moved: list  # [(owner, kind, name, stored tensor)]
    bytes: int
    block: bool
    event: object = None  # CUDA event of an asynchronous copy, waited on before use


class DeviceManager:
    """Places modules on the compute device and takes them back, with its own accounting.

    `storage` holds the weights between uses (normally the CPU); `compute` runs them. When both are the same
    device nothing is copied (the accounting still runs) unless `copy_same_device` asks for real copies,
    which makes a CPU-only run exercise the same data path as a GPU one (the tests use it).
    `max_blocks` caps the blocks (modules loaded with `block=True`) on the compute device at once.
    `listeners` are called as `listener(manager, event, module)` after every load and offload.
    """

    def __init__(self, compute="cpu", storage="cpu", *, copy_same_device: bool = False,
                 max_blocks: int | None = None, pin_memory: bool | None = None):
        self.compute, self.storage = torch.device(compute), torch.device(storage)
        self.copy = copy_same_device or self.compute != self.storage
        self.max_blocks = max_blocks
        self.pin_memory = (self.storage.type == "cpu" and self.compute.type == "cuda") if pin_memory is None else pin_memory
        self.resident: dict[int, _Resident] = {}
        self.listeners: list[Callable] = []
        self.copy_stream = torch.cuda.Stream(self.compute) if self.compute.type == "cuda" else None
        self.peak_blocks = 0
        self.peak_bytes = 0

    # ------------------------------------------------------------------ accounting
    @property
    def resident_blocks(self) -> int:
        return sum(r.block for r in self.resident.values())

    @property
    def resident_bytes(self) -> int:
        """Bytes of weights this manager has put on the compute device."""
        return sum(r.bytes for r in self.resident.values())

    def is_resident(self, module: nn.Module) -> bool:
        return id(module) in self.resident

    def _notify(self, event: str, module: nn.Module) -> None:
        self.peak_blocks = max(self.peak_blocks, self.resident_blocks)
        self.peak_bytes = max(self.peak_bytes, self.resident_bytes)
        for listener in self.listeners:
            listener(self, event, module)

    # ------------------------------------------------------------------ moving
    def pin(self, module: nn.Module, skip: Sequence[nn.Module] = ()) -> None:
        """Put the stored CPU tensors of `module` in pinned memory so copies to a GPU can be asynchronous."""
        if not self.pin_memory:
            return
        for owner, kind, name in _owned_tensors(module, skip):
            t = _get(owner, kind, name)
            if t.device.type == "cpu" and not t.is_pinned():
                _set(owner, kind, name, t.data.pin_memory() if kind == "param" else t.pin_memory())

    def load(self, module: nn.Module, *, block: bool = False, skip: Sequence[nn.Module] = (),
             asynchronous: bool = False) -> None:
        """Give every tensor of `module` (except those under `skip`) a copy on the compute device.

        `asynchronous` copies on the side stream (CUDA); `wait(module)` must run before the module is used.
        """
        if self.is_resident(module):
            return
        if block and self.max_blocks is not None and self.resident_blocks + 1 > self.max_blocks:
            raise EasyAnimateError(
                f"Loading another block would put {self.resident_blocks + 1} blocks on {self.compute}; "
                f"the limit is {self.max_blocks}."
            )
        moved, size = [], 0
        stream = self.copy_stream if asynchronous and self.copy_stream is not None else None
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            for owner, kind, name in _owned_tensors(module, skip):
                stored = _get(owner, kind, name)
                stored = stored.data if kind == "param" else stored
                size += tensor_bytes(stored)
                if self.copy:
                    copy = stored.to(self.compute, non_blocking=stream is not None, copy=True)
                    _set(owner, kind, name, copy)
                moved.append((owner, kind, name, stored))
            event = None
            if stream is not None:
                event = torch.cuda.Event()
                event.record(stream)
        self.resident[id(module)] = _Resident(module, moved, size, block, event)
        self._notify("load", module)

    def wait(self, module: nn.Module) -> None:
        """Make the compute stream wait for an asynchronous load of `module`."""
        entry = self.resident.get(id(module))
        if entry is None or entry.event is None:
            return
        current = torch.cuda.current_stream(self.compute)
        current.wait_event(entry.event)
        # The copies were made on the side stream and are used on this one: keep the allocator from
        # reusing their memory before this stream is done with them.
        for owner, kind, name, _ in entry.moved:
            _get(owner, kind, name).record_stream(current)
        entry.event = None

    def offload(self, module: nn.Module) -> None:
        """Put the stored tensors back; the compute copies are dropped (nothing is copied back)."""
        entry = self.resident.pop(id(module), None)
        if entry is None:
            return
        if entry.event is not None:  # loaded but never used: the copy must finish before it is dropped
            entry.event.synchronize()
        for owner, kind, name, stored in entry.moved:
            _set(owner, kind, name, stored)
        self._notify("offload", module)

    def offload_all(self) -> None:
        for entry in list(self.resident.values()):
            self.offload(entry.module)

    @contextmanager
    def placed(self, module: nn.Module, skip: Sequence[nn.Module] = ()):
        """`module` on the compute device for the duration of the block, back in storage afterwards."""
        already = self.is_resident(module)
        self.load(module, skip=skip)
        try:
            yield module
        finally:
            if not already:
                self.offload(module)


class BlockSwap:
    """Run a module with its `blocks` streamed through the compute device, at most `max_blocks` at once.

        with BlockSwap(manager, transformer, transformer.transformer_blocks, max_blocks=4):
            out = transformer(...)

    Everything outside the blocks is loaded for the whole `with`. The first `max_blocks - 2` blocks stay on
    the compute device (all of them when they fit); the others are loaded right before they run and
    offloaded right after, the next one's copy starting while the current one computes (`max_blocks` >= 2).
    Leaving the `with`, normally or through an exception, puts every stored tensor back.
    """

    def __init__(self, manager: DeviceManager, model: nn.Module, blocks: Sequence[nn.Module], max_blocks: int):
        if max_blocks < 1:
            raise EasyAnimateError(f"Block swap needs at least one block on the compute device; got {max_blocks}.")
        self.manager, self.model, self.blocks = manager, model, list(blocks)
        self.max_blocks = min(max_blocks, len(self.blocks))
        self.prefetch = self.max_blocks >= 2 and self.max_blocks < len(self.blocks)
        kept = self.max_blocks if self.max_blocks == len(self.blocks) else self.max_blocks - (2 if self.prefetch else 1)
        self.kept = self.blocks[:kept]
        self.streamed = self.blocks[kept:]
        self._hooks = []
        self._previous_limit = None

    def __enter__(self):
        manager = self.manager
        self._previous_limit = manager.max_blocks
        manager.max_blocks = self.max_blocks if manager.max_blocks is None else min(manager.max_blocks, self.max_blocks)
        try:
            for block in self.streamed:
                manager.pin(block)
            manager.load(self.model, skip=self.blocks)
            for block in self.kept:
                manager.load(block, block=True)
            index = {id(b): i for i, b in enumerate(self.blocks)}
            for block in self.blocks:
                self._hooks.append(block.register_forward_pre_hook(lambda m, args, i=index[id(block)]: self._before(i)))
                self._hooks.append(block.register_forward_hook(lambda m, args, out, i=index[id(block)]: self._after(i)))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self.manager.copy_stream is not None:
            self.manager.copy_stream.synchronize()
        for block in self.blocks:
            self.manager.offload(block)
        self.manager.offload(self.model)
        self.manager.max_blocks = self._previous_limit
        return False

    def _is_streamed(self, i: int) -> bool:
        return i >= len(self.kept)

    def _before(self, i: int) -> None:
        block = self.blocks[i]
        self.manager.load(block, block=True)  # a no-op when kept or prefetched
        self.manager.wait(block)
        if self.prefetch and i + 1 < len(self.blocks) and self._is_streamed(i + 1):
            self.manager.load(self.blocks[i + 1], block=True, asynchronous=True)

    def _after(self, i: int) -> None:
        if not self._is_streamed(i):
            return
        self.manager.offload(self.blocks[i])
        if self.prefetch and i == len(self.blocks) - 1:
            # The next forward (next step, or the other half of a chunked CFG batch) starts with this one.
            self.manager.load(self.streamed[0], block=True, asynchronous=True)


# ---------------------------------------------------------------------------------------------- fp8
class Fp8Linear(nn.Linear):
    """A Linear whose weight is stored as float8 e4m3fn times a float32 scale per output channel
    (`weight_scale`, shape (out_features, 1)).

    The forward upcasts the weight to the input's dtype for this one layer, so only one layer's weight
    exists in full precision at a time. Still an `nn.Linear` (LoRA name matching and ComfyUI-style code keep
    working); LoRAs apply in "hooks" mode.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = max(1, FP8_UPCAST_BYTES // (self.in_features * x.element_size()))
        if rows >= self.out_features:
            return F.linear(x, self._upcast(0, self.out_features, x.dtype), self._bias(0, self.out_features, x.dtype))
        # A large layer (the V3 CLIP projection is 9216 x 9216) is upcast a block of output rows at a time.
        out = x.new_empty(*x.shape[:-1], self.out_features)
        for start in range(0, self.out_features, rows):
            stop = min(start + rows, self.out_features)
            out[..., start:stop] = F.linear(x, self._upcast(start, stop, x.dtype), self._bias(start, stop, x.dtype))
        return out

    def _upcast(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        weight = self.weight[start:stop].to(dtype)
        return weight.mul_(self.weight_scale[start:stop].to(dtype))

    def _bias(self, start: int, stop: int, dtype: torch.dtype):
        return None if self.bias is None else self.bias[start:stop].to(dtype)


def fp8_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 e4m3fn tensor, float32 scales (rows, 1)) with weight ~= q.float() * scale; each row's scale
    maps its largest magnitude to the format's largest finite value. (e4m3 keeps 3 mantissa bits whatever
    the scale; a scale per row keeps small rows out of the subnormal range, which matters for trained
    weights: on the demo model it takes the forward's error from 4.2e-2 to 2.9e-2.)"""
    if FP8_DTYPE is None:
        raise EasyAnimateError("This torch has no float8_e4m3fn dtype; fp8 weights need torch >= 2.1.")
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    return (w / scale).to(FP8_DTYPE), scale


def to_fp8(model: nn.Module, *, skip: Callable[[str, nn.Linear], bool] | None = None) -> dict:
    """Convert the model's `nn.Linear` weights to float8 e4m3fn storage in place (biases and every other
    tensor keep their dtype). Returns {"layers": n, "bytes_before": b, "bytes_after": a}."""
    layers = before = after = 0
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear:  # plain torch layers only (not comfy.ops, not already converted)
            continue
        if skip is not None and skip(name, module):
            continue
        q, scale = fp8_quantize(module.weight)
        before += tensor_bytes(module.weight)
        module.weight = nn.Parameter(q, requires_grad=False)
        module.register_buffer("weight_scale", scale.to(q.device))
        module.__class__ = Fp8Linear
        after += tensor_bytes(q) + tensor_bytes(scale)
        layers += 1
    if layers:
        release_freed_memory()
    return {"layers": layers, "bytes_before": before, "bytes_after": after}


def release_freed_memory() -> None:
    """Hand memory freed inside the C heap back to the system (glibc's `malloc_trim`; elsewhere nothing).
    Without it, e.g., the float32 weights that `to_fp8` replaced could stay resident as free heap."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@lru_cache(maxsize=None)
def _malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


# ---------------------------------------------------------------------------------------------- options
@dataclass
class MemoryOptions:
    """A memory mode, the block-swap size and an activation budget (MiB), as the command line takes them."""

    mode: str = "none"
    swap_blocks: int = 4
    budget_mb: float | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise EasyAnimateError(f"Unknown memory mode '{self.mode}'; use one of {', '.join(MODES)}.")
        if self.swap_blocks < 1:
            raise EasyAnimateError(f"--swap-blocks must be at least 1; got {self.swap_blocks}.")
        if self.budget_mb is not None and not (math.isfinite(self.budget_mb) and self.budget_mb > 0):
            raise EasyAnimateError(f"The memory budget (--memory-budget) must be a positive number of MiB; got {self.budget_mb}.")

    @property
    def budget_bytes(self) -> int | None:
        return None if self.budget_mb is None else int(self.budget_mb * 2**20)

    @property
    def streams_weights(self) -> bool:
        """Whether the models live in storage and visit the compute device per stage."""
        return self.mode in ("offload", "block-swap")


@contextmanager
def transformer_budget(transformer: nn.Module, budget_bytes: int | None):
    """Let `transformer` chunk its CFG batch and global attention to fit `budget_bytes` for the block."""
    previous = getattr(transformer, "memory_budget", None)
    transformer.memory_budget = budget_bytes
    try:
        yield transformer
    finally:
        transformer.memory_budget = previous
