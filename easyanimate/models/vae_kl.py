"""The SD `AutoencoderKL` (2-D) that EasyAnimate V1 applies to video frame by frame.

State-dict names are diffusers' (`encoder.down_blocks.{i}.resnets.{j}.…`, mid-block attention
`to_q/to_k/to_v/to_out.0`). Files written by old diffusers versions name the attention projections
`query/key/value/proj_attn`; `OLD_ATTENTION_NAMES` maps them.

    encoder: conv_in -> down_blocks[i] (ResnetBlock2D x n, then a stride-2 conv except in the last)
             -> mid_block (resnet, attention, resnet) -> conv_norm_out -> SiLU -> conv_out -> quant_conv
    decoder: post_quant_conv -> conv_in -> mid_block -> up_blocks[i] (ResnetBlock2D x n+1, then
             nearest x2 + conv except in the last) -> conv_norm_out -> SiLU -> conv_out
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

GROUP_NORM_EPS = 1e-6

OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


@dataclass
class KLConfig:
    """Fields of a diffusers `AutoencoderKL` config.json; defaults are SD's (PixArt's `vae/`)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: list = field(default_factory=lambda: [128, 256, 512, 512])
    down_block_types: list = field(default_factory=lambda: ["DownEncoderBlock2D"] * 4)
    up_block_types: list = field(default_factory=lambda: ["UpDecoderBlock2D"] * 4)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, values: dict) -> "KLConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


class ResnetBlock2D(nn.Module):
    def __init__(self, in_channels, out_channels, groups, dtype=None, device=None, operations=nn):
        super().__init__()
        self.norm1 = operations.GroupNorm(groups, in_channels, eps=GROUP_NORM_EPS, dtype=dtype, device=device)
        self.conv1 = operations.Conv2d(in_channels, out_channels, 3, padding=1, dtype=dtype, device=device)
        self.norm2 = operations.GroupNorm(groups, out_channels, eps=GROUP_NORM_EPS, dtype=dtype, device=device)
        self.conv2 = operations.Conv2d(out_channels, out_channels, 3, padding=1, dtype=dtype, device=device)
        self.conv_shortcut = None
        if in_channels != out_channels:
            self.conv_shortcut = operations.Conv2d(in_channels, out_channels, 1, dtype=dtype, device=device)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Downsample2D(nn.Module):
    def __init__(self, channels, dtype=None, device=None, operations=nn):
        super().__init__()
        self.conv = operations.Conv2d(channels, channels, 3, stride=2, dtype=dtype, device=device)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    def __init__(self, channels, dtype=None, device=None, operations=nn):
        super().__init__()
        self.conv = operations.Conv2d(channels, channels, 3, padding=1, dtype=dtype, device=device)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Attention2D(nn.Module):
    """Single-head self-attention over all H*W positions (diffusers' VAE attention block)."""

    def __init__(self, channels, groups, dtype=None, device=None, operations=nn):
        super().__init__()
        self.group_norm = operations.GroupNorm(groups, channels, eps=GROUP_NORM_EPS, dtype=dtype, device=device)
        self.to_q = operations.Linear(channels, channels, dtype=dtype, device=device)
        self.to_k = operations.Linear(channels, channels, dtype=dtype, device=device)
        self.to_v = operations.Linear(channels, channels, dtype=dtype, device=device)
        self.to_out = nn.ModuleList([operations.Linear(channels, channels, dtype=dtype, device=device)])

    def forward(self, x):
        b, c, h, w = x.shape
        tokens = x.flatten(2)  # (B, C, N)
        normed = self.group_norm(tokens).transpose(1, 2)
        q, k, v = (proj(normed).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v, scale=c**-0.5).squeeze(1)
        out = self.to_out[0](out)
        return (out.transpose(1, 2).reshape(b, c, h, w)) + x


class MidBlock2D(nn.Module):
    def __init__(self, channels, groups, add_attention=True, dtype=None, device=None, operations=nn):
        super().__init__()
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups, **kw) for _ in range(2)])
        self.attentions = nn.ModuleList([Attention2D(channels, groups, **kw)] if add_attention else [])

    def forward(self, x):
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class EncoderBlock2D(nn.Module):
    def __init__(self, in_channels, out_channels, layers, groups, downsample, dtype=None, device=None, operations=nn):
        super().__init__()
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, **kw) for i in range(layers)]
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, **kw)] if downsample else [])

    def forward(self, x):
        for module in (*self.resnets, *self.downsamplers):
            x = module(x)
        return x


class DecoderBlock2D(nn.Module):
    def __init__(self, in_channels, out_channels, layers, groups, upsample, dtype=None, device=None, operations=nn):
        super().__init__()
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups, **kw) for i in range(layers)]
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels, **kw)] if upsample else [])

    def forward(self, x):
        for module in (*self.resnets, *self.upsamplers):
            x = module(x)
        return x


class EncoderKL(nn.Module):
    def __init__(self, config: KLConfig, dtype=None, device=None, operations=nn):
        super().__init__()
        kw = dict(dtype=dtype, device=device, operations=operations)
        ch, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = operations.Conv2d(config.in_channels, ch[0], 3, padding=1, dtype=dtype, device=device)
        self.down_blocks = nn.ModuleList(
            EncoderBlock2D(ch[max(i - 1, 0)], ch[i], config.layers_per_block, groups, i < len(ch) - 1, **kw)
            for i in range(len(ch))
        )
        self.mid_block = MidBlock2D(ch[-1], groups, config.mid_block_add_attention, **kw)
        self.conv_norm_out = operations.GroupNorm(groups, ch[-1], eps=GROUP_NORM_EPS, dtype=dtype, device=device)
        self.conv_out = operations.Conv2d(ch[-1], 2 * config.latent_channels, 3, padding=1, dtype=dtype, device=device)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class DecoderKL(nn.Module):
    def __init__(self, config: KLConfig, dtype=None, device=None, operations=nn):
        super().__init__()
        kw = dict(dtype=dtype, device=device, operations=operations)
        ch, groups = list(reversed(config.block_out_channels)), config.norm_num_groups
        self.conv_in = operations.Conv2d(config.latent_channels, ch[0], 3, padding=1, dtype=dtype, device=device)
        self.mid_block = MidBlock2D(ch[0], groups, config.mid_block_add_attention, **kw)
        self.up_blocks = nn.ModuleList(
            DecoderBlock2D(ch[max(i - 1, 0)], ch[i], config.layers_per_block + 1, groups, i < len(ch) - 1, **kw)
            for i in range(len(ch))
        )
        self.conv_norm_out = operations.GroupNorm(groups, ch[-1], eps=GROUP_NORM_EPS, dtype=dtype, device=device)
        self.conv_out = operations.Conv2d(ch[-1], config.out_channels, 3, padding=1, dtype=dtype, device=device)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL2D(nn.Module):
    """SD's image VAE. `encode_chunk`/`decode_chunk` take video chunks (B, C, T, H, W) and run the
    2-D network on every frame independently (GroupNorm is per frame, so batching frames is exact)."""

    def __init__(self, config: KLConfig, dtype=None, device=None, operations=nn):
        super().__init__()
        self.config = config
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.encoder = EncoderKL(config, **kw)
        self.decoder = DecoderKL(config, **kw)
        latent = config.latent_channels
        self.quant_conv = operations.Conv2d(2 * latent, 2 * latent, 1, dtype=dtype, device=device)
        self.post_quant_conv = operations.Conv2d(latent, latent, 1, dtype=dtype, device=device)

    @staticmethod
    def _per_frame(fn, x):
        b, _, t = x.shape[:3]
        frames = x.transpose(1, 2).flatten(0, 1)  # (B*T, C, H, W)
        out = fn(frames)
        return out.unflatten(0, (b, t)).transpose(1, 2)

    def encode_chunk(self, x: torch.Tensor, mode: str = "frame") -> torch.Tensor:
        return self._per_frame(lambda f: self.quant_conv(self.encoder(f)), x)

    def decode_chunk(self, z: torch.Tensor, mode: str = "frame", before: int = 0, after: int = 0) -> torch.Tensor:
        return self._per_frame(lambda f: self.decoder(self.post_quant_conv(f)), z)


def rename_old_attention(key: str) -> str:
    """`…attentions.0.query.weight` -> `…attentions.0.to_q.weight` (files from diffusers < 0.14)."""
    parts = key.split(".")
    if len(parts) >= 2 and parts[-2] in OLD_ATTENTION_NAMES and "attentions" in parts:
        return ".".join(parts[:-2] + [OLD_ATTENTION_NAMES[parts[-2]], parts[-1]])
    return key
