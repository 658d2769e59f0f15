"""The row store: rows by content key, across segments, surviving kills, compacted and pruned."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from pipeline.store import RowStore, prune_stores, settings_key

DIM = 4


def key(i: int) -> bytes:
    return i.to_bytes(16, "big")


def rows(*ids: int) -> np.ndarray:
    return np.array([[i, i + 0.5, -i, 0] for i in ids], dtype=np.float32)


def test_rows_come_back_by_key_from_every_segment_only_once_committed(tmp_path: Path):
    a = RowStore(tmp_path, segment=0, dim=DIM, dtype="float16")
    a.append([key(1), key(2)], {"original": rows(1, 2), "hflip": rows(10, 20)})
    peek = RowStore(tmp_path, segment=1, dim=DIM, dtype="float16")
    assert not any(peek.index.values())  # appended, not committed
    peek.close()
    a.close()
    b = RowStore(tmp_path, segment=1, dim=DIM, dtype="float16")
    b.append([key(3)], {"original": rows(3)})
    b.close()
    store = RowStore(tmp_path, segment=0, dim=DIM, dtype="float16")
    np.testing.assert_array_equal(store.read("original", [key(3), key(1)]), rows(3, 1).astype(np.float16))
    np.testing.assert_array_equal(store.read("hflip", [key(2)]), rows(20).astype(np.float16))
    needs = {key(1): ("original", "hflip"), key(3): ("original", "hflip"), key(4): ("original",)}
    assert store.missing(needs) == {key(3): ("hflip",), key(4): ("original",)}


def test_a_row_without_its_key_is_cut_off_and_a_key_is_never_without_its_row(tmp_path: Path):
    store = RowStore(tmp_path, segment=0, dim=DIM, dtype="float32")
    store.append([key(1)], {"original": rows(1)})
    store.close()
    segment = tmp_path / "0"
    with open(segment / "original.bin", "ab") as f:  # a kill after the rows of a batch, before its keys
        f.write(rows(2).tobytes()[:7])
    with open(segment / "original.keys", "ab") as f:
        f.write(key(9)[:5])  # and a torn key
    store = RowStore(tmp_path, segment=0, dim=DIM, dtype="float32")
    assert list(store.index["original"]) == [key(1)]
    store.append([key(2)], {"original": rows(2)})
    store.close()
    store = RowStore(tmp_path, segment=0, dim=DIM, dtype="float32")
    np.testing.assert_array_equal(store.read("original", [key(1), key(2)]), rows(1, 2))


def test_keep_only_drops_dead_rows_into_one_segment(tmp_path: Path):
    for segment, ids in ((0, (1, 2, 3)), (1, (4, 5))):
        store = RowStore(tmp_path, segment=segment, dim=DIM, dtype="float32")
        store.append([key(i) for i in ids], {"original": rows(*ids)})
        store.close()
    store = RowStore(tmp_path, segment=0, dim=DIM, dtype="float32")
    assert store.keep_only({"original": [key(5), key(1), key(5)]}) == 3
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["0"]
    store = RowStore(tmp_path, segment=0, dim=DIM, dtype="float32")
    np.testing.assert_array_equal(store.read("original", [key(1), key(5)]), rows(1, 5))
    assert set(store.index["original"]) == {key(1), key(5)}
    assert os.path.getsize(tmp_path / "0" / "original.bin") == 2 * DIM * 4
    assert store.keep_only({"original": [key(1), key(5)]}) == 0  # nothing dead: nothing rewritten


def test_the_least_recently_used_stores_go_first_and_zero_keeps_none(tmp_path: Path):
    names = [settings_key({"layer": layer}) for layer in ("pool3", "pool4", "pool5")]
    for t, name in enumerate(names):
        RowStore(tmp_path / name, segment=0, dim=DIM, dtype="float32").close()
        os.utime(tmp_path / name / "used", (1000 + t, 1000 + t))
    current = tmp_path / names[0]  # the oldest, but the one this run used
    assert prune_stores(tmp_path, 2, current) == [tmp_path / names[1]]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([names[0], names[2]])
    prune_stores(tmp_path, 0, current)
    assert not tmp_path.exists()


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_rows_keep_their_bits(tmp_path: Path, dtype: str):
    x = np.random.default_rng(0).standard_normal((5, DIM)).astype(dtype)
    store = RowStore(tmp_path, segment=0, dim=DIM, dtype=dtype)
    store.append([key(i) for i in range(5)], {"original": x})
    store.commit()
    assert store.read("original", [key(i) for i in range(5)]).tobytes() == x.tobytes()


def test_a_compaction_cut_short_leaves_every_live_row_and_the_next_one_finishes(tmp_path: Path):
    store = RowStore(tmp_path, segment=0, dim=DIM, dtype="float32")
    store.append([key(i) for i in (1, 2, 3)], {"original": rows(1, 2, 3)})
    store.close()
    store = RowStore(tmp_path, segment=0, dim=DIM, dtype="float32")
    store.keep_only({"original": [key(1), key(2)]})
    os.rename(tmp_path / "0", tmp_path / "merged-1")  # as if killed after the merge, before the swap
    (tmp_path / "0").mkdir()
    for name in ("original.bin", "original.keys"):  # the old segment, still there
        (tmp_path / "0" / name).write_bytes(b"")
    store = RowStore(tmp_path, segment=1, dim=DIM, dtype="float32")
    store.append([key(4)], {"original": rows(4)})
    store.close()
    store = RowStore(tmp_path, segment=0, dim=DIM, dtype="float32")
    assert store.keep_only({"original": [key(2), key(4)]}) == 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["0"]
    store = RowStore(tmp_path, segment=0, dim=DIM, dtype="float32")
    np.testing.assert_array_equal(store.read("original", [key(2), key(4)]), rows(2, 4))


def test_a_segment_another_process_holds_is_read_but_never_compacted_away(tmp_path: Path):
    other = RowStore(tmp_path, segment=1, dim=DIM, dtype="float32")
    other.append([key(1), key(2)], {"original": rows(1, 2)})
    other.commit()
    with open(tmp_path / "1" / "original.bin", "ab") as f:
        f.write(b"\0" * 5)  # its next row, half written
    store = RowStore(tmp_path, segment=0, dim=DIM, dtype="float32")
    np.testing.assert_array_equal(store.read("original", [key(2)]), rows(2))
    assert store.keep_only({"original": [key(2)]}) == 0  # segment 1 is still locked: nothing removed
    assert (tmp_path / "1" / "original.keys").stat().st_size == 2 * 16
    other.close()


def test_a_rows_file_without_its_keys_file_counts_as_empty(tmp_path: Path):
    (tmp_path / "0").mkdir(parents=True)
    (tmp_path / "0" / "original.bin").write_bytes(rows(7).tobytes())  # killed between creating the two files
    store = RowStore(tmp_path, segment=0, dim=DIM, dtype="float32")
    assert not any(store.index.values())
    store.append([key(1)], {"original": rows(1)})
    store.close()
    store = RowStore(tmp_path, segment=0, dim=DIM, dtype="float32")
    np.testing.assert_array_equal(store.read("original", [key(1)]), rows(1))
