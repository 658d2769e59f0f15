"""Stage `train`: fit the classifier head on cached features only; never touches images or the backbone."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import features, heads
from pipeline.config import Params, TrainConfig, load_params, to_dict
from pipeline.errors import run_stage
from pipeline.hardware import resolve_device

log = logging.getLogger(__name__)

_OPTIMIZERS = {
    "sgd": lambda p, c: torch.optim.SGD(p, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay),
    "adamw": lambda p, c: torch.optim.AdamW(p, lr=c.lr, weight_decay=c.weight_decay),
}


def expected_provenance(params: Params) -> dict[str, Any]:
    """What the features must have been made with, from the extract parameters this stage was given."""
    ex = params.extract
    return {
        "arch": ex.arch,
        "weights": ex.weights,
        "layer": ex.layer,
        "pool": ex.pool,
        "image_size": ex.image_size,
        "views": list(ex.views),
        "storage_dtype": ex.storage_dtype,
    }


def train(
    train_set: features.FeatureSet,
    val_set: features.FeatureSet,
    cfg: TrainConfig,
    *,
    seed: int,
    device: torch.device,
    log_step: Callable[[dict[str, float]], None],
) -> tuple[heads.Classifier, dict[str, Any]]:
    """Fit the configured head; every cached view of the training split adds rows. Returns the head and its spec."""
    torch.manual_seed(seed)
    x = torch.from_numpy(np.concatenate(list(train_set.features.values())))  # (V*N, D)
    y = torch.from_numpy(np.tile(train_set.labels, len(train_set.features)))
    x_val, y_val = torch.from_numpy(val_set.features["original"]), torch.from_numpy(val_set.labels)
    num_classes = len(train_set.provenance["class_names"])
    mean, std = heads.standardization(x, cfg.standardize)
    spec: dict[str, Any] = {
        "head": cfg.head,
        "in_dim": x.shape[1],
        "num_classes": num_classes,
        "hidden": list(cfg.hidden) if cfg.head == "mlp" else [],
        "dropout": cfg.dropout,
        "provenance": train_set.provenance,
    }
    if cfg.head == "logreg":
        layer, C, scores = heads.fit_logreg(
            ((x - mean) / std).numpy(), y.numpy(), ((x_val - mean) / std).numpy(), y_val.numpy(),
            Cs=cfg.logreg_C, num_classes=num_classes,
        )  # fmt: skip
        for c, acc in zip(cfg.logreg_C, scores, strict=True):
            log_step({"logreg/C": c, "val/acc": acc})
        log.info("logreg: C = %g chosen on validation (accuracy per C: %s)", C, scores)
        return heads.Classifier(layer, mean, std), spec | {"C": C}

    net = heads.build_net(cfg.head, x.shape[1], num_classes, hidden=cfg.hidden, dropout=cfg.dropout)
    model = heads.Classifier(net, mean, std).to(device)
    x, y, x_val, y_val = x.to(device), y.to(device), x_val.to(device), y_val.to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = _OPTIMIZERS[cfg.optimizer](model.parameters(), cfg)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(cfg.epochs):
        loss, acc = heads.train_one_epoch(
            model, criterion, optimizer, x, y, batch_size=cfg.batch_size, generator=generator
        )
        val_loss, val_acc = heads.evaluate(model, criterion, x_val, y_val, batch_size=4096)
        scheduler.step()
        log_step({"train/loss": loss, "train/acc": acc, "val/loss": val_loss, "val/acc": val_acc})
        log.info(
            "epoch %d/%d: loss %.4f acc %.4f | val loss %.4f acc %.4f",
            epoch + 1,
            cfg.epochs,
            loss,
            acc,
            val_loss,
            val_acc,
        )
    return model.cpu(), spec


def main() -> None:
    from dvclive import Live

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--features", type=Path, required=True, help="directory with train.h5 and val.h5")
    parser.add_argument("--out", type=Path, required=True, help="head file to write")
    parser.add_argument("--live", type=Path, required=True, help="dvclive directory for curves and metrics")
    args = parser.parse_args()
    params = load_params()
    log.info("train params: %s", to_dict(params.train))
    train_set = features.read_features(args.features / "train.h5")
    val_set = features.read_features(args.features / "val.h5")
    expected = expected_provenance(params)
    features.check_provenance(train_set.provenance, expected, source=args.features / "train.h5")
    same_as_train = {k: train_set.provenance[k] for k in features.IDENTITY_KEYS}
    features.check_provenance(val_set.provenance, same_as_train, source=args.features / "val.h5")

    with Live(str(args.live), dvcyaml=False, save_dvc_exp=False) as live:

        def log_step(metrics: dict[str, float]) -> None:
            for name, value in metrics.items():
                live.log_metric(name, value)
            live.next_step()

        model, spec = train(
            train_set,
            val_set,
            params.train,
            seed=params.seed,
            device=resolve_device(params.train.device),
            log_step=log_step,
        )
    heads.save_head(args.out, model, spec)


if __name__ == "__main__":
    run_stage(main)
