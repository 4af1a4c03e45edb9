"""The EasyAnimate diffusion transformer (V1, V2 and V3 in one implementation; docs/numerics.md#transformer).

A PixArt-alpha DiT whose blocks each carry a motion module:

    latents (B, 4|12, F, H, W) --patches per frame--> tokens (B, F*h*w, D)
      -> N x DiTBlock [ adaLN self-attention per frame | motion module | cross-attention to text(+CLIP) | adaLN FFN ]
         (V2/V3: U-ViT long skips from the first 13 blocks into the blocks from 15 on)
      -> adaLN final layer -> unpatchify -> (B, 8, F, H, W)   (4 epsilon + 4 learned-variance channels)

Family differences are settings in `TransformerConfig` (loaded from JSON presets), not separate classes.

Memory: position tables are computed per call, never stored; activations are dropped as soon as they are
used (the U-ViT skips live exactly as long as their receiving block needs them). With `memory_budget`
(bytes; `easyanimate.memory.transformer_budget` sets it for a block) the forward runs the CFG batch in
chunks, attention over query chunks and the feed-forward layers over row chunks sized to fit
(`plan_chunks`, `plan_feed_forward`), with the same results; without a budget nothing is chunked (but
what a caller's own `query_chunks` / `feed_forward_chunks` scope asks for).
"""
from __future__ import annotations

import json
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, fields
from importlib import resources

import torch
import torch.nn as nn
from einops import rearrange

from ..errors import EasyAnimateError
from .attention import Attention, FeedForward, attention_function, feed_forward_chunks, layer_norm, query_chunks
from .embeddings import AdaLNSingle, MLPEmbedder, PatchEmbed
from .motion import MotionModule

FAMILIES = ("v1", "v2", "v3")

# U-ViT wiring of the reference, independent of the number of blocks (docs/numerics.md#u-vit-long-skips).
UVIT_PUSHES = 13  # outputs of blocks 0..12 are kept
UVIT_FIRST_POP = 15  # blocks 15.. receive one each, last in first out

CLIP_TOKENS = 8
CLIP_EMBED_DIM = 768

_BLOCK_REPLACEMENTS: ContextVar = ContextVar("easyanimate_block_replacements", default=None)


@contextmanager
def block_replacements(replacements: dict | None):
    """Within the block, DiT block i runs as `replacements[i](tokens, context, t6, original)` where
    `original(tokens, context, t6)` runs the block itself (tokens (B, F*h*w, D), context the text (+ CLIP)
    tokens, t6 the block modulation): a host's block-level patches (ComfyUI's `patches_replace`). The
    U-ViT skips around the blocks stay as they are. V5/V5.1 MMDiT blocks are joint (two streams) and run as
    `replacements[i](video, text, temb, rope, original) -> (video, text)`, `original(video, text, temb, rope)`."""
    token = _BLOCK_REPLACEMENTS.set(replacements or None)
    try:
        yield
    finally:
        _BLOCK_REPLACEMENTS.reset(token)


def active_block_replacements() -> dict:
    """The block replacements of the current scope ({} outside any); the V5/V5.1 MMDiT reads them too, with
    its own call form (see `EasyAnimateMMDiT.forward`)."""
    return _BLOCK_REPLACEMENTS.get() or {}


def family_preset(family: str) -> dict:
    """The full-size released config of a family (easyanimate/configs/transformer_<family>.json)."""
    if family not in FAMILIES:
        raise EasyAnimateError(f"Unknown EasyAnimate family '{family}'; expected one of {', '.join(FAMILIES)}.")
    text = resources.files(__package__.rsplit(".", 1)[0]).joinpath(f"configs/transformer_{family}.json").read_text()
    return json.loads(text)


# Settings of the released models that select code paths we do not implement: refuse them by name.
_REQUIRED = {
    "norm_type": "ada_norm_single",
    "patch_3d": False,
    "fake_3d": False,
    "casual_3d": False,
    "qk_norm": False,
    "after_norm": False,
    "time_position_encoding_before_transformer": False,
    "only_cross_attention": False,
    "double_self_attention": False,
}


@dataclass
class TransformerConfig:
    family: str
    in_channels: int
    out_channels: int
    num_layers: int
    num_attention_heads: int
    attention_head_dim: int
    caption_channels: int
    cross_attention_dim: int
    sample_size: int
    patch_size: int
    norm_eps: float
    enable_uvit: bool
    motion_modules: list = field(repr=False)  # one settings dict per block
    raw: dict = field(default_factory=dict, repr=False)  # the effective HF-style config, for saving

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def has_clip_projection(self) -> bool:
        # The reference builds the CLIP projection exactly when the model takes the 12-channel inpaint input.
        return self.in_channels == 12

    @property
    def fp32_norms(self) -> bool:
        # V3 switched its block and motion-module LayerNorms to float32 computation (`FP32LayerNorm`).
        return self.family == "v3"

    @classmethod
    def from_dict(cls, config: dict, family: str) -> "TransformerConfig":
        """Build from a released (old or rewritten) config.json: unknown keys ignored, missing ones from the preset."""
        merged = family_preset(family)
        merged.update({k: v for k, v in config.items() if k in merged and v is not None or k.startswith("motion_module_kwargs")})
        for key, wanted in _REQUIRED.items():
            if merged.get(key, wanted) not in (wanted, None):
                raise EasyAnimateError(
                    f"Transformer config sets {key}={merged[key]!r}; no released EasyAnimate V1-V3 model does, "
                    f"and this pack only implements {key}={wanted!r}."
                )
        if merged.get("sample_size") == 128:
            raise EasyAnimateError(
                "Transformer config has sample_size 128, which switches on PixArt's resolution/aspect-ratio "
                "embeddings that no EasyAnimate release uses; this pack does not implement them."
            )
        modules = _motion_settings_per_block(merged, family)
        if merged["enable_uvit"] and merged["num_layers"] > UVIT_PUSHES + UVIT_FIRST_POP:
            raise EasyAnimateError(
                f"U-ViT skips are wired for at most {UVIT_PUSHES + UVIT_FIRST_POP} blocks; config has {merged['num_layers']}."
            )
        names = {f.name for f in fields(cls)} - {"family", "motion_modules", "raw"}
        return cls(family=family, motion_modules=modules, raw=merged, **{k: merged[k] for k in names})


def _motion_settings_per_block(config: dict, family: str) -> list[dict]:
    block_type = config.get("basic_block_type")
    if block_type == "global_motionmodule":
        even, odd = config.get("motion_module_kwargs_even"), config.get("motion_module_kwargs_odd")
        if not even or not odd:
            raise EasyAnimateError(
                "A global_motionmodule (V3) config needs motion_module_kwargs_even and motion_module_kwargs_odd."
            )
        per_block = [even if i % 2 == 0 else odd for i in range(config["num_layers"])]
    elif block_type == "motionmodule":
        kwargs = config.get("motion_module_kwargs")
        if not kwargs:
            raise EasyAnimateError("A motionmodule (V1/V2) config needs motion_module_kwargs.")
        per_block = [kwargs] * config["num_layers"]
    else:
        raise EasyAnimateError(
            f"basic_block_type '{block_type}' is not an EasyAnimate V1-V3 block type "
            "(expected 'motionmodule' or 'global_motionmodule')."
        )
    grid = config.get("motion_module_type") == "VanillaGrid"
    settings = []
    for kwargs in per_block:
        s = dict(kwargs)
        # "Vanilla" modules ignore block_size; "VanillaGrid" (V1) uses it for its 2x2 cells.
        s["block_size"] = s.get("block_size", 1) if grid else 1
        settings.append(s)
    return settings


class DiTBlock(nn.Module):
    """PixArt block with a motion module (the reference's `TemporalTransformerBlock`, norm `ada_norm_single`).

    Order matters and follows the reference: modulated norm -> per-frame self-attention -> gated residual;
    motion module (has its own residual); cross-attention on the *un-normalised* tokens (PixArt quirk,
    no gate); modulated norm -> feed-forward -> gated residual.
    """

    def __init__(self, cfg: TransformerConfig, motion_settings: dict, dtype=None, device=None, operations=nn):
        super().__init__()
        dim, heads, head_dim = cfg.hidden_size, cfg.num_attention_heads, cfg.attention_head_dim
        self.eps, self.fp32_norms = cfg.norm_eps, cfg.fp32_norms
        self.attn1 = Attention(dim, heads, head_dim, dtype=dtype, device=device, operations=operations)
        self.attn_temporal = MotionModule(dim, motion_settings, cfg.fp32_norms, dtype, device, operations)
        self.attn2 = Attention(dim, heads, head_dim, context_dim=cfg.cross_attention_dim,
                               dtype=dtype, device=device, operations=operations)
        self.ff = FeedForward(dim, dtype=dtype, device=device, operations=operations)
        self.scale_shift_table = nn.Parameter(torch.empty(6, dim, dtype=dtype, device=device))

    def forward(self, x, t6, context, context_bias, frames, height, width):
        b = x.shape[0]
        # `.to(t6)`: a host that streams weights layer by layer may leave this bare parameter elsewhere.
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = (
            self.scale_shift_table[None].to(t6) + t6.reshape(b, 6, -1)
        ).chunk(6, dim=1)

        h = layer_norm(x, self.eps, self.fp32_norms) * (1 + scale_a) + shift_a
        h = rearrange(h, "b (f s) c -> (b f) s c", f=frames)  # spatial attention sees one frame at a time
        h = rearrange(self.attn1(h), "(b f) s c -> b (f s) c", f=frames)
        x = x + gate_a * h

        x = self.attn_temporal(x, frames, height, width)
        x = x + self.attn2(x, context, context_bias)

        h = layer_norm(x, self.eps, self.fp32_norms) * (1 + scale_m) + shift_m
        return x + gate_m * self.ff(h)


def _batch_rows(value, start: int, rows: int, batch: int):
    """Rows [start, start + rows) of a per-sample input; None and shared (size-1) inputs pass as they are."""
    if value is None or value.ndim == 0 or value.shape[0] != batch:
        return value
    return value[start : start + rows]


class EasyAnimateTransformer3D(nn.Module):
    def __init__(self, cfg: TransformerConfig, dtype=None, device=None, operations=nn):
        super().__init__()
        self.config = cfg
        self.dtype = dtype or torch.float32
        dim = cfg.hidden_size
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.pos_embed = PatchEmbed(cfg.in_channels, dim, cfg.patch_size, cfg.sample_size, **kw)
        self.adaln_single = AdaLNSingle(dim, **kw)
        self.caption_projection = MLPEmbedder(cfg.caption_channels, dim, activation="gelu_tanh", **kw)
        if cfg.has_clip_projection:
            self.clip_projection = MLPEmbedder(CLIP_EMBED_DIM, CLIP_TOKENS * dim, activation="gelu_tanh", **kw)
        self.transformer_blocks = nn.ModuleList([DiTBlock(cfg, s, **kw) for s in cfg.motion_modules])
        if cfg.enable_uvit:
            self.long_connect_fc = nn.ModuleList(
                [operations.Linear(dim, dim, bias=True, dtype=dtype, device=device) for _ in range(UVIT_PUSHES)]
            )
        self.scale_shift_table = nn.Parameter(torch.empty(2, dim, dtype=dtype, device=device))
        self.proj_out = operations.Linear(dim, cfg.patch_size**2 * cfg.out_channels, bias=True, dtype=dtype, device=device)
        self.memory_budget: int | None = None  # bytes of activations a forward may use; None = no limit
        # A host's attention (see `attention.attention_function`), used unless a caller's scope sets one.
        self.attention_function = None

    # Working copies of the token activations a block holds at its peak (normalised input, attention
    # projections, feed-forward input and output), besides the U-ViT skips that wait for their block.
    WORKING_COPIES = 8

    def activation_bytes(self, batch: int, frames: int, height: int, width: int,
                         attention_queries: int | None = None) -> int:
        """Estimated peak activation memory of one forward on latents (batch, C, frames, height, width).

        Every token activation of the pass (the U-ViT skips plus `WORKING_COPIES` in a block) and, when
        attention runs over chunks of `attention_queries` queries, one chunk's score matrix for every head of
        the global attention (a kernel without a memory-efficient path allocates it; None: attention keeps
        no score matrix, as the memory-efficient kernels do). The one estimate the hosts load models with
        and the memory budget plans chunks with (`plan_chunks`).
        """
        cfg = self.config
        tokens = frames * (height // cfg.patch_size) * (width // cfg.patch_size)
        element = self._element_size()
        per_row = tokens * cfg.hidden_size * element * ((UVIT_PUSHES if cfg.enable_uvit else 0) + self.WORKING_COPIES)
        scores = 0
        if attention_queries is not None:
            heads = max(s["num_attention_heads"] for s in cfg.motion_modules)
            scores = batch * heads * min(attention_queries, tokens) * tokens * element
        return batch * per_row + scores

    def _element_size(self) -> int:
        return torch.finfo(self.dtype).bits // 8 if self.dtype.is_floating_point else 4

    def plan_chunks(self, batch: int, frames: int, height: int, width: int, budget: int | None = None):
        """(batch rows per pass, attention queries per call or None) for latents of this shape under `budget`.

        Half the budget goes to the token activations of as many batch rows as fit (`activation_bytes`
        of one row), the rest to attention score chunks. Without a budget: the whole batch, all queries.
        """
        budget = self.memory_budget if budget is None else budget
        if budget is None:
            return batch, None
        cfg = self.config
        tokens = frames * (height // cfg.patch_size) * (width // cfg.patch_size)
        per_row = self.activation_bytes(1, frames, height, width)
        rows = max(1, min(batch, int(budget // 2 // per_row)))
        left = max(budget - rows * per_row, budget // 4)
        scores_per_query = self.activation_bytes(rows, frames, height, width, attention_queries=1) - rows * per_row
        queries = int(left // scores_per_query)
        return rows, (None if queries >= tokens else max(64, queries))

    def plan_feed_forward(self, rows: int, frames: int, height: int, width: int, budget: int | None = None):
        """Bytes of inner activation a feed-forward computes at once in a pass of `rows` batch rows under
        `budget` (`feed_forward_chunks`), or None: all rows at once.

        None without a budget, and when a pass's widest feed-forward activation (the GEGLU's, 8x wide) fits
        in the half of the budget that the token activations leave; otherwise that half.
        """
        budget = self.memory_budget if budget is None else budget
        if budget is None:
            return None
        p = self.config.patch_size
        widest = max((m.inner_width for m in self.modules() if isinstance(m, FeedForward)), default=0)
        whole = rows * frames * (height // p) * (width // p) * widest * self._element_size()
        return None if whole <= budget // 2 else budget // 2

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        inpaint_latents: torch.Tensor | None = None,
        clip_encoder_hidden_states: torch.Tensor | None = None,
        clip_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict (B, out_channels, F, H, W) for latents x (B, C, F, H, W).

        timestep (B,) int or float; encoder_hidden_states (B, L, caption_channels) with mask (B, L) 1 = keep;
        V3 InP: inpaint_latents (B, 8, F, H, W) [mask latents, masked-video latents], CLIP image embeds (B, 768)
        and their mask (B, 8).
        """
        self._check_inputs(x, encoder_hidden_states, inpaint_latents, clip_encoder_hidden_states)
        b = x.shape[0]
        rows, queries = self.plan_chunks(b, *x.shape[2:])
        feed_forward_bytes = self.plan_feed_forward(rows, *x.shape[2:])
        args = (x, timestep, encoder_hidden_states, encoder_attention_mask, inpaint_latents,
                clip_encoder_hidden_states, clip_attention_mask)
        with ExitStack() as scope:  # what the budget plans; without one, a caller's own limits stay in force
            scope.enter_context(attention_function(self.attention_function, override=False))
            if queries is not None:
                scope.enter_context(query_chunks(queries))
            if feed_forward_bytes is not None:
                scope.enter_context(feed_forward_chunks(feed_forward_bytes))
            if rows >= b:
                return self._forward(*args)
            out = None
            for start in range(0, b, rows):  # CFG halves (or smaller batch chunks) one after the other
                part = self._forward(*(_batch_rows(a, start, rows, b) for a in args))
                if out is None:
                    out = part.new_empty((b,) + part.shape[1:])
                out[start : start + rows] = part
                del part
            return out

    def _forward(self, x, timestep, encoder_hidden_states, encoder_attention_mask, inpaint_latents,
                 clip_encoder_hidden_states, clip_attention_mask):
        cfg = self.config
        dtype = self.dtype
        if encoder_attention_mask is not None and clip_attention_mask is not None:
            encoder_attention_mask = torch.cat([encoder_attention_mask, clip_attention_mask.to(encoder_attention_mask)], 1)
        context_bias = None
        if encoder_attention_mask is not None:
            # An additive -10000 bias (not -inf) in the dtype of the text embeddings, as the reference does.
            mask = encoder_attention_mask.to(encoder_hidden_states.dtype)
            context_bias = ((1 - mask) * -10000.0)[:, None, :]
        if inpaint_latents is not None:
            x = torch.cat([x, inpaint_latents.to(x)], dim=1)
        b, _, frames, height, width = x.shape
        p = cfg.patch_size
        grid_h, grid_w = height // p, width // p

        tokens = self.pos_embed(rearrange(x.to(dtype), "b c f h w -> (b f) c h w"))
        tokens = rearrange(tokens, "(b f) s c -> b (f s) c", b=b)
        t6, t_emb = self.adaln_single(timestep.reshape(-1).expand(b) if timestep.numel() == 1 else timestep, dtype)

        context = self.caption_projection(encoder_hidden_states.to(dtype))
        if clip_encoder_hidden_states is not None:
            clip_tokens = self.clip_projection(clip_encoder_hidden_states.to(dtype)).view(b, CLIP_TOKENS, -1)
            context = torch.cat([context, clip_tokens], dim=1)

        del x, inpaint_latents
        skips = []
        replacements = active_block_replacements()
        for index, block in enumerate(self.transformer_blocks):
            if cfg.enable_uvit and index >= UVIT_FIRST_POP:
                tokens = tokens + self.long_connect_fc[index - UVIT_FIRST_POP](skips.pop())
            if index in replacements:
                def original(h, c, t, block=block, bias=context_bias):
                    return block(h, t, c, bias, frames, grid_h, grid_w)
                tokens = replacements[index](tokens, context, t6, original)
            else:
                tokens = block(tokens, t6, context, context_bias, frames, grid_h, grid_w)
            if cfg.enable_uvit and index < UVIT_PUSHES:
                skips.append(tokens)
        del skips, context, context_bias

        shift, scale = (self.scale_shift_table[None].to(t_emb) + t_emb[:, None]).chunk(2, dim=1)
        tokens = layer_norm(tokens, 1e-6, in_fp32=False) * (1 + scale) + shift
        tokens = self.proj_out(tokens)
        return rearrange(
            tokens, "b (f h w) (p q c) -> b c f (h p) (w q)", f=frames, h=grid_h, w=grid_w, p=p, q=p
        )

    def _check_inputs(self, x, text, inpaint, clip):
        cfg = self.config
        if x.ndim != 5:
            raise EasyAnimateError(f"Latents must be (batch, channels, frames, height, width); got shape {tuple(x.shape)}.")
        channels = x.shape[1] + (inpaint.shape[1] if inpaint is not None else 0)
        if channels != cfg.in_channels:
            hint = " (V3 InP models need inpaint_latents with 8 channels)" if cfg.in_channels == 12 else ""
            raise EasyAnimateError(f"The transformer takes {cfg.in_channels} input channels, got {channels}{hint}.")
        if x.shape[-2] % cfg.patch_size or x.shape[-1] % cfg.patch_size:
            raise EasyAnimateError(
                f"Latent height/width {tuple(x.shape[-2:])} must be multiples of the patch size {cfg.patch_size} "
                f"(pixel sizes multiples of {8 * cfg.patch_size})."
            )
        if text.shape[-1] != cfg.caption_channels:
            raise EasyAnimateError(
                f"Text embeddings have width {text.shape[-1]}, but this model expects {cfg.caption_channels} "
                "(T5-XXL for the released models). Encode the prompt with the T5 encoder, not a CLIP text encoder."
            )
        if clip is not None and not cfg.has_clip_projection:
            raise EasyAnimateError("CLIP image embeddings were given, but this model has no CLIP projection (not a V3 InP model).")
