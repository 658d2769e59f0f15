"""The listing of the image files under ``data.root``: each file's id, the content key of its bytes, and why it
cannot be used, if it cannot. The stages depend on this listing instead of on the folder itself.

The content key is the first 16 bytes of the file's BLAKE2b hash. A stat cache beside the listing keeps each
file's size, modification time and inode with its key, as DVC's own state database does, so that only new and
changed files are read again. A file that was touched but not changed gets its old key, and the listing keeps
its bytes. A file modified within ``RACY_NS`` of a scan is read again by the next one (a change in the same
clock tick as the hash would leave the stat unchanged), and a file that could not be read is never cached.

Problems are reasons, not crashes: a dangling link, a file that cannot be read, and (when asked) a file whose
header Pillow cannot identify, or that does not decode. What becomes of them is ``data.on_bad_image``'s choice
(``unusable``). The stat cache records the root it was made under, and each file's problem names the file by its
id: a reason found under one ``data.root`` is never shown under another.
"""

from __future__ import annotations

import concurrent.futures
import csv
import hashlib
import json
import os
import stat
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pipeline import images
from pipeline.errors import PipelineError

CACHE_VERSION = 4  # 3: ctime joined the stat; 4: the root, and how far each file was checked
READ_BYTES = 1 << 20
RACY_NS = 2 * 10**9
# How far scan checks each file, each step reading more of it and refusing all that the one before refuses: the
# header (Pillow's Image.open, tens of µs a file once its bytes were hashed), then a decode (milliseconds).
CHECKS = ("none", "header", "decode")


@dataclass(frozen=True)
class Entry:
    id: str  # path relative to data.root, with forward slashes (escaped when its name is refused, see name_problem)
    key: str  # hex content key; "" when the file cannot be read
    problem: str  # "" when the file is fine


@dataclass(frozen=True)
class Origin:
    """What a listing lists: it is kept, or read, only for the same source and root."""

    source: str
    root: str


# ---------------------------------------------------------------------------- keys, behind the stat cache


def scan(
    root: Path, ids: Sequence[str], cache_path: Path | None, *, check: str = "none", workers: int = 8
) -> list[Entry]:
    """An entry for every id: the key from the stat cache where size, mtime, inode and ctime are unchanged, else
    from the bytes (``cache_path`` None: no cache). ``check`` (one of CHECKS) says how far each file is checked
    for a problem; a new or changed file is checked once, a file checked less far than asked is read again. Only
    regular files are read, and a name that is not valid UTF-8 or holds a control character is listed escaped,
    with that problem, and never read."""
    depth = CHECKS.index(check)
    cache = _read_cache(cache_path, root) if cache_path else {}
    settled = time.time_ns() - RACY_NS  # files modified after this are hashed again next time
    stats = {i: name_problem(i) or _stat(root / i) for i in ids}
    fresh = {i: cache[i] for i in ids if isinstance(stats[i], tuple) and _hit(cache.get(i), stats[i], depth)}
    todo = [i for i in ids if i not in fresh and isinstance(stats[i], tuple)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:  # hashing releases the GIL
        keyed = dict(zip(todo, _progress(pool.map(lambda i: _key(root / i), todo), len(todo), "hash"), strict=True))
    checked = _checked(root, [i for i in todo if not keyed[i].startswith("!")], depth)
    for i in todo:  # [size, mtime, inode, ctime, key, problem, how far checked: the check that failed, or passed]
        key = keyed[i]
        fresh[i] = [*stats[i], "", key[1:], 0] if key.startswith("!") else [*stats[i], key, *checked[i]]
    kept = {i: e for i, e in fresh.items() if e[4] and e[1] < settled}
    if cache_path and kept != cache:  # a no-op run rewrites nothing
        _write_cache(cache_path, root, kept)
    entries = []
    for i in ids:
        if isinstance(stats[i], str):
            entries.append(Entry(escaped(i), "", stats[i]))
        else:  # a problem found by a check further than asked is not shown: the listing never depends on the past
            *_, key, problem, reached = fresh[i]
            entries.append(Entry(i, key, problem if reached <= depth else ""))
    return entries


def _checked(root: Path, ids: Sequence[str], depth: int) -> dict[str, tuple[str, int]]:
    """{id: (problem, how far it was checked)} of readable files: each header here, each decode on every core."""
    found = {i: ("", 0) for i in ids}
    if depth >= CHECKS.index("header"):  # here: less than a process pool's start, from the page cache just filled
        headers = _progress((images.header_problem(root / i, i) for i in ids), len(ids), "check headers")
        found |= {i: (problem, 1) for i, problem in zip(ids, headers, strict=True)}
    if depth >= CHECKS.index("decode"):
        fine = [i for i in ids if not found[i][0]]
        with concurrent.futures.ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
            decoded = _progress(
                pool.map(images.image_problem, [root / i for i in fine], fine, chunksize=64), len(fine), "check images"
            )
            found |= {i: (problem, 2) for i, problem in zip(fine, decoded, strict=True)}
    return found


def name_problem(image_id: str) -> str:
    """Why an id cannot be listed as it is ("" when it can): every later file (CSV, HDF5, logs) holds UTF-8 text
    with one id a line."""
    try:
        image_id.encode("utf-8")
    except UnicodeEncodeError:
        return "its name is not valid UTF-8: rename it"
    if any(_control(c) for c in image_id):
        return "its name holds a control character (a line break, a tab, ...): rename it"
    return ""


def escaped(image_id: str) -> str:
    """An id as printable UTF-8: undecodable bytes as \\xNN, control characters as \\xNN."""
    text = image_id.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(f"\\x{ord(c):02x}" if _control(c) else c for c in text)


def _control(c: str) -> bool:
    return ord(c) < 32 or 127 <= ord(c) < 160


_KINDS = {stat.S_ISDIR: "a directory", stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device"}
_KINDS |= {stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}


def _stat(path: Path) -> tuple[int, int, int, int] | str:
    """(size, mtime_ns, inode, ctime_ns) of the regular file a path leads to, or why there is none. The ctime
    catches an edit in place that keeps size, mtime and inode (``cp -p`` over the file, ``exiftool -P``)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return "dangling link: its target does not exist" if path.is_symlink() else "file vanished while listed"
    except OSError as err:
        return f"{type(err).__name__}: {err.strerror}"
    if not stat.S_ISREG(st.st_mode):
        return _not_regular(st.st_mode)
    return st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns


def _not_regular(mode: int) -> str:
    kind = next((name for test, name in _KINDS.items() if test(mode)), "not a file")
    return f"not a regular file ({kind}): only regular files are read"


def _hit(cached: list | None, found: tuple[int, int, int, int], depth: int) -> bool:
    """Whether a cached entry answers for a file of stat ``found`` checked to ``depth``: one with a problem always
    does (found within that depth, it is the answer; beyond it, every check up to it passed), one without only
    when it was checked that far."""
    return cached is not None and tuple(cached[:4]) == found and (bool(cached[5]) or cached[6] >= depth)


def _key(path: Path) -> str:
    """The hex content key of a regular file, or "!" and why it cannot be read. Opened without blocking, so a file
    replaced by a FIFO since it was listed is refused, not waited on."""
    h = content_hash()
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        with open(fd, "rb") as f:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                return "!" + _not_regular(mode)
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


def _read_cache(path: Path, root: Path) -> dict[str, list]:
    """The cached entries of the files under ``root``; none when the cache was made under another root."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    same = data.get("version") == CACHE_VERSION and data.get("root") == str(root)
    return data.get("entries", {}) if same else {}


def _write_cache(path: Path, root: Path, entries: Mapping[str, list]) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps({"version": CACHE_VERSION, "root": str(root), "entries": entries}, separators=(",", ":")))
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- the listing file


def write(path: Path, entries: Iterable[Entry], origin: Origin) -> None:
    """The listing as CSV (id, key, problem) under one comment line that records its source and root."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        f.write(f"# {json.dumps({'source': origin.source, 'root': origin.root}, ensure_ascii=False)}\n")
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["id", "key", "problem"])
        writer.writerows([e.id, e.key, e.problem] for e in entries)


def read_origin(path: Path) -> Origin | None:
    """What the listing at ``path`` lists; None when it does not say (written by an earlier release)."""
    with open(path, encoding="utf-8") as f:
        first = f.readline()
    try:
        return Origin(**json.loads(first[1:])) if first.startswith("#") else None
    except (ValueError, TypeError):
        return None


def check_origin(path: Path, origin: Origin) -> None:
    """Refuse a listing of another source or root than ``origin``: a mistyped data.root must not reuse it."""
    found = read_origin(path)
    if found != origin:
        made = f"of {found.source} under {found.root!r}" if found else "by an earlier release (no root recorded)"
        raise PipelineError(
            f"{path} was made {made}, but params.yaml asks for {origin.source} under {origin.root!r}: fix data.root "
            f"or data.source, or run dvc repro where {origin.root} holds the images so that scan lists them anew"
        )


def read(path: Path, origin: Origin) -> list[Entry]:
    """The entries of the listing at ``path``, which must list ``origin``."""
    if not path.is_file():
        raise PipelineError(f"{path} not found: run the scan stage first (dvc repro scan)")
    check_origin(path, origin)
    with open(path, newline="", encoding="utf-8") as f:
        f.readline()  # the origin
        return [Entry(row["id"], row["key"], row["problem"]) for row in csv.DictReader(f)]


def unusable(entries: Iterable[Entry], on_bad_image: str) -> dict[str, str]:
    """{id: reason} of the listed files to leave out; under ``raise``, the first one stops the run instead (in
    scan, and in prepare for a listing that scan did not stop at)."""
    bad = {e.id: e.problem for e in entries if e.problem}
    if bad and on_bad_image == "raise":
        first = min(bad)
        raise PipelineError(
            f"cannot use image '{first}': {bad[first]} ({len(bad)} such file(s); "
            "set data.on_bad_image: skip to leave them out and list them in skipped.csv)"
        )
    return bad
