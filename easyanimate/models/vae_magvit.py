"""The MagViT-style causal 3-D VAE of EasyAnimate V2 and V3 (docs/numerics.md#vae).

One network serves both families; only the way it is driven over time differs, and that lives in
`easyanimate/vae.py`. Here every forward takes the temporal padding `mode` of the chunk it is given
(`frames.CAUSAL`, `frames.SLICE` or `frames.SINGLE`) instead of flags stored on the modules, so a
module never depends on what ran before it.

Layout (names are the checkpoint's state-dict names):

    encoder: conv_in -> down_blocks[i] (ResidualBlock3D x n, then a spatial or spatio-temporal
             downsampler except in the last block) -> mid_block (res, 3-D attention, res)
             -> conv_norm_out -> SiLU -> conv_out -> quant_conv = moments (mean | logvar)
    decoder: post_quant_conv -> conv_in -> mid_block -> up_blocks[i] (ResidualBlock3D x n+1, then
             an upsampler except in the last block) -> conv_norm_out -> SiLU -> conv_out

Temporal convolutions have kernel 3. The slice VAE's zero padding in time is built into the
convolutions (`padding=1`), which gives the same numbers as padding first without the padded copy;
the causal padding of V2 repeats the first frame (`conv_time`).

Memory: every intermediate is dropped as soon as the next one exists, SiLU runs in place on the
normalised copy, and residual sums are added in place, so a residual block holds its input, one
normalised copy and one convolution output at a time. The encoder and the decoder's upsampling stages
pass each block its input without keeping a reference (`_run_owned`), so a block that changes the
channel count releases its input right after its shortcut, and normalises it in place (`group_norm_`).
On a CPU, convolutions of small one-sample inputs go to oneDNN too (`_conv`; torch would send them to a
reference kernel about 4x slower). Compared with the straightforward computation the results differ by
float rounding only (about 1e-5 relative on the full-size V3 VAE).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..frames import CAUSAL, SINGLE

GROUP_NORM_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)

DOWN_BLOCK_DOWNSAMPLE = {"SpatialDownBlock3D": "spatial", "SpatialTemporalDownBlock3D": "spatiotemporal"}
UP_BLOCK_UPSAMPLE = {"SpatialUpBlock3D": "spatial", "SpatialTemporalUpBlock3D": "spatiotemporal"}


@dataclass
class MagvitConfig:
    """The architecture fields of the released `vae/config.json` (V2/V3); defaults are full size."""

    in_channels: int = 3
    out_channels: int = 3
    ch: int = 128
    ch_mult: list = field(default_factory=lambda: [1, 2, 4, 4])
    down_block_types: list = field(
        default_factory=lambda: ["SpatialDownBlock3D"] + ["SpatialTemporalDownBlock3D"] * 3
    )
    up_block_types: list = field(default_factory=lambda: ["SpatialUpBlock3D"] + ["SpatialTemporalUpBlock3D"] * 3)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    mid_block_use_attention: bool = True
    mid_block_num_attention_heads: int = 1

    @classmethod
    def from_dict(cls, values: dict) -> "MagvitConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    @property
    def block_out_channels(self) -> list[int]:
        return [self.ch * m for m in self.ch_mult]

    @property
    def temporal_stages(self) -> int:
        """Stride-2 temporal stages of the encoder (the last down block never downsamples)."""
        kinds = [DOWN_BLOCK_DOWNSAMPLE.get(t) for t in self.down_block_types[:-1]]
        return sum(kind == "spatiotemporal" for kind in kinds)


def pad_time(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Temporal padding of a kernel-3 convolution (B, C, T, H, W).

    Causal (V2) repeats the first frame twice in front, so frame t only sees frames <= t. The slice
    VAE (V3) was fine-tuned with one zero frame on each side instead. (The reference derives the
    amount from the width stride; it is 1 for every convolution of this network.)
    """
    if mode == CAUSAL:
        return torch.cat([x[:, :, :1], x[:, :, :1], x], dim=2)
    return F.pad(x, (0, 0, 0, 0, 1, 1))


def time_conv(operations, in_channels, out_channels, dtype=None, device=None):
    """A 3x3x3 convolution with one zero frame of padding in time built in (and one pixel in space)."""
    return operations.Conv3d(in_channels, out_channels, 3, padding=1, dtype=dtype, device=device)


def conv_time(conv: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """`conv` (from `time_conv`) with the temporal padding of `mode`.

    Zero padding (V3) is the convolution's own. Causal (V2): the first frame repeated twice in front;
    the convolution's zero frames then add one output at each end, which are cut off.
    """
    if mode != CAUSAL:
        return _conv(conv, x)
    frames = x.shape[2]
    return _conv(conv, torch.cat([x[:, :, :1], x[:, :, :1], x], dim=2))[:, :, 1 : frames + 1]


# torch sends a float32 CPU convolution of one sample to its slow reference kernel (about 4x slower than
# oneDNN here) when batch * channels * frames * height <= 20480, e.g. a 2-latent slice of a 128 px video.
_SLOW_PATH_LIMIT = 20480


def _conv(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """conv(x); on a CPU, through oneDNN also for the small inputs torch's heuristic would not give it."""
    if type(conv) is nn.Conv3d and conv.padding_mode == "zeros":
        return conv3d(x, conv.weight, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups)
    return conv(x)


def conv3d(x, weight, bias, padding=0, stride=1, dilation=1, groups=1, onednn=False) -> torch.Tensor:
    """`F.conv3d`, on a CPU through oneDNN also for the small inputs torch's heuristic would not give it
    (and for any float32 input of one sample with `onednn`: views such as a window of a padded tensor,
    which torch's heuristic does not give it either)."""
    if (x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[0] == 1
            and (onednn or x.shape[1] * x.shape[2] * x.shape[3] <= _SLOW_PATH_LIMIT)
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        triple = lambda v: (v,) * 3 if isinstance(v, int) else tuple(v)  # noqa: E731
        return torch.mkldnn_convolution(x, weight, bias, triple(padding), triple(stride), triple(dilation), groups)
    return F.conv3d(x, weight, bias, stride, padding, dilation, groups)


def _in_place_ok(x: torch.Tensor) -> bool:
    """In-place ops only where autograd does not need the values they overwrite (inference)."""
    return not (torch.is_grad_enabled() and x.requires_grad)


def group_norm_(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`norm(x)` computed in place in x (which must not be needed afterwards): per-group mean and
    variance, then one scale and shift per channel. Equal to `F.group_norm` up to float rounding."""
    if (type(norm) is not nn.GroupNorm or not norm.affine or x.dtype not in (torch.float32, torch.float64)
            or not _in_place_ok(x)):
        return norm(x)
    n, c = x.shape[:2]
    g = norm.num_groups
    grouped = x.view(n, g, c // g, *x.shape[2:])
    var, mean = torch.var_mean(grouped, dim=tuple(range(2, grouped.ndim)), unbiased=False)
    scale = (torch.rsqrt(var + norm.eps)[:, :, None] * norm.weight.view(g, c // g)).reshape(n, c)
    shift = norm.bias - mean.repeat_interleave(c // g, dim=1) * scale
    view = (n, c) + (1,) * (x.ndim - 2)
    return x.mul_(scale.view(view)).add_(shift.view(view))


def silu_(x: torch.Tensor) -> torch.Tensor:
    """SiLU in place (the same numbers as `F.silu`) on a tensor nobody else holds (out of place when
    training)."""
    return F.silu(x, inplace=_in_place_ok(x))


class ResidualBlock3D(nn.Module):
    def __init__(self, in_channels, out_channels, groups, dtype=None, device=None, operations=nn):
        super().__init__()
        self.norm1 = operations.GroupNorm(groups, in_channels, eps=GROUP_NORM_EPS, dtype=dtype, device=device)
        self.conv1 = time_conv(operations, in_channels, out_channels, dtype=dtype, device=device)
        self.norm2 = operations.GroupNorm(groups, out_channels, eps=GROUP_NORM_EPS, dtype=dtype, device=device)
        self.conv2 = time_conv(operations, out_channels, out_channels, dtype=dtype, device=device)
        self.shortcut = None
        if in_channels != out_channels:
            self.shortcut = operations.Conv3d(in_channels, out_channels, 1, dtype=dtype, device=device)

    def forward(self, x, mode):
        return self.consume([x], mode)

    def consume(self, box: list, mode, owned: bool = False):
        """The forward of the input in `box`, which this call takes out, so that when nothing else holds
        it, it is released as soon as it is no longer needed: with a shortcut convolution, right after
        the first normalisation. `owned` (nothing else holds it, not even as a view) further lets that
        normalisation run in place. One statement per step: every intermediate goes as soon as the next
        one exists."""
        x = box.pop()
        residual = x if self.shortcut is None else self.shortcut(x)
        h = group_norm_(self.norm1, x) if owned and self.shortcut is not None else self.norm1(x)
        del x
        h = silu_(h)
        h = conv_time(self.conv1, h, mode)
        h = silu_(self.norm2(h))
        h = conv_time(self.conv2, h, mode)
        return h.add_(residual) if _in_place_ok(h) else h + residual


class SpatialDownsampler3D(nn.Module):
    """Halves H and W (and T when `temporal`) with one strided kernel-3 convolution."""

    def __init__(self, channels, temporal, dtype=None, device=None, operations=nn):
        super().__init__()
        stride = (2, 2, 2) if temporal else (1, 2, 2)
        self.conv = operations.Conv3d(channels, channels, 3, stride=stride, dtype=dtype, device=device)

    def forward(self, x, mode):
        # Asymmetric spatial padding (right and bottom only), as in SD's downsampler.
        x = F.pad(x, (0, 1, 0, 1))
        return self.conv(pad_time(x, mode))


class SpatialUpsampler3D(nn.Module):
    """Doubles H and W (nearest, then a convolution); when `temporal` also doubles T by linear
    interpolation after the convolution."""

    def __init__(self, channels, temporal, dtype=None, device=None, operations=nn):
        super().__init__()
        self.temporal = temporal
        self.conv = time_conv(operations, channels, channels, dtype=dtype, device=device)

    def forward(self, x, mode):
        x = conv_time(self.conv, F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest"), mode)
        if not self.temporal or mode == SINGLE:
            return x
        if mode == CAUSAL:
            # The first frame stands alone (it encodes one pixel frame); the rest double: T -> 2T - 1.
            if x.shape[2] == 1:
                return x
            rest = F.interpolate(x[:, :, 1:], scale_factor=(2, 1, 1), mode="trilinear")
            return torch.cat([x[:, :, :1], rest], dim=2)
        return F.interpolate(x, scale_factor=(2, 1, 1), mode="trilinear")


class Attention3D(nn.Module):
    """Self-attention over every (t, h, w) position of the chunk, one head by default."""

    def __init__(self, channels, heads, groups, dtype=None, device=None, operations=nn):
        super().__init__()
        self.heads = heads
        self.group_norm = operations.GroupNorm(groups, channels, eps=GROUP_NORM_EPS, dtype=dtype, device=device)
        self.to_q = operations.Linear(channels, channels, dtype=dtype, device=device)
        self.to_k = operations.Linear(channels, channels, dtype=dtype, device=device)
        self.to_v = operations.Linear(channels, channels, dtype=dtype, device=device)
        self.to_out = operations.Linear(channels, channels, dtype=dtype, device=device)

    def forward(self, x):
        b, c, t, h, w = x.shape
        tokens = x.flatten(2)  # (B, C, N)
        normed = self.group_norm(tokens).transpose(1, 2)  # (B, N, C)
        head_dim = c // self.heads

        def split(proj):
            return proj(normed).view(b, -1, self.heads, head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.to_q), split(self.to_k), split(self.to_v), scale=head_dim**-0.5)
        out = self.to_out(out.transpose(1, 2).reshape(b, -1, c))
        return (out + tokens.transpose(1, 2)).transpose(1, 2).reshape(b, c, t, h, w)


class MidBlock3D(nn.Module):
    def __init__(self, channels, config: MagvitConfig, dtype=None, device=None, operations=nn):
        super().__init__()
        kw = dict(dtype=dtype, device=device, operations=operations)
        groups = config.norm_num_groups
        n = config.layers_per_block
        self.convs = nn.ModuleList([ResidualBlock3D(channels, channels, groups, **kw) for _ in range(n)])
        heads = config.mid_block_num_attention_heads
        self.attentions = nn.ModuleList(
            [Attention3D(channels, heads, groups, **kw) for _ in range(n - 1)] if config.mid_block_use_attention else []
        )

    def forward(self, x, mode):
        x = self.convs[0](x, mode)
        for i, conv in enumerate(self.convs[1:]):
            if len(self.attentions):
                x = self.attentions[i](x)
            x = conv(x, mode)
        return x


class DownBlock3D(nn.Module):
    """ResidualBlock3D x n, then an optional spatial / spatio-temporal downsampler."""

    def __init__(self, in_channels, out_channels, layers, groups, downsample, dtype=None, device=None, operations=nn):
        super().__init__()
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.convs = nn.ModuleList(
            [ResidualBlock3D(in_channels if i == 0 else out_channels, out_channels, groups, **kw) for i in range(layers)]
        )
        self.downsampler = None
        if downsample:
            self.downsampler = SpatialDownsampler3D(out_channels, downsample == "spatiotemporal", **kw)

    def forward(self, x, mode):
        for conv in self.convs:
            x = conv(x, mode)
        return x if self.downsampler is None else self.downsampler(x, mode)


class UpBlock3D(nn.Module):
    """ResidualBlock3D x n, then an optional spatial / spatio-temporal upsampler."""

    def __init__(self, in_channels, out_channels, layers, groups, upsample, dtype=None, device=None, operations=nn):
        super().__init__()
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.convs = nn.ModuleList(
            [ResidualBlock3D(in_channels if i == 0 else out_channels, out_channels, groups, **kw) for i in range(layers)]
        )
        self.upsampler = None
        if upsample:
            self.upsampler = SpatialUpsampler3D(out_channels, upsample == "spatiotemporal", **kw)

    def forward(self, x, mode):
        for conv in self.convs:
            x = conv(x, mode)
        return x if self.upsampler is None else self.upsampler(x, mode)


def _flat(blocks):
    """The residual blocks and resamplers of down/up blocks, in order."""
    for block in blocks:
        yield from block.convs
        resampler = getattr(block, "downsampler", None) or getattr(block, "upsampler", None)
        if resampler is not None:
            yield resampler


def _run_owned(layers, box: list, mode):
    """Run `layers` in order on the tensor in `box` (taken out), holding no other reference to any
    layer's input, so each input is freed as early as its layer allows (`ResidualBlock3D.consume`).
    Every input after the first is the previous layer's fresh output, which nothing else holds."""
    for index, layer in enumerate(layers):
        if isinstance(layer, ResidualBlock3D):
            box.append(layer.consume(box, mode, owned=index > 0))
        else:
            box.append(layer(box.pop(), mode))
            if box[-1].device.type == "cpu":
                # After a resampler the tensors change size: give the heap memory of the finished stage back
                # (glibc keeps freed tensors below 32 MiB for reuse), so it does not stay resident beside
                # the larger tensors of the next stage (about 60 MiB at 128x128).
                from ..memory import release_freed_memory

                release_freed_memory()
    return box.pop()


def _block_kind(table, name, what):
    if name not in table:
        raise ValueError(f"Unsupported MagViT {what} block type '{name}'; EasyAnimate V2/V3 use {sorted(table)}.")
    return table[name]


class MagvitEncoder(nn.Module):
    def __init__(self, config: MagvitConfig, dtype=None, device=None, operations=nn):
        super().__init__()
        kw = dict(dtype=dtype, device=device, operations=operations)
        channels = config.block_out_channels
        groups = config.norm_num_groups
        self.conv_in = time_conv(operations, config.in_channels, channels[0], dtype=dtype, device=device)
        self.down_blocks = nn.ModuleList()
        for i, block_type in enumerate(config.down_block_types):
            kind = _block_kind(DOWN_BLOCK_DOWNSAMPLE, block_type, "down")
            last = i == len(channels) - 1
            self.down_blocks.append(
                DownBlock3D(channels[max(i - 1, 0)], channels[i], config.layers_per_block, groups, None if last else kind, **kw)
            )
        self.mid_block = MidBlock3D(channels[-1], config, **kw)
        self.conv_norm_out = operations.GroupNorm(groups, channels[-1], eps=GROUP_NORM_EPS, dtype=dtype, device=device)
        self.conv_out = time_conv(operations, channels[-1], 2 * config.latent_channels, dtype=dtype, device=device)

    def forward(self, x, mode):
        box = [conv_time(self.conv_in, x, mode)]
        del x
        x = self.mid_block(_run_owned(_flat(self.down_blocks), box, mode), mode)
        x = silu_(self.conv_norm_out(x))
        return conv_time(self.conv_out, x, mode)


class MagvitDecoder(nn.Module):
    """The decoder is split in two so the slice driver can give the first stages (`stem`) more
    temporal context than the upsampling stages (`upsample`), as the V3 reference does."""

    def __init__(self, config: MagvitConfig, dtype=None, device=None, operations=nn):
        super().__init__()
        kw = dict(dtype=dtype, device=device, operations=operations)
        channels = list(reversed(config.block_out_channels))
        groups = config.norm_num_groups
        self.conv_in = time_conv(operations, config.latent_channels, channels[0], dtype=dtype, device=device)
        self.mid_block = MidBlock3D(channels[0], config, **kw)
        self.up_blocks = nn.ModuleList()
        for i, block_type in enumerate(config.up_block_types):
            kind = _block_kind(UP_BLOCK_UPSAMPLE, block_type, "up")
            last = i == len(channels) - 1
            self.up_blocks.append(
                UpBlock3D(channels[max(i - 1, 0)], channels[i], config.layers_per_block + 1, groups, None if last else kind, **kw)
            )
        self.conv_norm_out = operations.GroupNorm(groups, channels[-1], eps=GROUP_NORM_EPS, dtype=dtype, device=device)
        self.conv_out = time_conv(operations, channels[-1], config.in_channels, dtype=dtype, device=device)

    def stem(self, z, mode):
        return self.mid_block(conv_time(self.conv_in, z, mode), mode)

    def upsample(self, x, mode):
        box = [x]
        del x
        x = silu_(self.conv_norm_out(_run_owned(_flat(self.up_blocks), box, mode)))
        return conv_time(self.conv_out, x, mode)

    def forward(self, z, mode):
        return self.upsample(self.stem(z, mode), mode)


class MagvitVAE(nn.Module):
    """Encoder, decoder and the 1x1x1 quantisation convolutions of `AutoencoderKLMagvit`.

    `encode_chunk` / `decode_chunk` process one chunk (V2) or slice (V3) with the given padding mode;
    walking a whole video is the driver's job (`easyanimate.vae`).
    """

    def __init__(self, config: MagvitConfig, dtype=None, device=None, operations=nn):
        super().__init__()
        self.config = config
        kw = dict(dtype=dtype, device=device, operations=operations)
        self.encoder = MagvitEncoder(config, **kw)
        self.decoder = MagvitDecoder(config, **kw)
        latent = config.latent_channels
        self.quant_conv = operations.Conv3d(2 * latent, 2 * latent, 1, dtype=dtype, device=device)
        self.post_quant_conv = operations.Conv3d(latent, latent, 1, dtype=dtype, device=device)

    def encode_chunk(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        """Pixels (B, 3, T, H, W) in [-1, 1] -> moments (B, 2 * latent, t, H/8, W/8)."""
        return self.quant_conv(self.encoder(x, mode))

    def decode_chunk(self, z: torch.Tensor, mode: str, before: int = 0, after: int = 0) -> torch.Tensor:
        """Latents -> pixels. `before`/`after` leading/trailing latent frames of `z` are neighbour
        context: they shape `conv_in` and the mid block (GroupNorm statistics and attention span
        them) and are dropped before the upsampling stages."""
        h = self.decoder.stem(self.post_quant_conv(z), mode)
        if before or after:
            h = h[:, :, before : h.shape[2] - after]
        return self.decoder.upsample(h, mode)


class DiagonalGaussian:
    """The posterior the encoder predicts: moments = (mean | logvar) on the channel axis."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(*LOGVAR_RANGE)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """mean + std * N(0, 1). `noise` injects a recorded draw; otherwise it is drawn from
        `generator` (an explicit generator seeded like the reference's global RNG reproduces its draw)."""
        if noise is None:
            if generator is None:
                raise ValueError(
                    "Sampling the VAE posterior needs a torch.Generator (or recorded noise); "
                    "pass generator=torch.Generator().manual_seed(seed) so the result is reproducible."
                )
            noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype, device=generator.device)
        if tuple(noise.shape) != tuple(self.mean.shape):
            raise ValueError(f"Injected noise has shape {tuple(noise.shape)}; the posterior needs {tuple(self.mean.shape)}.")
        return self.mean + self.std * noise.to(self.mean.device, self.mean.dtype)
