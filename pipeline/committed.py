"""The features of the last recorded extraction, read through DVC, as a source of rows.

A clone that has the recorded features (pulled with DVC, or in its DVC cache) and a row store that lacks some of
their rows, such as a teammate's clone or one whose store was cleared or only partly filled, fills its store from
them before extracting, and so runs the network only on the images they lack. Only the keys are read whole; rows
are read where a block holds one that is wanted. Only rows made under the same row-store settings are taken (the files
name them in ``row_settings``), so the result is what this clone would have extracted itself.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

import h5py
import numpy as np

from pipeline import features, provenance
from pipeline.splits import SPLITS
from pipeline.store import RowStore

log = logging.getLogger(__name__)


def seed(store: RowStore, needs: Mapping[bytes, Sequence[str]], features_dir: Path) -> int:
    """Append to ``store`` the rows of ``needs`` it lacks that the recorded ``features_dir`` holds; returns how many.
    Nothing recorded, not in the cache, written by an earlier release or under other settings: nothing to take."""
    missing = store.missing(needs)
    if not missing or not recorded(Path(features_dir)):
        return 0
    from dvc.api import DVCFileSystem  # only here: a second or two of imports, paid by a store's first run alone

    added = 0
    try:  # one view of the project for every split: each dvc.api.open would index the project again
        fs = DVCFileSystem(subrepos=True)
        for split in SPLITS:
            with fs.open(f"{_from_root(Path(features_dir))}/{split}.h5", mode="rb") as f:
                for view, keys, rows in keyed_rows(f, missing, store.dir.name):
                    store.append(keys, {view: rows})
                    added += len(keys)
    except Exception as err:  # DVC raises many kinds; any of them means there is nothing (more) to take here
        log.info("no rows to take from recorded features (%s for %s)", type(err).__name__, features_dir)
    store.commit()
    if added:
        log.info("took %s rows from the recorded features in %s", f"{added:,}", features_dir)
    return added


def recorded(features_dir: Path) -> bool:
    """Whether DVC could hold features of ``features_dir``: a split file in the workspace, or dvc.lock or a .dvc
    file that names the directory. A new project's first extraction has none of them, and so never imports DVC nor
    indexes the project (about 0.3 s)."""
    if any((features_dir / f"{split}.h5").exists() for split in SPLITS):
        return True
    if features_dir.with_name(f"{features_dir.name}.dvc").exists():
        return True
    try:
        return _from_root(features_dir) in Path("dvc.lock").read_text()
    except (OSError, ValueError):  # no lock; or (ValueError) the directory is on another drive than the project
        return False


def _from_root(path: Path) -> str:
    """``path`` as DVC names it: relative to the project root (the working directory), with forward slashes."""
    return Path(os.path.relpath(path)).as_posix()


def keyed_rows(
    source: Path | IO[bytes], want: Mapping[bytes, Sequence[str]], row_settings: str, *, block: int = 4096
) -> Iterator[tuple[str, list[bytes], np.ndarray]]:
    """(view, keys, rows) blocks of the rows of a split file whose content key and view are in ``want``, when the
    file's rows came from the row store ``row_settings``; none from any other file."""
    with h5py.File(source, "r") as f:
        if f.attrs.get("schema") != provenance.SCHEMA or f.attrs.get("row_settings") != row_settings or "keys" not in f:
            return
        keys = [bytes(k) for k in f["keys"][:]]
        views = features.split_views(list(f.attrs["views"].astype(str)), str(f.attrs["split"]))
        for view in views:
            wanted = np.array([view in want.get(k, ()) for k in keys], dtype=bool)
            for a in range(0, len(keys), block):
                mask = wanted[a : a + block]
                if mask.any():
                    rows = f[features.dataset_name(view)][a : a + block][mask]
                    yield view, [k for k, w in zip(keys[a : a + block], mask, strict=True) if w], rows
