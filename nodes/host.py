"""The nodes' host, chosen once: ComfyUI's model management inside ComfyUI, the standalone host outside it.

Both implement the interface of `easyanimate.host` (devices, operations, components and their LoRAs,
placement with a memory estimate, progress and cancel, model folders, precision); the nodes only talk to
`current_host()`.

* Inside ComfyUI (ComfyUI imports its `comfy` package and `folder_paths` before it loads custom nodes)
  the nodes run on `ComfyHost`: every model is a `ModelPatcher` built from `comfy.ops` layers on its
  offload device; `placed` calls `load_models_gpu` with the stage's memory estimate right before compute,
  so ComfyUI can evict other models, load ours partially and stream the rest layer by layer; LoRAs are
  patches on a clone of the patcher. If one of ComfyUI's modules fails to import there, that is an error
  naming it: falling back to the standalone host would put models on the GPU outside ComfyUI's accounting.
* Outside ComfyUI (tests, scripts) the nodes run on `StandaloneHost` with the memory modes of
  `EASYANIMATE_MEMORY_MODE` / `EASYANIMATE_MEMORY_BUDGET_MB` and models under `$EASYANIMATE_MODELS_DIR`.

This is the only module of the pack that imports `comfy` or `folder_paths` (only in `ComfyHost`), besides
`native.py`, the native route's model, which ComfyHost builds for each transformer it wraps.
"""
from __future__ import annotations

import importlib
import os
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch

from ..easyanimate.errors import EasyAnimateError
from ..easyanimate.host import (
    MODELS_DIR_ENV, WEIGHT_SUFFIXES, Component, HostError, MemoryLimits, Placement, StandaloneHost,
    resolve_in_roots, safe_relative_name,
)

MODEL_FOLDER = "easyanimate"  # models/easyanimate: release folders and single files
PACK_ROOT = Path(__file__).resolve().parent.parent

_COMFY_MODULES = ("comfy.model_management", "comfy.model_patcher", "comfy.ops", "comfy.utils", "comfy.lora",
                  "comfy.patcher_extension", "folder_paths")


def inside_comfyui() -> bool:
    """Whether the pack was loaded by ComfyUI (which imports these before any custom node)."""
    return "comfy" in sys.modules or "folder_paths" in sys.modules


_HOST = None


def current_host():
    """The host of this process, chosen at the first call (`select_host`) and kept."""
    global _HOST
    if _HOST is None:
        _HOST = select_host()
    return _HOST


def select_host():
    """ComfyHost inside ComfyUI (an error if ComfyUI's modules cannot be imported), else StandaloneHost."""
    if inside_comfyui():
        return ComfyHost()
    return StandaloneHost(StandaloneHost.FROM_ENVIRONMENT)


# ------------------------------------------------------------------------------------------ ComfyUI
class ComfyHost:
    """The host interface on ComfyUI's model management, folder paths, progress bar and interrupt."""

    name = "comfyui"

    def __init__(self):
        loaded = {}
        for name in _COMFY_MODULES:
            try:
                loaded[name] = importlib.import_module(name)
            except Exception as err:
                raise HostError(
                    f"EasyAnimate runs inside ComfyUI, but ComfyUI's module '{name}' failed to import "
                    f"({type(err).__name__}: {err}). The pack does not fall back to its own device handling inside "
                    "ComfyUI, which would place models outside ComfyUI's memory management. Repair the ComfyUI "
                    "installation (update it and reinstall its requirements), then restart ComfyUI."
                ) from err
        self.mm = loaded["comfy.model_management"]
        self._patcher_module = loaded["comfy.model_patcher"]
        self._ops = loaded["comfy.ops"]
        self._utils = loaded["comfy.utils"]
        self._lora = loaded["comfy.lora"]
        self._callbacks = loaded["comfy.patcher_extension"]
        self._folders = loaded["folder_paths"]
        self._registered: set[str] = set()
        self._install_native_route()

    def _install_native_route(self) -> None:
        """What ComfyUI's own nodes need for the native route (`nodes/native.py`): our LoRA key names in
        `comfy.lora.model_lora_keys_unet`, and the shipped demo LoRAs listed where ComfyUI's LoRA loaders look
        (the demo models' `loras/` folders as extra `loras` paths; nothing is copied)."""
        from . import native

        native.install_lora_key_map(self._lora)
        for demo in demo_models().values():
            if (demo / "loras").is_dir():
                self._folders.add_model_folder_path("loras", str(demo / "loras"))

    # ------------------------------------------------------------------ devices
    @property
    def compute_device(self) -> torch.device:
        return self.mm.get_torch_device()

    @property
    def intermediate_device(self) -> torch.device:
        return self.mm.intermediate_device()

    budget_bytes = None  # ComfyUI's management decides what fits

    def memory_limits(self) -> MemoryLimits:
        """The compute device's total memory (ComfyUI frees and streams the rest) and the RAM available."""
        device = self.compute_device
        ram = self.mm.get_free_memory(torch.device("cpu"))
        if device.type == "cpu":
            return MemoryLimits(device, ram, ram)
        return MemoryLimits(device, self.mm.get_total_memory(device), ram)

    def operations(self):
        """ComfyUI's casting layers: they stream weights that do not fit and skip random initialisation."""
        return self._ops.manual_cast

    def precision(self, choice: str) -> str:
        if choice != "auto":
            return choice
        dtype = self.mm.unet_dtype(self.compute_device, supported_dtypes=[torch.bfloat16, torch.float16, torch.float32])
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")

    # ------------------------------------------------------------------ components
    def wrap(self, module: torch.nn.Module, kind: str) -> Component:
        mm = self.mm
        load, offload = {
            "transformer": (mm.get_torch_device(), mm.unet_offload_device()),
            "vae": (mm.vae_device(), mm.vae_offload_device()),
            "text_encoder": (mm.text_encoder_device(), mm.text_encoder_offload_device()),
            "image_encoder": (mm.text_encoder_device(), mm.text_encoder_offload_device()),
            "multi": (mm.get_torch_device(), mm.unet_offload_device()),
        }[kind]
        if kind == "transformer":
            from . import native

            model = native.native_model(module)  # a ComfyUI MODEL around it, shared by both routes
            if model is not None:
                module.attention_function = native.comfy_attention  # ComfyUI's attention backends
                patcher = self._patcher_module.ModelPatcher(model, load_device=load, offload_device=offload)
                return Component(module, kind, patcher=patcher, key_prefix="diffusion_model.")
        if kind == "text_encoder":
            _use_casting_layers(module, self._ops.manual_cast)
        held = module if _device_is_settable(module) else _Holder(module)
        patcher = self._patcher_module.ModelPatcher(held, load_device=load, offload_device=offload)
        if kind == "text_encoder":
            patcher.add_callback_with_key(self._callbacks.CallbacksMP.ON_LOAD, "easyanimate", _place_uncast_tensors)
        return Component(module, kind, patcher=patcher, key_prefix="" if held is module else "model.")

    weights_tag = ""  # loaded weights are used as they are

    def prepare(self, component: Component) -> Component:
        return component

    def with_lora(self, component: Component, lora, strength: float) -> Component:
        """A clone of the component's patcher with the LoRA's patches: ComfyUI applies them while the model
        is loaded and removes them after, so the loaded weights never change."""
        from ..easyanimate.lora import TEXT_ENCODER, TRANSFORMER, check_lora_strength

        check_lora_strength(strength)
        if strength == 0 or lora.patch_for(component.module) is None:
            return component
        part = TEXT_ENCODER if component.kind == "text_encoder" else TRANSFORMER
        patches = self._lora.load_lora(lora.comfy_state_dict(part), lora.comfy_key_map(part, component.key_prefix),
                                       log_missing=False)
        patcher = component.patcher.clone()
        patcher.add_patches(patches, strength)
        return replace(component, patcher=patcher)

    def placement(self, **components) -> Placement:
        for kind, value in components.items():
            if value is not None and not isinstance(value, Component):
                raise TypeError(f"ComfyUI's host places Components (host.wrap), not a bare {type(value).__name__} ({kind}).")
        return Placement(self, {k: v for k, v in components.items() if v is not None})

    @contextmanager
    def placed(self, components, memory_required: int = 0):
        components = list(components)
        # A VAE is loaded whole: its slices run many convolutions over small inputs, where streaming
        # weights layer by layer would cost more than it saves.
        self.mm.load_models_gpu([c.patcher for c in components], memory_required=int(memory_required),
                                force_full_load=any(c.kind == "vae" for c in components))
        yield

    def unload(self, component: Component) -> None:
        """Take the component's patcher (or a LoRA clone of it) off the compute device now, instead of when
        ComfyUI next needs the room: a text encoder is done once the prompts are encoded, and left loaded it
        would make ComfyUI partially load the transformer that runs next. The weights stay in RAM on the
        patcher's offload device, as an unloaded ComfyUI model's do."""
        loaded = self.mm.current_loaded_models
        for index in reversed(range(len(loaded))):
            patcher = loaded[index].model
            if patcher is not None and patcher.is_clone(component.patcher) and loaded[index].model_unload():
                loaded.pop(index)
        self.mm.soft_empty_cache()

    # ------------------------------------------------------------------ progress
    def progress(self, total: int) -> "ComfyProgress":
        return ComfyProgress(self._utils.ProgressBar(total), self, total)

    def check_interrupt(self) -> None:
        """Raise ComfyUI's interrupt exception if the user pressed Cancel."""
        self.mm.throw_exception_if_processing_interrupted()

    def latent_previewer(self, factors):
        """ComfyUI's latent->RGB previewer with the factors ((C, 3), (3,)) that `factors()` returns, when
        the user has previews on (None otherwise, without calling `factors`)."""
        try:
            import latent_preview
            from comfy.cli_args import LatentPreviewMethod, args
        except Exception:
            return None
        if args.preview_method == LatentPreviewMethod.NoPreviews:
            return None
        weights, bias = factors()
        return latent_preview.Latent2RGBPreviewer(weights.tolist(), bias.tolist())

    # ------------------------------------------------------------------ model folders
    def _register(self, kind: str) -> None:
        """Make `models/<kind>` a model folder (merging into any user configuration)."""
        if kind in self._registered:
            return
        folders = self._folders
        folders.add_model_folder_path(kind, os.path.join(folders.models_dir, kind))
        folders.folder_names_and_paths[kind][1].update(folders.supported_pt_extensions)
        self._registered.add(kind)

    def model_roots(self, kind: str) -> list[Path]:
        self._register(kind)
        return [Path(p) for p in self._folders.get_folder_paths(kind)]

    def list_files(self, kind: str) -> list[str]:
        self._register(kind)
        return sorted(self._folders.get_filename_list(kind))

    def resolve_file(self, kind: str, name: str) -> Path:
        safe_relative_name(name, f"The {kind} name")
        self._register(kind)
        return Path(self._folders.get_full_path_or_raise(kind, name))

    def resolve_folder(self, kind: str, name: str) -> Path:
        return resolve_in_roots(self.model_roots(kind), kind, name, want="folder")

    def resolve_input_file(self, name: str) -> Path:
        return resolve_in_roots([Path(self._folders.get_input_directory())], "input", name, want="file")


class ComfyProgress:
    """ComfyUI's progress bar (with a preview image), checking for Cancel at every update."""

    def __init__(self, bar, host: ComfyHost, total: int):
        self.bar, self.host, self.total = bar, host, total

    def update(self, done: int, total: int | None = None, preview=None) -> None:
        self.host.check_interrupt()
        self.bar.update_absolute(done, total or self.total, preview)


def _device_is_settable(module: torch.nn.Module) -> bool:
    """ModelPatcher records the placement in `module.device`; transformers' models make that a read-only property."""
    return not isinstance(getattr(type(module), "device", None), property)


def _use_casting_layers(module: torch.nn.Module, ops) -> None:
    """Give a model built from plain torch layers (the text encoders: transformers' classes) ComfyUI's casting
    layer classes, which the pack's own models are built from (`operations()`): then, when the model does not fit
    (lowvram), ComfyUI leaves those layers' weights in RAM and casts them per call, where it would otherwise leave
    plain layers behind on the CPU and the forward would fail. The same parameters and, while loaded, the same
    forward; only exact `Linear` / `Embedding` instances are switched (fp8 layers keep their own class)."""
    classes = {torch.nn.Linear: ops.Linear, torch.nn.Embedding: ops.Embedding}
    for layer in module.modules():
        cast_class = classes.get(type(layer))
        if cast_class is not None:
            layer.__class__ = cast_class
            if cast_class is ops.Embedding:
                layer.bias = None  # ComfyUI's Embedding casts a (missing) bias with the weight


def _place_uncast_tensors(patcher, device_to, lowvram_model_memory, force_patch_weights, full_load) -> None:
    """After a partial (lowvram) load: the tensors ComfyUI neither loaded nor casts per call (norm weights of
    plain modules, rotary-embedding buffers of a text encoder) go to the load device too, as other custom models'
    position tables do; they are small. A full load has moved everything already."""
    if not getattr(patcher.model, "model_lowvram", False) or device_to is None:
        return
    for module in patcher.model.modules():
        if hasattr(module, "comfy_cast_weights"):
            continue
        for param in module.parameters(recurse=False):
            param.data = param.data.to(device_to)
        for name, buffer in module.named_buffers(recurse=False):
            setattr(module, name, buffer.to(device_to))


class _Holder(torch.nn.Module):
    """A plain container so ModelPatcher can manage a module whose `device` is a property (its keys gain `model.`)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model


# ------------------------------------------------------------------------------------------ model folders
def demo_folders(subfolder: str, marker: str) -> dict[str, Path]:
    """The demo models shipped inside the pack under `easyanimate/<subfolder>` (folders holding `marker`)."""
    folder = PACK_ROOT / "easyanimate" / subfolder
    if not folder.is_dir():
        return {}
    return {p.name: p for p in sorted(folder.iterdir()) if (p / marker).is_file()}


def list_model_folders(kind: str, demos: dict[str, Path], markers: tuple[str, ...]) -> list[str]:
    """The shipped demo models first, then the folders under the model roots of `kind` that hold one of
    `markers` (e.g. "transformer/config.json")."""
    names = set()
    for root in current_host().model_roots(kind):
        if root.is_dir():
            names |= {p.name for p in root.iterdir() if p.is_dir() and any((p / m).is_file() for m in markers)}
    return list(demos) + sorted(names - set(demos))


def resolve_model_folder(kind: str, name: str, demos: dict[str, Path]) -> Path:
    """A demo model by name, or a folder inside the model roots of `kind` (never outside them)."""
    if name in demos:
        return demos[name]
    host = current_host()
    try:
        return host.resolve_folder(kind, name)
    except FileNotFoundError:
        where = ", ".join(str(r) for r in host.model_roots(kind)) or f"(none: set {MODELS_DIR_ENV})"
        raise FileNotFoundError(f"Model '{name}' not found. Put the model folder in models/{kind} (searched: {where}).") from None


def demo_models() -> dict[str, Path]:
    """The EasyAnimate demo model folder(s) shipped inside the pack (their names contain "demo")."""
    return demo_folders("demo", "transformer/config.json")


def list_models() -> list[str]:
    """EasyAnimate release folders (with transformer/) and transformer folders (with config.json)."""
    return list_model_folders(MODEL_FOLDER, demo_models(), ("transformer/config.json", "config.json"))


def resolve_model(name: str) -> Path:
    return resolve_model_folder(MODEL_FOLDER, name, demo_models())


def list_files(kind: str) -> list[str]:
    """Weight files of a model folder kind ("loras", "easyanimate", "text_encoders"). For models/easyanimate
    the files inside release folders (their transformer/, vae/, ...) are left out: the single files there
    are motion modules and personalized checkpoints."""
    names = [n for n in current_host().list_files(kind) if n.lower().endswith(WEIGHT_SUFFIXES)]
    if kind == MODEL_FOLDER:
        releases = set(list_models())
        names = [n for n in names if n.split("/")[0] not in releases]
    return sorted(set(names))


def resolve_file(kind: str, name: str) -> Path:
    return current_host().resolve_file(kind, name)


def resolve_input_file(name: str) -> Path:
    """A data file a workflow names (a camera pose file): inside ComfyUI a name inside ComfyUI's input folder
    (never outside it, as model names never leave the model folders); standalone (scripts, tests) a path."""
    runtime = current_host()
    if runtime.name == "comfyui":
        return runtime.resolve_input_file(name)
    path = Path(name).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"The file '{name}' does not exist.")
    return path


def precision(choice: str) -> str:
    """The weight dtype name for a node's precision choice ("auto": what the host picks for its device)."""
    return current_host().precision(choice)


def check_interrupt() -> None:
    current_host().check_interrupt()


__all__ = ["ComfyHost", "EasyAnimateError", "HostError", "current_host", "select_host", "inside_comfyui"]
