"""Stage `scan`: list the files under ``data.root`` with the content key of each, and why any is unusable.

DVC runs it at every `dvc repro` (``always_changed``), and the stages after it depend on its listing, not on
the folder: DVC never hashes the folder itself, so a dangling link or an unreadable file there is reported
through ``data.on_bad_image`` instead of stopping DVC. Behind its stat cache a run reads only new and changed
files; when nothing changed, the listing keeps its bytes and nothing after it re-runs.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
from pathlib import Path

from pipeline import folders, listing
from pipeline.config import ExtractConfig, load_params, with_dvc_paths
from pipeline.errors import run_stage
from pipeline.files import replaced

log = logging.getLogger(__name__)

# data.on_bad_image -> how far scan checks each image (listing.CHECKS): under raise, a file that Pillow cannot
# identify stops the run here; under skip, every image is decoded once, so that prepare leaves the bad ones out
CHECK = {"raise": "header", "skip": "decode"}


def stat_cache(listing_path: Path) -> Path:
    """The stat cache beside the listing, outside DVC's outputs: ``data/images.csv`` -> ``data/.images-stat.json``."""
    return listing_path.with_name(f".{listing_path.stem}-stat.json")


def check_backbone(cfg: ExtractConfig, passed: Path) -> None:
    """``backbones.check``: a typo in the backbone's name, layer, pool or weights file stops the run here, before
    DVC removes the extract stage's outputs. Skipped when these settings passed it last time (``passed`` keeps
    them, outside DVC's outputs): importing torch would add about 3 s to every `dvc repro`, a head experiment's
    too."""
    weights = Path(cfg.weights)
    seen = {
        "extract": [cfg.arch, cfg.layer, cfg.pool, cfg.weights],
        "file": [weights.stat().st_size, weights.stat().st_mtime_ns] if weights.is_file() else None,
        "versions": {name: _version(name) for name in ("torch", "torchvision", "timm")},
    }
    if passed.is_file() and json.loads(passed.read_text()) == seen:
        return
    from pipeline import backbones  # torch and torchvision: only when the settings changed

    backbones.check(cfg)
    passed.parent.mkdir(parents=True, exist_ok=True)
    passed.write_text(json.dumps(seen) + "\n")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, help="CSV file for the listing: id, key, problem")
    args = with_dvc_paths(parser.parse_args(), out="images")
    params = load_params()
    check_backbone(params.extract, args.out.with_name(f".{args.out.stem}-backbone.json"))
    cfg = params.data
    root, origin = Path(cfg.root), listing.Origin(cfg.source, cfg.root)
    absent = not folders.present(cfg.source, root)
    if absent and args.out.is_file() and listing.read_origin(args.out) == origin:
        queued = ".dvc/tmp/exps" in Path.cwd().as_posix()  # a queued or --temp experiment's copy of the project
        hint = ": queued runs see only what Git and DVC track (dvc add data/raw, README)" if queued else ""
        log.warning("no images in %s: keeping the listing %s as it is (a clone without the images)%s", root, args.out,
                    hint)  # fmt: skip
        return
    folders.check_root(cfg.source, root, download=cfg.download)  # a missing data.root is said first
    if absent and args.out.is_file():
        listing.check_origin(args.out, origin)  # a listing of another root: a mistyped data.root must not reuse it
    ids = folders.source_ids(cfg.source, root, cfg.layout)
    check = CHECK[cfg.on_bad_image] if cfg.source == "imagefolder" else "none"
    entries = listing.scan(root, ids, stat_cache(args.out), check=check)
    with replaced(args.out) as tmp:
        listing.write(tmp, entries, origin)
    if cfg.source == "digits":
        log.info("data.source is digits, bundled with scikit-learn: no files to list")
    else:
        problems = sum(bool(e.problem) for e in entries)
        log.info("%d files under %s, %d of them unusable", len(entries), root, problems)
    if cfg.source == "imagefolder":
        listing.unusable(entries, cfg.on_bad_image)  # under raise, the first one stops the run here, before any split


if __name__ == "__main__":
    run_stage(main)
