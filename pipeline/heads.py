"""Classifier heads on cached features: linear and MLP modules, logistic regression fitted by scikit-learn,
and the one head file format (a plain state dict, loadable with ``torch.load(weights_only=True)``)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import PipelineError
from pipeline.files import replaced


class Classifier(nn.Module):
    """Standardise features with stored train statistics, then classify: (B, D) -> (B, C) logits."""

    def __init__(self, net: nn.Module, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def build_net(kind: str, in_dim: int, num_classes: int, *, hidden: Sequence[int], dropout: float) -> nn.Module:
    """``linear`` and ``logreg``: one Linear layer; ``mlp``: (Linear, ReLU, Dropout) per hidden width, then Linear."""
    if kind in ("linear", "logreg"):
        return nn.Linear(in_dim, num_classes)
    layers: list[nn.Module] = []
    width = in_dim
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        width = h
    return nn.Sequential(*layers, nn.Linear(width, num_classes))


def standardization(
    blocks: Iterable[tuple[torch.Tensor, torch.Tensor]], dim: int, enabled: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and std over (x, y) blocks of training rows, in one pass (float64 sums).

    Identity when disabled; constant features keep std 1.
    """
    if not enabled:
        return torch.zeros(dim), torch.ones(dim)
    total = squares = None
    n = 0
    for x, _ in blocks:
        x = x.to("cpu", torch.float64) if x.device.type == "mps" else x.double()  # MPS has no float64
        total = x.sum(0) if total is None else total + x.sum(0)
        squares = (x * x).sum(0) if squares is None else squares + (x * x).sum(0)
        n += len(x)
    if total is None or squares is None or n < 2:
        raise ValueError(f"standardisation needs at least two rows, not {n}")
    mean = total / n
    std = ((squares - n * mean * mean) / (n - 1)).clamp_min(0).sqrt()
    return mean.float(), torch.where(std > 1e-6, std, torch.ones_like(std)).float()


def train_one_epoch(
    model: nn.Module,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int,
    generator: torch.Generator,
) -> tuple[float, float]:
    """One pass over (x, y) in shuffled index batches; returns mean loss and accuracy."""
    model.train()
    order = torch.randperm(len(x), generator=generator).to(x.device)
    total_loss = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for idx in order.split(batch_size):
        logits = model(x[idx])
        loss = criterion(logits, y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.detach() * len(idx)
        correct += (logits.argmax(1) == y[idx]).sum()
    return total_loss.item() / len(x), correct.item() / len(x)


@torch.inference_mode()
def evaluate(
    model: nn.Module, criterion: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int
) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` on (x, y), ``batch_size`` rows at a time: the (N, C) logits are never
    whole (2.5 GB of float32, and as much again for the loss, at 25,000 rows of 25,000 classes)."""
    model.eval()
    loss, correct = torch.zeros((), dtype=torch.float64, device=x.device), torch.zeros((), device=x.device)
    for x_block, y_block in zip(x.split(batch_size), y.split(batch_size), strict=True):
        logits = model(x_block)
        loss += criterion(logits, y_block).double() * len(y_block)  # the criterion's mean over the block
        correct += (logits.argmax(1) == y_block).sum()
    return (loss / len(y)).item(), correct.item() / len(y)


@torch.inference_mode()
def predict_logits(model: nn.Module, x: torch.Tensor, *, batch_size: int = 4096) -> torch.Tensor:
    model.eval()
    return torch.cat([model(block) for block in x.split(batch_size)])


def fit_logreg(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    *,
    Cs: Sequence[float],
    num_classes: int,
) -> tuple[nn.Linear, float, list[dict[str, float]]]:
    """scikit-learn LogisticRegression for each C, the best on validation kept as a Linear layer.

    Inputs are already standardised. Returns the layer, the chosen C, and for each C the loss and accuracy
    on both splits (``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``: the keys of the MLP's curves).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss

    best, curves = None, []
    for C in Cs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf = LogisticRegression(C=C, max_iter=1000).fit(x_train, y_train)
        curves.append({
            f"{split}/{name}": value
            for split, x, y in (("train", x_train, y_train), ("val", x_val, y_val))
            for name, value in (
                ("loss", float(log_loss(y, clf.predict_proba(x), labels=clf.classes_))),
                ("acc", float(clf.score(x, y))),
            )
        })  # fmt: skip
        if best is None or curves[-1]["val/acc"] > curves[best[0]]["val/acc"]:
            best = (len(curves) - 1, clf)
    if best is None:
        raise ValueError("train.logreg_C lists no value of C")
    clf = best[1]
    weight, bias = np.zeros((num_classes, x_train.shape[1])), np.zeros(num_classes)
    if len(clf.classes_) == 2:  # binary: sigmoid(w.x + b) == softmax([0, w.x + b])
        weight[clf.classes_[1]], bias[clf.classes_[1]] = clf.coef_[0], clf.intercept_[0]
    else:
        weight[clf.classes_], bias[clf.classes_] = clf.coef_, clf.intercept_
    layer = nn.Linear(x_train.shape[1], num_classes)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight))
        layer.bias.copy_(torch.from_numpy(bias))
    return layer, float(Cs[best[0]]), curves


# ---------------------------------------------------------------------------- the head file

_SPEC_KEYS = ("head", "in_dim", "num_classes", "hidden", "dropout", "provenance")


def save_head(path: Path, model: Classifier, spec: dict[str, Any]) -> None:
    """Write the head's state dict and its spec (architecture and the features' provenance) atomically."""
    missing = set(_SPEC_KEYS) - set(spec)
    if missing:
        raise ValueError(f"head spec lacks {sorted(missing)}")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    with replaced(path) as tmp:
        torch.save({"state_dict": state, "spec": spec}, tmp)


def load_head(path: Path) -> tuple[Classifier, dict[str, Any]]:
    """Rebuild a saved head; no arbitrary objects are unpickled."""
    if not path.is_file():
        raise PipelineError(f"{path} not found: run the train stage first (dvc repro train)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        spec, state = blob["spec"], blob["state_dict"]
        net = build_net(
            spec["head"], spec["in_dim"], spec["num_classes"], hidden=spec["hidden"], dropout=spec["dropout"]
        )
        model = Classifier(net, torch.zeros(spec["in_dim"]), torch.ones(spec["in_dim"]))
        model.load_state_dict(state)
    except Exception as err:  # a damaged or foreign file can fail in many ways inside torch
        raise PipelineError(f"{path} is not a head file of this pipeline: {type(err).__name__}: {err}") from None
    return model.eval(), spec
