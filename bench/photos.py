"""Camera photos against ImageNet-sized JPEGs: extraction throughput from 12-megapixel files, before and after
reduce-on-decode, on the same network in the same run.

    python -m bench.photos                  # 320 photos and 320 500x375 JPEGs at 224 px, three rounds
    python -m bench.photos --quick          # a smoke run

Four variants alternate, each round starting one further along, so that drift on a shared machine and the
position in a round hit all of them alike; each is the
pipeline's own extraction (``python -m pipeline.extract``) in a process of its own:
- ``small-before`` / ``photos-before``: 500x375 JPEGs / 12 MP photos with ``decode: exact`` and 2 decode workers,
  the settings before reduce-on-decode;
- ``small`` / ``photos``: the same files with the defaults, ``decode: fast`` and ``num_workers: auto``.
The report gives each variant's median images/s after the first batch, and the ratios the targets are set on.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.images import make_jpegs, make_photos

VARIANTS = {
    "small-before": ("small", {"decode": "exact", "num_workers": 2}),
    "photos-before": ("photos", {"decode": "exact", "num_workers": 2}),
    "small": ("small", {}),
    "photos": ("photos", {}),
}
TARGETS = {  # name: (numerator, denominator, at least)
    "photos_of_small": ("photos", "small", 0.85),
    "photos_over_before": ("photos", "photos-before", 1.5),
    "small_over_before": ("small", "small-before", 0.97),  # "does not drop", within the machine's round-to-round noise
}


def run(work: Path, n: int, rounds: int, image_size: int = 224) -> dict[str, Any]:
    from bench.__main__ import pipeline_extract

    folders = {"small": make_jpegs(work / "small", n), "photos": make_photos(work / "photos", n)}
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    names = list(VARIANTS)
    for k in range(rounds):
        for variant in names[k % len(names) :] + names[: k % len(names)]:  # each round starts one further on
            folder, options = VARIANTS[variant]
            opts = {"image_size": image_size, "batch_size": 32} | options
            runs[variant].append(pipeline_extract(folders[folder], work, variant, opts))
    medians = {v: statistics.median(r["images_per_s"] for r in rs) for v, rs in runs.items()}
    checks = {}
    for name, (a, b, target) in TARGETS.items():
        value = medians[a] / medians[b]
        checks[name] = {"value": round(value, 3), "target": target, "met": value >= target}
    workers = {v: rs[0].get("decode_workers") for v, rs in runs.items()}
    return {"images": n, "rounds": rounds, "image_size": image_size, "images_per_s": medians, "workers": workers,
            "runs": runs, "checks": checks}  # fmt: skip


def markdown(report: dict[str, Any]) -> list[str]:
    lines = [
        f"## 12-megapixel photos ({report['images']} photos of 4032x3024, about 2.2 MB, against {report['images']} "
        f"JPEGs of 500x375; {report['image_size']} px, median of {report['rounds']} rounds, images/s after the "
        "first batch)",
        "",
        "| variant | decode | decode workers | images/s | each round |",
        "| --- | --- | --- | --- | --- |",
    ]
    for variant, (_, options) in VARIANTS.items():
        rates = ", ".join(f"{r['images_per_s']:.1f}" for r in report["runs"][variant])
        lines.append(
            f"| {variant} | {options.get('decode', 'fast')} | {report['workers'][variant]} "
            f"| {report['images_per_s'][variant]:.1f} | {rates} |"
        )
    return lines


def main() -> None:
    from bench.__main__ import save_report

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="40 images of each, one round, temporary report")
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="report directory (default: bench/results; --quick: a temp dir)")
    args = parser.parse_args()
    n, rounds = (40, 1) if args.quick else (args.images, args.rounds)
    with tempfile.TemporaryDirectory(prefix="bench-photos-") as tmp:
        report = run(Path(tmp), n, rounds)
    checks = ["", "| check | measured | target | met |", "| --- | --- | --- | --- |"]
    checks += [f"| {k} | {c['value']} | >= {c['target']} | {'yes' if c['met'] else '**no**'} |"
               for k, c in report["checks"].items()]  # fmt: skip
    text = "\n".join(["# Benchmark: camera photos", "", *markdown(report), *checks]) + "\n"
    save_report(args.out, args.quick, "photos-cpu", text, report)


if __name__ == "__main__":
    main()
