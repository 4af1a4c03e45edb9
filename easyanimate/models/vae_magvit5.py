"""The causal MagViT VAE of EasyAnimate V5 and V5.1 (`AutoencoderKLMagvit` in "cache_mag_vae" mode;
docs/numerics.md#v5-vae).

A video of 1 + 4k frames becomes 1 + k latent frames of 16 channels at 1/8 of the size: the first frame
on its own, then every 4 frames one latent. The network is driven as a stream: each call takes the next
frames (or latents) and every temporal convolution keeps, in a `StreamCache`, the last input frames it
needs from the previous call. That makes a chunked pass exactly one causal convolution over the whole
sequence, so a video of any length is processed one chunk at a time with memory flat in its length.

Layout (names are the released state-dict names, diffusers format):

    encoder: conv_in -> down_blocks[i] (ResidualBlock x n, then a spatial (1,2,2) or spatio-temporal
             (2,2,2) strided downsampler except in the last block) -> mid_block (ResidualBlock x n)
             -> conv_norm_out -> SiLU -> conv_out -> quant_conv = moments (mean | logvar)
    decoder: post_quant_conv -> conv_in -> mid_block -> up_blocks[i] (ResidualBlock x n+1, then a
             nearest x2 upsampler with a convolution, x2 in time too for the spatio-temporal blocks,
             except in the last block) -> conv_norm_out -> SiLU -> conv_out

Why a module of its own rather than flags on `vae_magvit.py` (the V2/V3 network): every temporal step
here differs from V2/V3's (replicate padding carried across calls instead of per-chunk padding, a
GroupNorm per frame instead of over the chunk, nearest instead of trilinear temporal upsampling, no
mid-block attention), and V2/V3 modules are stateless by design. What is the same is shared: the
in-place SiLU, the CPU convolution path and the posterior (`DiagonalGaussian`).

The cache is an argument, never module state: a module never depends on what ran before it, and one
loaded model can drive several independent streams (batch samples, spatial tiles) one after another
with a fresh `StreamCache` each.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from .vae_magvit import (
    DOWN_BLOCK_DOWNSAMPLE, GROUP_NORM_EPS, UP_BLOCK_UPSAMPLE, DiagonalGaussian, _conv, _in_place_ok, conv3d, silu_,
)

__all__ = ["MagvitV5Config", "MagvitV5VAE", "StreamCache", "DiagonalGaussian", "UNUSED_ATTENTION_KEYS"]

# The original release files carry mid-block attention weights that the V5 VAE never uses
# (`mid_block_use_attention` false): exactly these 20 tensors, ignored when loading.
UNUSED_ATTENTION_KEYS = frozenset(
    f"{part}.mid_block.attentions.0.{layer}.{kind}"
    for part in ("encoder", "decoder")
    for layer in ("group_norm", "to_q", "to_k", "to_v", "to_out")
    for kind in ("weight", "bias")
)

KERNEL_FRAMES = 3  # every temporal convolution has kernel 3 in time


@dataclass
class MagvitV5Config:
    """The architecture fields of a V5/V5.1 `vae/config.json`; defaults are the released sizes."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: list = field(default_factory=lambda: [128, 256, 512, 512])
    down_block_types: list = field(
        default_factory=lambda: ["SpatialDownBlock3D"] + ["SpatialTemporalDownBlock3D"] * 3
    )
    up_block_types: list = field(default_factory=lambda: ["SpatialUpBlock3D"] + ["SpatialTemporalUpBlock3D"] * 3)
    layers_per_block: int = 2
    latent_channels: int = 16
    norm_num_groups: int = 32

    @classmethod
    def from_dict(cls, values: dict) -> "MagvitV5Config":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    @property
    def temporal_stages(self) -> int:
        """Stride-2 temporal stages of the encoder (the last down block never downsamples)."""
        kinds = [_block_kind(DOWN_BLOCK_DOWNSAMPLE, t, "down") for t in self.down_block_types[:-1]]
        return sum(kind == "spatiotemporal" for kind in kinds)

    def stream_elements_per_pixel(self, decode: bool, chunk: int | None = None) -> tuple[float, float]:
        """(cached, widest) elements per input pixel (a latent pixel for a decode, a pixel for an encode):
        what the `StreamCache` holds between chunks (the last frames of every causal convolution's input;
        exact, but for the downsamplers' one-pixel padding) and the largest single activation of a chunk
        of `chunk` latents (decode, default 1) or frames (encode, default 4) at full size. The memory
        estimate of `easyanimate.vae` is built from these two numbers."""
        ch, layers = list(self.block_out_channels), self.layers_per_block
        kinds = lambda table, types: [_block_kind(table, t, "") for t in types]  # noqa: E731
        convs = []  # (input channels, input area per input pixel, frames cached)
        if decode:
            rev = list(reversed(ch))
            up = kinds(UP_BLOCK_UPSAMPLE, self.up_block_types)
            area, frames = 1.0, chunk or 1
            convs += [(self.latent_channels, area, 2)] + [(rev[0], area, 2)] * (2 * layers)
            widest = rev[0] * area * frames
            for i, kind in enumerate(up):
                cin = rev[max(i - 1, 0)]
                after_doubling = i > 0 and up[i - 1] == "spatiotemporal"  # see `ResidualBlock.doubled_frames`
                convs += [(cin, area, 1 if after_doubling else 2)] + [(rev[i], area, 2)] * (2 * (layers + 1) - 1)
                widest = max(widest, cin * area * frames)
                if i < len(rev) - 1:
                    convs.append((rev[i], area, 2))  # the upsampler caches its input before the doubling
                    area *= 4
                    frames *= 2 if kind == "spatiotemporal" else 1
                    widest = max(widest, rev[i] * area * frames)
            convs.append((rev[-1], area, 2))
            widest = max(widest, rev[-1] * area * frames)
        else:
            down = kinds(DOWN_BLOCK_DOWNSAMPLE, self.down_block_types)
            area, frames = 1.0, chunk or 2**self.temporal_stages
            convs.append((self.in_channels, area, 2))
            widest = ch[0] * area * frames
            for i, kind in enumerate(down):
                cin = ch[max(i - 1, 0)]
                convs += [(cin, area, 2)] + [(ch[i], area, 2)] * (2 * layers - 1)
                widest = max(widest, ch[i] * area * frames)
                if i < len(ch) - 1:
                    convs.append((ch[i], area, 1 if kind == "spatiotemporal" else 2))
                    area /= 4
                    frames //= 2 if kind == "spatiotemporal" else 1
            convs += [(ch[-1], area, 2)] * (2 * layers + 1)
        return sum(c * a * f for c, a, f in convs), widest


def _block_kind(table, name, what):
    if name not in table:
        raise ValueError(f"Unsupported MagViT {what} block type '{name}'; EasyAnimate V5 uses {sorted(table)}.")
    return table[name]


class StreamCache:
    """The causal state of one stream (one sample of one spatial tile) between chunks.

    For every causal convolution, the last input frames the next chunk's first outputs need (two for a
    stride-1 convolution, one for a stride-2 one); for every temporal upsampler, whether the stream has
    begun. A fresh cache starts a new stream: the first call pads by repeating its first frame.
    """

    def __init__(self):
        self._frames: dict[nn.Module, torch.Tensor] = {}
        self._begun: set[nn.Module] = set()

    def frames(self, module: nn.Module) -> torch.Tensor | None:
        return self._frames.get(module)

    def keep(self, module: nn.Module, frames: torch.Tensor) -> None:
        self._frames[module] = frames

    def take(self, module: nn.Module) -> torch.Tensor | None:
        """The frames kept for `module`, removed from the cache (freed as soon as the caller drops them)."""
        return self._frames.pop(module, None)

    def begin(self, module: nn.Module) -> bool:
        """True the first time `module` is seen in this stream."""
        if module in self._begun:
            return False
        self._begun.add(module)
        return True

    def clear(self) -> None:
        self._frames.clear()
        self._begun.clear()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._frames.values())


def _format_of(x: torch.Tensor):
    """The memory format to keep: channels-last where x has it (the CPU layout of `easyanimate.vae`)."""
    if x.dim() == 5 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


def _empty_like_frames(x: torch.Tensor, frames: int) -> torch.Tensor:
    b, c, _, h, w = x.shape
    return torch.empty((b, c, frames, h, w), dtype=x.dtype, device=x.device, memory_format=_format_of(x))


def _time_cat(parts: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """torch.cat along time, into a tensor of `like`'s memory format (torch.cat would not keep it)."""
    out = _empty_like_frames(like, sum(p.shape[2] for p in parts))
    start = 0
    for part in parts:
        out[:, :, start : start + part.shape[2]].copy_(part)
        start += part.shape[2]
    return out


def causal_conv(conv: nn.Module, box: list, cache: StreamCache, norm: nn.Module | None = None,
                upsample: bool = False) -> torch.Tensor:
    """`conv` (kernel 3 in time, no temporal padding of its own) as a causal convolution over the stream,
    applied to the tensor in `box` (taken out, so that it is freed as soon as nothing else holds it), or
    with `norm` to SiLU(per-frame GroupNorm(x)), the residual blocks' pre-activation, which is computed
    straight into the padded input (no separate normalised copy), or with `upsample` to x doubled in
    height and width (nearest), the upsamplers' input: the padded input is built and cached at the small
    size and never doubled (`upsampled_conv`).

    The first call of a stream repeats the first frame twice in front (replicate padding); later calls
    put the frames the previous call left in the cache in front instead: the last two for stride 1, the
    last one for stride 2, which continues the stride-2 windows exactly when chunks have an even length
    (the frame rule guarantees it). The cache then keeps the last `kernel - stride` frames of the padded
    input, written into the buffer that held the previous ones (no second copy). The result equals one
    causal convolution over the whole sequence.
    """
    x = box.pop()
    # the norm's statistics before the padded input exists (their temporary is not held with it)
    affine = frame_group_affine(norm, x) if norm is not None else None
    previous = cache.take(conv)
    if not upsample and _convolves_apart(conv, x, previous):
        return _next_frame_conv(conv, x, previous, cache, norm, affine)
    lead = KERNEL_FRAMES - 1 if previous is None else previous.shape[2]
    full = _empty_like_frames(x, lead + x.shape[2])
    body = full[:, :, lead:]
    if norm is None:
        body.copy_(x)
    elif _in_place_ok(x):
        silu_(frame_group_norm(norm, x, out=body, affine=affine))
    else:  # autograd: no out= / in-place steps on values it needs
        body.copy_(F.silu(frame_group_norm(norm, x, affine=affine)))
    del x, affine
    full[:, :, :lead].copy_(body[:, :, :1].expand_as(full[:, :, :lead]) if previous is None else previous)
    del body
    keep = KERNEL_FRAMES - conv.stride[0]
    tail = full[:, :, full.shape[2] - keep :]
    if previous is not None and previous.shape == tail.shape and _in_place_ok(previous):
        cache.keep(conv, previous.copy_(tail))  # the old frames' buffer, now copied into `full`, takes the new
    else:
        cache.keep(conv, tail.clone(memory_format=_format_of(full)))
    del previous, tail
    return upsampled_conv(conv, full) if upsample else _conv(conv, full)


def _convolves_apart(conv: nn.Module, x: torch.Tensor, previous) -> bool:
    """Whether `_next_frame_conv` takes this call: one frame after two cached ones, stride 1, inference, a
    plain convolution, and a frame at least as large as the weight (where moving frames costs more than
    slicing the weight)."""
    return (previous is not None and previous.shape[2] == KERNEL_FRAMES - 1 and x.shape[2] == 1
            and tuple(conv.stride) == (1, 1, 1) and type(conv) is nn.Conv3d and conv.padding_mode == "zeros"
            and not torch.is_grad_enabled() and x[0].numel() >= conv.weight.numel())


def _next_frame_conv(conv, x, previous, cache, norm, affine) -> torch.Tensor:
    """`causal_conv` for one frame after two cached ones (the decoder's frame-by-frame part) without building
    the 3-frame input: the cached frames convolved with the first two time taps, the new frame with the
    last, the two summed. The cache's own buffer then takes the new window's last two frames in place (one
    frame moved, the new one normalised straight into it). The same numbers up to float rounding."""
    weight = conv.weight
    out = conv3d(previous, weight[:, :, : KERNEL_FRAMES - 1], conv.bias, conv.padding)
    previous[:, :, :1].copy_(previous[:, :, 1:])
    new = previous[:, :, 1:]
    if norm is None:
        new.copy_(x)
    else:
        silu_(frame_group_norm(norm, x, out=new, affine=affine))
    del x
    cache.keep(conv, previous)
    return out.add_(conv3d(new, weight[:, :, KERNEL_FRAMES - 1 :], None, conv.padding))


def upsampled_conv(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`conv` (3x3 in space, padding 1) applied to x doubled in height and width (nearest), computed from x.

    In a nearest-doubled image an output pixel's 3x3 window covers only 2x2 distinct input pixels, and
    which two rows (columns) depends on its row (column) parity: an even row sees input rows i-1, i, i
    (taps w0 | w1 + w2 over rows i-1, i), an odd row i, i, i+1 (taps w0 + w1 | w2 over rows i, i+1). So
    each of the four output phases is a 2x2 convolution of x with summed taps: 4 x 2 x 2 = 16 spatial
    taps per input pixel instead of 9 x 4 = 36 on the doubled image, which is never built. The same
    numbers up to float rounding (the summed taps). Other layer classes (a host's casting layers) and
    other geometries take the plain path: double, then convolve.
    """
    if not (type(conv) is nn.Conv3d and conv.padding_mode == "zeros" and conv.groups == 1
            and tuple(conv.padding) == (0, 1, 1) and tuple(conv.stride) == (1, 1, 1)
            and tuple(conv.dilation) == (1, 1, 1) and tuple(conv.kernel_size) == (3, 3, 3)):
        return _conv(conv, F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest"))
    b, _, t, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1))
    out = torch.empty((b, conv.out_channels, t - (KERNEL_FRAMES - 1), 2 * h, 2 * w), dtype=x.dtype,
                      device=x.device, memory_format=_format_of(x))
    for (row, col), taps in _phase_taps(conv.weight):
        window = padded[:, :, :, row : row + h + 1, col : col + w + 1]
        out[:, :, :, row::2, col::2] = conv3d(window, taps, conv.bias, onednn=True)
    return out


def _phase_taps(weight: torch.Tensor):
    """((row parity, column parity), the (O, I, 3, 2, 2) taps of that output phase) of a (O, I, 3, 3, 3)
    weight, one phase at a time (two of them in memory at most). Built in channels-last order
    (O, 3, kh, kw, I), where every summed slab is one contiguous run of O x I values (several times faster
    than summing the innermost 3-tap rows), and given as channels-last views, the layout oneDNN takes."""
    channels_last = weight.permute(0, 2, 3, 4, 1)
    for row in (0, 1):
        rows = _sum_taps(channels_last, dim=2, phase=row)
        for col in (0, 1):
            yield (row, col), _sum_taps(rows, dim=3, phase=col).permute(0, 4, 1, 2, 3)


def _sum_taps(weight: torch.Tensor, dim: int, phase: int) -> torch.Tensor:
    """The 3 taps along `dim` summed into the 2 an output of that parity sees: (w0, w1 + w2) for even
    rows/columns, (w0 + w1, w2) for odd ones (one rounding per sum, in the weight's dtype)."""
    first, middle, last = weight.unbind(dim)
    if not _in_place_ok(weight):  # training: out-of-place, for autograd
        return torch.stack((first, middle + last) if phase == 0 else (first + middle, last), dim)
    shape = list(weight.shape)
    shape[dim] = 2
    out = weight.new_empty(shape)
    near, far = out.unbind(dim)
    if phase == 0:
        near.copy_(first)
        torch.add(middle, last, out=far)
    else:
        torch.add(first, middle, out=near)
        far.copy_(last)
    return out


def doubled_causal_conv(conv: nn.Module, box: list, cache: StreamCache, norm: nn.Module, doubled: bool) -> list:
    """`causal_conv(conv, ..., norm=norm)` over a frame f that a temporal upsampler put in the stream twice
    in a row (`doubled`), or once (the stream's first frame), given once: the outputs of those 1 or 2
    frames. Inference only (`ResidualBlock.takes_doubled_frames`).

    With g the distinct frame before f (itself twice in the stream, or the stream's first frame, which the
    replicate padding repeats), the 3-frame windows of the two copies of f are (g, g, f) and (g, f, f): each
    output is a 2-frame convolution of (g, f), with taps (w0 + w1 | w2) and (w0 | w1 + w2). Two thirds of
    the multiplications, and the cache keeps one frame (g) instead of two. The stream's first frame sees
    (f, f, f): the first taps over (f, f). The same numbers up to float rounding (the summed taps).
    """
    x = box.pop()
    pair = _empty_like_frames(x, 2)
    new = pair[:, :, 1:]
    silu_(frame_group_norm(norm, x, out=new))
    del x
    previous = cache.take(conv)
    pair[:, :, :1].copy_(new if previous is None else previous)
    if previous is not None and previous.shape == new.shape:
        cache.keep(conv, previous.copy_(new))
    else:
        cache.keep(conv, new.clone(memory_format=_format_of(pair)))
    del previous, new
    weight = conv.weight.permute(0, 2, 3, 4, 1)  # channels-last order: (O, time, kh, kw, I)
    phases = (1, 0) if doubled else (1,)  # _sum_taps: phase 1 = (w0 + w1 | w2), phase 0 = (w0 | w1 + w2)
    return [conv3d(pair, _sum_taps(weight, dim=1, phase=phase).permute(0, 4, 1, 2, 3), conv.bias, conv.padding)
            for phase in phases]


def frame_group_norm(norm: nn.Module, x: torch.Tensor, out: torch.Tensor | None = None, affine=None) -> torch.Tensor:
    """GroupNorm of every frame on its own (statistics over C/groups x H x W per sample and frame).

    float32/float64 with a plain `nn.GroupNorm`: per-group mean and variance (`frame_group_affine`), then
    one scale and shift, written into `out` when given (`affine`: that scale and shift, computed before).
    Otherwise (another dtype, another GroupNorm class such as ComfyUI's casting one) the module itself runs
    on the frames as a batch of images. Equal to diffusers' per-frame `GroupNorm` up to float rounding.
    """
    affine = affine or frame_group_affine(norm, x)
    if affine is not None:
        scale, shift = affine
        return torch.addcmul(shift, x, scale) if out is None else torch.addcmul(shift, x, scale, out=out)
    b, c, t, h, w = x.shape
    frames = norm(x.transpose(1, 2).reshape(b * t, c, h, w))
    normed = frames.reshape(b, t, c, h, w).transpose(1, 2)
    return normed if out is None else out.copy_(normed)


def frame_group_affine(norm: nn.Module, x: torch.Tensor):
    """(scale, shift), each (B, C, T, 1, 1), with GroupNorm(frame) = frame * scale + shift for every frame of x,
    for a plain affine `nn.GroupNorm` on float32/float64; None otherwise.

    The statistics of a channels-last x (the CPU layout) come from torch's own GroupNorm kernel run on the
    frames as a batch of channels-last images (a view, no copy; its normalised output is dropped: a
    temporary the size of x): a vectorised pass, several times faster than a strided reduction over that
    layout. Other layouts (and autograd): `torch.var_mean` over each group of each frame.
    """
    if not (type(norm) is nn.GroupNorm and norm.affine and x.dtype in (torch.float32, torch.float64)):
        return None
    b, c, t, h, w = x.shape
    g = norm.num_groups
    frames = _channels_last_frames(x)
    if frames is not None and _in_place_ok(x):
        _, mean, rstd = torch.native_group_norm(frames, None, None, b * t, c, h * w, g, norm.eps)
        del _
        mean = mean.view(b, t, g, 1).transpose(1, 2)[:, :, None, :, :, None]  # (b, g, 1, t, 1, 1)
        rstd = rstd.view(b, t, g, 1).transpose(1, 2)[:, :, None, :, :, None]
    else:
        grouped = x.view(b, g, c // g, t, h, w)
        var, mean = torch.var_mean(grouped, dim=(2, 4, 5), keepdim=True, unbiased=False)  # (b, g, 1, t, 1, 1)
        rstd = torch.rsqrt(var + norm.eps)
    scale = rstd * norm.weight.view(1, g, c // g, 1, 1, 1)
    shift = norm.bias.view(1, g, c // g, 1, 1, 1) - mean * scale
    return scale.reshape(b, c, t, 1, 1), shift.reshape(b, c, t, 1, 1)


def _channels_last_frames(x: torch.Tensor) -> torch.Tensor | None:
    """The frames of a channels-last x (B, C, T, H, W) as a channels-last batch of images (B * T, C, H, W):
    a view with the canonical strides (those of size-1 dimensions included, which torch's kernels read);
    None when x is not laid out that way."""
    b, c, t, h, w = x.shape
    canonical = (t * h * w * c, 1, h * w * c, w * c, c)
    if x.dtype.is_complex or not all(size == 1 or have == want
                                     for size, have, want in zip(x.shape, x.stride(), canonical)):
        return None
    return x.as_strided((b * t, c, h, w), (h * w * c, 1, w * c, c))


def causal_conv_layer(operations, in_channels, out_channels, stride=(1, 1, 1), spatial_padding=1, dtype=None,
                      device=None):
    """A 3x3x3 convolution for `causal_conv`: no temporal padding, `spatial_padding` pixels in space."""
    return operations.Conv3d(in_channels, out_channels, 3, stride=stride, padding=(0, spatial_padding, spatial_padding),
                             dtype=dtype, device=device)


class ResidualBlock(nn.Module):
    """GroupNorm -> SiLU -> causal conv -> GroupNorm -> SiLU -> causal conv, plus the (1x1x1) shortcut."""

    def __init__(self, in_channels, out_channels, groups, dtype=None, device=None, operations=nn):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.norm1 = operations.GroupNorm(groups, in_channels, eps=GROUP_NORM_EPS, **kw)
        self.conv1 = causal_conv_layer(operations, in_channels, out_channels, **kw)
        self.norm2 = operations.GroupNorm(groups, out_channels, eps=GROUP_NORM_EPS, **kw)
        self.conv2 = causal_conv_layer(operations, out_channels, out_channels, **kw)
        self.shortcut = None
        if in_channels != out_channels:
            self.shortcut = operations.Conv3d(in_channels, out_channels, 1, **kw)

    def forward(self, box: list, cache: StreamCache) -> torch.Tensor:
        """The block on the tensor in `box` (taken out: with a shortcut convolution the input is freed once
        the first convolution's padded input holds its normalised copy, when nothing else holds it)."""
        x = box[-1]
        residual = x if self.shortcut is None else _conv(self.shortcut, x)
        del x
        h = causal_conv(self.conv1, box, cache, norm=self.norm1)
        h = causal_conv(self.conv2, [h], cache, norm=self.norm2)
        return h.add_(residual) if _in_place_ok(h) else h + residual

    def takes_doubled_frames(self) -> bool:
        """Whether `doubled_frames` can run this block (inference, plain layers; a stream keeps one mode)."""
        return not torch.is_grad_enabled() and type(self.conv1) is nn.Conv3d and self.conv1.padding_mode == "zeros"

    def doubled_frames(self, box: list, cache: StreamCache, doubled: bool):
        """The block's output frames, one at a time, for the frame in `box` (taken out) standing for itself
        twice in a row (`doubled`) or once: the first block after a temporal upsampler. The shortcut and the
        first normalisation run once for both copies, the first convolution as `doubled_causal_conv`."""
        x = box[-1]
        residual = x if self.shortcut is None else _conv(self.shortcut, x)
        del x
        outputs = doubled_causal_conv(self.conv1, box, cache, self.norm1, doubled)
        while outputs:
            h = causal_conv(self.conv2, [outputs.pop(0)], cache, norm=self.norm2)
            yield h.add_(residual)
            del h


class Downsampler(nn.Module):
    """Halves H and W (and T when `temporal`): zero padding of one pixel right and bottom, then a strided
    causal convolution."""

    def __init__(self, channels, temporal, dtype=None, device=None, operations=nn):
        super().__init__()
        stride = (2, 2, 2) if temporal else (1, 2, 2)
        self.conv = causal_conv_layer(operations, channels, channels, stride, 0, dtype=dtype, device=device)

    def forward(self, box, cache):
        return causal_conv(self.conv, [F.pad(box.pop(), (0, 1, 0, 1))], cache)


class Upsampler(nn.Module):
    """Doubles H and W (nearest, then a causal convolution); when `temporal` also repeats every frame
    twice in time, except the stream's first frame, which stays one frame."""

    def __init__(self, channels, temporal, dtype=None, device=None, operations=nn):
        super().__init__()
        self.temporal = temporal
        self.conv = causal_conv_layer(operations, channels, channels, dtype=dtype, device=device)

    def forward(self, box, cache):
        frames = list(self.frames(box, cache))
        if len(frames) == 1:
            return frames[0]
        return _time_cat(frames, like=frames[0])

    def frames(self, box, cache):
        """The output as (B, C, 1, H, W) frames in order, without building the doubled tensor: a repeated
        frame is the same tensor twice. Not temporal: the whole output, once."""
        x = causal_conv(self.conv, box, cache, upsample=True)
        if not self.temporal:
            yield x
            return
        for i, doubled in enumerate(self.doubling(x.shape[2], cache)):
            frame = x[:, :, i : i + 1]
            yield frame
            if doubled:
                yield frame

    def doubling(self, frames: int, cache: StreamCache) -> list[bool]:
        """For each of the `frames` frames of the convolution's output, whether the output holds it twice:
        every frame but the stream's first."""
        first = cache.begin(self)
        return [not (first and i == 0) for i in range(frames)]


class MidBlock(nn.Module):
    """`layers_per_block` residual blocks; no attention (the V5 release turns it off)."""

    def __init__(self, channels, config: MagvitV5Config, dtype=None, device=None, operations=nn):
        super().__init__()
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.convs = nn.ModuleList(
            [ResidualBlock(channels, channels, config.norm_num_groups, **kw) for _ in range(config.layers_per_block)]
        )

    def forward(self, box, cache):
        return _run(self.convs, box, cache)


def _run(layers, box: list, cache: StreamCache) -> torch.Tensor:
    """Run `layers` in order on the tensor in `box` (taken out), holding no other reference to any
    layer's input, so that each input is freed as early as its layer allows."""
    for layer in layers:
        if layer is not None:
            box.append(layer(box, cache))
    return box.pop()


def _run_frame_by_frame(steps: list, box: list, cache: StreamCache, out: list) -> None:
    """Run `steps` on the tensor in `box` (taken out); the frames a temporal upsampler gives go through the
    steps after it one by one (recursively: a later upsampler splits again); results are appended to `out`."""
    for i, step in enumerate(steps):
        if isinstance(step, Upsampler) and step.temporal:
            following = steps[i + 1] if i + 1 < len(steps) else None
            if isinstance(following, ResidualBlock) and following.takes_doubled_frames():
                x = causal_conv(step.conv, box, cache, upsample=True)
                doubling = step.doubling(x.shape[2], cache)
                frames = list(x.split(1, dim=2))
                del x
                for doubled in doubling:
                    # the frame is freed once the block has normalised it (nothing else holds it)
                    for output in following.doubled_frames([frames.pop(0)], cache, doubled):
                        _run_frame_by_frame(steps[i + 2 :], [output], cache, out)
                        del output
                return
            for frame in step.frames(box, cache):
                _run_frame_by_frame(steps[i + 1 :], [frame], cache, out)
            return
        box.append(step(box, cache))
    out.append(box.pop())


class DownBlock(nn.Module):
    def __init__(self, in_channels, out_channels, layers, groups, downsample, dtype=None, device=None, operations=nn):
        super().__init__()
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.convs = nn.ModuleList(
            [ResidualBlock(in_channels if i == 0 else out_channels, out_channels, groups, **kw) for i in range(layers)]
        )
        self.downsampler = Downsampler(out_channels, downsample == "spatiotemporal", **kw) if downsample else None

    def forward(self, box, cache):
        return _run([*self.convs, self.downsampler], box, cache)


class UpBlock(nn.Module):
    def __init__(self, in_channels, out_channels, layers, groups, upsample, dtype=None, device=None, operations=nn):
        super().__init__()
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.convs = nn.ModuleList(
            [ResidualBlock(in_channels if i == 0 else out_channels, out_channels, groups, **kw) for i in range(layers)]
        )
        self.upsampler = Upsampler(out_channels, upsample == "spatiotemporal", **kw) if upsample else None

    def forward(self, box, cache):
        return _run([*self.convs, self.upsampler], box, cache)


class MagvitV5Encoder(nn.Module):
    def __init__(self, config: MagvitV5Config, dtype=None, device=None, operations=nn):
        super().__init__()
        kw = dict(dtype=dtype, device=device, operations=operations)
        ch, groups = list(config.block_out_channels), config.norm_num_groups
        self.conv_in = causal_conv_layer(operations, config.in_channels, ch[0], dtype=dtype, device=device)
        self.down_blocks = nn.ModuleList()
        for i, block_type in enumerate(config.down_block_types):
            kind = _block_kind(DOWN_BLOCK_DOWNSAMPLE, block_type, "down")
            last = i == len(ch) - 1
            self.down_blocks.append(
                DownBlock(ch[max(i - 1, 0)], ch[i], config.layers_per_block, groups, None if last else kind, **kw)
            )
        self.mid_block = MidBlock(ch[-1], config, **kw)
        self.conv_norm_out = operations.GroupNorm(groups, ch[-1], eps=GROUP_NORM_EPS, dtype=dtype, device=device)
        self.conv_out = causal_conv_layer(operations, ch[-1], 2 * config.latent_channels, dtype=dtype, device=device)

    def forward(self, box, cache):
        box.append(causal_conv(self.conv_in, box, cache))
        x = _run([*self.down_blocks, self.mid_block], box, cache)
        return causal_conv(self.conv_out, [x], cache, norm=self.conv_norm_out)


class MagvitV5Decoder(nn.Module):
    def __init__(self, config: MagvitV5Config, dtype=None, device=None, operations=nn):
        super().__init__()
        kw = dict(dtype=dtype, device=device, operations=operations)
        rev, groups = list(reversed(config.block_out_channels)), config.norm_num_groups
        self.conv_in = causal_conv_layer(operations, config.latent_channels, rev[0], dtype=dtype, device=device)
        self.mid_block = MidBlock(rev[0], config, **kw)
        self.up_blocks = nn.ModuleList()
        for i, block_type in enumerate(config.up_block_types):
            kind = _block_kind(UP_BLOCK_UPSAMPLE, block_type, "up")
            last = i == len(rev) - 1
            self.up_blocks.append(
                UpBlock(rev[max(i - 1, 0)], rev[i], config.layers_per_block + 1, groups, None if last else kind, **kw)
            )
        self.conv_norm_out = operations.GroupNorm(groups, rev[-1], eps=GROUP_NORM_EPS, dtype=dtype, device=device)
        self.conv_out = causal_conv_layer(operations, rev[-1], config.out_channels, dtype=dtype, device=device)

    def forward(self, box, cache):
        """The next latents of the stream -> their pixels. From the first temporal upsampler on, the frames
        go through the rest of the network one at a time (memory: one frame's activations at the large
        sizes; every later convolution is causal with its own cache, so this is the same computation)."""
        box.append(causal_conv(self.conv_in, box, cache))
        steps = list(self.mid_block.convs)
        for block in self.up_blocks:
            steps += [*block.convs] + ([block.upsampler] if block.upsampler is not None else [])
        steps.append(lambda box, cache: causal_conv(self.conv_out, box, cache, norm=self.conv_norm_out))
        out = []
        _run_frame_by_frame(steps, box, cache, out)
        return out[0] if len(out) == 1 else _time_cat(out, like=out[0])


class MagvitV5VAE(nn.Module):
    """Encoder, decoder and the 1x1x1 quantisation convolutions of the V5 `AutoencoderKLMagvit`.

    `encode_chunk` / `decode_chunk` take the next frames / latents of a stream and its `StreamCache`;
    which chunks to feed (frame 0 alone, then 4 frames or 1 latent at a time) is the driver's job
    (`easyanimate.vae`, `easyanimate.frames`). A whole sequence in one call gives the same result.
    """

    def __init__(self, config: MagvitV5Config, dtype=None, device=None, operations=nn):
        super().__init__()
        self.config = config
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.encoder = MagvitV5Encoder(config, **kw)
        self.decoder = MagvitV5Decoder(config, **kw)
        latent = config.latent_channels
        self.quant_conv = operations.Conv3d(2 * latent, 2 * latent, 1, dtype=dtype, device=device)
        self.post_quant_conv = operations.Conv3d(latent, latent, 1, dtype=dtype, device=device)

    def encode_chunk(self, x: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        """The next pixel frames (B, 3, T, H, W) in [-1, 1] of a stream -> moments (B, 2 * latent, t, H/8, W/8)."""
        box = [x]
        del x
        return _conv(self.quant_conv, self.encoder(box, cache))

    def decode_chunk(self, z: torch.Tensor, cache: StreamCache) -> torch.Tensor:
        """The next latent frames (B, latent, t, h, w) of a stream -> pixels (B, 3, T, 8h, 8w)."""
        return self.decoder([_conv(self.post_quant_conv, z)], cache)
