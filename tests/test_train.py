from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import features, folders, heads, listing, provenance, sources
from pipeline.config import DataConfig, TrainConfig, load_params, parse_params
from pipeline.errors import PipelineError
from pipeline.provenance import check_provenance
from pipeline.train import Split, expected_provenance, load_split, train
from tests.conftest import FAST_PARAMS, feature_provenance, run_stage, write_blob_features, write_params

CPU = torch.device("cpu")


def load(tmp_path: Path, in_memory_mb: int = 4096, **changes: object) -> tuple[Split, Split]:
    write_blob_features(tmp_path, **changes)
    return tuple(load_split(tmp_path / f"{s}.h5", in_memory_mb=in_memory_mb, device=CPU) for s in ("train", "val"))


def accuracy(model: torch.nn.Module, split: Split) -> float:
    ((x, y),) = split.blocks(None)
    with torch.inference_mode():
        return (model.eval()(x).argmax(1) == y).float().mean().item()


@pytest.mark.parametrize("head", ["linear", "mlp", "logreg"])
def test_every_head_trains_and_logs_its_curves(tmp_path: Path, head: str):
    train_split, val_split = load(tmp_path)
    cfg = TrainConfig(head=head, hidden=(32,), epochs=12, lr=0.05)
    steps: list[dict] = []
    model, spec = train(train_split, val_split, cfg, seed=0, device=CPU, log_step=steps.append)
    assert accuracy(model, val_split) > 0.9
    assert spec["head"] == head and spec["in_dim"] == 16 and spec["num_classes"] == 3
    assert spec["provenance"] == train_split.provenance
    if head == "logreg":
        assert [s["logreg/C"] for s in steps] == list(cfg.logreg_C) and spec["C"] in cfg.logreg_C
    else:
        assert len(steps) == 12 and set(steps[0]) == {"train/loss", "train/acc", "val/loss", "val/acc"}
        assert steps[-1]["train/loss"] < steps[0]["train/loss"]


def test_training_is_deterministic(tmp_path: Path):
    train_split, val_split = load(tmp_path)
    cfg = TrainConfig(epochs=3)
    a, _ = train(train_split, val_split, cfg, seed=0, device=CPU, log_step=lambda _: None)
    b, _ = train(train_split, val_split, cfg, seed=0, device=CPU, log_step=lambda _: None)
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(ta, tb), name


def test_cached_views_add_training_rows(tmp_path: Path):
    train_split, val_split = load(tmp_path, views=["original", "hflip"])  # hflip block = original + 10
    assert train_split.rows == 180
    model, _ = train(train_split, val_split, TrainConfig(epochs=1), seed=0, device=CPU, log_step=lambda _: None)
    original = features.read_features(tmp_path / "train.h5").features["original"]
    torch.testing.assert_close(model.mean, torch.from_numpy(original).mean(0) + 5)


def test_splits_larger_than_the_memory_limit_stream_in_shuffled_chunk_aligned_blocks(tmp_path: Path):
    write_blob_features(tmp_path, n=900, dim=2048)  # float32 rows of 8 KiB: 128 rows per 1 MiB chunk
    whole = load_split(tmp_path / "train.h5", in_memory_mb=4096, device=CPU)
    streamed = load_split(tmp_path / "train.h5", in_memory_mb=0, device=CPU)
    assert whole.in_memory and not streamed.in_memory
    blocks = list(streamed.blocks(None))
    assert [len(x) for x, _ in blocks] == [128] * 7 + [4]  # whole chunks, in file order without a generator
    ((x, y),) = whole.blocks(None)
    torch.testing.assert_close(torch.cat([b[0] for b in blocks]), x)
    g = torch.Generator().manual_seed(0)
    orders = [tuple(len(x) for x, _ in streamed.blocks(g)) for _ in range(4)]  # four epochs
    assert len(set(orders)) > 1  # a new block order each epoch (the short block moves)
    stats = [heads.standardization(s.blocks(None), 2048, True) for s in (whole, streamed)]
    torch.testing.assert_close(stats[0], stats[1])


def test_a_streamed_split_trains_as_well(tmp_path: Path):
    write_blob_features(tmp_path, n=900, dim=2048)
    train_split, val_split = (load_split(tmp_path / f"{s}.h5", in_memory_mb=0, device=CPU) for s in ("train", "val"))
    cfg = TrainConfig(head="linear", epochs=3, lr=0.01)
    steps: list[dict] = []
    model, _ = train(train_split, val_split, cfg, seed=0, device=CPU, log_step=steps.append)
    assert steps[-1]["val/acc"] > 0.9
    with pytest.raises(PipelineError, match="logreg fits scikit-learn in memory"):
        train(train_split, val_split, TrainConfig(head="logreg"), seed=0, device=CPU, log_step=steps.append)


def test_provenance_expected_from_params():
    params = parse_params(FAST_PARAMS)
    assert expected_provenance(params) == {
        "arch": "vgg11",
        "weights": "random",
        "image_size": 32,
        "decode": "fast",
        "views": ["original"],
        "storage_dtype": "float16",
    }  # fmt: skip: layer and pool are auto, resolved by the backbone where the features were made
    named = parse_params(FAST_PARAMS | {"extract": FAST_PARAMS["extract"] | {"layer": "pool4", "pool": "max"}})
    assert (expected_provenance(named)["layer"], expected_provenance(named)["pool"]) == ("pool4", "max")
    explicit = parse_params(FAST_PARAMS | {"extract": FAST_PARAMS["extract"] | {"precision": "bf16"}})
    assert expected_provenance(explicit)["precision"] == "bf16"  # auto resolves where extract ran: not checked
    assert set(expected_provenance(explicit)) <= set(provenance.IDENTITY_KEYS)


REFUSED = [
    ({"layer": "pool4"}, {"layer": "pool5"}, "made with layer = 'pool4', but 'pool5' is asked for"),
    ({"weights": "imagenet"}, {}, "made with weights = 'imagenet', but 'random' is asked for"),
    # regressions: the README said train checks these, and it did not
    ({"decode": "exact"}, {}, "made with decode = 'exact', but 'fast' is asked for"),
    ({"precision": "bf16"}, {"precision": "fp32"}, "made with precision = 'bf16', but 'fp32' is asked for"),
]


@pytest.mark.parametrize(("changes", "params", "message"), REFUSED)
def test_features_made_otherwise_are_refused_in_one_line(project: Path, changes: dict, params: dict, message: str):
    write_params(project, {"extract": params})
    write_blob_features(project / "data" / "features", **changes)
    made = features.read_provenance(project / "data" / "features" / "train.h5")
    with pytest.raises(PipelineError, match=re.escape(message)) as err:
        check_provenance(made, expected_provenance(load_params(project / "params.yaml")), source="train.h5")
    assert "\n" not in str(err.value)


def test_the_train_stage_refuses_them_before_any_work(project: Path):
    changes, params, message = REFUSED[-1]
    write_params(project, {"extract": params})
    write_blob_features(project / "data" / "features", **changes)
    result = run_stage(project, "train", check=False)
    assert result.returncode == 2 and message in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == result.stderr.splitlines()[-1:]
    assert not (project / "models" / "head.pt").exists()


def test_train_stage_writes_head_curves_and_metrics(project: Path):
    write_blob_features(project / "data" / "features")
    write_params(project, {"train": {"epochs": 3, "device": "cpu"}})
    run_stage(project, "train")
    assert (project / "models" / "head.pt").is_file()
    curves = project / "reports" / "train" / "plots" / "metrics"
    assert (curves / "train" / "loss.tsv").read_text().count("\n") == 4  # header + 3 epochs
    assert (curves / "val" / "acc.tsv").is_file()
    assert '"acc"' in (project / "reports" / "train" / "metrics.json").read_text()


def test_a_few_shot_folder_of_200_classes_of_3_to_6_images_splits_and_trains_under_20_seeds(tmp_path: Path):
    """Every class keeps a train, a val and a test image whatever the seed, and the head learns from one or two
    images a class (features: a centre per class plus noise, as a good backbone would give)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "few"
    for c, n in enumerate(rng.integers(3, 7, size=200)):
        (root / f"c{c:03d}").mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / f"c{c:03d}" / f"{i}.png")
    entries = listing.scan(root, folders.imagefolder_ids(root), None)
    centers = rng.standard_normal((200, 32)).astype(np.float32) * 3
    noise = {e.id: rng.standard_normal(32).astype(np.float32) * 0.3 for e in entries}
    for seed in range(20):
        items, classes = sources.discover(DataConfig(source="imagefolder", root=str(root)), seed, entries)
        for split in sources.SPLITS:
            rows = [it for it in items if it.split == split]
            assert {it.label for it in rows} == set(range(200)), (seed, split)
            path = tmp_path / f"{split}.h5"
            prov = feature_provenance(split=split, feature_dim=32, class_names=classes, storage_dtype="float32")
            with features.FeatureWriter(
                path, n=len(rows), dim=32, dtype="float32", views=["original"], provenance=prov
            ) as w:
                x = np.stack([centers[it.label] + noise[it.id] for it in rows])
                w.write(0, {"original": x}, np.array([it.label for it in rows]), [it.id for it in rows])
        splits = {s: load_split(tmp_path / f"{s}.h5", in_memory_mb=64, device=CPU) for s in sources.SPLITS}
        cfg = TrainConfig(head="linear", epochs=15, lr=0.2, batch_size=64)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # (64, 32) x (32, 200) steps: a second thread only waits for the other tests' cores
        try:
            model, _ = train(splits["train"], splits["val"], cfg, seed=seed, device=CPU, log_step=lambda _: None)
        finally:
            torch.set_num_threads(threads)
        assert accuracy(model, splits["test"]) > 0.8, seed  # chance: 0.005
