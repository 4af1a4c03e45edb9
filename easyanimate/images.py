"""Reading start images safely: the pixel count is checked before decoding, and large images are
shrunk while still 8-bit, so a small file claiming a huge size (a decompression bomb) cannot take
the machine's memory.

    image = read_image("cat.png", size=(384, 672))    # (1, 3, 384, 672) float32 in [0, 1]
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
