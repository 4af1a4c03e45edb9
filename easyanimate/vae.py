"""The VAEs of EasyAnimate V1–V3 and V5/V5.1: loading, and driving them over whole videos with bounded memory.

    vae = load_vae("EasyAnimateV3-XL-2-InP-512x512", dtype="bf16", device="cuda")
    latents = vae.encode_latents(video, generator=g)             # (B,3,F,H,W) in [-1,1] -> scaled latents
    frames = vae.decode_video(latents)                          # scaled latents -> (B,3,F,H,W) in [0,1]
    frames = vae.decode_video(latents, reference_parity=True, generator=g)   # + the reference's smoothing
    v5 = load_vae("EasyAnimateV5.1-12b-zh-InP")                 # V5/V5.1: 1 + 4k frames, 16 channels
    latents = v5.encode_latents(video)                          # the posterior mode, as V5 pipelines use

How each family walks a video (docs/numerics.md#vae; the arithmetic lives in `easyanimate.frames`):

* V1: the SD image VAE on every frame.
* V2: independent chunks, 9 frames <-> 3 latents, causal padding.
* V3: slices, 8 frames <-> 2 latents, an odd first frame on its own; the decoder's first stages see
  the neighbouring slices. Optional spatial tiling with overlap blending (on in the V3 release config).
* V5 / V5.1 ("v5"): a causal stream, 1 + 4k frames <-> 1 + k latents of 16 channels; frame 0 alone, then
  4 frames per latent, the causal convolutions carrying their last frames across chunks. Each sample
  (and each spatial tile) is its own stream; tiling is off as in the release. The pipelines encode
  with the posterior mode (`encode_latents(sample=False)`, the V5 default) and decode without a
  smoothing pass.

Memory: every encode/decode preallocates its output and writes each slice's (and tile's) result
straight into it, so the working memory is that of one slice of one tile whatever the video length.
On a CPU the MagViT VAEs run in the channels-last layout (`channels_last_3d`): oneDNN convolves it
directly, without the blocked copies of each convolution's input and output that the default layout
costs, which is both faster and smaller; the numbers agree to float rounding (about 1e-6 relative).
Tiling and slicing commute here (a tile's slice depends only on the same tile of the neighbouring
latent slices), so slices are the outer loop and a tile grid only keeps the blend strips of the
current slice. The reference's results are reproduced exactly, tile for tile. A V5 stream cannot be
cut that way (each tile carries its own causal cache), so there tiles are the outer loop, each tile
streams through time, and the blend strips of the tiles above and to the left are kept for every
frame (a fraction `overlap` of the output, in pixels).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .checkpoint import (
    assign_tensors, check_config_against_weights, count_indexed, describe_keys, file_key_shapes, iter_file,
    meta_tensors, parse_dtype, read_json_config, weight_files,
)
from .errors import CheckpointMismatchError, EasyAnimateError, LayoutError, UnsupportedModelError
from .frames import FAMILY_RULES, FrameRule, latent_size

log = logging.getLogger(__name__)

FAMILIES = ("v1", "v2", "v3", "v5")
# Keys of training leftovers in released VAE files (discriminators, perceptual loss, logvar).
IGNORED_PREFIXES = ("loss.",)
# Peak working memory of one slice, in multiples of a full-resolution activation of the given width
# (measured on the full-size V3 VAE, float32, CPU: decode 2.1x the 256-channel activation, the input of
# the last up block held with its normalised copy and a convolution output; encode 3.6x the 128-channel
# one), with some margin.
DECODE_ACTIVATION_MULTIPLE = 2.5
ENCODE_ACTIVATION_MULTIPLE = 4
# V5 streams: besides the causal caches (counted exactly), the peak of one chunk in multiples of its
# widest activation (measured on the released widths, float32, CPU, as the growth of the peak from 64 to
# 128 px: decode 3.0x the 256-channel full-size activation of one latent's 4 frames, encode 4.5x the
# 128-channel one of 4 frames), with some margin.
STREAM_DECODE_ACTIVATION_MULTIPLE = 3.5
STREAM_ENCODE_ACTIVATION_MULTIPLE = 5


# ---------------------------------------------------------------------------------------- configs
def family_defaults(family: str) -> dict:
    """The full-size defaults of a family, kept as data in `easyanimate/configs/vae_<family>.json`."""
    text = resources.files(__package__).joinpath("configs", f"vae_{family}.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def detect_family(config: dict | None, keys: Sequence[str] = ()) -> str | None:
    """V1/V2/V3/V5 from a VAE config (block types, `slice_compression_vae`; V5: `cache_mag_vae`, or 16
    latent channels in a diffusers-format config), else from weight names (V1 vs MagViT only).

    Returns None when only the weights are known and they are MagViT: V2 and V3 share the network,
    only the driving differs, and nothing in the file says which.
    """
    config = config or {}
    if config.get("cache_compression_vae"):
        raise UnsupportedModelError(
            "This VAE config enables `cache_compression_vae`: it is an EasyAnimate V4 VAE, which this pack does "
            "not run (V1–V3 and V5/V5.1)."
        )
    if config.get("cache_mag_vae"):
        return "v5"
    blocks = " ".join(config.get("down_block_types") or [])
    if "DownEncoderBlock2D" in blocks:
        return "v1"
    if "Spatial" in blocks and config.get("latent_channels") == 16 and not config.get("slice_compression_vae"):
        return "v5"  # a diffusers-format V5 config: no mode switches, 16 latent channels
    if "Spatial" in blocks or "ch_mult" in config or "slice_compression_vae" in config:
        if "slice_compression_vae" in config:
            return "v3" if config["slice_compression_vae"] else "v2"
        mbe = config.get("mini_batch_encoder")
        return {8: "v3", 9: "v2"}.get(mbe, "v2")  # the reference class defaults to V2 driving
    if any(".resnets." in k for k in keys):
        return "v1"
    if any(".convs." in k for k in keys):
        return None
    raise LayoutError(
        "Cannot tell which VAE this is: the config has no `down_block_types` and the weights have neither "
        "SD (`…resnets…`) nor MagViT (`…convs…`) names. Point the loader at an EasyAnimate `vae/` folder."
    )


def resolve_config(
    family: str, file_config: dict | None, overrides: dict | None = None, inferred: dict | None = None
) -> dict:
    """Family defaults, then sizes `inferred` from the weights, then every key of the checkpoint's
    config, then the caller's overrides.

    Unknown keys are carried along and ignored by the model. Keys a config leaves out (old V2/V3
    configs have no `ch`/`ch_mult`; rewritten ones add fields we do not use) come from the weights'
    shapes where those tell them, else from the family defaults as in the reference's constructor.
    """
    config = family_defaults(family)
    for source in (inferred or {}, file_config or {}, overrides or {}):
        config.update({k: v for k, v in source.items() if not k.startswith("_")})
    # Rewritten (V5-era) configs split tiling by direction.
    if "use_tiling" not in (file_config or {}) and "use_tiling_decoder" in (file_config or {}):
        config["use_tiling"] = bool(file_config["use_tiling_decoder"])
    config["family"] = family
    return config


def frame_rule_for(family: str, config: dict) -> FrameRule:
    if family == "v1":
        return FAMILY_RULES["v1"]
    if family == "v5":
        from dataclasses import replace

        from .models.vae_magvit5 import MagvitV5Config

        return replace(
            FAMILY_RULES["v5"],
            frames_per_chunk=int(config["mini_batch_encoder"]),
            latents_per_chunk=int(config["mini_batch_decoder"]),
            temporal_stages=MagvitV5Config.from_dict(config).temporal_stages,
        )
    from .models.vae_magvit import MagvitConfig

    base = FAMILY_RULES[family]
    return FrameRule(
        family,
        int(config["mini_batch_encoder"]),
        int(config["mini_batch_decoder"]),
        causal=base.causal,
        lone_first_frame=base.lone_first_frame,
        share_decoder_features=base.share_decoder_features,
        temporal_stages=MagvitConfig.from_dict(config).temporal_stages,
    )


# ---------------------------------------------------------------------------------------- tiling
@dataclass(frozen=True)
class Tiling:
    """Spatial tiling with linear blending of the overlaps (the reference's `tiled_encode/decode`).

    `sample_size` is the tile edge in pixels (`tile_sample_min_size`, 384 in V3), `overlap` the
    fraction of a tile shared with its neighbour (`tile_overlap_factor`, 0.25). Frames no larger than
    one tile are not tiled, as in the reference, unless `force` (useful in tests).

    V5 tiles follow diffusers' `enable_tiling(tile_sample_min_height/width=sample_size,
    tile_sample_stride_height/width=stride)`: tiles start every `stride` pixels (default
    `sample_size - int(sample_size * overlap)`; both multiples of 8) and blend linearly over the
    remaining `sample_size - stride`. `whole_encode_tiles` reproduces diffusers' tiled encode exactly:
    it keeps every tile whole instead of its first `stride` pixels and crops the concatenation, which
    shifts the content of every tile after the first by the overlap (docs/numerics.md#v5-vae); off, each
    encoded tile keeps its first `stride / 8` latents, as the decode does. Both are V5 only.
    """

    sample_size: int = 384
    overlap: float = 0.25
    force: bool = False
    stride: int | None = None
    whole_encode_tiles: bool = False

    def __post_init__(self):
        if self.sample_size < 16 or not 0 <= self.overlap < 1:
            raise EasyAnimateError(
                f"Invalid tiling: tile size {self.sample_size} px, overlap {self.overlap}. "
                "Use a tile of at least 16 px (multiples of 16 work best) and an overlap in [0, 1)."
            )
        if self.stride is not None and not 0 < self.stride <= self.sample_size:
            raise EasyAnimateError(
                f"Invalid tiling: a stride of {self.stride} px for {self.sample_size} px tiles. Tiles must "
                "overlap or touch: use a stride in (0, tile size]."
            )


@dataclass(frozen=True)
class _TileGrid:
    tile: int  # input tile edge
    step: int  # distance between tile starts (input units)
    blend: int  # overlap blended (output units)
    keep: int  # output kept per tile (output units)


def _grid_for(tiling: Tiling, spatial_factor: int, decode: bool) -> _TileGrid:
    latent_tile = int(tiling.sample_size / spatial_factor)
    if decode:
        return _TileGrid(
            latent_tile,
            int(latent_tile * (1 - tiling.overlap)),
            int(tiling.sample_size * tiling.overlap),
            tiling.sample_size - int(tiling.sample_size * tiling.overlap),
        )
    return _TileGrid(
        tiling.sample_size,
        int(tiling.sample_size * (1 - tiling.overlap)),
        int(latent_tile * tiling.overlap),
        latent_tile - int(latent_tile * tiling.overlap),
    )


def _stream_grid_for(tiling: Tiling, spatial_factor: int, decode: bool) -> _TileGrid:
    """The V5 tile grid (diffusers' `tiled_encode`/`tiled_decode`): tiles of `sample_size` px every
    `stride` px, blended over the difference, in latent units on the latent side."""
    sample = tiling.sample_size
    stride = tiling.stride if tiling.stride is not None else sample - int(sample * tiling.overlap)
    if sample % spatial_factor or stride % spatial_factor:
        raise EasyAnimateError(
            f"Invalid V5 tiling: {sample} px tiles every {stride} px. Both must be multiples of {spatial_factor} "
            "px (the VAE's spatial factor), e.g. Tiling(512, stride=448)."
        )
    lat_tile, lat_stride = sample // spatial_factor, stride // spatial_factor
    if decode:
        return _TileGrid(lat_tile, lat_stride, sample - stride, stride)
    keep = lat_tile if tiling.whole_encode_tiles else lat_stride
    return _TileGrid(sample, stride, lat_tile - lat_stride, keep)


def _tile_starts(grid: _TileGrid, size_in: int, size_out: int) -> list[tuple[int, int, int]]:
    """(input start, output start, output kept) of the tiles along one axis whose kept part reaches into
    the output; a tile wholly past the end (only with whole encode tiles) is skipped, its result
    would be cropped away."""
    ratio = size_out / size_in
    starts, offset = [], 0
    for start in range(0, size_in, grid.step):
        if offset >= size_out:
            break
        kept = min(grid.keep, round(min(grid.tile, size_in - start) * ratio))
        starts.append((start, offset, min(kept, size_out - offset)))
        offset += kept
    if offset < size_out:
        raise EasyAnimateError(
            f"Tiling parameters do not tile this frame: tiles cover {offset} of {size_out}. "
            "Use tiles and strides that are multiples of 8 px."
        )
    return starts


def _blend_into(previous: torch.Tensor, current: torch.Tensor, extent: int, dim: int) -> None:
    """Fade `previous`'s trailing strip into `current`'s leading one, in place:
    cur[y] = prev[-e + y] * (1 - y/e) + cur[y] * (y/e)."""
    extent = min(previous.shape[dim], current.shape[dim], extent)
    if extent <= 0:
        return
    ramp = torch.arange(extent, dtype=torch.float64) / extent
    shape = [1] * current.ndim
    shape[dim] = extent
    to = dict(dtype=current.dtype, device=current.device)
    w_prev, w_cur = (1 - ramp).to(**to).view(shape), ramp.to(**to).view(shape)
    head = current.narrow(dim, 0, extent)
    head.copy_(previous.narrow(dim, previous.shape[dim] - extent, extent) * w_prev + head * w_cur)


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.copy_(src)


def _average(dst: torch.Tensor, src: torch.Tensor) -> None:
    # (first pass + second pass) / 2, in the order the reference computes it
    dst.copy_((dst + src.to(dst.dtype)) / 2)


def _clamped(write: Callable) -> Callable:
    def clamp_then_write(dst, src):
        write(dst, src.clamp(-1, 1))

    return clamp_then_write


def run_tiled_stream(stream: Callable, x: torch.Tensor, grid: _TileGrid | None, dst: torch.Tensor,
                     write: Callable = _copy) -> None:
    """Run `stream` on `x` (…, H, W) tile by tile in raster order and write the blended result to `dst`.

    `stream(tile)` yields its result in pieces along time: (first frame, end frame, piece) in `dst`'s
    frame axis (dim 2). Each piece is blended as it comes with the already-blended tile above and then
    the one to its left (the blends are per frame), cropped and written; a tile's own bottom and right
    strips are kept (for every frame) for its neighbours. That is diffusers' order of blends for the
    V5 VAE, with memory flat in time apart from those strips.
    """
    if grid is None:
        for first, end, piece in stream(x):
            write(dst[:, :, first:end], piece)
        return
    rows = _tile_starts(grid, x.shape[-2], dst.shape[-2])
    cols = _tile_starts(grid, x.shape[-1], dst.shape[-1])
    frames = dst.shape[2]
    above: list[torch.Tensor | None] = [None] * len(cols)
    for top, y0, kh in rows:
        left = None
        for c, (start, x0, kw) in enumerate(cols):
            bottom = right = None
            for first, end, piece in stream(x[..., top : top + grid.tile, start : start + grid.tile]):
                if above[c] is not None:
                    _blend_into(above[c][:, :, first:end], piece, grid.blend, dim=piece.ndim - 2)
                if left is not None:
                    _blend_into(left[:, :, first:end], piece, grid.blend, dim=piece.ndim - 1)
                th, tw = piece.shape[-2:]
                if bottom is None:
                    lead = tuple(piece.shape[:2])
                    bottom = piece.new_empty(lead + (frames, min(grid.blend, th), tw))
                    right = piece.new_empty(lead + (frames, th, min(grid.blend, tw)))
                bottom[:, :, first:end] = piece[..., th - bottom.shape[-2] :, :]
                right[:, :, first:end] = piece[..., tw - right.shape[-1] :]
                write(dst[:, :, first:end, y0 : y0 + kh, x0 : x0 + kw], piece[..., :kh, :kw])
                del piece
            above[c], left = bottom, right


def run_tiled(fn: Callable, x: torch.Tensor, grid: _TileGrid | None, dst: torch.Tensor, write: Callable = _copy) -> None:
    """Apply `fn` to `x` (…, H, W) tile by tile in raster order and write the blended result to `dst`.

    Each tile is blended with the already-blended tile above and then the one to its left (the
    reference blends its stored tiles in place, so neighbours carry their own blends), then cropped
    to `grid.keep` and written. Only the blend strips of the previous row and tile are kept.
    """
    if grid is None:
        write(dst, fn(x))
        return
    height, width = x.shape[-2:]
    rows, cols = range(0, height, grid.step), range(0, width, grid.step)
    above: list[torch.Tensor | None] = [None] * len(cols)
    y0 = 0
    for top in rows:
        left, x0, kept_h = None, 0, 0
        for c, start in enumerate(cols):
            tile = fn(x[..., top : top + grid.tile, start : start + grid.tile])
            if above[c] is not None:
                _blend_into(above[c], tile, grid.blend, dim=tile.ndim - 2)
            if left is not None:
                _blend_into(left, tile, grid.blend, dim=tile.ndim - 1)
            th, tw = tile.shape[-2:]
            above[c] = tile[..., th - min(grid.blend, th) :, :].clone()
            left = tile[..., tw - min(grid.blend, tw) :].clone()
            kept_h, kept_w = min(grid.keep, th), min(grid.keep, tw)
            write(dst[..., y0 : y0 + kept_h, x0 : x0 + kept_w], tile[..., :kept_h, :kept_w])
            x0 += kept_w
            del tile
        y0 += kept_h
    if (y0, x0) != tuple(dst.shape[-2:]):
        raise EasyAnimateError(
            f"Tiling parameters do not tile this frame: tiles cover {y0}x{x0} of {tuple(dst.shape[-2:])}. "
            "Use a tile size that is a multiple of 16 px and an overlap such as 0.25."
        )


# ---------------------------------------------------------------------------------------- the VAE
class VideoVAE:
    """A loaded VAE of one family with the driving rules of that family.

    `encode`/`decode` work on unscaled latents, like the reference's `vae.encode/decode`;
    `encode_latents`/`decode_video` are the reference pipelines' encode and decode (scaling factor,
    clamping, output range, optional smoothing pass; docs/numerics.md#pipeline-encode-and-decode).
    """

    def __init__(self, model: torch.nn.Module, family: str, config: dict, *, compute_dtype: torch.dtype | None = None):
        self.model = model.eval().requires_grad_(False)
        self.family = family
        self.config = config
        self.rules: FrameRule = frame_rule_for(family, config)
        self.scaling_factor = float(config.get("scaling_factor", 0.18215))
        channels = (config["block_out_channels"] if family in ("v1", "v5")
                    else [config["ch"] * m for m in config["ch_mult"]])
        self.block_out_channels = list(channels)
        self.spatial_factor = 2 ** (len(channels) - 1)
        self.latent_channels = int(config["latent_channels"])
        self.compute_dtype = compute_dtype or next(model.parameters()).dtype
        self.channels_last = family != "v1"  # on CPU devices; see the module docstring
        self.tiling = (
            Tiling(int(config.get("tile_sample_min_size", 384)), float(config.get("tile_overlap_factor", 0.25)))
            if config.get("use_tiling")
            else None
        )
        self._stream_elements = None
        if family == "v5":
            from .models.vae_magvit5 import MagvitV5Config

            arch = MagvitV5Config.from_dict(config)
            self._stream_elements = {
                True: arch.stream_elements_per_pixel(True, self.rules.latents_per_chunk),
                False: arch.stream_elements_per_pixel(False, self.rules.frames_per_chunk),
            }

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __repr__(self):
        return (
            f"VideoVAE({self.family}, {self.rules.frames_per_chunk}->{self.rules.latents_per_chunk} frames per chunk, "
            f"compute {self.compute_dtype}, tiling {self.tiling})"
        )

    # ------------------------------------------------------------------ planning helpers
    def _grid(self, tiling, memory_budget, size, decode) -> _TileGrid | None:
        if tiling is None and memory_budget is not None:
            tiling = self.tiling_for_budget(memory_budget, size, decode)
        elif tiling is None:
            tiling = self.tiling
        if not tiling:
            return None
        grid_for = _stream_grid_for if self.rules.streaming else _grid_for
        grid = grid_for(tiling, self.spatial_factor, decode)
        if not tiling.force and max(size) <= grid.tile:
            return None
        return grid

    def activation_bytes(self, size: tuple[int, int], *, decode: bool, batch: int = 1,
                         tiling: "Tiling | None | bool" = None) -> int:
        """Estimated peak working memory of decoding (or encoding) one slice, beyond weights and output.

        `size` is the input's (H, W): latents for a decode, pixels for an encode. Slices are processed one at
        a time, so the estimate does not depend on the video's length; with tiling (given, or the VAE's
        own) it is that of one tile. A multiple (measured, with margin) of a full-resolution activation at
        the width that dominates (the channels entering the last decoder stage; the first encoder stage)
        for every frame of a slice. The one estimate the hosts load the VAE with and a memory budget picks
        its tiles with (`tiling_for_budget`).

        V5: one latent (or 4 frames) at a time through the causal caches of every convolution (counted
        exactly: the last frames of each convolution's input), plus a multiple of the chunk's widest
        activation; samples are decoded one after another, so `batch` does not multiply it.
        """
        grid = self._grid(tiling, None, size, decode)
        if grid is not None:
            size = (min(size[0], grid.tile), min(size[1], grid.tile))
        samples = 1 if self.rules.streaming else batch
        return int(samples * size[0] * size[1] * self._bytes_per_input_pixel(decode))

    def _bytes_per_input_pixel(self, decode: bool) -> float:
        ch, rules = self.block_out_channels, self.rules
        itemsize = torch.finfo(self.compute_dtype).bits // 8
        if rules.streaming:
            cached, widest = self._stream_elements[decode]
            multiple = STREAM_DECODE_ACTIVATION_MULTIPLE if decode else STREAM_ENCODE_ACTIVATION_MULTIPLE
            return (cached + multiple * widest) * itemsize
        if decode:
            widest = ch[1] if len(ch) > 1 else ch[0]  # channels entering the last stage at full size
            frames = rules.chunk_frames(rules.latents_per_chunk, rules.decode_plan(rules.latents_per_chunk)[-1].mode)
            return self.spatial_factor**2 * DECODE_ACTIVATION_MULTIPLE * widest * frames * itemsize
        return ENCODE_ACTIVATION_MULTIPLE * ch[0] * rules.frames_per_chunk * itemsize

    def tiling_for_budget(self, budget_bytes: int, size: tuple[int, int], decode: bool) -> Tiling | None:
        """The largest tiles whose working memory (`activation_bytes`) fits `budget_bytes`; None if the
        whole frame fits. `size` is the input's (H, W) in latents (decode) or pixels (encode)."""
        per_pixel = self._bytes_per_input_pixel(decode)
        if size[0] * size[1] * per_pixel <= budget_bytes:
            return None
        pixels_per_unit = self.spatial_factor**2 if decode else 1
        edge = int(math.sqrt(budget_bytes * pixels_per_unit / per_pixel)) // 32 * 32
        if edge < 64:
            log.warning("A memory budget of %.1f MiB is below a 64 px tile's needs; using 64 px tiles.", budget_bytes / 2**20)
            edge = 64
        return Tiling(edge, 0.25)

    def _compute(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, self.compute_dtype)
        if self._layout(x.device) is torch.channels_last_3d:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return x

    def _layout(self, device: torch.device):
        """The memory format to compute in on `device`, with the convolution weights converted to it."""
        wanted = torch.channels_last_3d if self.channels_last and device.type == "cpu" else torch.contiguous_format
        probe = next((m.weight for m in self.model.modules() if isinstance(m, torch.nn.Conv3d)), None)
        if probe is not None and probe.device.type != "meta" and not probe.is_contiguous(memory_format=wanted):
            self.model.to(memory_format=wanted)
        return wanted

    def _check_input(self, x, channels: int, what: str, action: str, layout: str) -> None:
        """Refuse a wrongly shaped input with both shapes named, before it reaches a convolution."""
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else None
        if shape is None or len(shape) != 5 or shape[1] != channels:
            got = f"shape {shape}" if shape is not None else f"a {type(x).__name__}"
            hint = (" (latents of another model: EasyAnimate V1-V3 VAEs use 4 channels, V5 16)"
                    if what == "latents" and shape is not None and len(shape) == 5 else "")
            if what == "latents" and shape is not None and len(shape) == 4:
                hint = " (an image batch? video latents have a frame axis: add it with latents[:, :, None])"
            raise EasyAnimateError(
                f"This {self.family.upper()} VAE can {action} {what} {layout} with C = {channels} channels; got "
                f"{got}{hint}."
            )

    # ------------------------------------------------------------------ encode
    @torch.no_grad()
    def encode(self, video: torch.Tensor, *, tiling: Tiling | None | bool = None, memory_budget: int | None = None,
               progress: Callable[[int, int], None] | None = None):
        """Pixels (B, 3, F, H, W) in [-1, 1] -> posterior (`DiagonalGaussian`) over unscaled latents.

        Chunks/slices are encoded one at a time into a preallocated moments tensor on `video`'s device.
        `progress(done, total)` is called after each chunk (hosts update a bar or stop there).
        V5 takes 1 + 4k frames (others are refused with the nearest valid counts).
        """
        from .models.vae_magvit import DiagonalGaussian

        self._check_input(video, int(self.config.get("in_channels", 3)), "pixels", "encode", "(B, 3, F, H, W) in [-1, 1]")
        b, _, frames, height, width = video.shape
        lat_h, lat_w = latent_size(height, width)
        if self.rules.streaming:
            self.rules.check_frames(frames)
        plan = self.rules.encode_plan(frames)
        shape = (b, 2 * self.latent_channels, plan[-1].out_stop, lat_h, lat_w)
        moments = torch.empty(shape, dtype=self.compute_dtype, device=video.device)
        grid = self._grid(tiling, memory_budget, (height, width), decode=False)
        if self.rules.streaming:
            self._run_streams(self.model.encode_chunk, video, plan, grid, moments, _copy, progress)
            return DiagonalGaussian(moments)
        for done, chunk in enumerate(plan, start=1):

            def encode_tile(x, mode=chunk.mode):
                return self.model.encode_chunk(self._compute(x), mode)

            pixels = video[:, :, chunk.start : chunk.stop]
            run_tiled(encode_tile, pixels, grid, moments[:, :, chunk.out_start : chunk.out_stop])
            if progress is not None:
                progress(done, len(plan))
        return DiagonalGaussian(moments)

    def _run_streams(self, step: Callable, source: torch.Tensor, plan, grid, dst: torch.Tensor, write: Callable,
                     progress: Callable[[int, int], None] | None) -> None:
        """V5: every sample, and every tile of it, is one causal stream with a fresh `StreamCache`, fed the
        chunks of `plan` in order (frame/latent 0 alone, then 4 frames / 1 latent at a time); each chunk's
        result goes straight into `dst`. Samples are independent streams (the reference's sliced decode
        of a batch > 1 carries the cache from one sample into the next)."""
        from .models.vae_magvit5 import StreamCache

        tiles = 1
        if grid is not None:
            tiles = (len(_tile_starts(grid, source.shape[-2], dst.shape[-2]))
                     * len(_tile_starts(grid, source.shape[-1], dst.shape[-1])))
        # progress(done, len(plan)) once per plan chunk's worth of work, whatever the samples and tiles
        steps, done, reported = source.shape[0] * tiles * len(plan), 0, 0

        def stream(x):
            nonlocal done, reported
            cache = StreamCache()
            for chunk in plan:
                yield chunk.out_start, chunk.out_stop, step(self._compute(x[:, :, chunk.start : chunk.stop]), cache)
                done += 1
                if progress is not None and done * len(plan) // steps > reported:
                    reported = done * len(plan) // steps
                    progress(reported, len(plan))
            cache.clear()

        for sample in range(source.shape[0]):
            run_tiled_stream(stream, source[sample : sample + 1], grid, dst[sample : sample + 1], write)

    def _sample(self, posterior, frames: int, generator, noise):
        """Sample as the reference pipelines do: V3 draws once for the whole clip, V2 once per
        9-frame chunk (each chunk is a separate `vae.encode(...).sample()` call)."""
        if noise is not None:
            if isinstance(noise, (list, tuple)):
                noise = torch.cat(list(noise), dim=2)
            return posterior.sample(noise=noise)
        if generator is None:
            raise EasyAnimateError(
                "Sampling the VAE posterior needs randomness: pass generator=torch.Generator().manual_seed(seed) "
                "(or recorded noise=...)."
            )
        mean = posterior.mean
        b, c, _, h, w = mean.shape
        draw = dict(generator=generator, dtype=mean.dtype, device=generator.device)
        if self.family == "v2":
            chunks = self.rules.encode_plan(frames)
            drawn = torch.cat([torch.randn(b, c, k.out_stop - k.out_start, h, w, **draw) for k in chunks], dim=2)
        else:
            drawn = torch.randn(mean.shape, **draw)
        return posterior.sample(noise=drawn)

    @torch.no_grad()
    def encode_latents(
        self, video, *, generator=None, noise=None, sample: bool | None = None, tiling=None, memory_budget=None,
        progress=None,
    ) -> torch.Tensor:
        """Pipeline encode, as the reference does it: pixels in [-1, 1] -> posterior sample x scaling factor.
        `sample=False` uses the posterior mean instead (deterministic, no generator needed). The default
        is each family's pipelines': a sample for V1–V3, the mode (mean) for V5, whose pipelines encode
        every conditioning video with `.mode()`."""
        if sample is None:
            sample = not self.rules.streaming
        posterior = self.encode(video, tiling=tiling, memory_budget=memory_budget, progress=progress)
        latents = self._sample(posterior, video.shape[2], generator, noise) if sample else posterior.mode()
        return latents * self.scaling_factor

    @torch.no_grad()
    def latent_rgb_factors(self, images: int = 4, size: int = 64, cell: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
        """A linear map from (scaled) latent channels to RGB in [-1, 1], for cheap previews while sampling.

        Fitted by least squares, latent pixel against the mean colour of the pixels it covers, on frames of
        random colour patches, so it follows whatever VAE is loaded (the released VAEs ship no such table).
        Returns (factors (C, 3), bias (3,)), float32 on the CPU.
        """
        generator = torch.Generator().manual_seed(0)
        patches = torch.rand(images, 3, 1, size // cell, size // cell, generator=generator) * 2 - 1
        frames = patches.repeat_interleave(cell, dim=-2).repeat_interleave(cell, dim=-1)
        latents = self.encode_latents(frames.to(self.device), sample=False).float().cpu()
        colour = F.avg_pool2d(frames[:, :, 0], self.spatial_factor)  # the colour each latent pixel covers
        x = latents[:, :, 0].permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        y = colour.permute(0, 2, 3, 1).reshape(-1, 3)
        solution = torch.linalg.lstsq(torch.cat([x, torch.ones(len(x), 1)], dim=1), y).solution
        return solution[:-1], solution[-1]

    # ------------------------------------------------------------------ decode
    @torch.no_grad()
    def decode(
        self,
        latents: torch.Tensor,
        *,
        tiling: Tiling | None | bool = None,
        memory_budget: int | None = None,
        out: torch.Tensor | None = None,
        out_dtype: torch.dtype = torch.float32,
        out_device=None,
        clamp: bool = False,
        write: Callable = _copy,
        progress: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """Unscaled latents (B, C, L, h, w) -> pixels (B, 3, F, 8h, 8w), not clamped unless asked.

        The output is allocated once (or given as `out`); each slice is decoded, written into it
        and freed before the next, so memory beyond the output does not grow with the video length.
        """
        self._check_input(latents, self.latent_channels, "latents", "decode", "(B, C, F, h, w)")
        b, _, length, lat_h, lat_w = latents.shape
        plan = self.rules.decode_plan(length)
        factor = self.spatial_factor
        shape = (b, self.config.get("out_channels", 3), plan[-1].out_stop, lat_h * factor, lat_w * factor)
        if out is None:
            out = torch.empty(shape, dtype=out_dtype, device=out_device or latents.device)
        elif tuple(out.shape) != shape:
            raise EasyAnimateError(f"Output buffer has shape {tuple(out.shape)}; decoding these latents gives {shape}.")
        grid = self._grid(tiling, memory_budget, (lat_h, lat_w), decode=True)
        write = _clamped(write) if clamp else write
        if self.rules.streaming:
            self._run_streams(self.model.decode_chunk, latents, plan, grid, out, write, progress)
            return out
        for done, chunk in enumerate(plan, start=1):
            before, after = chunk.start - chunk.context_start, chunk.context_stop - chunk.stop

            def decode_tile(z, mode=chunk.mode, before=before, after=after):
                return self.model.decode_chunk(self._compute(z), mode, before, after)

            window = latents[:, :, chunk.context_start : chunk.context_stop]
            run_tiled(decode_tile, window, grid, out[:, :, chunk.out_start : chunk.out_stop], write)
            if progress is not None:
                progress(done, len(plan))
        return out

    @torch.no_grad()
    def decode_video(
        self,
        latents: torch.Tensor,
        *,
        smooth: bool | None = None,
        reference_parity: bool = False,
        generator: torch.Generator | None = None,
        noise=None,
        tiling: Tiling | None | bool = None,
        memory_budget: int | None = None,
        out_device=None,
        progress: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """Pipeline decode, as the reference does it: scaled latents -> video (B, 3, F, H, W) in [0, 1], float32.

        `smooth` (default: on only with `reference_parity`) runs the reference's seam-smoothing round
        trip: frames [a : -b] (a = chunk // 2) are re-encoded, sampled, decoded and averaged with the
        first decode. It needs `generator` (a CPU generator seeded like the reference's global RNG
        reproduces its draw) or recorded `noise`, and costs about one extra encode and decode.
        V5 pipelines have no smoothing pass (their decode is already seamless): latents / scaling factor
        -> decoder -> clamp(-1, 1) -> [0, 1].
        """
        if smooth is None:
            smooth = reference_parity and not self.rules.streaming
        if smooth and self.rules.streaming:
            raise EasyAnimateError(
                "The V5 VAE has no smoothing pass (its causal stream has no seams, and the V5 pipelines do not "
                "smooth): call decode_video without smooth=True."
            )
        self._check_input(latents, self.latent_channels, "latents", "decode", "(B, C, F, h, w)")
        if smooth and generator is None and noise is None:
            raise EasyAnimateError(
                "The smoothing pass samples the VAE posterior: pass generator=torch.Generator().manual_seed(seed) "
                "or noise=..., or call with smooth=False."
            )
        z = latents * (1 / self.scaling_factor)
        video = self.decode(z, tiling=tiling, memory_budget=memory_budget, out_device=out_device,
                            clamp=self.family != "v1", progress=progress)
        del z
        if smooth and self.family != "v1":
            self._smooth(video, generator, noise, tiling, memory_budget, progress)
        return video.clamp_(-1, 1).div_(2).add_(0.5).clamp_(0, 1)

    def _smooth(self, video, generator, noise, tiling, memory_budget, progress=None):
        chunk = self.rules.frames_per_chunk
        if video.shape[2] <= chunk:
            return
        head = chunk // 2
        middle = video[:, :, head : video.shape[2] - (chunk - head)]
        posterior = self.encode(middle, tiling=tiling, memory_budget=memory_budget, progress=progress)
        latents = self._sample(posterior, middle.shape[2], generator, noise)
        del posterior
        if self.rules.pixel_frames(latents.shape[2]) != middle.shape[2]:
            raise EasyAnimateError(
                f"The smoothing pass cannot round-trip {middle.shape[2]} frames with this VAE; decode "
                f"{self.rules.describe_valid()} frames, or pass smooth=False."
            )
        self.decode(latents, tiling=tiling, memory_budget=memory_budget, out=middle, write=_average, progress=progress)


# ---------------------------------------------------------------------------------------- loading
def _check_config_fits_weights(family: str, config: dict, shapes: dict, folder, config_arg, files) -> None:
    """The VAE config's sizes (block widths, layers per block, latent and input channels) against the
    weights' shapes, before the model is built."""
    inner = "resnets" if family == "v1" else "convs"
    blocks = count_indexed(shapes, "encoder.down_blocks.")
    held_widths = [shapes.get(f"encoder.down_blocks.{i}.{inner}.0.conv1.weight", [None])[0] for i in range(blocks)]
    if family in ("v1", "v5"):
        claimed_widths = config.get("block_out_channels")
        width_key = "block_out_channels"
    else:
        ch, mult = config.get("ch"), config.get("ch_mult")
        ok = isinstance(ch, int) and isinstance(mult, list) and all(isinstance(m, int) for m in mult)
        claimed_widths = [ch * m for m in mult] if ok else f"ch {ch!r} x ch_mult {mult!r}"
        width_key = "ch x ch_mult (block widths)"
    claimed_widths = list(claimed_widths) if isinstance(claimed_widths, (list, tuple)) else claimed_widths
    checks = [
        (width_key, claimed_widths, held_widths if blocks and None not in held_widths else None),
        ("layers_per_block", config.get("layers_per_block"),
         count_indexed(shapes, f"encoder.down_blocks.0.{inner}.") or None),
        ("latent_channels", config.get("latent_channels"), shapes.get("post_quant_conv.weight", [None])[0]),
        ("in_channels", config.get("in_channels", 3), (shapes.get("encoder.conv_in.weight") or [None, None])[1]),
    ]
    parts = []
    if folder is not None:
        parts.append(f"'{folder / 'config.json'}'")
    if config_arg is not None:
        parts.append(f"'{config_arg}'" if isinstance(config_arg, (str, Path)) else "the config= settings")
    name = "The VAE config " + " with ".join(parts) if parts else f"The {family.upper()} VAE defaults"
    where = files[0] if len(files) == 1 else files[0].parent
    check_config_against_weights(name, checks, str(where))


def _find_folder(path: Path) -> tuple[Path | None, list[Path]]:
    """(folder holding config.json or None, weight files) for a release folder, a `vae/` folder or a file."""
    if path.is_file():
        return None, [path]
    if not path.is_dir():
        what = "is not a regular file or folder" if path.exists() else "does not exist"
        raise LayoutError(f"'{path}' {what}. Pass an EasyAnimate release folder, its `vae/` folder, or a VAE weights file.")
    folder = path / "vae" if (path / "vae").is_dir() else path
    return (folder if (folder / "config.json").is_file() else None), weight_files(folder)


def _common_prefix(keys) -> str:
    for prefix in ("vae.", "first_stage_model."):
        model_keys = [k for k in keys if not k.startswith(IGNORED_PREFIXES)]
        if model_keys and all(k.startswith(prefix) for k in model_keys):
            return prefix
    return ""


def _infer_magvit_shape(shapes: dict, family: str = "v2") -> dict:
    """ch, ch_mult (V5: block_out_channels), latent_channels, layers_per_block from tensor shapes
    (config-less single files)."""
    found = {}
    if "encoder.conv_in.weight" in shapes:
        found["ch"] = shapes["encoder.conv_in.weight"][0]
        outs = []
        i = 0
        while f"encoder.down_blocks.{i}.convs.0.conv1.weight" in shapes:
            outs.append(shapes[f"encoder.down_blocks.{i}.convs.0.conv1.weight"][0])
            i += 1
        if outs and family == "v5":
            del found["ch"]
            found["block_out_channels"] = outs
        elif outs:
            found["ch_mult"] = [o // found["ch"] for o in outs]
        found["layers_per_block"] = len({k.split(".")[4] for k in shapes if k.startswith("encoder.down_blocks.0.convs.")})
    if "post_quant_conv.weight" in shapes:
        found["latent_channels"] = shapes["post_quant_conv.weight"][0]
    return found


def build_vae(
    family: str, config: dict | None = None, *, dtype="fp32", device="cpu", operations=None, meta: bool = False
) -> VideoVAE:
    """A VAE of `family` with the family defaults updated by `config`: random weights, or meta
    tensors (`meta=True`) for the loader to fill."""
    family = family.lower()
    if family not in FAMILIES:
        raise EasyAnimateError(f"Unknown VAE family '{family}'; use one of {', '.join(FAMILIES)}.")
    config = resolve_config(family, None, config)
    requested = parse_dtype(dtype)
    operations = operations or torch.nn
    model = _construct(family, config, requested, "meta" if meta else device, operations)
    compute = torch.float32 if requested == torch.float16 and _upcasts(family, config) else requested
    if not meta and compute != requested:
        model = model.to(requested).float()
    return VideoVAE(model, family, config, compute_dtype=compute)


def _upcasts(family, config) -> bool:
    # fp16 overflows in these VAEs (black frames): the V3 reference sets `upcast_vae` for fp16 and runs
    # the VAE in float32; SD's config asks for the same through `force_upcast`.
    return family != "v1" or bool(config.get("force_upcast", True))


def _construct(family, config, dtype, device, operations):
    if family == "v1":
        from .models.vae_kl import AutoencoderKL2D, KLConfig

        return AutoencoderKL2D(KLConfig.from_dict(config), dtype=dtype, device=device, operations=operations)
    if family == "v5":
        from .models.vae_magvit5 import MagvitV5Config, MagvitV5VAE

        _check_v5_config(config)
        return MagvitV5VAE(MagvitV5Config.from_dict(config), dtype=dtype, device=device, operations=operations)
    from .models.vae_magvit import MagvitConfig, MagvitVAE

    return MagvitVAE(MagvitConfig.from_dict(config), dtype=dtype, device=device, operations=operations)


_FAMILY_ALIASES = {"v5.1": "v5", "v51": "v5"}  # V5.1 ships the V5 VAE
_NETWORKS = {"v1": "sd", "v2": "magvit", "v3": "magvit", "v5": "magvit-stream"}


def _check_v5_config(config: dict) -> None:
    """The switches a V5 VAE config may carry must describe the released mode, or the numbers would be
    another network's: refuse what this pack does not compute instead of ignoring it."""
    wrong = []
    if not config.get("spatial_group_norm", True):
        wrong.append("spatial_group_norm false (3-D GroupNorm over the chunk, trilinear upsampling)")
    if config.get("mid_block_use_attention"):
        wrong.append("mid_block_use_attention true")
    for key in ("slice_mag_vae", "slice_compression_vae", "cache_compression_vae"):
        if config.get(key):
            wrong.append(f"{key} true")
    if int(config.get("latent_channels", 16)) != 16:
        wrong.append(f"latent_channels {config.get('latent_channels')}")
    factor = 2 ** sum(t == "SpatialTemporalDownBlock3D" for t in (config.get("down_block_types") or [])[:-1])
    chunk, latents = config.get("mini_batch_encoder"), config.get("mini_batch_decoder")
    if not (isinstance(chunk, int) and chunk > 0 and chunk % factor == 0):
        wrong.append(f"mini_batch_encoder {chunk!r} (must be a positive multiple of {factor})")
    if not (isinstance(latents, int) and latents > 0):
        wrong.append(f"mini_batch_decoder {latents!r} (must be a positive integer)")
    if wrong:
        raise UnsupportedModelError(
            "This V5 (cache_mag_vae) VAE config asks for " + "; ".join(wrong) + ". The released V5/V5.1 VAE "
            "uses per-frame GroupNorm, no mid-block attention, 16 latent channels and chunks of 4 frames / "
            "1 latent (easyanimate/configs/vae_v5.json); this pack runs that mode only."
        )


def load_vae(
    path,
    *,
    family: str | None = None,
    config: dict | str | Path | None = None,
    dtype="fp32",
    device="cpu",
    operations=None,
) -> VideoVAE:
    """Load the VAE of an EasyAnimate V1/V2/V3 or V5/V5.1 release.

    `path`: a release folder (its `vae/` is used), a `vae/` folder (config.json + weights), or one
    weights file (.safetensors, or .bin/.pt through `torch.load(weights_only=True)`). Single files
    carry no config: pass `family` ("v2"/"v3" cannot be told apart from MagViT weights) and/or
    `config` (a dict or a config.json path); sizes are otherwise read from the tensor shapes.
    `dtype`: fp32, bf16 or fp16 (fp16 keeps fp16-rounded weights but computes in float32, as the
    reference's `upcast_vae` does). Training leftovers (`loss.*`) are ignored, and in V5 files the 20
    unused mid-block attention tensors of the original release; any other missing or unexpected tensor
    is an error.

    V5 (family "v5", also V5.1's VAE) is recognised by `cache_mag_vae` or 16 latent channels in the config,
    or by 16-channel MagViT weights. Its `config.json` alone drives it; a key it leaves out takes the
    released value (`easyanimate/configs/vae_v5.json`), never the original class's V2-era default.
    """
    path = Path(path)
    folder, files = _find_folder(path)
    file_config = read_json_config(folder / "config.json", what="VAE config") if folder else None
    config_arg = config
    if isinstance(config, (str, Path)):
        config = read_json_config(config, what="VAE config")
    shapes: dict[str, list[int]] = {}
    for f in files:
        shapes.update(file_key_shapes(f))
    prefix = _common_prefix(shapes)
    shapes = {k[len(prefix) :]: v for k, v in shapes.items() if k.startswith(prefix)}
    if any(k.startswith(("encoder.down.", "decoder.up.")) for k in shapes):
        raise LayoutError(
            f"'{path}' is a VAE in the original LDM/CompVis key format (`encoder.down.0.block…`); this pack reads "
            "the diffusers format of the released `vae/` folders. Use the `vae/` folder of the release."
        )
    merged_source = {**(file_config or {}), **(config or {})}
    detected = detect_family(merged_source or None, list(shapes))
    held_latents = shapes.get("post_quant_conv.weight", [None])[0]
    if detected is None and held_latents == 16:
        detected = "v5"  # config-less 16-channel MagViT weights: only V5 has them
    if family is None:
        family = detected
    elif detected is not None and _NETWORKS.get(detected) != _NETWORKS.get(
            _FAMILY_ALIASES.get(family.lower(), family.lower())):
        # V2 and V3 share one network (the caller's family picks the driving); V1 and V5 have their own
        raise LayoutError(f"'{path}' holds a {detected.upper()} VAE, but family='{family}' was requested.")
    if family is None:
        raise LayoutError(
            f"'{path}' holds MagViT VAE weights without a config: V2 (9-frame chunks) and V3 (8-frame slices) "
            "share them. Pass family='v2' or family='v3' (or the release's vae/config.json as config=)."
        )
    family = _FAMILY_ALIASES.get(family.lower(), family.lower())
    inferred = _infer_magvit_shape(shapes, family) if family != "v1" else {}
    if family in ("v2", "v3") and held_latents not in (None, 4):
        raise UnsupportedModelError(
            f"'{path}' has {held_latents} latent channels: it is not an EasyAnimate V2/V3 VAE (they use 4; V5 uses 16)."
        )
    if family == "v5" and held_latents not in (None, 16):
        raise UnsupportedModelError(
            f"'{path}' is configured as an EasyAnimate V5 VAE (`cache_mag_vae`), but its weights have {held_latents} "
            "latent channels; the V5/V5.1 VAE has 16. Use the `vae/` folder of a V5 release."
        )
    overrides = dict(config or {})
    if detected in ("v2", "v3") and family != detected:
        # The caller's family wins over the config's driving mode, with that family's chunk sizes.
        driving = ("slice_compression_vae", "mini_batch_encoder", "mini_batch_decoder")
        overrides = {**{k: family_defaults(family)[k] for k in driving}, **overrides}
    resolved = resolve_config(family, file_config, overrides, inferred)
    _check_config_fits_weights(family, resolved, shapes, folder, config_arg, files)
    from .models.vae_magvit5 import UNUSED_ATTENTION_KEYS

    vae = build_vae(family, resolved, dtype=dtype, device=device, operations=operations, meta=True)
    requested = parse_dtype(dtype)

    def rename(key):
        if not key.startswith(prefix):
            return None
        key = key[len(prefix) :]
        if key.startswith(IGNORED_PREFIXES) or family == "v5" and key in UNUSED_ATTENTION_KEYS:
            return None
        if family == "v1":
            from .models.vae_kl import rename_old_attention

            key = rename_old_attention(key)
        return key

    def tensors():
        for f in files:
            yield from iter_file(f)

    source = f"VAE '{path}'"
    _, unexpected = assign_tensors(vae.model, tensors(), dtype=requested, device=device, rename=rename, source=source)
    missing = meta_tensors(vae.model)
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing {describe_keys(missing)}")
        if unexpected:
            problems.append(f"unexpected {describe_keys(unexpected)}")
        raise CheckpointMismatchError(
            f"{source} does not match the {family.upper()} VAE built from its config: {'; '.join(problems)}. "
            "The config describes another model, or the file is not an EasyAnimate VAE."
        )
    if vae.compute_dtype != requested:
        vae.model.float()
    log.info(
        "Loaded %s VAE from %s: slice_compression_vae=%s, cache_mag_vae=%s, mini_batch_encoder=%s, "
        "mini_batch_decoder=%s, use_tiling=%s, scaling_factor=%s, compute %s",
        family, path, resolved.get("slice_compression_vae"), resolved.get("cache_mag_vae"),
        resolved.get("mini_batch_encoder"), resolved.get("mini_batch_decoder"), resolved.get("use_tiling"),
        resolved.get("scaling_factor"), vae.compute_dtype,
    )
    return vae
