"""`python -m pipeline.compare --all`'s own work at scale: 10 experiments against their baseline, 10,000 test
images each, on this machine's CPU. Target: under 10 s.

    python -m bench.compare            # report in bench/results/compare.md
    python -m bench.compare --quick    # a smoke run with tiny sizes, report in a temporary directory

Timed: parsing each predictions.csv's text, pairing by key, McNemar, the paired bootstraps (head and k-NN) and the
text, as compare's ``against`` and ``as_text`` do it; not DVC's reads, which are timed apart: one dvc.api.read of a
10,000-row file, DVC-tracked in a throwaway Git repository, at HEAD (the import of dvc excluded).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.__main__ import save_report
from pipeline import compare, pairing

FULL = {"experiments": 10, "images": 10_000}
QUICK = {"experiments": 2, "images": 500}


def predictions_text(rng: np.random.Generator, keys: list[str], *, accuracy: float) -> str:
    """A predictions.csv of a run right on about ``accuracy`` of the images, rows in a random order."""
    head, knn = rng.random(len(keys)) < accuracy, rng.random(len(keys)) < accuracy - 0.02
    rows = [
        f"test/{i},{keys[i]},cat,{'cat' if head[i] else 'dog'},0.7,0.7,{int(knn[i])}"
        for i in rng.permutation(len(keys))
    ]
    return "\n".join([",".join(pairing.COLUMNS), *rows]) + "\n"


def bench(sizes: dict[str, int], *, rounds: int, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    keys = [f"{k:032x}" for k in rng.integers(0, 2**62, sizes["images"])]
    names = ["HEAD"] + [f"exp-{i}" for i in range(sizes["experiments"])]
    texts = {name: predictions_text(rng, keys, accuracy=0.90 + 0.004 * i) for i, name in enumerate(names)}
    baseline, experiments = compare.Side("HEAD"), [compare.Side(name) for name in names[1:]]

    def read(side: compare.Side) -> pairing.Predictions:
        return pairing.parse_predictions(texts[side.name], source=side.name)

    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        results, skipped = compare.against(baseline, experiments, read)
        text = compare.as_text(results, skipped, baseline=baseline)
        seconds.append(time.perf_counter() - start)
    start = time.perf_counter()
    for name in names:
        read(compare.Side(name))
    parsing = (time.perf_counter() - start) / len(names)
    return {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{os.getloadavg()[0]:.1f} at the end (other work beside it)", **sizes,
        "median_s": statistics.median(seconds), "runs_s": seconds, "parse_s": parsing,
        "bootstrap_resamples": pairing.BOOTSTRAP_RESAMPLES, "read": dvc_read(texts["HEAD"]), "output": text,
    }  # fmt: skip


def dvc_read(text: str) -> dict[str, float]:
    """Seconds of dvc.api.read of ``text`` as a DVC-tracked file at HEAD: the first call and the next."""
    import dvc.api

    with tempfile.TemporaryDirectory() as tmp:
        env = os.environ | {"DVC_NO_ANALYTICS": "1"}
        who = ["-c", "user.email=bench@example.com", "-c", "user.name=bench"]
        (Path(tmp) / "predictions.csv").write_text(text)
        for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"], ["dvc", "add", "-q", "predictions.csv"],
                    ["git", "add", "-A"], ["git", *who, "commit", "-qm", "predictions"]):  # fmt: skip
            subprocess.run(cmd, cwd=tmp, env=env, check=True, capture_output=True)
        seconds = []
        for _ in range(2):
            start = time.perf_counter()
            assert dvc.api.read("predictions.csv", repo=tmp, rev="HEAD") == text
            seconds.append(time.perf_counter() - start)
    return {"first_s": seconds[0], "next_s": seconds[1]}


def markdown(r: dict[str, Any]) -> str:
    runs = ", ".join(f"{s:.2f}" for s in r["runs_s"])
    verdict = "**within**" if r["median_s"] < 10 else "**over**"
    first_block = r["output"].split("\n\n")[1]
    return "\n".join([
        "# compare --all: the paired statistics of many experiments",
        "",
        f"{r['machine']}; {r['experiments']} experiments against their baseline, {r['images']:,} test images each, "
        f"head and k-NN ({2 * r['experiments']} comparisons, {r['bootstrap_resamples']:,} bootstrap resamples each). "
        f"Median of {len(r['runs_s'])} runs.",
        "",
        "| what | seconds |",
        "|---|---|",
        f"| `compare --all`'s core: parse, pair, McNemar, bootstraps, text (target: under 10 s, {verdict}) | "
        f"{r['median_s']:.2f} (runs {runs}) |",
        f"| of which parsing one predictions.csv of {r['images']:,} rows | {r['parse_s']:.3f} |",
        f"| one `dvc.api.read` of that file, DVC-tracked, at HEAD: the first call | {r['read']['first_s']:.2f} |",
        f"| the same, the next call | {r['read']['next_s']:.2f} |",
        "",
        f"With the reads, `--all` takes about {r['median_s']:.1f} s + {r['experiments'] + 1} reads, plus DVC's start "
        "and `dvc exp show`. The first block of the output:",
        "",
        "```",
        first_block,
        "```",
        "",
    ])  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, report in a temporary directory")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="report directory (default: bench/results)")
    args = parser.parse_args()
    report = bench(QUICK if args.quick else FULL, rounds=args.rounds)
    save_report(args.out, args.quick, "compare", markdown(report), report)


if __name__ == "__main__":
    main()
