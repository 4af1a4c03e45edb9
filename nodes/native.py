"""The native ComfyUI route: the pack's transformer as a ComfyUI `MODEL`, prompts as `CONDITIONING`.

ComfyUI's own samplers (KSampler, KSamplerAdvanced, SamplerCustom, SamplerCustomAdvanced with every sampler
and scheduler), LoRA loaders and model patches (EasyCache, LazyCache, CFGZeroStar, SkipLayerGuidanceDiT,
TorchCompileModel, ModelSamplingSD3 on V5.1, ...) work on a `MODEL`: a `comfy.model_base.BaseModel` in a
`ModelPatcher`. This module makes one around the pack's own transformer (same weights, same `comfy.ops` layers,
same memory estimate):

* `NativeModel` (built by `native_model`, once per loaded transformer, in `ComfyHost.wrap`): a BaseModel
  whose `diffusion_model` is our `EasyAnimateTransformer3D` (V1-V3) or `EasyAnimateMMDiT` (V5/V5.1). The
  pack's route and the native route share its one `ModelPatcher` (the native `MODEL` is a clone), so ComfyUI
  loads, partially loads and evicts it the same way whichever route runs it.
* The family (`DiTFamily` for V1-V3, `MMDiTFamily` for V5/V5.1) decides the model sampling (discrete ε over
  the release's DDPM schedule; V5.1: flow matching with the release's shift), the conditioning carried in
  `CONDITIONING`, the forward adapter and the memory estimate.
* `install_lora_key_map`: ComfyUI maps LoRA keys through `comfy.lora.model_lora_keys_unet`, which knows
  only its own model types; the wrapper adds the names of every LoRA format the pack reads for our models.
* The nodes: `EasyAnimateNativeModel` (EASYANIMATE_MODEL -> MODEL), `EasyAnimateT5EncodeConditioning` (V1-V3)
  and `EasyAnimateV5TextEncodeConditioning` (V5/V5.1: Qwen2-VL, or Bert + mT5) (prompts -> CONDITIONING), and
  `EasyAnimateToVideo` (the latent, and the conditioning channels of text-, image- and video-to-video, control
  video, reference image and camera poses, the way WanImageToVideo does it for Wan).

Everything here that touches ComfyUI imports it inside functions, so the pack imports without ComfyUI.
See docs/architecture.md ("The native ComfyUI route").
"""
from __future__ import annotations

import functools
import logging
import math
import re

import torch

from ..easyanimate.errors import MAX_SEED, EasyAnimateError
from . import host
from .conditioning import EasyAnimateT5Encode, EasyAnimateV5TextEncode
from .handles import MODEL, VAE
from .sampling import CONTROL_INPUTS, images_to_frames, preview_factors

log = logging.getLogger(__name__)

CATEGORY = "EasyAnimate/native"
# ComfyUI's name for a block-replacement patch of a DiT block (`patches_replace["dit"]`). V1-V3's blocks are
# single-stream (text enters by cross-attention), like Wan's, which ComfyUI also calls "double_block"; V5/V5.1's
# MMDiT blocks are joint two-stream blocks, as Flux's and SD3's double blocks. SkipLayerGuidanceDiT's
# `double_layers` address both.
BLOCK_PATCH = "double_block"


# ------------------------------------------------------------------------------------------ families
class DiTFamily:
    """EasyAnimate V1, V2, V3 (PixArt-style DiT with motion modules).

    Model sampling: discrete, over the release's DDPM training schedule (scheduler_config.json: 1000 linear
    betas 1e-4 ... 0.02, prediction "epsilon"; "v_prediction" is honoured), with diffusers' conventions the
    pack's samplers use: σ_t = √((1 − ᾱ_t)/ᾱ_t) from float32 betas, σ linearly interpolated between training
    timesteps, and a σ between two table entries given to the model as a fractional timestep (ComfyUI's
    own discrete sampling rounds to the nearest integer timestep).

    Conditioning: the T5 states (`cross_attn`, 120 tokens) and their `attention_mask`; InP models (12 input
    channels) also the 8 `inpaint_latents` channels (mask latents, masked-video latents) and the CLIP image
    embeddings (zeros with a zero mask where there is no image, and in the negative), switched on for the
    last `clip_apply_ratio` of the steps as the reference does.
    """

    name = "EasyAnimate V1-V3"
    families = ("v1", "v2", "v3")

    @staticmethod
    def latent_channels(transformer) -> int:
        cfg = transformer.config
        return cfg.in_channels - (8 if cfg.has_clip_projection else 0)

    @staticmethod
    def inpaint(transformer) -> bool:
        return transformer.config.has_clip_projection

    # ------------------------------------------------------------------ sampling
    @staticmethod
    def schedule(scheduler_config=None) -> tuple[str, torch.Tensor]:
        """(prediction type, training σ table (float32, ascending)) from a release's scheduler folder or
        config (None: the V1-V3 YAML defaults, which every release's file agrees with)."""
        from ..easyanimate.samplers.base import make_noise_schedule, yaml_scheduler_kwargs
        from ..easyanimate.sampling import load_scheduler_config, scheduler_config_family

        given = yaml_scheduler_kwargs() if scheduler_config is None else (
            dict(scheduler_config) if isinstance(scheduler_config, dict) else load_scheduler_config(scheduler_config))
        if scheduler_config_family(given) == "flow":
            raise EasyAnimateError(
                f"The scheduler config {scheduler_config} is a flow-matching one; EasyAnimate V1-V3 and V5 are DDPM models. "
                "Use the scheduler/ folder of the same release.")
        config = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                  "trained_betas": None, "prediction_type": "epsilon", **given}
        prediction = config.get("prediction_type") or "epsilon"
        if prediction not in ("epsilon", "v_prediction"):
            raise EasyAnimateError(f"prediction_type {prediction!r} is not supported on the native route "
                                   "(EasyAnimate's DDPM releases predict 'epsilon').")
        if config.get("rescale_betas_zero_snr"):
            raise EasyAnimateError("rescale_betas_zero_snr is not supported (no EasyAnimate release sets it).")
        return prediction, make_noise_schedule(config).sigmas.float()

    def model_sampling(self, transformer, scheduler_config=None):
        prediction, sigmas = self.schedule(scheduler_config)
        return _classes().discrete_sampling(sigmas, prediction)

    def release_sampling(self, native, scheduler_config):
        """The model sampling of a release's scheduler config, or None when the model's already is it."""
        prediction, sigmas = self.schedule(scheduler_config)
        default = native.model_sampling
        if (torch.equal(sigmas, default.sigmas.cpu())
                and isinstance(default, _comfy("comfy.model_sampling").V_PREDICTION) == (prediction == "v_prediction")):
            return None
        return _classes().discrete_sampling(sigmas, prediction)

    # ------------------------------------------------------------------ conditioning
    def extra_conds(self, model, kwargs: dict) -> dict:
        conds = _comfy("comfy.conds")
        out = {}
        cross_attn = kwargs.get("cross_attn")
        if cross_attn is not None:
            out["c_crossattn"] = conds.CONDRegular(cross_attn)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            out["attention_mask"] = conds.CONDRegular(mask)
        inpaint = kwargs.get("inpaint_latents")
        if inpaint is not None:
            out["inpaint_latents"] = conds.CONDNoiseShape(inpaint)
        if self.inpaint(model.diffusion_model):
            from ..easyanimate.models.transformer import CLIP_EMBED_DIM, CLIP_TOKENS

            embeds = kwargs.get("clip_image_embeds")
            if embeds is None:  # no image (and every negative): zero states, zero mask, as the reference
                embeds, clip_mask = torch.zeros(1, CLIP_EMBED_DIM), torch.zeros(1, CLIP_TOKENS)
            else:
                clip_mask = torch.ones(embeds.shape[0], CLIP_TOKENS)
            out["clip_image_embeds"] = conds.CONDRegular(embeds)
            out["clip_mask"] = conds.CONDRegular(clip_mask)
            out["clip_apply_ratio"] = conds.CONDConstant(float(kwargs.get("clip_apply_ratio", 0.5)))
        return out

    def extra_conds_shapes(self, model, kwargs: dict) -> dict:
        return {}  # the DiT's estimate does not depend on the text (120 T5 tokens, always)

    def activation_bytes(self, transformer, batch: int, frames: int, height: int, width: int, cond_shapes) -> int:
        return transformer.activation_bytes(batch, frames, height, width)

    # ------------------------------------------------------------------ forward
    def forward(self, model, x, timestep, context, transformer_options, attention_mask=None, inpaint_latents=None,
                clip_image_embeds=None, clip_mask=None, clip_apply_ratio=None, **unused):
        """ComfyUI's call -> our transformer -> the ε (or v) channels (V1-V3 also predict a learned variance in
        channels 4-7, which samplers do not use)."""
        from ..easyanimate.models.attention import attention_function
        from ..easyanimate.models.transformer import block_replacements

        transformer = model.diffusion_model
        if context is None:
            raise EasyAnimateError("The EasyAnimate model got no text conditioning: connect the CONDITIONING of "
                                   "T5 Encode -> CONDITIONING (EasyAnimate).")
        if self.inpaint(transformer):
            if inpaint_latents is None:
                raise EasyAnimateError(
                    "This EasyAnimate model is an InP model (12 input channels): its positive and negative conditioning "
                    "need the inpaint channels. Route both through EasyAnimate To Video (native), also for text-to-video.")
            if clip_image_embeds is not None and not clip_is_applied_now(transformer_options, clip_apply_ratio):
                clip_image_embeds, clip_mask = torch.zeros_like(clip_image_embeds), torch.zeros_like(clip_mask)
        else:
            if inpaint_latents is not None:
                raise EasyAnimateError("The conditioning carries inpaint channels, but this model takes none (not a V3 "
                                       "InP model); build it with this model in EasyAnimate To Video.")
            clip_image_embeds = clip_mask = None
        attention = functools.partial(comfy_attention, transformer_options=transformer_options)
        with attention_function(attention), block_replacements(block_patches(transformer_options, transformer)):
            out = transformer(x, timestep, context, attention_mask, inpaint_latents, clip_image_embeds, clip_mask)
        return out[:, :model.latent_channels]


class MMDiTFamily:
    """EasyAnimate V5 and V5.1 (the MMDiT: joint attention over [text; video] in every block).

    Model sampling: V5.1 is a flow-matching model, sampled as ComfyUI samples SD3 (`ModelSamplingDiscreteFlow` +
    `CONST`, the class ModelSamplingSD3 builds, so that node can change the shift afterwards) with the shift and
    the training timesteps of the release's scheduler_config.json, read as the pack's Flow sampler reads them;
    timestep = σ × 1000, as the Flow sampler gives the transformer. ComfyUI's "normal" scheduler is then the Flow
    sampler's schedule (σ from 1000·σ_max to 1000·σ_min evenly, shifted: with a shift ≠ 1 the end σ_min of the
    shifted training table is shifted again, in both). A config with dynamic shifting maps σ with μ = 1, the
    shift e^μ (its "normal" schedule then shifts σ_min once more than the Flow sampler does); `shift_terminal` is
    refused. V5 is a DDPM model: discrete sampling as V1-V3 (`DiTFamily.schedule`).

    Conditioning: the text states (`cross_attn`: V5.1 Qwen2-VL, V5 Bert) with their `attention_mask` (carried;
    the MMDiT attends every text token, as the reference), V5's mT5 states (`t5_embeds`); InP models the 17
    `inpaint_latents` channels (mask, masked-video latents), Control models the `control_latents` (control video
    | reference image), Control-Camera models theirs (Plücker rays | reference image), all computed by
    `MMDiTStages.conditioning_latents`. A model given no conditioning channels gets zeros, as the pack gives a
    model with nothing to condition on (an InP model's text-to-video, a Control model without a control video).

    Block patches: ComfyUI's "double_block" patches (Flux / SD3 convention) get {"img": video tokens, "txt":
    text tokens, "vec": the timestep embedding, "pe": the RoPE (cos, sin), "transformer_options"} and give back
    {"img", "txt"}.
    """

    name = "EasyAnimate V5/V5.1"
    families = ("v5", "v51")

    @staticmethod
    def latent_channels(transformer) -> int:
        return transformer.config.out_channels

    @staticmethod
    def is_flow(transformer) -> bool:
        from ..easyanimate.sampling import FAMILY_OBJECTIVES, model_family

        return FAMILY_OBJECTIVES[model_family(transformer.config.family)] == "flow"

    # ------------------------------------------------------------------ sampling
    @staticmethod
    def flow_shift(scheduler_config=None) -> tuple[float, int]:
        """(shift, training timesteps) of a flow-matching scheduler config (None: the Flow sampler's defaults),
        checked and completed as the Flow sampler does."""
        from ..easyanimate.samplers.flow import PIPELINE_MU
        from ..easyanimate.sampling import build_sampler

        sampler = build_sampler("Flow", {} if scheduler_config is None else scheduler_config)
        if sampler.config.get("shift_terminal"):
            raise EasyAnimateError(
                f"The scheduler config sets shift_terminal={sampler.config['shift_terminal']!r}, which the native route's "
                "flow sampling (ComfyUI's ModelSamplingDiscreteFlow) cannot express; no EasyAnimate release sets it. Use "
                "the EasyAnimate Sampler, or set shift_terminal null in scheduler_config.json.")
        shift = math.exp(PIPELINE_MU) if sampler.config["use_dynamic_shifting"] else sampler.shift
        return shift, sampler.schedule.num_train_timesteps

    def model_sampling(self, transformer, scheduler_config=None):
        if self.is_flow(transformer):
            return _classes().flow_sampling(*self.flow_shift(scheduler_config))
        return DiTFamily().model_sampling(transformer, scheduler_config)

    def release_sampling(self, native, scheduler_config):
        """The model sampling of a release's scheduler config, or None when the model's already is it."""
        if not self.is_flow(native.diffusion_model):
            return DiTFamily().release_sampling(native, scheduler_config)
        shift, timesteps = self.flow_shift(scheduler_config)
        default = native.model_sampling
        if default.shift == shift and default.multiplier == timesteps:
            return None
        return _classes().flow_sampling(shift, timesteps)

    # ------------------------------------------------------------------ conditioning
    def extra_conds(self, model, kwargs: dict) -> dict:
        conds = _comfy("comfy.conds")
        out = {}
        for key, name, kind in (("cross_attn", "c_crossattn", conds.CONDRegular),
                                ("attention_mask", "attention_mask", conds.CONDRegular),
                                ("t5_embeds", "t5_embeds", conds.CONDRegular),
                                ("inpaint_latents", "inpaint_latents", conds.CONDNoiseShape),
                                ("control_latents", "control_latents", conds.CONDNoiseShape)):
            value = kwargs.get(key)
            if value is not None:
                out[name] = kind(value)
        return out

    def extra_conds_shapes(self, model, kwargs: dict) -> dict:
        """The text states' shapes, for `memory_required` (the MMDiT's activations grow with the text tokens)."""
        return {name: list(kwargs[key].shape) for key, name in (("cross_attn", "c_crossattn"), ("t5_embeds", "t5_embeds"))
                if kwargs.get(key) is not None}

    def activation_bytes(self, transformer, batch: int, frames: int, height: int, width: int, cond_shapes) -> int:
        """The MMDiT's own estimate, with the longest text of the batch (V5: Bert + mT5 tokens)."""
        tokens = sum(max((int(shape[1]) for shape in cond_shapes.get(name, ())), default=0)
                     for name in ("c_crossattn", "t5_embeds"))
        return transformer.activation_bytes(batch, frames, height, width, tokens)

    # ------------------------------------------------------------------ forward
    def forward(self, model, x, timestep, context, transformer_options, inpaint_latents=None, control_latents=None,
                t5_embeds=None, attention_mask=None, **unused):
        """ComfyUI's call -> our MMDiT -> the velocity (V5.1) or ε (V5). `attention_mask` is not used: the MMDiT
        attends every text token, padding included, as the reference does."""
        transformer = model.diffusion_model
        if context is None:
            raise EasyAnimateError("The EasyAnimate model got no text conditioning: connect the CONDITIONING of "
                                   "Text Encode V5/V5.1 -> CONDITIONING (EasyAnimate).")
        if transformer.config.text_embed_dim_t5 is not None and t5_embeds is None:
            raise EasyAnimateError("This EasyAnimate V5 model takes Bert and mT5 states; the conditioning has no mT5 "
                                   "part. Encode the prompts with Text Encode V5/V5.1 -> CONDITIONING (EasyAnimate).")
        missing = transformer.config.in_channels - x.shape[1]
        if missing > 0 and inpaint_latents is None and control_latents is None:
            # Nothing to condition on: zeros, as MMDiTStages gives (the channels sit after the latents either way).
            inpaint_latents = x.new_zeros(x.shape[0], missing, *x.shape[2:])
        from ..easyanimate.models.attention import attention_function
        from ..easyanimate.models.transformer import block_replacements

        attention = functools.partial(comfy_attention, transformer_options=transformer_options)
        with attention_function(attention), block_replacements(joint_block_patches(transformer_options, transformer)):
            return transformer(x, timestep, context, encoder_hidden_states_t5=t5_embeds,
                               inpaint_latents=inpaint_latents, control_latents=control_latents)


FAMILIES = [DiTFamily(), MMDiTFamily()]


def family_for(transformer):
    """The native-route family of a loaded transformer (None for an object that is none of ours)."""
    family = getattr(getattr(transformer, "config", None), "family", None)
    return next((f for f in FAMILIES if family in f.families), None)


# ------------------------------------------------------------------------------------------ ComfyUI glue
def _comfy(name: str):
    import importlib

    return importlib.import_module(name)


def comfy_attention(q, k, v, heads, bias, transformer_options=None):
    """ComfyUI's attention for our layers (q/k/v (N, heads, L, D)): the backend the user chose
    (`optimized_attention`: sage, flash, xformers, pytorch, sub-quadratic, split) and the `transformer_options`
    overrides that reach it. Masked calls (the cross-attention to the 120 padded T5 tokens) go through
    ComfyUI's pytorch attention (SDPA): sage and flash attention cannot take an additive mask."""
    attention = _comfy("comfy.ldm.modules.attention")
    extra = {} if transformer_options is None else {"transformer_options": transformer_options}
    if bias is None:
        return attention.optimized_attention(q, k, v, heads, skip_reshape=True, **extra)
    return attention.attention_pytorch(q, k, v, heads, mask=bias, skip_reshape=True, **extra)


def _block_patches_by_index(transformer_options: dict, transformer) -> dict:
    """{block index: ComfyUI's replacement patch} (`patches_replace["dit"][("double_block", i)]`)."""
    patches = (transformer_options or {}).get("patches_replace", {}).get("dit", {})
    found = ((index, patches.get((BLOCK_PATCH, index))) for index in range(len(transformer.transformer_blocks)))
    return {index: patch for index, patch in found if patch is not None}


def block_patches(transformer_options: dict, transformer) -> dict:
    """ComfyUI's block replacements (`patches_replace["dit"][("double_block", i)]`, as SkipLayerGuidanceDiT
    sets them) as the core's `block_replacements`. A patch gets {"img": tokens, "txt": text (+ CLIP) tokens,
    "vec": the block's modulation, "pe": None, "transformer_options"} and {"original_block": fn(args)}."""
    out = {}
    for index, patch in _block_patches_by_index(transformer_options, transformer).items():
        def run(tokens, context, t6, original, patch=patch):
            def original_block(args):
                return {"img": original(args["img"], args["txt"], args["vec"])}

            args = {"img": tokens, "txt": context, "vec": t6, "pe": None, "transformer_options": transformer_options}
            return patch(args, {"original_block": original_block})["img"]
        out[index] = run
    return out


def joint_block_patches(transformer_options: dict, transformer) -> dict:
    """ComfyUI's block replacements of joint blocks (`patches_replace["dit"][("double_block", i)]`, the Flux /
    SD3 convention) as the MMDiT's `block_replacements`: a patch gets {"img": video tokens, "txt": text tokens,
    "vec": the timestep embedding, "pe": the RoPE (cos, sin), "transformer_options"} and
    {"original_block": fn(args) -> {"img", "txt"}}, and returns {"img", "txt"}."""
    out = {}
    for index, patch in _block_patches_by_index(transformer_options, transformer).items():
        def run(video, text, temb, rope, block, patch=patch):
            def original_block(args):
                video_out, text_out = block(args["img"], args["txt"], args["vec"], args["pe"])
                return {"img": video_out, "txt": text_out}

            args = {"img": video, "txt": text, "vec": temb, "pe": rope, "transformer_options": transformer_options}
            result = patch(args, {"original_block": original_block})
            return result["img"], result["txt"]
        out[index] = run
    return out


def clip_is_applied_now(transformer_options: dict, ratio) -> bool:
    """Whether the current model call sees the CLIP image: the reference applies it from step
    ⌈n·(1 − ratio)⌉ of an n-step run on. ComfyUI's samplers put the run's σ schedule in
    `transformer_options["sample_sigmas"]` (n + 1 values) and the current σ in `["sigmas"]`; the step is the
    interval of the schedule that holds the current σ (so the extra evaluations of Heun- or DPM-2-style
    samplers between two schedule points count as the step they belong to). Without a schedule (a caller
    that is not one of ComfyUI's samplers) the image is applied."""
    from ..easyanimate.image_encoder import clip_is_applied

    ratio = 0.5 if ratio is None else float(ratio)
    schedule, current = transformer_options.get("sample_sigmas"), transformer_options.get("sigmas")
    if schedule is None or current is None or len(schedule) < 2:
        return True
    steps = len(schedule) - 1
    sigma = float(torch.as_tensor(current).float().max())
    index = int((torch.as_tensor(schedule).float().cpu() >= sigma * (1 - 1e-5)).sum()) - 1
    return clip_is_applied(min(max(index, 0), steps - 1), steps, ratio)


LORA_KOHYA_PREFIXES = ("lora_unet__", "lora_unet_", "lora_transformer_", "lycoris_")
LORA_DOTTED_PREFIXES = ("", "transformer.", "base_model.model.", "base_model.model.transformer.", "diffusion_model.",
                        "unet.")
LORA_PROCESSOR_PREFIXES = ("", "transformer.", "unet.")


def lora_key_map(transformer, prefix: str = "diffusion_model.") -> dict[str, str]:
    """{LoRA key prefix: model state-dict key} for every adaptable layer (Linear, Conv2d) of `transformer`, in
    every naming the pack reads (`easyanimate.lora`): kohya / EasyAnimate (`lora_unet__a_b_c`, single `_`
    too), OneTrainer (`lora_transformer_`), LyCORIS (`lycoris_`), PEFT / diffusers dotted names with or
    without `transformer.` / `base_model.model.` / `diffusion_model.` / `unet.`, and old diffusers attention
    processors (`attn1.processor.to_q`, `to_out` for `to_out.0`). Underscored names that two layers share
    are left out (the pack refuses such a LoRA as ambiguous)."""
    layers = [name for name, module in transformer.named_modules()
              if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
              and isinstance(getattr(module, "weight", None), torch.Tensor)]
    aliases = {a: n for a, n in (getattr(transformer, "lora_aliases", None) or {}).items() if n in set(layers)}
    named = [(name, name) for name in layers] + list(aliases.items())
    underscored: dict[str, set] = {}
    for alias, name in named:
        underscored.setdefault(alias.replace(".", "_"), set()).add(name)
    out = {}
    for alias, name in named:
        key = f"{prefix}{name}.weight"
        for p in LORA_DOTTED_PREFIXES:
            out[p + alias] = key
        flat = alias.replace(".", "_")
        if len(underscored[flat]) == 1:
            for p in LORA_KOHYA_PREFIXES:
                out[p + flat] = key
        match = re.fullmatch(r"(.*)\.(to_q|to_k|to_v|to_out\.0)", alias)
        if match:
            processor = f"{match.group(1)}.processor.{'to_out' if match.group(2) == 'to_out.0' else match.group(2)}"
            for p in LORA_PROCESSOR_PREFIXES:
                out[p + processor] = key
    return out


def install_lora_key_map(comfy_lora) -> None:
    """Wrap `comfy.lora.model_lora_keys_unet` once: for our native models it also maps every LoRA naming the
    pack reads (`lora_key_map`); every other model gets ComfyUI's own map, unchanged. ComfyUI's LoRA paths
    (LoraLoader, LoraLoaderModelOnly, `load_lora_for_models`, hook LoRAs) all build their key map there."""
    original = comfy_lora.model_lora_keys_unet
    if getattr(original, "easyanimate_native", False):
        return

    @functools.wraps(original)
    def model_lora_keys_unet(model, key_map={}):  # noqa: B006 (ComfyUI's signature)
        key_map = original(model, key_map)
        extra = getattr(model, "easyanimate_lora_key_map", None)
        if callable(extra):
            key_map.update(extra())
        return key_map

    model_lora_keys_unet.easyanimate_native = True
    comfy_lora.model_lora_keys_unet = model_lora_keys_unet


@functools.lru_cache(maxsize=None)
def _classes():
    """The ComfyUI subclasses of the native route, made on first use (ComfyUI is imported here, not at import)."""
    import types

    import comfy.latent_formats
    import comfy.model_base
    import comfy.model_management
    import comfy.model_sampling
    import comfy.patcher_extension
    import comfy.supported_models_base

    class TrainingSigmas(comfy.model_sampling.ModelSamplingDiscrete):
        """Discrete sampling over a given training σ table, interpolated linearly in σ (diffusers' rule), with
        fractional timesteps for σ between table entries."""

        def __init__(self, sigmas: torch.Tensor):
            torch.nn.Module.__init__(self)
            self.sigma_data = 1.0
            self.num_timesteps = len(sigmas)
            self.linear_start, self.linear_end, self.zsnr = None, None, False
            self.set_sigmas(sigmas.float())

        def timestep(self, sigma):
            table = self.sigmas.to(sigma.device, torch.float64)
            s = sigma.to(torch.float64).reshape(-1).clamp(table[0], table[-1])
            high = torch.searchsorted(table, s).clamp(1, len(table) - 1)
            low = high - 1
            t = low + (s - table[low]) / (table[high] - table[low])
            return t.to(torch.float32).view(sigma.shape)

        def sigma(self, timestep):
            table = self.sigmas.to(torch.float64)
            t = timestep.to(torch.float64).to(table.device).clamp(0, len(table) - 1)
            low, high = t.floor().long(), t.ceil().long()
            w = t - low
            return ((1 - w) * table[low] + w * table[high]).to(torch.float32).to(timestep.device)

    def discrete_sampling(sigmas, prediction):
        kind = comfy.model_sampling.V_PREDICTION if prediction == "v_prediction" else comfy.model_sampling.EPS

        class EasyAnimateDiscrete(TrainingSigmas, kind):
            pass

        return EasyAnimateDiscrete(sigmas)

    class EasyAnimateFlow(comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST):
        """Flow matching as ModelSamplingSD3 builds it (that node replaces it with its own shift)."""

    def flow_sampling(shift: float, timesteps: int):
        sampling = EasyAnimateFlow()
        sampling.set_parameters(shift=shift, timesteps=timesteps, multiplier=timesteps)
        return sampling

    class LatentFormat(comfy.latent_formats.LatentFormat):
        """The pack's latents: already scaled by the VAE's scaling factor (the pack's VAE nodes encode and decode
        them so), hence scale 1; 5-D; RGB preview factors fitted from the release's VAE when previews are on."""

        scale_factor = 1.0
        latent_dimensions = 3

        def __init__(self, channels: int):
            self.latent_channels = channels
            self.latent_rgb_factors = None
            self.latent_rgb_factors_bias = None

    class Config(comfy.supported_models_base.BASE):
        unet_config = {"disable_unet_model_creation": True}
        unet_extra_config = {}
        # For nodes that rebuild the sampling from the config (ModelSamplingDiscrete): ComfyUI's "sqrt_linear"
        # is diffusers' (and EasyAnimate's) "linear" betas.
        sampling_settings = {"beta_schedule": "sqrt_linear", "linear_start": 0.0001, "linear_end": 0.02,
                             "timesteps": 1000}
        latent_format = comfy.latent_formats.LatentFormat
        memory_usage_factor = 1.0
        supported_inference_dtypes = [torch.bfloat16, torch.float16, torch.float32]

        def __init__(self, family: str, channels: int, in_channels: int, model_sampling):
            super().__init__({"disable_unet_model_creation": True, "easyanimate_family": family,
                              "in_channels": in_channels})
            self.latent_format = LatentFormat(channels)
            if isinstance(model_sampling, EasyAnimateFlow):  # what ModelSamplingSD3 and friends start from
                self.sampling_settings = {"shift": model_sampling.shift, "multiplier": model_sampling.multiplier}

    class NativeModel(comfy.model_base.BaseModel):
        """A ComfyUI BaseModel around the pack's transformer (`diffusion_model`)."""

        def __init__(self, transformer, family, model_sampling, device=None):
            config = Config(transformer.config.family, family.latent_channels(transformer), transformer.config.in_channels,
                            model_sampling)
            flow = isinstance(model_sampling, EasyAnimateFlow)
            model_type = comfy.model_base.ModelType.FLOW if flow else comfy.model_base.ModelType.EPS
            super().__init__(config, model_type=model_type, device=device)
            self.diffusion_model = transformer
            self.family = family
            self.latent_channels = family.latent_channels(transformer)
            self.model_sampling = model_sampling
            self._lora_key_map = None

        def extra_conds(self, **kwargs):
            return self.family.extra_conds(self, kwargs)

        def extra_conds_shapes(self, **kwargs):
            return self.family.extra_conds_shapes(self, kwargs)

        def concat_cond(self, **kwargs):
            return None

        def _apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
            sigma = t
            dtype = self.manual_cast_dtype or self.get_dtype()
            xc = self.model_sampling.calculate_input(sigma, x).to(dtype)
            device = xc.device
            timestep = self.model_sampling.timestep(sigma).float()
            context = None if c_crossattn is None else comfy.model_management.cast_to_device(c_crossattn, device, dtype)
            conds = {name: _to_device(value, device, dtype) for name, value in kwargs.items()}
            out = comfy.patcher_extension.WrapperExecutor.new_class_executor(
                self._diffusion_forward, self,
                comfy.patcher_extension.get_all_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                         transformer_options),
            ).execute(xc, timestep, context, transformer_options, **conds)
            return self.model_sampling.calculate_denoised(sigma, out.float(), x)

        def _diffusion_forward(self, x, timestep, context, transformer_options, **conds):
            return self.family.forward(self, x, timestep, context, transformer_options, **conds)

        def memory_required(self, input_shape, cond_shapes={}):
            """The transformer's own activation estimate for this batch (what the pack's route loads it with)."""
            shape = list(input_shape)
            frames, height, width = shape[2:5] if len(shape) >= 5 else (1, *shape[2:4])
            return self.family.activation_bytes(self.diffusion_model, shape[0], frames, height, width, cond_shapes)

        def easyanimate_lora_key_map(self) -> dict:
            if self._lora_key_map is None:
                self._lora_key_map = lora_key_map(self.diffusion_model)
            return self._lora_key_map

    return types.SimpleNamespace(NativeModel=NativeModel, LatentFormat=LatentFormat,
                                 discrete_sampling=discrete_sampling, TrainingSigmas=TrainingSigmas,
                                 flow_sampling=flow_sampling, EasyAnimateFlow=EasyAnimateFlow)


def _to_device(value, device, dtype):
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype) if value.is_floating_point() else value.to(device)
    return value


def native_model(transformer):
    """The ComfyUI model around a loaded transformer, with the family's default model sampling (the release's
    own is applied by EasyAnimate -> MODEL), or None for an object that is none of our transformers."""
    family = family_for(transformer)
    if family is None:
        return None
    return _classes().NativeModel(transformer, family, family.model_sampling(transformer, None))


def set_values(conditioning, values: dict):
    """A copy of a CONDITIONING with `values` added to every entry's options."""
    return [[tensor, {**options, **values}] for tensor, options in conditioning]


# ------------------------------------------------------------------------------------------ nodes
class EasyAnimateNativeModel:
    DESCRIPTION = (
        "The EasyAnimate model as a native ComfyUI MODEL, for KSampler, SamplerCustom and the rest of ComfyUI's "
        "samplers, LoRA loaders (LoraLoaderModelOnly) and model patches (EasyCache, CFGZeroStar, SkipLayerGuidanceDiT, "
        "TorchCompileModel). Same weights as the EASYANIMATE_MODEL it comes from (its LoRAs included); ComfyUI loads "
        "and evicts it as one model. Needs ComfyUI; EasyAnimate V1-V3, V5 and V5.1."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The native MODEL, 5-D latents: V5.1 flow matching with the release's shift (ModelSamplingSD3 "
                       "changes it); V1-V3 and V5 discrete ε sampling over the release's training schedule.",)
    FUNCTION = "convert"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": (MODEL, {"tooltip": "From Load EasyAnimate (optionally through LoRA Loader (EasyAnimate): its "
                                         "LoRAs carry over)."}),
        }}

    def convert(self, model):
        runtime = host.current_host()
        patcher = model.transformer.patcher
        native = getattr(patcher, "model", None)
        if patcher is None or not hasattr(native, "easyanimate_lora_key_map"):
            raise EasyAnimateError("The native MODEL needs ComfyUI (outside it, use the EasyAnimate Sampler).")
        clone = patcher.clone()
        release_sampling = native.family.release_sampling(native, model.scheduler_config)
        if release_sampling is not None:
            clone.add_object_patch("model_sampling", release_sampling)
        vae = model.companions[0] if model.companions else None
        latent_format = native.latent_format
        if vae is not None and latent_format.latent_rgb_factors is None:
            def fit():
                weights, bias = preview_factors(runtime, vae)
                latent_format.latent_rgb_factors, latent_format.latent_rgb_factors_bias = weights.tolist(), bias.tolist()
                return weights, bias
            runtime.latent_previewer(fit)  # fits only when ComfyUI's previews are on
        return (clone,)


class EasyAnimateT5EncodeConditioning(EasyAnimateT5Encode):
    DESCRIPTION = (
        "Encodes the prompt and the negative prompt with T5 as T5 Encode (EasyAnimate) does (120 tokens, attention mask, "
        "the reference's caption cleaning) and gives them as native CONDITIONING for KSampler and the other native "
        "samplers (the native route)."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    OUTPUT_TOOLTIPS = ("The prompt: T5 states with their attention mask.", "The negative prompt, encoded the same way.")
    FUNCTION = "encode_conditioning"

    def encode_conditioning(self, prompt, negative_prompt, clean_caption=True, t5=None, clip=None):
        embeds = self.encode(prompt, negative_prompt, clean_caption, t5=t5, clip=clip)[0]
        return tuple([[c.embeds.float(), {"attention_mask": c.mask}]] for c in (embeds.positive, embeds.negative))


class EasyAnimateV5TextEncodeConditioning(EasyAnimateV5TextEncode):
    DESCRIPTION = (
        "Encodes the prompt and the negative prompt for EasyAnimate V5.1 (Qwen2-VL) or V5 (Bert + mT5) as Text Encode "
        "V5/V5.1 does (the encoder released after use, the same prompts not encoded twice) and gives them as native "
        "CONDITIONING for KSampler and the other native samplers (the native route)."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING")
    RETURN_NAMES = ("positive", "negative")
    OUTPUT_TOOLTIPS = ("The prompt: the text states with their attention mask (V5: Bert states, the mT5 states beside "
                       "them).", "The negative prompt, encoded the same way.")
    FUNCTION = "encode_conditioning"

    def encode_conditioning(self, text_encoder, prompt, negative_prompt):
        embeds = self.encode(text_encoder, prompt, negative_prompt)[0]
        return tuple([[c.embeds.float(), text_options(c)]] for c in (embeds.positive, embeds.negative))


def text_options(cond) -> dict:
    """A V5/V5.1 `Conditioning`'s CONDITIONING options: the attention mask, and V5's mT5 states."""
    options = {"attention_mask": cond.mask}
    if cond.t5_embeds is not None:
        options["t5_embeds"] = cond.t5_embeds.float()
    return options


class EasyAnimateToVideo:
    DESCRIPTION = (
        "The latent and the conditioning of a native-route video (KSampler and friends), as the EasyAnimate Sampler "
        "prepares them: text-to-video without images; image-to-video with a start image (and optionally an end "
        "image; InP models); video-to-video with an input video (then sample with denoise < 1); V5/V5.1 Control "
        "models: a control video (and on V5.1 a reference image); V5.1 Control-Camera models: camera poses (and a "
        "reference image). It adds the model's conditioning channels to both conditionings: V3 InP the inpaint "
        "channels and the CLIP image embeddings; V5/V5.1 InP the mask and masked-video latents; Control the control "
        "(and reference) latents; Control-Camera the Plücker rays (and reference). Use it for their text-to-video too."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING", "CONDITIONING", "LATENT")
    RETURN_NAMES = ("positive", "negative", "latent")
    OUTPUT_TOOLTIPS = (
        "The positive conditioning with the model's conditioning channels (and the CLIP image on V3 InP models).",
        "The negative conditioning with the same channels (no CLIP image, as the reference).",
        "Empty latents (text-, image-to-video, control) or the input video's latents (video-to-video): (batch, "
        "latent channels (4; V5/V5.1: 16), latent frames, height/8, width/8).",
    )
    FUNCTION = "prepare"

    @classmethod
    def INPUT_TYPES(cls):
        # New inputs go at the end, as optional ones (saved UI workflows hold widget values by position).
        return {
            "required": {
                "positive": ("CONDITIONING", {"tooltip": "From T5 Encode -> CONDITIONING (V1-V3) or Text Encode V5/V5.1 "
                                                         "-> CONDITIONING (V5/V5.1)."}),
                "negative": ("CONDITIONING", {"tooltip": "The negative prompt, from the same node as the positive."}),
                "model": (MODEL, {"tooltip": "From Load EasyAnimate: which conditioning channels the model takes, its "
                                             "sizes and frame rule, and the release's CLIP image encoder (V3)."}),
                "vae": (VAE, {"tooltip": "The model's VAE: it encodes the start/end images, the input video, the mask, "
                                         "the control video and the reference image."}),
                "width": ("INT", {"default": 672, "min": 16, "max": 2048, "step": 16,
                                  "tooltip": "Video width in pixels, a multiple of 16 (V1: 32)."}),
                "height": ("INT", {"default": 384, "min": 16, "max": 2048, "step": 16,
                                   "tooltip": "Video height in pixels, a multiple of 16 (V1: 32)."}),
                "frames": ("INT", {"default": 48, "min": 1, "max": 1024,
                                   "tooltip": "Number of frames (V5/V5.1: 1 + 4k, e.g. 49; V3: 1 or multiples of 8, V2: "
                                              "of 9; other counts are rounded down as the EasyAnimate Sampler does)."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 64, "tooltip": "Number of videos."}),
                "vae_seed": ("INT", {"default": 44, "min": 0, "max": MAX_SEED,
                                     "tooltip": "V1-V3: seed of the VAE's posterior samples for the inpaint channels and "
                                                "the input video (the EasyAnimate Sampler uses its seed + 1). V5/V5.1 InP: "
                                                "seed of the noise on the known pixels, drawn after a start noise of this "
                                                "seed as the EasyAnimate Sampler does (its seed reproduces it)."}),
            },
            "optional": {
                "start_image": ("IMAGE", {"tooltip": "Image-to-video: the first frame(s) (InP models: V3, V5, V5.1)."}),
                "end_image": ("IMAGE", {"tooltip": "Image-to-video: the last frame (needs a start image)."}),
                "video": ("IMAGE", {"tooltip": "Video-to-video: the input frames (sample with denoise < 1)."}),
                "clip_vision_output": ("CLIP_VISION_OUTPUT", {
                    "tooltip": "V3 InP, optional: ComfyUI's CLIP Vision Encode of the start image (ViT-L/14, 768-wide "
                               "image embeddings) instead of the release's image_encoder/."}),
                "clip_apply_ratio": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05,
                                               "tooltip": "V3 image-to-video: fraction of the last steps that see the "
                                                          "CLIP image tokens (reference 0.5). V5/V5.1 have no CLIP image."}),
                **CONTROL_INPUTS,
            },
        }

    def prepare(self, positive, negative, model, vae, width, height, frames, batch_size, vae_seed, start_image=None,
                end_image=None, video=None, clip_vision_output=None, clip_apply_ratio=0.5, control_video=None,
                reference_image=None, camera_poses="", camera_pose_stride=1):
        if batch_size < 1:
            raise EasyAnimateError(f"batch_size must be at least 1; got {batch_size}.")
        if isinstance(family_for(model.transformer.module), MMDiTFamily):
            return self._prepare_mmdit(positive, negative, model, vae, width, height, frames, batch_size, vae_seed,
                                       start_image, end_image, video, control_video, reference_image, camera_poses,
                                       camera_pose_stride)
        given = [name for name, value in (("control_video", control_video), ("reference_image", reference_image),
                                          ("camera_poses", (camera_poses or "").strip() or None)) if value is not None]
        if given:
            from ..easyanimate.pipeline import FAMILY_NAMES

            raise EasyAnimateError(f"{', '.join(given)}: inputs of EasyAnimate V5/V5.1 Control models; this model is "
                                   f"{FAMILY_NAMES[model.family]}. Disconnect or clear them.")
        return self._prepare_dit(positive, negative, model, vae, width, height, frames, batch_size, vae_seed, start_image,
                                 end_image, video, clip_vision_output, clip_apply_ratio)

    def _prepare_mmdit(self, positive, negative, model, vae, width, height, frames, batch_size, vae_seed, start_image,
                       end_image, video, control_video, reference_image, camera_poses, camera_pose_stride):
        """V5/V5.1: the request checked and its conditioning channels computed by the core's `MMDiTStages`, in the
        EasyAnimate Sampler's order of random draws (the start noise of `vae_seed`, then the noise on the known
        pixels); every encode takes the posterior mode, as the Sampler's."""
        from ..easyanimate.errors import check_seed
        from ..easyanimate.pipeline import conditioning_video, stages_for
        from .sampling import camera_rays, images_to_video

        runtime = host.current_host()
        generator = torch.Generator().manual_seed(check_seed(vae_seed, "vae_seed"))
        stages = stages_for(model.transformer.module, vae.vae)  # refuses a VAE of another family
        count = vae.vae.rules.round_frames(frames)
        if count.changed:
            log.warning("EasyAnimate: %d frames is not a count this model makes; preparing %d.", frames, count.frames)
        request = stages.request(
            frames=count.frames, height=height, width=width, scheduler_config=model.scheduler_config,
            start_images=images_to_frames(start_image) if start_image is not None else None,
            end_images=images_to_frames(end_image[-1:]) if end_image is not None else None,
            video=images_to_video(video), control_video=images_to_video(control_video),
            reference_image=images_to_frames(reference_image[:1]) if reference_image is not None else None,
            control_camera=camera_rays(stages, camera_poses, camera_pose_stride, height, width, count.frames))

        def encode(pixels):
            runtime.check_interrupt()
            with runtime.placed([vae.component], vae.vae.activation_bytes(pixels.shape[-2:], decode=False)):
                return vae.vae.encode_latents(pixels, sample=False).float().to(runtime.intermediate_device)

        cond = conditioning_video(request.frames, request.height, request.width, request.start_images,
                                  request.end_images, request.video)
        shape = stages.latent_shape(request, batch_size)
        samples = torch.zeros(shape) if video is None else encode(cond.video * 2 - 1).expand(shape).contiguous()
        stages.start_noise(request, 1, generator)  # the Sampler's first draw; the known pixels' noise comes after it
        inpaint, control = stages.conditioning_latents(request, cond, generator, encode)
        values = {name: value.float().to(runtime.intermediate_device)
                  for name, value in (("inpaint_latents", inpaint), ("control_latents", control)) if value is not None}
        if not values:
            return positive, negative, {"samples": samples}
        return set_values(positive, values), set_values(negative, values), {"samples": samples}

    def _prepare_dit(self, positive, negative, model, vae, width, height, frames, batch_size, vae_seed, start_image,
                     end_image, video, clip_vision_output, clip_apply_ratio):
        from ..easyanimate.errors import check_seed
        from ..easyanimate.image_encoder import CLIP_EMBED_DIM
        from ..easyanimate.pipeline import check_size, conditioning_video, inpaint_pixels

        runtime = host.current_host()
        transformer = model.transformer.module
        if not 0 <= clip_apply_ratio <= 1:
            raise EasyAnimateError(f"clip_apply_ratio must be in [0, 1], got {clip_apply_ratio}.")
        generator = torch.Generator().manual_seed(check_seed(vae_seed, "vae_seed"))
        check_size(transformer, height, width)
        count = vae.vae.rules.round_frames(frames)
        if count.changed:
            log.warning("EasyAnimate: %d frames is not a count this model makes; preparing %d.", frames, count.frames)
        inpaint_model = transformer.config.has_clip_projection
        if (start_image is not None or end_image is not None) and not inpaint_model:
            raise EasyAnimateError("Image-to-video needs an EasyAnimate V3 InP model (12 input channels); this model only "
                                   "does text-to-video and video-to-video.")
        cond = conditioning_video(
            count.frames, height, width,
            images_to_frames(start_image) if start_image is not None else None,
            images_to_frames(end_image[-1:]) if end_image is not None else None,
            images_to_frames(video).transpose(0, 1)[None] if video is not None else None)

        def encode(pixels):
            runtime.check_interrupt()
            with runtime.placed([vae.component], vae.vae.activation_bytes(pixels.shape[-2:], decode=False, tiling=None)):
                return vae.vae.encode_latents(pixels, generator=generator).float().to(runtime.intermediate_device)

        # The EasyAnimate Sampler's order of VAE draws: the conditioning video, then the mask and the masked video.
        video_latents = encode(cond.video * 2 - 1) if (inpaint_model or video is not None) else None
        shape = (batch_size, vae.vae.latent_channels, count.latents, height // 8, width // 8)
        samples = torch.zeros(shape) if video is None else video_latents.expand(shape).contiguous()
        if not inpaint_model:
            return positive, negative, {"samples": samples}

        inpaint = torch.cat([encode(pixels) for pixels in inpaint_pixels(cond)], dim=1)
        values = {"inpaint_latents": inpaint, "clip_apply_ratio": float(clip_apply_ratio)}
        embeds = None
        if cond.clip_image is not None:
            if clip_vision_output is not None:
                embeds = clip_vision_output.image_embeds.float().cpu()
                if embeds.ndim != 2 or embeds.shape[-1] != CLIP_EMBED_DIM:
                    raise EasyAnimateError(f"The CLIP vision output has image embeddings {tuple(embeds.shape)}; EasyAnimate "
                                           f"V3 takes ({CLIP_EMBED_DIM}-wide) ViT-L/14 embeddings (clip_vision_l).")
            elif model.image_encoder is not None:
                encoder, component = model.image_encoder.get()
                with runtime.placed([component]):
                    embeds = encoder.encode(cond.clip_image).float().cpu()
            else:
                log.warning("EasyAnimate: this model folder has no image_encoder/ and no CLIP vision output is connected; "
                            "image-to-video runs without CLIP tokens.")
        positive = set_values(positive, values if embeds is None else {**values, "clip_image_embeds": embeds})
        return positive, set_values(negative, values), {"samples": samples}


NODES = {
    "EasyAnimateNativeModel": (EasyAnimateNativeModel, "EasyAnimate → MODEL (native)"),
    "EasyAnimateT5EncodeConditioning": (EasyAnimateT5EncodeConditioning, "T5 Encode → CONDITIONING (EasyAnimate)"),
    "EasyAnimateV5TextEncodeConditioning": (EasyAnimateV5TextEncodeConditioning,
                                            "Text Encode V5/V5.1 → CONDITIONING (EasyAnimate)"),
    "EasyAnimateToVideo": (EasyAnimateToVideo, "EasyAnimate To Video (native)"),
}
