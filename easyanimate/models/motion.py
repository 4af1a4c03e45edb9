"""The motion module: attention across frames, inserted into every DiT block (docs/numerics.md#motion-module).

One `MotionModule` per block, under the checkpoint key `attn_temporal`. It normalises each frame,
projects, runs attention sub-blocks whose mode is
  - "Temporal": each spatial position attends to itself across the frames (V2/V3, block size 1), or
    each 2x2 cell of positions across the frames (V1 "VanillaGrid", block size 2);
  - "Global": every token of the clip attends to every other (V3, odd blocks);
then a gated feed-forward, and adds the result to its input.
"""
import math

import torch
import torch.nn as nn
from einops import rearrange

from .attention import Attention, FeedForward, apply_layer_norm, make_layer_norm


def frame_position_table(num_frames: int, dim: int, device=None) -> torch.Tensor:
    """Sinusoidal frame positions (num_frames, dim) in float32, computed as the reference's `pe` buffer.

    The reference stores a (1, max_len, dim) table in every checkpoint; computing only the rows a clip
    needs saves about 1 GB of memory on the full-size model and gives the same values.
    """
    position = torch.arange(num_frames, device=device)[:, None]
    div_term = torch.exp(torch.arange(0, dim, 2, device=device) * (-math.log(10000.0) / dim))
    table = torch.zeros(num_frames, dim, device=device)
    table[:, 0::2] = torch.sin(position * div_term)
    table[:, 1::2] = torch.cos(position * div_term)
    return table


class FrameAttention(Attention):
    """Self-attention along time ("Temporal") or over the whole clip ("Global") with frame positions added.

    q/k/v have no bias; the output projection has one (the reference's `VersatileAttention`).
    """

    def __init__(self, mode, dim, heads, head_dim, block_size=1, max_frames=4096, add_positions=True,
                 positions_for_single_frame=True, dtype=None, device=None, operations=nn):
        super().__init__(dim, heads, head_dim, qkv_bias=False, dtype=dtype, device=device, operations=operations)
        if mode not in ("Temporal", "Global"):
            raise ValueError(f"Unknown motion-module attention mode '{mode}' (expected Temporal or Global).")
        self.mode, self.dim, self.block_size = mode, dim, block_size
        self.max_frames, self.add_positions = max_frames, add_positions
        self.positions_for_single_frame = positions_for_single_frame

    def attend(self, tokens):
        return super().forward(tokens)

    def forward(self, x: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
        """x (B*F, h*w, C) normalised tokens -> attention output of the same shape."""
        x = rearrange(x, "(b f) (h w) c -> b f h w c", f=frames, h=height, w=width)
        if self.add_positions and (frames > 1 or self.positions_for_single_frame):
            if frames > self.max_frames:
                raise ValueError(
                    f"The motion module knows positions for at most {self.max_frames} latent frames, got {frames}. "
                    "Generate fewer frames (or in segments)."
                )
            table = frame_position_table(frames, x.shape[-1], device=x.device).to(x.dtype)
            x = x + table[None, :, None, None, :]

        if self.mode == "Global":
            out = self.attend(rearrange(x, "b f h w c -> b (f h w) c"))
            return rearrange(out, "b (f h w) c -> (b f) (h w) c", f=frames, h=height, w=width)

        n = self.block_size
        if n == 1:
            out = self.attend(rearrange(x, "b f h w c -> (b h w) f c"))
            return rearrange(out, "(b h w) f c -> (b f) (h w) c", h=height, w=width)
        if height % n or width % n:
            raise ValueError(
                f"The V1 motion module attends over {n}x{n} cells of latent patches, so the token grid "
                f"({height}x{width}) must be divisible by {n}: use a width and height that are multiples of {16 * n} pixels."
            )
        cells = rearrange(x, "b f (h n) (w m) c -> (b h w) (f n m) c", n=n, m=n)
        out = self.attend(cells)
        return rearrange(out, "(b h w) (f n m) c -> (b f) (h n w m) c", h=height // n, w=width // n, n=n, m=n)


class MotionTransformerBlock(nn.Module):
    """Attention sub-blocks (each pre-normed, with residual) followed by a GEGLU feed-forward."""

    def __init__(self, dim, heads, head_dim, attention_modes, block_size, max_frames, add_positions,
                 positions_for_single_frame, fp32_norms, dtype=None, device=None, operations=nn):
        super().__init__()
        self.attention_blocks = nn.ModuleList([
            FrameAttention(mode, dim, heads, head_dim, block_size, max_frames, add_positions,
                           positions_for_single_frame, dtype=dtype, device=device, operations=operations)
            for mode in attention_modes
        ])
        self.norms = nn.ModuleList([
            make_layer_norm(operations, dim, 1e-5, fp32_norms, dtype=dtype, device=device) for _ in attention_modes
        ])
        self.ff = FeedForward(dim, gated=True, dtype=dtype, device=device, operations=operations)
        self.ff_norm = make_layer_norm(operations, dim, 1e-5, fp32_norms, dtype=dtype, device=device)

    def forward(self, x, frames, height, width):
        for attention, norm in zip(self.attention_blocks, self.norms):
            x = x + attention(apply_layer_norm(norm, x), frames, height, width)
        return x + self.ff(apply_layer_norm(self.ff_norm, x))


class TemporalTransformer(nn.Module):
    """GroupNorm per frame -> proj_in -> motion blocks -> proj_out -> + input."""

    def __init__(self, channels, settings: dict, fp32_norms: bool, dtype=None, device=None, operations=nn):
        super().__init__()
        heads = settings["num_attention_heads"]
        head_dim = channels // heads // settings.get("temporal_attention_dim_div", 1)
        inner = heads * head_dim
        modes = [name.split("_")[0] for name in settings["attention_block_types"]]
        self.norm = operations.GroupNorm(32, channels, eps=1e-6, affine=True, dtype=dtype, device=device)
        self.proj_in = operations.Linear(channels, inner, bias=True, dtype=dtype, device=device)
        self.transformer_blocks = nn.ModuleList([
            MotionTransformerBlock(
                inner, heads, head_dim, modes,
                block_size=settings.get("block_size", 1),
                max_frames=settings.get("temporal_position_encoding_max_len", 4096),
                add_positions=settings.get("temporal_position_encoding", True),
                positions_for_single_frame=not settings.get("remove_time_embedding_in_photo", False),
                fp32_norms=fp32_norms, dtype=dtype, device=device, operations=operations,
            )
            for _ in range(settings.get("num_transformer_block", 1))
        ])
        self.proj_out = operations.Linear(inner, channels, bias=True, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
        """x (B, F*h*w, C) tokens of whole clips -> same shape."""
        per_frame = rearrange(x, "b (f h w) c -> (b f) c h w", f=frames, h=height, w=width)
        tokens = rearrange(self.norm(per_frame), "n c h w -> n (h w) c")
        tokens = self.proj_in(tokens)
        for block in self.transformer_blocks:
            tokens = block(tokens, frames, height, width)
        tokens = self.proj_out(tokens)
        out = rearrange(tokens, "n (h w) c -> n c h w", h=height, w=width) + per_frame
        return rearrange(out, "(b f) c h w -> b (f h w) c", f=frames)


class MotionModule(nn.Module):
    """`attn_temporal` of a DiT block (the reference's `VanillaTemporalModule`)."""

    def __init__(self, channels, settings: dict, fp32_norms: bool, dtype=None, device=None, operations=nn):
        super().__init__()
        self.temporal_transformer = TemporalTransformer(channels, settings, fp32_norms, dtype, device, operations)

    def forward(self, x, frames, height, width):
        return self.temporal_transformer(x, frames, height, width)
