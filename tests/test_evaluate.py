from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline import evaluate
from pipeline.config import parse_params
from pipeline.evaluate import compute_metrics
from tests.conftest import run_stage, write_blob_features, write_params


def test_metrics_are_scikit_learn_values_on_a_worked_example():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.2, 0.5, 0.3], [0.3, 0.3, 0.4]])
    labels = np.array([0, 1, 1, 2])  # predictions 0, 2, 1, 2: three of four right
    m = compute_metrics(probs, labels, top_k=2, val_accuracy=0.5, seed=0)
    assert m["accuracy"] == 0.75
    assert m["top2"] == 1.0  # sample 1 has its label second
    assert m["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert m["bal_acc"] == pytest.approx((1 + 0.5 + 1) / 3)  # mean recall per class
    assert m["val_acc"] == 0.5
    rows = {r["class"]: r for r in evaluate.per_class(probs, labels, ["a", "b", "c"])}
    assert rows["b"] == {"class": "b", "precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert rows["c"]["precision"] == 0.5


@pytest.mark.parametrize("classes", [3, 100])
def test_the_metric_keys_are_the_same_for_3_or_100_classes(classes: int):
    rng = np.random.default_rng(0)
    labels = np.arange(4 * classes) % classes
    m = compute_metrics(rng.dirichlet(np.ones(classes), len(labels)), labels, top_k=2, val_accuracy=0.5, seed=0)
    assert list(m) == ["accuracy", "acc_lo", "acc_hi", "top2", "macro_f1", "bal_acc", "val_acc"]


def test_the_accuracy_interval_is_a_seeded_bootstrap_that_narrows_with_more_images():
    rng = np.random.default_rng(1)
    small, large = rng.random(360) < 0.9, rng.random(3600) < 0.9
    low, high = evaluate.accuracy_interval(small, seed=0)
    assert low < small.mean() < high and (low, high) == evaluate.accuracy_interval(small, seed=0)
    assert high - low == pytest.approx(2 * 1.96 * np.sqrt(0.9 * 0.1 / 360), rel=0.2)  # the normal approximation
    assert np.subtract(*evaluate.accuracy_interval(large, seed=0)[::-1]) < (high - low) / 2
    assert evaluate.accuracy_interval(np.ones(50, dtype=bool), seed=0) == (1.0, 1.0)


def test_top_k_is_left_out_when_there_are_not_more_classes_than_k():
    m = compute_metrics(np.eye(3), np.arange(3), top_k=5, val_accuracy=1.0, seed=0)
    assert not any(key.startswith("top") for key in m)


def test_the_per_class_table_lists_the_worst_f1_first():
    rows = [{"class": "cat", "precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 3}]
    rows.append({"class": "dog", "precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 3})
    lines = evaluate.format_per_class(rows).splitlines()
    assert lines[0].split() == ["class", "precision", "recall", "f1", "support"]
    assert lines[1].split() == ["dog", "0.500", "1.000", "0.667", "3"] and lines[2].startswith("cat")


def _train(project: Path) -> None:
    write_blob_features(project / "data" / "features")
    write_params(project, {"train": {"epochs": 5, "device": "cpu"}})
    run_stage(project, "train")


def test_evaluate_stage_writes_metrics_per_class_results_and_a_named_confusion_matrix(project: Path):
    _train(project)
    result = run_stage(project, "evaluate")
    metrics = json.loads((project / "reports" / "evaluate" / "metrics.json").read_text())
    assert metrics["accuracy"] > 0.9 and len(metrics) == 6  # 3 classes: no top-5
    rows = json.loads((project / "reports" / "evaluate" / "per_class.json").read_text())
    assert [r["class"] for r in rows] == ["a", "b", "c"] and sum(r["support"] for r in rows) == 90
    assert "per class (test split), worst F1 first" in result.stderr
    cells = json.loads((project / "reports" / "evaluate" / "plots" / "sklearn" / "confusion_matrix.json").read_text())
    assert len(cells) == 90 and {c["actual"] for c in cells} == {"a", "b", "c"}


def test_evaluate_stage_refuses_features_from_another_class_list(project: Path):
    _train(project)
    write_blob_features(project / "data" / "features", class_names=["a", "b", "z"])
    result = run_stage(project, "evaluate", check=False)
    assert result.returncode == 2
    assert "made with class_names = ['a', 'b', 'z'], but ['a', 'b', 'c'] is asked for" in result.stderr


def test_the_contact_sheet_shows_missing_images_by_id(tmp_path: Path):
    cfg = parse_params({"data": {"source": "imagefolder", "root": str(tmp_path / "gone")}}).data
    images = evaluate.test_images(cfg, ["cat/001.png", "dog/002.png"])
    assert images == [None, None]
    sheet = evaluate.contact_sheet(images, ["cat -> dog (0.90)", "dog -> cat (0.80)"], thumb=64, columns=2)
    assert sheet.size == (128, 64 + 14)
