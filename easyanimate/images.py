"""Reading start images and input videos safely: the pixel count is checked before decoding, and large
images are shrunk while still 8-bit, so a small file claiming a huge size (a decompression bomb) cannot
take the machine's memory.

    image = read_image("cat.png", size=(384, 672))    # (1, 3, 384, 672) float32 in [0, 1]
    video = read_video("in.mp4", frames=49, fps=8, size=(384, 672))   # (1, 3, 49, 384, 672)
    check_image_pixels(width, height)                 # for hosts that decode images themselves
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .errors import EasyAnimateError, check_finite

# 64 megapixels: an 8K frame (7680 x 4320 = 33 MP) fits twice; a decoded RGB image of this size is 192 MiB.
MAX_IMAGE_PIXELS = 64_000_000


def check_image_pixels(width: int, height: int, max_pixels: int | None = None, what: str = "image") -> None:
    """Refuse an image of more than `max_pixels` pixels (default MAX_IMAGE_PIXELS; or of no pixels), naming
    its size and the limit."""
    max_pixels = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if width < 1 or height < 1:
        raise EasyAnimateError(f"The {what} has no pixels ({width}x{height}).")
    if width * height > max_pixels:
        raise EasyAnimateError(
            f"The {what} is {width}x{height} pixels ({width * height / 1e6:.1f} megapixels), over the limit of "
            f"{max_pixels / 1e6:g} megapixels; decoding it would need {width * height * 3 / 2**30:.1f} GiB or more. "
            "Scale it down first (video generation needs far fewer pixels), or raise the limit (max_pixels)."
        )


def read_image(path, *, size: tuple[int, int] | None = None, max_pixels: int | None = None) -> torch.Tensor:
    """An image file -> (1, 3, H, W) float32 in [0, 1] (RGB; an animation's first frame).

    The size is read from the header and checked against `max_pixels` (default MAX_IMAGE_PIXELS, 64
    megapixels) before anything is decoded. With
    `size=(height, width)` the 8-bit image is resized to it with Pillow's bicubic filter (as the reference
    resizes its PIL start images) before it becomes float, so a large photo costs 8-bit memory only.
    Raises EasyAnimateError naming the file for a missing path, a folder or device, a file that is not
    an image, a damaged image or one over the limit.
    """
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    max_pixels = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    what = f"image '{path}'"
    if not path.exists():
        raise EasyAnimateError(f"The {what} does not exist.")
    if not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file"
        raise EasyAnimateError(f"The {what} is {kind}; pass an image file (PNG, JPEG, WebP, ...).")
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb warning is replaced by the explicit limit below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                check_image_pixels(width, height, max_pixels, what)
                rgb = image.convert("RGB")
        if size is not None and (rgb.height, rgb.width) != tuple(size):
            rgb = rgb.resize((int(size[1]), int(size[0])), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy())
    except Image.DecompressionBombError as err:
        raise EasyAnimateError(
            f"The {what} is too large to decode safely ({err}); the limit here is {max_pixels / 1e6:g} megapixels. "
            "Scale it down first."
        ) from None
    except UnidentifiedImageError:
        raise EasyAnimateError(f"The {what} is not an image file Pillow can read (PNG, JPEG, WebP, BMP, ...).") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise EasyAnimateError(f"The {what} cannot be decoded: it is damaged or truncated ({err}).") from None
    image = pixels.permute(2, 0, 1)[None].to(torch.float32).div_(255)
    return check_finite(image, what)


def read_video(path, *, frames: int | None = None, fps: float | None = None, size: tuple[int, int] | None = None,
               max_pixels: int | None = None) -> torch.Tensor:
    """A video file (decoded with PyAV) -> (1, 3, F, H, W) float32 in [0, 1]: its first `frames` frames (None:
    all), sampled as the reference's video-to-video script samples them: every ⌊source fps / `fps`⌋-th frame
    (at least every frame; `fps` None: every frame). With `size=(height, width)` each 8-bit frame is resized
    with Pillow's bicubic filter, as `read_image` (and the stages) resize images; else the file's own size.

    The frame size is checked against `max_pixels` (as `read_image`) before decoding; a file with too few
    frames, or that is not a video, is refused naming the file.
    """
    import numpy as np
    from PIL import Image

    path = Path(path)
    what = f"video '{path}'"
    if not path.is_file():
        raise EasyAnimateError(f"The {what} {'is not a regular file' if path.exists() else 'does not exist'}.")
    if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int) or frames < 1):
        raise EasyAnimateError(f"frames must be a whole number ≥ 1; got {frames!r}.")
    try:
        import av
    except ImportError:
        raise EasyAnimateError(f"Reading the {what} needs PyAV (pip install av).") from None
    kept = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise EasyAnimateError(f"The {what} has no video stream.")
            stream = container.streams.video[0]
            check_image_pixels(stream.codec_context.width or 1, stream.codec_context.height or 1, max_pixels, what)
            rate = float(stream.average_rate) if stream.average_rate else None
            step = max(1, int(rate // fps)) if fps and rate else 1
            for index, frame in enumerate(container.decode(stream)):
                if index % step:
                    continue
                check_image_pixels(frame.width, frame.height, max_pixels, what)
                image = frame.to_image()  # RGB
                if size is not None and (image.height, image.width) != tuple(size):
                    image = image.resize((int(size[1]), int(size[0])), Image.Resampling.BICUBIC)
                kept.append(np.asarray(image, dtype=np.uint8))
                if frames is not None and len(kept) == frames:
                    break
    except EasyAnimateError:
        raise
    except (av.error.FFmpegError, OSError, ValueError) as err:
        raise EasyAnimateError(f"The {what} cannot be decoded ({err}); is it a video file?") from None
    if not kept or (frames is not None and len(kept) < frames):
        every = f" taking one frame in {step}" if step > 1 else ""
        raise EasyAnimateError(
            f"The {what} gives {len(kept)} frames{every}; {frames} are needed. Use a longer video or fewer frames."
        )
    pixels = torch.from_numpy(np.stack(kept))  # (F, H, W, 3) uint8
    return pixels.permute(3, 0, 1, 2)[None].float().div_(255)
