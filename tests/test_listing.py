"""The listing of data.root: content keys behind a stat cache, and problems reported, never raised."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from pipeline import images, listing
from pipeline.errors import PipelineError
from tests.conftest import make_imagefolder


def scan(root: Path, cache: Path, **kwargs) -> dict[str, listing.Entry]:
    return {e.id: e for e in listing.scan(root, listing.imagefolder_ids(root), cache, **kwargs)}


def settle(root: Path) -> None:
    """Give every file a modification time well before now, as files that were not just written have."""
    for path in root.rglob("*.png"):
        os.utime(path, ns=(10**18, 10**18))


def test_keys_are_the_bytes_hash_and_only_new_or_changed_files_are_read_again(
    imagefolder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    cache = tmp_path / "stat.json"
    settle(imagefolder)
    first = scan(imagefolder, cache)
    assert len(first) == 20 and not any(e.problem for e in first.values())
    cat = imagefolder / "cat" / "000.png"
    assert first["cat/000.png"].key == hashlib.blake2b(cat.read_bytes(), digest_size=16).hexdigest()

    read = []
    real_key = listing._key
    monkeypatch.setattr(listing, "_key", lambda path: read.append(path.name) or real_key(path))
    assert scan(imagefolder, cache) == first and read == []  # nothing changed: nothing read
    os.utime(cat, ns=(1, 1))  # touched: read again, same key
    (imagefolder / "dog" / "001.png").write_bytes((imagefolder / "dog" / "002.png").read_bytes())  # changed
    again = scan(imagefolder, cache)
    assert sorted(read) == ["000.png", "001.png"]
    assert again["cat/000.png"] == first["cat/000.png"]
    assert again["dog/001.png"].key == first["dog/002.png"].key != first["dog/001.png"].key
    read.clear()
    scan(imagefolder, cache)  # dog/001.png was modified just now: a change in the same clock tick would not show
    assert read == ["001.png"]


def test_problems_are_listed_with_their_reason(imagefolder: Path, tmp_path: Path):
    (imagefolder / "cat" / "gone.jpg").symlink_to(imagefolder / "nowhere.jpg")
    (imagefolder / "cat" / "folder.jpg").mkdir()  # a name that looks like an image but cannot be read
    (imagefolder / "cat" / "empty.jpg").write_bytes(b"")
    found = scan(imagefolder, tmp_path / "stat.json", check=images.image_problem)
    assert found["cat/gone.jpg"] == listing.Entry("cat/gone.jpg", "", "dangling link: its target does not exist")
    assert found["cat/folder.jpg"].problem.startswith("IsADirectoryError")
    assert found["cat/empty.jpg"].problem.startswith("UnidentifiedImageError") and found["cat/empty.jpg"].key
    assert sum(bool(e.problem) for e in found.values()) == 3
    unchecked = scan(imagefolder, tmp_path / "other.json")  # without the decode check an empty file is listed
    assert unchecked["cat/empty.jpg"].problem == ""
    settle(imagefolder)
    assert scan(imagefolder, tmp_path / "stat.json")["cat/empty.jpg"].problem == ""  # whatever was checked before
    (imagefolder / "cat" / "folder.jpg").rmdir()
    (imagefolder / "cat" / "folder.jpg").write_bytes((imagefolder / "cat" / "000.png").read_bytes())
    assert scan(imagefolder, tmp_path / "stat.json")["cat/folder.jpg"].problem == ""  # a failed read is not cached


def test_a_decode_check_runs_once_a_file_even_when_switched_on_later(imagefolder: Path, tmp_path: Path):
    cache = tmp_path / "stat.json"
    (imagefolder / "cat" / "empty.jpg").write_bytes(b"")
    assert scan(imagefolder, cache)["cat/empty.jpg"].problem == ""
    assert scan(imagefolder, cache, check=images.image_problem)["cat/empty.jpg"].problem != ""


def test_the_listing_file_round_trips_and_its_layout_errors_name_the_folder(tmp_path: Path):
    root = make_imagefolder(tmp_path / "images", classes=("a", "b"), per_class=2)
    entries = listing.scan(root, listing.imagefolder_ids(root), None)
    listing.write(tmp_path / "images.csv", entries)
    assert listing.read(tmp_path / "images.csv") == entries
    with pytest.raises(PipelineError, match="is not a directory"):
        listing.imagefolder_ids(tmp_path / "missing")
    with pytest.raises(PipelineError, match="run the scan stage first"):
        listing.read(tmp_path / "none.csv")
