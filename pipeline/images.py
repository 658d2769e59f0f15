"""Image files as pixels: decoding to 8-bit RGB, with EXIF orientation, reduce-on-decode for large JPEGs, and
the errors that mean "unreadable"."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps

REDUCE_GAP = 2  # a reduced JPEG keeps at least this many times the resize target on its shorter side

# What PIL raises for a file it cannot decode: unidentified or truncated data (OSError), broken chunks
# (SyntaxError, ValueError, EOFError), and images past its pixel limit.
IMAGE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)


def open_image(path: Path | IO[bytes], reduce_for: int = 0) -> Image.Image:
    """An image file as 8-bit RGB, with its EXIF orientation applied; raises one of IMAGE_ERRORS if unreadable.

    ``reduce_for``: the shorter side that a resize will bring the image to next (0: decode at full size). A JPEG
    is then decoded at the smallest of libjpeg's DCT scales (1/2, 1/4, 1/8) that keeps its shorter side at least
    ``REDUCE_GAP`` times that: the scaling happens inside the decoder, so a 12-megapixel photo costs about a
    quarter of a full decode, and the antialiased resize from twice the target or more is indistinguishable
    from one from full size. Other formats, and JPEGs too small to reduce, decode as with 0.

    16-bit images are scaled to 8 bits (PIL's own conversion would clip them to white); an image over
    PIL's pixel limit (``Image.MAX_IMAGE_PIXELS``) is refused as a decompression bomb.
    """
    if isinstance(path, (str, Path)):
        _refuse_special(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            if reduce_for and img.format == "JPEG":
                side = REDUCE_GAP * reduce_for
                img.draft(None, (side, side))  # picks the scale; keeps both sides >= side
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                wide = np.asarray(img, dtype=np.int64)
                if img.mode != "I" or wide.max() > 255:  # 16-bit samples (PIL reads some 16-bit PNGs as "I")
                    wide = wide >> 8
                img = Image.fromarray(wide.clip(0, 255).astype(np.uint8))
            return img.convert("RGB")


def read_bytes(path: Path) -> bytes:
    """A file's bytes, refusing what is not a regular file as ``open_image`` does."""
    _refuse_special(path)
    return Path(path).read_bytes()


def _refuse_special(path: str | Path) -> None:
    if os.path.exists(path) and not os.path.isfile(path):
        raise OSError(f"not a regular file: {path}")  # a FIFO would block, a device never end


def image_problem(path: Path) -> str:
    """Why ``path`` cannot be used as an image, or "" when it can. Decodes every byte of it; a large JPEG at a
    reduced scale, which reads all of its data as a full decode does, at a fraction of the cost."""
    try:
        open_image(path, reduce_for=1)
    except IMAGE_ERRORS as err:
        return f"{type(err).__name__}: {err}"
    return ""
