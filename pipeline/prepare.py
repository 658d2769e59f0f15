"""Stage `prepare`: list the labelled images of the configured source and split them into train/val/test."""

from __future__ import annotations

import argparse
import collections
import logging
from pathlib import Path

from pipeline import sources
from pipeline.config import load_params, to_dict
from pipeline.errors import run_stage

log = logging.getLogger(__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True, help="directory for manifest.csv and classes.json")
    args = parser.parse_args()
    params = load_params()
    log.info("data params: %s", to_dict(params.data))
    items, classes = sources.discover(params.data, params.seed)
    sources.write_manifest(args.out, items, classes)
    counts = collections.Counter(it.split for it in items)
    log.info("%d classes; %s", len(classes), ", ".join(f"{s}: {counts[s]}" for s in sources.SPLITS))


if __name__ == "__main__":
    run_stage(main)
