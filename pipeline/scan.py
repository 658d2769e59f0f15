"""Stage `scan`: list the files under ``data.root`` with the content key of each, and why any is unusable.

DVC runs it at every `dvc repro` (``always_changed``), and the stages after it depend on its listing, not on
the folder: DVC never hashes the folder itself, so a dangling link or an unreadable file there is reported
through ``data.on_bad_image`` instead of stopping DVC. Behind its stat cache a run reads only new and changed
files; when nothing changed, the listing keeps its bytes and nothing after it re-runs.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pipeline import folders, images, listing
from pipeline.config import load_params, with_dvc_paths
from pipeline.errors import run_stage
from pipeline.files import replaced

log = logging.getLogger(__name__)


def stat_cache(listing_path: Path) -> Path:
    """The stat cache beside the listing, outside DVC's outputs: ``data/images.csv`` -> ``data/.images-stat.json``."""
    return listing_path.with_name(f".{listing_path.stem}-stat.json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, help="CSV file for the listing: id, key, problem")
    args = with_dvc_paths(parser.parse_args(), out="images")
    cfg = load_params().data
    root, origin = Path(cfg.root), listing.Origin(cfg.source, cfg.root)
    if not folders.present(cfg.source, root) and args.out.is_file():
        listing.check_origin(args.out, origin)  # a mistyped data.root is no clone without the images
        log.warning("no images in %s: keeping the listing %s as it is (a clone without the images)", root, args.out)
        return
    ids = folders.source_ids(cfg.source, root, cfg.layout)
    check = images.image_problem if cfg.source == "imagefolder" and cfg.on_bad_image == "skip" else None
    entries = listing.scan(root, ids, stat_cache(args.out), check=check)
    with replaced(args.out) as tmp:
        listing.write(tmp, entries, origin)
    if cfg.source == "digits":
        log.info("data.source is digits, bundled with scikit-learn: no files to list")
    else:
        problems = sum(bool(e.problem) for e in entries)
        log.info("%d files under %s, %d of them unusable", len(entries), root, problems)


if __name__ == "__main__":
    run_stage(main)
