"""The row store: feature rows kept outside DVC's outputs, keyed by the content of their image, so that a run
extracts only the images it has no row for.

Layout under ``<root>`` (``data/.feature-store``)::

    <settings>/             one store per extraction setting (settings_key: weights, layer, size, precision, …)
      used                  touched at every run: the least recently used stores go first (see ``prune_stores``)
      <segment>/            one per writing process (its rank), locked while it is open
        <view>.bin          rows of the view, row-major, in the storage dtype
        <view>.keys         16 bytes a row: the content key of the image of each row of <view>.bin

A row is written before its key: ``commit`` flushes and fsyncs the rows, then appends their keys, so a key on
disk always has its whole row, and a run killed at any moment loses at most the rows since its last commit.
An interrupted run is then simply a partly filled store, and the next run extracts the rest. Rows are read
through read-only memory maps, and written with plain writes, so resident memory does not grow with the store.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

KEY_BYTES = 16
USED = "used"


def settings_key(settings: Mapping[str, Any]) -> str:
    """A short stable hash of everything that determines a row's bytes, given its image."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RowStore:
    """The rows of one extraction setting: every segment is readable, and ``segment`` is this process's to append
    to. ``dim``, ``dtype``: each row's length and storage dtype."""

    def __init__(self, path: Path, *, segment: int, dim: int, dtype: str, quiet: bool = False) -> None:
        self.dir, self.dim, self.dtype = Path(path), dim, np.dtype(dtype)
        self._row_bytes = dim * self.dtype.itemsize
        self._own = self.dir / str(segment)
        self._lock = _lock(self._own, wait_quietly=quiet)
        (self.dir / USED).touch()
        self._files: dict[str, tuple[Any, Any]] = {}  # view -> (rows, keys) of the own segment, open to append
        self._pending: dict[str, list[bytes]] = {}  # view -> keys of rows written since the last commit
        self.index: dict[str, dict[bytes, tuple[str, int]]] = {}  # view -> key -> (segment, row)
        self.rows_on_disk = 0  # every view's rows in every segment, duplicates included
        for partial in self.dir.glob("*.partial"):  # a compaction that a kill cut short
            shutil.rmtree(partial, ignore_errors=True)
        for seg in _segments(self.dir):
            for keys_file in seg.glob("*.keys"):
                view = keys_file.stem
                n = self._consistent_rows(seg, view)
                keys = keys_file.read_bytes()[: n * KEY_BYTES]
                self.rows_on_disk += n
                index = self.index.setdefault(view, {})
                for row in range(n):
                    index[keys[row * KEY_BYTES : (row + 1) * KEY_BYTES]] = (seg.name, row)

    def _consistent_rows(self, seg: Path, view: str) -> int:
        """Rows of ``view`` in ``seg`` that have both their bytes and their key; the own segment's torn tail (a
        kill between a row and its key) is cut off."""
        rows, keys = seg / f"{view}.bin", seg / f"{view}.keys"
        size = {p: p.stat().st_size if p.exists() else 0 for p in (rows, keys)}  # a kill may come between creating them
        n = min(size[rows] // self._row_bytes, size[keys] // KEY_BYTES)
        if seg == self._own:
            for path, want in ((rows, n * self._row_bytes), (keys, n * KEY_BYTES)):
                if size[path] != want:
                    os.truncate(path, want)
        return n

    def missing(self, needs: Mapping[bytes, Sequence[str]]) -> dict[bytes, tuple[str, ...]]:
        """For each content key, the views of ``needs`` that have no row yet (keys with all their rows left out)."""
        out = {}
        for key, views in needs.items():
            absent = tuple(v for v in views if key not in self.index.get(v, {}))
            if absent:
                out[key] = absent
        return out

    def append(self, keys: Sequence[bytes], blocks: Mapping[str, np.ndarray]) -> None:
        """Rows of ``keys`` for each view in ``blocks``; they count once committed."""
        for view, block in blocks.items():
            if view not in self._files:
                self._own.mkdir(parents=True, exist_ok=True)
                self._consistent_rows(self._own, view)
                files = open(self._own / f"{view}.bin", "ab"), open(self._own / f"{view}.keys", "ab")  # noqa: SIM115
                self._files[view] = files
            self._files[view][0].write(np.ascontiguousarray(block, dtype=self.dtype).tobytes())
            self._pending.setdefault(view, []).extend(keys)

    def commit(self) -> None:
        """Make the rows appended so far survive a kill: rows flushed to disk first, then their keys."""
        pending, self._pending = self._pending, {}  # an interrupted commit is not written twice
        for view, keys in pending.items():
            rows_file, keys_file = self._files[view]
            _sync(rows_file)
            start = rows_file.tell() // self._row_bytes - len(keys)
            keys_file.write(b"".join(keys))
            _sync(keys_file)
            index = self.index.setdefault(view, {})
            for k, key in enumerate(keys):
                index[key] = (self._own.name, start + k)
            self.rows_on_disk += len(keys)

    def read(self, view: str, keys: Sequence[bytes]) -> np.ndarray:
        """The rows of ``keys`` for ``view``, as a (len(keys), dim) array in the storage dtype."""
        out = np.empty((len(keys), self.dim), dtype=self.dtype)
        where = [self.index[view][key] for key in keys]
        for seg in {s for s, _ in where}:
            mine = np.array([i for i, (s, _) in enumerate(where) if s == seg], dtype=np.int64)
            rows = np.array([where[i][1] for i in mine], dtype=np.int64)
            path = self.dir / seg / f"{view}.bin"
            whole = path.stat().st_size // self._row_bytes  # another process's segment may end in a partial row
            data = np.memmap(path, dtype=self.dtype, mode="r", shape=(whole, self.dim))
            out[mine] = data[rows]
            del data
        return out

    def close(self) -> None:
        self.commit()
        for rows_file, keys_file in self._files.values():
            rows_file.close()
            keys_file.close()
        self._files = {}
        self._lock.close()  # releases the lock

    def keep_only(self, live: Mapping[str, Iterable[bytes]], *, block: int = 4096) -> int:
        """Drop the rows whose key is not in ``live`` (view -> keys of the manifest), and duplicates: the live rows
        are copied into one new segment, which then replaces the others. Returns the rows dropped. Call it once
        every other process has closed its store; a kill at any point leaves a store with every live row."""
        live = {view: list(dict.fromkeys(keys)) for view, keys in live.items()}
        dropped = self.rows_on_disk - sum(len(k) for k in live.values())
        old = _segments(self.dir)
        if dropped <= 0 or any(_busy(seg) for seg in old if seg != self._own):
            return 0  # nothing to drop, or a process of an earlier run still appends (next time, then)
        merged = self.dir / f"merged-{os.getpid()}"
        new = merged.with_suffix(".partial")
        new.mkdir()
        for view, keys in live.items():
            with open(new / f"{view}.bin", "wb") as rows_file, open(new / f"{view}.keys", "wb") as keys_file:
                for a in range(0, len(keys), block):
                    rows_file.write(self.read(view, keys[a : a + block]).tobytes())
                _sync(rows_file)
                keys_file.write(b"".join(keys))
                _sync(keys_file)
        self.close()
        os.replace(new, merged)  # from here on a complete segment; the others (a cut-short merge too) duplicates
        for seg in old:
            shutil.rmtree(seg, ignore_errors=True)
            _lock_path(seg).unlink(missing_ok=True)
        os.replace(merged, self._own)
        self.index = {v: {key: (self._own.name, i) for i, key in enumerate(keys)} for v, keys in live.items()}
        self.rows_on_disk = sum(len(k) for k in live.values())
        return dropped


def prune_stores(root: Path, keep: int, current: Path) -> list[Path]:
    """Delete all but the ``keep`` most recently used stores under ``root``, ``current`` first among them (0: delete
    every one, ``current`` included). Returns what was deleted."""
    stores = [p for p in Path(root).iterdir() if p.is_dir()] if Path(root).is_dir() else []
    stores.sort(key=lambda p: (p != current, -_used(p)))
    deleted = [s for s in stores[keep:] if not any(_busy(seg) for seg in _segments(s))]  # else still appended to
    for store in deleted:
        shutil.rmtree(store, ignore_errors=True)
    if keep == 0 and Path(root).is_dir() and not any(Path(root).iterdir()):
        Path(root).rmdir()
    return deleted


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file()) if Path(root).is_dir() else 0


def _segments(store: Path) -> list[Path]:
    return sorted(p for p in store.iterdir() if p.is_dir() and p.suffix != ".partial")


def _used(store: Path) -> float:
    try:
        return (store / USED).stat().st_mtime
    except OSError:
        return 0.0


def _sync(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())


def _busy(segment: Path) -> bool:
    """Whether a process holds ``segment``'s lock."""
    if not _lock_path(segment).exists():
        return False
    with open(_lock_path(segment), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def _lock_path(segment: Path) -> Path:
    return segment.with_name(f"{segment.name}.lock")


def _lock(segment: Path, *, wait_quietly: bool) -> Any:
    """Hold the segment's lock file for as long as it is open: two processes never append to one segment at once
    (a process whose launcher was killed may still be saving its last rows)."""
    segment.parent.mkdir(parents=True, exist_ok=True)
    f = open(_lock_path(segment), "a")  # noqa: SIM115
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if not wait_quietly:
            log.warning("another extraction process is still using %s: waiting for it to stop", segment)
        fcntl.flock(f, fcntl.LOCK_EX)
    return f
