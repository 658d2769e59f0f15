"""Interrupted extraction: the work files, and real killed and interrupted `extract` processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import PipelineError
from pipeline.progress import Progress, Shards, discard_stale, shard_dir
from tests.conftest import STAGE_ARGS, project_env, run, run_stage, write_params

WORK = Path("data/.extract-progress")


def test_progress_survives_reopening_and_only_committed_rows_count(tmp_path: Path):
    block = np.arange(12, dtype=np.float16).reshape(3, 4)
    layout = {"start": 10, "stop": 16, "dim": 4, "dtype": "float16", "views": ["original"]}
    p = Progress(tmp_path / "k1" / "0-of-1", **layout)  # rows 10..15 of the run
    p.write(10, {"original": block})
    p.commit(13)
    p.write(13, {"original": block + 100})  # written, never committed
    p.close()
    again = Progress(tmp_path / "k1" / "0-of-1", **layout)
    assert again.done == 13
    np.testing.assert_array_equal(again.read("original", 10, 13), block)
    again.close()
    assert Progress(tmp_path / "k1" / "0-of-1", **(layout | {"stop": 17})).done == 10  # another layout: anew


def test_stale_work_is_discarded_and_shards_read_as_one(tmp_path: Path):
    layout = {"dim": 2, "dtype": "float32", "views": ["original"]}
    old = Progress(shard_dir(tmp_path, "old", 0, 1), start=0, stop=4, **layout)
    old.close()
    keep = [shard_dir(tmp_path, "k", rank, 2) for rank in range(2)]
    (tmp_path / "k" / "0-of-3").mkdir(parents=True)  # the same inputs, another number of processes
    (tmp_path / "k" / "0-of-3.lock").touch()
    discard_stale(tmp_path, keep)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k"] and not (tmp_path / "k" / "0-of-3").exists()

    rows = np.arange(10, dtype=np.float32).reshape(5, 2)
    bounds = [(0, 2), (2, 5)]
    for d, (a, b) in zip(keep, bounds, strict=True):
        p = Progress(d, start=a, stop=b, **layout)
        p.write(a, {"original": rows[a:b]})
        p.commit(b)
        p.close()
    shards = Shards([Progress.finished(d, start=a, stop=b, **layout) for d, (a, b) in zip(keep, bounds, strict=True)])
    np.testing.assert_array_equal(shards.read("original", 1, 4), rows[1:4])  # across the boundary
    shards.remove()
    assert not tmp_path.exists()


def test_an_incomplete_or_invisible_shard_is_refused(tmp_path: Path):
    layout = {"start": 0, "stop": 4, "dim": 2, "dtype": "float32", "views": ["original"]}
    p = Progress(tmp_path / "0-of-1", **layout)
    p.write(0, {"original": np.zeros((2, 2), np.float32)})
    p.commit(2)
    with pytest.raises(PipelineError, match="filesystem they all share"):
        Progress.finished(tmp_path / "0-of-1", **layout)
    with pytest.raises(PipelineError, match="not in"):
        Progress.finished(tmp_path / "missing", **layout)


def rows_done(project: Path) -> int:
    states = list((project / WORK).glob("*/*/progress.json"))
    try:
        return json.loads(states[0].read_text())["rows_done"] if states else 0
    except (OSError, ValueError):  # caught mid-replace
        return 0


def start_extract(project: Path) -> subprocess.Popen:
    """The stage as a terminal starts it: with Ctrl-C's SIGINT at its default, also when the tests themselves run
    in the background (a shell starts background jobs with SIGINT ignored, and children inherit that)."""
    cmd = [sys.executable, "-m", "pipeline.extract", *STAGE_ARGS["extract"]]
    return subprocess.Popen(
        cmd, cwd=project, env=project_env(project), stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip


def wait_for_progress(project: Path, proc: subprocess.Popen) -> int:
    deadline = time.monotonic() + 120
    while rows_done(project) == 0:
        assert proc.poll() is None, "extract finished before it could be interrupted"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return rows_done(project)


@pytest.fixture
def prepared(project: Path) -> Path:
    """Digits through vgg11 at 64 px in batches of 16: about ten seconds of extraction to interrupt."""
    write_params(project, {"extract": {"image_size": 64, "batch_size": 16}})
    run_stage(project, "prepare")
    return project


def test_ctrl_c_stops_within_seconds_and_a_changed_parameter_discards_the_progress(prepared: Path):
    proc = start_extract(prepared)
    wait_for_progress(prepared, proc)
    proc.send_signal(signal.SIGINT)
    start = time.monotonic()
    _, stderr = proc.communicate(timeout=30)
    assert time.monotonic() - start < 5, f"stopped {time.monotonic() - start:.1f} s after Ctrl-C:\n{stderr[-300:]}"
    assert proc.returncode == 130 and stderr.strip().splitlines()[-1] == "interrupted"
    assert "run again to continue" in stderr and rows_done(prepared) > 0

    write_params(prepared, {"extract": {"image_size": 48}})
    result = run_stage(prepared, "extract")
    assert "discarding the progress of an interrupted run" in result.stderr and "resuming" not in result.stderr
    assert not (prepared / WORK).exists()


def test_dvc_repro_killed_during_extract_resumes_on_the_next_repro(prepared: Path):
    """DVC deletes a stage's outputs before running it; the work files live outside them and survive."""
    run(prepared, "dvc", "repro", "prepare")
    proc = subprocess.Popen(["dvc", "repro"], cwd=prepared, env=project_env(prepared), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    wait_for_progress(prepared, proc)
    os.killpg(proc.pid, signal.SIGKILL)  # dvc and the stage it runs, as a power cut would
    proc.wait()
    result = run(prepared, "dvc", "repro")
    assert "resuming:" in result.stderr  # the stage's log
    assert re.findall(r"Running stage '(\w+)'", result.stdout) == ["extract", "train", "evaluate"]
