"""The listing of the image files under ``data.root``: each file's id, the content key of its bytes, and why it
cannot be used, if it cannot. The stages depend on this listing instead of on the folder itself.

The content key is the first 16 bytes of the file's BLAKE2b hash. A stat cache beside the listing keeps each
file's size, modification time and inode with its key, as DVC's own state database does, so that only new and
changed files are read again. A file that was touched but not changed gets its old key, and the listing keeps
its bytes. A file modified within ``RACY_NS`` of a scan is read again by the next one (a change in the same
clock tick as the hash would leave the stat unchanged), and a file that could not be read is never cached.

Problems are reasons, not crashes: a dangling link, a file that cannot be read, and (when asked) a file that
does not decode. What becomes of them is ``data.on_bad_image``'s choice, made in ``prepare``.
"""

from __future__ import annotations

import concurrent.futures
import csv
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline.errors import PipelineError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLIT_DIRS = ("train", "val", "test")
CIFAR_DIR = "cifar-10-batches-py"
CACHE_VERSION = 2
READ_BYTES = 1 << 20
RACY_NS = 2 * 10**9


@dataclass(frozen=True)
class Entry:
    id: str  # path relative to data.root, with forward slashes
    key: str  # hex content key; "" when the file cannot be read
    problem: str  # "" when the file is fine


# ---------------------------------------------------------------------------- the folder


def image_files(folder: Path) -> list[Path]:
    """The image files under ``folder``, recursively, hidden files and folders skipped, sorted."""
    files = (
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    return sorted(files)


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def imagefolder_ids(root: Path) -> list[str]:
    """Every image id of an image folder: ``<class>/…`` or, with split folders, ``<split>/<class>/…``."""
    if not root.is_dir():
        raise PipelineError(f"data.root = {str(root)!r} is not a directory: put one folder of images per class there")
    split_dirs = {s: root / s for s in SPLIT_DIRS if (root / s).is_dir()}
    if split_dirs and "train" not in split_dirs:
        raise PipelineError(f"{root} has {', '.join(split_dirs)} folders but no train/ folder")
    ids = []
    for base in split_dirs.values() or [root]:
        dirs = _class_dirs(base)
        if not dirs:
            expected = f"{root}/<class>/<image> or {root}/train/<class>/…"
            raise PipelineError(f"no class folders under {root}: expected {expected}")
        for d in dirs:
            files = image_files(d)
            if not files:
                raise PipelineError(f"class folder {d} has no image files ({', '.join(IMAGE_EXTENSIONS)})")
            ids += [f.relative_to(root).as_posix() for f in files]
    return ids


def present(source: str, root: Path) -> bool:
    """Whether ``root`` holds the files of ``source`` (a clone without the images has none)."""
    if source == "imagefolder":
        return root.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir())
    return source != "cifar10" or (root / CIFAR_DIR).is_dir()


def source_ids(source: str, root: Path) -> list[str]:
    """The files of ``source`` under ``root``: the images of an image folder, CIFAR-10's batch files, none for
    digits (bundled with scikit-learn)."""
    if source == "imagefolder":
        return imagefolder_ids(root)
    if source == "cifar10" and (root / CIFAR_DIR).is_dir():
        return sorted(f"{CIFAR_DIR}/{p.name}" for p in (root / CIFAR_DIR).iterdir() if not p.name.startswith("."))
    return []


# ---------------------------------------------------------------------------- keys, behind the stat cache


def scan(
    root: Path,
    ids: Sequence[str],
    cache_path: Path | None,
    *,
    check: Callable[[Path], str] | None = None,
    workers: int = 8,
) -> list[Entry]:
    """An entry for every id: the key from the stat cache where size, mtime and inode are unchanged, else from the
    bytes (``cache_path`` None: no cache). ``check``, when given, decodes each new or changed file once and says
    why it is unusable ("" when it is fine)."""
    cache = _read_cache(cache_path) if cache_path else {}
    settled = time.time_ns() - RACY_NS  # files modified after this are hashed again next time
    stats = {i: _stat(root / i) for i in ids}
    fresh = {
        i: cache[i] for i in ids if isinstance(stats[i], tuple) and _hit(cache.get(i), stats[i], checked=bool(check))
    }
    todo = [i for i in ids if i not in fresh and isinstance(stats[i], tuple)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:  # hashing releases the GIL
        keyed = dict(zip(todo, _progress(pool.map(lambda i: _key(root / i), todo), len(todo), "hash"), strict=True))
    problems = {i: "" for i in todo}
    if check is not None:
        readable = [i for i in todo if not keyed[i].startswith("!")]
        with concurrent.futures.ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
            found = pool.map(check, [root / i for i in readable], chunksize=64)
            problems |= dict(zip(readable, _progress(found, len(readable), "check images"), strict=True))
    for i in todo:
        key = keyed[i]
        problem = key[1:] if key.startswith("!") else problems[i]
        fresh[i] = [*stats[i], "" if key.startswith("!") else key, problem, bool(check)]
    kept = {i: e for i, e in fresh.items() if e[3] and e[1] < settled}
    if cache_path and kept != cache:  # a no-op run rewrites nothing
        _write_cache(cache_path, kept)
    entries = []
    for i in ids:
        if isinstance(stats[i], str):
            entries.append(Entry(i, "", stats[i]))
        else:  # a decode problem counts only while decoding is checked: the listing never depends on the past
            _, _, _, key, problem, _ = fresh[i]
            entries.append(Entry(i, key, problem if (check or not key) else ""))
    return entries


def _stat(path: Path) -> tuple[int, int, int] | str:
    """(size, mtime_ns, inode) of the file a path leads to, or why there is none."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return "dangling link: its target does not exist" if path.is_symlink() else "file vanished while listed"
    except OSError as err:
        return f"{type(err).__name__}: {err.strerror}"
    return st.st_size, st.st_mtime_ns, st.st_ino


def _hit(cached: list | None, stat: tuple[int, int, int], *, checked: bool) -> bool:
    return cached is not None and tuple(cached[:3]) == stat and (cached[5] or not checked)


def _key(path: Path) -> str:
    """The hex content key of a file, or "!" and why it cannot be read."""
    h = content_hash()
    try:
        with open(path, "rb") as f:
            while block := f.read(READ_BYTES):
                h.update(block)
    except OSError as err:
        return f"!{type(err).__name__}: {err.strerror}"
    return h.hexdigest()


def content_hash(data: bytes = b"") -> Any:
    """The hash whose hex digest is a file's content key."""
    return hashlib.blake2b(data, digest_size=16)


def _progress(results: Iterable, total: int, desc: str) -> Iterable:
    return tqdm(results, total=total, desc=desc, unit="img", dynamic_ncols=True, disable=total < 1000)


def _read_cache(path: Path) -> dict[str, list]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data.get("entries", {}) if data.get("version") == CACHE_VERSION else {}


def _write_cache(path: Path, entries: Mapping[str, list]) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps({"version": CACHE_VERSION, "entries": entries}, separators=(",", ":")))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- the listing file


def write(path: Path, entries: Iterable[Entry]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["id", "key", "problem"])
        writer.writerows([e.id, e.key, e.problem] for e in entries)


def read(path: Path) -> list[Entry]:
    if not path.is_file():
        raise PipelineError(f"{path} not found: run the scan stage first (dvc repro scan)")
    with open(path, newline="", encoding="utf-8") as f:
        return [Entry(row["id"], row["key"], row["problem"]) for row in csv.DictReader(f)]
