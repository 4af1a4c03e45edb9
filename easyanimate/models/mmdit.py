"""The EasyAnimate V5 / V5.1 diffusion transformer, an MMDiT (docs/numerics.md#v5v51-transformer).

    latents (B, 16, F, H, W) [+ inpaint (17) or control (16 | 22 | 32) channels, concatenated after them]
      --2x2 patches per frame--> video tokens (B, F*h*w, D)
    text states (V5.1: Qwen2-VL, RMSNorm + Linear; V5: Bert and mT5, one Linear each, Bert tokens first)
      --> text tokens (B, S, D)
      -> N x MMDiTBlock [ one float32 LayerNorm, modulated per stream | joint attention over [text; video]
                          (QK LayerNorm, 3-D RoPE on the video tokens) | gated residuals | feed-forward per stream ]
         blocks i >= mmdit_layers (the 7B models' second half): one set of attention/FF weights for both streams
      -> LayerNorm -> AdaLayerNorm (shift, scale) -> Linear -> channel-major unpatchify -> (B, out_channels, F, H, W)

Within a TeaCache scope (`easyanimate/teacache.py`) a call may skip the blocks, norm_final and norm_out,
adding instead what they added to the patch tokens in the last computed call.

Module names are those of the released (original) checkpoints: the text stream of an MMDiT block lives in
`attn2` and `txt_ff`. The `-diffusers` folders name the same layers `attn1.add_q_proj`, `attn1.to_add_out`,
... (`DIFFUSERS_TEXT_STREAM`); the loader renames their keys and `lora_aliases` lets LoRAs use either name.

Memory: the RoPE tables are computed per call from the latent grid, never stored. Outside autograd (the
pipelines run under `torch.no_grad()`) a block holds little more than its video stream, the joint q, k and v
and the attention output: the video tokens go through the norms, projections, RoPE, output projection and
feed-forward in row chunks (`block_chunk_rows`), each chunk's q/k/v written straight into the joint
(batch, heads, tokens, head_dim) buffers that `scaled_dot_product_attention` reads, the modulation and the
residuals applied in place. Every operation is the same, in the same order, as in the plain path (used when
autograd records), so the numbers are the same. `benchmarks/mmdit_forward.py` measures it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from importlib import resources

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..errors import EasyAnimateError
from ..memory import release_freed_memory
from ..teacache import active_run as active_teacache
from .attention import _FEED_FORWARD_BYTES, FeedForward, GELUProjection, apply_layer_norm, attention_function, \
    host_attention, make_layer_norm
from .embeddings import MLPEmbedder, timestep_sinusoid
from .transformer import active_block_replacements

FAMILIES = ("v5", "v51")
FAMILY_NAMES = {"v5": "V5", "v51": "V5.1"}

# The 3-D RoPE stretches every token grid over its crop region of a fixed base grid: 480x720 pixels.
ROPE_BASE_PIXELS = (480, 720)
ROPE_THETA = 10000
VAE_SCALE = 8  # pixels per latent

QK_NORM_EPS = 1e-6
RMS_NORM_EPS = 1e-6

# Outside autograd a block's peak is the attention: its input stream, the joint q, k, v and the attention
# output (5 streams' worth). The steps around it run the video tokens in as few row chunks as keep them
# below that (each chunk at least BLOCK_MIN_CHUNK_ROWS rows, so the matrix products stay large): the q/k/v
# projections in 8 (a chunk's normalised rows, projection, QK norm and float32 RoPE temporaries come to
# about a stream in bf16 while q, k and v fill), the feed-forward in 4 (its 4x-wide activation, GELU in
# place). The output projection runs whole.
QKV_CHUNKS = 8
FEED_FORWARD_CHUNKS = 4
BLOCK_MIN_CHUNK_ROWS = 1024


def row_chunks(tokens: int, chunks: int) -> list[tuple[int, int]]:
    """(start, stop) of `chunks` row chunks of `tokens` rows, each at least BLOCK_MIN_CHUNK_ROWS (fewer then)."""
    rows = max(BLOCK_MIN_CHUNK_ROWS, -(-tokens // chunks))
    return [(i, min(i + rows, tokens)) for i in range(0, tokens, rows)]

# The text-stream layers of an MMDiT block: the diffusers layout's name (all on attn1) -> ours (attn2).
DIFFUSERS_TEXT_STREAM = {
    "attn1.add_q_proj": "attn2.to_q",
    "attn1.add_k_proj": "attn2.to_k",
    "attn1.add_v_proj": "attn2.to_v",
    "attn1.norm_added_q": "attn2.norm_q",
    "attn1.norm_added_k": "attn2.norm_k",
    "attn1.to_add_out": "attn2.to_out.0",
}

# Input channels of the released variants (in_channels -> variant), per family.
VARIANTS = {
    "v5": {16: "T2V", 33: "InP", 32: "Control"},
    "v51": {16: "T2V", 33: "InP", 48: "Control", 38: "Control-Camera"},
}


# The released sizes by geometry: (blocks, MMDiT blocks) at width 3072.
RELEASE_SIZES = {(48, 48): "12B", (36, 18): "7B"}
RELEASE_WIDTH = 3072


def release_size(num_layers: int, mmdit_layers: int, hidden_size: int) -> str | None:
    """"12B" or "7B" for a released geometry, None for any other."""
    return RELEASE_SIZES.get((num_layers, mmdit_layers)) if hidden_size == RELEASE_WIDTH else None


def variant_name(family: str, num_layers: int, mmdit_layers: int, hidden_size: int, in_channels: int) -> str:
    """"V5.1 12B InP", "V5 7B T2V", ...: the release a geometry and channel count belong to (other sizes are
    described by their block counts and width)."""
    size = release_size(num_layers, mmdit_layers, hidden_size)
    size = size or f"{num_layers}-block ({mmdit_layers} MMDiT, width {hidden_size})"
    variant = VARIANTS[family].get(in_channels, f"{in_channels}-channel")
    return f"{FAMILY_NAMES[family]} {size} {variant}"


def family_preset(family: str) -> dict:
    """The released 12B config of a family (easyanimate/configs/transformer_<family>.json)."""
    if family not in FAMILIES:
        raise EasyAnimateError(f"Unknown EasyAnimate MMDiT family '{family}'; expected one of {', '.join(FAMILIES)}.")
    text = resources.files(__package__.rsplit(".", 1)[0]).joinpath(f"configs/transformer_{family}.json").read_text()
    return json.loads(text)


# Settings that select code paths of the reference class that no release uses: refused by name.
# (key, the value every release has, what another value would switch on)
_FIXED = (
    ("ref_channels", None, "reference-image tokens that replace the text stream"),
    ("clip_channels", None, "CLIP image tokens"),
    ("swa_layers", None, "sliding-window attention layers (a flash-attn kernel)"),
    ("after_norm", False, "an extra float32 LayerNorm after each feed-forward"),
    ("time_position_encoding_type", "3d_rope", "the V4-style 2-D RoPE"),
    ("norm_elementwise_affine", True, "LayerNorms without weights"),
    ("flip_sin_to_cos", True, "a [sin | cos] timestep embedding"),
    ("freq_shift", 0, "a shifted timestep frequency table"),
    ("activation_fn", "gelu-approximate", "another feed-forward activation"),
    ("timestep_activation_fn", "silu", "another timestep-MLP activation"),
)
# Keys whose null value is meaningful (a null in the checkpoint's config overrides the preset).
_NULLABLE = {"text_embed_dim_t5", "ref_channels", "clip_channels", "swa_layers"}


@dataclass
class MMDiTConfig:
    family: str  # "v5" (Bert + mT5 text) or "v51" (Qwen2-VL text)
    in_channels: int
    out_channels: int
    num_layers: int
    mmdit_layers: int  # blocks 0 .. mmdit_layers-1 have separate text-stream weights (at most num_layers)
    num_attention_heads: int
    attention_head_dim: int
    patch_size: int
    time_embed_dim: int
    text_embed_dim: int
    text_embed_dim_t5: int | None
    add_norm_text_encoder: bool
    norm_eps: float
    raw: dict = field(default_factory=dict, repr=False)  # the effective HF-style config

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def has_clip_projection(self) -> bool:
        return False  # V5/V5.1 take no CLIP image tokens

    @property
    def release_size(self) -> str | None:
        """"12B" or "7B" when the geometry is a released one, else None."""
        return release_size(self.num_layers, self.mmdit_layers, self.hidden_size)

    @property
    def name(self) -> str:
        """e.g. "V5.1 12B InP"; sizes other than the released ones are described by their block counts."""
        return variant_name(self.family, self.num_layers, self.mmdit_layers, self.hidden_size, self.in_channels)

    @classmethod
    def from_dict(cls, config: dict, family: str | None = None) -> "MMDiTConfig":
        """Build from a released (original or diffusers) config.json; unknown keys are ignored, missing ones
        come from the family preset. `family` None: read it from the config (mT5 width -> V5, RMSNorm -> V5.1).

        A config without `mmdit_layers` means every block is an MMDiT block (the reference's default).
        """
        if family is None:
            if config.get("text_embed_dim_t5") is not None:
                family = "v5"
            elif config.get("add_norm_text_encoder"):
                family = "v51"
            else:
                raise EasyAnimateError(
                    "Cannot tell V5 from V5.1 from this transformer config: it has neither text_embed_dim_t5 "
                    "(V5, Bert + mT5) nor add_norm_text_encoder true (V5.1, Qwen2-VL)."
                )
        merged = family_preset(family)
        merged.update({k: v for k, v in config.items() if k in merged and (v is not None or k in _NULLABLE)})
        for key, wanted, what in _FIXED:
            value = merged.get(key, wanted)
            if value in ([], 0) and wanted is None:
                value = None  # an empty swa_layers list switches nothing on
            if value != wanted:
                raise EasyAnimateError(
                    f"Transformer config sets {key}={value!r}, which switches on {what}; no released EasyAnimate "
                    f"V5/V5.1 model uses it, and this pack only implements {key}={wanted!r}."
                )
        if family == "v5" and (merged["text_embed_dim_t5"] is None or merged["add_norm_text_encoder"]):
            raise EasyAnimateError(
                "A V5 transformer config needs text_embed_dim_t5 (the mT5 width) and add_norm_text_encoder false; "
                f"this one has text_embed_dim_t5={merged['text_embed_dim_t5']!r}, "
                f"add_norm_text_encoder={merged['add_norm_text_encoder']!r}."
            )
        if family == "v51" and (merged["text_embed_dim_t5"] is not None or not merged["add_norm_text_encoder"]):
            raise EasyAnimateError(
                "A V5.1 transformer config has add_norm_text_encoder true and no text_embed_dim_t5 (one Qwen2-VL "
                f"text input); this one has text_embed_dim_t5={merged['text_embed_dim_t5']!r}, "
                f"add_norm_text_encoder={merged['add_norm_text_encoder']!r}."
            )
        head_dim = merged["attention_head_dim"]
        if head_dim % 16:
            raise EasyAnimateError(
                f"attention_head_dim {head_dim} cannot carry the 3-D RoPE (frames / rows / columns take 1/4, 3/8 "
                "and 3/8 of it in pairs): it must be a multiple of 16 (the releases use 64)."
            )
        mmdit = config.get("mmdit_layers")
        merged["mmdit_layers"] = merged["num_layers"] if mmdit is None else min(int(mmdit), merged["num_layers"])
        names = {f.name for f in fields(cls)} - {"family", "raw"}
        values = {k: merged[k] for k in names}
        values["add_norm_text_encoder"] = bool(values["add_norm_text_encoder"])
        return cls(family=family, raw=merged, **values)


# --------------------------------------------------------------------------------------------------------
# 3-D rotary position embedding
# --------------------------------------------------------------------------------------------------------

def rope_crop_region(grid_h: int, grid_w: int, base_h: int, base_w: int):
    """((top, left), (bottom, right)) of a (grid_h, grid_w) token grid fitted into the (base_h, base_w) base
    grid, aspect kept, centred; Python's `round` (halves to even), as the reference computes it."""
    if grid_h / grid_w > base_h / base_w:
        resize_h, resize_w = base_h, int(round(base_h / grid_h * grid_w))
    else:
        resize_w, resize_h = base_w, int(round(base_w / grid_w * grid_h))
    top = int(round((base_h - resize_h) / 2.0))
    left = int(round((base_w - resize_w) / 2.0))
    return (top, left), (top + resize_h, left + resize_w)


def _open_linspace(start: float, stop: float, n: int) -> torch.Tensor:
    """`np.linspace(start, stop, n, endpoint=False, dtype=np.float32)`: float64 `k * step + start`, then float32."""
    step = (stop - start) / n
    return (torch.arange(n, dtype=torch.float64) * step + start).float()


def rope_positions(frames: int, grid_h: int, grid_w: int, patch_size: int = 2):
    """(frame, row, column) positions of a latent grid, each float32: frames 0..F-1; rows and columns spread
    evenly over the grid's crop region of the 480x720-pixel base grid (30x45 tokens with 2x2 patches)."""
    base_h = ROPE_BASE_PIXELS[0] // VAE_SCALE // patch_size
    base_w = ROPE_BASE_PIXELS[1] // VAE_SCALE // patch_size
    (top, left), (bottom, right) = rope_crop_region(grid_h, grid_w, base_h, base_w)
    return _open_linspace(0, frames, frames), _open_linspace(top, bottom, grid_h), _open_linspace(left, right, grid_w)


def _axis_table(dim: int, positions: torch.Tensor):
    freqs = 1.0 / (ROPE_THETA ** (torch.arange(0, dim, 2, dtype=torch.float32)[: dim // 2] / dim))
    angles = torch.outer(positions, freqs)
    return angles.cos().repeat_interleave(2, dim=1), angles.sin().repeat_interleave(2, dim=1)


def rope_tables(frames: int, grid_h: int, grid_w: int, head_dim: int, patch_size: int = 2, device=None):
    """(cos, sin), each (frames * grid_h * grid_w, head_dim) float32, tokens frame-major (frame, row, column).

    The head dimension is split [frames head_dim/4 | rows 3*head_dim/8 | columns 3*head_dim/8]; each axis
    has its own frequencies 10000^(-2i/d) and repeats every angle for the two channels of a pair.
    """
    pos_t, pos_h, pos_w = rope_positions(frames, grid_h, grid_w, patch_size)
    dims = (head_dim // 4, head_dim // 8 * 3, head_dim // 8 * 3)
    (ct, st), (ch, sh), (cw, sw) = (_axis_table(d, p) for d, p in zip(dims, (pos_t, pos_h, pos_w)))

    def grid(t, h, w):
        shape = (frames, grid_h, grid_w)
        table = torch.cat([t[:, None, None].expand(*shape, -1), h[None, :, None].expand(*shape, -1),
                           w[None, None, :].expand(*shape, -1)], dim=-1)
        return table.reshape(frames * grid_h * grid_w, -1).to(device)

    return grid(ct, ch, cw), grid(st, sh, sw)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair (2m, 2m+1) of x (B, N, heads, head_dim) by its angle, in float32; cast back."""
    return _rotated(x, cos, sin).to(x.dtype)


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_pairs(x) * sin in float32 (a new tensor; x is not changed)."""
    full = x.float()
    pairs = full.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    del pairs
    out = full * cos[:, None]
    del full
    out += rotated.mul_(sin[:, None])  # in place, but rounded as x*cos + rotated*sin: the same numbers
    return out


# --------------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    """RMS normalisation in float32, cast back, then scaled by the weight (the V5.1 text projection's first layer)."""

    def __init__(self, dim, eps=RMS_NORM_EPS, dtype=None, device=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype, device=device))

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        # `.to(x)`: a host that streams weights layer by layer may leave this bare parameter elsewhere.
        return h.to(x.dtype) * self.weight.to(x)


class StreamAttention(nn.Module):
    """One stream's weights of the joint attention: q/k/v projections, per-head LayerNorm of q and k (in the
    working dtype), and the output projection `to_out.0`."""

    def __init__(self, dim, heads, head_dim, dtype=None, device=None, operations=nn):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        linear = lambda a, b: operations.Linear(a, b, bias=True, dtype=dtype, device=device)
        self.to_q, self.to_k, self.to_v = linear(dim, inner), linear(dim, inner), linear(dim, inner)
        self.norm_q = operations.LayerNorm(head_dim, eps=QK_NORM_EPS, elementwise_affine=True, dtype=dtype, device=device)
        self.norm_k = operations.LayerNorm(head_dim, eps=QK_NORM_EPS, elementwise_affine=True, dtype=dtype, device=device)
        self.to_out = nn.ModuleList([linear(inner, dim)])

    def project(self, which: str, x: torch.Tensor) -> torch.Tensor:
        """q, k or v of x (B, L, dim) as (B, L, heads, head_dim); q and k normalised."""
        out = getattr(self, f"to_{which}")(x).unflatten(-1, (self.heads, -1))
        if which == "v":
            return out
        return (self.norm_q if which == "q" else self.norm_k)(out)


class JointAdaNorm(nn.Module):
    """`norm1` / `norm2` of a block: one float32 LayerNorm for both streams, each modulated by its own
    (shift, scale), and the gates. The timestep gives (shift, scale, gate) for the video, then the text."""

    def __init__(self, cond_dim, dim, eps, dtype=None, device=None, operations=nn):
        super().__init__()
        self.linear = operations.Linear(cond_dim, 6 * dim, bias=True, dtype=dtype, device=device)
        self.norm = make_layer_norm(operations, dim, eps, True, dtype=dtype, device=device)

    def forward(self, video, text, temb):
        shift, scale, gate, text_shift, text_scale, text_gate = self.modulation(temb)
        video = apply_layer_norm(self.norm, video) * (1 + scale) + shift
        text = apply_layer_norm(self.norm, text) * (1 + text_scale) + text_shift
        return video, text, gate, text_gate

    def modulation(self, temb):
        """(shift, scale, gate) for the video, then for the text, each (B, 1, dim)."""
        return self.linear(F.silu(temb))[:, None].chunk(6, dim=-1)

    def modulate(self, x, shift, scale_plus_one):
        """LayerNorm(x) * (1 + scale) + shift, the product and the sum in place on the norm's output (the same
        operations, in the same order, as `forward`)."""
        return apply_layer_norm(self.norm, x).mul_(scale_plus_one).add_(shift)


class FinalAdaNorm(nn.Module):
    """`norm_out`: LayerNorm modulated by (shift, scale) from the timestep (shift first)."""

    def __init__(self, cond_dim, dim, eps, dtype=None, device=None, operations=nn):
        super().__init__()
        self.linear = operations.Linear(cond_dim, 2 * dim, bias=True, dtype=dtype, device=device)
        self.norm = operations.LayerNorm(dim, eps=eps, elementwise_affine=True, dtype=dtype, device=device)

    def forward(self, x, temb):
        shift, scale = self.linear(F.silu(temb))[:, None].chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class MMDiTBlock(nn.Module):
    """One block. MMDiT blocks (`joint`) project the text stream with their own `attn2` and `txt_ff`; the
    other ("shared-weight") blocks run both streams through `attn1` and `ff`, the attention's output
    projection `attn1.to_out.0` included, as the reference does."""

    def __init__(self, cfg: MMDiTConfig, joint: bool, dtype=None, device=None, operations=nn):
        super().__init__()
        dim, heads, head_dim = cfg.hidden_size, cfg.num_attention_heads, cfg.attention_head_dim
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.joint = joint
        self.norm1 = JointAdaNorm(cfg.time_embed_dim, dim, cfg.norm_eps, **kw)
        self.attn1 = StreamAttention(dim, heads, head_dim, **kw)
        if joint:
            self.attn2 = StreamAttention(dim, heads, head_dim, **kw)
        self.norm2 = JointAdaNorm(cfg.time_embed_dim, dim, cfg.norm_eps, **kw)
        self.ff = FeedForward(dim, **kw)
        if joint:
            self.txt_ff = FeedForward(dim, **kw)

    def forward(self, video, text, temb, rope):
        if not torch.is_grad_enabled():
            return self._forward_lean(video, text, temb, rope)
        normed_video, normed_text, gate, text_gate = self.norm1(video, text, temb)
        video_out, text_out = self.attention(normed_video, normed_text, rope)
        del normed_video, normed_text
        video = video + gate * video_out
        text = text + text_gate * text_out
        del video_out, text_out

        normed_video, normed_text, gate, text_gate = self.norm2(video, text, temb)
        video = video + gate * self.ff(normed_video)
        del normed_video
        text = text + text_gate * (self.txt_ff if self.joint else self.ff)(normed_text)
        return video, text

    def attention(self, video, text, rope):
        """Joint attention over [text; video] (no mask: text padding is attended); RoPE on the video part of
        q and k after their LayerNorm. Returns the (video, text) parts, each through its output projection."""
        cos, sin = rope
        text_layer = self.attn2 if self.joint else self.attn1
        joint = []
        for which in ("q", "k", "v"):
            video_part = self.attn1.project(which, video)
            if which != "v":
                video_part = apply_rope(video_part, cos, sin)
            joint.append(torch.cat([text_layer.project(which, text), video_part], dim=1).transpose(1, 2))
            del video_part
        out = joint_attention(*joint)
        del joint
        s = text.shape[1]
        return self.attn1.to_out[0](out[:, s:]), text_layer.to_out[0](out[:, :s])

    def _forward_lean(self, video, text, temb, rope):
        """`forward` outside autograd, holding less (module docstring): the same operations in the same order,
        the video tokens in row chunks. The input tensors are not changed (hooks may keep them)."""
        cos, sin = rope
        b, n, dim = video.shape
        s = text.shape[1]
        text_layer = self.attn2 if self.joint else self.attn1
        heads = self.attn1.heads

        # Joint attention: q, k, v of [text; video] written straight into (B, heads, S + N, head_dim) buffers.
        shift, scale, gate, text_shift, text_scale, text_gate = self.norm1.modulation(temb)
        q, k, v = (video.new_empty(b, heads, s + n, dim // heads) for _ in range(3))
        normed = self.norm1.modulate(text, text_shift, 1 + text_scale)
        for which, buffer in (("q", q), ("k", k), ("v", v)):
            buffer[:, :, :s].copy_(text_layer.project(which, normed).transpose(1, 2))
        scale_plus_one = 1 + scale
        for i, j in row_chunks(n, QKV_CHUNKS):
            normed = self.norm1.modulate(video[:, i:j], shift, scale_plus_one)
            for which, buffer in (("q", q), ("k", k), ("v", v)):
                part = self.attn1.project(which, normed)
                if which != "v":
                    part = _rotated(part, cos[i:j], sin[i:j])
                buffer[:, :, s + i : s + j].copy_(part.transpose(1, 2))
                del part
        del normed, buffer
        if video.device.type == "cpu":
            # the chunks' temporaries are small enough for the C heap, which would keep them through the peak
            release_freed_memory()
        out = joint_attention(q, k, v)  # (B, S + N, dim)
        del q, k, v
        text = text + text_gate * text_layer.to_out[0](out[:, :s])
        part = self.attn1.to_out[0](out[:, s:]).mul_(gate)
        del out
        video = torch.add(video, part)  # the block's own stream from here on
        del part

        # Feed-forward, the residual in place on that stream.
        shift, scale, gate, text_shift, text_scale, text_gate = self.norm2.modulation(temb)
        normed = self.norm2.modulate(text, text_shift, 1 + text_scale)
        text = text + text_gate * (self.txt_ff if self.joint else self.ff)(normed)
        scale_plus_one = 1 + scale
        for i, j in row_chunks(n, FEED_FORWARD_CHUNKS):
            rows = video[:, i:j]
            normed = self.norm2.modulate(rows, shift, scale_plus_one)
            rows.add_(_feed_forward_in_place(self.ff, normed).mul_(gate))
            del normed
        return video, text


def joint_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked attention over the joint sequence: q, k, v (B, heads, S + N, head_dim) -> (B, S + N, dim).
    A host's attention function (`attention.attention_function`; inside ComfyUI its attention backends)
    when a scope set one, else SDPA (whose output transposed is a view where the kernel wrote
    (B, S + N, heads, head_dim))."""
    host = host_attention()
    if host is not None:
        return host(q, k, v, q.shape[1], None)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


def _feed_forward_in_place(ff: FeedForward, x: torch.Tensor) -> torch.Tensor:
    """`ff(x)` with the tanh-GELU applied in place on the first layer's output (the same numbers); a memory
    budget's feed-forward chunks (`attention.feed_forward_chunks`) still apply through `ff` itself."""
    first = ff.net[0]
    if _FEED_FORWARD_BYTES.get() is not None or not isinstance(first, GELUProjection):
        return ff(x)
    hidden = first.proj(x)
    torch._C._nn.gelu_(hidden, approximate="tanh")
    return ff.net[2](hidden)


# --------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------

class EasyAnimateMMDiT(nn.Module):
    """EasyAnimate V5 / V5.1 transformer ("EasyAnimateTransformer3DModel")."""

    # Working copies of the token activations (text + video) a block holds at its peak: the two streams,
    # their normalised copies, the feed-forward's projection and GELU outputs (4x wide each), its output
    # and the new stream; the attention phase (q, k, v, its output, float32 RoPE temporaries) holds fewer.
    WORKING_COPIES = 12

    def __init__(self, cfg: MMDiTConfig, dtype=None, device=None, operations=nn):
        super().__init__()
        self.config = cfg
        self.dtype = dtype or torch.float32
        dim, p = cfg.hidden_size, cfg.patch_size
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.time_embedding = MLPEmbedder(dim, cfg.time_embed_dim, activation="silu", **kw)
        self.proj = operations.Conv2d(cfg.in_channels, dim, kernel_size=p, stride=p, bias=True, dtype=dtype, device=device)
        text_linear = operations.Linear(cfg.text_embed_dim, dim, bias=True, dtype=dtype, device=device)
        if cfg.add_norm_text_encoder:
            self.text_proj = nn.Sequential(RMSNorm(cfg.text_embed_dim, dtype=dtype, device=device), text_linear)
        else:
            self.text_proj = text_linear
        if cfg.text_embed_dim_t5 is not None:
            self.text_proj_t5 = operations.Linear(cfg.text_embed_dim_t5, dim, bias=True, dtype=dtype, device=device)
        self.transformer_blocks = nn.ModuleList(
            [MMDiTBlock(cfg, i < cfg.mmdit_layers, **kw) for i in range(cfg.num_layers)]
        )
        self.norm_final = operations.LayerNorm(dim, eps=cfg.norm_eps, elementwise_affine=True, dtype=dtype, device=device)
        self.norm_out = FinalAdaNorm(cfg.time_embed_dim, dim, cfg.norm_eps, **kw)
        self.proj_out = operations.Linear(dim, p * p * cfg.out_channels, bias=True, dtype=dtype, device=device)
        # diffusers-layout module names -> ours, for LoRA files saved with them (`easyanimate.lora`).
        self.lora_aliases = {
            f"transformer_blocks.{i}.{theirs}": f"transformer_blocks.{i}.{ours}"
            for i in range(cfg.mmdit_layers) for theirs, ours in DIFFUSERS_TEXT_STREAM.items()
        }
        # A host's attention (see `attention.attention_function`), used unless a caller's scope sets one.
        self.attention_function = None

    def activation_bytes(self, batch: int, frames: int, height: int, width: int, text_tokens: int) -> int:
        """Estimated peak activation memory of one forward on latents (batch, C, frames, height, width) with
        `text_tokens` text tokens per sample (V5.1: 256; V5: 77 + 256).

        `WORKING_COPIES` copies of all token activations (text and video) of the batch, plus the float32 RoPE
        tables. Attention runs through `scaled_dot_product_attention` on the joint sequence and is counted
        without a score matrix (the memory-efficient and flash kernels keep none). The one estimate the
        hosts load the model with.
        """
        cfg = self.config
        video = frames * (height // cfg.patch_size) * (width // cfg.patch_size)
        element = torch.finfo(self.dtype).bits // 8 if self.dtype.is_floating_point else 4
        tokens = batch * (video + text_tokens) * cfg.hidden_size * element * self.WORKING_COPIES
        return tokens + 2 * video * cfg.attention_head_dim * 4

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_t5: torch.Tensor | None = None,
        inpaint_latents: torch.Tensor | None = None,
        control_latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict (B, out_channels, F, H, W) for latents x (B, C, F, H, W).

        timestep (B,) or one value, rounded to the working dtype first (as the pipelines pass it);
        encoder_hidden_states (B, S, text_embed_dim): V5.1 Qwen2-VL states, V5 Bert states with the mT5 states
        in encoder_hidden_states_t5 (B, S5, text_embed_dim_t5). No text mask: padding tokens are attended, as
        in the reference. InP: inpaint_latents (B, 17, F, H, W) [mask, masked-video latents]; Control:
        control_latents (B, in_channels - 16, F, H, W); both go after x on the channel axis.
        """
        self._check_inputs(x, encoder_hidden_states, encoder_hidden_states_t5, inpaint_latents, control_latents)
        cfg, dtype = self.config, self.dtype
        b, _, frames, height, width = x.shape
        p = cfg.patch_size
        grid_h, grid_w = height // p, width // p
        device = x.device

        timestep = torch.as_tensor(timestep, device=device).reshape(-1)
        timestep = timestep.expand(b) if timestep.numel() == 1 else timestep
        temb = self.time_embedding(timestep_sinusoid(timestep.to(dtype), cfg.hidden_size).to(dtype))

        parts = [t.to(device, dtype) for t in (x, inpaint_latents, control_latents) if t is not None]
        latents = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        del parts, x, inpaint_latents, control_latents
        video = self.proj(rearrange(latents, "b c f h w -> (b f) c h w"))
        del latents
        video = rearrange(video, "(b f) d h w -> b (f h w) d", b=b)

        text = self.text_proj(encoder_hidden_states.to(device, dtype))
        if encoder_hidden_states_t5 is not None:
            text = torch.cat([text, self.text_proj_t5(encoder_hidden_states_t5.to(device, dtype))], dim=1)

        rope = rope_tables(frames, grid_h, grid_w, cfg.attention_head_dim, p, device=device)
        cache = active_teacache()  # this sampling run's TeaCache (easyanimate/teacache.py), or None
        if cache is not None and not cache.should_compute(self.transformer_blocks[0].norm1, video, text, temb):
            video = cache.reuse(video)  # norm_out's output, from the residual of the last computed call
        else:
            # A host's block patches (`transformer.block_replacements`; ComfyUI's "double_block" patches):
            # block i runs as replacements[i](video, text, temb, rope, original) -> (video, text).
            replacements = active_block_replacements()
            with attention_function(self.attention_function, override=False):
                for index, block in enumerate(self.transformer_blocks):
                    if index in replacements:
                        video, text = replacements[index](video, text, temb, rope, block)
                    else:
                        video, text = block(video, text, temb, rope)
            # The reference normalises [text; video] and drops the text: LayerNorm is per token, so only the video.
            video = self.norm_out(self.norm_final(video), temb)
            if cache is not None:
                cache.remember(video)
        del text, rope
        video = self.proj_out(video)
        return rearrange(video, "b (f h w) (c p q) -> b c f (h p) (w q)", f=frames, h=grid_h, w=grid_w, p=p, q=p)

    def _check_inputs(self, x, text, text_t5, inpaint, control):
        cfg = self.config
        name = FAMILY_NAMES[cfg.family]
        if x.ndim != 5:
            raise EasyAnimateError(f"Latents must be (batch, channels, frames, height, width); got shape {tuple(x.shape)}.")
        extra = [t for t in (inpaint, control) if t is not None]
        for t in extra:
            if t.ndim != 5 or t.shape[0] != x.shape[0] or t.shape[2:] != x.shape[2:]:
                raise EasyAnimateError(
                    f"Conditioning latents of shape {tuple(t.shape)} do not match the latents {tuple(x.shape)} "
                    "(same batch, frames, height and width)."
                )
        channels = x.shape[1] + sum(t.shape[1] for t in extra)
        if channels != cfg.in_channels:
            needs = {33: "inpaint_latents with 17 channels (mask + masked-video latents)",
                     16: "the 16 latent channels alone"}.get(cfg.in_channels,
                                                              f"control_latents with {cfg.in_channels - 16} channels")
            raise EasyAnimateError(
                f"The {cfg.name} transformer takes {cfg.in_channels} input channels ({needs}); got {channels}."
            )
        if x.shape[-2] % cfg.patch_size or x.shape[-1] % cfg.patch_size:
            raise EasyAnimateError(
                f"Latent height/width {tuple(x.shape[-2:])} must be multiples of the patch size {cfg.patch_size} "
                f"(pixel sizes multiples of {VAE_SCALE * cfg.patch_size})."
            )
        encoder = "Qwen2-VL" if cfg.family == "v51" else "Bert"
        if text.ndim != 3 or text.shape[0] != x.shape[0] or text.shape[-1] != cfg.text_embed_dim:
            raise EasyAnimateError(
                f"Text states must be (batch {x.shape[0]}, tokens, {cfg.text_embed_dim}) for this {name} model "
                f"({encoder} hidden states); got {tuple(text.shape)}."
            )
        if cfg.text_embed_dim_t5 is None:
            if text_t5 is not None:
                raise EasyAnimateError(f"This {name} model takes one text input (Qwen2-VL); mT5 states were given too.")
        elif text_t5 is None or text_t5.ndim != 3 or text_t5.shape[0] != x.shape[0] or text_t5.shape[-1] != cfg.text_embed_dim_t5:
            got = "none" if text_t5 is None else tuple(text_t5.shape)
            raise EasyAnimateError(
                f"This V5 model needs the mT5 states as encoder_hidden_states_t5 (batch {x.shape[0]}, tokens, "
                f"{cfg.text_embed_dim_t5}) besides the Bert states; got {got}."
            )
