"""Stage `evaluate`: test-split metrics (scikit-learn) and plots: confusion matrix, ROC and precision-recall curves,
and a contact sheet of the worst-classified test images."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from sklearn import metrics as skm

from pipeline import features, heads, sources
from pipeline.config import DataConfig, load_params, to_dict
from pipeline.errors import PipelineError, run_stage
from pipeline.files import replaced

log = logging.getLogger(__name__)


def compute_metrics(
    probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str], *, top_k: int, val_accuracy: float
) -> dict[str, Any]:
    """Accuracy, top-k accuracy (when there are more than k classes), macro F1 and per-class P/R/F1."""
    pred = probs.argmax(1)
    ids = np.arange(len(class_names))
    test: dict[str, Any] = {"accuracy": float(skm.accuracy_score(labels, pred))}
    if len(class_names) > top_k:
        test[f"top{top_k}_accuracy"] = float(skm.top_k_accuracy_score(labels, probs, k=top_k, labels=ids))
    test["macro_f1"] = float(skm.f1_score(labels, pred, labels=ids, average="macro", zero_division=0))
    precision, recall, f1, support = skm.precision_recall_fscore_support(labels, pred, labels=ids, zero_division=0)
    test["per_class"] = {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(class_names, precision, recall, f1, support, strict=True)
    }
    return {"test": test, "val": {"accuracy": float(val_accuracy)}}


WORST_COUNT = 16


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
    images: list[Image.Image | None] = []
    problem = None
    try:
        reader = sources.ImageReader(cfg)
    except PipelineError as err:
        reader, problem = None, err
    for item_id in ids:
        try:
            images.append(reader(item_id) if reader else None)
        except (PipelineError, *sources.IMAGE_ERRORS) as err:
            images.append(None)
            problem = problem or err
    if problem:
        missing = sum(image is None for image in images)
        log.warning("the contact sheet shows %d of %d images by id only: %s", missing, len(ids), problem)
    return images


def contact_sheet(
    images: Sequence[Image.Image | None], captions: Sequence[str], *, thumb: int = 128, columns: int = 4
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
    from dvclive import Live

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--features", type=Path, required=True, help="directory with val.h5 and test.h5")
    parser.add_argument("--head", type=Path, required=True, help="head file written by train")
    parser.add_argument("--live", type=Path, required=True, help="dvclive directory for metrics and plots")
    args = parser.parse_args()
    params = load_params()
    log.info("evaluate params: %s", to_dict(params.evaluate))
    model, spec = heads.load_head(args.head)
    head_identity = features.identity(spec["provenance"])
    splits = {}
    for split in ("val", "test"):
        path = args.features / f"{split}.h5"
        splits[split] = features.read_features(path)
        features.check_provenance(splits[split].provenance, head_identity, source=path)

    def probabilities(split: str) -> np.ndarray:
        logits = heads.predict_logits(model, torch.from_numpy(splits[split].features["original"]))
        return torch.softmax(logits, 1).numpy()

    class_names = spec["provenance"]["class_names"]
    val_accuracy = skm.accuracy_score(splits["val"].labels, probabilities("val").argmax(1))
    test_probs, test_labels = probabilities("test"), splits["test"].labels
    results = compute_metrics(
        test_probs, test_labels, class_names, top_k=params.evaluate.top_k, val_accuracy=val_accuracy
    )
    log.info("test accuracy %.4f, macro F1 %.4f", results["test"]["accuracy"], results["test"]["macro_f1"])

    test_ids = splits["test"].ids
    worst = worst_classified(test_probs, test_labels, count=WORST_COUNT)
    captions = [
        f"{class_names[test_labels[i]]} -> {class_names[test_probs[i].argmax()]} ({test_probs[i].max():.2f})"
        for i in worst
    ]
    sheet = contact_sheet(test_images(params.data, [test_ids[i] for i in worst]), captions)

    with replaced(args.live) as live_dir, Live(str(live_dir), dvcyaml=False, save_dvc_exp=False) as live:
        live.summary = results
        names = np.asarray(class_names)
        pred = test_probs.argmax(1)
        live.log_sklearn_plot("confusion_matrix", names[test_labels], names[pred], name="confusion_matrix.json")
        y_true, y_score = positive_scores(test_probs, test_labels)
        live.log_sklearn_plot("roc", y_true, y_score, name="roc.json", drop_intermediate=True)
        live.log_sklearn_plot("precision_recall", y_true, y_score, name="precision_recall.json")
        live.log_image("worst_test_images.png", sheet)


if __name__ == "__main__":
    run_stage(main)
