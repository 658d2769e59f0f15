"""The listing of data.root: content keys behind a stat cache, and problems reported, never raised."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import folders, images, listing
from pipeline.errors import PipelineError
from tests.conftest import make_imagefolder


def scan(root: Path, cache: Path, **kwargs) -> dict[str, listing.Entry]:
    return {e.id: e for e in listing.scan(root, folders.imagefolder_ids(root), cache, **kwargs)}


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
    found = scan(imagefolder, tmp_path / "stat.json", check="decode")
    assert found["cat/gone.jpg"] == listing.Entry("cat/gone.jpg", "", "dangling link: its target does not exist")
    assert found["cat/folder.jpg"].problem == "not a regular file (a directory): only regular files are read"
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
    assert scan(imagefolder, cache, check="decode")["cat/empty.jpg"].problem != ""


def test_every_header_is_checked_once_and_a_decode_only_where_asked(imagefolder: Path, tmp_path: Path):
    """A file that Pillow cannot identify is found from its header alone, named by its id; a truncated one only
    by a decode; and an unchanged file is never read again for a check it already had."""
    (imagefolder / "cat" / "notes.jpg").write_text("not an image")
    (imagefolder / "cat" / "cut.png").write_bytes((imagefolder / "cat" / "000.png").read_bytes()[:60])
    settle(imagefolder)
    os.utime(imagefolder / "cat" / "notes.jpg", ns=(10**18, 10**18))
    cache, named = tmp_path / "stat.json", "UnidentifiedImageError: cannot identify image file 'cat/notes.jpg'"
    first = scan(imagefolder, cache, check="header")
    assert {i: e.problem for i, e in first.items() if e.problem} == {"cat/notes.jpg": named}
    assert first["cat/notes.jpg"].key and first["cat/cut.png"].problem == ""  # its header is whole
    assert images.header_problem(imagefolder / "cat" / "000.png", "cat/000.png") == ""
    calls = {"header": 0, "decode": 0}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(images, "header_problem", lambda *args: calls.__setitem__("header", calls["header"] + 1) or "")
        assert scan(imagefolder, cache, check="header") == first and calls["header"] == 0  # behind the stat cache
        assert scan(imagefolder, cache, check="none")["cat/notes.jpg"].problem == ""  # a check not asked for
    decoded = scan(imagefolder, cache, check="decode")
    assert decoded["cat/notes.jpg"].problem == named and decoded["cat/cut.png"].problem.startswith("OSError")
    assert scan(imagefolder, cache, check="header")["cat/cut.png"].problem == ""  # as if never decoded


def test_a_reason_found_under_one_root_is_never_shown_under_another(tmp_path: Path):
    """Regression: after data.root changed (the folder moved, its files' stat kept), the stat cache answered for
    the files under the new root, with reasons that named the old one."""
    old, new, cache = tmp_path / "raw", tmp_path / "photos", tmp_path / "stat.json"
    make_imagefolder(old, classes=("circle", "square"), per_class=2)
    (old / "circle" / "notes.jpg").write_text("not an image")
    settle(old)
    os.utime(old / "circle" / "notes.jpg", ns=(10**18, 10**18))
    assert scan(old, cache, check="decode")["circle/notes.jpg"].problem.endswith("file 'circle/notes.jpg'")
    old.rename(new)
    read = []
    with pytest.MonkeyPatch.context() as patch:
        real_key = listing._key
        patch.setattr(listing, "_key", lambda path: read.append(path) or real_key(path))
        found = scan(new, cache, check="decode")
    assert str(old) not in found["circle/notes.jpg"].problem
    assert found["circle/notes.jpg"].problem == "UnidentifiedImageError: cannot identify image file 'circle/notes.jpg'"
    assert len(read) == 5  # another root: nothing of the old one's cache is taken


def test_the_listing_file_round_trips_and_its_layout_errors_name_the_folder(tmp_path: Path):
    root = make_imagefolder(tmp_path / "images", classes=("a", "b"), per_class=2)
    entries = listing.scan(root, folders.imagefolder_ids(root), None)
    origin = listing.Origin("imagefolder", "data/raw")
    listing.write(tmp_path / "images.csv", entries, origin)
    assert listing.read(tmp_path / "images.csv", origin) == entries
    with pytest.raises(PipelineError, match="is not a directory"):
        folders.imagefolder_ids(tmp_path / "missing")
    with pytest.raises(PipelineError, match="run the scan stage first"):
        listing.read(tmp_path / "none.csv", origin)


def test_a_listing_is_read_only_for_the_source_and_root_it_lists(tmp_path: Path):
    listing.write(tmp_path / "images.csv", [], listing.Origin("imagefolder", "data/raw"))
    with pytest.raises(
        PipelineError, match="made of imagefolder under 'data/raw', but params.yaml asks for .*'data/raww'"
    ):
        listing.read(tmp_path / "images.csv", listing.Origin("imagefolder", "data/raww"))
    (tmp_path / "old.csv").write_text("id,key,problem\n")  # an earlier release's, without its origin
    with pytest.raises(PipelineError, match="earlier release"):
        listing.check_origin(tmp_path / "old.csv", listing.Origin("imagefolder", "data/raw"))


def test_an_edit_in_place_that_keeps_size_mtime_and_inode_is_read_again(imagefolder: Path, tmp_path: Path):
    """Regression: `cp -p` over a file, or `exiftool -P`, kept the stat the cache compared, and the old key."""
    cache, cat = tmp_path / "stat.json", imagefolder / "cat" / "000.png"
    settle(imagefolder)
    first = scan(imagefolder, cache)["cat/000.png"]
    before = cat.stat()
    data = bytearray(cat.read_bytes())
    data[-20] ^= 0xFF
    with open(cat, "r+b") as f:  # same inode, same size
        f.write(data)
    os.utime(cat, ns=(before.st_atime_ns, before.st_mtime_ns))  # same mtime, as cp -p leaves it
    assert (cat.stat().st_size, cat.stat().st_mtime_ns, cat.stat().st_ino) == (
        before.st_size, before.st_mtime_ns, before.st_ino,
    )  # fmt: skip
    again = scan(imagefolder, cache)["cat/000.png"]
    assert again.key == hashlib.blake2b(bytes(data), digest_size=16).hexdigest() != first.key


def test_a_fifo_or_a_link_to_a_device_is_listed_as_a_problem_and_never_read(imagefolder: Path, tmp_path: Path):
    """Regression: a FIFO named x.jpg, or a link to /dev/zero, hung the scan (and dvc repro) for good."""
    os.mkfifo(imagefolder / "cat" / "pipe.jpg")
    (imagefolder / "cat" / "zero.png").symlink_to("/dev/zero")
    code = (
        "import sys; from pathlib import Path; from pipeline import folders, listing; root = Path(sys.argv[1]); "
        "entries = listing.scan(root, folders.imagefolder_ids(root), None); "
        "[print(e.id, e.problem, sep='|') for e in entries if e.problem]"
    )
    result = subprocess.run([sys.executable, "-c", code, imagefolder], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.splitlines()) == [
        "cat/pipe.jpg|not a regular file (a FIFO): only regular files are read",
        "cat/zero.png|not a regular file (a character device): only regular files are read",
    ]


def test_names_that_are_not_utf8_or_hold_control_characters_are_listed_escaped_as_problems(tmp_path: Path):
    """Regression: a Latin-1 name crashed scan with UnicodeEncodeError; a carriage return split a CSV row in two."""
    root = make_imagefolder(tmp_path / "images", classes=("a", "b"), per_class=2)
    good = (root / "a" / "000.png").read_bytes()
    (root / "a" / "cr\r.png").write_bytes(good)
    (root / "a" / "tab\t.png").write_bytes(good)
    with open(os.path.join(os.fsencode(root / "b"), b"caf\xe9.png"), "wb") as f:  # a Latin-1 name from an old zip
        f.write(good)
    entries = listing.scan(root, folders.imagefolder_ids(root), tmp_path / "stat.json")
    origin = listing.Origin("imagefolder", str(root))
    listing.write(tmp_path / "images.csv", entries, origin)
    found = {e.id: e.problem for e in listing.read(tmp_path / "images.csv", origin) if e.problem}
    assert found == {
        "a/cr\\x0d.png": "its name holds a control character (a line break, a tab, ...): rename it",
        "a/tab\\x09.png": "its name holds a control character (a line break, a tab, ...): rename it",
        "b/caf\\xe9.png": "its name is not valid UTF-8: rename it",
    }
