"""Real `dvc` commands in a temporary copy of the project: what re-runs after which edit."""

from __future__ import annotations

import ast
import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline import splits
from tests.conftest import ROOT, color_image, git, run, write_params

STAGES = ("prepare", "extract", "train", "evaluate")


def repro(project: Path, *args: str) -> list[str]:
    """Run `dvc repro` and return the stages it actually ran."""
    out = run(project, "dvc", "repro", *args).stdout
    return re.findall(r"Running stage '(\w+)'", out)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def imagefolder_project(reproduced: Path) -> Path:
    return reproduced


def test_second_repro_does_nothing(imagefolder_project: Path):
    out = run(imagefolder_project, "dvc", "repro").stdout
    assert "Running stage" not in out and "up to date" in out


def test_head_param_edit_reruns_train_and_evaluate_only(imagefolder_project: Path):
    features = {p.name: digest(p) for p in (imagefolder_project / "data" / "features").glob("*.h5")}
    write_params(imagefolder_project, {"train": {"lr": 0.02}})
    assert repro(imagefolder_project) == ["train", "evaluate"]
    assert {p.name: digest(p) for p in (imagefolder_project / "data" / "features").glob("*.h5")} == features


def test_train_code_edit_does_not_rerun_extract(imagefolder_project: Path):
    with open(imagefolder_project / "pipeline" / "train.py", "a") as f:
        f.write("\n# an edit\n")
    # train re-runs; its head comes out byte-identical, so evaluate has nothing new to do
    assert repro(imagefolder_project) == ["train"]


def test_image_size_edit_reruns_extract_and_what_follows(imagefolder_project: Path):
    write_params(imagefolder_project, {"extract": {"image_size": 48}})
    assert repro(imagefolder_project) == ["extract", "train", "evaluate"]


def manifest(project: Path) -> dict[str, str]:
    lines = (project / "data" / "prepared" / "manifest.csv").read_text().splitlines()[1:]
    return {line.rsplit(",", 2)[0]: line.rsplit(",", 2)[1] for line in lines}


def test_added_and_changed_images_rerun_prepare_and_what_follows_and_no_image_changes_split(
    imagefolder_project: Path,
):
    before = manifest(imagefolder_project)
    root = imagefolder_project / "data" / "raw"
    rng = np.random.default_rng(5)
    for k, name in enumerate(("cat", "dog", "owl") * 3):  # 9 more images: 30% more
        color_image(rng, k % 3).save(root / name / f"new{k}.png")
    color_image(np.random.default_rng(6), 2).save(root / "dog" / "000.png")  # same name, new pixels
    assert repro(imagefolder_project) == list(STAGES)
    after = manifest(imagefolder_project)
    assert len(after) == len(before) + 9
    # every image keeps its split, but a stand-in for a class that had no image hashing into a split
    natural = {i: natural_split(i) for i in before}
    assert all(after[i] == split for i, split in before.items() if split == natural[i])
    assert all(after[i] in (split, natural[i]) for i, split in before.items())


def natural_split(item_id: str, val: float = 0.2, test: float = 0.3) -> str:
    """The split of an image by its hash alone (the reproduced project's fractions)."""
    u = splits.position(item_id.split("/")[0], item_id, seed=0)
    return "test" if u < test else "val" if u < test + val else "train"


def test_digits_pipeline_end_to_end_with_metrics_and_plots(project: Path):
    """The embedded default, offline (random weights), through dvc: accuracy and every output in place."""
    assert repro(project) == list(STAGES)
    metrics = json.loads(run(project, "dvc", "metrics", "show", "--json").stdout)
    values = next(iter(metrics.values()))["data"]["reports/evaluate/metrics.json"]["data"]
    assert values["accuracy"] >= 0.9 and values["acc_lo"] < values["accuracy"] < values["acc_hi"]
    assert "top5" in values
    plots = run(project, "dvc", "plots", "show", "--json").stdout
    assert "confusion_matrix.json" in plots and "loss.tsv" in plots


def test_a_sweep_over_heads_reuses_the_cached_features(imagefolder_project: Path):
    features = {p.name: digest(p) for p in (imagefolder_project / "data" / "features").glob("*.h5")}
    out = run(imagefolder_project, "dvc", "exp", "run", "-S", "train.head=logreg").stdout
    assert re.findall(r"Running stage '(\w+)'", out) == ["train", "evaluate"], out
    assert "logreg" in run(imagefolder_project, "dvc", "exp", "show", "--json").stdout
    plots = json.loads(run(imagefolder_project, "dvc", "plots", "show", "--json").stdout)
    assert "errors" not in plots and {"loss", "accuracy"} <= set(plots["data"])  # logreg draws the curves too
    assert {p.name: digest(p) for p in (imagefolder_project / "data" / "features").glob("*.h5")} == features


def test_changing_only_nproc_reruns_extract_alone_and_the_features_keep_their_bytes(imagefolder_project: Path):
    features = {p.name: digest(p) for p in (imagefolder_project / "data" / "features").glob("*.h5")}
    write_params(imagefolder_project, {"extract": {"nproc": 2}})
    assert repro(imagefolder_project) == ["extract"]  # train sees the same features and does not re-run
    assert {p.name: digest(p) for p in (imagefolder_project / "data" / "features").glob("*.h5")} == features
    metrics = json.loads((imagefolder_project / "reports" / "extract" / "metrics.json").read_text())
    assert metrics["images"] == 30


def test_a_clone_without_the_images_trains_on_features_pulled_from_the_remote(reproduced: Path, tmp_path: Path):
    """Clone A extracts and pushes to a shared directory; clone B has no images, pulls, and never extracts."""
    a = reproduced
    git(a, "rm", "-r", "-q", "--cached", "data/raw")  # the images are versioned by DVC, as the README says
    remote = tmp_path / "remote"
    run(a, "dvc", "add", "data/raw")
    run(a, "dvc", "remote", "add", "--local", "--default", "team", str(remote))
    assert repro(a) == []  # the same images, now tracked by DVC: nothing to re-run
    run(a, "dvc", "push", "--run-cache")
    git(a, "add", "-A")
    git(a, "commit", "-qm", "features")

    b = tmp_path / "b"
    git(tmp_path, "clone", "-q", str(a), str(b))
    run(b, "dvc", "remote", "add", "--local", "--default", "team", str(remote))
    assert not (b / "data" / "raw").exists() and not (b / "data" / "features").exists()
    write_params(b, {"train": {"lr": 0.02}})
    out = run(b, "dvc", "repro", "--pull", "--allow-missing").stdout
    assert re.findall(r"Running stage '(\w+)'", out) == ["train", "evaluate"], out
    assert "Stage 'extract' didn't change" in out and not (b / "data" / "raw").exists()
    for h5 in ("train.h5", "val.h5", "test.h5"):
        assert digest(b / "data" / "features" / h5) == digest(a / "data" / "features" / h5)
    assert "accuracy" in json.loads((b / "reports" / "evaluate" / "metrics.json").read_text())
    assert (b / "reports" / "evaluate" / "plots" / "images" / "worst_test_images.png").is_file()  # ids, no images


def pipeline_imports(module: str, seen: set[str] | None = None) -> set[str]:
    """The pipeline modules ``module`` imports, directly or through each other."""
    seen = set() if seen is None else seen
    if module not in seen:
        seen.add(module)
        for node in ast.walk(ast.parse((ROOT / "pipeline" / f"{module}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "pipeline":
                for alias in node.names:
                    pipeline_imports(alias.name, seen)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline."):
                pipeline_imports(node.module.split(".")[1], seen)
    return seen


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_lists_exactly_the_modules_it_imports(stage: str):
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["deps"]
    assert {Path(d).stem for d in deps if d.startswith("pipeline/")} == pipeline_imports(stage)


def test_each_stage_run_alone_with_no_arguments_writes_what_dvc_repro_would(imagefolder_project: Path):
    (imagefolder_project / "models/head.pt").unlink()
    for path in ("data/prepared", "data/features", "reports"):
        shutil.rmtree(imagefolder_project / path)
    for stage in STAGES:
        run(imagefolder_project, "python", "-m", f"pipeline.{stage}")
    # every output is back, with dvc.lock's hashes; only the extraction's images/s is another run's
    status = run(imagefolder_project, "dvc", "status").stdout
    assert status.split() == ["extract:", "changed", "outs:", "modified:", "reports/extract/metrics.json"], status
