"""The learning curve's draws and fits (pipeline.shots), on arrays: no files, no DVC."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import shots
from pipeline.config import ConfigError, CurveConfig, EvaluateConfig, TrainConfig, defaults, parse_params
from pipeline.features import FeatureSet

CPU = torch.device("cpu")
NAMES = ["a", "b", "c"]


def listing(counts: list[int]) -> tuple[list[str], np.ndarray]:
    """Ids and labels of ``counts[c]`` images of class c, the classes interleaved as a manifest may have them."""
    labels = np.array([c for c, n in enumerate(counts) for _ in range(n)])
    labels = labels[np.random.default_rng(0).permutation(len(labels))]
    return [f"{NAMES[c]}/{i:03d}.png" for i, c in enumerate(labels)], labels


def drawn(ids: list[str], labels: np.ndarray, n: int, *, seed: int = 0, draw: int = 0) -> np.ndarray:
    return shots.subset(shots.ranking(ids, labels, NAMES, seed=seed, draw=draw), labels, n)


def test_a_draw_takes_n_images_of_each_class_and_all_of_a_class_with_fewer():
    ids, labels = listing([10, 6, 3])
    for n in (1, 2, 4, 8):
        rows = drawn(ids, labels, n)
        assert list(rows) == sorted(set(rows))
        assert np.bincount(labels[rows], minlength=3).tolist() == [min(n, c) for c in (10, 6, 3)]
        assert shots.short_classes(labels, n) == sum(c < n for c in (10, 6, 3))


def test_the_all_point_takes_every_image_and_has_no_short_class():
    ids, labels = listing([10, 6, 3])
    for draw in range(3):
        assert list(drawn(ids, labels, shots.ALL, draw=draw)) == list(range(19))
    assert shots.short_classes(labels, shots.ALL) == 0


def test_draws_are_stable_nested_and_differ_by_draw_and_seed():
    ids, labels = listing([40, 40, 40])
    first = drawn(ids, labels, 4)
    assert list(drawn(ids, labels, 4)) == list(first)  # the same seed and draw: the same images
    assert set(drawn(ids, labels, 4, draw=1)) != set(first)
    assert set(drawn(ids, labels, 4, seed=1)) != set(first)
    assert set(first) <= set(drawn(ids, labels, 8)) <= set(drawn(ids, labels, 16))  # nested within a draw
    # a new image moves no other: the draw of the grown folder keeps the old picks, but one it may displace
    grown = drawn([*ids, "a/new.png"], np.append(labels, 0), 4)
    assert len({ids[i] for i in first} - {([*ids, "a/new.png"])[i] for i in grown}) <= 1


def blobs(n: int, rng: np.random.Generator, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.arange(n) % len(centers)
    return (centers[labels] + rng.standard_normal((n, centers.shape[1]))).astype(np.float32), labels


def blob_splits() -> tuple[FeatureSet, FeatureSet, FeatureSet]:
    """Overlapping Gaussian blobs of 3 classes in 32-d: one image a class is a poor guess, 60 a good one."""
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((3, 32)) * 0.5
    out = []
    for split, n in (("train", 180), ("val", 60), ("test", 300)):
        x, y = blobs(n, rng, centers)
        ids = [f"{NAMES[c]}/{split}{i:03d}" for i, c in enumerate(y)]
        out.append(FeatureSet({"original": x}, y, ids, {"class_names": NAMES, "split": split}))
    return tuple(out)


def test_the_curve_rises_with_the_images_per_class_for_the_head_and_the_knn():
    train, val, test = blob_splits()
    fit = shots.head_fit(TrainConfig(head="mlp", logreg_C=(0.1, 1.0)), num_classes=3)  # logreg whatever the head
    table = shots.learning_curve(
        train, val, test, fit, CurveConfig(shots=(1, 4, 16, 0), seeds=3), seed=0, standardize=True,
        knn_cfg=EvaluateConfig(knn_k=20), device=CPU,
    )  # fmt: skip
    assert [list(row) for row in table] == [list(shots.COLUMNS)] * 4
    assert [(row["n"], row["per_class"], row["images"], row["short_classes"]) for row in table] == [
        (1, 1, 3, 0), (4, 4, 12, 0), (16, 16, 48, 0), (0, 60, 180, 0),
    ]  # fmt: skip
    acc, knn_acc = [row["acc_mean"] for row in table], [row["knn_mean"] for row in table]
    assert acc[0] < acc[1] < acc[3] and acc[3] > 0.8, acc
    assert knn_acc[0] < knn_acc[2] < knn_acc[3], knn_acc
    assert all(row["acc_min"] <= row["acc_mean"] <= row["acc_max"] and row["acc_std"] >= 0 for row in table)
    assert table[-1]["acc_std"] == 0 and table[-1]["acc_min"] == table[-1]["acc_max"]  # 'all': one subset, one fit


def test_short_classes_are_counted_in_the_table_and_the_knn_is_empty_when_off():
    train, val, test = blob_splits()
    keep = np.flatnonzero((train.labels != 2) | (np.arange(len(train.labels)) < 12))  # class c: 4 images
    train = FeatureSet({"original": train.features["original"][keep]}, train.labels[keep],
                       [train.ids[i] for i in keep], train.provenance)  # fmt: skip
    fit = shots.head_fit(TrainConfig(logreg_C=(1.0,)), num_classes=3)
    table = shots.learning_curve(
        train, val, test, fit, CurveConfig(shots=(2, 8, 100), seeds=2), seed=0, standardize=True,
        knn_cfg=EvaluateConfig(knn_k=0), device=CPU,
    )  # fmt: skip
    assert [(row["n"], row["per_class"], row["images"], row["short_classes"]) for row in table] == [
        (2, 2, 6, 0), (8, 8, 20, 1), (100, 60, 124, 3),
    ]  # fmt: skip
    assert all(row["knn_mean"] == row["knn_std"] == "" for row in table)


def with_curve(**curve: object) -> dict:
    return defaults() | {"curve": defaults()["curve"] | curve}


def test_the_curve_parameters_default_to_six_points_of_five_logreg_draws():
    assert parse_params({}).curve == CurveConfig(shots=(1, 2, 4, 8, 16, 0), seeds=5)


@pytest.mark.parametrize(
    ("curve", "expected"),
    [
        ({"shots": [1, -2]}, "curve.shots[1] = -2 is not valid: expected an integer >= 0"),
        ({"shots": [1, 2, 1]}, "without repeats"),
        ({"shots": []}, "a non-empty list"),
        ({"shots": 4}, "a list of an integer"),
        ({"seeds": 0}, "curve.seeds = 0 is not valid: expected an integer >= 1"),
        ({"head": "mlp"}, "unknown key 'curve.head'"),  # logistic regression, whatever train.head is
    ],
)
def test_bad_curve_parameters_say_what_is_allowed(curve: dict, expected: str):
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("]", r"\]").replace("|", r"\|")):
        parse_params(with_curve(**curve))
