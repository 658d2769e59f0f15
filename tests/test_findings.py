"""The audit's findings as pure functions over neighbours: leaks, duplicate groups, label votes, cleanlab's label
issues and outliers, on small arrays whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import findings, knn

CPU = torch.device("cpu")


def neighbours_of(split: str, x: np.ndarray, labels: np.ndarray, train: np.ndarray, k: int) -> findings.Neighbours:
    """As the audit stage finds them: the k nearest training rows, and the k nearest of the row's own split."""
    rows = np.arange(len(x))
    to_train = knn.nearest([train], x, k=k, device=CPU, exclude=rows if split == "train" else None)
    own = to_train if split == "train" else knn.nearest([x], x, k=k, device=CPU, exclude=rows)
    as_numpy = [tuple(t.numpy() for t in pair) for pair in (to_train, own)]
    return findings.Neighbours(split, labels, *as_numpy)


def blobs(rng: np.random.Generator, n: int, classes: int = 3, dim: int = 16) -> tuple[np.ndarray, np.ndarray]:
    centres = rng.normal(size=(classes, dim)) * 3
    labels = np.arange(n) % classes
    return (centres[labels] + rng.normal(size=(n, dim))).astype(np.float32), labels


def test_nearest_leaves_out_each_query_itself_whatever_the_blocks():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 8)).astype(np.float32)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    want = np.argsort(-sims, axis=1, kind="stable")[:, :4]
    for rows in (3, 7, 4096):
        blocks = [x[a : a + 6] for a in range(0, 20, 6)]
        got_sims, got = knn.nearest(blocks, x, k=4, device=CPU, block_rows=rows, exclude=np.arange(20))
        np.testing.assert_array_equal(got.numpy(), want)
        np.testing.assert_allclose(got_sims.numpy(), np.take_along_axis(sims, want, 1), rtol=1e-5)


def test_a_near_copy_in_train_is_a_leak_whatever_how_close_the_features_are():
    rng = np.random.default_rng(1)
    train, train_labels = blobs(rng, 60)
    test, test_labels = blobs(rng, 30)
    test[5] = train[17] + 1e-3 * rng.normal(size=16)  # a re-saved copy
    test[9] = train[40]  # an exact copy
    for shift in (0.0, 30.0):  # features all alike (cosine > 0.99, as random weights give) find the same pairs
        x_train, x_test = train + shift, test + shift
        found = {
            "train": neighbours_of("train", x_train, train_labels, x_train, k=5),
            "test": neighbours_of("test", x_test, test_labels, x_train, k=5),
        }
        leaks = findings.leaks(found["test"], 0.5)
        assert [(f.row, f.other_split, f.other_row) for f in leaks] == [(5, "train", 17), (9, "train", 40)]
        assert findings.leaks(found["train"], 0.5) == []


def test_duplicates_form_groups_of_n_minus_one_findings_most_similar_first():
    rng = np.random.default_rng(2)
    x, labels = blobs(rng, 40)
    x[[3, 8, 21]] = x[3]  # a group of three identical images
    x[30] = x[12] + 1e-4 * rng.normal(size=16)  # and a pair
    n = neighbours_of("train", x, labels, x, k=5)
    pairs, groups = findings.duplicates(n, 0.5)
    assert groups == 2
    assert sorted((f.other_row, f.row) for f in pairs) == [(3, 8), (3, 21), (12, 30)]
    assert all(f.kind == "duplicate" and f.split == f.other_split == "train" for f in pairs)


def test_the_local_scale_is_the_distance_to_the_farthest_listed_neighbour():
    n = findings.Neighbours(
        "test", np.zeros(2, int), (np.array([[1.0, 0.5], [0.0, -np.inf]]), np.zeros((2, 2), int)), None
    )
    np.testing.assert_allclose(findings.local_scale(n), [1.0, np.sqrt(2.0)])


def test_votes_are_the_softmax_weights_of_each_class_and_ignore_missing_neighbours():
    sims = np.array([[0.9, 0.8, -np.inf], [0.5, 0.5, 0.5]])
    classes = np.array([[1, 0, 2], [2, 2, 0]])
    probs = findings.vote_probabilities(sims, classes, 3, temperature=0.1)
    w = np.exp(np.array([0.9, 0.8]) / 0.1)
    np.testing.assert_allclose(probs[0], [w[1] / w.sum(), w[0] / w.sum(), 0.0], rtol=1e-6)
    np.testing.assert_allclose(probs[1], [1 / 3, 0.0, 2 / 3], rtol=1e-6)


def test_a_flipped_label_is_found_and_its_class_suggested():
    rng = np.random.default_rng(3)
    x, labels = blobs(rng, 150, classes=3)
    noisy = labels.copy()
    flipped = [4, 50, 97]
    noisy[flipped] = (labels[flipped] + 1) % 3
    n = neighbours_of("train", x, noisy, x, k=10)
    probs = findings.vote_probabilities(n.train[0], noisy[n.train[1]], 3, temperature=0.07)
    doubted, scores = findings.label_issues(noisy, probs)
    assert set(flipped) <= set(doubted.tolist()) and len(doubted) <= 6
    assert probs[flipped].argmax(1).tolist() == labels[flipped].tolist()
    assert np.all(np.diff(scores) <= 1e-12)  # lowest self-confidence first


def test_an_image_unlike_the_rest_is_an_outlier_and_no_spread_flags_nothing():
    rng = np.random.default_rng(4)
    x, labels = blobs(rng, 80)
    x[7] = rng.normal(size=16) * 0.01 + 40  # far from every class
    n = neighbours_of("train", x, labels, x, k=5)
    scores = {"train": findings.outlier_scores(n)}
    assert [f.row for f in findings.outliers(scores, 10.0)] == [7]
    assert findings.outliers({"train": np.full(10, 0.3)}, 10.0) == []  # no spread: nothing stands out


@pytest.mark.parametrize("kind", findings.KINDS)
def test_findings_are_ranked_by_kind_then_worst_first(kind: str):
    found = [findings.Finding(kind, "test", i, s) for i, s in enumerate((0.2, 0.9, 0.5))]
    found.append(findings.Finding("leak", "val", 0, 0.1))
    ranked = findings.ranked(found)
    assert ranked[0].kind == "leak"
    assert [f.score for f in ranked if f.kind == kind and f.split == "test"] == [0.9, 0.5, 0.2]
