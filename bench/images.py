"""Generated image folders, one subfolder per class: photo-like JPEGs of ImageNet's size (smooth colour fields plus
grain), and camera-like 12-megapixel photos. Both write in parallel on every core and keep files already there."""

from __future__ import annotations

import concurrent.futures
import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.hardware import usable_cores

PHOTO_SIZE = (4032, 3024)  # 12 megapixels, a phone camera's 4:3 frame


def make_jpegs(
    root: Path, n: int, *, classes: int = 4, size: tuple[int, int] = (500, 375), seed: int = 0, workers: int = 0
) -> Path:
    """Write ``n`` JPEGs (default 500x375, a typical photo size) under ``root/<class>/``; keeps existing files.
    ``workers``: processes (0: this one; -1: one per core)."""
    return _make(root, n, classes, workers, functools.partial(_write_jpegs, size=size, seed=seed))


def make_photos(
    root: Path, n: int, *, classes: int = 4, size: tuple[int, int] = PHOTO_SIZE, seed: int = 0, workers: int = -1
) -> Path:
    """Write ``n`` camera-like JPEGs under ``root/<class>/`` (default 12 MP, about 2.2 MB each at quality 90).

    Real photos, not noise: scikit-learn's two sample photographs, upscaled, mirrored, tinted and with fine sensor
    grain added, so that they compress as a camera's photos do. ``workers`` as for :func:`make_jpegs`.
    """
    return _make(root, n, classes, workers, functools.partial(_write_photos, size=size, seed=seed))


def _make(root: Path, n: int, classes: int, workers: int, write: Callable[[list[Path]], None]) -> Path:
    todo = [i for i in range(n) if not _path(root, i, classes).exists()]
    paths = [_path(root, i, classes) for i in todo]
    for path in {p.parent for p in paths}:
        path.mkdir(parents=True, exist_ok=True)
    workers = usable_cores() if workers < 0 else workers
    if workers <= 1 or len(paths) < 2:
        write(paths)
        return root
    chunks = [paths[k::workers] for k in range(workers)]
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        list(pool.map(write, [c for c in chunks if c]))
    return root


def _path(root: Path, i: int, classes: int) -> Path:
    return root / f"class{i % classes}" / f"{i:06d}.jpg"


def _index(path: Path) -> int:
    return int(path.stem)


def _write_jpegs(paths: list[Path], *, size: tuple[int, int], seed: int) -> None:
    width, height = size
    for path in paths:
        rng = np.random.default_rng([seed, _index(path)])
        coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
        grain = rng.integers(-12, 13, size=field.shape, dtype=np.int16)
        Image.fromarray(np.clip(field + grain, 0, 255).astype(np.uint8)).save(path, quality=90)


def _write_photos(paths: list[Path], *, size: tuple[int, int], seed: int) -> None:
    from sklearn.datasets import load_sample_image

    width, height = size
    bases = [
        np.asarray(Image.fromarray(load_sample_image(name)).resize((width, height), Image.BICUBIC), dtype=np.int16)
        for name in ("china.jpg", "flower.jpg")
    ]
    grain = np.random.default_rng(seed).integers(-6, 7, size=(height + 64, width + 64, 3), dtype=np.int16)
    for path in paths:
        i = _index(path)
        rng = np.random.default_rng([seed, i])
        base = bases[i % 2][:, ::-1] if rng.integers(2) else bases[i % 2]
        dy, dx = rng.integers(0, 64, size=2)  # each photo its own grain
        tint = rng.integers(-20, 21, size=3).astype(np.int16)
        pixels = np.clip(base + tint + grain[dy : dy + height, dx : dx + width], 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path, quality=90)
