"""The HDF5 feature cache: one writer and one reader (the provenance fields they carry: ``pipeline.provenance``).

Layout of ``{split}.h5``::

    features          (N, D)  float16|float32  rows aligned to the split's rows in the manifest
    features_hflip    (N, D)  same dtype       train split only, when extract.views has hflip
    labels            (N,)    int64
    ids               (N,)    utf-8 strings     item ids from the manifest
    keys              (N, 16) uint8             the content key of each row's image (files written by extract)
    class_names       (C,)    utf-8 strings     the classes, label order (an attribute in files of earlier releases)
    attrs             the rest of the provenance (see PROVENANCE_KEYS); ``row_settings``, the row store the rows
                      came from

The class names are a dataset, not an attribute: HDF5 caps an attribute at 64 KiB, about 4,000 names.
Every dataset is chunked along N with chunks of at most about 1 MiB, and created with
``track_times=False`` so that the same inputs give byte-identical files.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline.errors import PipelineError
from pipeline.provenance import OPTIONAL_KEYS, PROVENANCE_KEYS, SCHEMA

CHUNK_BYTES = 1 << 20

LIST_DATASETS = ("class_names",)  # provenance kept as a dataset: it grows with the folder


def split_views(views: Sequence[str], split: str) -> list[str]:
    """The views cached for a split: all of them for train (augmentation), the original image elsewhere."""
    return list(views) if split == "train" else ["original"]


def needed_views(keys: Mapping[str, Sequence[str]], views: Sequence[str]) -> dict[bytes, tuple[str, ...]]:
    """Content key -> the views the split files keep of it, given each split's hex keys: every view in train
    (augmentation), the original elsewhere; an image in two splits needs both's. In the order of ``keys``."""
    needs: dict[bytes, tuple[str, ...]] = {}
    for split, hex_keys in keys.items():
        want = split_views(views, split)
        for key in map(bytes.fromhex, hex_keys):
            have = needs.get(key, ())
            needs[key] = tuple(v for v in views if v in want or v in have)
    return needs


def dataset_name(view: str) -> str:
    return "features" if view == "original" else f"features_{view}"


def chunk_rows(dim: int, itemsize: int, n: int) -> int:
    """Rows per chunk so that a chunk of an (n, dim) dataset stays within about 1 MiB."""
    return max(1, min(n, CHUNK_BYTES // (dim * itemsize)))


class FeatureWriter:
    """Streams (rows, D) blocks into a new split file; it appears under its name only once complete.

    Writes run on a background thread, overlapping HDF5 I/O with the next batch's compute; at most
    ``queue_size`` blocks wait in memory. An error in the thread surfaces at the next ``write`` or at ``close``.
    """

    def __init__(
        self,
        path: Path,
        *,
        n: int,
        dim: int,
        dtype: str,
        views: Sequence[str],
        provenance: Mapping[str, Any],
        compression: str = "none",
        queue_size: int = 4,
        row_settings: str | None = None,
    ) -> None:
        """``row_settings``: write each row's content key (``write(keys=…)``) and the row store they name."""
        missing = set(PROVENANCE_KEYS) - set(provenance)
        if missing:
            raise ValueError(f"provenance lacks {sorted(missing)}")
        self.path = Path(path)
        self._tmp = self.path.with_name(self.path.name + ".partial")
        self._file = h5py.File(self._tmp, "w")
        self._float16 = np.dtype(dtype) == np.float16
        for view in views:
            _create(self._file, dataset_name(view), (n, dim), dtype, np.dtype(dtype).itemsize, compression)
        _create(self._file, "labels", (n,), "int64", 8)
        _create(self._file, "ids", (n,), h5py.string_dtype("utf-8"), 64)
        if row_settings is not None:
            _create(self._file, "keys", (n, 16), "uint8", 1)
            self._file.attrs["row_settings"] = row_settings
        for key in PROVENANCE_KEYS + tuple(k for k in OPTIONAL_KEYS if k in provenance):
            if key in LIST_DATASETS:
                values = list(provenance[key])
                _create(self._file, key, (len(values),), h5py.string_dtype("utf-8"), 64)
                self._file[key][:] = values
            else:
                self._file.attrs[key] = _to_attr(provenance[key])
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name=f"write {self.path.name}", daemon=True)
        self._thread.start()

    def write(
        self,
        start: int,
        features: Mapping[str, np.ndarray],
        labels: np.ndarray,
        ids: Sequence[str],
        keys: Sequence[bytes] = (),
    ) -> None:
        """Queue rows [start, start + len(labels)); ``features`` maps each view to its (rows, D) block."""
        if self._error is not None:
            raise self._error
        for block in features.values():
            if self._float16 and len(block) and np.abs(block).max() > np.finfo(np.float16).max:
                raise PipelineError(
                    f"features reach {np.abs(block).max():.3g}, beyond float16's range: "
                    "set extract.storage_dtype: float32"
                )
        self._queue.put((start, features, labels, ids, keys))

    def _drain(self) -> None:
        while (job := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._write(*job)
                except BaseException as err:  # handed to the caller's thread
                    self._error = err

    def _write(
        self,
        start: int,
        features: Mapping[str, np.ndarray],
        labels: np.ndarray,
        ids: Sequence[str],
        keys: Sequence[bytes],
    ) -> None:
        stop = start + len(labels)
        for view, block in features.items():
            self._file[dataset_name(view)][start:stop] = block
        self._file["labels"][start:stop] = labels
        self._file["ids"][start:stop] = list(ids)
        if keys and "keys" in self._file:  # written only by a keyed writer (row_settings)
            self._file["keys"][start:stop] = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(-1, 16)

    def _finish(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._file.close()

    def close(self) -> None:
        """Wait for queued writes, finish the file and move it into place."""
        self._finish()
        if self._error is not None:
            self._tmp.unlink(missing_ok=True)
            raise self._error
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._finish()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> FeatureWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self.close() if exc_type is None else self.abort()


@dataclass(frozen=True)
class FeatureSet:
    """One split read back into memory."""

    features: dict[str, np.ndarray]  # view -> (N, D) float32
    labels: np.ndarray  # (N,) int64
    ids: list[str]
    provenance: dict[str, Any]


def read_provenance(path: Path) -> dict[str, Any]:
    with _open(path) as f:
        return _provenance(f)


def read_ids(path: Path) -> list[str]:
    """The item id of each row, in row order."""
    with _open(path) as f:
        return [s.decode("utf-8") for s in f["ids"][:]]


def read_keys(path: Path) -> list[str]:
    """The content key of each row's image, in hex, in row order."""
    with _open(path) as f:
        if "keys" not in f:
            raise PipelineError(f"{path} has no content keys (an earlier release wrote it): re-run extract")
        return [row.tobytes().hex() for row in f["keys"][:]]


def read_features(path: Path) -> FeatureSet:
    """Load a whole split, every cached view, as float32."""
    with _open(path) as f:
        provenance = _provenance(f)
        views = split_views(provenance["views"], provenance["split"])
        features = {view: f[dataset_name(view)][:].astype(np.float32) for view in views}
        labels = f["labels"][:]
        ids = [s.decode("utf-8") for s in f["ids"][:]]
    return FeatureSet(features, labels, ids, provenance)


class BlockReader:
    """Reads one split in chunk-aligned blocks of rows, every cached view stacked, for splits larger than memory.

    A block is a whole number of HDF5 chunks (about ``block_mb`` of float32), so reading one is a run of
    contiguous chunk reads, never a per-row gather.
    """

    def __init__(self, path: Path, *, block_mb: int = 64, views: Sequence[str] | None = None) -> None:
        """``views``: the cached views to read, in that order (default: every one the split caches)."""
        self.path = Path(path)
        with _open(path) as f:
            self.provenance = _provenance(f)
            self.n, self.dim = f["features"].shape
            chunk = f["features"].chunks[0] if f["features"].chunks else max(self.n, 1)
        cached = split_views(self.provenance["views"], self.provenance["split"])
        self.views = cached if views is None else list(views)
        if not set(self.views) <= set(cached):
            raise PipelineError(f"{path} caches the views {cached}, not {self.views}: re-run extract with them")
        rows = block_mb * 2**20 // (self.dim * 4 * len(self.views))
        self.block_rows = max(1, rows // chunk) * chunk
        self.num_blocks = -(-self.n // self.block_rows)

    @property
    def nbytes(self) -> int:
        """Size of the whole split as float32, all views."""
        return self.n * self.dim * 4 * len(self.views)

    def read(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Block ``k``: (views x rows, D) float32 features and their labels."""
        return self.read_rows(k * self.block_rows, min(self.n, (k + 1) * self.block_rows))

    def read_rows(self, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows [a, b) of every view, stacked view after view, and their labels."""
        with _open(self.path) as f:
            x = np.concatenate([f[dataset_name(v)][a:b] for v in self.views]).astype(np.float32)
            y = np.tile(f["labels"][a:b], len(self.views))
        return x, y


def _open(path: Path) -> h5py.File:
    if not Path(path).is_file():
        raise PipelineError(f"{path} not found: run the extract stage first (dvc repro extract)")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise PipelineError(f"{path} is not a readable HDF5 feature file: {err}") from None
    if f.attrs.get("schema") != SCHEMA:
        f.close()
        raise PipelineError(f"{path} is not a feature file of this pipeline (schema {SCHEMA}); re-run extract")
    return f


def _create(
    f: h5py.File, name: str, shape: tuple[int, ...], dtype: Any, itemsize: int, compression: str = "none"
) -> None:
    """A dataset chunked along N in chunks of about 1 MiB (HDF5 cannot chunk an empty one), without timestamps."""
    n, width = shape[0], int(np.prod(shape[1:]))
    chunked = n > 0
    f.create_dataset(
        name,
        shape=shape,
        dtype=dtype,
        chunks=(chunk_rows(width, itemsize, n), *shape[1:]) if chunked else None,
        compression=None if compression == "none" or not chunked else compression,
        track_times=False,
    )


def _provenance(f: h5py.File) -> dict[str, Any]:
    out = {key: _from_attr(value) for key, value in f.attrs.items()}
    return out | {key: [v.decode("utf-8") for v in f[key][:]] for key in LIST_DATASETS if key in f}


def _to_attr(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        if all(isinstance(v, str) for v in value):
            return np.array(value, dtype=h5py.string_dtype("utf-8"))
        return np.asarray(value, dtype=np.float64)
    return value


def _from_attr(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return [
            v.decode("utf-8") if isinstance(v, bytes) else v.item() if isinstance(v, np.generic) else v for v in value
        ]
    if isinstance(value, np.generic):
        return value.item()
    return value
