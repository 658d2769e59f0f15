from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline import features
from pipeline.config import TrainConfig, parse_params
from pipeline.train import expected_provenance, train
from tests.conftest import FAST_PARAMS, run_stage, write_blob_features, write_params

CPU = torch.device("cpu")


def load(tmp_path: Path, **changes: object) -> tuple[features.FeatureSet, features.FeatureSet]:
    write_blob_features(tmp_path, **changes)
    return features.read_features(tmp_path / "train.h5"), features.read_features(tmp_path / "val.h5")


@pytest.mark.parametrize("head", ["linear", "mlp", "logreg"])
def test_every_head_trains_and_logs_its_curves(tmp_path: Path, head: str):
    train_set, val_set = load(tmp_path)
    cfg = TrainConfig(head=head, hidden=(32,), epochs=12, lr=0.05)
    steps: list[dict] = []
    model, spec = train(train_set, val_set, cfg, seed=0, device=CPU, log_step=steps.append)
    x_val, y_val = torch.from_numpy(val_set.features["original"]), torch.from_numpy(val_set.labels)
    with torch.inference_mode():
        accuracy = (model.eval()(x_val).argmax(1) == y_val).float().mean().item()
    assert accuracy > 0.9
    assert spec["head"] == head and spec["in_dim"] == 16 and spec["num_classes"] == 3
    assert spec["provenance"] == train_set.provenance
    if head == "logreg":
        assert [s["logreg/C"] for s in steps] == list(cfg.logreg_C) and spec["C"] in cfg.logreg_C
    else:
        assert len(steps) == 12 and set(steps[0]) == {"train/loss", "train/acc", "val/loss", "val/acc"}
        assert steps[-1]["train/loss"] < steps[0]["train/loss"]


def test_training_is_deterministic(tmp_path: Path):
    train_set, val_set = load(tmp_path)
    cfg = TrainConfig(epochs=3)
    a, _ = train(train_set, val_set, cfg, seed=0, device=CPU, log_step=lambda _: None)
    b, _ = train(train_set, val_set, cfg, seed=0, device=CPU, log_step=lambda _: None)
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(ta, tb), name


def test_cached_views_add_training_rows(tmp_path: Path):
    train_set, val_set = load(tmp_path, views=["original", "hflip"])  # hflip block = original + 10
    model, _ = train(train_set, val_set, TrainConfig(epochs=1), seed=0, device=CPU, log_step=lambda _: None)
    torch.testing.assert_close(model.mean, torch.from_numpy(train_set.features["original"]).mean(0) + 5)


def test_provenance_expected_from_params():
    params = parse_params(FAST_PARAMS)
    assert expected_provenance(params) == {
        "arch": "vgg11", "weights": "random", "layer": "pool5", "pool": "avg",
        "image_size": 32, "views": ["original"], "storage_dtype": "float16",
    }  # fmt: skip
    assert set(expected_provenance(params)) <= set(features.IDENTITY_KEYS)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"layer": "pool4"}, "made with layer = 'pool4', but 'pool5' is asked for"),
        ({"weights": "imagenet"}, "made with weights = 'imagenet', but 'random' is asked for"),
    ],
)
def test_train_stage_refuses_features_made_otherwise(project: Path, changes: dict, message: str):
    write_blob_features(project / "data" / "features", **changes)
    result = run_stage(project, "train", check=False)
    assert result.returncode == 2 and message in result.stderr
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
