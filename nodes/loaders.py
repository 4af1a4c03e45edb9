"""Loader nodes: an EasyAnimate release (transformer, VAE, T5) and LoRAs."""
from __future__ import annotations

import logging
import weakref
from pathlib import Path


from . import host
from .handles import MODEL, T5, VAE, LazyComponent, ModelHandle, ReleasedAfterUse, T5Handle, VAEHandle

log = logging.getLogger(__name__)

CATEGORY = "EasyAnimate"
PRECISIONS = ["auto", "bf16", "fp16", "fp32"]
NONE = "none"

# Loaded models by what was loaded. Weak values: an entry lives only as long as some workflow output holds
# the model handle (which holds its VAE and T5 handles), so this never keeps a model in memory on its own.
_LOADED: "weakref.WeakValueDictionary[tuple, ModelHandle]" = weakref.WeakValueDictionary()


def _signature(path: Path) -> tuple:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files)


class LoadEasyAnimate:
    DESCRIPTION = (
        "Loads an EasyAnimate release folder from models/easyanimate (or the demo model shipped with the pack): "
        "the transformer, the VAE and (on first use) the text encoder. V1–V3: T5 (encode with T5 Encode); V5.1: "
        "Qwen2-VL, V5: Bert + mT5 (encode with Text Encode V5/V5.1). V5/V5.1 folders load in the original and the "
        "-diffusers layout. V1: pick the PixArt-alpha base and its motion-module file."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (MODEL, VAE, T5)
    RETURN_NAMES = ("model", "vae", "t5")
    OUTPUT_TOOLTIPS = (
        "The diffusion transformer (V1–V3: with its motion modules; V5/V5.1: the MMDiT).",
        "The video VAE (V3: the slice VAE; V5/V5.1: the causal VAE with 16 latent channels).",
        "The release's text encoder, loaded when a prompt is first encoded: T5 (V1–V3, for T5 Encode), Qwen2-VL "
        "(V5.1) or Bert + mT5 (V5) (for Text Encode V5/V5.1, which frees it after encoding).",
    )
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        models = host.list_models() or ["(put EasyAnimate folders in models/easyanimate)"]
        files = [NONE] + host.list_files(host.MODEL_FOLDER)
        return {
            "required": {
                "model": (models, {"tooltip": "A release folder in models/easyanimate (transformer/, vae/, text_encoder/, "
                                              "tokenizer/, scheduler/; V5 also text_encoder_2/, tokenizer_2/), or the "
                                              "shipped demo model."}),
                "precision": (PRECISIONS, {"default": "auto", "tooltip": "Weight dtype. auto: what ComfyUI picks for "
                                           "this GPU (bf16 where supported). fp16 VAEs compute in fp32 to avoid black frames."}),
            },
            "optional": {
                "motion_module": (files, {"default": NONE, "tooltip": "V1 only: the motion-module file "
                                          "(easyanimate_v1_mm.safetensors) for a PixArt-alpha base folder."}),
                "personalized": (files, {"default": NONE, "tooltip": "V1 only: a personalized 2-D transformer "
                                         "checkpoint loaded over the base (e.g. easyanimate_portrait.safetensors)."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, model, precision, motion_module=NONE, personalized=NONE):
        try:
            parts = [_signature(host.resolve_model(model))]
            parts += [_signature(host.resolve_file(host.MODEL_FOLDER, f)) for f in (motion_module, personalized) if f != NONE]
            return str(hash(tuple(parts)))
        except Exception:
            return float("nan")

    def load(self, model, precision, motion_module=NONE, personalized=NONE):
        from ..easyanimate.image_encoder import load_image_encoder
        from ..easyanimate.loading import load_transformer
        from ..easyanimate.pipeline import check_pair
        from ..easyanimate.vae import load_vae

        runtime = host.current_host()
        root = host.resolve_model(model)
        dtype = runtime.precision(precision)
        mm = host.resolve_file(host.MODEL_FOLDER, motion_module) if motion_module != NONE else None
        pers = host.resolve_file(host.MODEL_FOLDER, personalized) if personalized != NONE else None
        key = (str(root), dtype, str(mm), str(pers), _signature(root), runtime.weights_tag)
        cached = _LOADED.get(key)
        if cached is not None:
            return (cached, *cached.companions)

        ops = runtime.operations()
        transformer = load_transformer(root, dtype=dtype, motion_module=mm, personalized=pers, operations=ops)
        vae = load_vae(root, dtype=dtype, operations=ops)
        check_pair(transformer, vae)  # a folder with another release's vae/ is refused now, not at sampling
        release = root if (root / "transformer").is_dir() else root.parent
        scheduler = release / "scheduler" if (release / "scheduler" / "scheduler_config.json").is_file() else None
        clip_dir = release / "image_encoder"
        image_encoder = None
        if transformer.config.has_clip_projection and clip_dir.is_dir():
            image_encoder = LazyComponent(lambda: load_image_encoder(clip_dir, dtype=dtype), "image_encoder")
        vae_handle = VAEHandle(vae, runtime.wrap(vae.model, "vae"))
        t5_handle = text_encoder_handle(release, transformer.config.family, dtype)
        model_handle = ModelHandle(model, transformer.config.family,
                                   runtime.prepare(runtime.wrap(transformer, "transformer")), scheduler,
                                   image_encoder, companions=(vae_handle, t5_handle))
        _LOADED[key] = model_handle
        log.info("EasyAnimate: loaded %s (%s, %s); VAE %s", model, transformer.config.family, dtype, vae)
        return (model_handle, vae_handle, t5_handle)


def text_encoder_handle(release: Path, family: str, dtype: str):
    """The release's text encoder, loaded on first use (None without a text_encoder/ folder): T5 for V1–V3;
    Qwen2-VL (V5.1) or Bert + mT5 (V5), which give their memory back after each use."""
    if not (release / "text_encoder").is_dir():
        return None
    if family not in ("v5", "v51"):
        from ..easyanimate.text import load_text_encoder

        return T5Handle(LazyComponent(lambda: load_text_encoder(release, dtype=dtype), "text_encoder"))
    from ..easyanimate.errors import LayoutError
    from ..easyanimate.pipeline import FAMILY_NAMES
    from ..easyanimate.text_v5 import detect_text_encoder_v5, load_text_encoder_v5

    found = detect_text_encoder_v5(release)  # the configs only: an incomplete folder is named now
    if found != {"v5": "v5", "v51": "v5.1"}[family]:
        raise LayoutError(
            f"'{release.name}': the transformer is EasyAnimate {FAMILY_NAMES[family]} but text_encoder/ holds the "
            f"EasyAnimate {found.upper()} text encoder. Use the text_encoder/ (and tokenizer/) of the same release."
        )
    source = ReleasedAfterUse(lambda: load_text_encoder_v5(release, dtype=dtype), "text_encoder")
    return T5Handle(source, encoder="qwen2-vl" if family == "v51" else "bert+mt5")


class EasyAnimateLoRALoader:
    DESCRIPTION = (
        "Adds one LoRA (EasyAnimate, kohya, PEFT/diffusers or LyCORIS naming) to the model and, for LoRAs that "
        "carry text-encoder layers, to the T5. Chain several. The loaded weights are never changed: each branch "
        "of the workflow gets its own patched view."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = (MODEL, T5)
    RETURN_NAMES = ("model", "t5")
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (MODEL, {"tooltip": "The EasyAnimate model to add the LoRA to."}),
                "lora_name": (host.list_files("loras") or ["(put LoRA files in models/loras)"],
                              {"tooltip": "A LoRA file from models/loras."}),
                "strength_model": ("FLOAT", {"default": 0.55, "min": -10.0, "max": 10.0, "step": 0.05,
                                             "tooltip": "LoRA strength on the transformer (the reference scripts use 0.55; "
                                                        "0 = no effect, negative values invert it)."}),
                "strength_t5": ("FLOAT", {"default": 0.55, "min": -10.0, "max": 10.0, "step": 0.05,
                                          "tooltip": "Strength on the T5 text encoder, for LoRAs with text-encoder layers."}),
            },
            "optional": {
                "t5": (T5, {"tooltip": "The T5 encoder to add the LoRA's text-encoder layers to."}),
            },
        }

    def apply(self, model, lora_name, strength_model, strength_t5, t5=None):
        from ..easyanimate.lora import LoRAError, check_lora_strength, read_lora, resolve_lora

        check_lora_strength(strength_model, "strength_model")
        check_lora_strength(strength_t5, "strength_t5")
        path = host.resolve_file("loras", lora_name)
        lora = read_lora(path)
        try:
            resolved = resolve_lora(lora, model.transformer.module)
        except LoRAError:
            if t5 is None:
                raise
            resolved = None  # a LoRA of the text encoder only: checked against the T5 when it is loaded
            log.info("EasyAnimate LoRA %s: no transformer layers; it adapts the text encoder only.", lora_name)
        new_model = model
        if resolved is not None and strength_model != 0:
            log.info("EasyAnimate LoRA %s: %s", lora_name, resolved.report.summary())
            new_model = model.with_transformer(host.current_host().with_lora(model.transformer, resolved, strength_model))
        has_text_layers = resolved is None or bool(resolved.report.skipped_text_encoder)
        new_t5 = t5.with_lora(path, strength_t5) if t5 is not None and has_text_layers else t5
        return new_model, new_t5
