"""Backbones side by side on this machine: each one's extraction against its bare network, and what decoding costs.

    python -m bench.backbones            # vgg16, resnet50, convnext_tiny, vit_b_16 at 224 px, vgg16 at 64 px
    python -m bench.backbones --quick    # a smoke run (vgg16 at 64 px, 2 s a side), report in a temporary directory
    python -m bench.backbones --render   # measure nothing: rewrite backbones.md from backbones.json

For each case, in rounds: the pipeline's own extraction (``python -m pipeline.extract`` in a process of its own,
decoding 500x375 JPEGs in its decode workers) and BARES processes of the bare network on uint8 batches in memory
(``bench.ceiling``: the same threads, batch size, channels_last and autocast precision), run interleaved by
``bench.ceiling.paired`` until each has had SECONDS of running time after its first batch, so that other load and
the host's CPU bursts fall on all alike (bench/results/ceiling.md: why the short burst of old was no ceiling).
The ceiling is the best of the bare processes: identical processes run at rates up to 5% apart, each steadily for
its whole life (ceiling.md), so that one bare process could be an unlucky one. Each round gives pipeline /
ceiling; the report has every round's, their median and range. Targets: at least 85% of the ceiling for vgg16, 75%
for the others. A ratio above 1.0 is a defect of the benchmark and is flagged.

The profile beside it says what stands between the two: the per-image decode-and-resize time on one core, the
CPU seconds the decode workers took against the pipeline's own process, and that process's CPU per batch against
the bare network's (the network slowed by sharing its cores).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.ceiling import Side, bare_side, paired
from bench.images import make_jpegs
from pipeline.config import ExtractConfig
from pipeline.hardware import decode_workers, resolve_device, resolve_precision

CASES = ("vgg16@224", "resnet50@224", "convnext_tiny@224", "vit_b_16@224", "vgg16@64")  # arch@image size
TARGETS = {"vgg16": 0.85}  # of the ceiling; every other arch: DEFAULT_TARGET
DEFAULT_TARGET = 0.75
BATCH = 32
SECONDS = 30.0  # running time of each side after its first batch: at least 30 s, as a real extraction's span
BARES = 3  # bare processes a round: the ceiling is the best of them
IMAGES = {224: 3000, 64: 12000}  # more than either side gets through in SECONDS: the pipeline is stopped, not done


def decode_ms(root: Path, arch: str, image_size: int, n: int = 48) -> float:
    """Median milliseconds to open, decode (``decode: fast``) and resize-crop one JPEG, on one core."""
    from pipeline.backbones import build_extractor
    from pipeline.images import open_image

    _, prep, _ = build_extractor(ExtractConfig(arch=arch, weights="random", image_size=image_size), 0)
    files = sorted(root.rglob("*.jpg"))[:n]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = []
        for f in files:
            start = time.perf_counter()
            prep.to_uint8(open_image(f, reduce_for=prep.reduce_for("fast")))
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return 1000 * statistics.median(times)


def parse_case(case: str) -> tuple[str, int]:
    arch, _, size = case.partition("@")
    return arch, int(size or 224)


def one_round(
    root: Path, work: Path, case: str, precision: str, seconds: float, bare_first: bool, bares: int = BARES
) -> dict[str, Any]:
    """The pipeline and ``bares`` processes of the bare network of ``case``, interleaved (bench.ceiling.paired):
    rates, the ratio to the best bare process, and the CPU split."""
    from bench.__main__ import REPO, pipeline_run_dir

    arch, size = parse_case(case)
    tag = f"{arch.replace('/', '-')}-{size}"
    opts = {"arch": arch, "image_size": size, "batch_size": BATCH, "precision": precision}
    run_dir = pipeline_run_dir(root, work, tag, opts)
    pipe_trace = work / f"pipe-{tag}.jsonl"
    sides = [Side("pipeline", [sys.executable, "-m", "bench.ceiling", "--pipeline", f"--trace={pipe_trace}"],
                  run_dir, pipe_trace)]  # fmt: skip
    sides += [bare_side(f"bare{i}", work, work / f"bare{i}-{tag}.jsonl", **opts) for i in range(bares)]
    env = os.environ | {"PYTHONPATH": str(REPO), "DVC_NO_ANALYTICS": "1"}
    got = paired(sides[1:] + sides[:1] if bare_first else sides, seconds, env)
    pipe, bare_sides = got["pipeline"], sides[1:]
    best = max(bare_sides, key=lambda side: got[side.name]["batch_rate"])
    net = got[best.name]
    cpu_per_batch = {"pipeline": _cpu_per_batch(sides[0]), "bare": _cpu_per_batch(best)}
    return {
        "pipeline_images_per_s": BATCH * pipe["batch_rate"], "ceiling_images_per_s": BATCH * net["batch_rate"],
        "bare_images_per_s": [BATCH * got[side.name]["batch_rate"] for side in bare_sides],
        "ratio": pipe["batch_rate"] / net["batch_rate"], "bare_first": bare_first,
        "running_s": {"pipeline": pipe["running_s"], "bare": net["running_s"]},
        "threads": {"pipeline": pipe["threads"], "bare": net["threads"]},
        "cpu_s": {"pipeline": pipe["cpu_s"]["main"], "decode_workers": pipe["cpu_s"]["others"],
                  "bare": net["cpu_s"]["main"]},
        "cpu_ms_per_batch": cpu_per_batch, "others_cpu_share": got["others_cpu_share"],
    }  # fmt: skip


def _cpu_per_batch(side: Side) -> float:
    """Median CPU milliseconds of the process itself (all its threads) per batch, after its first batch."""
    lines = [json.loads(s) for s in side.trace.read_text().splitlines()]
    cpu = [x["cpu"] for x in lines if "end" in x]  # at the end of each batch
    return 1000 * statistics.median(b - a for a, b in zip(cpu, cpu[1:], strict=False)) if len(cpu) > 1 else 0.0


def run(
    work: Path, rounds: int, cases: tuple[str, ...], seconds: float, images: dict[int, int], bares: int = BARES
) -> dict[str, Any]:
    precision = resolve_precision("auto", resolve_device("auto"))
    roots = {size: make_jpegs(work / f"jpegs-{size}", images[size]) for size in {parse_case(c)[1] for c in cases}}
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in cases}
    for k in range(rounds):
        for case in cases[k % len(cases) :] + cases[: k % len(cases)]:  # each round starts one further on
            size = parse_case(case)[1]
            runs[case].append(
                one_round(roots[size], work, case, precision, seconds, bare_first=k % 2 == 1, bares=bares)
            )
            print(case, f"round {k + 1}: {runs[case][-1]['ratio']:.3f}", flush=True)
    workers = decode_workers("auto")
    report: dict[str, Any] = {"rounds": rounds, "seconds": seconds, "bares": bares, "precision": precision,
                              "images": images, "decode_workers": workers, "batch_size": BATCH,
                              "cases": {}}  # fmt: skip
    for case in cases:
        arch, size = parse_case(case)
        ratios = [r["ratio"] for r in runs[case]]
        target, ms = TARGETS.get(arch, DEFAULT_TARGET), decode_ms(roots[size], arch, size)
        report["cases"][case] = {
            "arch": arch, "image_size": size, "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
            "ratio_max": max(ratios), "target": target, "met": statistics.median(ratios) >= target,
            "above_1": max(ratios) > 1.0, "decode_ms": ms, "decode_bound_images_per_s": workers * 1000 / ms,
            "pipeline_images_per_s": statistics.median(r["pipeline_images_per_s"] for r in runs[case]),
            "ceiling_images_per_s": statistics.median(r["ceiling_images_per_s"] for r in runs[case]),
            "rounds": runs[case],
        }  # fmt: skip
    return report


def knn_line() -> list[str]:
    """The k-NN cost, from bench.knn's committed report (it has a run of its own)."""
    path = Path(__file__).parent / "results" / "knn.json"
    if not path.is_file():
        return []
    return ["", f"k-NN accuracy cost: see [knn.md](knn.md) (`python -m bench.knn`): {_knn_summary(path)}"]


def _knn_summary(path: Path) -> str:
    data = json.loads(path.read_text())
    return ", ".join(f"{k} = {v}" for k, v in data.items() if isinstance(v, (int, float)))[:300]


def markdown(report: dict[str, Any]) -> str:
    cases = report["cases"]
    rounds, bares = report["rounds"], report.get("bares", 1)
    lines = [
        "# Benchmark: backbones against their ceiling",
        "",
        f"500x375 JPEGs, {report['precision']}, batches of {report['batch_size']}, {report['decode_workers']} decode "
        f"workers, random weights (`python -m bench.backbones`). Each round runs the pipeline's extraction and "
        f"{bares} processes of the bare network in processes of their own, interleaved, until each has had "
        f"{report['seconds']:.0f} s of running time after its first batch; a rate is batches after the first over "
        "that running time, and the ceiling is the best bare process's. Why, and what the old, shorter ceiling got "
        "wrong: [ceiling.md](ceiling.md).",
        "",
        "Each round: pipeline img/s / ceiling img/s = ratio (the bare processes' range of img/s; the share of the "
        "machine's CPU time that other processes took during it: the ratio is only as good as the machine was "
        "quiet).",
        "",
        "| case | " + " | ".join(f"round {k + 1}" for k in range(rounds)) + " | median | min-max | target | met |",
        "| --- " * (rounds + 5) + "|",
    ]
    for case, r in cases.items():
        cells = [_round_cell(x) for x in r["rounds"]]
        lines.append(
            f"| {case} px | {' | '.join(cells)} | {r['ratio_median']:.2f} | {r['ratio_min']:.2f}-{r['ratio_max']:.2f} "
            f"| >= {r['target']} | {'yes' if r['met'] else '**no**'} |"
        )
    above = [case for case, r in cases.items() if r["above_1"]]
    flag = f"**A ratio above 1.0, a defect of the benchmark, in: {', '.join(above)}**" if above else ""
    lines += ["", flag or "No round measured the pipeline above its ceiling (that would be a defect of the benchmark)."]
    lines += [
        "",
        "## What stands between the pipeline and its ceiling",
        "",
        "Medians over the rounds. Decode workers' CPU: their CPU seconds over the pipeline process's (start-up "
        "included). CPU per batch: the process's own CPU time (all threads) per batch after the first. Others: "
        "the share of the machine's CPU time that other processes took during the rounds.",
        "",
        "| case | decode ms/img (1 core) | decode-bound img/s | decode workers' CPU / pipeline process's "
        "| pipeline process CPU ms/batch | bare network CPU ms/batch | ratio by CPU time | others' share of the CPU |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for case, r in cases.items():
        med = functools.partial(_median, r["rounds"])
        workers = med(lambda x: x["cpu_s"]["decode_workers"] / (x["cpu_s"]["pipeline"] or math.nan))  # nan: it ended
        lines.append(
            f"| {case} px | {r['decode_ms']:.1f} | {r['decode_bound_images_per_s']:.0f} | {workers:.0%} "
            f"| {med(lambda x: x['cpu_ms_per_batch']['pipeline']):.0f} "
            f"| {med(lambda x: x['cpu_ms_per_batch']['bare']):.0f} | {by_cpu_time(r):.2f} "
            f"| {med(lambda x: x['others_cpu_share']):.0%} |"
        )
    lines += [
        "",
        "Ratio by CPU time: the bare network's CPU per batch over the pipeline's (its process's, plus the batch's "
        "decoding at the 1-core figure): about the ratio with both cores to themselves and nothing waiting. It moves "
        "less than the measured ratio with the share that other processes take (a thread spinning while its sibling "
        "is descheduled still counts).",
    ]
    return "\n".join(lines + knn_line()) + "\n"


def by_cpu_time(case: dict[str, Any]) -> float:
    """Median over the rounds of bare CPU per batch / (pipeline process CPU per batch + the batch's decoding)."""
    decode = case["decode_ms"] * BATCH
    return _median(
        case["rounds"], lambda x: x["cpu_ms_per_batch"]["bare"] / (x["cpu_ms_per_batch"]["pipeline"] + decode)
    )


def _round_cell(r: dict[str, Any]) -> str:
    ratio = f"**{r['ratio']:.2f} (above 1.0)**" if r["ratio"] > 1.0 else f"{r['ratio']:.2f}"
    bare = r.get("bare_images_per_s", [r["ceiling_images_per_s"]])
    spread = f"bare {min(bare):.1f}-{max(bare):.1f}; " if len(bare) > 1 else ""
    return (
        f"{r['pipeline_images_per_s']:.1f} / {r['ceiling_images_per_s']:.1f} = {ratio} "
        f"({spread}{r['others_cpu_share']:.0%})"
    )


def _median(rounds: list[dict[str, Any]], value: Callable[[dict[str, Any]], float]) -> float:
    return statistics.median(value(r) for r in rounds)


def main() -> None:
    from bench.__main__ import save_report

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="vgg16 at 64 px, one short round, temporary report")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=SECONDS, help="running time of each side per round")
    parser.add_argument("--bares", type=int, default=BARES, help="bare processes a round: the ceiling is the best")
    parser.add_argument("--cases", nargs="+", default=list(CASES), help="arch@image size, e.g. vgg16@224")
    parser.add_argument("--out", type=Path, help="report directory (default: bench/results; --quick: a temp dir)")
    parser.add_argument("--workdir", type=Path, help="keep generated images and runs here")
    parser.add_argument("--render", action="store_true", help="measure nothing: rewrite the .md from the .json")
    args = parser.parse_args()
    if args.render:
        out = args.out or Path(__file__).parent / "results"
        (out / "backbones.md").write_text(markdown(json.loads((out / "backbones.json").read_text())))
        return
    cases, rounds, seconds, images = tuple(args.cases), args.rounds, args.seconds, IMAGES
    if args.quick:
        cases, rounds, seconds, images = ("vgg16@64",), 1, 2.0, {64: 1200, 224: 200}  # 2 s at 400 img/s, and more
    with tempfile.TemporaryDirectory(prefix="bench-backbones-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        report = run(work, rounds, cases, seconds, images, args.bares)
    save_report(args.out, args.quick, "backbones", markdown(report), report)


if __name__ == "__main__":
    main()
