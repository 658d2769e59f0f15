"""Stage `evaluate`: test-split metrics (scikit-learn) and plots: confusion matrix, ROC and precision-recall curves,
and a contact sheet of the worst-classified test images."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from scipy import stats
from sklearn import metrics as skm

from pipeline import features, heads, sources
from pipeline.config import DataConfig, load_params, to_dict, with_dvc_paths
from pipeline.errors import PipelineError, run_stage
from pipeline.files import replaced
from pipeline.images import IMAGE_ERRORS

log = logging.getLogger(__name__)

THUMB = 128  # contact-sheet tile side, pixels


def compute_metrics(
    probs: np.ndarray, labels: np.ndarray, *, top_k: int, val_accuracy: float, seed: int
) -> dict[str, float]:
    """The headline numbers, flat and short-named (``dvc metrics show`` prints every key of every metrics file
    in one line): test accuracy with its 95% bootstrap interval, top-k accuracy (when there are more than k
    classes), macro F1, balanced accuracy, and validation accuracy."""
    pred = probs.argmax(1)
    ids = np.arange(probs.shape[1])
    low, high = accuracy_interval(pred == labels, seed=seed)
    metrics = {"accuracy": float(skm.accuracy_score(labels, pred)), "acc_lo": low, "acc_hi": high}
    if probs.shape[1] > top_k:
        metrics[f"top{top_k}"] = float(skm.top_k_accuracy_score(labels, probs, k=top_k, labels=ids))
    metrics["macro_f1"] = float(skm.f1_score(labels, pred, labels=ids, average="macro", zero_division=0))
    metrics["bal_acc"] = float(skm.balanced_accuracy_score(labels, pred))
    return metrics | {"val_acc": float(val_accuracy)}


BOOTSTRAP_RESAMPLES = 2000


def accuracy_interval(correct: np.ndarray, *, seed: int) -> tuple[float, float]:
    """95% interval of the accuracy, percentile bootstrap over the test images (seeded: the same run gives the
    same interval). On 360 images it is about ±2 points at 96%: heads closer than that are not told apart."""
    if correct.all() or not correct.any():  # every resample gives the same accuracy
        return (float(correct.mean()),) * 2
    result = stats.bootstrap(
        (correct.astype(np.float64),), np.mean, n_resamples=BOOTSTRAP_RESAMPLES, method="percentile",
        batch=200, rng=np.random.default_rng(seed),  # batch: 200 resamples at a time, not 2000 x N floats
    )  # fmt: skip
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def per_class(probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support of each class: one record a class, as DVC's bar plots read them."""
    ids = np.arange(len(class_names))
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        labels, probs.argmax(1), labels=ids, zero_division=0
    )
    return [
        {"class": name, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(n)}
        for name, p, r, f, n in zip(class_names, precision, recall, f1, support, strict=True)
    ]


def format_per_class(rows: Sequence[dict[str, Any]]) -> str:
    """The per-class records as a text table, worst F1 first."""
    width = max([len(r["class"]) for r in rows] + [5])
    lines = [f"{'class':<{width}}  precision  recall      f1  support"]
    for r in sorted(rows, key=lambda r: (r["f1"], r["class"])):
        lines.append(
            f"{r['class']:<{width}}  {r['precision']:>9.3f}  {r['recall']:>6.3f}  {r['f1']:>6.3f}  {r['support']:>7d}"
        )
    return "\n".join(lines)


WORST_COUNT = 16
PER_CLASS = "per_class.json"  # in the live directory: a plot's data, not a metric


def positive_scores(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(is positive, score) pairs for ROC and precision-recall curves: the second class's probability for two
    classes; for more, every (image, class) pair one-vs-rest, which gives the micro-averaged curves."""
    probs = probs.astype(np.float64)  # dvclive writes the thresholds with json, which refuses float32
    if probs.shape[1] == 2:
        return labels == 1, probs[:, 1]
    onehot = np.eye(probs.shape[1], dtype=bool)[labels]
    return onehot.ravel(), probs.ravel()


def worst_classified(probs: np.ndarray, labels: np.ndarray, *, count: int) -> list[int]:
    """Test rows by descending loss (lowest probability on the true class), misclassified or not."""
    return np.argsort(probs[np.arange(len(labels)), labels], kind="stable")[:count].tolist()


def test_images(cfg: DataConfig, ids: Sequence[str]) -> list[Image.Image | None]:
    """The images of ``ids``, or None for those not at hand: a clone that pulled the features and not the
    images still evaluates (the features already change whenever an image does)."""
    found: list[Image.Image | None] = []
    problem = None
    try:
        reader = sources.ImageReader(cfg, reduce_for=THUMB)  # a photo decodes at a fraction of its size
    except PipelineError as err:
        reader, problem = None, err
    for item_id in ids:
        try:
            found.append(reader(item_id) if reader else None)
        except (PipelineError, *IMAGE_ERRORS) as err:
            found.append(None)
            problem = problem or err
    if problem:
        missing = sum(image is None for image in found)
        log.warning("the contact sheet shows %d of %d images by id only: %s", missing, len(ids), problem)
    return found


def contact_sheet(
    images: Sequence[Image.Image | None], captions: Sequence[str], *, thumb: int = THUMB, columns: int = 4
) -> Image.Image:
    """A grid of thumbnails, each with its caption underneath; a missing image is a grey tile with its caption."""
    rows = max(1, -(-len(images) // columns))
    caption_h = 14
    sheet = Image.new("RGB", (columns * thumb, rows * (thumb + caption_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (image, caption) in enumerate(zip(images, captions, strict=True)):
        x, y = (i % columns) * thumb, (i // columns) * (thumb + caption_h)
        if image is None:
            draw.rectangle((x + 1, y + 1, x + thumb - 2, y + thumb - 2), fill="lightgrey")
            draw.text((x + 6, y + thumb // 2 - 6), "image not here", fill="black")
            draw.text((x + 2, y + thumb + 1), caption, fill="black")
            continue
        k = thumb / max(image.size)  # tiny images (8x8 digits) are scaled up with their pixels kept sharp
        size = (max(1, round(image.width * k)), max(1, round(image.height * k)))
        small = image.resize(size, Image.NEAREST if k > 1 else Image.BILINEAR)
        sheet.paste(small, (x + (thumb - small.width) // 2, y + (thumb - small.height) // 2))
        draw.text((x + 2, y + thumb + 1), caption, fill="black")
    return sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--features", type=Path, help="directory with val.h5 and test.h5")
    parser.add_argument("--head", type=Path, help="head file written by train")
    parser.add_argument("--live", type=Path, help="dvclive directory for metrics and plots")
    args = with_dvc_paths(parser.parse_args(), features="features", head="head", live="evaluate_live")
    params = load_params()
    log.info("evaluate params: %s", to_dict(params.evaluate))
    model, spec = heads.load_head(args.head)
    val, test = (_read_split(args.features / f"{split}.h5", spec) for split in ("val", "test"))
    val_probs, test_probs = _probabilities(model, val), _probabilities(model, test)
    class_names = spec["provenance"]["class_names"]
    results = compute_metrics(
        test_probs, test.labels, top_k=params.evaluate.top_k, seed=params.seed,
        val_accuracy=skm.accuracy_score(val.labels, val_probs.argmax(1)),
    )  # fmt: skip
    classes = per_class(test_probs, test.labels, class_names)
    log.info(
        "test accuracy %.4f (95%% interval %.4f to %.4f over %d images), macro F1 %.4f, balanced accuracy %.4f",
        results["accuracy"], results["acc_lo"], results["acc_hi"], len(test.labels), results["macro_f1"],
        results["bal_acc"],
    )  # fmt: skip
    log.info("per class (test split), worst F1 first:\n%s", format_per_class(classes))
    worst = worst_classified(test_probs, test.labels, count=WORST_COUNT)
    captions = [
        f"{class_names[test.labels[i]]} -> {class_names[test_probs[i].argmax()]} ({test_probs[i].max():.2f})"
        for i in worst
    ]
    sheet = contact_sheet(test_images(params.data, [test.ids[i] for i in worst]), captions)
    with replaced(args.live) as live_dir:
        _write_outputs(live_dir, results, classes, test_probs, test.labels, class_names=class_names, sheet=sheet)


def _read_split(path: Path, spec: dict[str, Any]) -> features.FeatureSet:
    split = features.read_features(path)
    features.check_provenance(split.provenance, features.identity(spec["provenance"]), source=path)
    return split


def _probabilities(model: heads.Classifier, split: features.FeatureSet) -> np.ndarray:
    return torch.softmax(heads.predict_logits(model, torch.from_numpy(split.features["original"])), 1).numpy()


def _write_outputs(
    live_dir: Path,
    results: dict[str, float],
    classes: list[dict[str, Any]],
    probs: np.ndarray,
    labels: np.ndarray,
    *,
    class_names: Sequence[str],
    sheet: Image.Image,
) -> None:
    """metrics.json, per_class.json and the plots, in dvclive's layout under ``live_dir``."""
    from dvclive import Live

    with Live(str(live_dir), dvcyaml=False, save_dvc_exp=False) as live:
        live.summary = results
        names = np.asarray(class_names)
        live.log_sklearn_plot("confusion_matrix", names[labels], names[probs.argmax(1)], name="confusion_matrix.json")
        y_true, y_score = positive_scores(probs, labels)
        live.log_sklearn_plot("roc", y_true, y_score, name="roc.json", drop_intermediate=True)
        live.log_sklearn_plot("precision_recall", y_true, y_score, name="precision_recall.json")
        live.log_image("worst_test_images.png", sheet)
    (live_dir / PER_CLASS).write_text(json.dumps(classes, indent=1) + "\n")


if __name__ == "__main__":
    run_stage(main)
