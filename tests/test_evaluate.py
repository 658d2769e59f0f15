from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn import metrics as skm

from pipeline import evaluate, features, heads, sheets
from pipeline.config import parse_params
from pipeline.scores import balanced_accuracy, compute_metrics, score
from tests.conftest import (
    copy_project,
    made_once,
    metrics_of,
    random_problem,
    run_stage,
    write_blob_features,
    write_params,
)


def test_metrics_are_scikit_learn_values_on_a_worked_example():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.2, 0.5, 0.3], [0.3, 0.3, 0.4]])
    labels = np.array([0, 1, 1, 2])  # predictions 0, 2, 1, 2: three of four right
    m = metrics_of(probs, labels)
    assert m["accuracy"] == 0.75
    assert m["top2"] == 1.0  # sample 1 has its label second
    assert m["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert balanced_accuracy(probs.argmax(1), labels) == pytest.approx((1 + 0.5 + 1) / 3)  # the log's: mean recall
    assert m["val_acc"] == 0.5
    rows = {r["class"]: r for r in evaluate.per_class(probs.argmax(1), labels, ["a", "b", "c"])}
    assert rows["b"] == {"class": "b", "precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert rows["c"]["precision"] == 0.5


def test_the_per_class_table_lists_the_worst_f1_first():
    rows = [{"class": "cat", "precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 3}]
    rows.append({"class": "dog", "precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 3})
    lines = evaluate.format_per_class(rows).splitlines()
    assert lines[0].split() == ["class", "precision", "recall", "f1", "support"]
    assert lines[1].split() == ["dog", "0.500", "1.000", "0.667", "3"] and lines[2].startswith("cat")


def test_probabilities_come_in_blocks_of_bounded_size(monkeypatch: pytest.MonkeyPatch):
    torch.manual_seed(0)
    x = torch.randn(9000, 8)
    model = heads.Classifier(torch.nn.Linear(8, 10), torch.zeros(8), torch.ones(8))
    split = features.FeatureSet({"original": x.numpy()}, np.zeros(9000, dtype=np.int64), [], {"split": "test"})
    whole = torch.softmax(heads.predict_logits(model, x), 1).numpy()
    blocks = list(evaluate._probabilities(model, split, 10))
    assert [len(b) for b in blocks] == [4096, 4096, 808]  # predict_logits' batches: the same numbers
    np.testing.assert_array_equal(np.concatenate(blocks), whole)
    monkeypatch.setattr(evaluate, "BLOCK_VALUES", 10 * 1000)
    blocks = list(evaluate._probabilities(model, split, 10))
    assert {len(b) for b in blocks[:-1]} == {1000}
    np.testing.assert_allclose(np.concatenate(blocks), whole, rtol=1e-6)


def per_class_rows(classes: int) -> list[dict]:
    """Per-class records with F1 falling with the class number and every fifth class tied at 0."""
    return [
        {"class": f"c{i:03d}", "precision": 0.5, "recall": 0.5, "f1": 0.0 if i % 5 == 0 else 1 - i / classes,
         "support": 3}
        for i in range(classes)
    ]  # fmt: skip


def test_above_100_classes_the_plot_shows_the_100_worst_by_f1_ties_by_name():
    rows = per_class_rows(250)
    shown = evaluate.plotted_classes(rows)
    assert [rows[i]["class"] for i in shown[:50]] == [f"c{i:03d}" for i in range(0, 250, 5)]  # F1 0, by name
    assert [rows[i]["f1"] for i in shown[50:]] == sorted(rows[i]["f1"] for i in range(250) if i % 5)[:50]


def test_above_100_classes_the_log_table_shows_the_30_worst_and_a_line_on_the_rest():
    rows = per_class_rows(250)
    lines = evaluate.format_per_class(rows).splitlines()
    worst = [f"c{i:03d}" for i in range(0, 150, 5)]  # F1 0, by name
    assert len(lines) == 1 + 30 + 1 and [line.split()[0] for line in lines[1:31]] == worst
    median = np.median([r["f1"] for r in rows])
    assert lines[-1] == f"... and 220 more classes; median F1 of all 250 classes {median:.3f}" + (
        " (every class in per_class.csv)"
    )


def test_up_to_100_classes_the_plot_and_the_log_show_every_class():
    rows = per_class_rows(100)
    assert evaluate.plotted_classes(rows) == list(range(100))
    assert len(evaluate.format_per_class(rows).splitlines()) == 101


@pytest.mark.parametrize("classes", [3, 150])
def test_the_outputs_keep_every_class_in_the_table_and_the_worst_in_the_plots(tmp_path: Path, classes: int):
    rng = np.random.default_rng(0)
    probs, labels = random_problem(rng, 4 * classes, classes)
    names = [f"k{i:03d}" for i in range(classes)]
    scores = score([probs], labels, top_k=5, seed=0)
    rows = evaluate.per_class(scores.pred, labels, names)
    results = compute_metrics(scores, labels, val_accuracy=0.5, seed=0)
    evaluate._write_outputs(tmp_path, results, rows, scores, labels, class_names=names, sheet=Image.new("RGB", (4, 4)))
    with open(tmp_path / "per_class.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["class"] for r in table] == names and float(table[-1]["f1"]) == rows[-1]["f1"]
    plotted = json.loads((tmp_path / "per_class.json").read_text())
    cells = json.loads((tmp_path / "plots" / "sklearn" / "confusion_matrix.json").read_text())
    if classes <= 100:  # every class in class order, every test image
        assert plotted == rows and len(cells) == len(labels)
    else:  # the 100 worst, worst first, and the test images of those classes
        assert plotted == sorted(rows, key=lambda r: (r["f1"], r["class"]))[:100]
        assert {c["actual"] for c in cells} == {r["class"] for r in plotted}
        assert len(cells) == sum(names[label] in {r["class"] for r in plotted} for label in labels)


def test_sampled_curves_are_written_with_their_weights_and_fewer_points(tmp_path: Path):
    probs, labels = random_problem(np.random.default_rng(1), 1000, 200)
    scores = score(np.array_split(probs, 3), labels, top_k=5, seed=0, max_pairs=20_000)
    assert scores.one_in > 1
    names = [f"k{i:03d}" for i in range(200)]
    rows = evaluate.per_class(scores.pred, labels, names)
    evaluate._write_outputs(tmp_path, {}, rows, scores, labels, class_names=names, sheet=Image.new("RGB", (4, 4)))
    roc = json.loads((tmp_path / "plots" / "sklearn" / "roc.json").read_text())["roc"]
    fpr, tpr, _ = skm.roc_curve(scores.y_true, scores.y_score, sample_weight=scores.weight, drop_intermediate=True)
    assert [p["fpr"] for p in roc] == fpr.tolist() and [p["tpr"] for p in roc] == tpr.tolist()
    pr = json.loads((tmp_path / "plots" / "sklearn" / "precision_recall.json").read_text())["precision_recall"]
    assert len(pr) <= 2 * 1000 + 2 < len(scores.y_true)  # at most the two ends of each step in recall


def test_the_worst_classified_are_the_lowest_true_class_probabilities_first_row_first_on_ties():
    assert evaluate.worst_classified(np.array([0.5, 0.1, 0.9, 0.1], dtype=np.float32), count=3) == [1, 3, 0]


@pytest.fixture(scope="session")
def trained_template(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """A project with blob features and the head that the train stage fits on them (once for the run)."""

    def make(dest: Path) -> None:
        project = copy_project(dest)
        write_blob_features(project / "data" / "features")
        write_params(project, {"train": {"epochs": 5, "device": "cpu"}})
        run_stage(project, "train")

    return made_once(tmp_path_factory, worker_id, "trained", make)


@pytest.fixture
def trained(trained_template: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained_template, tmp_path / "project", symlinks=True))


def _audited(project: Path, leaked: list[str]) -> None:
    """An audit's issues.csv with ``leaked`` test ids as leaks, and a label finding that is no leak."""
    audit_dir = project / "reports" / "audit"
    audit_dir.mkdir(parents=True, exist_ok=True)
    rows = [f"{i},,,test,a,leak,1,train/x,,train," for i in leaked] + ["digits/0001,,,test,a,label,0.9,,,,b"]
    header = "id,key,path,split,label,kind,score,other_id,other_path,other_split,suggested"
    (audit_dir / "issues.csv").write_text("\n".join([header, *rows]) + "\n")


def test_evaluate_stage_writes_metrics_per_class_results_and_a_named_confusion_matrix(trained: Path):
    project = trained
    test_ids = features.read_ids(project / "data" / "features" / "test.h5")
    _audited(project, test_ids[:30])  # a third of the test images
    result = run_stage(project, "evaluate")
    metrics = json.loads((project / "reports" / "evaluate" / "metrics.json").read_text())
    assert metrics["accuracy"] > 0.9 and len(metrics) == 7  # 3 classes: no top-5
    assert "without the 30 test images that have a near-duplicate in train" in result.stderr
    assert 0.9 < metrics["acc_unseen"] <= 1.0
    with open(project / "reports" / "evaluate" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == test_ids and rows[1]["key"] == f"{181:032x}"  # test: images 180 to 269
    assert np.mean([r["label"] == r["predicted"] for r in rows]) == pytest.approx(metrics["accuracy"])
    assert np.mean([int(r["knn_correct"]) for r in rows]) == pytest.approx(metrics["knn_acc"])
    assert all(float(r["p_predicted"]) >= float(r["p_label"]) for r in rows)
    assert metrics["knn_acc"] > 0.9 and "k-NN accuracy" in result.stderr
    rows = json.loads((project / "reports" / "evaluate" / "per_class.json").read_text())
    assert [r["class"] for r in rows] == ["a", "b", "c"] and sum(r["support"] for r in rows) == 90
    table = (project / "reports" / "evaluate" / "per_class.csv").read_text().splitlines()
    assert table[0] == "class,precision,recall,f1,support" and [line[0] for line in table[1:]] == ["a", "b", "c"]
    assert "per class (test split), worst F1 first" in result.stderr
    cells = json.loads((project / "reports" / "evaluate" / "plots" / "sklearn" / "confusion_matrix.json").read_text())
    assert len(cells) == 90 and {c["actual"] for c in cells} == {"a", "b", "c"}


def test_evaluate_stage_refuses_features_from_another_class_list(trained: Path):
    project = trained
    _audited(project, [])
    write_blob_features(project / "data" / "features", class_names=["a", "b", "z"])
    result = run_stage(project, "evaluate", check=False)
    assert result.returncode == 2
    assert "made with class_names = ['a', 'b', 'z'], but ['a', 'b', 'c'] is asked for" in result.stderr


def test_the_contact_sheet_shows_missing_images_by_id(tmp_path: Path):
    cfg = parse_params({"data": {"source": "imagefolder", "root": str(tmp_path / "gone")}}).data
    images = sheets.images(cfg, ["cat/001.png", "dog/002.png"])
    assert images == [None, None]
    sheet = sheets.contact_sheet(images, ["cat -> dog (0.90)", "dog -> cat (0.80)"], thumb=64, columns=2)
    assert sheet.size == (128, 64 + 14)
