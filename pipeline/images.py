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
# A reduced JPEG's info: the region of its pixels that the whole photo covers, (left, top, right, bottom). libjpeg
# rounds a reduced side up (333 px at 1/2: 167 px, of which the photo covers 166.5): a resize of the whole frame
# would stretch the photo by that fraction of a pixel.
FRAME = "pipeline.frame"
# EXIF orientation -> where Pillow's exif_transpose takes a point (x, y) of a (w, h) image
_ORIENTED = {
    2: lambda x, y, w, h: (w - x, y),
    3: lambda x, y, w, h: (w - x, h - y),
    4: lambda x, y, w, h: (x, h - y),
    5: lambda x, y, w, h: (y, x),
    6: lambda x, y, w, h: (h - y, x),
    7: lambda x, y, w, h: (h - y, w - x),
    8: lambda x, y, w, h: (y, w - x),
}

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


def open_image(path: Path | IO[bytes], reduce_for: int = 0, *, name: str = "") -> Image.Image:
    """An image file as 8-bit RGB, with its EXIF orientation applied; raises one of IMAGE_ERRORS if unreadable.

    ``reduce_for``: the shorter side that a resize will bring the image to next (0: decode at full size). A JPEG
    is then decoded at the smallest of libjpeg's DCT scales (1/2, 1/4, 1/8) that keeps its shorter side at least
    ``REDUCE_GAP`` times that: the scaling happens inside the decoder, so a 12-megapixel photo costs about a
    quarter of a full decode, and the antialiased resize from twice the target or more is indistinguishable
    from one from full size. Other formats, and JPEGs too small to reduce, decode as with 0. A reduced image's
    ``info[FRAME]`` is the part of its pixels that the photo covers (oriented as the image is): resize from that.

    16-bit images are scaled to 8 bits (PIL's own conversion would clip them to white); an image over
    PIL's pixel limit (``Image.MAX_IMAGE_PIXELS``) is refused as a decompression bomb. ``name``: what an error
    calls the file (its id), where Pillow would name a file object by its repr (``<_io.BytesIO object at 0x…>``).
    """
    if isinstance(path, (str, Path)):
        _refuse_special(path)
    with warnings.catch_warnings():  # a frame decoded later may be over the limit too (GIF, TIFF)
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with identify(path, name) as img:
            frame = None
            if reduce_for and img.format == "JPEG":
                side = REDUCE_GAP * reduce_for
                drafted = img.draft(None, (side, side))  # picks the scale; keeps both sides >= side
                frame = _oriented(drafted[1], img.size, img.getexif().get(0x0112)) if drafted else None
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                wide = np.asarray(img, dtype=np.int64)
                if img.mode != "I" or wide.max() > 255:  # 16-bit samples (PIL reads some 16-bit PNGs as "I")
                    wide = wide >> 8
                img = Image.fromarray(wide.clip(0, 255).astype(np.uint8))
            img = img.convert("RGB")
            if frame is not None and frame != (0, 0, *img.size):
                img.info[FRAME] = frame
            return img


def identify(path: str | Path | IO[bytes], name: str = "") -> Image.Image:
    """``Image.open``: the header alone (format, size, mode), no pixels; raises one of IMAGE_ERRORS for data that
    Pillow cannot identify and for an image over its pixel limit. ``name``: what the error calls the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(path)
    except Image.UnidentifiedImageError:
        if not name:
            raise
        raise Image.UnidentifiedImageError(f"cannot identify image file {name!r}") from None


def _oriented(box: tuple[float, ...], size: tuple[int, int], orientation: object) -> tuple[float, ...]:
    """``box`` of an image of ``size`` as it lies once exif_transpose has applied ``orientation``."""
    where = _ORIENTED.get(orientation)  # type: ignore[call-overload]
    if where is None:  # upright, or an orientation that exif_transpose ignores too
        return tuple(box)
    (x0, y0), (x1, y1) = where(box[0], box[1], *size), where(box[2], box[3], *size)
    return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def read_bytes(path: Path) -> bytes:
    """A file's bytes, refusing what is not a regular file as ``open_image`` does."""
    _refuse_special(path)
    return Path(path).read_bytes()


def _refuse_special(path: str | Path) -> None:
    if os.path.exists(path) and not os.path.isfile(path):
        raise OSError(f"not a regular file: {path}")  # a FIFO would block, a device never end


def reason(err: BaseException) -> str:
    """How a file's problem reads in the listing, skipped.csv and the errors: ``UnidentifiedImageError: …``."""
    return f"{type(err).__name__}: {err}"


def header_problem(path: Path, name: str = "") -> str:
    """Why Pillow cannot even identify ``path`` as an image, or "" when it can: reads its header (format, size,
    mode), not its pixels. Refuses what ``image_problem`` refuses at that point: unknown or garbled data, and
    decompression bombs. ``name``: what the reason calls the file (its id, so that no root is recorded in it)."""
    try:
        _refuse_special(path)
        identify(path, name).close()
    except IMAGE_ERRORS as err:
        return reason(err)
    return ""


def image_problem(path: Path, name: str = "") -> str:
    """Why ``path`` cannot be used as an image, or "" when it can. Decodes every byte of it; a large JPEG at a
    reduced scale, which reads all of its data as a full decode does, at a fraction of the cost. ``name`` as for
    ``header_problem``."""
    try:
        open_image(path, reduce_for=1, name=name)
    except IMAGE_ERRORS as err:
        return reason(err)
    return ""
