"""Learning curves on cached features: how the test accuracy grows with the labelled training images per class.

Each point takes n training images of every class (all of a class's images when it has fewer, and all of them for
n = ALL), fits a head on them alone, standardised by their own statistics, and scores it on the test split beside
the k-NN classifier of the same images (pipeline.knn). Draw s ranks each class's images by a hash of the class,
the image's id, the params seed and s (pipeline.splits.position) and takes the first n: a draw is stable (an image
added to the folder moves no other), the draws are independent of each other, and each draw's subsets are nested
(its 4 images of a class are among its 8), so that its curve rises by the images added, not by a new subset.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from pipeline import heads, knn, splits
from pipeline.config import CurveConfig, EvaluateConfig, TrainConfig
from pipeline.features import FeatureSet

log = logging.getLogger(__name__)

ALL = 0  # curve.shots: every training image of each class
COLUMNS = ("n", "per_class", "images", "short_classes", "acc_mean", "acc_std", "acc_min", "acc_max", "knn_mean",
           "knn_std")  # fmt: skip

# (rows, D) standardised training features and labels, validation ones likewise -> a module from standardised
# features to (rows, C) logits, on the CPU
Fit = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], nn.Module]


def ranking(ids: Sequence[str], labels: np.ndarray, class_names: Sequence[str], *, seed: int, draw: int) -> np.ndarray:
    """The training rows in the order of draw ``draw``: by class, and within a class by the hash of its class
    name, its id, ``seed`` and the draw."""
    u = [splits.position(class_names[c], i, seed, f"curve {draw}") for i, c in zip(ids, labels.tolist(), strict=True)]
    return np.lexsort((np.asarray(u), labels))


def subset(ranked: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` rows of each class in ``ranked`` (a ranking), all of a class's rows when it has fewer, and
    every row for n = ALL; ascending."""
    if n == ALL:
        return np.sort(ranked)
    y = labels[ranked]  # sorted: the ranking is by class first
    place = np.arange(len(y)) - np.searchsorted(y, y)  # each row's place within its class
    return np.sort(ranked[place < n])


def short_classes(labels: np.ndarray, n: int) -> int:
    """The classes with fewer than ``n`` training images (none for n = ALL)."""
    return 0 if n == ALL else int((np.unique(labels, return_counts=True)[1] < n).sum())


def head_fit(cfg: TrainConfig, *, num_classes: int) -> Fit:
    """The curve's head: scikit-learn's logistic regression with C from train.logreg_C chosen on the validation
    split, whatever train.head is. The configured head (an MLP of 30 epochs) fitted 26 times would make the curve a
    matter of minutes; a linear probe is the standard few-shot measure of frozen features (CLIP, DINOv2)."""

    def fit_logreg(x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor) -> nn.Module:
        return heads.fit_logreg(
            x.numpy(), y.numpy(), x_val.numpy(), y_val.numpy(), Cs=cfg.logreg_C, num_classes=num_classes
        )[0]  # the layer of the C best on validation

    return fit_logreg


def score(
    train: FeatureSet,
    rows: np.ndarray,
    val: FeatureSet,
    test: FeatureSet,
    fit: Fit,
    *,
    standardize: bool,
    knn_cfg: EvaluateConfig,
    device: torch.device,
) -> tuple[float, float | None]:
    """Test accuracy of the head fitted on the training ``rows`` (every cached view of them, as train uses), and
    of the k-NN classifier on their original view (None when evaluate.knn_k is 0)."""
    x = torch.from_numpy(np.concatenate([view[rows] for view in train.features.values()]))
    y = torch.from_numpy(np.tile(train.labels[rows], len(train.features)))
    mean, std = heads.standardization([(x, y)], x.shape[1], standardize)
    x_val = (torch.from_numpy(val.features["original"]) - mean) / std
    net = fit((x - mean) / std, y, x_val, torch.from_numpy(val.labels))
    logits = heads.predict_logits(heads.Classifier(net, mean, std), torch.from_numpy(test.features["original"]))
    accuracy = float((logits.argmax(1).numpy() == test.labels).mean())
    if knn_cfg.knn_k == 0:
        return accuracy, None
    found = knn.knn_predict(
        [(train.features["original"][rows], train.labels[rows])], test.features["original"], k=knn_cfg.knn_k,
        temperature=knn_cfg.knn_temperature, device=device,
    )  # fmt: skip
    return accuracy, float((found == test.labels).mean())


def learning_curve(
    train: FeatureSet,
    val: FeatureSet,
    test: FeatureSet,
    fit: Fit,
    cfg: CurveConfig,
    *,
    seed: int,
    standardize: bool,
    knn_cfg: EvaluateConfig,
    device: torch.device,
) -> list[dict[str, Any]]:
    """One row of COLUMNS per entry of curve.shots: the accuracies of its curve.seeds draws, summarised. A draw
    of the same images as an earlier one is not fitted again: the spread is that of the draws of images."""
    names = train.provenance["class_names"]
    ranked = [ranking(train.ids, train.labels, names, seed=seed, draw=s) for s in range(cfg.seeds)]
    largest = int(np.unique(train.labels, return_counts=True)[1].max())
    table, scored = [], {}  # the scores of each subset: every draw of n = ALL (or above the largest class) is one
    with tqdm(total=len(cfg.shots) * cfg.seeds, desc="curve", unit="fit") as bar:
        for n in cfg.shots:
            results = []
            for order in ranked:
                rows = subset(order, train.labels, n)
                if rows.tobytes() not in scored:
                    scored[rows.tobytes()] = score(
                        train, rows, val, test, fit, standardize=standardize, knn_cfg=knn_cfg,
                        device=device,
                    )  # fmt: skip
                results.append(scored[rows.tobytes()])
                bar.update()
            # the chart's x: images per class, on a log axis; the 'all' point (0 has no place there) at the largest
            # class's count, where the points of an n above it lie too (they took the same images)
            per_class = largest if n == ALL else min(n, largest)
            table.append(summary(n, per_class, len(rows), short_classes(train.labels, n), results))
            log.info("%s", describe(table[-1]))
    return table


def summary(
    n: int, per_class: int, images: int, short: int, results: Sequence[tuple[float, float | None]]
) -> dict[str, Any]:
    """A row of COLUMNS from the (accuracy, k-NN accuracy) of each draw; the k-NN's empty when it is off."""
    acc = np.array([a for a, _ in results])
    found = [k for _, k in results if k is not None]
    knn_acc = {"knn_mean": float(np.mean(found)), "knn_std": float(np.std(found))} if found else {}
    return {
        "n": n, "per_class": per_class, "images": images, "short_classes": short, "acc_mean": float(acc.mean()),
        "acc_std": float(acc.std()), "acc_min": float(acc.min()), "acc_max": float(acc.max()),
        "knn_mean": "", "knn_std": "",
    } | knn_acc  # fmt: skip


def describe(row: dict[str, Any]) -> str:
    """One line of the log for a row of the table."""
    n = "all" if row["n"] == ALL else row["n"]
    short = f", {row['short_classes']} classes with fewer" if row["short_classes"] else ""
    knn_part = f", k-NN {row['knn_mean']:.4f} ± {row['knn_std']:.4f}" if row["knn_mean"] != "" else ""
    return (
        f"{n} images per class ({row['images']} images{short}): test accuracy {row['acc_mean']:.4f} ± "
        f"{row['acc_std']:.4f} ({row['acc_min']:.4f} to {row['acc_max']:.4f}){knn_part}"
    )
