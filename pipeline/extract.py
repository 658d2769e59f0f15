"""Stage `extract`: run the frozen backbone once over every split and cache its features in HDF5.

With ``extract.nproc: 1`` this is one plain process; with more it starts that many workers on this machine
(one per GPU) with PyTorch's elastic launcher. Under your own ``torchrun`` (several machines) each process
is one worker and ``extract.nproc`` is not used. The extraction itself is pipeline.extraction.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pipeline import distributed, listing
from pipeline.config import DataConfig, dvc_path, load_params, to_dict, with_dvc_paths
from pipeline.distributed import World
from pipeline.errors import PipelineError, importing, run_stage
from pipeline.files import replaced
from pipeline.store import STORE_DIR

log = logging.getLogger(__name__)


def _listed(cfg: DataConfig) -> frozenset[bytes]:
    """The content keys of the scan stage's listing, when it lists this source and root: rows to keep."""
    try:
        path = dvc_path("images")
        entries = listing.read(path, listing.Origin(cfg.source, cfg.root)) if path.is_file() else []
    except PipelineError:  # no dvc.yaml here, or a listing of another root: keep the manifest's rows alone
        return frozenset()
    return frozenset(bytes.fromhex(e.key) for e in entries if e.key)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prepared", type=Path, help="directory with manifest.csv and classes.json")
    parser.add_argument("--out", type=Path, help="directory for train.h5, val.h5, test.h5")
    parser.add_argument("--metrics", type=Path, help="JSON file for the images extracted and images/s")
    parser.add_argument("--stats", type=Path, help="also write every timing of the run here, as JSON (benchmarks)")
    args = with_dvc_paths(parser.parse_args(), prepared="prepared", out="features", metrics="extract_metrics")
    params = load_params()
    if params.extract.nproc > 1 and not distributed.launched():
        nproc = params.extract.nproc
        distributed.device(params.extract.device, World(size=nproc, local_size=nproc))  # its errors, once, here
        sys.exit(distributed.launch(nproc, "pipeline.extract", sys.argv[1:]))
    world = World.from_env()
    distributed.die_with_launcher()
    with distributed.joined(world):
        # processes on machines that do not share the project stop here, before any of them loads the network
        distributed.check_shared(args.out.parent / STORE_DIR, world)
        with importing():  # the network and its libraries, torchvision's and HDF5's among them: a launcher
            from pipeline.extraction import extract  # (above) only starts the workers, 0.9 s sooner without them
        if world.main:
            log.info("extract params: %s", to_dict(params.extract))
        keep = _listed(params.data) if world.main else frozenset()  # rank 0 alone compacts the store
        stats = extract(params, args.prepared, args.out, world, keep=keep)
    if stats is None:
        return
    # results only, short keys: `dvc metrics show` puts every key of every metrics file in one line (at most 160
    # columns); the speed and the settings of the run are in the log, and all of its figures in --stats
    headline = {"extracted": stats["images"], "reused": stats["reused"]}
    with replaced(args.metrics) as tmp:
        tmp.write_text(json.dumps(headline, indent=1) + "\n")
    if args.stats:
        with replaced(args.stats) as tmp:
            tmp.write_text(json.dumps(stats, indent=2) + "\n")


if __name__ == "__main__":
    run_stage(main)
