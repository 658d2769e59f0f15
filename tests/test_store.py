"""The row store: rows by content key, across segments, surviving kills, compacted and pruned, with processes that
open it while another compacts it."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from pipeline.store import RowStore, prune_stores, settings_key

ROOT = Path(__file__).resolve().parents[1]
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


def test_a_store_open_without_a_segment_folder_is_never_compacted_under_it(tmp_path: Path):
    store = RowStore(tmp_path, segment=0, dim=DIM, dtype="float32")
    store.append([key(i) for i in (1, 101, 2, 102)], {"original": rows(1, 101, 2, 102)})
    store.close()
    reader = RowStore(tmp_path, segment=1, dim=DIM, dtype="float32")  # appends nothing: no folder of its own
    store = RowStore(tmp_path, segment=0, dim=DIM, dtype="float32")
    assert store.keep_only({"original": [key(1), key(2)]}) == 0  # its index points into segment 0
    np.testing.assert_array_equal(reader.read("original", [key(1), key(2)]), rows(1, 2))
    reader.close()
    assert store.keep_only({"original": [key(1), key(2)]}) == 2
    with pytest.raises(RuntimeError, match="read after close"):  # compacted and closed: its index is no guarantee
        store.read("original", [key(1)])


def test_two_stores_in_one_process_never_share_a_segment(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    first = RowStore(tmp_path, segment=0, dim=DIM, dtype="float32")
    opened: list[RowStore] = []
    second = threading.Thread(target=lambda: opened.append(RowStore(tmp_path, segment=0, dim=DIM, dtype="float32")))
    with caplog.at_level(logging.WARNING, logger="pipeline.store"):
        second.start()
        second.join(0.5)
    assert second.is_alive() and not opened
    assert f"another extraction process is still using {tmp_path / '0'}: waiting for it to stop" in caplog.text
    first.close()
    second.join(10)
    assert opened
    opened[0].close()


# One process compacts the store and stops at a point of keep_only (the hook), until the other has begun opening the
# store and has indexed it, or for a second. That other process then reads, once the compaction is done, the rows of
# every live key, each of which encodes its key (see rows()). Before the compaction held the store's lock to its end,
# the opener indexed the segments halfway through the swap: it read another key's row, a file that had vanished, or
# deleted the merge under way.
PROCESS = """
import os, shutil, sys, time
from pathlib import Path

import numpy as np

from pipeline.store import RowStore

role, store_dir, signals, arg = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
live = [int(i) for i in sys.argv[5].split(",")]
key = lambda i: i.to_bytes(16, "big")
row = lambda i: np.array([[i, i + 0.5, -i, 0]], dtype=np.float32)


def wait_for(name, seconds):
    deadline = time.monotonic() + seconds
    while not (signals / name).exists() and time.monotonic() < deadline:
        time.sleep(0.005)


def pause():
    (signals / "paused").touch()
    wait_for("opening", 20)
    wait_for("indexed", 1)


def before(real, stop_here):
    def hooked(*args, **kwargs):
        if stop_here(*args):
            pause()
        return real(*args, **kwargs)

    return hooked


if role == "compact":
    store = RowStore(store_dir, segment=0, dim=4, dtype="float32", quiet=True)
    if arg == "check":  # after keep_only's look for other processes, before the merge
        Path.mkdir = before(Path.mkdir, lambda path, *_: path.suffix == ".partial")
    elif arg == "swap":  # the merged segment complete, before it is renamed into place
        os.replace = before(os.replace, lambda src, *_: str(src).endswith(".partial"))
    else:  # before the old segments are deleted
        shutil.rmtree = before(shutil.rmtree, lambda path, *_: not str(path).endswith(".partial"))
    try:
        outcome = f"dropped {store.keep_only({'original': [key(i) for i in live]})}"
    except Exception as err:
        outcome = f"{type(err).__name__}: {err}"
else:
    wait_for("paused", 20)
    (signals / "opening").touch()
    store = RowStore(store_dir, segment=int(arg), dim=4, dtype="float32", quiet=True)
    (signals / "indexed").touch()
    wait_for("done", 20)
    problems = []
    for i in live:
        try:
            found = store.read("original", [key(i)])
        except Exception as err:
            problems.append(f"key {i}: {type(err).__name__}: {err}")
            continue
        if not np.array_equal(found, row(i)):
            problems.append(f"key {i}: the row {found.tolist()} of another key")
    store.close()
    outcome = "; ".join(problems) or "read every row"
(signals / f"{role}.txt").write_text(outcome)
(signals / "done").touch()
"""


@pytest.mark.parametrize(("stop", "segment"), [("check", 1), ("swap", 0), ("delete", 0)])
def test_a_store_opened_during_a_compaction_reads_the_compacted_rows(tmp_path: Path, stop: str, segment: int):
    """``segment`` 0 is the compacting process's own, so the opener waits for its lock (a second extraction started
    by hand beside `dvc repro`); another segment is not locked at all."""
    store_dir, signals = tmp_path / "store", tmp_path / "signals"
    signals.mkdir()
    for seg, ids in ((0, [1, 101, 2, 102, 3, 103, 4, 104, 5, 105]), (1, [106, 6, 107, 7])):
        store = RowStore(store_dir, segment=seg, dim=DIM, dtype="float32")
        store.append([key(i) for i in ids], {"original": rows(*ids)})
        store.close()
    live = ",".join(map(str, range(1, 8)))
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [
        subprocess.Popen([sys.executable, "-c", PROCESS, role, store_dir, signals, arg, live], cwd=ROOT, env=env)
        for role, arg in (("compact", stop), ("open", str(segment)))
    ]
    try:
        assert [proc.wait(timeout=60) for proc in procs] == [0, 0]
    finally:
        for proc in procs:
            proc.kill()  # a process still waiting: a deadlock
    assert (signals / "compact.txt").read_text() == "dropped 7"
    assert (signals / "open.txt").read_text() == "read every row"
    store = RowStore(store_dir, segment=0, dim=DIM, dtype="float32")
    np.testing.assert_array_equal(store.read("original", [key(i) for i in range(1, 8)]), rows(*range(1, 8)))


@pytest.mark.parametrize("shape", [(2, DIM + 1), (3, DIM), (2,), (2, DIM, 1)])
def test_a_block_of_another_shape_is_refused_before_any_view_is_written(tmp_path: Path, shape: tuple[int, ...]):
    """Regression: a (B, H, W) block from a wrong pool was written whole, sliding every later row's offset."""
    store = RowStore(tmp_path, segment=0, dim=DIM, dtype="float16")
    with pytest.raises(ValueError, match=rf"rows of width {DIM} .* a block of shape \(.*\) for 2 keys"):
        store.append([key(1), key(2)], {"original": rows(1, 2), "hflip": np.zeros(shape, np.float32)})
    store.commit()
    store.close()
    assert not any(p.stat().st_size for p in tmp_path.rglob("*.bin"))
    assert not any(RowStore(tmp_path, segment=0, dim=DIM, dtype="float16", quiet=True).index.values())
