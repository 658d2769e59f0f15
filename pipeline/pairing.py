"""Paired comparison of two runs' test predictions (evaluate's predictions.csv): is B really better than A?

Both runs classified the same test images, so each image is a pair. The accuracies are compared on the per-image
differences, not on two independent intervals: McNemar's exact test on the images where the runs disagree
(Dietterich 1998), and a paired percentile bootstrap of the difference B - A. Pure functions over the files' text
and arrays; reading them at a revision is pipeline.compare's work.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from pipeline.errors import PipelineError
from pipeline.scores import BOOTSTRAP_RESAMPLES

PREDICTIONS = "predictions.csv"  # in evaluate's live directory: one row per test image, written by evaluate
COLUMNS = ("id", "key", "label", "predicted", "p_label", "p_predicted", "knn_correct")
ALPHA = 0.05
METRICS = {"head": "head", "knn": "k-NN"}  # metric -> how a table names it


@dataclass(frozen=True)
class Predictions:
    """One run's test predictions, a row per test image, sorted by (key, id): two runs' rows then pair up."""

    keys: np.ndarray  # (N,) str: each image's content key
    ids: np.ndarray  # (N,) str
    correct: np.ndarray  # (N,) bool: the head's prediction is the label
    knn_correct: np.ndarray | None  # (N,) bool; None when evaluate.knn_k was 0


@dataclass(frozen=True)
class Comparison:
    """One metric of two runs on the same images: each accuracy, B - A with its paired 95% interval, the
    discordant images and McNemar's exact p-value."""

    metric: str  # head | knn
    images: int
    accuracy_a: float
    accuracy_b: float
    difference: float  # accuracy_b - accuracy_a
    low: float  # paired bootstrap 95% interval of the difference
    high: float
    a_only: int  # images A classifies right and B wrong
    b_only: int  # images B classifies right and A wrong
    p_value: float  # McNemar's exact test: two-sided binomial test of b_only in a_only + b_only at 1/2

    @property
    def significant(self) -> bool:
        """p < ALPHA and an interval that excludes 0: both tests must agree before either run is called better."""
        return self.p_value < ALPHA and (self.low > 0 or self.high < 0)

    def verdict(self, a: str = "A", b: str = "B") -> str:
        """One line in words, e.g. ``B is better: +3.1 points [+1.2, +5.0], p = 0.002, on 1,204 paired test
        images``; ``a`` and ``b`` name the runs."""
        lead = (f"{b if self.difference > 0 else a} is better") if self.significant else "no significant difference"
        return f"{lead}: {self.interval_text()}, {p_text(self.p_value)}, on {self.images:,} paired test images"

    def interval_text(self) -> str:
        return f"{100 * self.difference:+.1f} points [{100 * self.low:+.1f}, {100 * self.high:+.1f}]"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"significant": self.significant, "verdict": self.verdict()}


def p_text(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.2g}"


def parse_predictions(text: str, *, source: str) -> Predictions:
    """A predictions.csv's rows (``text``, the file's content; ``source`` names it in errors), sorted by key."""
    reader = csv.DictReader(io.StringIO(text))
    if tuple(reader.fieldnames or ()) != COLUMNS:
        raise PipelineError(
            f"{source} has the columns {','.join(reader.fieldnames or [])!r}: expected {','.join(COLUMNS)!r}, "
            "as pipeline.evaluate writes them"
        )
    rows = list(reader)
    if not rows:
        raise PipelineError(f"{source} has no rows: expected one per test image")
    keys, ids = np.array([r["key"] for r in rows]), np.array([r["id"] for r in rows])
    correct = np.array([r["predicted"] == r["label"] for r in rows])
    knn = [r["knn_correct"] for r in rows]
    if not any(knn):
        knn_correct = None  # evaluate.knn_k was 0
    elif set(knn) <= {"0", "1"}:
        knn_correct = np.array(knn) == "1"
    else:
        bad = next(value for value in knn if value not in ("0", "1"))
        raise PipelineError(f"{source} has knn_correct = {bad!r}: expected 1 or 0 in every row, or all empty")
    order = np.lexsort((ids, keys))  # by key, then id: images with the same bytes pair in a fixed order
    pick = None if knn_correct is None else knn_correct[order]
    return Predictions(keys[order], ids[order], correct[order], pick)


def check_paired(a: Predictions, b: Predictions) -> None:
    """Refuse two runs that did not classify the same test images (by content key, never by row order)."""
    if np.array_equal(a.keys, b.keys):
        return
    only_a, only_b = np.setdiff1d(a.keys, b.keys).size, np.setdiff1d(b.keys, a.keys).size
    if only_a or only_b:
        raise PipelineError(
            f"the two runs have different test images: {only_a:,} only in A, {only_b:,} only in B (by content "
            "key; the data or its splits changed between them): a paired comparison needs the same test set"
        )
    raise PipelineError(
        f"the two runs have the same test keys but not as many images ({a.keys.size:,} in A, {b.keys.size:,} in B):"
        " a paired comparison needs the same test set"
    )


def compare(a: Predictions, b: Predictions, *, seed: int = 0) -> list[Comparison]:
    """The head's accuracy, and the k-NN accuracy when both runs have it, of B against A."""
    check_paired(a, b)
    found = [compare_correct(a.correct, b.correct, metric="head", seed=seed)]
    if a.knn_correct is not None and b.knn_correct is not None:
        found.append(compare_correct(a.knn_correct, b.knn_correct, metric="knn", seed=seed))
    return found


def compare_correct(a: np.ndarray, b: np.ndarray, *, metric: str, seed: int = 0) -> Comparison:
    """Compare two (N,) boolean arrays of right answers on the same N images, paired row by row."""
    a_only, b_only = int(np.sum(a & ~b)), int(np.sum(b & ~a))
    p = stats.binomtest(b_only, a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
    low, high = difference_interval(b.astype(np.float64) - a, seed=seed)
    acc_a, acc_b = float(a.mean()), float(b.mean())
    return Comparison(metric, a.size, acc_a, acc_b, acc_b - acc_a, low, high, a_only, b_only, float(p))


def difference_interval(differences: np.ndarray, *, seed: int) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of the per-image differences (-1, 0 or 1), seeded: the images
    are resampled as pairs, so what both runs get right or wrong together adds no spread."""
    if np.all(differences == differences[0]):  # every resample has the same mean
        return (float(differences[0]),) * 2
    result = stats.bootstrap(
        (differences,), np.mean, n_resamples=BOOTSTRAP_RESAMPLES, method="percentile", batch=200,
        rng=np.random.default_rng(seed),  # batch: 200 resamples x N floats at a time
    )  # fmt: skip
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def format_comparisons(found: list[Comparison]) -> str:
    """A table of the comparisons of B against A, one row a metric, then each one's verdict."""
    lines = [
        f"{'':<5}  {'A':>6}  {'B':>6}  {'B - A, 95% interval':<26}  {'A right, B wrong':>16}  "
        f"{'B right, A wrong':>16}  McNemar p"
    ]
    for c in found:
        lines.append(
            f"{METRICS[c.metric]:<5}  {c.accuracy_a:>6.3f}  {c.accuracy_b:>6.3f}  {c.interval_text():<26}  "
            f"{c.a_only:>16,}  {c.b_only:>16,}  {c.p_value:.2g}"
        )
    lines += [f"{METRICS[c.metric]}: {c.verdict()}" for c in found]
    return "\n".join(lines)


def bonferroni(found: list[Comparison]) -> str:
    """How many of ``found`` stay significant with each p-value multiplied by their number (Bonferroni)."""
    m = len(found)
    kept = sum(c.significant and c.p_value * m < ALPHA for c in found)
    return (
        f"{kept} of {m} comparisons stay significant under Bonferroni (p x {m} < {ALPHA:g}; "
        f"{sum(c.significant for c in found)} do uncorrected)"
    )
