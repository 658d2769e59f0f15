"""Stage `evaluate`: test-split metrics and a confusion matrix for the trained head, computed with scikit-learn."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn import metrics as skm

from pipeline import features, heads
from pipeline.config import load_params, to_dict
from pipeline.errors import run_stage

log = logging.getLogger(__name__)


def compute_metrics(
    probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str], *, top_k: int, val_accuracy: float
) -> dict[str, Any]:
    """Accuracy, top-k accuracy (when there are more than k classes), macro F1 and per-class P/R/F1."""
    pred = probs.argmax(1)
    ids = np.arange(len(class_names))
    test: dict[str, Any] = {"accuracy": float(skm.accuracy_score(labels, pred))}
    if len(class_names) > top_k:
        test[f"top{top_k}_accuracy"] = float(skm.top_k_accuracy_score(labels, probs, k=top_k, labels=ids))
    test["macro_f1"] = float(skm.f1_score(labels, pred, labels=ids, average="macro", zero_division=0))
    precision, recall, f1, support = skm.precision_recall_fscore_support(labels, pred, labels=ids, zero_division=0)
    test["per_class"] = {
        name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for name, p, r, f, s in zip(class_names, precision, recall, f1, support, strict=True)
    }
    return {"test": test, "val": {"accuracy": float(val_accuracy)}}


def main() -> None:
    from dvclive import Live

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--features", type=Path, required=True, help="directory with val.h5 and test.h5")
    parser.add_argument("--head", type=Path, required=True, help="head file written by train")
    parser.add_argument("--live", type=Path, required=True, help="dvclive directory for metrics and plots")
    args = parser.parse_args()
    params = load_params()
    log.info("evaluate params: %s", to_dict(params.evaluate))
    model, spec = heads.load_head(args.head)
    head_identity = {k: spec["provenance"][k] for k in features.IDENTITY_KEYS}
    splits = {}
    for split in ("val", "test"):
        path = args.features / f"{split}.h5"
        splits[split] = features.read_features(path)
        features.check_provenance(splits[split].provenance, head_identity, source=path)

    def probabilities(split: str) -> np.ndarray:
        logits = heads.predict_logits(model, torch.from_numpy(splits[split].features["original"]))
        return torch.softmax(logits, 1).numpy()

    class_names = spec["provenance"]["class_names"]
    val_accuracy = skm.accuracy_score(splits["val"].labels, probabilities("val").argmax(1))
    test_probs, test_labels = probabilities("test"), splits["test"].labels
    results = compute_metrics(
        test_probs, test_labels, class_names, top_k=params.evaluate.top_k, val_accuracy=val_accuracy
    )
    log.info("test accuracy %.4f, macro F1 %.4f", results["test"]["accuracy"], results["test"]["macro_f1"])

    with Live(str(args.live), dvcyaml=False, save_dvc_exp=False) as live:
        live.summary = results
        names = np.asarray(class_names)
        live.log_sklearn_plot(
            "confusion_matrix", names[test_labels], names[test_probs.argmax(1)], name="confusion_matrix.json"
        )


if __name__ == "__main__":
    run_stage(main)
