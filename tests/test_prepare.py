"""Unreadable and unusual images, and datasets that cannot be split, against the real prepare and extract stages."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import images, sources
from pipeline.config import DataConfig
from pipeline.errors import PipelineError
from tests.conftest import color_image, make_imagefolder, run_stage, write_params

RNG = np.random.default_rng(0)


def jpeg_bytes(**save: object) -> bytes:
    buffer = io.BytesIO()
    color_image(RNG, 0, size=64).save(buffer, "JPEG", **save)
    return buffer.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


# Bad: cannot give pixels. Each is skipped with its reason, or stops extraction under `raise`.
BAD = {
    "truncated.jpg": lambda p: p.write_bytes(jpeg_bytes()[:-400]),
    "truncated.png": lambda p: p.write_bytes(png_bytes(color_image(RNG, 0, size=64))[:300]),
    "empty.jpg": lambda p: p.write_bytes(b""),
    "text.png": lambda p: p.write_text("this is not an image"),
    "bomb.png": lambda p: Image.new("1", (20_000, 20_000)).save(p),  # 400 Mpx: over PIL's limit
    "dangling.jpg": lambda p: os.symlink(p.parent / "nowhere.jpg", p),
}
# Unusual but fine: these must just work.
GOOD = {
    "cmyk.jpg": lambda p: color_image(RNG, 0, size=16, mode="CMYK").save(p),
    "16bit.png": lambda p: Image.fromarray(np.full((16, 16), 40_000, dtype=np.uint16)).save(p),
    "1bit.png": lambda p: color_image(RNG, 0, size=16, mode="1").save(p),
    "rgba.png": lambda p: color_image(RNG, 0, size=16, mode="RGBA").save(p),
    "palette.png": lambda p: color_image(RNG, 0, size=16, mode="P").save(p),
    "rotated.jpg": lambda p: Image.new("RGB", (20, 10)).save(p, exif=_rotated()),
    "tiny.png": lambda p: Image.new("RGB", (1, 1), "red").save(p),
    "caf\u00e9 au lait 01.png": lambda p: color_image(RNG, 0, size=16).save(p),
}


def _rotated() -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = 6
    return exif


@pytest.fixture
def messy(project: Path) -> Path:
    root = make_imagefolder(project / "data" / "raw", classes=("cat", "dog"), per_class=10)
    for name, make in {**BAD, **GOOD}.items():
        make(root / "cat" / name)
    (root / "cat" / "notes.txt").write_text("ignored: not an image extension")
    write_params(project, {"data": {"source": "imagefolder", "val_fraction": 0.2, "test_fraction": 0.2}})
    return project


def test_skip_leaves_out_exactly_the_bad_images_and_reports_why(messy: Path):
    write_params(messy, {"data": {"on_bad_image": "skip"}})
    run_stage(messy, "prepare")
    with open(messy / "data" / "prepared" / "skipped.csv", newline="") as f:
        skipped = {row["id"]: row["reason"] for row in csv.DictReader(f)}
    assert set(skipped) == {f"cat/{name}" for name in BAD}
    assert skipped["cat/truncated.jpg"].startswith("OSError") and "truncated" in skipped["cat/truncated.jpg"]
    assert skipped["cat/empty.jpg"].startswith("UnidentifiedImageError")
    assert skipped["cat/bomb.png"].startswith("DecompressionBomb")
    assert skipped["cat/dangling.jpg"] == "dangling link: its target does not exist"
    items, _ = sources.read_manifest(messy / "data" / "prepared")
    assert {f"cat/{name}" for name in GOOD} <= {it.id for it in items}
    metrics = json.loads((messy / "reports" / "prepare" / "metrics.json").read_text())
    assert metrics["skipped"] == len(BAD) and metrics["train"] + metrics["val"] + metrics["test"] == 20 + len(GOOD)
    run_stage(messy, "extract")  # every image left in the manifest decodes


def test_raise_stops_scan_at_what_pillow_cannot_identify_and_extract_at_a_truncated_image(messy: Path):
    """Every file is identified from its header in scan: under raise, what Pillow cannot identify stops the run
    there, before any split; a truncated file only decoding tells, which extract does."""
    unidentified = {"cat/bomb.png", "cat/dangling.jpg", "cat/empty.jpg", "cat/text.png"}
    result = run_stage(messy, "prepare", check=False)  # scan, then prepare by hand: each refuses the listing
    with open(messy / "data" / "images.csv", newline="") as f:
        f.readline()
        listed = {row["id"]: row["problem"] for row in csv.DictReader(f) if row["problem"]}
    assert set(listed) == unidentified
    assert listed["cat/text.png"] == "UnidentifiedImageError: cannot identify image file 'cat/text.png'"
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: cannot use image 'cat/bomb.png': {listed['cat/bomb.png']} (4 such file(s); "
        "set data.on_bad_image: skip to leave them out and list them in skipped.csv)"
    )
    assert listed["cat/bomb.png"].startswith("DecompressionBombError: Image size (400000000 pixels) exceeds limit")
    for image_id in unidentified:
        (messy / "data" / "raw" / image_id).unlink()
    run_stage(messy, "prepare")  # the others open: only decoding them tells, which extract does
    result = run_stage(messy, "extract", check=False)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot read image 'cat/truncated.")
    assert not list((messy / "data" / "features").glob("*.h5"))
    assert "run again" not in result.stderr  # running again fails the same way


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path: Path):
    GOOD["16bit.png"](tmp_path / "x.png")
    assert np.asarray(images.open_image(tmp_path / "x.png"))[0, 0].tolist() == [156, 156, 156]  # 40000 >> 8


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ({}, "no class folders"),
        ({"cat": 3, "dog": 0}, "class folder .*dog has no image files"),
        ({"cat": 6}, "only one class"),
        ({"train/cat": 6, "train/dog": 6, "test/cat": 2}, "the test split has no images of class 'dog'"),
        ({"Cat": 3, "cat": 3, "dog": 3}, "differ only in case or accents"),
    ],
)
def test_datasets_that_cannot_work_fail_in_prepare(tmp_path: Path, layout: dict[str, int], message: str):
    root = tmp_path / "images"
    root.mkdir()
    for folder, count in layout.items():
        (root / folder).mkdir(parents=True)
        for i in range(count):
            color_image(RNG, 0).save(root / folder / f"{i}.png")
    with pytest.raises(PipelineError, match=message):
        sources.discover(DataConfig(source="imagefolder", root=str(root), val_fraction=0.2, test_fraction=0.2), 0)
