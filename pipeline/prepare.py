"""Stage `prepare`: list the labelled images of the configured source and split them into train/val/test."""

from __future__ import annotations

import argparse
import collections
import csv
import json
import logging
from pathlib import Path

from pipeline import corrections, listing, sources
from pipeline.config import load_params, to_dict, with_dvc_paths
from pipeline.errors import run_stage
from pipeline.files import replaced

log = logging.getLogger(__name__)

SKIPPED = "skipped.csv"


def write_skipped(path: Path, bad: dict[str, str]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["id", "reason"])
        writer.writerows(sorted(bad.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=Path, help="the scan stage's listing of data.root")
    parser.add_argument("--out", type=Path, help="directory for manifest.csv and classes.json")
    parser.add_argument("--metrics", type=Path, help="JSON file for image counts")
    parser.add_argument("--corrections", type=Path, help="CSV of images to drop or relabel (pipeline.corrections)")
    args = with_dvc_paths(
        parser.parse_args(), images="images", out="prepared", metrics="prepare_metrics", corrections="corrections"
    )
    params = load_params()
    cfg = params.data
    log.info("data params: %s", to_dict(cfg))
    fixes = corrections.read(args.corrections)  # a bad row stops the run before any listing work
    origin = listing.Origin(cfg.source, cfg.root)
    entries = listing.read(args.images, origin) if cfg.source == "imagefolder" else None
    bad = listing.unusable(entries, cfg.on_bad_image) if entries is not None else {}  # under raise, scan stops first
    for image_id, reason in sorted(bad.items()):
        log.warning("skipping %s: %s", image_id, reason)
    items, classes = sources.discover(cfg, params.seed, entries, exclude=frozenset(bad))
    items, fixed = corrections.apply(items, classes, fixes)  # after the splits: a relabelled image keeps its split
    log.info("corrections (%s): %s", args.corrections, ", ".join(f"{n} {what}" for what, n in fixed.items()))
    with replaced(args.out) as out:
        sources.write_manifest(out, items, classes)
        write_skipped(out / SKIPPED, bad)
    counts = collections.Counter(it.split for it in items)
    summary = {"skipped": len(bad), "corrected": fixed["dropped"] + fixed["relabeled"]}
    summary |= {split: counts[split] for split in sources.SPLITS}  # images: their sum
    with replaced(args.metrics) as metrics:
        metrics.write_text(json.dumps(summary, indent=1) + "\n")
    log.info(
        "%d classes; %s; %d skipped", len(classes), ", ".join(f"{s}: {counts[s]}" for s in sources.SPLITS), len(bad)
    )


if __name__ == "__main__":
    run_stage(main)
