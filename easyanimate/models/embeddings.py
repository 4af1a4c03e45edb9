"""Input embeddings of the EasyAnimate DiT: patches, 2-D positions, timesteps, captions, CLIP image.

These follow PixArt-alpha (diffusers `PatchEmbed`, `AdaLayerNormSingle`, `PixArtAlphaTextProjection`),
including the float-precision details that change bits (docs/numerics.md#transformer).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[sin | cos] embedding of float positions, computed in float64 as the reference does."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.reshape(-1).double()[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int, base_size: int, interpolation_scale: float) -> torch.Tensor:
    """2-D sin-cos position embedding (grid_h * grid_w, dim) in float32.

    Every grid is stretched onto [0, base_size) in both axes. The coordinates are float32 (numpy float32
    arange divided by Python floats in the reference); the first half of the channels embeds the column
    coordinate and the second half the row coordinate (the MAE meshgrid convention).
    """
    scale_h = torch.tensor(grid_h / base_size, dtype=torch.float32)
    scale_w = torch.tensor(grid_w / base_size, dtype=torch.float32)
    interp = torch.tensor(interpolation_scale, dtype=torch.float32)
    rows = torch.arange(grid_h, dtype=torch.float32) / scale_h / interp
    cols = torch.arange(grid_w, dtype=torch.float32) / scale_w / interp
    row_of_token = rows[:, None].expand(grid_h, grid_w)
    col_of_token = cols[None, :].expand(grid_h, grid_w)
    emb = torch.cat([sincos_1d(dim // 2, col_of_token), sincos_1d(dim // 2, row_of_token)], dim=1)
    return emb.float()


class PatchEmbed(nn.Module):
    """2x2 patches of one frame -> tokens, plus the 2-D position embedding.

    The reference keeps the embedding of its default grid (sample_size/patch tokens per side) as a buffer
    cast to the model dtype, and recomputes any other grid in float32; both paths are reproduced because
    they round differently in bf16/fp16.
    """

    def __init__(self, in_channels, hidden_size, patch_size, sample_size, dtype=None, device=None, operations=nn):
        super().__init__()
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.base_size = sample_size // patch_size
        self.interpolation_scale = max(sample_size // 64, 1)
        self.proj = operations.Conv2d(
            in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True, dtype=dtype, device=device
        )

    def position_embedding(self, grid_h: int, grid_w: int, dtype: torch.dtype, device) -> torch.Tensor:
        pos = sincos_pos_embed_2d(self.hidden_size, grid_h, grid_w, self.base_size, self.interpolation_scale)
        if grid_h == self.base_size and grid_w == self.base_size:
            pos = pos.to(dtype)  # the default-grid buffer lives in the model dtype
        return pos.to(device)[None]

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, H/p * W/p, D)."""
        tokens = self.proj(frames)
        grid_h, grid_w = tokens.shape[-2:]
        tokens = tokens.flatten(2).transpose(1, 2)
        pos = self.position_embedding(grid_h, grid_w, tokens.dtype, tokens.device)
        return (tokens + pos).to(tokens.dtype)


def timestep_sinusoid(timesteps: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """[cos | sin] embedding of (possibly fractional) timesteps, float32 (diffusers `Timesteps`, flip_sin_to_cos)."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    args = timesteps[:, None].float() * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class MLPEmbedder(nn.Module):
    """linear_1 -> act -> linear_2; used for timesteps (SiLU) and text/CLIP projections (tanh-GELU)."""

    def __init__(self, in_features, hidden_size, out_features=None, activation="silu", dtype=None, device=None, operations=nn):
        super().__init__()
        out_features = out_features or hidden_size
        self.linear_1 = operations.Linear(in_features, hidden_size, bias=True, dtype=dtype, device=device)
        self.linear_2 = operations.Linear(hidden_size, out_features, bias=True, dtype=dtype, device=device)
        self.activation = activation

    def forward(self, x):
        x = self.linear_1(x)
        x = F.silu(x) if self.activation == "silu" else F.gelu(x, approximate="tanh")
        return self.linear_2(x)


class TimestepEmbedder(nn.Module):
    """Holds `timestep_embedder` under the key path `adaln_single.emb.timestep_embedder` of the checkpoints."""

    def __init__(self, hidden_size, dtype=None, device=None, operations=nn):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, hidden_size, dtype=dtype, device=device, operations=operations)

    def forward(self, timesteps, dtype):
        return self.timestep_embedder(timestep_sinusoid(timesteps).to(dtype))


class AdaLNSingle(nn.Module):
    """PixArt's adaLN-single: one timestep MLP shared by all blocks.

    Returns the six per-block modulation vectors (B, 6D) and the embedded timestep (B, D) that the final
    layer uses for its own shift/scale.
    """

    def __init__(self, hidden_size, dtype=None, device=None, operations=nn):
        super().__init__()
        self.emb = TimestepEmbedder(hidden_size, dtype=dtype, device=device, operations=operations)
        self.linear = operations.Linear(hidden_size, 6 * hidden_size, bias=True, dtype=dtype, device=device)

    def forward(self, timesteps, dtype):
        embedded = self.emb(timesteps, dtype)
        return self.linear(F.silu(embedded)), embedded
