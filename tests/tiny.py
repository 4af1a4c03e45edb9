"""Tiny transformer configs and checkpoints in the released layouts, for loader tests."""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from easyanimate.models.transformer import EasyAnimateTransformer3D, TransformerConfig, family_preset

TINY = {
    "num_attention_heads": 2, "attention_head_dim": 16, "cross_attention_dim": 32, "caption_channels": 24,
    "sample_size": 8,
}
TINY_MOTION = {"num_attention_heads": 4, "temporal_position_encoding_max_len": 16}


def tiny_config_dict(family: str, num_layers: int | None = None, **extra) -> dict:
    cfg = dict(family_preset(family), **TINY)
    cfg["num_layers"] = num_layers or (4 if family == "v1" else 16)
    for key in ("motion_module_kwargs", "motion_module_kwargs_even", "motion_module_kwargs_odd"):
        if cfg.get(key):
            cfg[key] = dict(cfg[key], **TINY_MOTION)
    cfg.update(extra)
    return cfg


def random_model(family: str, seed: int = 0, scale: float = 0.1, **kw) -> EasyAnimateTransformer3D:
    """A tiny model whose every parameter is non-zero random (so every path changes the output)."""
    cfg = TransformerConfig.from_dict(tiny_config_dict(family, **kw), family)
    model = EasyAnimateTransformer3D(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model


def full_state_dict(model) -> dict:
    """The state dict as the reference writes it, including the `pe` tables our model recomputes."""
    from easyanimate.models.motion import frame_position_table

    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    for name, module in model.named_modules():
        if name.endswith(("attention_blocks.0", "attention_blocks.1")):
            table = frame_position_table(module.max_frames, module.dim)[None]
            sd[f"{name}.pos_encoder.pe"] = table
    return sd


def write_folder(folder: Path, config: dict, state_dict: dict, shards: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    if shards == 1:
        save_file(state_dict, str(folder / "diffusion_pytorch_model.safetensors"))
        return folder
    keys = sorted(state_dict)
    weight_map = {}
    for i in range(shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state_dict[k] for k in keys[i::shards]}
        save_file(part, str(folder / name))
        weight_map.update({k: name for k in part})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def example_inputs(model, frames=3, height=6, width=8, batch=2, seed=1):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, frames, height, width, generator=g)
    kwargs = dict(
        x=x,
        timestep=torch.tensor([999.0, 500.5][:batch]),
        encoder_hidden_states=torch.randn(batch, 7, cfg.caption_channels, generator=g),
        encoder_attention_mask=torch.tensor([[1] * 4 + [0] * 3, [1] * 7][:batch]),
    )
    if cfg.in_channels == 12:
        kwargs["inpaint_latents"] = torch.randn(batch, 8, frames, height, width, generator=g)
        kwargs["clip_encoder_hidden_states"] = torch.randn(batch, 768, generator=g)
        kwargs["clip_attention_mask"] = torch.ones(batch, 8)
    return kwargs


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs)
