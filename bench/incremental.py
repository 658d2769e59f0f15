"""A growing image folder through `dvc repro`: what adding, deleting and touching images cost against a full
extraction, and what a no-op `dvc repro` costs on many files before and after the scan stage.

    python -m bench.incremental                    # 5,000 JPEGs at 224 px; the no-op on 20,000 small files
    python -m bench.incremental --quick            # a smoke run
    python -m bench.incremental --before <ref>     # the no-op's "before": another commit (default: the parent
                                                   # of the commit that brought the scan stage)

Growth: one project copy (VGG16 pool5, random weights, 224 px, batch 32), `dvc repro extract` (which runs scan,
prepare and extract) timed whole after each step: the full extraction; adding 1% more images; adding 5% more
on top; deleting 1%; touching every file. Each step's extracted and reused counts come from the stage's metrics.

No-op: the same 20,000 small JPEGs under two project copies, one at ``--before`` (the folder a DVC dependency of
prepare) and one of this tree (the scan stage), each reproduced once, then `dvc repro prepare` timed on both,
alternating, ``--rounds`` times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.__main__ import params_for, save_report
from bench.images import make_jpegs

REPO = Path(__file__).resolve().parents[1]
BEFORE = "692c82c"  # main before the scan stage and the row store
FILES = ("dvc.yaml", "params.yaml", "pipeline", ".dvc/config", ".dvc/.gitignore", ".dvcignore", ".gitignore")


def project(src: Path, dest: Path, extract: dict[str, Any], images: Path | None = None) -> Path:
    """A git-committed project at ``dest`` from the files of ``src``, with ``data.root: data/raw`` (hard links to
    ``images`` when given; git ignores them, as it would images tracked by `dvc add`)."""
    for name in FILES:
        if (src / name).exists():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if (src / name).is_dir() else shutil.copy2)(src / name, dest / name)
    if images:
        shutil.copytree(images, dest / "data" / "raw", copy_function=os.link)
    params = params_for(Path("data/raw"), extract)
    known = yaml.safe_load((src / "params.yaml").read_text())  # an older tree may lack newer keys
    params = {s: {k: v for k, v in p.items() if k in known[s]} if isinstance(p, dict) else p for s, p in params.items()}
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git(dest, "init", "-q")
    (dest / ".git" / "info" / "exclude").write_text("/data/raw/\n")
    git(dest, "add", "-A")
    git(dest, "commit", "-qm", "bench")
    return dest


def git(cwd: Path, *args: str) -> str:
    ident = ["-c", "user.email=bench@example.com", "-c", "user.name=bench"]
    return subprocess.run(["git", *ident, *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def dvc(cwd: Path, *args: str) -> float:
    """Wall seconds of ``dvc args`` in ``cwd``, with the project's own pipeline package."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # `python` in dvc.yaml is this one
    env = os.environ | {"PYTHONPATH": str(cwd), "DVC_NO_ANALYTICS": "1", "PATH": path}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"dvc {' '.join(args)} failed in {cwd}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return wall


def growth(work: Path, n: int) -> dict[str, Any]:
    proj = project(REPO, work / "growth", {"arch": "vgg16", "image_size": 224, "batch_size": 32})
    images = make_jpegs(proj / "data" / "raw", n, size=(320, 240), workers=-1)
    files = sorted(images.rglob("*.jpg"))
    steps: dict[str, dict[str, Any]] = {}
    metrics_file = proj / "reports" / "extract" / "metrics.json"

    def step(name: str) -> None:
        last = metrics_file.stat().st_mtime_ns if metrics_file.exists() else None
        wall = dvc(proj, "repro", "extract")
        ran = metrics_file.stat().st_mtime_ns != last
        metrics = json.loads(metrics_file.read_text()) if ran else {}
        steps[name] = {"wall_s": wall, "images": sum(1 for _ in images.rglob("*.jpg")), "extract_ran": ran}
        steps[name] |= metrics
        print(f"{name}: {wall:.1f} s, {metrics or 'extract did not run'}", flush=True)

    step("full")
    make_jpegs(images, n + n // 100, size=(320, 240), workers=-1)  # new files get new indices: nothing rewritten
    step("add 1%")
    make_jpegs(images, n + n // 100 + n // 20, size=(320, 240), workers=-1)
    step("add 5% more")
    for f in files[::100][: n // 100]:
        f.unlink()
    step("delete 1%")
    for f in images.rglob("*.jpg"):
        f.touch()
    step("touch all")
    full = steps["full"]["wall_s"]
    for s in steps.values():
        s["of_full"] = s["wall_s"] / full
    store = proj / "data" / ".feature-store"
    store_bytes = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    return {"n": n, "steps": steps, "store_bytes": store_bytes}


def noop(work: Path, n: int, rounds: int, before: str) -> dict[str, Any]:
    images = make_jpegs(work / "noop-images", n, size=(64, 48), workers=-1)  # about 1.5 KB each
    old = work / "before-tree"
    old.mkdir()
    archive = subprocess.run(["git", "archive", before], cwd=REPO, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    fast = {"arch": "vgg11", "image_size": 32, "batch_size": 64}
    variants = {
        "before": project(old, work / "noop-before", fast, images),
        "after": project(REPO, work / "noop-after", fast, images),
    }
    for proj in variants.values():
        dvc(proj, "repro", "prepare")
    times: dict[str, list[float]] = {v: [] for v in variants}
    for k in range(rounds):
        for v in list(variants)[k % 2 :] + list(variants)[: k % 2]:
            times[v].append(dvc(variants[v], "repro", "prepare"))
    median = {v: statistics.median(t) for v, t in times.items()}
    return {"n": n, "before": before, "times": times, "median": median, "ratio": median["after"] / median["before"]}


def markdown(report: dict[str, Any]) -> str:
    g, z = report["growth"], report["noop"]
    lines = [
        "# A growing folder: incremental extraction through `dvc repro`",
        "",
        f"{report['machine']}; VGG16 pool5, random weights, 224 px, batch 32, {g['n']:,} JPEGs of 320×240. "
        "Each step is `dvc repro extract` (scan, prepare, extract), timed whole.",
        "",
        "| step | images | extracted | reused | wall s | of the full run | target |",
        "|---|---|---|---|---|---|---|",
    ]
    targets = {"add 1%": "≤ 8%", "add 5% more": "≤ 15%", "delete 1%": "≤ 5%", "touch all": "≤ 5%"}
    for name, s in g["steps"].items():
        lines.append(
            f"| {name} | {s['images']:,} | {s.get('extracted', 'not run')} | {s.get('reused', '–')} "
            f"| {s['wall_s']:.1f} | {100 * s['of_full']:.1f}% | {targets.get(name, '')} |"
        )
    lines += [
        "",
        "“not run”: DVC ran no stage after scan, whose listing kept its bytes.",
        f"Row store on disk after the last step: {g['store_bytes'] / 2**20:.1f} MiB.",
        "",
        f"## No-op `dvc repro prepare` on {z['n']:,} small JPEGs",
        "",
        f"Before: commit {z['before']} (data.root a DVC dependency); after: this tree (the scan stage). "
        f"Median of {len(z['times']['after'])} alternating runs each.",
        "",
        "| variant | median s | runs s |",
        "|---|---|---|",
    ]
    for v in ("before", "after"):
        lines.append(f"| {v} | {z['median'][v]:.2f} | {', '.join(f'{t:.2f}' for t in z['times'][v])} |")
    lines += ["", f"After / before: **{z['ratio']:.2f}×** (target ≤ 2×)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200 images and 500 small files; a temporary report")
    parser.add_argument("--n", type=int, default=5000, help="images of the growth run")
    parser.add_argument("--noop-files", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--before", default=BEFORE, help="the commit the no-op is compared with")
    parser.add_argument("--out", type=Path, help="report directory (default: bench/results)")
    args = parser.parse_args()
    n, files, rounds = (200, 500, 2) if args.quick else (args.n, args.noop_files, args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        report = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "growth": growth(Path(tmp), n),
            "noop": noop(Path(tmp), files, rounds, args.before),
        }
    save_report(args.out, args.quick, "incremental", markdown(report), report)


if __name__ == "__main__":
    main()
