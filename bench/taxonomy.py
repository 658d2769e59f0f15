"""A big taxonomy through the whole pipeline: 25,000 classes (ImageNet-21k's scale) of 3 tiny images each, the
fewest that a train/val/test split allows, through every `dvc repro` stage, `dvc metrics show`, `dvc plots show`,
`pipeline.predict` and `pipeline.export`; each step's wall time and peak memory.

    python -m bench.taxonomy                    # 25,000 classes; about 20 minutes on 2 cores
    python -m bench.taxonomy --classes 500      # a smoke run, with a temporary report (--quick)

VGG11 pool5 with random weights at 32 px (the network is not what is measured here: the class count is), a
linear head trained for 3 epochs, `data.layout: classes`.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from bench.__main__ import save_report
from bench.incremental import REPO, project

EXTRACT = {"arch": "vgg11", "image_size": 32, "batch_size": 256}
TRAIN = {"head": "linear", "epochs": 3}


def make_folder(root: Path, classes: int, per_class: int, *, seed: int = 0) -> Path:
    """``classes`` folders of ``per_class`` 8x8 PNGs; a class's images share a colour, so they are told apart."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"n{c:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        colour = rng.integers(0, 256, size=3, dtype=np.uint8)
        for i in range(per_class):
            pixels = np.clip(colour + rng.integers(-20, 21, size=(8, 8, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def timed(cwd: Path, *args: str) -> dict[str, Any]:
    """Wall seconds and peak resident memory (MiB, the largest process) of a command run in ``cwd``."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # `python` in dvc.yaml is this one
    env = os.environ | {"PYTHONPATH": str(cwd), "DVC_NO_ANALYTICS": "1", "PATH": path}
    probe = "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
    probe += "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r.returncode)"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", probe, *args], cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed in {cwd}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    peak_kib = int(proc.stderr.strip().splitlines()[-1])
    return {"wall_s": wall, "peak_mib": peak_kib / 1024, "stdout": proc.stdout}


def run(work: Path, classes: int, per_class: int) -> dict[str, Any]:
    images = make_folder(work / "images", classes, per_class)
    proj = project(REPO, work / "project", EXTRACT, images)
    shutil.copytree(REPO / ".dvc" / "plots", proj / ".dvc" / "plots")  # the project's own plot templates
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["data"]["layout"] = "classes"
    params["train"].update(TRAIN)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    steps: dict[str, dict[str, Any]] = {}
    dvc = [sys.executable, "-m", "dvc"]
    for stage in ("scan", "prepare", "extract", "train", "evaluate"):
        steps[stage] = timed(proj, *dvc, "repro", "--single-item", stage)
        print(f"{stage}: {steps[stage]['wall_s']:.1f} s, {steps[stage]['peak_mib']:.0f} MiB", flush=True)
    steps["dvc metrics show"] = timed(proj, *dvc, "metrics", "show")
    steps["dvc plots show"] = timed(proj, *dvc, "plots", "show", "-o", str(work / "plots"))
    some = [str(p) for p in sorted((proj / "data" / "raw").glob("n0000000*/0.png"))]
    steps["predict"] = timed(proj, sys.executable, "-m", "pipeline.predict", *some)
    steps["export"] = timed(proj, sys.executable, "-m", "pipeline.export")
    for name in ("dvc metrics show", "dvc plots show", "predict", "export"):
        print(f"{name}: {steps[name]['wall_s']:.1f} s, {steps[name]['peak_mib']:.0f} MiB", flush=True)
    metrics = steps["dvc metrics show"]["stdout"]
    page = work / "plots" / "index.html"
    outputs = {
        "metrics_show": metrics,
        "metrics_width": max(map(len, metrics.splitlines())),
        "plots_page_mib": page.stat().st_size / 2**20 if page.is_file() else None,
        "features_mib": sum(p.stat().st_size for p in (proj / "data" / "features").glob("*.h5")) / 2**20,
        "per_class_records": (proj / "reports" / "evaluate" / "per_class.json").read_text().count('"class"'),
    }
    for step in steps.values():
        del step["stdout"]
    return {"classes": classes, "per_class": per_class, "steps": steps, "outputs": outputs}


def markdown(report: dict[str, Any]) -> str:
    r = report["run"]
    o = r["outputs"]
    lines = [
        f"# {r['classes']:,} classes through the whole pipeline",
        "",
        f"{report['machine']}; {r['classes']:,} classes of {r['per_class']} 8×8 PNGs (`data.layout: classes`), "
        "VGG11 pool5, random weights, 32 px, batch 256; a linear head, 3 epochs. Each stage is "
        "`dvc repro --single-item <stage>`, timed whole; memory is the largest process's peak.",
        "",
        "| step | wall s | peak MiB |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {s['wall_s']:.1f} | {s['peak_mib']:.0f} |" for name, s in r["steps"].items()]
    lines += [
        "",
        f"Features on disk: {o['features_mib']:.1f} MiB. The per-class plot holds {o['per_class_records']:,} "
        f"classes. The `dvc plots show` page: {o['plots_page_mib'] or 0:.1f} MiB. `dvc metrics show`, "
        f"{o['metrics_width']} columns:",
        "",
        "```",
        o["metrics_show"].rstrip(),
        "```",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=25_000)
    parser.add_argument("--per-class", type=int, default=3, help="3: one image for each of train, val and test")
    parser.add_argument("--out", type=Path, help="report directory (default: bench/results)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        report = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "run": run(Path(tmp), args.classes, args.per_class),
        }
    quick = args.classes < 25_000
    save_report(args.out, quick, "taxonomy" if not quick else f"taxonomy-{args.classes}", markdown(report), report)


if __name__ == "__main__":
    main()
