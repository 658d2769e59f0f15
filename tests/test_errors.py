"""What a user sees when something is wrong: through real `dvc repro` runs, one `error:` line naming the cause and
what to do, then DVC's own failure line, and no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import make_imagefolder, run, write_params


def failed_repro(project: Path, *args: str) -> str:
    """Run `dvc repro` expecting a failure; returns the one `error:` line it printed."""
    result = run(project, "dvc", "repro", *args, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    assert result.stderr.rstrip().splitlines()[-1].startswith("ERROR: failed to reproduce"), result.stderr
    return errors[0]


def test_offline_imagenet_weights(project: Path):
    write_params(project, {"extract": {"weights": "imagenet"}})  # an empty TORCH_HOME, and downloads refused
    error = failed_repro(project)
    assert "ImageNet weights vgg11-8a719046.pth are not in the torch hub cache" in error
    assert "extract.weights: random" in error


def test_a_bad_parameter(project: Path):
    write_params(project, {"extract": {"batch_size": 0}})
    assert failed_repro(project) == "error: extract.batch_size = 0 is not valid: expected an integer >= 1"


def test_a_broken_image_in_the_second_of_two_processes(project: Path):
    make_imagefolder(project / "data" / "raw", classes=("cat", "dog"), per_class=20)
    write_params(project, {"data": {"source": "imagefolder"}, "extract": {"batch_size": 4, "nproc": 2}})
    run(project, "dvc", "repro", "prepare")
    rows = [line.split(",") for line in (project / "data/prepared/manifest.csv").read_text().splitlines()[1:]]
    last = [item for item, split, *_ in rows if split == "test"][-1]  # the last row extracted: rank 1's share
    (project / "data/raw" / last).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    error = failed_repro(project)
    assert error.startswith(f"error: rank 1 of 2: cannot read image '{last}'")
    assert not (project / "data/features").exists()


def test_a_missing_features_file(reproduced: Path):
    (reproduced / "data/features/val.h5").unlink()
    error = failed_repro(reproduced, "--single-item", "train")
    assert error == "error: data/features/val.h5 not found: run the extract stage first (dvc repro extract)"


def test_a_truncated_head(reproduced: Path):
    head = reproduced / "models/head.pt"
    head.write_bytes(head.read_bytes()[: head.stat().st_size // 2])
    error = failed_repro(reproduced, "--single-item", "evaluate")
    assert error.startswith("error: models/head.pt is not a head file of this pipeline")


def test_an_error_raised_while_stopping_is_reported_as_the_stop():
    """SIGTERM reaches the DataLoader's decode workers too; their death must not turn a clean stop into a bug."""
    code = """
from pipeline.errors import Stopped, run_stage

def main():
    try:
        raise Stopped("terminated")
    finally:
        raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated.")

run_stage(main)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 143 and result.stderr == "terminated\n"
