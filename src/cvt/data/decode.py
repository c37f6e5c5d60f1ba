"""Image decoding that survives real-world files: every readable image becomes 8-bit RGB, everything else a clear error.

Handled: greyscale (1, L, LA), palettes with or without transparency (P, PA), RGBA, CMYK and YCbCr JPEGs, 16-bit and
32-bit integer or float greyscale, EXIF orientation (the pixels are turned the way a viewer shows them), animated or
multi-page files (the first frame), images of any size down to 1x1. Refused with `UnreadableImageError` (which names
the file and the reason): zero-byte files, non-images, corrupt or truncated files, images with more pixels than
`max_pixels` (a decompression-bomb guard, checked from the header before any pixel is decoded), files larger than
`max_bytes` (checked before the file is read), and anything that is not a regular file: a FIFO, a device, a socket or
a link to one is refused from its `stat` without being opened, so a FIFO named x.jpg cannot hang a reader and a link
to /dev/zero cannot fill the memory.
"""

from __future__ import annotations

import io
import os
import stat
import warnings

import numpy as np
from PIL import Image, ImageOps

# PIL's own default bomb limit (about 89.5 million pixels, e.g. 9459 x 9459); PIL refuses twice this on its own.
DEFAULT_MAX_PIXELS = 89_478_485

# The largest image file read whole (512 MiB): above any photograph within DEFAULT_MAX_PIXELS, even an uncompressed
# 8-bit RGB BMP or TIFF of that many pixels (268 MB); a larger file named .jpg is refused before it is read.
DEFAULT_MAX_BYTES = 512 * 1024**2

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


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"))  # fmt: skip
    return next((kind for test, kind in kinds if test(mode)), "not a regular file")


def read_file(path: str | os.PathLike, *, name: str | None = None, max_bytes: int | None = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of a regular file of at most `max_bytes`, checked before anything is read.

    A FIFO, device, socket or directory (or a link to one) is refused from its `stat`, without being opened
    (opening a FIFO waits for a writer; reading /dev/zero never ends). The file is opened non-blocking and checked
    again, in case it was replaced in between, and never more than `max_bytes` + 1 bytes are read.

    Raises:
        UnreadableImageError: not a regular file, too large, or not readable.
    """
    name = name if name is not None else str(path)
    try:
        kind = os.stat(path).st_mode
        if not stat.S_ISREG(kind):
            raise UnreadableImageError(name, f"not a regular file but {_file_kind(kind)}; skipped without reading it")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise UnreadableImageError(name, f"not a regular file but {_file_kind(st.st_mode)}")
            check_size(name, st.st_size, max_bytes)
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
    except OSError as err:
        raise UnreadableImageError(name, f"cannot read the file ({err.strerror or err})") from err
    check_size(name, len(data), max_bytes)  # it grew after the check
    return data


def check_size(name: str, size: int, max_bytes: int | None) -> None:
    """Refuse a file (or tar member) of `size` bytes above `max_bytes` (None: no limit), before it is read."""
    if max_bytes is not None and size > max_bytes:
        raise UnreadableImageError(
            name, f"{size:,} bytes is above the image file limit of {max_bytes:,} bytes; skipped without reading it"
        )


def load_image(
    source: str | os.PathLike | bytes,
    *,
    name: str | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_bytes: int | None = DEFAULT_MAX_BYTES,
) -> Image.Image:
    """Decode an image file into an 8-bit RGB PIL image, upright as EXIF orientation says.

    Args:
        source: a path, or the encoded bytes of a file (a tar member).
        name: what to call the file in errors; defaults to the path.
        max_pixels: refuse images with more pixels than this (width * height), read from the header before
            decoding. None disables the check; PIL itself still refuses more than twice its own limit.
        max_bytes: refuse files larger than this before reading them (None: no limit). Only regular files are read.

    Returns:
        A fully decoded RGB image (no file handle left open).

    Raises:
        UnreadableImageError: the file is empty, not an image, corrupt, truncated or too large, or not a regular
            file (a FIFO, device, socket or directory).
    """
    name = name if name is not None else (str(source) if not isinstance(source, bytes) else "<bytes>")
    data = source if isinstance(source, bytes) else read_file(source, name=name, max_bytes=max_bytes)
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
