"""The scores of blocks of class probabilities, and the metrics from them: scikit-learn's numbers, the curves'
pairs below and above the cap, and memory that holds a block, not the matrix."""

from __future__ import annotations

import tracemalloc
from collections.abc import Iterator

import numpy as np
import pytest
from sklearn import metrics as skm

from pipeline import scores as scoring
from pipeline.scores import compute_metrics, score
from tests.conftest import metrics_of, random_problem


@pytest.mark.parametrize("classes", [3, 100])
def test_the_metric_keys_are_the_same_for_3_or_100_classes(classes: int):
    rng = np.random.default_rng(0)
    labels = np.arange(4 * classes) % classes
    m = metrics_of(rng.dirichlet(np.ones(classes), len(labels)), labels)
    assert list(m) == ["accuracy", "acc_lo", "acc_hi", "top2", "macro_f1", "val_acc"]


def test_the_accuracy_interval_is_a_seeded_bootstrap_that_narrows_with_more_images():
    rng = np.random.default_rng(1)
    small, large = rng.random(360) < 0.9, rng.random(3600) < 0.9
    low, high = scoring.accuracy_interval(small, seed=0)
    assert low < small.mean() < high and (low, high) == scoring.accuracy_interval(small, seed=0)
    assert high - low == pytest.approx(2 * 1.96 * np.sqrt(0.9 * 0.1 / 360), rel=0.2)  # the normal approximation
    assert np.subtract(*scoring.accuracy_interval(large, seed=0)[::-1]) < (high - low) / 2
    assert scoring.accuracy_interval(np.ones(50, dtype=bool), seed=0) == (1.0, 1.0)


def test_top_k_is_left_out_when_there_are_not_more_classes_than_k():
    m = metrics_of(np.eye(3), np.arange(3), top_k=5)
    assert not any(key.startswith("top") for key in m)


def tied_probs(rng: np.random.Generator, n: int, classes: int) -> np.ndarray:
    """Probabilities rounded to a coarse grid, so that many rows have ties at their true class."""
    return np.round(rng.dirichlet(np.ones(classes), n) * 20).astype(np.float32) / 20


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize(("k", "tied"), [(1, False), (2, False), (5, False), (1, True), (2, True)])
def test_top_k_without_ties_and_balanced_accuracy_from_blocks_are_scikit_learns_numbers(k: int, tied: bool):
    rng = np.random.default_rng(k)
    probs = tied_probs(rng, 300, 12) if tied else rng.dirichlet(np.ones(12), 300).astype(np.float32)
    labels = rng.integers(0, 10, 300)  # classes 10 and 11: predicted, never true
    scores = score(np.array_split(probs, 7), labels, top_k=k, seed=0)
    m = compute_metrics(scores, labels, val_accuracy=0.5, seed=0)
    assert (scores.pred == 10).any() or (scores.pred == 11).any()
    if not tied:  # on an exact tie scikit-learn ranks the higher class index first, argmax the lower
        assert m[f"top{k}"] == skm.top_k_accuracy_score(labels, probs, k=k, labels=np.arange(12))
    assert scoring.balanced_accuracy(scores.pred, labels) == skm.balanced_accuracy_score(labels, scores.pred)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_top_k_ranks_tied_classes_as_argmax_does_the_lower_index_first(k: int):
    rng = np.random.default_rng(k)
    probs, labels = tied_probs(rng, 300, 12), rng.integers(0, 12, 300)
    scores = score(np.array_split(probs, 7), labels, top_k=k, seed=0)
    ranked = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # (N, k): stable, so the lower index first on a tie
    np.testing.assert_array_equal(scores.in_top_k, (ranked == labels[:, None]).any(1))


def test_top1_is_the_accuracy_when_the_true_class_ties():
    """Regression: with top_k 1, a tie at the true class counted as right for accuracy (argmax takes the lower
    class index) and as wrong for top1 (ranked as scikit-learn does, the higher index first)."""
    probs = np.array([[0.4, 0.4, 0.2], [0.3, 0.3, 0.4], [0.5, 0.25, 0.25], [0.2, 0.4, 0.4]], dtype=np.float32)
    labels = np.array([0, 1, 2, 1])  # right, wrong, wrong, right: rows 0 and 3 tie at their true class
    m = metrics_of(probs, labels, top_k=1)
    assert m["top1"] == m["accuracy"] == 0.5
    assert skm.top_k_accuracy_score(labels, probs, k=1) == 0.0  # scikit-learn's order: the tie's other class first


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top1_is_the_accuracy_on_many_ties(seed: int):
    rng = np.random.default_rng(seed)
    probs, labels = tied_probs(rng, 300, 6), rng.integers(0, 6, 300)
    m = compute_metrics(score([probs], labels, top_k=1, seed=0), labels, val_accuracy=0.5, seed=0)
    assert m["top1"] == m["accuracy"]


def test_scores_from_blocks_of_rows_are_the_scores_of_the_whole_matrix():
    rng = np.random.default_rng(0)
    probs, labels = tied_probs(rng, 50, 6), rng.integers(0, 6, 50)
    whole, blocks = score([probs], labels, top_k=3, seed=0), score(np.array_split(probs, 4), labels, top_k=3, seed=0)
    for field in ("pred", "pred_prob", "true_prob", "in_top_k", "y_true", "y_score"):
        np.testing.assert_array_equal(getattr(blocks, field), getattr(whole, field))
    np.testing.assert_array_equal(whole.pred, probs.argmax(1))
    np.testing.assert_array_equal(whole.true_prob, probs[np.arange(50), labels])
    assert whole.weight is None and blocks.weight is None and whole.one_in == 1


def test_below_the_cap_the_curves_take_every_image_and_class_pair():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], dtype=np.float32)
    scores = score([probs], np.array([0, 2]), top_k=1, seed=0, max_pairs=6)
    assert scores.y_true.tolist() == [True, False, False, False, False, True]
    assert scores.y_score.dtype == np.float64 and scores.y_score.tolist() == probs.astype(np.float64).ravel().tolist()
    assert scores.weight is None
    two = score([probs[:, :2]], np.array([0, 1]), top_k=1, seed=0, max_pairs=1)  # two classes: never sampled
    assert two.y_true.tolist() == [False, True] and two.y_score.tolist() == [np.float32(0.2), np.float32(0.3)]
    assert two.weight is None


def test_the_curves_keep_one_in_an_integer_number_of_negative_pairs_above_the_cap():
    assert scoring.negatives_one_in(1000, 2000, max_pairs=2_000_000) == 1  # at the cap: all
    assert scoring.negatives_one_in(10**6, 2, max_pairs=10) == 1  # two classes: one pair an image
    assert scoring.negatives_one_in(25_000, 25_000, max_pairs=2_000_000) == 317  # 25,000 x 24,999 / 1,975,000
    assert scoring.negatives_one_in(3_000_000, 10, max_pairs=2_000_000) == 9  # a negative per positive at least


def test_above_the_cap_the_sampled_curves_estimate_the_exact_ones():
    probs, labels = random_problem(np.random.default_rng(0), 2000, 300)  # 600,000 pairs
    exact = score([probs], labels, top_k=5, seed=0)
    sampled = score(np.array_split(probs, 9), labels, top_k=5, seed=0, max_pairs=30_000)
    assert sampled.one_in == 22 and 25_000 < len(sampled.y_true) < 31_000
    assert sampled.y_true.sum() == 2000  # every positive pair
    assert set(sampled.weight[sampled.y_true]) == {1.0} and set(sampled.weight[~sampled.y_true]) == {22.0}
    auc = skm.roc_auc_score(exact.y_true, exact.y_score)
    assert skm.roc_auc_score(sampled.y_true, sampled.y_score, sample_weight=sampled.weight) == pytest.approx(
        auc, abs=0.01
    )
    fpr, tpr, _ = skm.roc_curve(exact.y_true, exact.y_score)
    fpr_s, tpr_s, _ = skm.roc_curve(sampled.y_true, sampled.y_score, sample_weight=sampled.weight)
    grid = np.linspace(0, 1, 201)
    assert np.abs(np.interp(grid, fpr_s, tpr_s) - np.interp(grid, fpr, tpr)).max() < 0.03
    ap = skm.average_precision_score(exact.y_true, exact.y_score)
    ap_s = skm.average_precision_score(sampled.y_true, sampled.y_score, sample_weight=sampled.weight)
    assert ap_s == pytest.approx(ap, abs=0.05)  # sd 0.02 over seeds: the few highest scores carry most of it
    again = score(np.array_split(probs, 9), labels, top_k=5, seed=0, max_pairs=30_000)
    np.testing.assert_array_equal(again.y_score, sampled.y_score)  # seeded


def test_scoring_a_large_problem_holds_a_block_of_rows_not_the_whole_matrix():
    n, classes = 4000, 2000  # 8 million pairs: 64 MB of float64, 32 MB of float32 probabilities

    def blocks() -> Iterator[np.ndarray]:
        rng = np.random.default_rng(0)
        for _ in range(n // 100):
            yield rng.dirichlet(np.ones(classes), 100).astype(np.float32)  # (100, C): 0.8 MB

    tracemalloc.start()
    scores = score(blocks(), np.arange(n) % classes, top_k=5, seed=0, max_pairs=100_000)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert len(scores.y_true) < 110_000 and peak < 12 * 2**20, f"{peak / 2**20:.1f} MiB"
