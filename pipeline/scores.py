"""What evaluate takes of the test split's class probabilities, gathered block by block, and the headline metrics
computed from it: the (N, C) matrix itself is never whole, so 25,000 images of 25,000 classes take a block of
rows at a time, not 2.5 GB of float32 (and a dense C x C confusion matrix, and 625 million curve pairs)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy import stats
from sklearn import metrics as skm

MAX_PAIRS = 2_000_000  # (image, class) pairs for the curves: 17 bytes and a sort each; see negatives_one_in


@dataclass(frozen=True)
class Scores:
    """What evaluate uses of the test split's (N, C) class probabilities, gathered from blocks of rows in one pass:
    the matrix itself is never whole (2.5 GB of float32 at 25,000 images and 25,000 classes)."""

    num_classes: int
    top_k: int
    one_in: int  # the curves keep 1 in this many negative pairs (negatives_one_in)
    pred: np.ndarray  # (N,) int64: the most probable class
    pred_prob: np.ndarray  # (N,) float32: its probability
    true_prob: np.ndarray  # (N,) float32: the true class's probability
    in_top_k: np.ndarray  # (N,) bool: the true class among the top_k most probable
    y_true: np.ndarray  # (M,) bool: the (image, class) pairs of the ROC and precision-recall curves,
    y_score: np.ndarray  # (M,) float64: their scores
    weight: np.ndarray | None  # (M,) float64: and their weights; None when every pair is there (positive_scores)


def score(
    blocks: Iterable[np.ndarray], labels: np.ndarray, *, top_k: int, seed: int, max_pairs: int = MAX_PAIRS
) -> Scores:
    """The Scores of consecutive (rows, C) blocks of probabilities, the images labelled ``labels``; ``seed``
    draws the negative pairs the curves keep when there are more than ``max_pairs`` pairs."""
    rng = np.random.default_rng(seed)
    start, per_block = 0, []
    for probs in blocks:
        y, start = labels[start : start + len(probs)], start + len(probs)
        one_in = negatives_one_in(len(labels), probs.shape[1], max_pairs=max_pairs)
        per_block.append(
            (probs.argmax(1), probs.max(1), probs[np.arange(len(y)), y], _in_top_k(probs, y, top_k),
             *positive_scores(probs, y, one_in=one_in, rng=rng))
        )  # fmt: skip
    if not per_block or start != len(labels):
        raise ValueError(f"{start} rows of probabilities for {len(labels)} labels")
    fields = [None if parts[0] is None else np.concatenate(parts) for parts in zip(*per_block, strict=True)]
    return Scores(probs.shape[1], top_k, one_in, *fields)  # pred … weight, in the order of Scores' fields


def _in_top_k(probs: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Whether each row's true class is among its k most probable, ties ranked as argmax ranks them (the lower
    class index first), so that top-1 is the accuracy: one comparison a value, no sort. It differs from
    scikit-learn's ``top_k_accuracy_score``, which ranks the higher index first, on exact ties only."""
    true = probs[np.arange(len(labels)), labels][:, None]  # (rows, 1)
    above = np.count_nonzero(probs > true, axis=1)
    tied_above = np.count_nonzero((probs == true) & (np.arange(probs.shape[1]) < labels[:, None]), axis=1)
    return above + tied_above < k


def compute_metrics(scores: Scores, labels: np.ndarray, *, val_accuracy: float, seed: int) -> dict[str, float]:
    """The headline numbers, flat and short-named (``dvc metrics show`` prints every key of every metrics file
    in one line, 160 columns at most): test accuracy with its 95% bootstrap interval, top-k accuracy (when there
    are more than k classes), macro F1, and validation accuracy. Balanced accuracy is no column: next to macro F1
    it told little, and the log and per_class.csv (the mean of its recalls) keep it."""
    pred, ids = scores.pred, np.arange(scores.num_classes)
    low, high = accuracy_interval(pred == labels, seed=seed)
    metrics = {"accuracy": float(skm.accuracy_score(labels, pred)), "acc_lo": low, "acc_hi": high}
    if scores.num_classes > scores.top_k:  # top_k_accuracy_score's number but on exact ties (_in_top_k), from blocks
        metrics[f"top{scores.top_k}"] = float(np.mean(scores.in_top_k))
    metrics["macro_f1"] = float(skm.f1_score(labels, pred, labels=ids, average="macro", zero_division=0))
    return metrics | {"val_acc": float(val_accuracy)}


def balanced_accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    """The mean recall over the classes in ``labels``: balanced_accuracy_score's number, which it takes from a
    dense C x C confusion matrix (5 GB of int64 at 25,000 classes)."""
    present = np.unique(labels)
    return float(skm.recall_score(labels, pred, labels=present, average="macro", zero_division=0))


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


def negatives_one_in(images: int, classes: int, *, max_pairs: int) -> int:
    """The curves keep 1 in this many negative (image, class) pairs: 1 (every pair) up to ``max_pairs`` pairs;
    above, every positive pair and about ``max_pairs`` in all (at least one negative per positive). An
    integer, so that the weighted counts stay whole numbers and ``drop_intermediate`` still finds the
    collinear points. At 25,000 images and classes it is 317: 1.97 million negatives drawn put the
    false-positive rate within ±0.001 at three standard errors; a count of 30,000 false positives is 95 drawn,
    ±10% at one standard error."""
    if classes == 2 or images * classes <= max_pairs:
        return 1
    return -(-images * (classes - 1) // max(max_pairs - images, images))  # ceil


def positive_scores(
    probs: np.ndarray, labels: np.ndarray, *, one_in: int = 1, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(is positive, score, weight) pairs for ROC and precision-recall curves: the second class's probability
    for two classes; for more, every (image, class) pair one-vs-rest, which gives the micro-averaged curves.
    With ``one_in`` > 1, every positive pair and each negative one with probability 1 / ``one_in``, weighted
    ``one_in``: the weighted counts above any threshold are unbiased estimates of the full ones. The weight is
    None when every pair is there."""
    if probs.shape[1] == 2:  # float64: dvclive writes the thresholds with json, which refuses float32
        return labels == 1, probs[:, 1].astype(np.float64), None
    if one_in == 1:
        onehot = np.eye(probs.shape[1], dtype=bool)[labels]
        return onehot.ravel(), probs.astype(np.float64).ravel(), None
    if rng is None:
        raise ValueError("sampled pairs need a random generator")
    classes = probs.shape[1]
    positives = np.arange(len(labels)) * classes + labels  # flat indices into probs
    drawn = rng.choice(probs.size, size=rng.binomial(probs.size, 1 / one_in), replace=False, shuffle=False)
    kept = np.union1d(positives, drawn)  # a positive drawn as well counts once, with weight 1
    y_true = labels[kept // classes] == kept % classes
    return y_true, probs.ravel()[kept].astype(np.float64), np.where(y_true, 1.0, float(one_in))
