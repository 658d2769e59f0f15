"""Extraction progress kept outside DVC's outputs, so that an interrupted run continues where it stopped.

A work directory ``<root>/<key>/`` holds one raw row-major file per view (rows in extraction order) and
``progress.json`` with the number of leading rows that are safely on disk. ``key`` hashes everything that
determines the features, so progress made with other inputs or parameters is never reused. Files are
written with plain writes, not memory maps, so resident memory does not grow with the dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

STATE = "progress.json"


def run_key(fingerprint: Mapping[str, Any]) -> str:
    """A short stable hash of a JSON-able description of the run."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Progress:
    """Rows [0, rows_done) of every view, on disk; ``commit`` makes the rows written so far survive a kill."""

    def __init__(self, root: Path, key: str, *, n: int, dim: int, dtype: str, views: Sequence[str]) -> None:
        self.dir = Path(root) / key
        self.n, self.dim, self.dtype, self.views = n, dim, np.dtype(dtype), list(views)
        if Path(root).is_dir():
            for stale in Path(root).iterdir():
                if stale.name != key:
                    log.warning(
                        "discarding the progress of an interrupted run with other inputs or parameters (%s)", stale
                    )
                    shutil.rmtree(stale, ignore_errors=True)
        layout = {"n": n, "dim": dim, "dtype": self.dtype.str, "views": self.views}
        state = self._read_state()
        if state.get("layout") == layout and 0 < state.get("rows_done", 0) <= n:
            self.rows_done = int(state["rows_done"])
            log.info("resuming: %d of %d images were extracted by an interrupted run", self.rows_done, n)
        else:
            self.rows_done = 0
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir.mkdir(parents=True)
            self._write_state({"layout": layout, "rows_done": 0})
        self._layout = layout
        self._files = {v: open(self.dir / f"{v}.bin", "r+b" if self.rows_done else "w+b") for v in self.views}  # noqa: SIM115
        self._row_bytes = dim * self.dtype.itemsize

    def write(self, start: int, blocks: Mapping[str, np.ndarray]) -> None:
        """Rows [start, start + len(block)) of each given view."""
        for view, block in blocks.items():
            f = self._files[view]
            f.seek(start * self._row_bytes)
            f.write(np.ascontiguousarray(block, dtype=self.dtype).tobytes())

    def commit(self, rows_done: int) -> None:
        """Flush the data files, then record ``rows_done``: a kill after this keeps those rows."""
        for f in self._files.values():
            f.flush()
            os.fsync(f.fileno())
        self._write_state({"layout": self._layout, "rows_done": rows_done})
        self.rows_done = rows_done

    def read(self, view: str, a: int, b: int) -> np.ndarray:
        """Rows [a, b) of ``view`` as a (b - a, dim) array."""
        f = self._files[view]
        f.seek(a * self._row_bytes)
        return np.frombuffer(f.read((b - a) * self._row_bytes), dtype=self.dtype).reshape(b - a, self.dim)

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def remove(self) -> None:
        """Delete the work directory (after the outputs are complete)."""
        self.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        if self.dir.parent.is_dir() and not any(self.dir.parent.iterdir()):
            self.dir.parent.rmdir()

    def _read_state(self) -> dict[str, Any]:
        try:
            return json.loads((self.dir / STATE).read_text())
        except (OSError, ValueError):
            return {}

    def _write_state(self, state: dict[str, Any]) -> None:
        tmp = self.dir / f"{STATE}.partial"
        with open(tmp, "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / STATE)
