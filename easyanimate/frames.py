"""Frame arithmetic of the EasyAnimate families, in one place.

Pixel frames and latent frames are related differently in each family (docs/numerics.md#frame-arithmetic):

* V1 (SD VAE, 2-D): one latent frame per pixel frame; any count works.
* V2 (MagViT, causal): the pipeline cuts the video into independent chunks of 9 frames; each becomes
  3 latents (9 -> 5 -> 3 through two causal temporal stages) and decodes back to 9 frames.
* V3 (slice VAE): slices of 8 frames become 2 latents and decode back to 8 frames; an odd count
  first encodes/decodes frame 0 on its own. In the decoder each 2-latent slice sees its neighbour
  slices through `conv_in` and the mid block ("feature sharing").
* V5 / V5.1 (causal MagViT with a streaming cache): 1 + 4k frames <-> 1 + k latents. Frame 0 is
  encoded (and latent 0 decoded) on its own, then every 4 frames become one latent and every latent
  4 frames; the causal convolutions carry their last input frames from one chunk to the next, so the
  chunks add up to one pass over the whole video.

Spatially every family divides height and width by 8.

Everything that needs these numbers (the VAE drivers, the sampler, the nodes) asks a `FrameRule`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from .errors import EasyAnimateError

SPATIAL_FACTOR = 8

# How a chunk of frames is padded in time inside the 3-D VAE (the reference's `padding_flag`;
# docs/numerics.md#temporal-padding).
CAUSAL = "causal"  # V2: replicate 2 frames in front of every temporal conv; upsampling keeps frame 0
SLICE = "slice"  # V3: zero-pad 1 frame on both sides; upsampling doubles every frame
SINGLE = "single"  # V3 lone first frame: zero padding, no temporal up/downsampling effect
FRAME = "frame"  # V1: a 2-D VAE applied to one frame
STREAM_START = "stream-start"  # V5: frame/latent 0 of a stream, alone: no temporal down/upsampling
STREAM = "stream"  # V5: the next chunk of a stream, continuing from the cache of the previous one


class FrameCountError(EasyAnimateError):
    """A frame count the family cannot produce or consume."""


class FrameCount(NamedTuple):
    """The outcome of rounding a requested frame count the way the reference pipelines do."""

    requested: int
    frames: int
    latents: int

    @property
    def changed(self) -> bool:
        return self.frames != self.requested


class Chunk(NamedTuple):
    """One piece of a sliced encode/decode.

    `start:stop` is the input range processed; `context_start:context_stop` (which contains it) is
    what the decoder's first stages may look at (feature sharing, V3 only); `out_start:out_stop` is
    where the result goes in the output.
    """

    start: int
    stop: int
    mode: str
    out_start: int
    out_stop: int
    context_start: int
    context_stop: int


@dataclass(frozen=True)
class FrameRule:
    family: str
    frames_per_chunk: int  # pixel frames encoded together (V1 1, V2 9, V3 8, V5 4)
    latents_per_chunk: int  # latent frames decoded together (V1 1, V2 3, V3 2, V5 1)
    causal: bool  # V2 padding/upsampling
    lone_first_frame: bool  # V3: odd counts handle frame 0 on its own
    share_decoder_features: bool  # V3: decoder stem sees the neighbouring slices
    temporal_stages: int = 2  # number of stride-2 temporal down/upsamplers
    streaming: bool = False  # V5: frame 0 alone, then chunks carried on by the causal cache (1 + 4k frames)

    @property
    def models(self) -> str:
        """The model versions this rule is for, as messages name them ("V3"; the V5 VAE serves V5 and V5.1)."""
        return "V5/V5.1" if self.family == "v5" else self.family.upper()

    @property
    def temporal_factor(self) -> int:
        return 2**self.temporal_stages

    # ------------------------------------------------------------------ the pipeline's rules
    def latent_frames(self, frames: int) -> int:
        """Latent frames the pipelines sample for a video of `frames` frames (after rounding)."""
        return self.round_frames(frames).latents

    def round_frames(self, frames: int) -> FrameCount:
        """Round a requested count as the reference does: down to a multiple of the chunk, 1 stays 1."""
        frames = int(frames)
        if frames < 1:
            raise FrameCountError(f"A video needs at least 1 frame (got {frames}). {self.describe_valid()}")
        if self.streaming:  # the V5 pipelines: F <- (F - 1) // 4 * 4 + 1
            k = (frames - 1) // self.temporal_factor
            return FrameCount(frames, k * self.temporal_factor + 1, k + 1)
        if frames == 1 or self.frames_per_chunk == 1:
            return FrameCount(frames, frames, frames)
        chunks = frames // self.frames_per_chunk
        if chunks == 0:
            raise FrameCountError(
                f"{frames} frames is too short for EasyAnimate {self.family.upper()}: {self.describe_valid()}"
            )
        return FrameCount(frames, chunks * self.frames_per_chunk, chunks * self.latents_per_chunk)

    def check_frames(self, frames: int) -> FrameCount:
        """Like `round_frames`, but refuse any count that would be changed."""
        count = self.round_frames(frames)
        if count.changed and self.streaming:
            raise FrameCountError(
                f"EasyAnimate {self.models} cannot make {frames} frames: {self.describe_valid()} "
                f"(the nearest valid counts are {count.frames} and {count.frames + self.temporal_factor})."
            )
        if count.changed:
            raise FrameCountError(
                f"EasyAnimate {self.family.upper()} cannot make {frames} frames: {self.describe_valid()} "
                f"(the nearest shorter valid count is {count.frames})."
            )
        return count

    def pixel_frames(self, latents: int) -> int:
        """Frames a decode of `latents` latent frames produces (any count, partial slices included)."""
        return sum(c.out_stop - c.out_start for c in self.decode_plan(latents))

    def encoded_latents(self, frames: int) -> int:
        """Latent frames an encode of `frames` pixel frames produces (any count)."""
        return sum(c.out_stop - c.out_start for c in self.encode_plan(frames))

    def describe_valid(self) -> str:
        n = self.frames_per_chunk
        if self.streaming:
            f = self.temporal_factor
            return f"valid counts are 1 + {f}k ({', '.join(str(1 + f * k) for k in range(4))}, …)"
        if n == 1:
            return "any positive number of frames is valid"
        return f"valid counts are 1 or a multiple of {n} ({n}, {2 * n}, {3 * n}, …)"

    # ------------------------------------------------------------------ per-chunk arithmetic
    def chunk_latents(self, frames: int, mode: str) -> int:
        """Latent frames one chunk of `frames` pixel frames becomes."""
        if mode in (FRAME, SINGLE, STREAM_START):
            return frames
        if mode == STREAM:  # each stride-2 stage halves a chunk (whole chunks of 4 frames: exact)
            return frames // self.temporal_factor
        for _ in range(self.temporal_stages):
            # kernel 3, stride 2, two frames of padding (causal: both in front) -> ceil(t / 2)
            frames = (frames - 1) // 2 + 1
        return frames

    def chunk_frames(self, latents: int, mode: str) -> int:
        """Pixel frames one chunk of `latents` latent frames decodes to."""
        if mode in (FRAME, SINGLE, STREAM_START):
            return latents
        if mode == STREAM:  # every temporal upsampler doubles every frame after the stream's first
            return latents * self.temporal_factor
        for _ in range(self.temporal_stages):
            # causal upsampling keeps the first frame as is and doubles the others
            latents = 2 * latents - 1 if mode == CAUSAL else 2 * latents
        return latents

    # ------------------------------------------------------------------ slicing plans
    def _plan(self, length: int, size: int, per_chunk, share: bool) -> list[Chunk]:
        if length < 1:
            raise FrameCountError(f"Nothing to process: {length} frames. {self.describe_valid()}")
        multi = FRAME if self.frames_per_chunk == 1 else (CAUSAL if self.causal else SLICE)
        plan, out = [], 0
        start = 0
        if self.streaming:
            # frame/latent 0 alone, then chunks through the causal cache (no neighbour context needed)
            plan.append(Chunk(0, 1, STREAM_START, 0, 1, 0, 1))
            multi, out, start, share = STREAM, 1, 1, False
        elif self.lone_first_frame and length % 2 == 1:
            n = per_chunk(1, SINGLE)
            plan.append(Chunk(0, 1, SINGLE, out, out + n, 0, 1))
            out, start = out + n, 1
        for i in range(start, length, size):
            stop = min(i + size, length)
            n = per_chunk(stop - i, multi)
            first, last = i == start, stop >= length
            context_start = i if (first or not share) else i - size
            context_stop = stop if (last or not share) else min(stop + size, length)
            plan.append(Chunk(i, stop, multi, out, out + n, context_start, context_stop))
            out += n
        return plan

    def encode_plan(self, frames: int) -> list[Chunk]:
        """How the encoder walks `frames` pixel frames (encoder slices never share features)."""
        return self._plan(frames, self.frames_per_chunk, self.chunk_latents, share=False)

    def decode_plan(self, latents: int) -> list[Chunk]:
        """How the decoder walks `latents` latent frames."""
        return self._plan(latents, self.latents_per_chunk, self.chunk_frames, self.share_decoder_features)


FAMILY_RULES = {
    "v1": FrameRule("v1", 1, 1, causal=False, lone_first_frame=False, share_decoder_features=False, temporal_stages=0),
    "v2": FrameRule("v2", 9, 3, causal=True, lone_first_frame=False, share_decoder_features=False),
    "v3": FrameRule("v3", 8, 2, causal=False, lone_first_frame=True, share_decoder_features=True),
    # V5 and V5.1 (one VAE): `mini_batch_encoder` 4 frames -> 1 latent, `mini_batch_decoder` 1 latent
    "v5": FrameRule("v5", 4, 1, causal=True, lone_first_frame=True, share_decoder_features=False, streaming=True),
}
_FAMILY_ALIASES = {"v5.1": "v5", "v51": "v5"}


def frame_rule(family: str) -> FrameRule:
    try:
        name = family.lower()
        return FAMILY_RULES[_FAMILY_ALIASES.get(name, name)]
    except (KeyError, AttributeError):
        raise EasyAnimateError(f"Unknown EasyAnimate family '{family}'; use one of v1, v2, v3, v5 (v5.1).") from None


def latent_size(height: int, width: int) -> tuple[int, int]:
    """Latent height and width for a pixel size; refuses sizes the VAE cannot round-trip."""
    if height % SPATIAL_FACTOR or width % SPATIAL_FACTOR:
        raise FrameCountError(
            f"Height and width must be multiples of {SPATIAL_FACTOR} pixels (got {height}x{width}); "
            f"the reference pipelines use multiples of 16, e.g. {height // 16 * 16}x{width // 16 * 16}."
        )
    return height // SPATIAL_FACTOR, width // SPATIAL_FACTOR


def pixel_size(latent_height: int, latent_width: int) -> tuple[int, int]:
    return latent_height * SPATIAL_FACTOR, latent_width * SPATIAL_FACTOR
