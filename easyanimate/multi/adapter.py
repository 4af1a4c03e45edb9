"""v1 attention-based adapter on the shallow encoder features (docs/numerics.md#adapter; off by default).

The first `n_frozen` layers of an encoder (and its embeddings) are frozen: their parameters do not
require gradients, so autograd keeps no activations for them, which is where the memory saving comes
from. After layer `n_frozen` one adapter block is inserted:

    x = x + W_o · MHA_reduced(LN(x))          # self-attention at a reduced width (d -> 256 -> d)
    x = x + W_up · GELU(W_down · LN(x))       # bottleneck MLP d -> d/4 -> d

Both output projections start at zero, so at initialisation the block is the identity and the encoder
computes exactly what it computed without the adapter. The layers above `n_frozen` stay trainable.

The block is attached with a forward hook on the encoder layer it follows, so the `transformers`
encoders run unchanged. The model tells the adapter the context the hook cannot see: the text padding
mask, and the number of frames (for `video_scope="clip"`, where attention runs over all frames of a clip).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import AdapterConfig


class AttentionAdapter(nn.Module):
    def __init__(self, dim: int, config: AdapterConfig, eps: float = 1e-6):
        super().__init__()
        self.heads, self.width = config.heads, config.attention_dim
        self.norm_attention = nn.LayerNorm(dim, eps=eps)
        self.qkv = nn.Linear(dim, 3 * config.attention_dim)
        self.attention_out = nn.Linear(config.attention_dim, dim)
        self.norm_mlp = nn.LayerNorm(dim, eps=eps)
        self.mlp_down = nn.Linear(dim, max(1, int(dim * config.mlp_ratio)))
        self.mlp_up = nn.Linear(max(1, int(dim * config.mlp_ratio)), dim)
        for out in (self.attention_out, self.mlp_up):  # identity at initialisation
            nn.init.zeros_(out.weight)
            nn.init.zeros_(out.bias)
        # Context set by the model around each encoder call (the hook sees only the layer's output).
        self.key_mask: torch.Tensor | None = None  # (N, S) bool, text padding
        self.frames: int | None = None  # group N = B·T frame sequences into B clips ("clip" scope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, S, d = x.shape
        groups = N // self.frames if self.frames else N
        h = self.norm_attention(x).reshape(groups, -1, d)  # "clip" scope: all frames of a clip in one sequence
        q, k, v = self.qkv(h).view(groups, h.shape[1], 3, self.heads, self.width // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if self.key_mask is None else self.key_mask.bool()[:, None, None, :]
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        attended = attended.transpose(1, 2).reshape(N, S, self.width)
        x = x + self.attention_out(attended)
        return x + self.mlp_up(F.gelu(self.mlp_down(self.norm_mlp(x))))

    def hook(self, module, args, output):
        """Forward hook for the encoder layer the adapter follows (layers return a tensor or a tuple)."""
        if isinstance(output, tuple):
            return (self(output[0]),) + tuple(output[1:])
        if hasattr(output, "last_hidden_state"):  # n_frozen = 0 on a module returning a ModelOutput
            output.last_hidden_state = self(output.last_hidden_state)
            return output
        return self(output)


def freeze_and_attach(adapter: AttentionAdapter, frozen_modules: list[nn.Module], hook_module: nn.Module):
    """Freeze `frozen_modules` (embeddings + the first layers) and run `adapter` after `hook_module`."""
    for module in frozen_modules:
        module.requires_grad_(False)
    return hook_module.register_forward_hook(adapter.hook)
