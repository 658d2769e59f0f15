from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.images import make_photos
from pipeline import images
from pipeline.backbones.vgg import preprocessing


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour fields with fine grain: what a camera gives, and what JPEG compresses as it does photos."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)).resize((width, height))
    grain = rng.integers(-6, 7, size=(height, width, 3))
    return Image.fromarray(np.clip(np.asarray(coarse, dtype=np.int16) + grain, 0, 255).astype(np.uint8))


def save(image: Image.Image, path: Path, **options) -> Path:
    image.save(path, quality=90, **options)
    return path


@pytest.mark.parametrize(
    ("reduce_for", "size"),
    [
        (0, (1200, 900)),  # off
        (100, (300, 225)),  # 900 // 200 = 4: a quarter keeps 225 >= 200
        (150, (600, 450)),  # 900 // 300 = 3: only a half keeps >= 300
        (56, (150, 113)),  # 900 // 112 = 8: the smallest scale libjpeg has (1200 / 8 = 150, 900 / 8 rounded up)
        (500, (1200, 900)),  # 900 < 2 x 500: too small to reduce
    ],
)
def test_a_large_jpeg_decodes_at_the_smallest_scale_that_keeps_twice_the_target(tmp_path, reduce_for, size):
    path = save(photo(1200, 900), tmp_path / "p.jpg")
    image = images.open_image(path, reduce_for)
    assert image.size == size and image.mode == "RGB"


def reduced_and_full(path: Path, reduce_for: int) -> tuple[np.ndarray, np.ndarray]:
    """The fast and the full decode of ``path``, both resized to the fast one's size, as int arrays."""
    fast = images.open_image(path, reduce_for)
    full = images.open_image(path).resize(fast.size, Image.BILINEAR, reducing_gap=None)
    return np.asarray(fast, dtype=np.int16), np.asarray(full, dtype=np.int16)


def test_exif_rotation_is_applied_after_the_reduced_decode(tmp_path):
    upright = photo(900, 1200)
    upright.paste((255, 0, 0), (0, 0, 900, 200))  # a red band at the top of the upright picture
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # how a camera held sideways writes it
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 clockwise to display
    path = save(stored, tmp_path / "r.jpg", exif=exif)
    fast, full = reduced_and_full(path, 100)
    assert fast.shape == (300, 225, 3)  # portrait, as displayed
    assert fast[:40, :, 0].mean() > 240 and fast[:40, :, 1].mean() < 15  # the band is on top
    assert np.abs(fast - full).mean() < 2


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_grayscale_and_cmyk_jpegs_reduce_to_rgb_like_a_full_decode(tmp_path, mode):
    path = save(photo(1200, 900).convert(mode), tmp_path / f"{mode}.jpg")
    assert Image.open(path).mode == mode
    fast, full = reduced_and_full(path, 100)
    assert fast.shape == (225, 300, 3)
    assert np.abs(fast - full).mean() < 2


def test_progressive_jpegs_reduce_too(tmp_path):
    path = save(photo(1200, 900), tmp_path / "p.jpg", progressive=True)
    assert Image.open(path).info.get("progressive")
    fast, full = reduced_and_full(path, 100)
    assert fast.shape == (225, 300, 3)
    assert np.abs(fast - full).mean() < 2


def test_other_formats_decode_at_full_size(tmp_path):
    path = tmp_path / "p.png"
    photo(1200, 900).save(path)
    assert images.open_image(path, 100).size == (1200, 900)


def test_the_network_input_from_a_reduced_photo_matches_the_full_decode(tmp_path):
    """The weights' resize and crop (224 px) of a 12-megapixel photo, from a quarter-scale decode and a full one."""
    path = next(make_photos(tmp_path / "photos", 1, classes=1, workers=0).rglob("*.jpg"))
    prep = preprocessing("vgg16", 224)
    fast = prep.to_uint8(images.open_image(path, prep.resize_size)).to(torch.int16)
    exact = prep.to_uint8(images.open_image(path)).to(torch.int16)
    diff = (fast - exact).abs().float()
    assert diff.mean() < 1.0 and diff.quantile(0.999) <= 8


def test_a_truncated_large_jpeg_is_still_found_unreadable(tmp_path):
    buffer = io.BytesIO()
    photo(1200, 900).save(buffer, "JPEG", quality=90)
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 2 // 3])
    assert "truncated" in images.image_problem(path)
    assert images.image_problem(save(photo(1200, 900), tmp_path / "ok.jpg")) == ""


def input_error(path: Path, image_size: int) -> float:
    """Mean grey-level difference of the network input (the uint8 crop) from decode fast against exact."""
    prep = preprocessing("vgg16", image_size)
    fast = prep.to_uint8(images.open_image(path, prep.resize_size)).float()
    return float((fast - prep.to_uint8(images.open_image(path)).float()).abs().mean())


@pytest.mark.parametrize("orientation", range(1, 9))
def test_an_odd_sized_jpeg_reduces_as_faithfully_as_an_even_one_in_every_orientation(tmp_path, orientation):
    """Regression: libjpeg rounds a reduced side up (333 px at 1/2: 167 px covering 166.5), and the resize took
    the whole frame, stretching the photo by that sub-pixel: 2.9 times the even size's error at 64 px."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    base = photo(656, 500)
    odd = save(base.crop((0, 0, 655, 333)), tmp_path / "odd.jpg", exif=exif)
    even = save(base.crop((0, 0, 656, 334)), tmp_path / "even.jpg", exif=exif)
    reduced = images.open_image(odd, 73)  # 64 px crops: a half-scale decode, 328 x 167 px covering 327.5 x 166.5
    left, top, right, bottom = reduced.info[images.FRAME]
    assert (right - left, bottom - top) == ((655 / 2, 333 / 2) if orientation < 5 else (333 / 2, 655 / 2))
    assert min(left, top) >= 0 and right <= reduced.size[0] and bottom <= reduced.size[1]
    assert input_error(odd, 64) <= 1.5 * input_error(even, 64)
