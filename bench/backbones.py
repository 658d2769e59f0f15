"""Backbones side by side on this machine: each one's extraction against its bare network, and what decoding costs.

    python -m bench.backbones            # vgg16, resnet50, convnext_tiny, vit_b_16 at 224 px; bench/results/
    python -m bench.backbones --quick    # a smoke run, report in a temporary directory

For each backbone, in one run and alternating: the pipeline's own extraction (``python -m pipeline.extract`` in a
process of its own, images/s after the first batch) from 500x375 JPEGs, and the bare network on random uint8
batches (``bench.ceiling``) in the same precision. Targets: at least 85% of the bare network for vgg16, 75% for the
others. The per-image decode-and-resize time on one core says when the decode workers, not the network, set the
pace: decode-bound images/s = workers / that time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.images import make_jpegs
from pipeline.config import ExtractConfig
from pipeline.hardware import decode_workers, resolve_device, resolve_precision

ARCHS = ("vgg16", "resnet50", "convnext_tiny", "vit_b_16")
TARGETS = {"vgg16": 0.85}  # of the bare network; every other arch: DEFAULT_TARGET
DEFAULT_TARGET = 0.75
BATCH = 32


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


def run(work: Path, n: int, rounds: int, archs: tuple[str, ...], image_size: int = 224) -> dict[str, Any]:
    from bench.__main__ import pipeline_extract

    root = make_jpegs(work / "jpegs", n)
    precision = resolve_precision("auto", resolve_device("auto"))
    runs: dict[str, dict[str, list[float]]] = {a: {"pipeline": [], "bare": []} for a in archs}
    for k in range(rounds):
        for arch in archs[k % len(archs) :] + archs[: k % len(archs)]:  # each round starts one further on
            opts = {"arch": arch, "image_size": image_size, "batch_size": BATCH, "precision": precision}
            pair = [("pipeline", lambda o=opts, a=arch: pipeline_extract(root, work, a.replace("/", "-"), o)),
                    ("bare", lambda a=arch: bare(work, a, image_size, precision))]  # fmt: skip
            for name, fn in pair if k % 2 == 0 else pair[::-1]:  # alternate which goes first
                runs[arch][name].append(fn()["images_per_s"])
    workers = decode_workers("auto")
    report: dict[str, Any] = {"images": n, "rounds": rounds, "image_size": image_size, "precision": precision,
                              "decode_workers": workers, "batch_size": BATCH, "archs": {}}  # fmt: skip
    for arch in archs:
        pipe, net = statistics.median(runs[arch]["pipeline"]), statistics.median(runs[arch]["bare"])
        ms = decode_ms(root, arch, image_size)
        target = TARGETS.get(arch, DEFAULT_TARGET)
        report["archs"][arch] = {
            "pipeline_images_per_s": pipe, "bare_images_per_s": net, "ratio": pipe / net, "target": target,
            "met": pipe / net >= target, "decode_ms": ms, "decode_bound_images_per_s": workers * 1000 / ms,
            "runs": runs[arch],
        }  # fmt: skip
    return report


def bare(work: Path, arch: str, image_size: int, precision: str) -> dict[str, float]:
    """The bare network's images/s on random batches (``bench.ceiling``), in a process of its own."""
    from bench.__main__ import measured

    stats_file = work / f"bare-{arch}.json"
    cmd = [sys.executable, "-m", "bench.ceiling", f"--arch={arch}", f"--image-size={image_size}"]
    cmd += [f"--precision={precision}", f"--batch-size={BATCH}", f"--stats={stats_file}"]
    measured(cmd, work)
    return json.loads(stats_file.read_text())


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
    lines = [
        "# Benchmark: backbones",
        "",
        f"{report['images']} JPEGs of 500x375 at {report['image_size']} px, {report['precision']}, batches of "
        f"{report['batch_size']}, {report['decode_workers']} decode workers, random weights; median of "
        f"{report['rounds']} rounds, images/s after the first batch (`python -m bench.backbones`).",
        "",
        "| arch | pipeline img/s | bare network img/s | pipeline / bare | target | met | decode ms/img (1 core) "
        "| decode-bound img/s | decode share of the bare network's time |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for arch, r in report["archs"].items():
        share = r["bare_images_per_s"] / r["decode_bound_images_per_s"]
        lines.append(
            f"| {arch} | {r['pipeline_images_per_s']:.1f} | {r['bare_images_per_s']:.1f} | {r['ratio']:.2f} "
            f"| >= {r['target']} | {'yes' if r['met'] else '**no**'} | {r['decode_ms']:.1f} "
            f"| {r['decode_bound_images_per_s']:.0f} | {share:.0%} |"
        )
    return "\n".join(lines + knn_line()) + "\n"


def main() -> None:
    from bench.__main__ import save_report

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few images, one round, temporary report")
    parser.add_argument("--images", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--archs", nargs="+", default=list(ARCHS))
    parser.add_argument("--out", type=Path, help="report directory (default: bench/results; --quick: a temp dir)")
    args = parser.parse_args()
    n, rounds = (40, 1) if args.quick else (args.images, args.rounds)
    with tempfile.TemporaryDirectory(prefix="bench-backbones-") as tmp:
        report = run(Path(tmp), n, rounds, tuple(args.archs))
    save_report(args.out, args.quick, "backbones", markdown(report), report)


if __name__ == "__main__":
    main()
