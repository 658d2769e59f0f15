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
    m = compute_metrics(probs, labels, ["a", "b", "c"], top_k=2, val_accuracy=0.5)
    assert m["test"]["accuracy"] == 0.75
    assert m["test"]["top2_accuracy"] == 1.0  # sample 1 has its label second
    assert m["test"]["per_class"]["b"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert m["test"]["per_class"]["c"]["precision"] == 0.5
    assert m["test"]["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert m["val"] == {"accuracy": 0.5}


def test_top_k_is_left_out_when_there_are_not_more_classes_than_k():
    m = compute_metrics(np.eye(3), np.arange(3), ["a", "b", "c"], top_k=5, val_accuracy=1.0)
    assert not any(key.startswith("top") for key in m["test"])


def _train(project: Path) -> None:
    write_blob_features(project / "data" / "features")
    write_params(project, {"train": {"epochs": 5, "device": "cpu"}})
    run_stage(project, "train")


def test_evaluate_stage_writes_metrics_and_a_named_confusion_matrix(project: Path):
    _train(project)
    run_stage(project, "evaluate")
    metrics = json.loads((project / "reports" / "evaluate" / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] > 0.9 and set(metrics["test"]["per_class"]) == {"a", "b", "c"}
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
