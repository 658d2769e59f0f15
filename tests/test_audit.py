"""The audit stage through real `dvc repro`: copies across splits found as leaks, a flipped label found, the
accuracy without the leaks, and one line for what it cannot audit."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from pipeline import audit, features, sources
from tests.conftest import made_once, run, write_params
from tests.test_dvc import extracted, natural_split, repro


def issues(project: Path) -> list[dict[str, str]]:
    with open(project / "reports" / "audit" / "issues.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def name_in(split: str, folder: str, stem: str) -> str:
    """A file name in class ``folder`` that the splits' hash puts in ``split``."""
    return next(f"{stem}{n}.png" for n in range(1000) if natural_split(f"{folder}/{stem}{n}.png") == split)


@pytest.fixture(scope="session")
def audited(reproduced_template: Path, tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """The session's three-class project with an exact and a re-saved copy of two test images put in train, and
    a training image of class cat moved to owl; after `dvc repro evaluate`. Made once per run, for every worker."""
    return made_once(tmp_path_factory, worker_id, "audited", lambda path: _audit(reproduced_template, path))


def _audit(template: Path, dest: Path) -> None:
    project = Path(shutil.copytree(template, dest, symlinks=True))
    root = project / "data" / "raw"
    items, _ = sources.read_manifest(project / "data" / "prepared")
    tests = [it.id for it in items if it.split == "test"]
    exact, near = tests[0], next(i for i in tests if i.split("/")[0] != tests[0].split("/")[0])
    shutil.copy(root / exact, root / exact.split("/")[0] / name_in("train", exact.split("/")[0], "copy"))
    brighter = ImageEnhance.Brightness(Image.open(root / near)).enhance(1.04)
    brighter.save(root / near.split("/")[0] / name_in("train", near.split("/")[0], "resaved"))
    cat = next(it.id for it in items if it.split == "train" and it.id.startswith("cat/"))
    (root / cat).rename(root / "owl" / name_in("train", "owl", "was_cat"))
    (project / "truth.json").write_text(json.dumps({"exact": exact, "near": near}))
    assert {"prepare", "extract", "audit", "evaluate"} <= set(repro(project, "evaluate"))  # the curve: no audit


def test_copies_of_test_images_in_train_are_leaks_and_a_flipped_label_is_found(audited: Path):
    truth = json.loads((audited / "truth.json").read_text())
    found = issues(audited)
    leaks = {row["id"]: row for row in found if row["kind"] == "leak"}
    assert set(leaks) == {truth["exact"], truth["near"]}, found
    exact = leaks[truth["exact"]]
    assert exact["other_split"] == "train" and exact["other_id"].split("/")[1].startswith("copy")
    assert exact["path"] == f"data/raw/{truth['exact']}" and float(exact["score"]) == pytest.approx(1.0)
    assert leaks[truth["near"]]["other_id"].split("/")[1].startswith("resaved")
    labels = [row for row in found if row["kind"] == "label"]
    flipped = [row for row in labels if row["id"].startswith("owl/was_cat")]
    assert flipped and flipped[0]["label"] == "owl" and flipped[0]["suggested"] == "cat", labels
    kinds = [row["kind"] for row in found]
    assert kinds == sorted(kinds, key=("leak", "label", "duplicate", "outlier").index)  # by kind, worst first
    metrics = json.loads((audited / "reports" / "audit" / "metrics.json").read_text())
    assert metrics["leaks"] == 2 and metrics["mislabeled"] == len(labels)
    assert extracted(audited) == (1, 31)  # the re-saved copy alone has new bytes (not the exact copy, the moved file)
    shown = json.loads((audited / "reports" / "evaluate" / "metrics.json").read_text())
    assert "acc_unseen" in shown  # over the test images with no copy in train
    for kind in ("leaks", "labels", "duplicates", "outliers"):
        assert Image.open(audited / "reports" / "audit" / "plots" / f"{kind}.png").width > 0


def test_the_audit_changes_no_other_stage_s_outputs(audited: Path, tmp_path: Path):
    """Its outputs are its own: after it ran, every stage but scan (always run) is up to date, extract and train
    included, and their locked outputs are the files on disk."""
    project = Path(shutil.copytree(audited, tmp_path / "p", symlinks=True))  # the run's own is shared
    status = run(project, "dvc", "status", "--json", "--with-deps", "evaluate").stdout  # and every stage before it
    assert json.loads(status) == {"scan": ["always changed"]}, status


def test_a_class_with_one_training_image_is_left_out_of_the_label_check_in_one_line(audited: Path, tmp_path: Path):
    project = Path(shutil.copytree(audited, tmp_path / "p", symlinks=True))
    write_params(project, {"data": {"per_class_limit": 1}})
    result = run(project, "dvc", "repro", "audit")
    assert "3 training image(s) left out: their class has no other training image" in result.stderr, result.stderr
    assert json.loads((project / "reports" / "audit" / "metrics.json").read_text())["mislabeled"] >= 0


def test_features_of_another_manifest_are_refused_in_one_line(audited: Path, tmp_path: Path):
    project = Path(shutil.copytree(audited, tmp_path / "p", symlinks=True))
    manifest = project / "data" / "prepared" / "manifest.csv"
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(lines[:-1]) + "\n")  # one image fewer than the features hold
    result = run(project, "python", "-m", "pipeline.audit", check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "does not hold the features of data/prepared's manifest" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def write_splits(folder: Path, ids: dict[str, list[str]], classes: list[str]) -> None:
    """Feature files of ``ids`` per split, two classes, one 4-d row per image."""
    from tests.conftest import feature_provenance

    folder.mkdir()
    for split, names in ids.items():
        prov = feature_provenance(split=split, class_names=classes)
        with features.FeatureWriter(
            folder / f"{split}.h5", n=len(names), dim=4, dtype="float32", views=["original"], provenance=prov
        ) as w:
            if names:
                w.write(0, {"original": np.eye(len(names), 4, dtype=np.float32)}, np.arange(len(names)) % 2, names)


def test_a_split_without_images_is_skipped_with_a_warning_and_an_empty_train_split_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    from pipeline.errors import PipelineError

    classes = ["a", "b"]
    items = [sources.Item("a/1", 0, "train", "00"), sources.Item("b/1", 1, "train", "11")]
    write_splits(tmp_path / "one", {"train": ["a/1", "b/1"], "val": [], "test": []}, classes)
    with caplog.at_level("WARNING"):
        assert list(audit.checked_splits(tmp_path / "one", items, classes)) == ["train"]
    assert "the val split has no images: nothing to audit there" in caplog.text
    write_splits(tmp_path / "none", {"train": [], "val": ["a/1", "b/1"], "test": []}, classes)
    in_val = [sources.Item(it.id, it.label, "val", it.key) for it in items]
    with pytest.raises(PipelineError, match="the train split has no images"):
        audit.checked_splits(tmp_path / "none", in_val, classes)
