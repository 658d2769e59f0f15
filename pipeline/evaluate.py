"""Stage `evaluate`: test-split metrics (scikit-learn) and plots: confusion matrix, ROC and precision-recall curves,
and a contact sheet of the worst-classified test images; and the training-free k-NN accuracy of the features."""

from __future__ import annotations

import argparse
import csv
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from sklearn import metrics as skm
from tqdm import tqdm

from pipeline import features, heads, knn, pairing, sheets
from pipeline.config import EvaluateConfig, load_params, to_dict, with_dvc_paths
from pipeline.errors import PipelineError, run_stage
from pipeline.files import replaced
from pipeline.hardware import resolve_device
from pipeline.provenance import check_provenance, identity
from pipeline.scores import Scores, balanced_accuracy, compute_metrics, score

log = logging.getLogger(__name__)

WORST_COUNT = 16
PER_CLASS = "per_class.json"  # in the live directory: a plot's data, not a metric
PER_CLASS_TABLE = "per_class.csv"  # every class, whatever their number
PLOTTED_CLASSES = 100  # more classes than this: the plots show the worst this many, the log the worst LOGGED
LOGGED_CLASSES = 30
BLOCK_VALUES = 2**24  # probabilities are made and used a block of rows at a time: 64 MB of float32 at most
KNN_BLOCK_MB = 16  # the training split's rows stream past the k-NN in blocks of about this much float32


def per_class(pred: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support of each class: one record a class, in class order."""
    ids = np.arange(len(class_names))
    precision, recall, f1, support = skm.precision_recall_fscore_support(labels, pred, labels=ids, zero_division=0)
    return [
        {"class": name, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(n)}
        for name, p, r, f, n in zip(class_names, precision, recall, f1, support, strict=True)
    ]


def _worst_first(row: dict[str, Any]) -> tuple[float, str]:
    return row["f1"], row["class"]


def plotted_classes(rows: Sequence[dict[str, Any]]) -> list[int]:
    """The classes of the per-class plot and the confusion matrix: every class in class order up to
    PLOTTED_CLASSES; above, the PLOTTED_CLASSES worst by F1 (ties by name), worst first: DVC's page draws a bar a
    class, and a confusion matrix cell for every pair of classes it shows."""
    if len(rows) <= PLOTTED_CLASSES:
        return list(range(len(rows)))
    return sorted(range(len(rows)), key=lambda i: _worst_first(rows[i]))[:PLOTTED_CLASSES]


def format_per_class(rows: Sequence[dict[str, Any]]) -> str:
    """The per-class records as a text table, worst F1 first; above PLOTTED_CLASSES classes the LOGGED_CLASSES
    worst and a line on the rest."""
    ranked = sorted(rows, key=_worst_first)
    shown = ranked if len(ranked) <= PLOTTED_CLASSES else ranked[:LOGGED_CLASSES]
    width = max([len(r["class"]) for r in shown] + [5])
    lines = [f"{'class':<{width}}  precision  recall      f1  support"]
    for r in shown:
        lines.append(
            f"{r['class']:<{width}}  {r['precision']:>9.3f}  {r['recall']:>6.3f}  {r['f1']:>6.3f}  {r['support']:>7d}"
        )
    if len(shown) < len(ranked):
        median = float(np.median([r["f1"] for r in ranked]))
        lines.append(
            f"... and {len(ranked) - len(shown):,} more classes; median F1 of all {len(ranked):,} classes "
            f"{median:.3f} (every class in {PER_CLASS_TABLE})"
        )
    return "\n".join(lines)


def worst_classified(true_prob: np.ndarray, *, count: int) -> list[int]:
    """Test rows by descending loss (lowest probability on the true class), misclassified or not."""
    return np.argsort(true_prob, kind="stable")[:count].tolist()


def knn_classes(
    cfg: EvaluateConfig, train_path: Path, test: features.FeatureSet, *, expected: dict[str, Any], device: torch.device
) -> np.ndarray | None:
    """The k-NN class of each test row on the training split's original view (never its flipped copies), read a
    block at a time; None when evaluate.knn_k is 0. ``expected``: the features' identity."""
    if cfg.knn_k == 0:
        return None
    reader = features.BlockReader(train_path, block_mb=KNN_BLOCK_MB, views=["original"])
    check_provenance(reader.provenance, expected, source=train_path)
    steps = tqdm(range(reader.num_blocks), desc="k-NN on the train split", unit="block", disable=reader.num_blocks < 8)
    return knn.knn_predict(
        (reader.read(b) for b in steps), test.features["original"], k=cfg.knn_k, temperature=cfg.knn_temperature,
        device=device,
    )  # fmt: skip


def knn_metrics(
    cfg: EvaluateConfig, train_path: Path, test: features.FeatureSet, *, expected: dict[str, Any], device: torch.device
) -> dict[str, float]:
    """``knn_acc``, the test split's k-NN accuracy (knn_classes); none when evaluate.knn_k is 0."""
    pred = knn_classes(cfg, train_path, test, expected=expected, device=device)
    return {} if pred is None else {"knn_acc": float(np.mean(pred == test.labels))}


def write_predictions(
    path: Path,
    test: features.FeatureSet,
    keys: Sequence[str],
    scores: Scores,
    knn_pred: np.ndarray | None,
    class_names: Sequence[str],
) -> None:
    """One row per test image, for paired comparisons across revisions (pipeline.compare): its id and content key
    (what pairs the images of two runs), label and predicted class, the probabilities of both, and whether the
    k-NN classifier got it right (empty when evaluate.knn_k is 0)."""
    knn_right = [""] * len(test.ids) if knn_pred is None else (knn_pred == test.labels).astype(int).tolist()
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(pairing.COLUMNS)
        for i, item_id in enumerate(test.ids):
            writer.writerow([
                item_id, keys[i], class_names[test.labels[i]], class_names[scores.pred[i]],
                f"{scores.true_prob[i]:.6g}", f"{scores.pred_prob[i]:.6g}", knn_right[i],
            ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--features", type=Path, help="directory with val.h5 and test.h5")
    parser.add_argument("--head", type=Path, help="head file written by train")
    parser.add_argument("--audit", type=Path, help="the audit stage's directory: its leaks")
    parser.add_argument("--live", type=Path, help="dvclive directory for metrics and plots")
    args = with_dvc_paths(parser.parse_args(), features="features", head="head", audit="audit", live="evaluate_live")
    params = load_params()
    log.info("evaluate params: %s", to_dict(params.evaluate))
    model, spec = heads.load_head(args.head)
    val, test = (_read_split(args.features / f"{split}.h5", spec) for split in ("val", "test"))
    class_names = spec["provenance"]["class_names"]
    val_pred = np.concatenate([probs.argmax(1) for probs in _probabilities(model, val, len(class_names))])
    test_probs = _probabilities(model, test, len(class_names))
    scores = score(test_probs, test.labels, top_k=params.evaluate.top_k, seed=params.seed)
    val_accuracy = skm.accuracy_score(val.labels, val_pred)
    results = compute_metrics(scores, test.labels, val_accuracy=val_accuracy, seed=params.seed)
    leaked = np.isin(test.ids, sorted(leaks(args.audit / "issues.csv")))
    results["acc_unseen"] = float(np.mean(scores.pred[~leaked] == test.labels[~leaked])) if (~leaked).any() else 0.0
    expected = identity(spec["provenance"])
    device = resolve_device(params.train.device)
    knn_pred = knn_classes(params.evaluate, args.features / "train.h5", test, expected=expected, device=device)
    if knn_pred is not None:
        results["knn_acc"] = float(np.mean(knn_pred == test.labels))
    classes = per_class(scores.pred, test.labels, class_names)
    log.info(
        "test accuracy %.4f (95%% interval %.4f to %.4f over %d images), macro F1 %.4f, balanced accuracy %.4f",
        results["accuracy"], results["acc_lo"], results["acc_hi"], len(test.labels), results["macro_f1"],
        balanced_accuracy(scores.pred, test.labels),
    )  # fmt: skip
    log.info(
        "test accuracy without the %d test images that have a near-duplicate in train (the audit's leaks): %.4f",
        int(leaked.sum()), results["acc_unseen"],
    )  # fmt: skip
    if "knn_acc" in results:
        log.info(
            "k-NN accuracy %.4f (k = %d, T = %g, cosine similarity to the train split's rows, on %s)",
            results["knn_acc"], params.evaluate.knn_k, params.evaluate.knn_temperature, device,
        )  # fmt: skip
    log.info("per class (test split), worst F1 first:\n%s", format_per_class(classes))
    if scores.one_in > 1:
        log.info(
            "ROC and precision-recall curves from every positive (image, class) pair and 1 in %d of the negative "
            "ones, each weighted %d: %s of %s pairs", scores.one_in, scores.one_in, f"{len(scores.y_true):,}",
            f"{len(test.labels) * len(class_names):,}",
        )  # fmt: skip
    worst = worst_classified(scores.true_prob, count=WORST_COUNT)
    captions = [
        f"{class_names[test.labels[i]]} -> {class_names[scores.pred[i]]} ({scores.pred_prob[i]:.2f})" for i in worst
    ]
    sheet = sheets.contact_sheet(sheets.images(params.data, [test.ids[i] for i in worst]), captions)
    with replaced(args.live) as live_dir:
        _write_outputs(live_dir, results, classes, scores, test.labels, class_names=class_names, sheet=sheet)
        keys = features.read_keys(args.features / "test.h5")
        write_predictions(live_dir / pairing.PREDICTIONS, test, keys, scores, knn_pred, class_names)


def leaks(issues: Path) -> set[str]:
    """The ids of the test images that the audit found with a near-duplicate in train."""
    if not issues.is_file():
        raise PipelineError(f"{issues} not found: run the audit stage first (dvc repro audit)")
    with open(issues, newline="", encoding="utf-8") as f:
        return {row["id"] for row in csv.DictReader(f) if row["kind"] == "leak" and row["split"] == "test"}


def _read_split(path: Path, spec: dict[str, Any]) -> features.FeatureSet:
    split = features.read_features(path)
    check_provenance(split.provenance, identity(spec["provenance"]), source=path)
    return split


def _probabilities(model: heads.Classifier, split: features.FeatureSet, num_classes: int) -> Iterator[np.ndarray]:
    """The split's class probabilities in (rows, C) float32 blocks of at most BLOCK_VALUES values and 4096 rows,
    predict_logits' batch: up to 4096 classes the model sees the batches of one call on the whole split."""
    x = split.features["original"]
    rows = max(1, min(4096, BLOCK_VALUES // num_classes))
    starts = range(0, len(x), rows)
    for start in tqdm(starts, desc=f"{split.provenance['split']} split", unit="block", disable=len(starts) < 8):
        logits = heads.predict_logits(model, torch.from_numpy(x[start : start + rows]), batch_size=rows)
        yield torch.softmax(logits, 1).numpy()


def _write_outputs(
    live_dir: Path,
    results: dict[str, float],
    classes: list[dict[str, Any]],
    scores: Scores,
    labels: np.ndarray,
    *,
    class_names: Sequence[str],
    sheet: Image.Image,
) -> None:
    """metrics.json, the plots in dvclive's layout, and per_class.json and .csv, under ``live_dir``."""
    from dvclive import Live

    shown = plotted_classes(classes)
    with Live(str(live_dir), dvcyaml=False, save_dvc_exp=False) as live:
        live.summary = results
        names, images = np.asarray(class_names), np.isin(labels, shown)  # the test images of the classes shown
        live.log_sklearn_plot(
            "confusion_matrix", names[labels[images]], names[scores.pred[images]], name="confusion_matrix.json"
        )
        pairs = scores.y_true, scores.y_score
        live.log_sklearn_plot("roc", *pairs, name="roc.json", drop_intermediate=True, sample_weight=scores.weight)
        # sampled pairs: about MAX_PAIRS distinct scores, a point each; drop_intermediate keeps two per positive
        live.log_sklearn_plot(
            "precision_recall", *pairs, name="precision_recall.json", sample_weight=scores.weight,
            drop_intermediate=scores.one_in > 1,
        )  # fmt: skip
        live.log_image("worst_test_images.png", sheet)
    (live_dir / PER_CLASS).write_text(json.dumps([classes[i] for i in shown], indent=1) + "\n")
    with open(live_dir / PER_CLASS_TABLE, "w", newline="", encoding="utf-8") as f:
        table = csv.DictWriter(f, fieldnames=["class", "precision", "recall", "f1", "support"])
        table.writeheader()
        table.writerows(classes)


if __name__ == "__main__":
    run_stage(main)
