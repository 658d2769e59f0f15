"""The k-NN accuracy: DINOv2's definition against a brute-force numpy computation, whatever the blocks, its tie
rules, the similarity blocks it holds, and evaluate's knn_acc on the original view of the training split."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from pipeline import evaluate, features, knn, provenance, screen
from pipeline.config import parse_params
from tests.conftest import feature_provenance, write_blob_features

CPU = torch.device("cpu")


def brute_force(train: np.ndarray, labels: np.ndarray, test: np.ndarray, *, k: int, temperature: float) -> np.ndarray:
    """DINOv2's k-NN classes in float64: the whole similarity matrix, a stable sort, exp(sim / T) votes."""
    unit = [x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12) for x in (train, test)]  # as F.normalize
    sims = unit[1] @ unit[0].T  # (test, train)
    nearest = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # k > rows: all of them
    weights = np.exp(np.take_along_axis(sims, nearest, 1) / temperature)
    votes = np.zeros((len(test), labels.max() + 1))
    np.add.at(votes, (np.arange(len(test))[:, None], labels[nearest]), weights)
    return votes.argmax(1)


def fp32_brute_force(keys: np.ndarray, queries: np.ndarray, *, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest keys of each query in float32: the unit vectors as F.normalize makes them, their dots rounded
    to float32 (from float64: no summation order decides), a stable sort (ties to the lower row)."""
    unit = [F.normalize(torch.from_numpy(x), dim=1).numpy().astype(np.float64) for x in (keys, queries)]
    sims = (unit[1] @ unit[0].T).astype(np.float32)
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, ids, 1), ids


def near_ties(seed: int = 0, dim: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keys in 4 clusters of 60, each an anchor moved by ~3e-3 (similarities to a query near the anchor ~1e-5 apart:
    far below bf16's resolution there, 2^-8, far above float32's), exact copies of 40 of them (exact ties, a copy
    a later row, with its label), 200 random keys; queries: 24 near the anchors, 5 random, a zero row."""
    rng = np.random.default_rng(seed)
    anchors = rng.normal(size=(4, dim))
    near = np.repeat(anchors, 60, 0) + 3e-3 * rng.normal(size=(240, dim))
    copies = rng.choice(240, 40, replace=False)
    keys = np.concatenate([near, rng.normal(size=(200, dim)), near[copies]]).astype(np.float32)
    labels = rng.integers(0, 5, len(keys))
    labels[440:] = labels[copies]
    queries = [anchors[rng.integers(0, 4, 24)] + 0.4 * rng.normal(size=(24, dim)), rng.normal(size=(5, dim))]
    return keys, labels, np.concatenate([*queries, np.zeros((1, dim))]).astype(np.float32)


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
    products = knn.products
    monkeypatch.setattr(
        knn, "products", lambda q, keys, kind: shapes.append((len(q), keys.shape[1])) or products(q, keys, kind)
    )
    rng = np.random.default_rng(0)
    train, labels = rng.normal(size=(50, 8)).astype(np.float32), rng.integers(0, 3, 50)
    blocks = iter(in_blocks(train, labels, 20))  # read once, as from a file
    knn.knn_predict(blocks, rng.normal(size=(30, 8)), k=3, temperature=0.1, device=CPU, block_rows=7)
    assert shapes.count((7, 7)) == 4 * 5  # 4 full blocks of test rows by the 5 full ones of training rows
    assert max(rows for rows, _ in shapes) == 7 and max(cols for _, cols in shapes) == 7


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


@pytest.mark.parametrize("k", [1, 20, 70])  # 70: the cut among the copies of a cluster
@pytest.mark.parametrize("block_rows", [16, 4096])
def test_near_ties_rank_as_a_float32_brute_force_whatever_the_screen(k: int, block_rows: int):
    keys, labels, queries = near_ties()
    want_sims, want = fp32_brute_force(keys, queries, k=k)
    blocks = [keys[:100], keys[100:]]
    found = {s: knn.search(blocks, queries, k=k, device=CPU, block_rows=block_rows, screen=s) for s in ("bf16", "fp32")}
    for f in found.values():
        np.testing.assert_array_equal(f.ids.numpy(), want)
        np.testing.assert_allclose(f.sims.numpy(), want_sims, rtol=0, atol=2e-7)  # float64 sums in another order
    assert torch.equal(found["bf16"].sims, found["fp32"].sims)  # the one exact score, bit for bit
    classes = brute_force(keys, labels, queries, k=k, temperature=0.07)
    got = knn.knn_predict(
        in_blocks(keys, labels, 100), queries, k=k, temperature=0.07, device=CPU, block_rows=block_rows
    )
    np.testing.assert_array_equal(got, classes)


def test_rows_the_bf16_screen_cannot_decide_are_scored_exactly_and_the_others_are_not():
    keys, _, queries = near_ties()
    unit = [knn._rows(x, 0, CPU, "bf16", keys=is_keys) for x, is_keys in ((queries, False), (keys, True))]
    screened = screen.products(unit[0].screen, unit[1].screen, "bf16").float().numpy()
    _, want = fp32_brute_force(keys, queries, k=20)
    wrong = [set(row) != set(w) for row, w in zip(np.argsort(-screened, 1, kind="stable")[:, :20], want, strict=True)]
    assert sum(wrong[:24]) >= 20  # bf16 alone gets most rows near a cluster wrong
    found = knn.search([keys], queries, k=20, device=CPU, screen="bf16")
    np.testing.assert_array_equal(found.ids.numpy(), want)
    assert (found.rescored[:24] >= 60).all()  # the whole cluster (and its copies) within the screen's error
    assert found.fell_back[:-1].sum() == 0  # all of them decided by exact scores of keys the bf16 screen left open
    assert found.fell_back[-1] == 1 and found.rescored[-1] == len(keys)  # the zero row: every key a tie, any screen
    far = np.concatenate([keys, 10 * queries[:1]])  # a query's own direction among keys: nothing near it
    alone = knn.search([far], queries[:1], k=1, device=CPU, screen="bf16")
    assert alone.ids.tolist() == [[len(keys)]] and alone.rescored.item() <= 2


def test_features_all_alike_fall_back_to_a_float32_screen_block_by_block_and_stay_exact():
    rng = np.random.default_rng(2)  # cosines 0.99 +- 0.0006, as random weights give: bf16 leaves every key open
    centre = rng.normal(size=512)
    keys, queries = (centre + 0.1 * rng.normal(size=(n, 512)) for n in (2000, 50))
    keys, queries = keys.astype(np.float32), queries.astype(np.float32)
    found = knn.search([keys], queries, k=10, device=CPU, block_rows=256, screen="bf16")
    np.testing.assert_array_equal(found.ids.numpy(), fp32_brute_force(keys, queries, k=10)[1])
    assert (found.fell_back == 8).all()  # every block of 256 keys: the first by the count, then all at once
    assert found.rescored.float().mean() < 100  # of 2,000: the float32 screen rules most out
