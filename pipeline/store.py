"""The row store: feature rows kept outside DVC's outputs, keyed by the content of their image, so that a run
extracts only the images it has no row for.

Layout under ``<root>`` (``data/.feature-store``)::

    <settings>/             one store per extraction setting (settings_key: weights, layer, size, precision, …)
      used                  touched at every run: the least recently used stores go first (see ``prune_stores``)
      <segment>/            one per writing process (its rank)
        <view>.bin          rows of the view, row-major, in the storage dtype
        <view>.keys         16 bytes a row: the content key of the image of each row of <view>.bin
      <segment>.lock        held by the process that has the store open on <segment>, for as long as it is open
      compact.lock          held by a compaction from its look for other processes to its swap, and by each opening
                            while it reads the index

A row is written before its key: ``commit`` flushes and fsyncs the rows, then appends their keys, so a key on
disk always has its whole row, and a run killed at any moment loses at most the rows since its last commit.
An interrupted run is then simply a partly filled store, and the next run extracts the rest. Rows are read
through read-only memory maps, and written with plain writes, so resident memory does not grow with the store.

The locks are ``filelock``'s: ``flock`` on Linux and macOS, ``msvcrt.locking`` on Windows, released by the system
when their process dies. A compaction rewrites the segments, so it runs only while no other process has the store
open (each would hold an index into the old segments), and it holds ``compact.lock`` until the new segment is in
place, so no process that opens the store meanwhile indexes segments halfway through the swap.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock, Timeout

log = logging.getLogger(__name__)

STORE_DIR = ".feature-store"  # the root, next to the features directory, outside DVC's outputs
KEY_BYTES = 16
USED = "used"
COMPACT_LOCK = "compact.lock"


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
        self._files: dict[str, tuple[Any, Any]] = {}  # view -> (rows, keys) of the own segment, open to append
        self._pending: dict[str, list[bytes]] = {}  # view -> keys of rows written since the last commit
        self.index: dict[str, dict[bytes, tuple[str, int]]] = {}  # view -> key -> (segment, row)
        self.rows_on_disk = 0  # every view's rows in every segment, duplicates included
        self.dir.mkdir(parents=True, exist_ok=True)
        waiting = None if quiet else f"another extraction process is still using {self._own}: waiting for it to stop"
        self._lock = _acquire(_lock_path(self._own), waiting=waiting)  # first: never wait while holding the other
        try:
            with _holding(self.dir / COMPACT_LOCK):  # held by a compaction, or for a moment by another opening
                self._read_index()
        except BaseException:
            self._lock.release()
            raise

    def _read_index(self) -> None:
        """Index every segment's committed rows (under the compaction lock: no segment is being swapped)."""
        (self.dir / USED).touch()
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
        """Rows of ``keys`` for each view in ``blocks``; they count once committed. A block that is not
        (len(keys), dim) is refused before any view is written: its rows would slide every later row's offset."""
        for view, block in blocks.items():
            if np.shape(block) != (len(keys), self.dim) or any(len(k) != KEY_BYTES for k in keys):
                raise ValueError(
                    f"the row store {self.dir.name} takes rows of width {self.dim} under {KEY_BYTES}-byte keys, but "
                    f"got a block of shape {np.shape(block)} for {len(keys)} keys in view {view!r}: nothing was written"
                )
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
        """The rows of ``keys`` for ``view``, as a (len(keys), dim) array in the storage dtype. Only while the store
        is open: once it is closed, another process may compact the segments its index points into."""
        if not self._lock.is_locked:
            raise RuntimeError(f"the row store {self.dir} was read after close(): open it again")
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
        """Commit, and let other processes append to this segment, or compact the store."""
        self._close_files()
        self._lock.release()

    def _close_files(self) -> None:
        self.commit()
        for rows_file, keys_file in self._files.values():
            rows_file.close()
            keys_file.close()
        self._files = {}

    def keep_only(self, live: Mapping[str, Iterable[bytes]], *, block: int = 4096) -> int:
        """Drop the rows whose key is not in ``live`` (view -> keys of the manifest), and duplicates: the live rows
        are copied into one new segment, which then replaces the others, and the store is closed. Returns the rows
        dropped. Call it once every other process has closed its store (while one has it open, nothing is dropped);
        a kill at any point leaves a store with every live row."""
        live = {view: list(dict.fromkeys(keys)) for view, keys in live.items()}
        dropped = self.rows_on_disk - sum(len(k) for k in live.values())
        if dropped <= 0:
            return 0
        # the whole compaction under the store's lock: a process that opens the store meanwhile waits for the swap
        with _holding(self.dir / COMPACT_LOCK):
            others = [p for p in self.dir.glob("*.lock") if p.name != COMPACT_LOCK and p != _lock_path(self._own)]
            if any(_held(p) for p in others):
                return 0  # a process has the store open, and its index points into the segments (next time, then)
            old = _segments(self.dir)
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
            self._close_files()  # the own segment is replaced too
            os.replace(new, merged)  # from here on a complete segment; the others (a cut-short merge too) duplicates
            for seg in old:  # their lock files stay: one unlinked while a process waits on it would lock nothing
                shutil.rmtree(seg, ignore_errors=True)
            os.replace(merged, self._own)
            self.index = {v: {key: (self._own.name, i) for i, key in enumerate(keys)} for v, keys in live.items()}
            self.rows_on_disk = sum(len(k) for k in live.values())
        self.close()
        return dropped


def prune_stores(root: Path, keep: int, current: Path) -> list[Path]:
    """Delete all but the ``keep`` most recently used stores under ``root``, ``current`` first among them (0: delete
    every one, ``current`` included). Returns what was deleted."""
    stores = [p for p in Path(root).iterdir() if p.is_dir()] if Path(root).is_dir() else []
    stores.sort(key=lambda p: (p != current, -_used(p)))
    deleted = [s for s in stores[keep:] if not any(_held(lock) for lock in s.glob("*.lock"))]  # else still in use
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


def _held(lock_file: Path) -> bool:
    """Whether a process (this one included, through another lock object) holds ``lock_file``."""
    if not lock_file.exists():
        return False
    lock = FileLock(lock_file, thread_local=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return True
    lock.release()
    return False


def _lock_path(segment: Path) -> Path:
    return segment.with_name(f"{segment.name}.lock")


def _acquire(lock_file: Path, *, waiting: str | None = None) -> FileLock:
    """``lock_file``'s lock, held by this process until released; logs ``waiting`` first if another process holds
    it. A segment's lock keeps two processes from appending to one segment at once (a process whose launcher was
    killed may still be saving its last rows)."""
    lock = FileLock(lock_file, thread_local=False)  # released by close(), whatever thread runs it
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if waiting:
            log.warning(waiting)
        lock.acquire(timeout=-1)
    return lock


@contextlib.contextmanager
def _holding(lock_file: Path) -> Iterator[None]:
    """``lock_file``'s lock for the block, waited for without a word."""
    lock = _acquire(lock_file)
    try:
        yield
    finally:
        lock.release()
