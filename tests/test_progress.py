"""Interrupted extraction: the work files, and real killed and interrupted `extract` processes."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.progress import Progress
from tests.conftest import STAGE_ARGS, project_env, run, run_stage, write_params

WORK = Path("data/.extract-progress")


def test_progress_survives_reopening_and_only_committed_rows_count(tmp_path: Path):
    block = np.arange(12, dtype=np.float16).reshape(3, 4)
    p = Progress(tmp_path, "k1", n=6, dim=4, dtype="float16", views=["original"])
    p.write(0, {"original": block})
    p.commit(3)
    p.write(3, {"original": block + 100})  # written, never committed
    p.close()
    again = Progress(tmp_path, "k1", n=6, dim=4, dtype="float16", views=["original"])
    assert again.rows_done == 3
    np.testing.assert_array_equal(again.read("original", 0, 3), block)
    other = Progress(tmp_path, "k2", n=6, dim=4, dtype="float16", views=["original"])  # other inputs
    assert other.rows_done == 0 and not (tmp_path / "k1").exists()
    other.remove()
    assert not tmp_path.exists()


def digests(project: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (project / "data" / "features").glob("*.h5")}


def rows_done(project: Path) -> int:
    states = list((project / WORK).glob("*/progress.json"))
    try:
        return json.loads(states[0].read_text())["rows_done"] if states else 0
    except (OSError, ValueError):  # caught mid-replace
        return 0


def start_extract(project: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pipeline.extract", *STAGE_ARGS["extract"]]
    return subprocess.Popen(cmd, cwd=project, env=project_env(project), stderr=subprocess.PIPE, text=True)


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


def test_a_killed_extraction_resumes_and_gives_byte_identical_files(prepared: Path):
    run_stage(prepared, "extract")
    uninterrupted = digests(prepared)
    assert not (prepared / WORK).exists()  # removed once the outputs are complete
    shutil.rmtree(prepared / "data" / "features")

    proc = start_extract(prepared)
    kept = wait_for_progress(prepared, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 0 < kept < 1797 and not list((prepared / "data" / "features").glob("*.h5"))

    result = run_stage(prepared, "extract")
    assert "resuming:" in result.stderr and "of 1797 images were extracted by an interrupted run" in result.stderr
    assert digests(prepared) == uninterrupted


def test_ctrl_c_stops_within_seconds_and_a_changed_parameter_discards_the_progress(prepared: Path):
    proc = start_extract(prepared)
    wait_for_progress(prepared, proc)
    proc.send_signal(signal.SIGINT)
    start = time.monotonic()
    _, stderr = proc.communicate(timeout=30)
    assert time.monotonic() - start < 5
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
