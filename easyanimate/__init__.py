"""EasyAnimate model core: transformer, VAEs, text encoding, samplers, LoRA, loading.

Self-contained (torch, transformers, safetensors, einops); no ComfyUI, no diffusers. Importing the
package is cheap: submodules are imported on first use of the names below.
"""
import importlib

__version__ = "0.1.0"

_LAZY = {
    "load_transformer": "loading",
    "detect_family": "loading",
    "EasyAnimateTransformer3D": "models.transformer",
    "TransformerConfig": "models.transformer",
    "load_vae": "vae",
    "build_vae": "vae",
    "VideoVAE": "vae",
    "Tiling": "vae",
    "frame_rule": "frames",
    "load_text_encoder": "text",
    "load_image_encoder": "image_encoder",
    "build_sampler": "sampling",
    "denoise": "sampling",
    "SAMPLER_NAMES": "sampling",
    "SamplingCancelled": "sampling",
    "read_lora": "lora",
    "resolve_lora": "lora",
    "lora_patches": "lora",
    "LoRAStack": "lora",
    "Conditioning": "pipeline",
    "generate": "pipeline",
}


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
