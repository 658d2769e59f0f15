"""What a user sees when something is wrong: through real `dvc repro` runs, one `error:` line naming the cause and
what to do, then DVC's own failure line, and no traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, make_imagefolder, record_backbone_check, run, write_params


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
    record_backbone_check(project)  # scan's check passes these settings (no weights loaded): extract refuses them
    error = failed_repro(project)
    assert "ImageNet weights vgg11-8a719046.pth are not in the torch hub cache" in error
    assert "extract.weights: random" in error


def test_a_bad_parameter(project: Path):
    write_params(project, {"extract": {"batch_size": 0}})
    assert failed_repro(project) == "error: extract.batch_size = 0 is not valid: expected an integer >= 1"


@pytest.mark.slow
def test_a_broken_image_in_the_second_of_two_processes(project: Path):
    make_imagefolder(project / "data" / "raw", classes=("cat", "dog"), per_class=20)
    write_params(project, {"data": {"source": "imagefolder"}, "extract": {"batch_size": 4, "nproc": 2}})
    run(project, "dvc", "repro", "prepare")
    rows = [line.split(",") for line in (project / "data/prepared/manifest.csv").read_text().splitlines()[1:]]
    last = [item for item, split, *_ in rows if split == "test"][-1]  # the last row extracted: rank 1's share
    path = project / "data/raw" / last
    path.write_bytes(path.read_bytes()[:60])  # a whole header, so that scan lets it through: decoding tells
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


def test_a_stage_imports_with_the_collector_off_works_with_it_on_and_leaves_its_objects_to_the_exit(tmp_path: Path):
    """Regressions, for `python -m pipeline.<stage>` as dvc.yaml runs it: the collections that torch's and
    scikit-learn's imports set off took 0.4-0.6 s of every stage's start; and the interpreter's teardown walked the
    millions of objects they made, 0.5-0.65 s more. A module that imports the package keeps the collector."""
    package = tmp_path / "pipeline"
    package.mkdir()
    for name in ("__init__.py", "errors.py"):
        shutil.copy(ROOT / "pipeline" / name, package / name)
    (package / "probe.py").write_text("""
import gc, sys
from pipeline.errors import PipelineError, run_stage

imported_with_collector = gc.isenabled()
made = []

def main():
    global frozen
    frozen = gc.get_freeze_count()
    print(imported_with_collector, gc.isenabled(), frozen > 0)
    made.extend([] for _ in range(1000))
    if sys.argv[1] == "fail":
        raise PipelineError("a user error")

run_stage(main)
print(gc.get_freeze_count() >= frozen + 1000)
""")
    env = os.environ | {"PYTHONPATH": str(tmp_path)}
    stage = [sys.executable, "-m", "pipeline.probe"]
    done = subprocess.run([*stage, "ok"], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    assert done.stdout == "False True True\nTrue\n"
    failed = subprocess.run([*stage, "fail"], cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert (failed.returncode, failed.stdout, failed.stderr) == (2, "False True True\n", "error: a user error\n")
    script = [sys.executable, "-c", "import gc, pipeline.errors; print(gc.isenabled())"]
    assert subprocess.run(script, cwd=tmp_path, env=env, capture_output=True, text=True).stdout == "True\n"


IMPORTING = """
import gc
from pipeline.errors import importing

gc.enable()
with importing():
    off = not gc.isenabled()
    made = [[] for _ in range(1000)]
tracked = {id(o) for o in gc.get_objects()}  # frozen objects are in no generation
print(off, gc.isenabled(), not any(id(x) in tracked for x in made))
try:
    with importing():
        raise ImportError("no such module")
except ImportError:
    print(gc.isenabled())
gc.disable()
with importing():
    pass
print(gc.isenabled())
"""


def test_imports_a_stage_makes_in_its_main_run_with_the_collector_off_and_are_left_to_the_exit():
    """As a stage's imports at its start (above): extract imports the network in main(), once it knows that it is
    not the launcher of other processes. The collector comes back as it was, after a failed import too."""
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", IMPORTING], env=env, capture_output=True, text=True, check=True)
    assert done.stdout == "True True True\nTrue\nFalse\n"


def imagefolder_project(project: Path, classes: tuple[str, ...] = ("cat", "dog"), **data: object) -> Path:
    make_imagefolder(project / "data" / "raw", classes=classes, per_class=4)
    write_params(project, {"data": {"source": "imagefolder", **data}})
    return project


def test_a_mistyped_root_never_reuses_the_listing_of_the_old_one(project: Path):
    """Regression: scan warned, kept the old listing, and every stage reused the old data's results. Then: a root
    that does not exist got that message about the listing, which never said that the folder is missing."""
    imagefolder_project(project)
    run(project, "dvc", "repro", "prepare")
    write_params(project, {"data": {"root": "data/raww"}})
    assert failed_repro(project) == (
        f"error: data.root = 'data/raww' does not exist (no {project / 'data/raww'}): fix data.root in params.yaml, "
        "or put the images there, one folder per class"
    )
    (project / "data" / "raww").mkdir()  # there, but empty: what the listing was made of is the news
    assert failed_repro(project) == (
        "error: data/images.csv was made of imagefolder under 'data/raw', but params.yaml asks for imagefolder under "
        "'data/raww': fix data.root or data.source, or run dvc repro where data/raww holds the images so that scan "
        "lists them anew"
    )


def test_a_text_file_named_jpg_stops_scan_under_raise_and_is_left_out_before_the_splits_under_skip(project: Path):
    """Regression: `scan` and `prepare` let it through ("0 of them unusable"; prepare put it in val), and `extract`
    failed with `cannot identify image file <_io.BytesIO object at 0x…>` and a false "run again to continue"."""
    root = imagefolder_project(project, classes=("circle", "square")) / "data" / "raw"
    (root / "circle" / "notes.jpg").write_text("shopping list: milk, eggs\n")
    reason = "UnidentifiedImageError: cannot identify image file 'circle/notes.jpg'"
    assert failed_repro(project) == (
        f"error: cannot use image 'circle/notes.jpg': {reason} (1 such file(s); set data.on_bad_image: skip to leave "
        "them out and list them in skipped.csv)"
    )
    assert not any((project / path).exists() for path in ("dvc.lock", "data/prepared", "data/features", "reports"))
    write_params(project, {"data": {"on_bad_image": "skip"}})
    run(project, "dvc", "repro", "prepare")
    prepared = project / "data" / "prepared"
    assert (prepared / "skipped.csv").read_text() == f"id,reason\ncircle/notes.jpg,{reason}\n"
    assert "notes.jpg" not in (prepared / "manifest.csv").read_text()
    assert json.loads((project / "reports/prepare/metrics.json").read_text())["skipped"] == 1


def test_a_class_called_train_is_refused_in_one_line_then_taken_as_a_class(project: Path):
    """Regression: flat raw/{bus,car,train}/ failed with a misleading "no class folders"."""
    imagefolder_project(project, classes=("bus", "car", "train"))
    error = failed_repro(project)
    assert error.startswith("error: data/raw has split folders (train) beside other folders (bus, car): set data.")
    write_params(project, {"data": {"layout": "classes"}})
    run(project, "dvc", "repro", "prepare")
    assert json.loads((project / "data/prepared/classes.json").read_text()) == ["bus", "car", "train"]


def test_odd_file_names_and_a_fifo_stop_in_one_line_or_are_skipped(project: Path):
    """Regression: a Latin-1 name crashed scan with a traceback, a carriage return split a row of the listing, and
    a FIFO named like an image hung `dvc repro` for good."""
    root = imagefolder_project(project) / "data" / "raw"
    good = (root / "cat" / "000.png").read_bytes()
    (root / "cat" / "line\rbreak.png").write_bytes(good)
    with open(os.path.join(os.fsencode(root / "dog"), b"caf\xe9.png"), "wb") as f:
        f.write(good)
    os.mkfifo(root / "dog" / "pipe.jpg")
    assert failed_repro(project) == (
        "error: cannot use image 'cat/line\\x0dbreak.png': its name holds a control character (a line break, a tab, "
        "...): rename it (3 such file(s); set data.on_bad_image: skip to leave them out and list them in skipped.csv)"
    )
    write_params(project, {"data": {"on_bad_image": "skip"}})
    run(project, "dvc", "repro", "prepare")
    skipped = (project / "data/prepared/skipped.csv").read_text().splitlines()
    assert skipped == [
        "id,reason",
        'cat/line\\x0dbreak.png,"its name holds a control character (a line break, a tab, ...): rename it"',
        "dog/caf\\xe9.png,its name is not valid UTF-8: rename it",
        "dog/pipe.jpg,not a regular file (a FIFO): only regular files are read",
    ]
