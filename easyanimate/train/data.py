"""Folders of clips + captions, the input of every training stage.

Two layouts are read, both into the same `ClipSet` (uint8 clips (N, F, H, W, 3) and one caption per clip):

* the synthetic generator's: `clips.npy` (N, F, H, W, 3) uint8 + `captions.txt` (one caption a line),
  optionally `image_captions.txt` (captions for single frames) and `specs.jsonl` (ground truth);
* real data: one video per clip (`name.mp4|.webm|.mov|.gif`, read with PyAV / Pillow) with its caption
  in `name.txt` beside it. Each video is resized (shorter side) and centre-cropped to `size` and its
  first `frames` frames are kept (clips that are too short are skipped with a warning).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")


@dataclass
class ClipSet:
    clips: np.ndarray  # (N, F, H, W, 3) uint8
    captions: list[str]
    image_captions: list[str]  # captions of single frames (the clip captions when a folder has none)

    def __len__(self) -> int:
        return len(self.captions)


def read_folder(folder, frames: int | None = None, size: int | None = None) -> ClipSet:
    folder = Path(folder)
    if (folder / "clips.npy").is_file():
        clips = np.load(folder / "clips.npy", mmap_mode="r")
        captions = (folder / "captions.txt").read_text().splitlines()
        images = folder / "image_captions.txt"
        image_captions = images.read_text().splitlines() if images.is_file() else captions
        if len(captions) != len(clips):
            raise ValueError(f"{folder}: {len(clips)} clips but {len(captions)} captions.")
        clips = np.asarray(clips[:, :frames] if frames else clips)
        return ClipSet(clips, captions, image_captions)
    videos = sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
    if not videos:
        raise FileNotFoundError(
            f"{folder} holds no training clips: expected clips.npy + captions.txt, or videos (.mp4, .gif, ...) "
            "each with a .txt caption of the same name."
        )
    if frames is None or size is None:
        raise ValueError("Reading a folder of videos needs frames= and size=.")
    clips, captions = [], []
    for video in videos:
        text = video.with_suffix(".txt")
        if not text.is_file():
            log.warning("skipping %s: no caption file %s", video.name, text.name)
            continue
        pixels = read_video(video, frames, size)
        if pixels is None:
            log.warning("skipping %s: fewer than %d frames", video.name, frames)
            continue
        clips.append(pixels)
        captions.append(text.read_text().strip())
    return ClipSet(np.stack(clips), captions, captions)


def read_video(path: Path, frames: int, size: int) -> np.ndarray | None:
    """The first `frames` frames of a video, resized and centre-cropped to size x size, uint8 RGB."""
    from PIL import Image

    images = []
    if path.suffix.lower() == ".gif":
        with Image.open(path) as gif:
            for index in range(getattr(gif, "n_frames", 1)):
                gif.seek(index)
                images.append(gif.convert("RGB"))
                if len(images) == frames:
                    break
    else:
        import av

        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                images.append(frame.to_image())
                if len(images) == frames:
                    break
    if len(images) < frames:
        return None
    return np.stack([np.asarray(_square(image, size)) for image in images])


def _square(image, size: int):
    from PIL import Image

    w, h = image.size
    scale = size / min(w, h)
    image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_model_pixels(clips_uint8: np.ndarray):
    """uint8 (N, F, H, W, 3) -> float tensor (N, 3, F, H, W) in [-1, 1], what the VAE takes."""
    import torch

    x = torch.from_numpy(np.array(clips_uint8, copy=True)).float().div_(127.5).sub_(1)
    return x.permute(0, 4, 1, 2, 3).contiguous()
