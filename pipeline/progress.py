"""Extraction progress kept outside DVC's outputs, so that an interrupted run continues where it stopped.

Every process of a run owns one shard: a contiguous range [start, stop) of the run's rows. Its work directory
``<root>/<key>/<rank>-of-<size>/`` holds one raw row-major file per view and ``progress.json`` with the number
of leading rows of the shard that are safely on disk. ``key`` hashes everything that determines the
features, so progress made with other inputs or parameters is never reused. Files are written with plain
writes, not memory maps, so resident memory does not grow with the dataset.
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

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

STATE = "progress.json"


def run_key(fingerprint: Mapping[str, Any]) -> str:
    """A short stable hash of a JSON-able description of the run."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]


def shard_dir(root: Path, key: str, rank: int, size: int) -> Path:
    return Path(root) / key / f"{rank}-of-{size}"


def discard_stale(root: Path, keep: Iterable[Path]) -> None:
    """Delete every work directory under ``root`` but the shards in ``keep`` (all under one ``root/key``)."""
    keep = {Path(d) for d in keep}
    runs = {d.parent for d in keep}
    root = Path(root)
    stale = [d for d in root.iterdir() if d not in runs] if root.is_dir() else []
    stale += [d for run in runs if run.is_dir() for d in run.iterdir() if d not in keep | {_lock_path(k) for k in keep}]
    for d in stale:
        if d.is_dir():
            log.warning("discarding the progress of an interrupted run with other inputs or parameters (%s)", d)
            shutil.rmtree(d, ignore_errors=True)
        else:  # the lock file of a shard of another process count
            d.unlink(missing_ok=True)


class Progress:
    """Rows [start, done) of every view, on disk; ``commit`` makes the rows written so far survive a kill.

    Row numbers are the run's, not the shard's: ``write(start, …)`` writes the shard's first row.
    """

    def __init__(
        self, path: Path, *, start: int, stop: int, dim: int, dtype: str, views: Sequence[str], quiet: bool = False
    ) -> None:
        self.dir = Path(path)
        self._lock = _lock(self.dir, wait_quietly=quiet)
        self.start, self.stop, self.dim, self.dtype, self.views = start, stop, dim, np.dtype(dtype), list(views)
        self._layout = {"start": start, "stop": stop, "dim": dim, "dtype": self.dtype.str, "views": self.views}
        state = self._read_state()
        if state.get("layout") == self._layout and 0 < state.get("rows_done", 0) <= stop - start:
            self.done = start + int(state["rows_done"])
            if not quiet:
                done, n = self.done - start, stop - start
                log.info("resuming: %d of %d images were extracted by an interrupted run", done, n)
        else:
            self.done = start
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir.mkdir(parents=True)
            self._write_state(0)
        mode = "r+b" if self.done > start else "w+b"
        self._files = {v: open(self.dir / f"{v}.bin", mode) for v in self.views}  # noqa: SIM115
        self._row_bytes = dim * self.dtype.itemsize

    @classmethod
    def finished(cls, path: Path, *, start: int, stop: int, dim: int, dtype: str, views: Sequence[str]) -> Progress:
        """Open another process's completed shard for reading; refuse one that is missing or incomplete."""
        layout = {"start": start, "stop": stop, "dim": dim, "dtype": np.dtype(dtype).str, "views": list(views)}
        try:
            state = json.loads((Path(path) / STATE).read_text())
        except (OSError, ValueError):
            state = {}
        if state.get("layout") != layout or state.get("rows_done") != stop - start:
            raise PipelineError(
                f"the finished work of rows {start}-{stop} is not in {path}: processes on several machines "
                "need the project directory on a filesystem they all share"
            )
        return cls(path, start=start, stop=stop, dim=dim, dtype=dtype, views=views, quiet=True)

    def write(self, start: int, blocks: Mapping[str, np.ndarray]) -> None:
        """Rows [start, start + len(block)) of each given view."""
        for view, block in blocks.items():
            f = self._files[view]
            f.seek((start - self.start) * self._row_bytes)
            f.write(np.ascontiguousarray(block, dtype=self.dtype).tobytes())

    def commit(self, done: int) -> None:
        """Flush the data files, then record that rows up to ``done`` are complete: a kill after this keeps them."""
        for f in self._files.values():
            f.flush()
            os.fsync(f.fileno())
        self._write_state(done - self.start)
        self.done = done

    def read(self, view: str, a: int, b: int) -> np.ndarray:
        """Rows [a, b) of ``view`` as a (b - a, dim) array."""
        f = self._files[view]
        f.seek((a - self.start) * self._row_bytes)
        return np.frombuffer(f.read((b - a) * self._row_bytes), dtype=self.dtype).reshape(b - a, self.dim)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._lock.close()  # releases the lock

    def _read_state(self) -> dict[str, Any]:
        try:
            return json.loads((self.dir / STATE).read_text())
        except (OSError, ValueError):
            return {}

    def _write_state(self, rows_done: int) -> None:
        tmp = self.dir / f"{STATE}.partial"
        with open(tmp, "w") as f:
            json.dump({"layout": self._layout, "rows_done": rows_done}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / STATE)


def _lock_path(shard: Path) -> Path:
    return shard.with_name(f"{shard.name}.lock")


def _lock(shard: Path, *, wait_quietly: bool) -> Any:
    """Hold the shard's lock file for as long as it is open: two runs never write one shard's files at once (a
    process whose launcher was killed may still be saving its last rows)."""
    shard.parent.mkdir(parents=True, exist_ok=True)
    f = open(_lock_path(shard), "a")  # noqa: SIM115
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if not wait_quietly:
            log.warning("another extraction process is still using %s: waiting for it to stop", shard)
        fcntl.flock(f, fcntl.LOCK_EX)
    return f


class Shards:
    """The complete shards of a run, read as one sequence of rows (the merge into the final files)."""

    def __init__(self, shards: Sequence[Progress]) -> None:
        self.shards = sorted(shards, key=lambda s: s.start)

    def read(self, view: str, a: int, b: int) -> np.ndarray:
        """Rows [a, b) of ``view``, across shard boundaries."""
        if a >= b:
            return np.empty((0, self.shards[0].dim), dtype=self.shards[0].dtype)
        parts = [s.read(view, max(a, s.start), min(b, s.stop)) for s in self.shards if s.start < b and a < s.stop]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def remove(self) -> None:
        """Delete the run's work directories (after the outputs are complete), and the root once it is empty."""
        for s in self.shards:
            s.close()
            shutil.rmtree(s.dir, ignore_errors=True)
            _lock_path(s.dir).unlink(missing_ok=True)
        for d in sorted({s.dir.parent for s in self.shards} | {s.dir.parent.parent for s in self.shards}, reverse=True):
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
