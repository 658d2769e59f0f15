"""Stage `curve`: the learning curve of the cached features (pipeline.shots), the test accuracy of a head and of
the k-NN classifier fitted on n training images per class: reports/curve/curve.csv, drawn by `dvc plots show`."""

from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path

from pipeline import features, shots
from pipeline.config import load_params, to_dict, with_dvc_paths
from pipeline.errors import run_stage
from pipeline.files import replaced
from pipeline.hardware import resolve_device
from pipeline.provenance import check_provenance, identity

log = logging.getLogger(__name__)

TABLE = "curve.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--features", type=Path, help="directory with train.h5, val.h5 and test.h5")
    parser.add_argument("--out", type=Path, help="directory for curve.csv")
    args = with_dvc_paths(parser.parse_args(), features="features", out="curve")
    params = load_params()
    log.info("curve params: %s", to_dict(params.curve))
    paths = {split: args.features / f"{split}.h5" for split in ("train", "val", "test")}
    train, val, test = (features.read_features(path) for path in paths.values())
    for split, path in ((val, paths["val"]), (test, paths["test"])):
        check_provenance(split.provenance, identity(train.provenance), source=path)
    device = resolve_device(params.train.device)
    names = train.provenance["class_names"]
    fit = shots.head_fit(params.train, num_classes=len(names))
    table = shots.learning_curve(
        train, val, test, fit, params.curve, seed=params.seed, standardize=params.train.standardize,
        knn_cfg=params.evaluate, device=device,
    )  # fmt: skip
    with replaced(args.out) as out:
        out.mkdir(parents=True)
        with open(out / TABLE, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=shots.COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows({k: f"{v:.6f}" if isinstance(v, float) else v for k, v in row.items()} for row in table)


if __name__ == "__main__":
    run_stage(main)
