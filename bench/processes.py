"""How the extract stage is launched: one plain process, N processes from its own launcher, and the earlier
``torchrun --standalone`` launch of one process, on the same JPEGs.

    python -m bench.processes                           # 224 px JPEGs, nproc 1 and 2, three rounds
    python -m bench.processes --nproc 1 2 4 8 --images 20000 --image-size 224 --device cuda
    python -m bench.processes --quick

Runs the stage's command from dvc.yaml (``python -m pipeline.extract``) with ``extract.nproc`` set to each N,
and ``torchrun-1``, the command the stage had before it launched its own processes. The variants alternate
round after round so that drift on a shared machine hits all of them alike; the report gives the median of
each: the stage's wall time (process start-up included) and its images/s after the first batch of every process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from bench.__main__ import measured, params_for, with_rate
from bench.images import make_jpegs

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def command(variant: str) -> tuple[list[str], int]:
    """The command line of ``variant`` and the ``extract.nproc`` it runs with."""
    stage = ["-m", "pipeline.extract", "--prepared", "prepared", "--out", "features", "--metrics", "m.json"]
    stage += ["--stats", "s.json"]
    if variant == "torchrun-1":
        return [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=1", *stage], 1
    return [sys.executable, *stage], int(variant.removeprefix("nproc-"))


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    root = make_jpegs(work / "images", args.images)
    extract = {
        "arch": "vgg16", "image_size": args.image_size, "batch_size": args.batch_size,
        "num_workers": args.num_workers, "device": args.device,
    }  # fmt: skip
    measured([sys.executable, "-m", "pipeline.scan", "--out", "images.csv"], _at(work, root, extract))
    prepare = ["--images", "images.csv", "--out", "prepared", "--metrics", "prepare.json"]
    measured([sys.executable, "-m", "pipeline.prepare", *prepare], work)
    variants = ["torchrun-1"] + [f"nproc-{n}" for n in args.nproc]
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for v in variants:
            cmd, nproc = command(v)
            shutil.rmtree(work / ".feature-store", ignore_errors=True)  # every run extracts every image
            wall, _peak = measured(cmd, _at(work, root, extract | {"nproc": nproc}))
            runs[v].append(with_rate(json.loads((work / "s.json").read_text())) | {"wall_s": wall})
    for rs in runs.values():
        for r in rs:  # what the launch costs: the wall time outside the extraction itself
            r["outside_s"] = r["wall_s"] - r["seconds"]
    keys = ("wall_s", "outside_s", "images_per_s", "seconds")
    median = {v: {key: statistics.median(r[key] for r in rs) for key in keys} for v, rs in runs.items()}
    return {
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "settings": vars(args) | {"nproc": args.nproc},
        "runs": runs,
        "median": median,
    }


def _at(work: Path, root: Path, extract: dict[str, Any]) -> Path:
    """``work``, with a params.yaml for ``extract``."""
    (work / "params.yaml").write_text(yaml.safe_dump(params_for(root, extract)))
    return work


def markdown(report: dict[str, Any]) -> str:
    s, med = report["settings"], report["median"]
    base = med["torchrun-1"]
    lines = [
        "# Launching the extract stage",
        "",
        f"{report['machine']['processor']}, {report['machine']['cpus']} CPUs; VGG16 pool5, random weights, "
        f"{s['images']} JPEGs (500×375) at {s['image_size']} px, batch {s['batch_size']}, "
        f"{s['num_workers']} decode workers per process, device {s['device']}; median of {s['rounds']} rounds, "
        "the variants alternating. `nproc-N` is the stage's command with `extract.nproc: N` (1: a plain process; "
        "more: its own elastic launcher); `torchrun-1` is the earlier `torchrun --standalone --nproc_per_node=1`.",
        "",
        "Outside the extraction: the stage's wall time less the time from the first process's start of "
        "extraction to the last file written (imports, launch, model build, exit).",
        "",
        "| variant | stage wall s | vs torchrun-1 | outside the extraction s | vs torchrun-1 "
        "| images/s after the first batch | vs torchrun-1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for v, m in med.items():
        lines.append(
            f"| {v} | {m['wall_s']:.2f} | {m['wall_s'] - base['wall_s']:+.2f} s | {m['outside_s']:.2f} "
            f"| {m['outside_s'] - base['outside_s']:+.2f} s | {m['images_per_s']:.1f} "
            f"| {m['images_per_s'] / base['images_per_s']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--images", type=int, default=480)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="32 images at 64 px, one round, temporary report")
    parser.add_argument("--out", type=Path, help="report directory (default: bench/results, name processes-<device>)")
    args = parser.parse_args()
    if args.quick:
        args.images, args.image_size, args.rounds = 32, 64, 1
    with tempfile.TemporaryDirectory() as tmp:
        report = run(args, Path(tmp))
    text = markdown(report)
    print(text)
    out = args.out or (Path(tempfile.mkdtemp()) if args.quick else RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    cuda = "cuda" in args.device or (args.device == "auto" and torch.cuda.is_available())
    name = f"processes-{'cuda' if cuda else 'cpu'}"
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"report: {out / name}.md")


if __name__ == "__main__":
    main()
