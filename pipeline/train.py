"""Stage `train`: fit the classifier head on cached features only; never touches images or the backbone."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import features, heads
from pipeline.config import Params, TrainConfig, load_params, to_dict, with_dvc_paths
from pipeline.errors import PipelineError, run_stage
from pipeline.files import replaced
from pipeline.hardware import resolve_device
from pipeline.provenance import check_provenance, identity

log = logging.getLogger(__name__)

_OPTIMIZERS = {
    "sgd": lambda p, c: torch.optim.SGD(p, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay),
    "adamw": lambda p, c: torch.optim.AdamW(p, lr=c.lr, weight_decay=c.weight_decay),
}


def expected_provenance(params: Params) -> dict[str, Any]:
    """What the features must have been made with, from the extract parameters this stage was given. A setting
    only when it is named: ``auto`` (precision, layer, pool, image size) resolved where the features were made."""
    ex = params.extract
    expected = {
        "arch": ex.arch,
        "weights": ex.weights,
        "layer": ex.layer,
        "pool": ex.pool,
        "image_size": ex.image_size,
        "decode": ex.decode,
        "views": list(ex.views),
        "storage_dtype": ex.storage_dtype,
    }
    expected |= {"precision": ex.precision}
    return {key: value for key, value in expected.items() if value != "auto"}


@dataclass(frozen=True)
class Split:
    """A split as the trainer sees it: (x, y) blocks on the device, in shuffled block order when given a generator."""

    provenance: dict[str, Any]
    rows: int  # cached views x images
    in_memory: bool
    blocks: Callable[[torch.Generator | None], Iterator[tuple[torch.Tensor, torch.Tensor]]]


def load_split(path: Path, *, in_memory_mb: int, device: torch.device) -> Split:
    """The whole split as one tensor on ``device`` when it fits ``in_memory_mb``; otherwise chunk-aligned blocks
    read from HDF5 on every pass, in a new random block order each epoch."""
    reader = features.BlockReader(path, block_mb=max(1, in_memory_mb // 4))
    rows = reader.n * len(reader.views)
    if reader.nbytes <= in_memory_mb * 2**20:
        x, y = (torch.from_numpy(a).to(device) for a in reader.read_rows(0, reader.n))
        return Split(reader.provenance, rows, True, lambda _: iter([(x, y)]))
    log.info(
        "%s: %.0f MB of features > train.in_memory_mb = %d: streaming %d blocks of %d rows",
        path, reader.nbytes / 2**20, in_memory_mb, reader.num_blocks, reader.block_rows,
    )  # fmt: skip

    def blocks(generator: torch.Generator | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = (
            range(reader.num_blocks) if generator is None else torch.randperm(reader.num_blocks, generator=generator)
        )
        for k in order:
            yield tuple(torch.from_numpy(a).to(device, non_blocking=device.type == "cuda") for a in reader.read(int(k)))

    return Split(reader.provenance, rows, False, blocks)


def _over_blocks(
    step: Callable[[torch.Tensor, torch.Tensor], tuple[float, float]],
    blocks: Iterable[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[float, float]:
    """Row-weighted mean loss and accuracy of ``step`` over blocks."""
    loss = acc = 0.0
    rows = 0
    for x, y in blocks:
        block_loss, block_acc = step(x, y)
        loss, acc, rows = loss + block_loss * len(x), acc + block_acc * len(x), rows + len(x)
    return loss / rows, acc / rows


def train(
    train_split: Split,
    val_split: Split,
    cfg: TrainConfig,
    *,
    seed: int,
    device: torch.device,
    log_step: Callable[[dict[str, float]], None],
) -> tuple[heads.Classifier, dict[str, Any]]:
    """Fit the configured head; every cached view of the training split adds rows. Returns the head and its spec."""
    torch.manual_seed(seed)
    dim, num_classes = train_split.provenance["feature_dim"], len(train_split.provenance["class_names"])
    mean, std = (t.to(device) for t in heads.standardization(train_split.blocks(None), dim, cfg.standardize))
    spec: dict[str, Any] = {
        "head": cfg.head,
        "in_dim": dim,
        "num_classes": num_classes,
        "hidden": list(cfg.hidden) if cfg.head == "mlp" else [],
        "dropout": cfg.dropout,
        "provenance": train_split.provenance,
    }
    if cfg.head == "logreg":
        if not (train_split.in_memory and val_split.in_memory):
            raise PipelineError(
                "head: logreg fits scikit-learn in memory, but the features exceed train.in_memory_mb; "
                "raise train.in_memory_mb or use head: linear, which streams"
            )
        ((x, y),), ((x_val, y_val),) = train_split.blocks(None), val_split.blocks(None)
        layer, C, curves = heads.fit_logreg(
            ((x - mean) / std).cpu().numpy(), y.cpu().numpy(), ((x_val - mean) / std).cpu().numpy(),
            y_val.cpu().numpy(), Cs=cfg.logreg_C, num_classes=num_classes,
        )  # fmt: skip
        for c, values in zip(cfg.logreg_C, curves, strict=True):  # one step per candidate: the curves' x
            log_step({"logreg/C": c} | values)
        log.info("logreg: C = %g chosen on validation (accuracy per C: %s)", C, [v["val/acc"] for v in curves])
        return heads.Classifier(layer, mean.cpu(), std.cpu()), spec | {"C": C}

    net = heads.build_net(cfg.head, dim, num_classes, hidden=cfg.hidden, dropout=cfg.dropout)
    model = heads.Classifier(net, mean, std).to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = _OPTIMIZERS[cfg.optimizer](model.parameters(), cfg)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step, gamma=cfg.lr_gamma)
    generator = torch.Generator().manual_seed(seed)

    def train_block(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        return heads.train_one_epoch(model, criterion, optimizer, x, y, batch_size=cfg.batch_size, generator=generator)

    def eval_block(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        return heads.evaluate(model, criterion, x, y, batch_size=4096)

    for epoch in range(cfg.epochs):
        loss, acc = _over_blocks(train_block, train_split.blocks(generator))
        val_loss, val_acc = _over_blocks(eval_block, val_split.blocks(None))
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
    parser.add_argument("--features", type=Path, help="directory with train.h5 and val.h5")
    parser.add_argument("--out", type=Path, help="head file to write")
    parser.add_argument("--live", type=Path, help="dvclive directory for curves and metrics")
    args = with_dvc_paths(parser.parse_args(), features="features", out="head", live="train_live")
    params = load_params()
    log.info("train params: %s", to_dict(params.train))
    paths = {split: args.features / f"{split}.h5" for split in ("train", "val")}
    provenance = {split: features.read_provenance(path) for split, path in paths.items()}
    check_provenance(provenance["train"], expected_provenance(params), source=paths["train"])
    check_provenance(provenance["val"], identity(provenance["train"]), source=paths["val"])
    device = resolve_device(params.train.device)
    train_split, val_split = (
        load_split(path, in_memory_mb=params.train.in_memory_mb, device=device) for path in paths.values()
    )

    with replaced(args.live) as live_dir, Live(str(live_dir), dvcyaml=False, save_dvc_exp=False) as live:

        def log_step(metrics: dict[str, float]) -> None:
            for name, value in metrics.items():
                live.log_metric(name, value)
            live.next_step()

        model, spec = train(train_split, val_split, params.train, seed=params.seed, device=device, log_step=log_step)
    heads.save_head(args.out, model, spec)


if __name__ == "__main__":
    run_stage(main)
