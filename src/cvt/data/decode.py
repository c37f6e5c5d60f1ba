"""Image decoding that survives real-world files: every readable image becomes 8-bit RGB, everything else a clear error.

Handled: greyscale (1, L, LA), palettes with or without transparency (P, PA), RGBA, CMYK and YCbCr JPEGs, 16-bit and
32-bit integer or float greyscale, EXIF orientation (the pixels are turned the way a viewer shows them), animated or
multi-page files (the first frame), images of any size down to 1x1. Refused with `UnreadableImageError` (which names
the file and the reason): zero-byte files, non-images, corrupt or truncated files, and images with more pixels than
`max_pixels` (a decompression-bomb guard, checked from the header before any pixel is decoded).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# PIL's own default bomb limit (about 89.5 million pixels, e.g. 9459 x 9459); PIL refuses twice this on its own.
DEFAULT_MAX_PIXELS = 89_478_485

# File endings treated as images when scanning folders and tar shards (lower case, without the dot).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "ppm", "pgm", "pbm", "bmp", "gif", "tif", "tiff", "webp")

# Transparent pixels are composited onto white, what an image viewer shows. Dropping the alpha channel instead (a
# plain `convert("RGB")`) exposes whatever colour happens to sit under fully transparent pixels, often black noise.
BACKGROUND = (255, 255, 255)


class UnreadableImageError(ValueError):
    """A file that cannot be decoded as an image.

    Attributes:
        path: the file (or tar member) that failed.
        reason: why, in words.
    """

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self) -> tuple:  # picklable across DataLoader worker processes
        return (type(self), (self.path, self.reason))


def is_image_file(name: str | os.PathLike) -> bool:
    """Whether `name` ends in one of `IMAGE_EXTENSIONS` (case-insensitive)."""
    return str(name).rpartition(".")[2].lower() in IMAGE_EXTENSIONS


def load_image(
    source: str | os.PathLike | bytes,
    *,
    name: str | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Decode an image file into an 8-bit RGB PIL image, upright as EXIF orientation says.

    Args:
        source: a path, or the encoded bytes of a file (a tar member).
        name: what to call the file in errors; defaults to the path.
        max_pixels: refuse images with more pixels than this (width * height), read from the header before
            decoding. None disables the check; PIL itself still refuses more than twice its own limit.

    Returns:
        A fully decoded RGB image (no file handle left open).

    Raises:
        UnreadableImageError: the file is empty, not an image, corrupt, truncated or too large.
    """
    name = name if name is not None else (str(source) if not isinstance(source, bytes) else "<bytes>")
    if isinstance(source, bytes):
        data = source
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as err:
            raise UnreadableImageError(name, f"cannot read the file ({err.strerror or err})") from err
    if not data:
        raise UnreadableImageError(name, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies instead
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if max_pixels is not None and width * height > max_pixels:
                    raise UnreadableImageError(
                        name,
                        f"{width}x{height} = {width * height:,} pixels is above the limit of {max_pixels:,} "
                        "(decompression-bomb guard); raise max_pixels if the file is trusted",
                    )
                img.load()  # decode now: truncation and corruption surface here, not later in a transform
                return _to_rgb(ImageOps.exif_transpose(img))
    except UnreadableImageError:
        raise
    except Image.UnidentifiedImageError as err:
        raise UnreadableImageError(name, "not an image (no known image format recognised)") from err
    except Image.DecompressionBombError as err:
        raise UnreadableImageError(name, f"decompression-bomb guard: {err}") from err
    except Exception as err:  # noqa: BLE001 - PIL raises many types (OSError, SyntaxError, zlib.error, ...)
        raise UnreadableImageError(name, f"corrupt or truncated ({type(err).__name__}: {err})") from err


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparency is composited onto `BACKGROUND`."""
    mode = img.mode
    if mode == "RGB":
        return img.copy() if img.readonly else img
    if mode in ("I", "F") or mode.startswith("I;16"):
        return Image.fromarray(_deep_to_uint8(np.asarray(img), mode), "L").convert("RGB")
    if mode == "P" and "transparency" in img.info or mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if "transparency" in img.info:  # L or RGB with one colour marked transparent
        return _to_rgb(img.convert("RGBA"))
    return img.convert("RGB")  # 1, L, P, CMYK, YCbCr, LAB, HSV


def _deep_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """High-bit-depth greyscale -> uint8.

    Integer modes ("I;16*", and "I", which is how PIL opens 16-bit PNGs) are taken as 16-bit: scaled by 255/65535,
    whatever their actual maximum, so a dark 16-bit image stays dark. Float images ("F") in [0, 1] are scaled by
    255, others clipped to [0, 255].
    """
    values = np.nan_to_num(arr.astype(np.float64))
    if mode != "F":
        values = values * (255.0 / 65535.0)
    elif values.size and float(values.max()) <= 1.0:
        values = values * 255.0
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)
