"""Where the nodes meet their host: ComfyUI's model management when it is there, a small device manager
when it is not.

Inside ComfyUI every model component (transformer, VAE, text encoder) is wrapped in a `ModelPatcher` that
lives on the offload device; `place()` calls `load_models_gpu` right before compute with a memory estimate,
so ComfyUI can stream weights of layers built from `comfy.ops`, evict other models, and apply LoRA patches
without touching the base weights. Outside ComfyUI (tests, scripts) the same node code runs on one device
(CUDA when available, else CPU), with LoRAs applied by the core's `lora_patches` for the duration of a call.

Outside ComfyUI only, the core's memory modes can be switched on for the nodes through the environment:
`EASYANIMATE_MEMORY_MODE` = none | offload | block-swap[:N] | fp8 and `EASYANIMATE_MEMORY_BUDGET_MB`
(see `easyanimate.memory`). Inside ComfyUI they are ignored: ComfyUI's own management decides.

This is the only module of the pack that imports `comfy`/`folder_paths`, and only inside functions.
"""
from __future__ import annotations

import os
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

MODEL_FOLDER = "easyanimate"  # models/easyanimate: release folders and single files
# Standalone: a models folder laid out like ComfyUI's (easyanimate/, loras/, text_encoders/).
MODELS_DIR_ENV = "EASYANIMATE_MODELS_DIR"
# Standalone only: the core's memory modes for the nodes (ignored inside ComfyUI).
MEMORY_MODE_ENV = "EASYANIMATE_MEMORY_MODE"
MEMORY_BUDGET_ENV = "EASYANIMATE_MEMORY_BUDGET_MB"


def comfy_modules():
    """ComfyUI's modules when the pack runs inside ComfyUI, else None."""
    try:
        import comfy.model_management as model_management
        import comfy.model_patcher as model_patcher
        import comfy.ops as ops
        import comfy.utils as utils
        import folder_paths
    except Exception:  # not inside ComfyUI (or a broken install): run standalone
        return None
    return model_management, model_patcher, ops, utils, folder_paths


def in_comfyui() -> bool:
    return comfy_modules() is not None


# ------------------------------------------------------------------------------------------ devices
def compute_device() -> torch.device:
    comfy = comfy_modules()
    if comfy:
        return comfy[0].get_torch_device()
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def intermediate_device() -> torch.device:
    comfy = comfy_modules()
    return comfy[0].intermediate_device() if comfy else torch.device("cpu")


def operations():
    """Layer classes for building models: ComfyUI's casting layers (streamable, no random init) or torch.nn."""
    comfy = comfy_modules()
    return comfy[2].manual_cast if comfy else torch.nn


def standalone_memory_plan():
    """The core `MemoryPlan` the nodes use outside ComfyUI, from the environment; None inside ComfyUI or when
    neither variable is set."""
    mode = os.environ.get(MEMORY_MODE_ENV, "").strip()
    budget = os.environ.get(MEMORY_BUDGET_ENV, "").strip()
    if (not mode and not budget) or in_comfyui():
        return None
    from ..easyanimate.memory import MemoryOptions, MemoryPlan

    name, _, blocks = mode.partition(":")
    options = MemoryOptions(name or "none", int(blocks) if blocks else 4, float(budget) if budget else None)
    return MemoryPlan(options, compute=compute_device(), storage="cpu")


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception if the user pressed Cancel (no-op standalone)."""
    comfy = comfy_modules()
    if comfy:
        comfy[0].throw_exception_if_processing_interrupted()


# ------------------------------------------------------------------------------------------ models
class Component:
    """One model component placed for compute by the host.

    `module` is the torch module; in ComfyUI `patcher` is its ModelPatcher. `loras` are the standalone
    LoRA stack [(ResolvedLoRA, strength)] applied while placed (in ComfyUI they are patcher patches).
    Components are immutable from the outside: `with_lora` returns a new one sharing the module.
    """

    def __init__(self, module: torch.nn.Module, kind: str, patcher=None, loras: tuple = ()):
        self.module, self.kind, self.patcher, self.loras = module, kind, patcher, tuple(loras)

    @classmethod
    def wrap(cls, module: torch.nn.Module, kind: str) -> "Component":
        comfy = comfy_modules()
        if not comfy:
            return cls(module, kind)
        mm, model_patcher = comfy[0], comfy[1]
        patched = module if _device_is_settable(module) else _Holder(module)
        load, offload = {
            "transformer": (mm.get_torch_device(), mm.unet_offload_device()),
            "vae": (mm.vae_device(), mm.vae_offload_device()),
            "text_encoder": (mm.text_encoder_device(), mm.text_encoder_offload_device()),
            "multi": (mm.get_torch_device(), mm.unet_offload_device()),
        }[kind]
        return cls(module, kind, model_patcher.ModelPatcher(patched, load_device=load, offload_device=offload))

    def with_lora(self, resolved, strength: float, part: str) -> "Component":
        if strength == 0:
            return self
        if self.patcher is None:
            return Component(self.module, self.kind, None, self.loras + ((resolved, strength),))
        import comfy.lora

        patcher = self.patcher.clone()
        patches = comfy.lora.load_lora(resolved.comfy_state_dict(part), resolved.comfy_key_map(part), log_missing=False)
        patcher.add_patches(patches, strength)
        return Component(self.module, self.kind, patcher)

    @contextmanager
    def placed(self, memory_required: int = 0, others: tuple["Component", ...] = (), plan=None, load: bool = True):
        """The module (with this component's LoRAs) on the compute device for the duration of the block.

        Standalone, a streaming `plan` (`standalone_memory_plan()`) puts the modules back in CPU RAM after
        the block, and `load=False` leaves their placement to the plan altogether (block swap)."""
        comfy = comfy_modules()
        components = (self,) + tuple(others)
        if comfy:
            comfy[0].load_models_gpu([c.patcher for c in components], memory_required=memory_required,
                                     force_full_load=self.kind == "vae")
            yield self.module
            return
        from ..easyanimate.lora import lora_patches

        device = compute_device()
        streaming = plan is not None and plan.options.streams_weights
        with ExitStack() as stack:
            for component in components:
                if not streaming:
                    component.module.to(device)
                elif load:  # whole-model offload: on the device for this block only
                    stack.enter_context(plan.manager.placed(component.module))
                if component.loras:
                    # On the fly: no copy of the adapted weights is made (ComfyUI patches in place instead).
                    stack.enter_context(lora_patches(component.module, component.loras, mode="hooks"))
            yield self.module


def _device_is_settable(module: torch.nn.Module) -> bool:
    """ModelPatcher records the placement in `module.device`; transformers' models make that a read-only property."""
    return not isinstance(getattr(type(module), "device", None), property)


class _Holder(torch.nn.Module):
    """A plain container so ModelPatcher can manage a module whose `device` is a property (its keys gain `model.`)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model


def transformer_memory_estimate(transformer, latent_shape, cfg: bool) -> int:
    """Bytes of activations one denoising step needs, for `load_models_gpu` to make room.

    Dominated by the per-block token activations (feed-forward 4x width) and, for V3's global attention,
    the attention of all tokens of a clip (memory-efficient kernels keep it linear in tokens).
    """
    b, _, f, h, w = latent_shape
    p = transformer.config.patch_size
    tokens = (2 if cfg else 1) * b * f * (h // p) * (w // p)
    width = transformer.config.hidden_size
    element = torch.finfo(transformer.dtype).bits // 8
    return int(tokens * width * element * 12)


def vae_memory_estimate(latent_shape, element_size: int = 4) -> int:
    """Bytes a slice decode needs: a few full-resolution activations of the widest stage of one slice."""
    b, _, _, h, w = latent_shape
    return int(b * 8 * (h * 8) * (w * 8) * 128 * element_size * 6)


# ------------------------------------------------------------------------------------------ progress
class Progress:
    """A progress bar in ComfyUI (which also checks for interrupts), nothing standalone."""

    def __init__(self, total: int):
        comfy = comfy_modules()
        self.bar = comfy[3].ProgressBar(total) if comfy else None
        self.total = total

    def update(self, done: int, total: int | None = None, preview=None) -> None:
        check_interrupt()
        if self.bar is not None:
            self.bar.update_absolute(done, total or self.total, preview)


def latent_previewer(vae_handle):
    """ComfyUI's latent->RGB previewer with factors fitted to this VAE, when the user has previews on."""
    comfy = comfy_modules()
    if not comfy:
        return None
    try:
        import latent_preview
        from comfy.cli_args import LatentPreviewMethod, args
    except Exception:
        return None
    if args.preview_method == LatentPreviewMethod.NoPreviews:
        return None
    cache = vae_handle.preview_cache
    if "factors" not in cache:
        with vae_handle.component.placed():
            cache["factors"] = vae_handle.vae.latent_rgb_factors()
    factors, bias = cache["factors"]
    return latent_preview.Latent2RGBPreviewer(factors.tolist(), bias.tolist())


# ------------------------------------------------------------------------------------------ files
def register_model_folders(kind: str = MODEL_FOLDER) -> None:
    """Make `models/<kind>` a model folder (merging into any user configuration)."""
    comfy = comfy_modules()
    if not comfy:
        return
    folder_paths = comfy[4]
    folder_paths.add_model_folder_path(kind, os.path.join(folder_paths.models_dir, kind))
    extensions = folder_paths.folder_names_and_paths[kind][1]
    extensions.update(folder_paths.supported_pt_extensions)


def _standalone_folders(kind: str) -> list[Path]:
    env = os.environ.get(MODELS_DIR_ENV)
    return [Path(p) / kind for p in env.split(os.pathsep)] if env else []


def model_roots(kind: str = MODEL_FOLDER) -> list[Path]:
    """The folders that hold models of `kind`: ComfyUI's models/<kind> paths, or standalone
    `$EASYANIMATE_MODELS_DIR/<kind>`."""
    comfy = comfy_modules()
    if comfy:
        register_model_folders(kind)
        return [Path(p) for p in comfy[4].get_folder_paths(kind)]
    return _standalone_folders(kind)


def list_models() -> list[str]:
    """The shipped demo model(s) first, then release folders (with transformer/) and transformer folders
    (with config.json) under the model roots."""
    names = set()
    for root in model_roots():
        if not root.is_dir():
            continue
        for entry in root.iterdir():
            if entry.is_dir() and ((entry / "transformer" / "config.json").is_file() or (entry / "config.json").is_file()):
                names.add(entry.name)
    return list(demo_models()) + sorted(names - set(demo_models()))


def list_files(kind: str) -> list[str]:
    """Files of a ComfyUI model folder kind ("loras", "easyanimate", "text_encoders").

    For models/easyanimate, the files inside release folders (their transformer/, vae/, ...) are left out:
    the single files there are motion modules and personalized checkpoints.
    """
    comfy = comfy_modules()
    if comfy:
        if kind == MODEL_FOLDER:
            register_model_folders()
        names = list(comfy[4].get_filename_list(kind))
    else:
        names = []
        for folder in _standalone_folders(kind):
            if folder.is_dir():
                names += [str(p.relative_to(folder)).replace(os.sep, "/") for p in folder.rglob("*")
                          if p.suffix in (".safetensors", ".sft", ".pt", ".pth", ".bin", ".ckpt")]
    if kind == MODEL_FOLDER:
        releases = set(list_models())
        names = [n for n in names if n.split("/")[0] not in releases]
    return sorted(set(names))


def demo_models() -> dict[str, Path]:
    """The demo model folder(s) shipped inside the pack (their names contain "demo")."""
    folder = Path(__file__).resolve().parent.parent / "easyanimate" / "demo"
    if not folder.is_dir():
        return {}
    return {p.name: p for p in sorted(folder.iterdir()) if (p / "transformer" / "config.json").is_file()}


def resolve_model(name: str) -> Path:
    demos = demo_models()
    if name in demos:
        return demos[name]
    for root in model_roots():
        if (root / name).exists():
            return root / name
    where = ", ".join(str(r) for r in model_roots()) or f"(none: set {MODELS_DIR_ENV})"
    raise FileNotFoundError(f"EasyAnimate model '{name}' not found in {where}.")


def resolve_file(kind: str, name: str) -> Path:
    comfy = comfy_modules()
    if comfy:
        return Path(comfy[4].get_full_path_or_raise(kind, name))
    for folder in _standalone_folders(kind):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"'{name}' not found in the {kind} folders.")
