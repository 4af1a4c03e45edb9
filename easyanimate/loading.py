"""Finding the family of a checkpoint and loading the transformer from every released layout.

Layouts accepted by `load_transformer`:
  - a release root (`transformer/`, `vae/`, `text_encoder/`, ... ) or its `transformer/` folder:
    `config.json` + one safetensors file, sharded safetensors with an index, or legacy `.bin`;
  - a single transformer file (e.g. the third-party bf16 V3 files), with or without a `state_dict`
    wrapper or a `transformer.` / `model.diffusion_model.` style prefix; its config comes from the
    family preset, with sizes read from the tensor shapes, or from `config=`;
  - V1: a PixArt-alpha base (2-D `Transformer2DModel` config) + the motion-module file
    (`motion_module=`), optionally + a personalized 2-D checkpoint (`personalized=`);
  - V5 / V5.1 (`EasyAnimateTransformer3DModel`, the MMDiT of `models/mmdit.py`): the release folders
    (original key layout, text stream in `attn2.*`) and the `-diffusers` folders (`attn1.add_q_proj`,
    `attn1.to_add_out`, `attn1.norm_added_q`, ...), as folders, sharded or single files. The family,
    the variant and the key layout are read from the keys, never from a folder name.
V4 folders are recognised and refused by name. A config whose sizes contradict the weights' shapes
(layer count, hidden size, channels) is refused before any model is built.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import (
    assign_tensors, check_config_against_weights, count_indexed, describe_keys, file_key_shapes, iter_file,
    meta_tensors, parse_dtype, read_json_config, weight_files,
)
from .errors import CheckpointMismatchError, LayoutError, UnsupportedModelError
from .models.mmdit import (
    DIFFUSERS_TEXT_STREAM, FAMILIES as MMDIT_FAMILIES, EasyAnimateMMDiT, MMDiTConfig, family_preset as mmdit_preset,
    variant_name,
)
from .models.transformer import EasyAnimateTransformer3D, TransformerConfig, family_preset

log = logging.getLogger(__name__)

# Deterministic buffers that some checkpoints carry; the model recomputes them (identical values).
_RECOMPUTED = re.compile(r"(^|\.)pos_embed\.pos_embed$|(^|\.)pos_encoder\.pe$")
# Prefixes that training/conversion tools put in front of the transformer's own key names.
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "model.", "module.", "net.")
_SIGNATURE = "adaln_single.linear.weight"
_MMDIT_SIGNATURE = "time_embedding.linear_1.weight"  # V5 / V5.1
# Key beginnings of V4's HunyuanDiT-style transformer.
_V4_KEYS = ("blocks.", "text_embedder.", "time_extra_emb.", "text_embedding_padding")
_V4 = ("EasyAnimate V4 (HunyuanTransformer3DModel: a HunyuanDiT-style transformer with Bert + mT5 text encoders "
       "in text_encoder/ and text_encoder_2/, 2-D RoPE and U-Net skips; a single, obsolete InP release)")
_UNSUPPORTED_HINT = ("This pack runs EasyAnimate V1, V2 and V3 (Transformer3DModel) and V5 / V5.1 "
                     "(EasyAnimateTransformer3DModel) checkpoints instead; V4 is not supported.")


@dataclass
class TransformerSource:
    """Where a transformer's config and weights are, and which family it is."""

    family: str
    files: list[Path]
    config: dict | None  # the checkpoint's own config.json, when it has one
    is_2d_base: bool = False  # a V1 PixArt base without motion module
    description: str = ""
    config_file: Path | None = None  # where `config` was read from
    layout: str = ""  # V5/V5.1: "original" (release folders) or "diffusers" (-diffusers folders)


def detect_family(path: str | Path) -> TransformerSource:
    """Identify the family of a release folder, a `transformer/` folder or a single transformer file."""
    path = Path(path)
    if not path.exists():
        raise LayoutError(f"'{path}' does not exist.")
    if path.is_file():
        return _detect_from_files([path], None, path)
    root, tdir = _transformer_dir(path)
    config = read_json_config(tdir / "config.json", what="transformer config")
    _refuse_v4(config, root)
    source = _detect_from_files(weight_files(tdir), config, tdir)
    if source.family not in MMDIT_FAMILIES and root is not None and (root / "text_encoder_2").is_dir():
        # V5 releases have text_encoder_2/ (mT5) too, but their transformer says it is V5 by its keys.
        raise UnsupportedModelError(
            f"'{root}' has a text_encoder_2/ folder and a transformer that is not V5/V5.1: it is {_V4}. {_UNSUPPORTED_HINT}"
        )
    source.config_file = tdir / "config.json"
    return source


def _transformer_dir(path: Path) -> tuple[Path, Path]:
    if (path / "transformer" / "config.json").is_file():
        return path, path / "transformer"
    if (path / "config.json").is_file():
        return path.parent, path
    if not path.is_dir():
        raise LayoutError(
            f"'{path}' is neither a folder nor a regular file; pass an EasyAnimate release folder, its "
            "transformer/ folder, or a transformer weights file."
        )
    found = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())[:12]
    raise LayoutError(
        f"'{path}' is not an EasyAnimate model folder. Expected a release folder with transformer/config.json "
        f"(plus vae/, text_encoder/, tokenizer/, scheduler/) or a transformer folder with config.json and "
        f"diffusion_pytorch_model*.safetensors; found: {found or 'nothing'}."
    )


def _refuse_v4(config: dict, root: Path | None) -> None:
    if config.get("_class_name", "") == "HunyuanTransformer3DModel":
        raise UnsupportedModelError(f"'{root}' is {_V4}. {_UNSUPPORTED_HINT}")


def _strip_prefix(keys) -> str:
    """The prefix in front of the model's own key names ('' when none)."""
    keys = list(keys)
    unprefixed_motion = (k.startswith("transformer_blocks.") and ".attn_temporal." in k for k in keys)
    if _SIGNATURE in keys or _MMDIT_SIGNATURE in keys or any(unprefixed_motion):
        return ""
    for prefix in _PREFIXES:
        if any(k.startswith(prefix) and k[len(prefix):].startswith(("adaln_single.", "transformer_blocks.", "time_embedding."))
               for k in keys):
            return prefix
    return ""


def _detect_from_files(files: list[Path], config: dict | None, where: Path) -> TransformerSource:
    shapes = {}
    for f in files:
        shapes.update(file_key_shapes(f))
    prefix = _strip_prefix(shapes)
    keys = {k[len(prefix):] for k in shapes if k.startswith(prefix)}
    has_motion = any(".attn_temporal." in k for k in keys)
    only_motion = bool(keys) and all(".attn_temporal." in k or _RECOMPUTED.search(k) for k in keys)
    if only_motion:
        raise LayoutError(
            f"'{where}' holds only motion-module weights (a V1 motion-module file such as easyanimate_v1_mm.safetensors). "
            "Load the PixArt-XL-2 base folder and pass this file as the motion module."
        )
    if _MMDIT_SIGNATURE in keys and _SIGNATURE not in keys:
        return _detect_mmdit({k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}, files, config, where)
    if _SIGNATURE not in keys:
        sample = sorted(shapes)[:6]
        if any(k.startswith(_V4_KEYS) for k in keys):
            raise UnsupportedModelError(f"'{where}' looks like a HunyuanDiT-style checkpoint: {_V4}. {_UNSUPPORTED_HINT}")
        raise LayoutError(
            f"'{where}' is not an EasyAnimate transformer checkpoint: it has neither '{_SIGNATURE}' (V1-V3) nor "
            f"'{_MMDIT_SIGNATURE}' (V5/V5.1). Expected key names such as 'pos_embed.proj.weight', "
            "'adaln_single.linear.weight', 'transformer_blocks.0.attn1.to_q.weight' (V1-V3) or 'proj.weight', "
            "'time_embedding.linear_1.weight', 'text_proj.1.weight' (V5/V5.1), optionally behind a 'transformer.' or "
            f"'model.diffusion_model.' prefix; found {len(shapes)} keys, e.g. {sample}."
        )
    patch = shapes[prefix + "pos_embed.proj.weight"] if prefix + "pos_embed.proj.weight" in shapes else None
    if config is not None and config.get("_class_name") == "Transformer2DModel" and not has_motion:
        return TransformerSource("v1", files, config, is_2d_base=True, description="PixArt-alpha base (V1)")

    block_type = (config or {}).get("basic_block_type")
    if block_type == "global_motionmodule" or any(k.startswith("clip_projection.") for k in keys) or (patch and patch[1] == 12):
        family = "v3"
    elif (block_type == "motionmodule" and (config or {}).get("enable_uvit")) or any(k.startswith("long_connect_fc.") for k in keys):
        family = "v2"
    elif has_motion:
        family = "v1"
    else:
        return TransformerSource("v1", files, config, is_2d_base=True, description="2-D PixArt transformer (V1 base)")
    return TransformerSource(family, files, config, description=f"EasyAnimate {family.upper()} transformer")


def _config_from_shapes(family: str, shapes: dict, prefix: str) -> dict:
    """A config for a config-less single file: the family preset with the sizes its tensors reveal."""
    preset = family_preset(family)
    get = lambda k: shapes.get(prefix + k)
    hidden, in_channels = get("pos_embed.proj.weight")[:2]
    if hidden != preset["num_attention_heads"] * preset["attention_head_dim"]:
        raise LayoutError(
            f"This single-file checkpoint has hidden size {hidden}, not the released {family.upper()} size "
            f"{preset['num_attention_heads'] * preset['attention_head_dim']}; its head count cannot be read from the "
            "weights. Pass the matching config.json."
        )
    blocks = {int(m.group(1)) for k in shapes if (m := re.match(re.escape(prefix) + r"transformer_blocks\.(\d+)\.", k))}
    out = get("proj_out.weight")[0] // preset["patch_size"] ** 2
    return dict(preset, in_channels=in_channels, num_layers=max(blocks) + 1, out_channels=out,
                caption_channels=get("caption_projection.linear_1.weight")[1], cross_attention_dim=hidden)


def load_transformer(
    path: str | Path,
    *,
    dtype="fp32",
    device="cpu",
    config: dict | str | Path | None = None,
    motion_module: str | Path | None = None,
    personalized: str | Path | None = None,
    operations=nn,
) -> EasyAnimateTransformer3D | EasyAnimateMMDiT:
    """Load an EasyAnimate V1/V2/V3 transformer, or a V5/V5.1 MMDiT (`EasyAnimateMMDiT`), in `dtype` on `device`.

    `config` (a dict or a config.json path) overrides the checkpoint's config keys, or supplies the config of
    a single file. `motion_module` and `personalized` are the V1 extras (a PixArt-alpha base takes the V1
    motion-module file, and optionally a personalized 2-D checkpoint over the base). The model is built on
    the meta device and each tensor is cast and placed as it is read, so peak memory stays near one copy
    of the weights. Raises LayoutError / CheckpointMismatchError / CorruptCheckpointError / UnsupportedModelError
    with the file and keys at fault; a failed load leaves nothing behind. The config's sizes are checked
    against the weights' shapes before the model is built, so a config claiming 20000 layers is refused at once.
    """
    dtype = parse_dtype(dtype)
    source = detect_family(path)
    overrides = _read_config_arg(config)
    shapes: dict = {}
    for f in source.files:
        shapes.update(file_key_shapes(f))
    prefix = _strip_prefix(shapes)
    if source.family in MMDIT_FAMILIES:
        if motion_module is not None or personalized is not None:
            raise LayoutError(
                f"A motion module or personalized checkpoint only goes with a V1 PixArt base; '{path}' is an "
                f"{source.description}."
            )
        return _load_mmdit(source, shapes, prefix, overrides, config, dtype, device, operations)

    if source.config is not None:
        raw = dict(source.config)
        if source.is_2d_base:
            # The 2-D PixArt config says nothing of motion modules: V1's come from the V1 preset.
            preset = family_preset("v1")
            raw = {**raw, **{k: preset[k] for k in ("basic_block_type", "motion_module_type", "motion_module_kwargs", "enable_uvit")}}
            raw["_class_name"] = "Transformer3DModel"
    elif overrides:
        raw = {}
    else:
        raw = _config_from_shapes(source.family, shapes, prefix)
    raw.update(overrides)
    _check_config_fits_weights(raw, source, shapes, prefix, overrides, config)
    cfg = TransformerConfig.from_dict(raw, source.family)

    motion_files = []
    if source.is_2d_base:
        if motion_module is None:
            raise LayoutError(
                f"'{path}' is a 2-D PixArt-alpha transformer (the V1 base) without motion module. Pass the V1 "
                "motion-module file (e.g. Motion_Module/easyanimate_v1_mm.safetensors) as the motion module."
            )
        motion_files = [Path(motion_module)]
    elif motion_module is not None:
        raise LayoutError(
            f"A separate motion module only goes with a V1 PixArt base; '{path}' is a full {source.family.upper()} "
            "transformer that already has its motion modules."
        )

    with torch.device("meta"):
        model = EasyAnimateTransformer3D(cfg, dtype=dtype, operations=operations)
    unexpected = set()
    for f in source.files:
        unexpected |= assign_tensors(model, iter_file(f), dtype=dtype, device=device, rename=_renamer(prefix), source=str(f))[1]
    if personalized is not None:
        p = Path(personalized)
        pshapes = file_key_shapes(p)
        assigned, extra = assign_tensors(model, iter_file(p), dtype=dtype, device=device,
                                         rename=_renamer(_strip_prefix(pshapes)), source=str(p))
        _refuse_unexpected(extra, p, "personalized transformer checkpoint")
        if not assigned:
            raise CheckpointMismatchError(
                f"Personalized checkpoint '{p}' matched no tensor of the transformer (keys such as "
                f"{sorted(pshapes)[:4]}); it is not a PixArt/EasyAnimate transformer checkpoint."
            )
    for mfile in motion_files:
        mshapes = file_key_shapes(mfile)
        if not any(".attn_temporal." in k for k in mshapes):
            raise LayoutError(
                f"'{mfile}' is not a motion-module file: it has no '...attn_temporal...' keys (found e.g. {sorted(mshapes)[:4]})."
            )
        _, extra = assign_tensors(model, iter_file(mfile), dtype=dtype, device=device,
                                  rename=_renamer(_strip_prefix(mshapes)), source=str(mfile))
        _refuse_unexpected(extra, mfile, "motion-module file")
    _refuse_unexpected(unexpected, source.files[0] if len(source.files) == 1 else source.files[0].parent, "transformer checkpoint")

    missing = meta_tensors(model)
    if missing:
        where = source.files[0] if len(source.files) == 1 else source.files[0].parent
        hint = " (the V1 motion module is missing or incomplete)" if any(".attn_temporal." in k for k in missing) else ""
        raise CheckpointMismatchError(
            f"'{where}' lacks weights the {source.family.upper()} transformer needs{hint}: missing "
            f"{describe_keys(missing)}. The file is incomplete or belongs to another model."
        )
    model.requires_grad_(False).eval()
    log.info("Loaded %s (%s, %d blocks, hidden %d) as %s on %s", source.description, source.family,
             cfg.num_layers, cfg.hidden_size, dtype, device)
    return model


# --- V5 / V5.1 (MMDiT) ------------------------------------------------------------------------------

def _mmdit_joint_blocks(keys) -> int:
    """How many blocks carry their own text-stream weights (attn2 / attn1.add_* / txt_ff): the MMDiT blocks."""
    found = set()
    for key in keys:
        parts = key.split(".")
        if len(parts) > 3 and parts[0] == "transformer_blocks" and parts[1].isdigit():
            if parts[2] in ("attn2", "txt_ff") or (parts[2] == "attn1" and parts[3] in _DIFFUSERS_TEXT_LAYERS):
                found.add(int(parts[1]))
    return len(found)


_DIFFUSERS_TEXT_LAYERS = {theirs.split(".", 1)[1] for theirs in DIFFUSERS_TEXT_STREAM}


def _mmdit_layout(keys, where) -> str:
    diffusers = any(f".{theirs}." in k for k in keys for theirs in DIFFUSERS_TEXT_STREAM)
    original = any(".attn2." in k for k in keys)
    if diffusers and original:
        raise LayoutError(
            f"'{where}' mixes the two V5 key layouts: it has text-stream weights both as 'attn2.*' (release layout) and "
            "as 'attn1.add_q_proj' / 'attn1.to_add_out' / ... (diffusers layout). Use the files of one release folder."
        )
    return "diffusers" if diffusers else "original"


def _detect_mmdit(shapes: dict, files: list[Path], config: dict | None, where: Path) -> TransformerSource:
    """V5 or V5.1 from the text projections; variant, size and key layout from the other keys."""
    if "text_proj_t5.weight" in shapes:
        family = "v5"
    elif "text_proj.0.weight" in shapes and "text_proj.1.weight" in shapes:
        family = "v51"
    else:
        raise LayoutError(
            f"'{where}' has EasyAnimate V5-style keys ('{_MMDIT_SIGNATURE}') but neither 'text_proj_t5.weight' (V5: "
            "Bert + mT5) nor 'text_proj.0.weight' + 'text_proj.1.weight' (V5.1: Qwen2-VL); it is incomplete or "
            f"another model (found e.g. {sorted(shapes)[:6]})."
        )
    layout = _mmdit_layout(shapes, where)
    proj = shapes.get("proj.weight")
    hidden, in_channels = (proj[0], proj[1]) if proj is not None and len(proj) == 4 else (0, 0)
    name = variant_name(family, count_indexed(shapes, "transformer_blocks."), _mmdit_joint_blocks(shapes), hidden, in_channels)
    return TransformerSource(family, files, config, description=f"EasyAnimate {name} transformer ({layout} layout)",
                             layout=layout)


def _mmdit_config_from_shapes(family: str, shapes: dict, prefix: str) -> dict:
    """A config for a config-less single file: the family preset with every size its tensors reveal."""
    preset = mmdit_preset(family)
    get = lambda k: shapes.get(prefix + k)
    hidden, in_channels, patch = get("proj.weight")[:3]
    head_dim = (get("transformer_blocks.0.attn1.norm_q.weight") or [preset["attention_head_dim"]])[0]
    text = get("text_proj.1.weight" if family == "v51" else "text_proj.weight")
    t5 = get("text_proj_t5.weight")
    return dict(
        preset, in_channels=in_channels, patch_size=patch, out_channels=get("proj_out.weight")[0] // patch**2,
        num_layers=count_indexed(shapes, prefix + "transformer_blocks."), mmdit_layers=_mmdit_joint_blocks(
            k[len(prefix):] for k in shapes if k.startswith(prefix)),
        num_attention_heads=hidden // head_dim, attention_head_dim=head_dim,
        time_embed_dim=get("time_embedding.linear_1.weight")[0], text_embed_dim=text[1],
        text_embed_dim_t5=t5[1] if t5 is not None else None,
    )


def _load_mmdit(source: TransformerSource, shapes: dict, prefix: str, overrides: dict, config_arg,
                dtype, device, operations) -> EasyAnimateMMDiT:
    if source.config is not None:
        raw = dict(source.config)
    elif overrides:
        raw = {}
    else:
        raw = _mmdit_config_from_shapes(source.family, shapes, prefix)
    raw.update(overrides)
    cfg = MMDiTConfig.from_dict(raw, source.family)
    _check_mmdit_config_fits_weights(cfg, source, shapes, prefix, overrides, config_arg)

    with torch.device("meta"):
        model = EasyAnimateMMDiT(cfg, dtype=dtype, operations=operations)
    rename = _mmdit_renamer(prefix)
    where = source.files[0] if len(source.files) == 1 else source.files[0].parent
    unexpected = set()
    for f in source.files:
        unexpected |= assign_tensors(model, iter_file(f), dtype=dtype, device=device, rename=rename, source=str(f))[1]
    _refuse_unexpected(unexpected, where, "transformer checkpoint")
    missing = meta_tensors(model)
    if missing:
        if source.layout == "diffusers":
            missing = [_to_diffusers_name(k) for k in missing]
        raise CheckpointMismatchError(
            f"'{where}' lacks weights the {cfg.name} transformer needs: missing {describe_keys(missing)}. The file "
            "is incomplete or belongs to another model."
        )
    model.requires_grad_(False).eval()
    log.info("Loaded %s (%d blocks, %d MMDiT, hidden %d) as %s on %s", source.description, cfg.num_layers,
             cfg.mmdit_layers, cfg.hidden_size, dtype, device)
    return model


def _check_mmdit_config_fits_weights(cfg: MMDiTConfig, source: TransformerSource, shapes: dict, prefix: str,
                                     overrides: dict, config_arg) -> None:
    """The sizes the config gives against those the tensor shapes give, before the model is built."""
    get = lambda key: shapes.get(prefix + key)

    def first(key, index):
        shape = get(key)
        return shape[index] if shape is not None and len(shape) > index else None

    p = cfg.patch_size
    out_rows = first("proj_out.weight", 0)
    out_channels = out_rows // (p * p) if out_rows is not None and p > 0 and out_rows % (p * p) == 0 else None
    text_key = "text_proj.1.weight" if cfg.add_norm_text_encoder else "text_proj.weight"
    unprefixed = [k[len(prefix):] for k in shapes if k.startswith(prefix)]
    heads, head_dim = cfg.num_attention_heads, cfg.attention_head_dim
    checks = [
        ("num_layers", cfg.num_layers, count_indexed(shapes, prefix + "transformer_blocks.")),
        ("mmdit_layers (blocks with their own text-stream weights)", cfg.mmdit_layers, _mmdit_joint_blocks(unprefixed)),
        (f"num_attention_heads x attention_head_dim ({heads} x {head_dim})", cfg.hidden_size, first("proj.weight", 0)),
        ("attention_head_dim", head_dim, first("transformer_blocks.0.attn1.norm_q.weight", 0)),
        ("in_channels", cfg.in_channels, first("proj.weight", 1)),
        ("patch_size", p, first("proj.weight", 2)),
        ("out_channels", cfg.out_channels, out_channels),
        ("time_embed_dim", cfg.time_embed_dim, first("time_embedding.linear_1.weight", 0)),
        ("text_embed_dim", cfg.text_embed_dim, first(text_key, 1)),
        ("text_embed_dim_t5", cfg.text_embed_dim_t5, first("text_proj_t5.weight", 1)),
    ]
    parts = []
    if source.config_file is not None:
        parts.append(f"'{source.config_file}'")
    if overrides:
        parts.append(f"'{config_arg}'" if isinstance(config_arg, (str, Path)) else "the config= settings")
    name = "The config " + " with ".join(parts) if parts else f"The {cfg.name} config read from the weights"
    where = source.files[0] if len(source.files) == 1 else source.files[0].parent
    check_config_against_weights(name, checks, str(where))


def _to_original_name(key: str) -> str:
    for theirs, ours in DIFFUSERS_TEXT_STREAM.items():
        token = f".{theirs}."
        if token in key:
            return key.replace(token, f".{ours}.", 1)
    return key


def _to_diffusers_name(key: str) -> str:
    for theirs, ours in DIFFUSERS_TEXT_STREAM.items():
        token = f".{ours}."
        if token in key:
            return key.replace(token, f".{theirs}.", 1)
    return key


def _mmdit_renamer(prefix: str):
    """File key -> model key: the prefix stripped, diffusers-layout text-stream names mapped to the release's."""
    def rename(key: str):
        if prefix:
            if not key.startswith(prefix):
                return key  # reported as unexpected
            key = key[len(prefix):]
        return _to_original_name(key)
    return rename


def _read_config_arg(config) -> dict:
    if config is None:
        return {}
    if isinstance(config, dict):
        return dict(config)
    return read_json_config(config, what="transformer config")


def _check_config_fits_weights(raw: dict, source: TransformerSource, shapes: dict, prefix: str,
                               overrides: dict, config_arg) -> None:
    """Compare the sizes the config claims with those the tensor shapes give, before anything is built.

    Checked: num_layers (blocks in the weights), hidden size (num_attention_heads x attention_head_dim
    against `pos_embed.proj.weight`), in_channels, patch_size, caption_channels, cross_attention_dim and
    out_channels. A config claiming 20000 layers of 4 real ones would otherwise build them all first.
    """
    merged = {**family_preset(source.family), **{k: v for k, v in raw.items() if v is not None}}
    get = lambda key: shapes.get(prefix + key)

    def first(key, index):
        shape = get(key)
        return shape[index] if shape is not None and len(shape) > index else None

    patch = merged.get("patch_size")
    out_rows = first("proj_out.weight", 0)
    out_channels = None
    if out_rows is not None and isinstance(patch, int) and patch > 0 and out_rows % (patch * patch) == 0:
        out_channels = out_rows // (patch * patch)
    heads, head_dim = merged.get("num_attention_heads"), merged.get("attention_head_dim")
    hidden_claim = heads * head_dim if isinstance(heads, int) and isinstance(head_dim, int) else (heads, head_dim)
    checks = [
        ("num_layers", merged.get("num_layers"), count_indexed(shapes, prefix + "transformer_blocks.")),
        (f"num_attention_heads x attention_head_dim ({heads} x {head_dim})", hidden_claim, first("pos_embed.proj.weight", 0)),
        ("in_channels", merged.get("in_channels"), first("pos_embed.proj.weight", 1)),
        ("patch_size", patch, first("pos_embed.proj.weight", 2)),
        ("caption_channels", merged.get("caption_channels"), first("caption_projection.linear_1.weight", 1)),
        ("cross_attention_dim", merged.get("cross_attention_dim"), first("transformer_blocks.0.attn2.to_k.weight", 1)),
        ("out_channels", merged.get("out_channels"), out_channels),
    ]
    parts = []
    if source.config_file is not None:
        parts.append(f"'{source.config_file}'")
    if overrides:
        parts.append(f"'{config_arg}'" if isinstance(config_arg, (str, Path)) else "the config= settings")
    name = "The config " + " with ".join(parts) if parts else f"The {source.family.upper()} preset config"
    where = source.files[0] if len(source.files) == 1 else source.files[0].parent
    check_config_against_weights(name, checks, str(where))


def _renamer(prefix: str):
    def rename(key: str):
        if prefix:
            if not key.startswith(prefix):
                return key  # reported as unexpected
            key = key[len(prefix):]
        return None if _RECOMPUTED.search(key) else key
    return rename


def _refuse_unexpected(unexpected, where, what):
    if unexpected:
        raise CheckpointMismatchError(
            f"{what} '{where}' has tensors this transformer does not have: {describe_keys(unexpected)}. "
            "It belongs to another model or another configuration (check config.json)."
        )
