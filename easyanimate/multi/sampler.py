"""The Text-Guided MultiWay-Sampler (v2 and its v1 variant; docs/numerics.md#multi) and the flatten-fusion baseline.

The sampler is MuLTI's fusion module. It never runs attention over the long concatenation of all video
patch tokens and text tokens. Instead:

1. The video patch tokens of every frame are viewed as a (T, h, w) grid and cut into T'·h'·w' blocks
   with `adaptive_avg_pool3d` boundaries (`video_block_table`). Frame-[CLS] tokens average into one
   video-[CLS] slot.
2. Each block becomes one *query* token: a softmax-weighted average of its tokens, the weights being a
   bilinear score between the text [CLS] and each token (`pool_blocks`). The score's text projection
   W_q starts at zero, so at initialisation every weight is uniform and this is exactly adaptive
   average pooling; text guidance is learned as an offset from it.
3. Long text (more than `text_keep_max` tokens) is condensed the same way, with uniform weights
   (`condense_text_tokens`); MLM passes `condense_text=False` because it predicts every token.
4. Layer 1 (the sampling layer): the short query sequence [video blocks; text] cross-attends to the
   full sequences [all video tokens; all text tokens]. Its residual is the pooled input itself
   ("adapt-pooling residual"), so the layer only has to add what the pooling lost.
5. Layers 2..K: self-attention over the short sequence only.

Every layer is "MultiWay" (VLMo): one attention module shared by both modalities, then a separate FFN
(and LayerNorm) for the video slots and for the text slots.

`residual_mode` picks where the query/residual tokens come from (ablation A2):
"text_guided_pool" (v2), "adapt_pool" (uniform weights), "attn_pool" (v1: learned pooling queries attend
over all video tokens), "learned_query" (free learned queries; the "previous sampler" baseline).

`FlattenFusion` is the baseline the sampler replaces: K MultiWay layers of self-attention over all
video and text tokens (ablation A1, and the reference of `benchmarks/multi_memory.py`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import SamplerConfig


@dataclass
class Fused:
    """Output of the fusion module. `cls` (the text-[CLS] slot) is the pair-level representation every
    pair head uses; `text_mask` marks which text slots hold tokens (condensed text has fewer)."""

    video: torch.Tensor  # (B, 1 + M_v, d); slot 0 is the video [CLS]
    text: torch.Tensor  # (B, M_t, d); slot 0 is the text [CLS]
    text_mask: torch.Tensor  # (B, M_t) bool

    @property
    def cls(self) -> torch.Tensor:
        return self.text[:, 0]


# ==================================================================================================
# Pooling helpers
# ==================================================================================================


def adaptive_bounds(size_in: int, size_out: int) -> list[tuple[int, int]]:
    """[start, end) of each output cell along one axis, as PyTorch's adaptive pooling computes them:
    start = floor(i·In/Out), end = ceil((i+1)·In/Out). Neighbouring cells overlap when sizes don't divide."""
    return [((i * size_in) // size_out, -(-((i + 1) * size_in) // size_out)) for i in range(size_out)]


def target_grid(frames: int, grid: tuple[int, int, int]) -> tuple[int, int, int]:
    """The block grid for a clip of `frames` frames: T' = min(T, grid[0]), so short clips keep one
    block row per frame and M_v stops growing once T reaches grid[0]."""
    return min(frames, grid[0]), grid[1], grid[2]


def video_block_table(frames: int, grid_hw: tuple[int, int], grid_out: tuple[int, int, int]):
    """Which video tokens each block holds.

    Video tokens are laid out frame by frame, (1 + h·w) per frame, frame [CLS] first; patch (t, y, x)
    is token t·(1 + h·w) + 1 + y·w + x. Returns `index` (M, max_block) long, the token of each block
    slot, and `valid` (M, max_block) bool, False for the padding slots of smaller blocks; blocks are
    ordered t', y', x' (row-major), like the output of `adaptive_avg_pool3d`.
    """
    h, w = grid_hw
    per_frame = 1 + h * w
    blocks = []
    for t0, t1 in adaptive_bounds(frames, grid_out[0]):
        for y0, y1 in adaptive_bounds(h, grid_out[1]):
            for x0, x1 in adaptive_bounds(w, grid_out[2]):
                blocks.append([t * per_frame + 1 + y * w + x
                               for t in range(t0, t1) for y in range(y0, y1) for x in range(x0, x1)])
    size = max(len(b) for b in blocks)
    index = torch.zeros(len(blocks), size, dtype=torch.long)
    valid = torch.zeros(len(blocks), size, dtype=torch.bool)
    for i, block in enumerate(blocks):
        index[i, : len(block)] = torch.tensor(block)
        valid[i, : len(block)] = True
    return index, valid


def pool_blocks(tokens: torch.Tensor, index: torch.Tensor, valid: torch.Tensor,
                scores: torch.Tensor | None = None) -> torch.Tensor:
    """One token per block: the softmax(scores)-weighted average of the block's tokens.

    tokens (B, S, d); index/valid from `video_block_table`; scores (B, S) or None for uniform weights
    (then this is adaptive average pooling). Returns (B, M, d).
    """
    gathered = tokens[:, index]  # (B, M, max_block, d)
    if scores is None:
        weights = valid.to(tokens.dtype) / valid.sum(-1, keepdim=True).to(tokens.dtype)
        weights = weights.expand(tokens.shape[0], -1, -1)
    else:
        weights = scores[:, index].masked_fill(~valid, float("-inf")).softmax(-1).to(tokens.dtype)
    return torch.einsum("bmk,bmkd->bmd", weights, gathered)


def condense_text_tokens(text: torch.Tensor, mask: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[CLS] + (keep - 1) slots for text longer than `keep` tokens (docs/numerics.md#text-condensation).

    Blocks are taken over each sample's *valid* tokens (the mask), so padding never changes the result.
    A sample whose tokens fit keeps them one per slot, unchanged (the remaining slots are masked); a
    longer one averages adaptive-pooling blocks of its tokens. Returns (tokens (B, keep, d), mask (B, keep)).
    """
    slots = keep - 1
    body, body_mask = text[:, 1:], mask[:, 1:]
    rank = body_mask.long().cumsum(1) - 1  # position of each valid token among the valid tokens
    count = body_mask.sum(1).view(-1, 1, 1)
    j = torch.arange(slots, device=text.device).view(1, -1, 1)
    fits = count <= slots
    start = torch.where(fits, j, (j * count) // slots)
    end = torch.where(fits, j + 1, -((-(j + 1) * count) // slots))
    rank = rank.unsqueeze(1)
    member = body_mask.unsqueeze(1) & (rank >= start) & (rank < end)  # (B, slots, L - 1)
    weights = member.to(text.dtype) / member.sum(-1, keepdim=True).clamp(min=1).to(text.dtype)
    pooled = weights @ body
    return torch.cat([text[:, :1], pooled], 1), torch.cat([mask[:, :1], member.any(-1)], 1)


def square_grid(tokens_per_frame: int) -> tuple[int, int]:
    patches = tokens_per_frame - 1
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"{patches} patch tokens per frame is not a square grid; pass grid_hw=(h, w).")
    return side, side


# ==================================================================================================
# MultiWay layer
# ==================================================================================================


class SharedAttention(nn.Module):
    """Multi-head attention with one set of W_q, W_k, W_v, W_o for video and text tokens alike."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads, self.dropout = heads, dropout
        self.query, self.key, self.value, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, queries: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        """queries (B, Lq, d) attend to context (B, Lk, d); context_mask (B, Lk) bool, False = ignore."""
        B, Lq, d = queries.shape
        split = lambda x: x.view(B, x.shape[1], self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(queries)), split(self.key(context)), split(self.value(context))
        mask = context_mask[:, None, None, :]  # broadcast over heads and queries
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out(out.transpose(1, 2).reshape(B, Lq, d))


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1, self.act, self.fc2, self.drop = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(dropout)


class MultiWayLayer(nn.Module):
    """Pre-LN block: shared attention, then one FFN per modality.

    `cross=True` (the sampling layer): the hidden slots attend to a separate, long context (the full
    video and text sequences) normalised by its own LayerNorm. Otherwise: self-attention over the slots.
    The first `num_video` slots are video, the rest text.
    """

    def __init__(self, dim: int, heads: int, ffn_mult: int, cross: bool, eps: float = 1e-6, dropout: float = 0.0):
        super().__init__()
        self.cross = cross
        self.norm_query = nn.LayerNorm(dim, eps=eps)
        self.norm_context = nn.LayerNorm(dim, eps=eps) if cross else None
        self.attention = SharedAttention(dim, heads, dropout)
        self.norm_video, self.ffn_video = nn.LayerNorm(dim, eps=eps), FeedForward(dim, ffn_mult * dim, dropout)
        self.norm_text, self.ffn_text = nn.LayerNorm(dim, eps=eps), FeedForward(dim, ffn_mult * dim, dropout)

    def forward(self, hidden, num_video: int, mask, context=None, context_mask=None):
        queries = self.norm_query(hidden)
        if self.cross:
            hidden = hidden + self.attention(queries, self.norm_context(context), context_mask)
        else:
            hidden = hidden + self.attention(queries, queries, mask)
        video, text = hidden[:, :num_video], hidden[:, num_video:]
        video = video + self.ffn_video(self.norm_video(video))
        text = text + self.ffn_text(self.norm_text(text))
        return torch.cat([video, text], 1)


def _normal(*shape) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) * 0.02)


# ==================================================================================================
# The sampler
# ==================================================================================================


class TextGuidedMultiWaySampler(nn.Module):
    """Condenses [video tokens; text tokens] to [1 + M_v video slots; M_t text slots] and fuses them.

    forward(video (B, T, 1 + h·w, d), text (B, L, d), text_mask (B, L)) -> Fused. M_v = T'·h'·w' with
    T' = min(T, grid[0]) for the pooling modes, and prod(grid) for the learned-query modes.
    """

    def __init__(self, config: SamplerConfig, dim: int):
        super().__init__()
        self.config = config
        self.mode = config.residual_mode
        max_slots = 1 + config.grid[0] * config.grid[1] * config.grid[2]
        self.type_embed = _normal(2, dim)  # row 0: video, row 1: text
        self.slot_embed = _normal(max_slots, dim)  # position of each video query slot (video-[CLS] first)
        if self.mode == "text_guided_pool":
            # s_i = (W_q g)·(W_k LN(v_i)) / sqrt(d_g); W_q = 0 at init -> uniform weights = adaptive average pooling
            self.guide_query = nn.Linear(dim, config.guide_dim)
            nn.init.zeros_(self.guide_query.weight)
            nn.init.zeros_(self.guide_query.bias)
            self.guide_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
            self.guide_key = nn.Linear(dim, config.guide_dim)
        elif self.mode == "attn_pool":
            # v1: R_j = sum_i softmax_i(u_j · W_k LN(v_i) / sqrt(d)) v_i, a learned (text-independent) selection
            self.pool_queries = _normal(max_slots, dim)
            self.pool_norm = nn.LayerNorm(dim, eps=config.layer_norm_eps)
            self.pool_key = nn.Linear(dim, dim, bias=False)
        elif self.mode == "learned_query":
            self.queries = _normal(max_slots, dim)
        self.layers = nn.ModuleList(
            MultiWayLayer(dim, config.heads, config.ffn_mult, cross=(i == 0 or config.resample_every_layer),
                          eps=config.layer_norm_eps, dropout=config.dropout)
            for i in range(config.layers)
        )
        self.norm_out = nn.LayerNorm(dim, eps=config.layer_norm_eps)
        self._tables: dict = {}

    # --- step 1-2: video query slots -------------------------------------------------------------
    def block_table(self, frames: int, grid_hw: tuple[int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (frames, tuple(grid_hw), str(device))
        if key not in self._tables:
            index, valid = video_block_table(frames, grid_hw, target_grid(frames, self.config.grid))
            self._tables[key] = (index.to(device), valid.to(device))
        return self._tables[key]

    def guide_scores(self, flat_video: torch.Tensor, text_cls: torch.Tensor) -> torch.Tensor:
        """Importance score of every video token for this text, (B, S_v)."""
        q = self.guide_query(text_cls)  # (B, d_g)
        k = self.guide_key(self.guide_norm(flat_video))  # (B, S_v, d_g)
        scale = math.sqrt(self.config.guide_dim) * self.config.guide_temperature
        return (k @ q.unsqueeze(-1)).squeeze(-1) / scale

    def video_slots(self, video: torch.Tensor, text_cls: torch.Tensor, grid_hw, guided: bool) -> torch.Tensor:
        """The video query (= residual) tokens, (B, 1 + M_v, d), before the slot and type embeddings."""
        B, T, P, d = video.shape
        flat = video.reshape(B, T * P, d)
        if self.mode == "learned_query":
            return self.queries.unsqueeze(0).expand(B, -1, -1).to(video.dtype)
        if self.mode == "attn_pool":
            keys = self.pool_key(self.pool_norm(flat))  # (B, S_v, d)
            weights = (self.pool_queries.to(video.dtype) @ keys.transpose(1, 2) / math.sqrt(d)).softmax(-1)
            return weights @ flat
        index, valid = self.block_table(T, grid_hw, video.device)
        scores = None
        if guided and self.mode == "text_guided_pool":
            scores = self.guide_scores(flat, text_cls)
        blocks = pool_blocks(flat, index, valid, scores)
        video_cls = video[:, :, 0].mean(1, keepdim=True)  # frame [CLS] tokens -> one video [CLS]
        return torch.cat([video_cls, blocks], 1)

    # --- steps 3-7 ---------------------------------------------------------------------------------
    def forward(self, video: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                grid_hw: tuple[int, int] | None = None, guided: bool = True, condense_text: bool = True) -> Fused:
        B, T, P, d = video.shape
        grid_hw = grid_hw or square_grid(P)
        text_mask = text_mask.bool()
        type_video, type_text = self.type_embed.to(video.dtype)

        video_slots = self.video_slots(video, text[:, 0], grid_hw, guided)
        num_video = video_slots.shape[1]
        video_slots = video_slots + self.slot_embed[:num_video].to(video.dtype) + type_video
        if condense_text and text.shape[1] > self.config.text_keep_max:
            text_slots, slot_mask = condense_text_tokens(text, text_mask, self.config.text_keep_max)
        else:
            text_slots, slot_mask = text, text_mask
        hidden = torch.cat([video_slots, text_slots + type_text], 1)
        mask = torch.cat([slot_mask.new_ones(B, num_video), slot_mask], 1)

        # Keys/values of the sampling layer: the full sequences (video keeps its temporal embedding).
        context = torch.cat([video.reshape(B, T * P, d) + type_video, text + type_text], 1)
        context_mask = torch.cat([text_mask.new_ones(B, T * P), text_mask], 1)
        for i, layer in enumerate(self.layers):
            if not layer.cross:
                hidden = layer(hidden, num_video, mask)
            elif i == 0:
                hidden = layer(hidden, num_video, mask, context, context_mask)
            else:  # resample_every_layer: attend to the slots and the full sequences
                hidden = layer(hidden, num_video, mask, torch.cat([hidden, context], 1), torch.cat([mask, context_mask], 1))
        hidden = self.norm_out(hidden)
        return Fused(video=hidden[:, :num_video], text=hidden[:, num_video:], text_mask=slot_mask)


class FlattenFusion(nn.Module):
    """Baseline: K MultiWay self-attention layers over all video tokens and all text tokens.

    Same width, heads, depth and per-modality FFNs as the sampler; attention cost is (S_v + L)^2 per layer.
    `Fused.video` holds all S_v = T·(1 + h·w) video tokens (the first is frame 0's [CLS]).
    """

    def __init__(self, config: SamplerConfig, dim: int):
        super().__init__()
        self.config = config
        self.type_embed = _normal(2, dim)
        self.layers = nn.ModuleList(
            MultiWayLayer(dim, config.heads, config.ffn_mult, cross=False, eps=config.layer_norm_eps, dropout=config.dropout)
            for _ in range(config.layers)
        )
        self.norm_out = nn.LayerNorm(dim, eps=config.layer_norm_eps)

    def forward(self, video, text, text_mask, grid_hw=None, guided: bool = True, condense_text: bool = True) -> Fused:
        B, T, P, d = video.shape
        text_mask = text_mask.bool()
        type_video, type_text = self.type_embed.to(video.dtype)
        hidden = torch.cat([video.reshape(B, T * P, d) + type_video, text + type_text], 1)
        mask = torch.cat([text_mask.new_ones(B, T * P), text_mask], 1)
        for layer in self.layers:
            hidden = layer(hidden, T * P, mask)
        hidden = self.norm_out(hidden)
        return Fused(video=hidden[:, : T * P], text=hidden[:, T * P:], text_mask=text_mask)


def build_fusion(config: SamplerConfig, dim: int) -> nn.Module:
    return FlattenFusion(config, dim) if config.fusion == "flatten" else TextGuidedMultiWaySampler(config, dim)
