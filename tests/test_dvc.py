"""Real `dvc` commands in a temporary copy of the project: what re-runs after which edit."""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from pipeline import sources, splits
from pipeline.store import RowStore
from tests.conftest import ROOT, color_image, extract_here, git, project_env, run, stage_main, write_params

STAGES = ("scan", "prepare", "extract", "train", "audit", "evaluate", "curve")


def repro(project: Path, *args: str) -> list[str]:
    """Run `dvc repro` and return the stages it actually ran."""
    out = run(project, "dvc", "repro", *args).stdout
    return re.findall(r"Running stage '(\w+)'", out)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def imagefolder_project(reproduced: Path) -> Path:
    return reproduced


def test_second_repro_only_lists_the_folder_again_and_so_does_one_after_touching_every_image(
    imagefolder_project: Path,
):
    assert repro(imagefolder_project) == ["scan"]
    for image in (imagefolder_project / "data" / "raw").rglob("*.png"):
        image.touch()
    assert repro(imagefolder_project) == ["scan"]  # same bytes, same keys: the listing keeps its bytes
    assert "nothing to commit" in git_status(imagefolder_project)


def git_status(project: Path) -> str:
    return run(project, "git", "status").stdout


def test_train_code_edit_does_not_rerun_extract(imagefolder_project: Path):
    with open(imagefolder_project / "pipeline" / "train.py", "a") as f:
        f.write("\n# an edit\n")
    # train re-runs; its head comes out byte-identical, so evaluate has nothing new to do
    assert repro(imagefolder_project) == ["scan", "train"]


def manifest(project: Path) -> dict[str, str]:
    """Image id -> split."""
    items, _ = sources.read_manifest(project / "data" / "prepared")
    return {it.id: it.split for it in items}


@pytest.mark.slow
def test_a_growing_folder_extracts_only_new_and_changed_images_and_keeps_every_split(imagefolder_project: Path):
    project, root = imagefolder_project, imagefolder_project / "data" / "raw"
    before = manifest(project)
    color_image(np.random.default_rng(6), 2).save(root / "dog" / "000.png")  # same name, new pixels
    (root / "cat" / "001.png").unlink()
    (root / "owl" / "002.png").rename(root / "owl" / "renamed.png")  # another id, the same bytes
    assert repro(project, "extract") == ["scan", "prepare", "extract"]  # the later stages: DVC's own rule
    assert extracted(project) == (1, 28)  # the changed image alone; deleting and renaming extract nothing

    rng = np.random.default_rng(5)
    for k, name in enumerate(("cat", "dog", "owl") * 3):  # 9 more images: 30% more
        color_image(rng, k % 3).save(root / name / f"new{k}.png")
    assert repro(project, "extract") == ["scan", "prepare", "extract"]
    assert extracted(project) == (9, 29)
    after = manifest(project)
    assert len(after) == len(before) - 1 + 9
    # every image keeps its split, but a stand-in for a class that had no image hashing into a split
    natural = {i: natural_split(i) for i in before}
    assert all(after[i] == split for i, split in before.items() if i in after and split == natural[i])
    assert all(after[i] in (split, natural[i]) for i, split in before.items() if i in after)

    grown = {p.name: digest(p) for p in (project / "data" / "features").glob("*.h5")}
    assert from_scratch(project) == (grown, 38)


@pytest.mark.slow
def test_an_incremental_run_killed_mid_extraction_resumes_byte_identically(imagefolder_project: Path):
    project, root = imagefolder_project, imagefolder_project / "data" / "raw"
    rng = np.random.default_rng(7)
    for k in range(240):  # 15 batches of 16: a commit every 4
        color_image(rng, k % 3).save(root / ("cat", "dog", "owl")[k % 3] / f"week2-{k:03d}.png")
    dvc = subprocess.Popen(["dvc", "repro"], cwd=project, env=project_env(project), stdout=subprocess.DEVNULL)
    stage = wait_for(lambda: stage_pid(project, "pipeline.extract"), dvc)
    keys = next((project / "data" / ".feature-store").glob("*/0/original.keys"))
    wait_for(lambda: keys.stat().st_size > 30 * 16, dvc)  # some of the new rows are committed
    os.kill(stage, signal.SIGKILL)
    assert dvc.wait(timeout=60) != 0
    assert not (project / "data" / "features").exists()

    assert repro(project, "extract") == ["scan", "extract"]  # prepare had finished
    done, reused = extracted(project)
    assert reused > 30 and done + reused == 270
    resumed = {p.name: digest(p) for p in (project / "data" / "features").glob("*.h5")}
    assert from_scratch(project) == (resumed, 270)


def test_a_per_class_limit_run_keeps_the_rows_of_every_listed_image(
    imagefolder_project: Path, monkeypatch: pytest.MonkeyPatch
):
    """Regression: the store kept only the rows of the last manifest, so going back to every image re-extracted
    the ones that per_class_limit had left out. The limited run through dvc repro; going back, prepare's and
    extract's main() in this process (DVC would restore the earlier outputs from its run cache)."""
    project = imagefolder_project
    write_params(project, {"data": {"per_class_limit": 2}})
    assert repro(project, "extract") == ["scan", "prepare", "extract"]
    write_params(project, {"data": {"per_class_limit": 0}})
    monkeypatch.chdir(project)
    for stage in ("prepare", "extract"):
        stage_main(monkeypatch, stage)
    assert extracted(project) == (0, 30)


def test_a_store_that_lacks_some_rows_takes_them_from_the_recorded_features(imagefolder_project: Path):
    """Regression: only an empty store was filled from the recorded features; one that lacked some rows (a
    teammate's partial store) extracted them again."""
    project = imagefolder_project
    features = {p.name: digest(p) for p in (project / "data" / "features").glob("*.h5")}
    (store_dir,) = (project / "data" / ".feature-store").iterdir()
    store = RowStore(store_dir, segment=0, dim=512, dtype="float32")
    assert store.keep_only({"original": list(store.index["original"])[:10]}) == 20
    result = run(project, "dvc", "repro", "--force", "--single-item", "extract")
    assert "took 20 rows from the recorded features" in result.stderr, result.stderr
    assert extracted(project) == (0, 30)
    assert {p.name: digest(p) for p in (project / "data" / "features").glob("*.h5")} == features


def wait_for(found: Callable[[], Any], proc: subprocess.Popen, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := found()):
        assert proc.poll() is None, "the run ended first"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    return value


def stage_pid(project: Path, module: str) -> int | None:
    """The pid of the stage command ``python -m module`` running in ``project``."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if module.encode() in cmdline and Path(f"/proc/{pid}/cwd").resolve() == project.resolve():
                return int(pid)
        except OSError:
            continue
    return None


def from_scratch(project: Path) -> tuple[dict[str, str], int]:
    """The digests of the features that the extraction makes with no row store and no recorded features to take,
    and the images it extracted. It runs in this process, on the threads that conftest gives the stage's processes
    too: what `dvc repro` made is compared with it."""
    for path in ("data/.feature-store", ".dvc/cache", "data/features"):
        shutil.rmtree(project / path, ignore_errors=True)
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(project)
        stats = extract_here()
    assert stats["reused"] == 0
    return {p.name: digest(p) for p in (project / "data" / "features").glob("*.h5")}, stats["images"]


def extracted(project: Path) -> tuple[int, int]:
    """(images extracted, rows reused) by the last extract run."""
    metrics = json.loads((project / "reports" / "extract" / "metrics.json").read_text())
    return metrics["extracted"], metrics["reused"]


def test_a_dangling_link_is_named_in_one_line_under_raise_and_listed_under_skip(imagefolder_project: Path):
    project = imagefolder_project
    (project / "data" / "raw" / "cat" / "gone.jpg").symlink_to(project / "nowhere.jpg")
    result = run(project, "dvc", "repro", check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: cannot use image 'cat/gone.jpg': dangling link: its target does not exist (1 such file(s); "
        "set data.on_bad_image: skip to leave them out and list them in skipped.csv)"
    ], result.stderr
    write_params(project, {"data": {"on_bad_image": "skip"}})
    assert repro(project) == ["scan", "prepare", "extract"]  # the same features: train has nothing new
    skipped = (project / "data" / "prepared" / "skipped.csv").read_text()
    assert skipped == "id,reason\ncat/gone.jpg,dangling link: its target does not exist\n"
    assert extracted(project) == (0, 30)  # checking every image decodes changes no row


@pytest.mark.slow
def test_corrections_relabel_and_drop_by_key_and_rerun_from_prepare_with_nothing_extracted(imagefolder_project: Path):
    project = imagefolder_project
    items, _ = sources.read_manifest(project / "data" / "prepared")
    cat, owl = (next(it for it in items if it.id.startswith(name) and it.split == "train") for name in ("cat", "owl"))
    with open(project / "data" / "corrections.csv", "a") as f:
        f.write(f"{cat.key},relabel,dog,{cat.id}\n{owl.key},drop,,{owl.id}\n")
    # up to the head: the corrected labels reach it through DVC's graph; the stages after it read the head and the
    # features whatever made them (the digits run and the clone test run them after prepare and train)
    assert repro(project, "train") == ["scan", "prepare", "extract", "train"]
    assert extracted(project) == (0, 29)  # the same images, one fewer: every row comes from the store
    assert json.loads((project / "reports/prepare/metrics.json").read_text())["corrected"] == 2
    after = {it.id: it for it in sources.read_manifest(project / "data" / "prepared")[0]}
    assert after[cat.id] == sources.Item(cat.id, 1, "train", cat.key) and owl.id not in after


def natural_split(item_id: str, val: float = 0.2, test: float = 0.3) -> str:
    """The split of an image by its hash alone (the reproduced project's fractions)."""
    u = splits.position(item_id.split("/")[0], item_id, seed=0)
    return "test" if u < test else "val" if u < test + val else "train"


@pytest.mark.slow
def test_digits_pipeline_end_to_end_with_metrics_and_plots(project: Path):
    """The embedded default, offline (random weights), through dvc: accuracy and every output in place."""
    assert repro(project) == list(STAGES)
    metrics = json.loads(run(project, "dvc", "metrics", "show", "--json").stdout)
    values = next(iter(metrics.values()))["data"]["reports/evaluate/metrics.json"]["data"]
    assert values["accuracy"] >= 0.9 and values["acc_lo"] < values["accuracy"] < values["acc_hi"]
    assert "top5" in values
    plots = run(project, "dvc", "plots", "show", "--json").stdout
    assert "confusion_matrix.json" in plots and "loss.tsv" in plots
    assert "reports/curve/curve.csv" in json.loads(plots)["data"]
    with open(project / "reports" / "curve" / "curve.csv", newline="") as f:
        curve = list(csv.DictReader(f))
    assert [row["n"] for row in curve] == ["1", "2", "4", "8", "16", "0"]
    assert float(curve[-1]["acc_mean"]) >= 0.9  # the 'all' point; its k-NN is evaluate's, on the same images
    assert float(curve[-1]["knn_mean"]) == pytest.approx(values["knn_acc"], abs=1e-6)
    shown = run(project, "dvc", "metrics", "show").stdout
    assert metrics_width(shown) <= 160
    assert_readme_metrics_match(shown)


def metrics_width(shown: str) -> int:
    """The widest line of `dvc metrics show`'s table."""
    return max(map(len, shown.splitlines()))


@pytest.mark.slow
def test_a_hundred_classes_of_three_images_run_through_and_their_metrics_fit_160_columns(project: Path):
    """Few-shot: one image a split is all a class needs. Regression: `dvc metrics show` had grown to 199 columns."""
    rng = np.random.default_rng(3)
    for c in range(100):
        (project / "data" / "raw" / f"class{c:03d}").mkdir(parents=True)
        for i in range(3):
            color_image(rng, c % 6, size=8).save(project / "data" / "raw" / f"class{c:03d}" / f"{i}.png")
    write_params(project, {"data": {"source": "imagefolder"}, "extract": {"batch_size": 64}, "train": {"epochs": 2}})
    assert repro(project, "evaluate") == list(STAGES[:-1])  # every stage with metrics: the curve has none
    assert json.loads((project / "reports/prepare/metrics.json").read_text()) == {
        "skipped": 0, "corrected": 0, "train": 100, "val": 100, "test": 100,
    }  # fmt: skip
    assert metrics_width(run(project, "dvc", "metrics", "show").stdout) <= 160


def test_a_sweep_over_heads_reuses_the_cached_features(
    reproduced_template: Path, head_experiment_template: Path, head_experiment: Path
):
    """`dvc exp run -S train.head=logreg` on the session's project (conftest runs it once, for compare's test too):
    train and evaluate alone, on the features as they were."""
    out = (head_experiment_template.parent / "exp-run.txt").read_text()
    assert re.findall(r"Running stage '(\w+)'", out) == ["scan", "train", "evaluate"], out
    assert "logreg" in run(head_experiment, "dvc", "exp", "show", "--json").stdout
    plots = json.loads(run(head_experiment, "dvc", "plots", "show", "--json").stdout)
    assert "errors" not in plots and {"loss", "accuracy"} <= set(plots["data"])  # logreg draws the curves too
    before = {p.name: digest(p) for p in (reproduced_template / "data" / "features").glob("*.h5")}
    assert {p.name: digest(p) for p in (head_experiment / "data" / "features").glob("*.h5")} == before


def test_changing_only_nproc_reruns_extract_alone_which_reuses_every_row(imagefolder_project: Path):
    features = {p.name: digest(p) for p in (imagefolder_project / "data" / "features").glob("*.h5")}
    write_params(imagefolder_project, {"extract": {"nproc": 2}})
    assert repro(imagefolder_project) == ["scan", "extract"]  # train sees the same features and does not re-run
    assert {p.name: digest(p) for p in (imagefolder_project / "data" / "features").glob("*.h5")} == features
    metrics = json.loads((imagefolder_project / "reports" / "extract" / "metrics.json").read_text())
    assert (metrics["extracted"], metrics["reused"]) == (0, 30)  # the row store does not depend on nproc


@pytest.mark.slow
def test_a_clone_without_images_trains_on_pulled_features_then_extracts_only_the_images_it_adds(
    reproduced: Path, tmp_path: Path
):
    """Clone A extracts and pushes to a shared directory; clone B has no images, pulls, and never extracts; then B
    pulls the images, adds three, and extracts those three alone, with no row store of its own."""
    a = reproduced
    git(a, "rm", "-r", "-q", "--cached", "data/raw")  # the images are versioned by DVC, as the README says
    remote = tmp_path / "remote"
    run(a, "dvc", "add", "data/raw")
    run(a, "dvc", "remote", "add", "--local", "--default", "team", str(remote))
    assert repro(a) == ["scan"]  # the same images, now tracked by DVC: nothing to re-run
    run(a, "dvc", "push", "--run-cache")
    git(a, "add", "-A")
    git(a, "commit", "-qm", "features")

    b = tmp_path / "b"
    git(tmp_path, "clone", "-q", str(a), str(b))
    run(b, "dvc", "remote", "add", "--local", "--default", "team", str(remote))
    assert not (b / "data" / "raw").exists() and not (b / "data" / "features").exists()
    write_params(b, {"train": {"lr": 0.02}})
    result = run(b, "dvc", "repro", "--pull", "--allow-missing")
    out = result.stdout
    # a head edit: train and evaluate alone (audit reads features; the curve's head is logreg, whatever train.*)
    assert re.findall(r"Running stage '(\w+)'", out) == ["scan", "train", "evaluate"], out
    assert "keeping the listing data/images.csv as it is" in result.stderr
    assert "Stage 'extract' didn't change" in out and not (b / "data" / "raw").exists()
    for h5 in ("train.h5", "val.h5", "test.h5"):
        assert digest(b / "data" / "features" / h5) == digest(a / "data" / "features" / h5)
    assert "accuracy" in json.loads((b / "reports" / "evaluate" / "metrics.json").read_text())
    assert (b / "reports" / "evaluate" / "plots" / "images" / "worst_test_images.png").is_file()  # ids, no images

    # B pulls the images too and adds three: its new row store starts from the features A recorded
    run(b, "dvc", "pull", "-q")
    rng = np.random.default_rng(11)
    for k, name in enumerate(("cat", "dog", "owl")):
        color_image(rng, k).save(b / "data" / "raw" / name / "from-b.png")
    result = run(b, "dvc", "repro", "extract")  # what B extracts; the stages after it run as in any project
    assert "took 30 rows from the recorded features" in result.stderr, result.stderr
    assert extracted(b) == (3, 30)
    seeded = {p.name: digest(p) for p in (b / "data" / "features").glob("*.h5")}
    assert from_scratch(b) == (seeded, 33)


def pipeline_imports(module: str, seen: set[str] | None = None) -> set[str]:
    """The pipeline modules ``module`` imports, directly or through each other."""
    seen = set() if seen is None else seen
    if module not in seen:
        seen.add(module)
        path = ROOT / "pipeline" / f"{module.replace('.', '/')}.py"
        path = path if path.is_file() else path.with_suffix("") / "__init__.py"  # a package: its __init__
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in ("pipeline", "pipeline.backbones"):
                for alias in node.names:
                    pipeline_imports(
                        f"{node.module.removeprefix('pipeline').lstrip('.')}.{alias.name}".lstrip("."), seen
                    )
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline."):
                pipeline_imports(node.module.removeprefix("pipeline."), seen)
    return seen


def dep_module(dep: str) -> str:
    """pipeline/backbones/vgg.py -> backbones.vgg; pipeline/backbones/__init__.py -> backbones."""
    return dep.removeprefix("pipeline/").removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def test_dvc_parses_its_yaml_files_in_c():
    """ruamel.yaml.clib is a dependency for this alone: every dvc command parses dvc.yaml and dvc.lock, and in C
    `dvc repro` and `dvc status` took 14-18% less CPU here."""
    from ruamel.yaml import YAML
    from ruamel.yaml.main import CParser

    assert CParser is not None and YAML(typ="safe").Parser is CParser  # dvc's parse_yaml: YAML(typ="safe")


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_lists_exactly_the_modules_it_imports(stage: str):
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["deps"]
    assert {dep_module(d) for d in deps if d.startswith("pipeline/")} == pipeline_imports(stage)


@pytest.mark.slow
def test_each_stage_run_alone_with_no_arguments_writes_what_dvc_repro_would(
    imagefolder_project: Path, monkeypatch: pytest.MonkeyPatch
):
    """Each stage's main() with no arguments, in this process (`python -m pipeline.<stage>` calls it through
    errors.run_stage, which every `dvc repro` here runs): its default paths are dvc.yaml's."""
    (imagefolder_project / "models/head.pt").unlink()
    for path in ("data/prepared", "data/features", "reports"):
        shutil.rmtree(imagefolder_project / path)
    monkeypatch.chdir(imagefolder_project)
    for stage in STAGES:
        stage_main(monkeypatch, stage)
    # every output is back, with dvc.lock's hashes; only the extraction's images/s is another run's
    status = run(imagefolder_project, "dvc", "status").stdout
    assert status.split() == [
        "scan:", "always", "changed", "extract:", "changed", "outs:", "modified:", "reports/extract/metrics.json"
    ], status  # fmt: skip


@pytest.mark.slow
def test_a_queued_experiment_sees_the_images_that_dvc_tracks(reproduced: Path):
    """The README's way to one's own images: `dvc add data/raw` and a commit. Queued runs start from a clone of
    the last commit, so untracked images never reach them (scan then kept the old listing: "no images in
    data/raw"); images that DVC tracks are checked out there, three new ones included, and the recorded features
    give the rest. One queued run shows it for a sweep's every run: each starts from the same clone."""
    project = reproduced
    rng = np.random.default_rng(12)
    for k, name in enumerate(("cat", "dog", "owl")):
        color_image(rng, k).save(project / "data" / "raw" / name / "new.png")
    git(project, "rm", "-r", "-q", "--cached", "data/raw")  # the fixture committed the images to git
    run(project, "dvc", "add", "data/raw")
    git(project, "add", "data/raw.dvc", "data/.gitignore")
    git(project, "commit", "-qm", "images versioned by DVC")
    run(project, "dvc", "exp", "run", "--queue", "-S", "extract.arch=vgg11")
    result = run(project, "dvc", "exp", "run", "--run-all")
    assert "keeping the listing" not in result.stdout + result.stderr, result.stdout
    shown = json.loads(run(project, "dvc", "exp", "show", "--json").stdout)
    revs = [rev for commit in shown for exp in commit.get("experiments") or [] for rev in exp["revs"]]
    found = {}
    for rev in revs:
        assert rev["error"] is None, (rev, result.stdout)  # `--run-all` exits 0 when an experiment fails
        listing = run(project, "git", "show", f"{rev['rev']}:data/images.csv").stdout.splitlines()[2:]
        arch = rev["data"]["params"]["params.yaml"]["data"]["extract"]["arch"]
        counts = run(project, "python", "-c", READ_AT_REV, "reports/extract/metrics.json", rev["rev"]).stdout
        extract = json.loads(counts)
        found[arch] = (len(listing), extract["extracted"], extract["reused"])
    assert found == {"vgg11": (33, 3, 30)}  # the committed backbone: 30 rows taken from the recorded features


# a tracked file as it was at a revision or experiment, from the DVC cache, with no checkout
READ_AT_REV = "import sys, dvc.api; print(dvc.api.read(sys.argv[1], rev=sys.argv[2]))"


def metrics_rows(table: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    """`dvc metrics show`'s columns, and each file's row as {column: value}."""
    header, *rows = (line.split() for line in table.strip().splitlines())
    return header, {row[0]: dict(zip(header[1:], row[1:], strict=True)) for row in rows}


def assert_readme_metrics_match(shown: str) -> None:
    """The README's example `dvc metrics show` (the digits, default parameters) against a digits run: the same
    columns, and values in the same cells; the accuracies and the audit's counts depend on the backbone (the test
    project's is faster), unchecked."""
    (example,) = re.findall(r"```\n(Path .*?)```", (ROOT / "README.md").read_text(), re.S)
    columns, rows = metrics_rows(shown)
    readme_columns, readme_rows = metrics_rows(example)
    assert columns == readme_columns
    assert list(rows) == list(readme_rows)
    filled = {path: {k for k, v in row.items() if v != "-"} for path, row in rows.items()}
    assert filled == {path: {k for k, v in row.items() if v != "-"} for path, row in readme_rows.items()}
