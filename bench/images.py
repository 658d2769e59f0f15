"""A folder of photo-like JPEG files (smooth colour fields plus grain), one subfolder per class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def make_jpegs(root: Path, n: int, *, classes: int = 4, size: tuple[int, int] = (500, 375), seed: int = 0) -> Path:
    """Write ``n`` JPEGs (default 500x375, a typical photo size) under ``root/<class>/``; keeps existing files."""
    rng = np.random.default_rng(seed)
    width, height = size
    for i in range(n):
        path = root / f"class{i % classes}" / f"{i:06d}.jpg"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
        grain = rng.integers(-12, 13, size=field.shape, dtype=np.int16)
        Image.fromarray(np.clip(field + grain, 0, 255).astype(np.uint8)).save(path, quality=90)
    return root
