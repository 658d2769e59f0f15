"""Rows taken from recorded feature files: only those wanted, and only from files of the same row store."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline import committed, features
from pipeline.store import RowStore
from tests.conftest import feature_provenance


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def write(path: Path, split: str, row_settings: str | None, n: int = 10) -> np.ndarray:
    x = np.arange(n * 4, dtype=np.float32).reshape(n, 4)
    views = ["original", "hflip"] if split == "train" else ["original"]
    prov = feature_provenance(split=split, feature_dim=4, views=["original", "hflip"])
    with features.FeatureWriter(
        path, n=n, dim=4, dtype="float32", views=views, provenance=prov, row_settings=row_settings
    ) as writer:
        blocks = {v: x + 100 * k for k, v in enumerate(views)}
        writer.write(0, blocks, np.zeros(n, dtype=np.int64), [f"i{i}" for i in range(n)], [key(i) for i in range(n)])
    return x


def test_only_the_wanted_rows_and_views_come_out_in_file_order(tmp_path: Path):
    x = write(tmp_path / "train.h5", "train", "abc")
    want = {key(7): ("hflip",), key(2): ("original", "hflip"), key(99): ("original",)}
    out = list(committed.keyed_rows(tmp_path / "train.h5", want, "abc", block=4))
    assert [(view, keys) for view, keys, _ in out] == [("original", [key(2)]), ("hflip", [key(2)]), ("hflip", [key(7)])]
    np.testing.assert_array_equal(out[0][2], x[[2]])
    np.testing.assert_array_equal(out[2][2], x[[7]] + 100)


def test_files_of_another_row_store_or_without_keys_give_nothing(tmp_path: Path):
    write(tmp_path / "val.h5", "val", "abc")
    write(tmp_path / "test.h5", "test", None)
    want = {key(1): ("original",)}
    assert list(committed.keyed_rows(tmp_path / "val.h5", want, "other")) == []
    assert list(committed.keyed_rows(tmp_path / "test.h5", want, "abc")) == []


def test_a_project_with_nothing_recorded_takes_nothing_and_never_imports_dvc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A new project's first extraction: no dvc.lock, no .dvc file, no split file. Regression: it imported DVC and
    indexed the project to find that out (about 0.3 s of every first run)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "dvc.api", None)  # any import of it fails
    store = RowStore(tmp_path / "store", segment=0, dim=4, dtype="float32")
    assert committed.seed(store, {key(1): ("original",)}, Path("data/features")) == 0
    assert store.missing({key(1): ("original",)})


def test_features_are_recorded_by_a_split_file_a_lock_or_a_dvc_file_that_names_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(tmp_path)
    out = Path("data/features")
    Path("dvc.lock").write_text("stages:\n  extract:\n    outs:\n    - path: data/other\n")
    assert not committed.recorded(out)
    Path("dvc.lock").write_text("stages:\n  extract:\n    outs:\n    - path: data/features\n")
    assert committed.recorded(out) and committed.recorded(tmp_path / out)
    Path("dvc.lock").unlink()
    Path("data").mkdir()
    Path("data/features.dvc").touch()
    assert committed.recorded(out)
    Path("data/features.dvc").unlink()
    out.mkdir()
    Path("data/features/val.h5").touch()
    assert committed.recorded(out)
