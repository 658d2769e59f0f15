"""Stage `prepare`: list the labelled images of the configured source and split them into train/val/test."""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import csv
import json
import logging
import os
from pathlib import Path

from tqdm import tqdm

from pipeline import images, sources
from pipeline.config import DataConfig, load_params, to_dict, with_dvc_paths
from pipeline.errors import run_stage
from pipeline.files import replaced

log = logging.getLogger(__name__)

SKIPPED = "skipped.csv"


def find_bad_images(cfg: DataConfig) -> dict[str, str]:
    """Decode every image of an imagefolder root once, in parallel; returns {id: reason} for the unreadable ones."""
    ids = sources.imagefolder_ids(cfg)
    root = Path(cfg.root)
    with concurrent.futures.ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        problems = pool.map(images.image_problem, [root / i for i in ids], chunksize=64)
        checked = tqdm(problems, total=len(ids), desc="check images", unit="img", dynamic_ncols=True)
        return {i: problem for i, problem in zip(ids, checked, strict=True) if problem}


def write_skipped(path: Path, bad: dict[str, str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["id", "reason"])
        writer.writerows(sorted(bad.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, help="directory for manifest.csv and classes.json")
    parser.add_argument("--metrics", type=Path, help="JSON file for image counts")
    args = with_dvc_paths(parser.parse_args(), out="prepared", metrics="prepare_metrics")
    params = load_params()
    cfg = params.data
    log.info("data params: %s", to_dict(cfg))
    bad = find_bad_images(cfg) if cfg.source == "imagefolder" and cfg.on_bad_image == "skip" else {}
    for image_id, reason in sorted(bad.items()):
        log.warning("skipping %s: %s", image_id, reason)
    items, classes = sources.discover(cfg, params.seed, exclude=frozenset(bad))
    with replaced(args.out) as out:
        sources.write_manifest(out, items, classes)
        write_skipped(out / SKIPPED, bad)
    counts = collections.Counter(it.split for it in items)
    # short keys: `dvc metrics show` puts every key of every metrics file in one line
    summary = {"images": len(items), "skipped": len(bad)} | {split: counts[split] for split in sources.SPLITS}
    with replaced(args.metrics) as metrics:
        metrics.write_text(json.dumps(summary, indent=1) + "\n")
    log.info(
        "%d classes; %s; %d skipped", len(classes), ", ".join(f"{s}: {counts[s]}" for s in sources.SPLITS), len(bad)
    )


if __name__ == "__main__":
    run_stage(main)
