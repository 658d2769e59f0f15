"""Contact sheets: thumbnails of chosen images with a caption each, for the plots of evaluate and audit."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from PIL import Image, ImageDraw

from pipeline import sources
from pipeline.config import DataConfig
from pipeline.errors import PipelineError
from pipeline.images import IMAGE_ERRORS

log = logging.getLogger(__name__)

THUMB = 128  # tile side, pixels


def images(cfg: DataConfig, ids: Sequence[str]) -> list[Image.Image | None]:
    """The images of ``ids``, or None for those not at hand: a clone that pulled the features and not the
    images still evaluates (the features already change whenever an image does)."""
    found: list[Image.Image | None] = []
    problem = None
    try:
        reader = sources.ImageReader(cfg, reduce_for=THUMB)  # a photo decodes at a fraction of its size
    except PipelineError as err:
        reader, problem = None, err
    for item_id in ids:
        try:
            found.append(reader(item_id) if reader else None)
        except (PipelineError, *IMAGE_ERRORS) as err:
            found.append(None)
            problem = problem or err
    if problem:
        missing = sum(image is None for image in found)
        log.warning("the contact sheet shows %d of %d images by id only: %s", missing, len(ids), problem)
    return found


def contact_sheet(
    images: Sequence[Image.Image | None], captions: Sequence[str], *, thumb: int = THUMB, columns: int = 4
) -> Image.Image:
    """A grid of thumbnails, each with its caption underneath; a missing image is a grey tile with its caption."""
    rows = max(1, -(-len(images) // columns))
    caption_h = 14
    sheet = Image.new("RGB", (columns * thumb, rows * (thumb + caption_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        x, y = (i % columns) * thumb, (i // columns) * (thumb + caption_h)
        if image is None:
            draw.rectangle((x + 1, y + 1, x + thumb - 2, y + thumb - 2), fill="lightgrey")
            draw.text((x + 6, y + thumb // 2 - 6), "image not here", fill="black")
            draw.text((x + 2, y + thumb + 1), caption, fill="black")
            continue
        k = thumb / max(image.size)  # tiny images (8x8 digits) are scaled up with their pixels kept sharp
        size = (max(1, round(image.width * k)), max(1, round(image.height * k)))
        small = image.resize(size, Image.NEAREST if k > 1 else Image.BILINEAR)
        sheet.paste(small, (x + (thumb - small.width) // 2, y + (thumb - small.height) // 2))
        draw.text((x + 2, y + thumb + 1), caption, fill="black")
    return sheet


def empty(caption: str, *, thumb: int = THUMB) -> Image.Image:
    """A sheet of one caption and no image: what a plot shows when there is nothing to show."""
    sheet = Image.new("RGB", (4 * thumb, 24), "white")
    ImageDraw.Draw(sheet).text((4, 5), caption, fill="black")
    return sheet
