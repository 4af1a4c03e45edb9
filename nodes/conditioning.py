"""Prompt encoding. T5 Encode: the release's T5 (V1–V3), or ComfyUI's native CLIP object loaded from a single
T5-XXL file. Text Encode V5/V5.1: the release's Qwen2-VL (V5.1) or Bert + mT5 (V5), freed after encoding.

Two nodes rather than one: their inputs differ (caption cleaning and the native CLIP belong to T5 only), their
default negative prompts are their releases' own, and the node's name says which models a workflow is for;
the V1–V3 workflows keep their T5 Encode node unchanged. Each refuses the other's text encoder by name.
"""
from __future__ import annotations

from . import host
from .handles import T5, TEXT_EMBEDS

# The negative prompt of the V2/V3 reference scripts and ComfyUI workflows.
DEFAULT_NEGATIVE = (
    "The video is not of a high quality, it has a low resolution, and the audio quality is not clear. Strange motion "
    "trajectory, a poor composition and deformed video, low resolution, duplicate and ugly, strange body structure, "
    "long and strange neck, bad teeth, bad eyes, bad limbs, bad hands, rotating camera, blurry camera, shaking camera. "
    "Deformation, low-resolution, blurry, ugly, distortion."
)
# The negative prompt of the V5/V5.1 predict scripts, in the English they give beside the Chinese original
# ("扭曲的身体，肢体残缺，文本字幕，漫画，静止，丑陋，错误，乱码。"); both encoders read either language.
DEFAULT_NEGATIVE_V5 = "Twisted body, limb deformities, text captions, comic, static, ugly, error, messy code."


class TextEmbeds(tuple):
    """EASYANIMATE_TEXT_EMBEDS: (positive, negative) `Conditioning`s of the core."""

    @property
    def positive(self):
        return self[0]

    @property
    def negative(self):
        return self[1]


class EasyAnimateT5Encode:
    DESCRIPTION = (
        "Encodes the prompt and the negative prompt with T5 (120 tokens, attention mask, the reference's caption "
        "cleaning), as EasyAnimate was trained. Takes the T5 of a release folder, or a native CLIP loaded from a "
        "single T5-XXL file (Load CLIP, type sd3 or pixart; the file you already have for Flux/SD3)."
    )
    CATEGORY = "EasyAnimate"
    RETURN_TYPES = (TEXT_EMBEDS,)
    RETURN_NAMES = ("embeds",)
    OUTPUT_TOOLTIPS = ("Prompt and negative-prompt embeddings for the EasyAnimate Sampler.",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "prompt": ("STRING", {"multiline": True, "default": "",
                                      "tooltip": "What the video shows. English; EasyAnimate was trained on detailed captions."}),
                "negative_prompt": ("STRING", {"multiline": True, "default": DEFAULT_NEGATIVE,
                                               "tooltip": "What to avoid (classifier-free guidance). The default is the reference's."}),
                "clean_caption": ("BOOLEAN", {"default": True, "tooltip": "Clean both prompts as the reference does "
                                              "(lower-case, strip URLs/HTML/CJK, ...). Off: use them as typed."}),
            },
            "optional": {
                "t5": (T5, {"tooltip": "The T5 of a release folder (from Load EasyAnimate)."}),
                "clip": ("CLIP", {"tooltip": "Or ComfyUI's native CLIP holding a T5-XXL encoder (t5xxl_fp16 / fp8 file)."}),
            },
        }

    def encode(self, prompt, negative_prompt, clean_caption=True, t5=None, clip=None):
        from ..easyanimate.pipeline import Conditioning

        if t5 is None and clip is None:
            raise ValueError("Connect either the t5 output of Load EasyAnimate or a native CLIP with a T5-XXL encoder.")
        if t5 is not None and t5.encoder != "t5":
            raise ValueError(
                f"This model's text encoder is {t5.description}, not T5: encode its prompts with Text Encode V5/V5.1 "
                "(EasyAnimate) instead of T5 Encode."
            )
        if t5 is not None:
            text = _encode_with_t5(t5, prompt, negative_prompt, clean_caption)
        else:
            text = _encode_with_native_clip(clip, prompt, negative_prompt, clean_caption)
        return (TextEmbeds((Conditioning(text.embeds, text.mask), Conditioning(text.negative_embeds, text.negative_mask))),)


def _encode_with_t5(t5, prompt, negative_prompt, clean_caption):
    """The release's T5 (loaded on first use), with the T5 LoRAs of the handle as host patches."""
    from ..easyanimate.lora import read_lora, resolve_lora

    runtime = host.current_host()
    encoder, component = t5.source.get()
    for path, strength in t5.loras:
        component = runtime.with_lora(component, resolve_lora(read_lora(path), None, encoder.model), strength)
    signature = tuple((str(p), s) for p, s in t5.loras)
    if signature != getattr(encoder, "lora_signature", ()):
        encoder.clear_cache()  # cached embeddings were made with other LoRA weights
        encoder.lora_signature = signature
    runtime.check_interrupt()
    with runtime.placed([component], encoder.activation_bytes(1)):
        return encoder.encode([prompt], [negative_prompt], clean_caption=clean_caption)


def _encode_with_native_clip(clip, prompt, negative_prompt, clean_caption):
    """Our T5 conditioning (cleaned prompts, 120 tokens, attention mask) computed by ComfyUI's own T5.

    ComfyUI's CLIP object from a T5-XXL file (Load CLIP, type sd3 or pixart) holds the encoder as
    `cond_stage_model.t5xxl.transformer` and its tokenizer as `tokenizer.t5xxl.tokenizer` (a fast T5
    tokenizer). We tokenize as the reference does and run that encoder with the mask, so ComfyUI keeps
    placing, casting (fp8 files included) and LoRA-patching the weights; nothing is copied.
    """
    import torch

    from ..easyanimate.host import Component
    from ..easyanimate.text import DEFAULT_MAX_LENGTH, TextEmbeddings, preprocess_prompt

    t5 = getattr(getattr(clip, "cond_stage_model", None), "t5xxl", None)
    tokenizer = getattr(getattr(getattr(clip, "tokenizer", None), "t5xxl", None), "tokenizer", None)
    if t5 is None or tokenizer is None:
        raise ValueError(
            "This CLIP holds no T5-XXL encoder. Load t5xxl_fp16.safetensors (or the fp8 file) with Load CLIP, "
            "type sd3 or pixart, or connect the t5 output of Load EasyAnimate."
        )
    texts = [preprocess_prompt(text, clean_caption) for text in (prompt, negative_prompt)]
    tokens = tokenizer(texts, padding="max_length", max_length=DEFAULT_MAX_LENGTH, truncation=True,
                       add_special_tokens=True, return_tensors="pt")
    device = clip.patcher.load_device
    mask = tokens["attention_mask"].to(torch.long)
    with host.current_host().placed([Component(t5.transformer, "text_encoder", patcher=clip.patcher)]), torch.no_grad():
        hidden, _ = t5.transformer(tokens["input_ids"].to(device), attention_mask=mask.to(device))
    hidden = hidden.float().cpu()
    return TextEmbeddings(hidden[:1], mask[:1], hidden[1:], mask[1:])


class EasyAnimateV5TextEncode:
    DESCRIPTION = (
        "Encodes the prompt and the negative prompt for EasyAnimate V5.1 (Qwen2-VL: the chat template, 256 tokens, the "
        "penultimate layer's states) or V5 (Bert, 77 tokens, and mT5, 256 tokens), as the reference pipelines do; "
        "English and Chinese prompts go in as typed. The text encoder is loaded for this, placed by ComfyUI with its "
        "memory estimate, and taken off the GPU right after, so the transformer gets the memory; encoding the same "
        "prompts again loads nothing."
    )
    CATEGORY = "EasyAnimate"
    RETURN_TYPES = (TEXT_EMBEDS,)
    RETURN_NAMES = ("embeds",)
    OUTPUT_TOOLTIPS = ("Prompt and negative-prompt embeddings for the EasyAnimate Sampler (V5/V5.1 models).",)
    FUNCTION = "encode"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "text_encoder": (T5, {"tooltip": "The t5 output of Load EasyAnimate with a V5.1 (Qwen2-VL) or V5 "
                                                 "(Bert + mT5) release."}),
                "prompt": ("STRING", {"multiline": True, "default": "",
                                      "tooltip": "What the video shows, in English or Chinese; detailed captions work best."}),
                "negative_prompt": ("STRING", {"multiline": True, "default": DEFAULT_NEGATIVE_V5,
                                               "tooltip": "What to avoid (classifier-free guidance). The default is the "
                                                          "V5/V5.1 predict scripts' (their Chinese original translated)."}),
            },
        }

    def encode(self, text_encoder, prompt, negative_prompt):
        if text_encoder.encoder == "t5":
            raise ValueError(
                "This model's text encoder is T5 (EasyAnimate V1–V3): encode its prompts with T5 Encode (EasyAnimate)."
            )
        return (TextEmbeds(_encode_with_v5_encoder(text_encoder, prompt, negative_prompt)),)


def _encode_with_v5_encoder(handle, prompt: str, negative_prompt: str) -> tuple:
    """(positive, negative) `Conditioning`s from the release's Qwen2-VL or Bert + mT5, with the handle's text LoRAs.

    The embeddings of a (prompt, negative prompt, LoRAs) seen before come from the source's cache without loading
    anything; otherwise the encoder is loaded if it was released, placed with its activation estimate, and
    released again whether the encoding succeeded or not."""
    from ..easyanimate.lora import read_lora, resolve_lora

    source = handle.source
    key = (prompt, negative_prompt, tuple((str(path), strength) for path, strength in handle.loras))
    cached = source.cached(key)
    if cached is not None:
        return cached
    runtime = host.current_host()
    runtime.check_interrupt()
    encoder, component = source.get()
    try:
        for path, strength in handle.loras:
            component = runtime.with_lora(component, resolve_lora(read_lora(path), None, encoder.model), strength)
        if key[2] != getattr(encoder, "lora_signature", ()):
            encoder.clear_cache()  # the encoder's own cache holds embeddings made with other LoRA weights
            encoder.lora_signature = key[2]
        with runtime.placed([component], encoder.activation_bytes(1)):
            text = encoder.encode([prompt], [negative_prompt])
    finally:
        source.release(component)
    pair = conditionings_v5(text)
    source.remember(key, pair)
    return pair


def conditionings_v5(text) -> tuple:
    """The core's encoder output -> (positive, negative) `Conditioning`s: Qwen2-VL `TextEmbeddings`, or V5's
    `V5TextEmbeddings` (Bert states, with the mT5 states beside them)."""
    from ..easyanimate.pipeline import Conditioning
    from ..easyanimate.text_v5 import V5TextEmbeddings

    if isinstance(text, V5TextEmbeddings):
        bert, t5 = text.bert, text.t5
        return (Conditioning(bert.embeds, bert.mask, t5.embeds, t5.mask),
                Conditioning(bert.negative_embeds, bert.negative_mask, t5.negative_embeds, t5.negative_mask))
    return Conditioning(text.embeds, text.mask), Conditioning(text.negative_embeds, text.negative_mask)
