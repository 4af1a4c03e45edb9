"""Frames in, model input out: sparse segment sampling, resize + crop, normalise.

    frames = prepare_frames(video, config)                      # video (T, H, W, 3) or (B, T, H, W, 3) in [0, 1]
    frames.shape == (B, config.num_frames, 3, config.image_size, config.image_size)

The clip is split into `num_frames` equal segments; evaluation takes the middle frame of each segment,
training a random frame per segment. Frames are resized so the short side is `image_size` and center
cropped (training: one random resized crop covering 80-100 % of the short side's square, the same for
every frame of a clip; never flipped, because QA asks about left and right). Clips shorter than
`num_frames` repeat frames.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import check_finite


def sample_frame_indices(total: int, count: int, train: bool = False,
                         generator: torch.Generator | None = None) -> list[int]:
    """`count` frame indices of a `total`-frame clip: one per equal segment (middle, or random when training)."""
    if total < 1 or count < 1:
        raise ValueError(f"need at least one frame to sample from and to sample (total={total}, count={count})")
    indices = []
    for i in range(count):
        start = (i * total) // count
        end = max(start + 1, ((i + 1) * total) // count)  # short clips: segments of one (repeated) frame
        if train:
            indices.append(start + int(torch.randint(end - start, (1,), generator=generator)))
        else:
            indices.append((start + end - 1) // 2)
    return indices


def _crop_box(height: int, width: int, train: bool, generator) -> tuple[int, int, int]:
    """(top, left, side) of the square crop taken before resizing to image_size."""
    side = min(height, width)
    if train:
        scale = 0.8 + 0.2 * float(torch.rand((), generator=generator))
        side = max(1, round(side * scale))
        top = int(torch.randint(height - side + 1, (1,), generator=generator))
        left = int(torch.randint(width - side + 1, (1,), generator=generator))
        return top, left, side
    return (height - side) // 2, (width - side) // 2, side


def prepare_frames(video, config, train: bool = False, generator: torch.Generator | None = None,
                   num_frames: int | None = None, random_crop: bool = True) -> torch.Tensor:
    """video (T, H, W, 3) or (B, T, H, W, 3), float in [0, 1] (ComfyUI IMAGE layout; numpy or torch; uint8 0-255 too)
    -> (B, num_frames, 3, S, S) float32, normalised with the config's mean/std.

    `num_frames` overrides config.num_frames (dense scoring of long clips). `random_crop=False` keeps the
    centre crop in training too (for data whose labels are positions and speeds in pixels)."""
    video = torch.as_tensor(video)
    if video.dtype == torch.uint8:  # 0-255 frames (e.g. decoded video) -> [0, 1]
        video = video.to(torch.float32) / 255.0
    if video.dim() == 4:
        video = video.unsqueeze(0)
    if video.dim() != 5 or video.shape[-1] != 3:
        raise ValueError(f"expected frames (T, H, W, 3) or (B, T, H, W, 3), got {tuple(video.shape)}")
    check_finite(video, "MuLTI input video")  # NaN frames would make every score NaN
    count = num_frames or config.num_frames
    size = config.image_size
    mean = torch.tensor(config.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(config.image_std).view(1, 3, 1, 1)
    clips = []
    for clip in video:
        picked = clip[sample_frame_indices(clip.shape[0], count, train, generator)]
        picked = picked.to(torch.float32).permute(0, 3, 1, 2)  # (T, 3, H, W)
        top, left, side = _crop_box(picked.shape[2], picked.shape[3], train and random_crop, generator)
        picked = picked[:, :, top: top + side, left: left + side]
        if side != size:
            picked = F.interpolate(picked, size=(size, size), mode="bilinear", align_corners=False,
                                   antialias=side > size)
        clips.append((picked.clamp(0, 1) - mean) / std)
    return torch.stack(clips)

