"""The k-NN accuracy: DINOv2's definition against a brute-force numpy computation, whatever the blocks, its tie
rules, the similarity blocks it holds, and evaluate's knn_acc on the original view of the training split."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pipeline import evaluate, features, knn, provenance
from pipeline.config import parse_params
from tests.conftest import feature_provenance, write_blob_features

CPU = torch.device("cpu")


def brute_force(train: np.ndarray, labels: np.ndarray, test: np.ndarray, *, k: int, temperature: float) -> np.ndarray:
    """DINOv2's k-NN classes in float64: the whole similarity matrix, a stable sort, exp(sim / T) votes."""
    unit = [x / np.linalg.norm(x, axis=1, keepdims=True) for x in (train, test)]
    sims = unit[1] @ unit[0].T  # (test, train)
    nearest = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # k > rows: all of them
    weights = np.exp(np.take_along_axis(sims, nearest, 1) / temperature)
    votes = np.zeros((len(test), labels.max() + 1))
    np.add.at(votes, (np.arange(len(test))[:, None], labels[nearest]), weights)
    return votes.argmax(1)


def in_blocks(x: np.ndarray, y: np.ndarray, rows: int) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(x[a : a + rows], y[a : a + rows]) for a in range(0, len(x), rows)]


@pytest.mark.parametrize("k", [1, 5, 20, 80])  # 80: more than the 50 training rows
@pytest.mark.parametrize("block_rows", [7, 4096])  # 7: a top k merged over blocks of test and training rows
def test_the_classes_are_a_brute_force_computation_of_the_same_definition(k: int, block_rows: int):
    rng = np.random.default_rng(k)
    train, labels, test = rng.normal(size=(50, 16)), rng.integers(0, 5, 50), rng.normal(size=(30, 16))
    want = brute_force(train, labels, test, k=k, temperature=0.07)
    for blocks in (in_blocks(train, labels, 13), [(train, labels)]):  # as a reader streams them, or whole
        got = knn.knn_predict(blocks, test.astype(np.float32), k=k, temperature=0.07, device=CPU, block_rows=block_rows)
        np.testing.assert_array_equal(got, want)
    assert len(set(want)) > 1


@pytest.mark.parametrize("block_rows", [1, 2, 3, 7])
def test_ties_go_to_the_earlier_training_row_and_the_lower_class_whatever_the_blocks(block_rows: int):
    train = np.array([[0, 1], [1, 0], [1, 0], [1, 0], [0, 1]], dtype=np.float32)  # rows 1-3: the same vector
    labels = np.array([2, 2, 1, 0, 1])
    test = np.array([[1, 0], [2, 0], [0, 0]], dtype=np.float32)  # [0, 0]: every similarity 0, the first k rows
    blocks = in_blocks(train, labels, block_rows)

    def predict(k: int) -> list[int]:
        return knn.knn_predict(blocks, test, k=k, temperature=0.07, device=CPU, block_rows=block_rows).tolist()

    assert predict(1) == [2, 2, 2]  # row 1 of the three tied, not the lowest class
    assert predict(2) == [1, 1, 2]  # rows 1 and 2 vote alike: the lower class of the two
    assert predict(3) == [0, 0, 2]


def test_similarities_come_in_blocks_of_at_most_block_rows_by_block_rows(monkeypatch: pytest.MonkeyPatch):
    shapes = []
    top = knn._top
    monkeypatch.setattr(knn, "_top", lambda sims, ids, k: shapes.append(sims.shape) or top(sims, ids, k))
    rng = np.random.default_rng(0)
    train, labels = rng.normal(size=(50, 8)).astype(np.float32), rng.integers(0, 3, 50)
    blocks = iter(in_blocks(train, labels, 20))  # read once, as from a file
    knn.knn_predict(blocks, rng.normal(size=(30, 8)), k=3, temperature=0.1, device=CPU, block_rows=7)
    assert shapes.count((7, 7)) == 4 * 5  # 4 full blocks of test rows by the 5 full ones of training rows
    assert max(rows for rows, _ in shapes) == 7 and max(cols for _, cols in shapes) <= 7 + 3  # and the merges


def test_no_training_rows_is_an_error():
    with pytest.raises(ValueError, match="needs training rows"):
        knn.knn_predict([], np.ones((3, 4)), k=5, temperature=0.07, device=CPU)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_gives_the_classes_of_the_cpu_but_for_near_ties():
    rng = np.random.default_rng(0)
    train, labels, test = rng.normal(size=(5000, 64)), rng.integers(0, 10, 5000), rng.normal(size=(700, 64))
    pred = [
        knn.knn_predict([(train, labels)], test, k=20, temperature=0.07, device=torch.device(d), block_rows=512)
        for d in ("cpu", "cuda")
    ]
    assert np.mean(pred[0] == pred[1]) >= 0.99  # float32 sums in another order: a 21st neighbour may swap in


def test_knn_k_0_gives_no_knn_acc(tmp_path: Path):
    cfg = parse_params({"evaluate": {"knn_k": 0}}).evaluate
    test = features.FeatureSet({"original": np.ones((2, 4), dtype=np.float32)}, np.zeros(2, dtype=np.int64), [], {})
    assert evaluate.knn_metrics(cfg, tmp_path / "never-read.h5", test, expected={}, device=CPU) == {}


def test_knn_acc_is_on_the_original_rows_of_the_training_split_never_its_flipped_ones(tmp_path: Path):
    write_blob_features(tmp_path, views=["original", "hflip"])
    with h5py.File(tmp_path / "train.h5", "r+") as f:  # each flipped row: the centre of the class before its own
        x, labels = f["features"][:], f["labels"][:]
        f["features_hflip"][:] = np.stack([x[labels == c].mean(0) for c in range(3)])[(labels - 1) % 3]
    train, test = (features.read_features(tmp_path / f"{split}.h5") for split in ("train", "test"))
    cfg = parse_params({"evaluate": {"knn_k": 7}}).evaluate
    expected = provenance.identity(feature_provenance(views=["original", "hflip"]))
    metrics = evaluate.knn_metrics(cfg, tmp_path / "train.h5", test, expected=expected, device=CPU)
    pred = knn.knn_predict(
        [(train.features["original"], train.labels)], test.features["original"], k=7, temperature=0.07, device=CPU
    )
    assert metrics == {"knn_acc": float(np.mean(pred == test.labels))} and metrics["knn_acc"] > 0.9
    both = features.BlockReader(tmp_path / "train.h5")  # every view: the centres are the nearest, and wrong
    pred = knn.knn_predict([both.read(0)], test.features["original"], k=7, temperature=0.07, device=CPU)
    assert np.mean(pred == test.labels) < 0.1
