"""LoRA for the EasyAnimate transformer and its T5 text encoder, applied without ever changing the base weights.

A LoRA file stores, per adapted layer, two low-rank factors `down` (rank x in) and `up` (out x rank) and
optionally an `alpha`. The layer's weight change is

    delta_W = strength * scale * (up @ down)        scale = alpha / rank  (1 when alpha is absent)

computed in float32 (see docs/numerics.md). Three steps, each its own function:

1. `read_lora(path)`: read the file once and group its tensors by layer, whatever the format:
     EasyAnimate / kohya        lora_unet__transformer_blocks_0_attn1_to_q.lora_down.weight / .lora_up.weight / .alpha
                                (double underscore from the reference's training code, or single), lora_te_... for T5
     OneTrainer / LyCORIS       lora_transformer_<path>.lora_down.weight, lycoris_<path>.lora_down.weight
     PEFT / diffusers           [transformer.|base_model.model.|diffusion_model.]<path>.lora_A.weight / .lora_B.weight,
                                scale from an `.alpha` tensor, else `lora_alpha`/`r` metadata or adapter_config.json
     old diffusers attn-procs   <path>.attn1.processor.to_q_lora.down.weight, ..to_out_lora.., <path>.lora.down.weight
2. `resolve_lora(lora, transformer, text_encoder=None)`: find each layer's module in the real module tree
   (names from `named_modules()`; kohya's `_`-joined paths are matched against the tree's own names with
   `.` written as `_`, so `to_out_0`, `attn_temporal` or `wi_0` need no guessing), check shapes, and
   report what was applied and what was skipped. The result is bound to those model objects.
3. `lora_patches(model, [(resolved, 0.75), (other, -0.3)], mode=...)`: a context manager that applies a
   stack of LoRAs for the duration of a `with` block and always undoes it, even on an exception or
   KeyboardInterrupt:
     mode="weights"  swaps in patched copies of the adapted weights (W + sum of deltas, cast once to W's
                     dtype: the reference's merge numerics) and puts the original Parameter objects back
                     afterwards, so restoration is exact, with no merge/unmerge drift. Extra memory while
                     applied: one copy of the adapted layers.
     mode="hooks"    leaves every weight alone and adds strength * scale * up(down(x)) to each adapted
                     layer's output (the reference's run-time LoRA numerics). Extra memory: the LoRA factors.

`LoRAStack` is a small chainable handle (base models + LoRAs with strengths) for nodes that add one LoRA
each. For ComfyUI's own machinery, `ResolvedLoRA.comfy_key_map()` and `.comfy_state_dict()` give the inputs
of `comfy.lora.load_lora(lora_sd, key_map)`, from the same resolution, so both paths give the same numbers.

Nothing is cached in module globals; a LoRA object holds only its own tensors.
"""
from __future__ import annotations

import json
import logging
import math
import re
import warnings
import weakref
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checkpoint import describe_keys, iter_file, safetensors_metadata, SAFETENSORS_SUFFIXES
from .errors import CorruptCheckpointError, EasyAnimateError, check_finite

log = logging.getLogger(__name__)

MODES = ("weights", "hooks")
TRANSFORMER, TEXT_ENCODER = "transformer", "text_encoder"
# Strengths beyond this are refused: LoRAs are used at about -2 ... 2, and 1e30 overflows the weights
# into inf/NaN (a black video) instead of failing.
MAX_LORA_STRENGTH = 100.0


class LoRAError(EasyAnimateError):
    """A LoRA that cannot be used with the given model (no matching layers, wrong sizes, bad tensors)."""


class LoRAFileError(LoRAError, CorruptCheckpointError):
    """A LoRA file that cannot be read."""


class LoRAMismatchError(LoRAError):
    """A LoRA layer whose rank or shape does not fit the module it names."""


class LoRAWarning(UserWarning):
    """A LoRA applied only in part (some of its layers match nothing, or use an unsupported adapter type)."""


# --------------------------------------------------------------------------------------------------------
# 1. Reading a file: tensors grouped per layer, whatever the format
# --------------------------------------------------------------------------------------------------------

# Tensor-name endings -> role. The part before the ending (the "stem") names the layer; it is exactly the
# LoRA key prefix that ComfyUI's `comfy.lora.load_lora` looks up for the same format.
_ROLE_SUFFIXES = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),                 # kohya, EasyAnimate, OneTrainer
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),     # PEFT state dict with adapter name
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),                     # PEFT / diffusers
    ("_lora.down.weight", "down"), ("_lora.up.weight", "up"),                 # old diffusers attention processors
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),                 # old diffusers LoRACompatibleLinear
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".alpha", "alpha"),
)

# Other adapter types: recognised so that the report can say what they are instead of "unknown key".
_UNSUPPORTED_SUFFIXES = {
    ".lora_mid.weight": "LoCon/Tucker mid factor (not supported)",
    ".dora_scale": "DoRA magnitude (not supported)",
    ".hada_w1_a": "LoHa (not supported)", ".hada_w1_b": "LoHa (not supported)",
    ".hada_w2_a": "LoHa (not supported)", ".hada_w2_b": "LoHa (not supported)",
    ".hada_t1": "LoHa (not supported)", ".hada_t2": "LoHa (not supported)",
    ".lokr_w1": "LoKr (not supported)", ".lokr_w2": "LoKr (not supported)",
    ".lokr_w1_a": "LoKr (not supported)", ".lokr_w1_b": "LoKr (not supported)",
    ".lokr_w2_a": "LoKr (not supported)", ".lokr_w2_b": "LoKr (not supported)", ".lokr_t2": "LoKr (not supported)",
    ".oft_blocks": "OFT (not supported)", ".oft_diag": "OFT (not supported)",
    ".diff": "full weight difference (not supported)", ".diff_b": "bias difference (not supported)",
    ".reshape_weight": "reshaped LoRA (not supported)",
}


@dataclass(frozen=True)
class LoRALayer:
    """The factors of one adapted layer, as stored in the file (any dtype; cast to float32 when used)."""

    stem: str  # e.g. "lora_unet__transformer_blocks_0_attn1_to_q" or "transformer.transformer_blocks.0.attn1.to_q"
    down: torch.Tensor  # (rank, in) or (rank, in, kh, kw)
    up: torch.Tensor  # (out, rank) or (out, rank, 1, 1)
    alpha: float | None  # from the file's `.alpha` tensor; None when it has none
    keys: tuple[str, ...]  # the file keys this layer was read from

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass(frozen=True)
class PeftScaling:
    """PEFT's LoraConfig scaling settings, used for layers that carry no `.alpha` tensor."""

    lora_alpha: float | None = None
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    use_rslora: bool = False

    def alpha_for(self, module_name: str) -> float | None:
        # PEFT matches pattern keys against the end of the module's dotted name.
        for pattern, alpha in self.alpha_pattern.items():
            if re.fullmatch(rf"(.*\.)?{pattern}", module_name):
                return float(alpha)
        return self.lora_alpha


@dataclass
class LoRAWeights:
    """A LoRA file read into memory, not yet tied to any model. Reusable across models and strengths."""

    name: str
    layers: dict[str, LoRALayer]  # stem -> layer
    unsupported: dict[str, str]  # file key -> why it is not used
    metadata: dict[str, str]
    peft: PeftScaling

    def __repr__(self) -> str:
        return f"LoRAWeights({self.name!r}, {len(self.layers)} layers)"


def read_lora(
    source: str | Path | Mapping[str, torch.Tensor],
    *,
    name: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> LoRAWeights:
    """Read a LoRA from a `.safetensors` (or `.bin`/`.pt`, loaded weights-only) file, or from a state dict.

    `metadata` supplies safetensors-style metadata for an in-memory state dict (a file's own metadata and a
    PEFT `adapter_config.json` beside it are read automatically). Raises LoRAFileError naming the file when
    it cannot be read, and LoRAError when it holds no LoRA tensors at all.
    """
    if isinstance(source, Mapping):
        tensors = dict(source)
        name = name or "state dict"
        metadata = dict(metadata or {})
        config_file = None
    else:
        path = Path(source)
        name = name or path.name
        if path.is_dir():
            inside = sorted(p.name for p in path.iterdir() if p.suffix in SAFETENSORS_SUFFIXES)[:6]
            raise LoRAFileError(
                f"LoRA path '{path}' is a folder, not a LoRA file. Pass the .safetensors file itself"
                + (f" (this folder holds {', '.join(inside)})." if inside else ".")
            )
        if not path.exists():
            raise LoRAFileError(f"LoRA file '{path}' does not exist.")
        if not path.is_file():
            raise LoRAFileError(f"LoRA path '{path}' is not a regular file; pass a .safetensors LoRA file.")
        try:
            tensors = dict(iter_file(path))
            file_metadata = safetensors_metadata(path) if path.suffix in SAFETENSORS_SUFFIXES else {}
        except CorruptCheckpointError as err:
            raise LoRAFileError(f"LoRA file '{path}' cannot be read: {err}") from None
        metadata = {**file_metadata, **(metadata or {})}
        config_file = path.parent / "adapter_config.json"

    _refuse_non_finite(tensors, name)
    grouped: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    unsupported: dict[str, str] = {}
    for key, tensor in tensors.items():
        stem, role = _split_key(key)
        if role is None:
            unsupported[key] = _unsupported_reason(key)
        else:
            grouped.setdefault(stem, {})[role] = (key, tensor)

    # A LoRA layer that also carries a DoRA scale or a Tucker mid factor would be applied wrongly without
    # them: such layers are left out as a whole.
    extended_stems = {key[: -len(sfx)] for key in unsupported for sfx in (".dora_scale", ".lora_mid.weight")
                      if key.endswith(sfx)}
    layers: dict[str, LoRALayer] = {}
    for stem, roles in grouped.items():
        if "down" not in roles or "up" not in roles or stem in extended_stems:
            if stem in extended_stems:
                reason = "part of a DoRA/LoCon layer (not supported)"
            elif "down" in roles or "up" in roles:
                reason = f"no matching '{'up' if 'down' in roles else 'down'}' factor"
            else:
                reason = "alpha of a layer without LoRA factors (another adapter type)"
            for key, _ in roles.values():
                unsupported[key] = reason
            continue
        down, up = roles["down"][1], roles["up"][1]
        alpha = None
        if "alpha" in roles:
            alpha_key, alpha_tensor = roles["alpha"]
            if alpha_tensor.numel() != 1:
                raise LoRAError(f"LoRA '{name}': '{alpha_key}' should be one number, but has shape "
                                f"{tuple(alpha_tensor.shape)}. The file is damaged or not a LoRA.")
            alpha = float(alpha_tensor.float().item())
            # kohya convention: alpha 0 means "no scaling", as if alpha were the rank.
            alpha = None if alpha == 0 else alpha
        layers[stem] = LoRALayer(stem, down, up, alpha, tuple(sorted(k for k, _ in roles.values())))

    if not layers:
        raise LoRAError(
            f"'{name}' contains no LoRA layers this pack can apply: none of its {len(tensors)} tensors is a "
            f"lora_down/lora_up or lora_A/lora_B pair (e.g. {describe_keys(tensors, 4)}). "
            + _unsupported_summary(unsupported)
        )
    peft = _peft_scaling(metadata, config_file, name)
    return LoRAWeights(name, layers, unsupported, metadata, peft)


def _refuse_non_finite(tensors: Mapping[str, torch.Tensor], name: str) -> None:
    """NaN or inf in a LoRA would turn every patched weight, and so the whole video, into NaN (black frames)."""
    bad = []
    for key, tensor in tensors.items():
        try:
            check_finite(tensor, key)
        except EasyAnimateError:
            bad.append(key)
    if bad:
        raise LoRAError(
            f"LoRA '{name}' holds NaN or infinite values in {describe_keys(bad)}; applied, it would make the "
            "whole video NaN (black frames). The file is damaged or came from a diverged training run: "
            "re-download it or export it again from a good checkpoint."
        )


def check_lora_strength(strength, what: str = "LoRA strength") -> float:
    """A finite strength with |strength| <= MAX_LORA_STRENGTH as a float, or LoRAError giving the range."""
    try:
        value = float(strength)
    except (TypeError, ValueError):
        raise LoRAError(f"The {what} must be a number from -{MAX_LORA_STRENGTH:g} to {MAX_LORA_STRENGTH:g}; got {strength!r}.") from None
    if not math.isfinite(value) or abs(value) > MAX_LORA_STRENGTH:
        raise LoRAError(
            f"The {what} must be a finite number from -{MAX_LORA_STRENGTH:g} to {MAX_LORA_STRENGTH:g} (usual: 0 to 1.5); "
            f"got {strength!r}."
        )
    return value


def _split_key(key: str) -> tuple[str, str | None]:
    for suffix, role in _ROLE_SUFFIXES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], role
    return key, None


def _unsupported_reason(key: str) -> str:
    for suffix, reason in _UNSUPPORTED_SUFFIXES.items():
        if key.endswith(suffix):
            return reason
    return "not a LoRA tensor name this pack recognises"


def _unsupported_summary(unsupported: Mapping[str, str]) -> str:
    if not unsupported:
        return ""
    reasons = sorted(set(unsupported.values()))
    return f"Unused tensors: {describe_keys(unsupported, 3)} ({'; '.join(reasons[:3])})."


def _peft_scaling(metadata: Mapping[str, str], config_file: Path | None, name: str) -> PeftScaling:
    """PEFT scaling from (in order) safetensors metadata, diffusers' packed adapter metadata, adapter_config.json."""
    settings: dict = {}
    if config_file is not None and config_file.is_file():
        try:
            settings.update(json.loads(config_file.read_text()))
        except (OSError, ValueError) as err:
            raise LoRAFileError(f"'{config_file}' (PEFT adapter config of LoRA '{name}') is not valid JSON: {err}") from None
    packed = metadata.get("lora_adapter_metadata")
    if packed:
        try:
            values = json.loads(packed)
        except ValueError:
            values = {}
        # diffusers packs the config per component ("transformer.lora_alpha"); a bare config also occurs.
        settings.update({k.split(".", 1)[-1]: v for k, v in values.items()})
    for key in ("lora_alpha", "r", "use_rslora", "alpha_pattern"):
        if key in metadata:
            value = metadata[key]
            try:
                settings[key] = json.loads(value) if isinstance(value, str) else value
            except ValueError:
                raise LoRAError(f"LoRA '{name}': metadata '{key}' = {value!r} is not a number or JSON value.") from None
    alpha = settings.get("lora_alpha")
    return PeftScaling(
        lora_alpha=None if alpha in (None, 0) else float(alpha),
        alpha_pattern=dict(settings.get("alpha_pattern") or {}),
        use_rslora=bool(settings.get("use_rslora", False)),
    )


# --------------------------------------------------------------------------------------------------------
# 2. Resolving layers against a model's module tree
# --------------------------------------------------------------------------------------------------------

# Prefixes that name the part a layer belongs to. Underscore prefixes are kohya-style (the path after them
# uses `_` for `.`); dotted ones are PEFT/diffusers-style. `base_model.model.` is PEFT's wrapper and says
# nothing about the part.
_PREFIXES: tuple[tuple[str, frozenset], ...] = (
    ("lora_unet_", frozenset({TRANSFORMER})),
    ("lora_transformer_", frozenset({TRANSFORMER})),
    ("lycoris_", frozenset({TRANSFORMER})),
    ("lora_te_", frozenset({TEXT_ENCODER})),
    ("model.diffusion_model.", frozenset({TRANSFORMER})),
    ("diffusion_model.", frozenset({TRANSFORMER})),
    ("unet.", frozenset({TRANSFORMER})),
    ("transformer.", frozenset({TRANSFORMER})),
    ("text_encoder.", frozenset({TEXT_ENCODER})),
    ("base_model.model.", frozenset({TRANSFORMER, TEXT_ENCODER})),
)
_BOTH = frozenset({TRANSFORMER, TEXT_ENCODER})


def _path_candidates(stem: str) -> tuple[frozenset, list[str]]:
    """The parts a stem may belong to, and the module paths it may name, least-stripped first.

    Each candidate is checked against the real module tree; trying the unstripped name first means a model
    that really has a submodule called e.g. `transformer` is never mis-resolved.
    """
    parts, candidates, rest = _BOTH, [stem], stem
    stripped = True
    while stripped:
        stripped = False
        for prefix, prefix_parts in _PREFIXES:
            if rest.startswith(prefix) and len(rest) > len(prefix):
                # The reference joins an empty parent name, hence `lora_unet__transformer_...`.
                rest = rest[len(prefix):].lstrip("_")
                parts = (parts & prefix_parts) or prefix_parts  # the innermost part-naming prefix wins
                candidates.append(rest)
                stripped = True
                break
    # Old diffusers attention processors: `attn1.processor.to_q` is `attn1.to_q`; `to_out` is `to_out.0`.
    for path in list(candidates):
        if ".processor." in path:
            plain = path.replace(".processor.", ".")
            candidates.append(plain + ".0" if plain.endswith(".to_out") else plain)
    return parts, candidates


class _ModuleTree:
    """The modules of one model, findable by dotted name or by the same name with `.` written as `_`."""

    def __init__(self, model: nn.Module, part: str):
        self.model, self.part = model, part
        root_prefix = _text_encoder_root(model) if part == TEXT_ENCODER else ""
        self.description = _describe_model(model, part)
        self.by_dotted: dict[str, str] = {}
        self.by_underscored: dict[str, list[str]] = {}
        self.modules: dict[str, nn.Module] = {}
        for full_name, module in model.named_modules():
            if not full_name.startswith(root_prefix):
                continue
            local = full_name[len(root_prefix):]
            self.modules[full_name] = module
            self.by_dotted[local] = full_name
            self.by_underscored.setdefault(local.replace(".", "_"), []).append(full_name)
        # Other names a model answers to (e.g. the V5 MMDiT's diffusers-layout names): {alias: module name}.
        aliases = {} if root_prefix else (getattr(model, "lora_aliases", None) or {})
        for alias, name in aliases.items():
            full_name = self.by_dotted.get(name)
            if full_name is None or alias in self.by_dotted:
                continue
            self.by_dotted[alias] = full_name
            names = self.by_underscored.setdefault(alias.replace(".", "_"), [])
            if full_name not in names:
                names.append(full_name)

    def find(self, path: str) -> str | None:
        """The full module name `path` denotes in this tree, or None."""
        if path in self.by_dotted:
            return self.by_dotted[path]
        names = self.by_underscored.get(path.replace(".", "_"), [])
        if len(names) > 1:
            # `a.b_c` and `a_b.c` both read `a_b_c`; prefer the one layer we could patch.
            layers = [n for n in names if _is_patchable(self.modules[n])]
            if len(layers) != 1:
                raise LoRAError(
                    f"LoRA layer name '{path}' is ambiguous in the {self.description}: it could be any of {names}. "
                    "Save the LoRA with dotted (PEFT-style) names instead."
                )
            return layers[0]
        return names[0] if names else None


def _text_encoder_root(model: nn.Module) -> str:
    """Name prefix of the T5 encoder inside `model` (empty when `model` is the T5EncoderModel itself).

    LoRA names for T5 start at the encoder model (`encoder.block.0.layer.0.SelfAttention.q`); a wrapper that
    holds the T5EncoderModel as an attribute is looked through.
    """
    for name, module in model.named_modules():
        encoder = getattr(module, "encoder", None)
        if isinstance(encoder, nn.Module) and hasattr(encoder, "block"):
            return f"{name}." if name else ""
    return ""


def _describe_model(model: nn.Module, part: str) -> str:
    config = getattr(model, "config", None)
    family, name = getattr(config, "family", None), getattr(config, "name", None)
    if part == TRANSFORMER and isinstance(family, str):
        return f"EasyAnimate {name if isinstance(name, str) else family.upper()} transformer"
    if part == TEXT_ENCODER:
        return f"T5 text encoder ({type(model).__name__})"
    return f"{part} ({type(model).__name__})"


def _is_patchable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv2d)) and isinstance(getattr(module, "weight", None), torch.Tensor)


@dataclass(frozen=True)
class BoundLayer:
    """One LoRA layer tied to the module it adapts, with its final scale (alpha / rank)."""

    module_name: str  # full dotted name in the model it was resolved against
    layer: LoRALayer
    scale: float
    alpha_source: str  # "tensor", "metadata" or "none"
    weight_shape: tuple[int, ...]

    def delta(self, device=None) -> torch.Tensor:
        """up @ down in float32, shaped like the module's weight (not yet multiplied by scale or strength)."""
        return _low_rank_product(self.layer.up, self.layer.down, device).reshape(self.weight_shape)


def _low_rank_product(up: torch.Tensor, down: torch.Tensor, device=None) -> torch.Tensor:
    """up @ down in float32 as (out, in * kernel size); conv factors are flattened first, as in the reference."""
    up = up.to(device=device, dtype=torch.float32)
    down = down.to(device=device, dtype=torch.float32)
    return torch.mm(up.flatten(1), down.flatten(1))


@dataclass
class LoRAPatch:
    """The layers of one LoRA that adapt one model (the transformer or the T5 encoder)."""

    lora_name: str
    part: str
    model_description: str
    layers: dict[str, BoundLayer]  # module name -> bound layer
    _model: weakref.ref = field(repr=False, default=None)

    def is_for(self, model: nn.Module) -> bool:
        return self._model is not None and self._model() is model

    def comfy_key_map(self, model_key_prefix: str = "") -> dict[str, str]:
        """ComfyUI `key_map` {LoRA key prefix as in the file: model state-dict key} for `comfy.lora.load_lora`.

        `model_key_prefix` is what ComfyUI puts in front of this model's state-dict keys (e.g.
        "diffusion_model." when the transformer is wrapped in a `comfy.model_base.BaseModel`; "" when our
        module itself is given to `ModelPatcher`).
        """
        return {b.layer.stem: f"{model_key_prefix}{name}.weight" for name, b in self.layers.items()}

    def comfy_state_dict(self) -> dict[str, torch.Tensor]:
        """This LoRA's tensors in kohya form (`<stem>.lora_up.weight`, `.lora_down.weight`, `.alpha`).

        Use it with `comfy_key_map()`: ComfyUI reads alpha only from `.alpha` tensors, so scales that came
        from PEFT metadata are written out as alpha tensors here, and ComfyUI computes the same deltas.
        """
        out = {}
        for bound in self.layers.values():
            stem = bound.layer.stem
            out[f"{stem}.lora_up.weight"] = bound.layer.up
            out[f"{stem}.lora_down.weight"] = bound.layer.down
            if bound.alpha_source != "none":
                out[f"{stem}.alpha"] = torch.tensor(bound.scale * bound.layer.rank, dtype=torch.float64)
        return out


@dataclass
class LoRAReport:
    """What a LoRA did to the models it was resolved against."""

    lora_name: str
    model_description: str
    applied: dict[str, int]  # part -> number of adapted layers
    skipped_text_encoder: list[str]  # stems of text-encoder layers (no text encoder was given)
    skipped_transformer: list[str]  # stems of transformer layers (no transformer was given)
    unmatched: list[str]  # stems that match no module of the given models
    unsupported: dict[str, str]  # file keys not used, and why

    @property
    def complete(self) -> bool:
        return not (self.skipped_text_encoder or self.skipped_transformer or self.unmatched or self.unsupported)

    def summary(self) -> str:
        lines = [f"LoRA '{self.lora_name}' on the {self.model_description}: "
                 + ", ".join(f"{n} {part} layers adapted" for part, n in self.applied.items())]
        if self.skipped_text_encoder:
            lines.append(f"skipped {describe_keys(self.skipped_text_encoder, 3)} text-encoder layers "
                         "(no text encoder was given)")
        if self.skipped_transformer:
            lines.append(f"skipped {describe_keys(self.skipped_transformer, 3)} transformer layers "
                         "(no transformer was given)")
        if self.unmatched:
            lines.append(f"skipped {describe_keys(self.unmatched, 5)} layers that match no module")
        if self.unsupported:
            lines.append(f"ignored {describe_keys(self.unsupported, 3)} tensors: "
                         + "; ".join(sorted(set(self.unsupported.values()))[:3]))
        return "; ".join(lines) + "."


@dataclass
class ResolvedLoRA:
    """A LoRA tied to a transformer (and optionally a T5 encoder): the input of `lora_patches` and `LoRAStack`."""

    lora: LoRAWeights
    transformer: LoRAPatch | None
    text_encoder: LoRAPatch | None
    report: LoRAReport

    def patch_for(self, model: nn.Module) -> LoRAPatch | None:
        for patch in (self.transformer, self.text_encoder):
            if patch is not None and patch.is_for(model):
                return patch
        return None

    def comfy_key_map(self, part: str = TRANSFORMER, model_key_prefix: str = "") -> dict[str, str]:
        return _part(self, part).comfy_key_map(model_key_prefix)

    def comfy_state_dict(self, part: str = TRANSFORMER) -> dict[str, torch.Tensor]:
        return _part(self, part).comfy_state_dict()


def _part(resolved: ResolvedLoRA, part: str) -> LoRAPatch:
    patch = {TRANSFORMER: resolved.transformer, TEXT_ENCODER: resolved.text_encoder}.get(part)
    if patch is None:
        raise LoRAError(f"LoRA '{resolved.lora.name}' has no layers resolved for the {part}.")
    return patch


def resolve_lora(
    lora: LoRAWeights | str | Path,
    transformer: nn.Module | None,
    text_encoder: nn.Module | None = None,
) -> ResolvedLoRA:
    """Tie each layer of `lora` to its module in `transformer` (and in `text_encoder`, when given).

    Text-encoder layers are reported as skipped when no `text_encoder` is given (`transformer` may be None to
    resolve the text-encoder part alone). Layers that match nothing are skipped with a LoRAWarning (also
    listed in the returned report). Raises LoRAError when no layer matches, and LoRAMismatchError when a
    layer's rank or shape does not fit its module.
    """
    if not isinstance(lora, LoRAWeights):
        lora = read_lora(lora)
    trees = {}
    if transformer is not None:
        trees[TRANSFORMER] = _ModuleTree(transformer, TRANSFORMER)
    if text_encoder is not None:
        trees[TEXT_ENCODER] = _ModuleTree(text_encoder, TEXT_ENCODER)
    if not trees:
        raise ValueError("resolve_lora needs a transformer, a text encoder, or both.")
    description = " and ".join(tree.description for tree in trees.values())

    bound: dict[str, dict[str, BoundLayer]] = {TRANSFORMER: {}, TEXT_ENCODER: {}}
    skipped_text, skipped_transformer, unmatched = [], [], []
    for stem, layer in lora.layers.items():
        parts, candidates = _path_candidates(stem)
        found = _find_module(trees.values(), parts, candidates)
        if found is None:
            if parts == {TEXT_ENCODER} and text_encoder is None:
                skipped_text.append(stem)
            elif parts == {TRANSFORMER} and transformer is None:
                skipped_transformer.append(stem)
            else:
                unmatched.append(stem)
            continue
        tree, module_name = found
        module = tree.modules[module_name]
        _check_fits(lora.name, stem, layer, module_name, module, tree.description)
        if module_name in bound[tree.part]:
            other = bound[tree.part][module_name].layer.stem
            raise LoRAError(
                f"LoRA '{lora.name}' has two layers for module '{module_name}' of the {tree.description}: "
                f"'{other}' and '{stem}'. The file mixes two formats or two LoRAs; keep one of them."
            )
        bound[tree.part][module_name] = _bind(module_name, layer, lora.peft, tuple(module.weight.shape))

    report = LoRAReport(
        lora_name=lora.name,
        model_description=description,
        applied={part: len(layers) for part, layers in bound.items() if layers},
        skipped_text_encoder=sorted(skipped_text),
        skipped_transformer=sorted(skipped_transformer),
        unmatched=sorted(unmatched),
        unsupported=dict(lora.unsupported),
    )
    if not report.applied:
        raise LoRAError(_no_match_message(lora, description, skipped_text, skipped_transformer))
    if report.unmatched or report.unsupported:
        warnings.warn(report.summary(), LoRAWarning, stacklevel=2)
    elif report.skipped_text_encoder or report.skipped_transformer:
        log.info(report.summary())

    def patch(part):
        if not bound[part]:
            return None
        tree = trees[part]
        return LoRAPatch(lora.name, part, tree.description, bound[part], weakref.ref(tree.model))

    return ResolvedLoRA(lora=lora, transformer=patch(TRANSFORMER), text_encoder=patch(TEXT_ENCODER), report=report)


def _find_module(trees: Iterable[_ModuleTree], parts: frozenset, candidates: list[str]):
    for tree in trees:
        if tree.part not in parts:
            continue
        for path in candidates:
            name = tree.find(path)
            if name is not None:
                return tree, name
    return None


def _bind(module_name: str, layer: LoRALayer, peft: PeftScaling, weight_shape: tuple[int, ...]) -> BoundLayer:
    if layer.alpha is not None:
        alpha, source = layer.alpha, "tensor"
    else:
        alpha = peft.alpha_for(module_name)
        source = "none" if alpha is None else "metadata"
    if alpha is None:
        scale = 1.0
    elif source == "metadata" and peft.use_rslora:
        scale = alpha / math.sqrt(layer.rank)
    else:
        scale = alpha / layer.rank
    return BoundLayer(module_name, layer, scale, source, weight_shape)


def _check_fits(lora_name, stem, layer: LoRALayer, module_name, module: nn.Module, where: str) -> None:
    up, down = layer.up, layer.down
    if not _is_patchable(module):
        raise LoRAMismatchError(
            f"LoRA '{lora_name}' layer '{stem}' names '{module_name}' of the {where}, which is a "
            f"{type(module).__name__}, not a Linear or Conv2d layer; this LoRA was made for another model."
        )
    if up.ndim not in (2, 4) or down.ndim not in (2, 4) or up.shape[1] != down.shape[0]:
        raise LoRAMismatchError(
            f"LoRA '{lora_name}' layer '{stem}' is inconsistent: up {tuple(up.shape)} and down {tuple(down.shape)} "
            f"do not have the same rank (up's 2nd size must equal down's 1st). The file is damaged or mixes two LoRAs."
        )
    weight = module.weight
    fits = up.shape[0] == weight.shape[0] and down.flatten(1).shape[1] == weight[0].numel()
    if isinstance(module, nn.Conv2d):
        fits = fits and up.flatten(1).shape[1] == up.shape[1]  # up must be 1x1
        fits = fits and (down.ndim == 2 or tuple(down.shape[1:]) == tuple(weight.shape[1:]))
    if not fits:
        raise LoRAMismatchError(
            f"LoRA '{lora_name}' layer '{stem}' does not fit '{module_name}' of the {where}: the module's weight is "
            f"{tuple(weight.shape)}, the LoRA gives up {tuple(up.shape)} @ down {tuple(down.shape)} (rank "
            f"{layer.rank}). The LoRA was trained for a model of another size or family."
        )


# Names that betray the model a LoRA was trained for, for the "matches nothing" message.
_FOREIGN_HINTS = (
    (("down_blocks", "input_blocks", "mid_block", "up_blocks"), "a Stable Diffusion UNet"),
    (("double_blocks", "single_blocks", "single_transformer_blocks"), "Flux or HunyuanVideo"),
    (("joint_blocks", "context_block"), "Stable Diffusion 3"),
    (("self_attn", "cross_attn", "ffn"), "a Wan/CogVideoX-style video model"),
    (("text_model_encoder_layers", "text_model.encoder.layers"), "a CLIP text encoder"),
)


def _no_match_message(lora: LoRAWeights, description: str, skipped_text: list, skipped_transformer: list) -> str:
    if skipped_text and len(skipped_text) == len(lora.layers):
        return (f"LoRA '{lora.name}' only adapts the text encoder ({describe_keys(skipped_text, 3)}); "
                "give the T5 text encoder to apply it.")
    if skipped_transformer and len(skipped_transformer) + len(skipped_text) == len(lora.layers):
        return (f"LoRA '{lora.name}' has no text-encoder layers for the {description}; its "
                f"{len(skipped_transformer)} layers adapt the transformer.")
    stems = sorted(lora.layers)
    hint = next((who for words, who in _FOREIGN_HINTS if any(w in s for s in stems for w in words)), None)
    guess = f" Its layer names look like {hint}." if hint else ""
    return (
        f"LoRA '{lora.name}' matches no layer of the {description}: none of its {len(stems)} layer names "
        f"(e.g. {', '.join(stems[:3])}) names a module of this model.{guess} Use a LoRA trained for EasyAnimate "
        "(or a PixArt-alpha LoRA for the 2-D layers); expected names such as "
        "'lora_unet__transformer_blocks_0_attn1_to_q' or 'transformer.transformer_blocks.0.attn1.to_q'."
    )


# --------------------------------------------------------------------------------------------------------
# 3. Applying a stack of LoRAs for the duration of a `with` block
# --------------------------------------------------------------------------------------------------------

StackItem = tuple["ResolvedLoRA | LoRAPatch", float]


@contextmanager
def lora_patches(model: nn.Module, stack: Iterable[StackItem], mode: str = "weights") -> Iterator[nn.Module]:
    """Apply `[(lora, strength), ...]` to `model` inside the `with` block; undo it on exit, however it exits.

    Each `lora` is a ResolvedLoRA (its part for `model` is used) or a LoRAPatch. Strengths may be negative;
    0 leaves the model untouched. The base weights are never written to. Place the model on its compute
    device before entering, and do not move it inside the block.
    """
    if mode not in MODES:
        raise ValueError(f"Unknown LoRA mode '{mode}'; use one of {', '.join(MODES)}.")
    per_module = _stack_by_module(model, stack)
    if getattr(model, "_easyanimate_lora_active", False):
        raise LoRAError(
            "LoRAs are already applied to this model by an enclosing `lora_patches` block; pass every LoRA "
            "in one stack instead of nesting blocks."
        )
    modules = dict(model.named_modules())
    undo: list = []
    model._easyanimate_lora_active = True
    try:
        # Each change is recorded in `undo` as soon as it is made, so an interruption half-way through
        # applying is undone as well.
        apply = {"weights": _swap_in_patched_weights, "hooks": _attach_low_rank_hooks}[mode]
        apply(modules, per_module, undo)
        yield model
    finally:
        for restore in reversed(undo):
            restore()
        del model._easyanimate_lora_active


def _stack_by_module(model: nn.Module, stack: Iterable[StackItem]) -> dict[str, list[tuple[BoundLayer, float]]]:
    per_module: dict[str, list[tuple[BoundLayer, float]]] = {}
    for item in stack:
        try:
            lora, strength = item
        except (TypeError, ValueError):
            raise TypeError(f"LoRA stack items are (lora, strength) pairs; got {item!r}.") from None
        patch = lora.patch_for(model) if isinstance(lora, ResolvedLoRA) else lora
        if isinstance(lora, ResolvedLoRA) and patch is None:
            continue  # this LoRA adapts nothing in `model` (e.g. a transformer-only LoRA and the T5)
        if not isinstance(patch, LoRAPatch):
            raise TypeError(f"Expected a ResolvedLoRA or LoRAPatch, got {type(lora).__name__}.")
        if not patch.is_for(model):
            raise LoRAError(
                f"LoRA '{patch.lora_name}' was resolved against another model object than the one given; "
                "call resolve_lora with this model."
            )
        strength = check_lora_strength(strength, f"strength of LoRA '{patch.lora_name}'")
        if strength == 0.0:
            continue  # exactly no effect, not W + 0 * delta
        for name, bound in patch.layers.items():
            per_module.setdefault(name, []).append((bound, strength))
    return per_module


def _patched_weight(original: torch.Tensor, entries) -> nn.Parameter:
    """W + sum of (strength * scale) * (up @ down), summed in float32 and cast once to W's dtype."""
    patched = original.detach().to(torch.float32)
    for bound, strength in entries:
        # Same order of operations as the reference merge: (strength * scale) * (up @ down), then add.
        patched = patched + (strength * bound.scale) * bound.delta(device=original.device)
    return nn.Parameter(patched.to(original.dtype), requires_grad=False)


def _put_back(module: nn.Module, original: nn.Parameter):
    return lambda: module._parameters.__setitem__("weight", original)


def _swap_in_patched_weights(modules, per_module, undo: list) -> None:
    for name, entries in per_module.items():
        module = modules[name]
        original = module._parameters["weight"]
        module._parameters["weight"] = _patched_weight(original, entries)
        undo.append(_put_back(module, original))


def _attach_low_rank_hooks(modules, per_module, undo: list) -> None:
    for name, entries in per_module.items():
        module = modules[name]
        device = module.weight.device
        factors = [
            (bound.layer.down.to(device, torch.float32), bound.layer.up.to(device, torch.float32), strength * bound.scale)
            for bound, strength in entries
        ]
        hook = module.register_forward_hook(_low_rank_hook(module, factors))
        undo.append(hook.remove)


def _low_rank_hook(module: nn.Module, factors):
    """A forward hook adding sum(c * up(down(x))) to the module's output, computed in float32."""
    conv = isinstance(module, nn.Conv2d)

    def add_low_rank(mod, args, output):
        x = args[0].to(torch.float32)
        extra = None
        for down, up, coefficient in factors:
            # a module whose weights are streamed to another device (block swap) runs there: follow it
            down, up = down.to(x.device), up.to(x.device)
            if conv:
                kernel = down if down.ndim == 4 else down.reshape(down.shape[0], *mod.weight.shape[1:])
                h = F.conv2d(x, kernel, None, mod.stride, mod.padding, mod.dilation)
                h = F.conv2d(h, up.reshape(*up.shape[:2], 1, 1))
            else:
                h = F.linear(F.linear(x, down), up)
            h = h * coefficient
            extra = h if extra is None else extra + h
        return output + extra.to(output.dtype)

    return add_low_rank


class LoRAStack:
    """A transformer (and optionally its T5 encoder) plus LoRAs with strengths. Immutable and chainable.

        stack = LoRAStack(transformer, t5).with_lora(resolve_lora(path, transformer, t5), 0.75, 1.0)
        with stack.applied():            # or applied("hooks")
            out = transformer(...)

    `with_lora` returns a new stack; the base models are shared and never modified, so changing a strength
    or a LoRA never needs a reload.
    """

    def __init__(self, transformer: nn.Module, text_encoder: nn.Module | None = None, loras: tuple = ()):
        self.transformer, self.text_encoder = transformer, text_encoder
        self.loras: tuple[tuple[ResolvedLoRA, float, float], ...] = tuple(loras)

    def with_lora(self, lora: ResolvedLoRA, strength: float = 1.0, text_encoder_strength: float | None = None) -> "LoRAStack":
        """A new stack with `lora` added; `text_encoder_strength` defaults to `strength`."""
        if not isinstance(lora, ResolvedLoRA):
            raise TypeError("with_lora takes the result of resolve_lora(...).")
        if lora.transformer is not None and not lora.transformer.is_for(self.transformer):
            raise LoRAError(f"LoRA '{lora.lora.name}' was resolved against another transformer than this stack's.")
        te_strength = strength if text_encoder_strength is None else text_encoder_strength
        strength = check_lora_strength(strength, f"strength of LoRA '{lora.lora.name}'")
        te_strength = check_lora_strength(te_strength, f"text encoder strength of LoRA '{lora.lora.name}'")
        return LoRAStack(self.transformer, self.text_encoder, self.loras + ((lora, strength, te_strength),))

    @property
    def reports(self) -> list[LoRAReport]:
        return [lora.report for lora, _, _ in self.loras]

    @contextmanager
    def applied(self, mode: str = "weights", text_encoder: bool = True):
        """Apply every LoRA of the stack to the transformer (and the T5 when `text_encoder`) inside the block."""
        with ExitStack() as stack:
            stack.enter_context(lora_patches(
                self.transformer, [(lora, s) for lora, s, _ in self.loras if lora.transformer is not None], mode))
            if text_encoder and self.text_encoder is not None:
                stack.enter_context(lora_patches(
                    self.text_encoder, [(lora, s) for lora, _, s in self.loras if lora.text_encoder is not None], mode))
            yield self


def comfy_key_map(
    lora: LoRAWeights | str | Path,
    model: nn.Module,
    *,
    part: str = TRANSFORMER,
    model_key_prefix: str = "",
) -> dict[str, str]:
    """ComfyUI `key_map` for `comfy.lora.load_lora(lora_sd, key_map)`, from the same resolution as `resolve_lora`.

    `part` says whether `model` is the transformer or the T5 text encoder.
    """
    if part == TEXT_ENCODER:
        resolved = resolve_lora(lora, None, model)
    else:
        resolved = resolve_lora(lora, model)
    return resolved.comfy_key_map(part, model_key_prefix)
