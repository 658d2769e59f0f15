"""Rows taken from recorded feature files: only those wanted, and only from files of the same row store."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline import committed, features
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
