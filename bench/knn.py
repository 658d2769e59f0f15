"""The k-NN accuracy of the evaluate stage (pipeline/knn.py) at ImageNet-like sizes: 100,000 training rows of
512-d features against 10,000 test rows, k = 20, on this machine's CPU (or --device).

    python -m bench.knn                  # report in bench/results/knn.md
    python -m bench.knn --quick          # a smoke run with tiny sizes, report in a temporary directory

Two ways in, each timed whole, the variants in turn (median of --rounds runs): the training rows as float32
tensors in memory, and streamed from a float16 HDF5 features file through evaluate's own reader
(``evaluate.knn_metrics``), as the stage runs it. The similarities are float32 products, 2 * test * train * dim
floating-point operations: the report gives their rate, and the time of the same block products alone, the
floor of any exact k-NN here.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.__main__ import save_report
from pipeline import features, knn, provenance
from pipeline.config import EvaluateConfig
from pipeline.evaluate import knn_metrics
from pipeline.hardware import resolve_device

FULL = {"train": 100_000, "test": 10_000, "dim": 512, "classes": 1000}
QUICK = {"train": 3_000, "test": 500, "dim": 64, "classes": 10}


def timed(runs: dict[str, Callable[[], Any]], rounds: int) -> dict[str, dict[str, Any]]:
    """Seconds of each run, taken in turn ``rounds`` times (a machine whose speed drifts slows each alike)."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(s), "runs_s": s} for name, s in seconds.items()}


def write_train(path: Path, x: np.ndarray, y: np.ndarray, classes: int) -> None:
    """``x`` as extract stores it: float16, in the one writer's chunks."""
    names = [str(c) for c in range(classes)]
    prov = {key: 0 for key in provenance.PROVENANCE_KEYS} | {
        "schema": provenance.SCHEMA, "split": "train", "views": ["original"], "class_names": names,
    }  # fmt: skip
    with features.FeatureWriter(
        path, n=len(x), dim=x.shape[1], dtype="float16", views=["original"], provenance=prov
    ) as w:
        w.write(0, {"original": x}, y, [""] * len(x))


def bench(sizes: dict[str, int], *, k: int, rounds: int, device: str, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((sizes["train"], sizes["dim"]), dtype=np.float32).astype(np.float16)
    y = rng.integers(0, sizes["classes"], sizes["train"])
    test = features.FeatureSet(
        {"original": rng.standard_normal((sizes["test"], sizes["dim"]), dtype=np.float32)},
        rng.integers(0, sizes["classes"], sizes["test"]), [], {},
    )  # fmt: skip
    where = resolve_device(device)
    cfg = EvaluateConfig(knn_k=k)
    x32 = x.astype(np.float32)

    def in_memory() -> np.ndarray:
        return knn.knn_predict(
            [(x32, y)], test.features["original"], k=k, temperature=cfg.knn_temperature, device=where
        )

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.h5"
        write_train(path, x, y, sizes["classes"])
        expected = provenance.identity(features.read_provenance(path))
        same = knn_metrics(cfg, path, test, expected=expected, device=where)["knn_acc"]
        assert same == float(np.mean(in_memory() == test.labels)), "streamed and in-memory k-NN disagree"
        runs = {
            "in_memory": in_memory,
            "streamed": lambda: knn_metrics(cfg, path, test, expected=expected, device=where),
            "products": lambda: _products(x32, test.features["original"], where),
        }
        times = timed(runs, rounds)
    flops = 2 * sizes["train"] * sizes["test"] * sizes["dim"]
    return {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "device": str(where), "k": k, "block_rows": knn.BLOCK_ROWS, **sizes,
    } | {name: t | {"gflop_per_s": flops / t["median_s"] / 1e9} for name, t in times.items()}  # fmt: skip


@torch.inference_mode()
def _products(train: np.ndarray, test: np.ndarray, device: torch.device) -> None:
    """The block products of knn_predict and nothing else (no normalising, no top k)."""
    rows = knn.BLOCK_ROWS
    queries = [torch.from_numpy(test[a : a + rows]).to(device) for a in range(0, len(test), rows)]
    for a in range(0, len(train), rows):
        keys = torch.from_numpy(train[a : a + rows]).to(device).T.contiguous()
        for q in queries:
            q @ keys
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def markdown(r: dict[str, Any]) -> str:
    lines = [
        "# k-NN accuracy (evaluate's knn_acc): streamed top k",
        "",
        f"{r['machine']}; device {r['device']}; {r['train']:,} training rows × {r['dim']}-d against {r['test']:,} "
        f"test rows, {r['classes']:,} classes, k = {r['k']}, blocks of {r['block_rows']:,} rows. Median of "
        f"{len(r['in_memory']['runs_s'])} runs.",
        "",
        "| training rows | median s | runs s | similarity GFLOP/s |",
        "|---|---|---|---|",
    ]
    for name, label in (
        ("in_memory", "float32 in memory"), ("streamed", "float16 HDF5, streamed (the stage)"),
        ("products", "float32 in memory: the similarity products alone"),
    ):  # fmt: skip
        run = r[name]
        runs = ", ".join(f"{s:.2f}" for s in run["runs_s"])
        lines.append(f"| {label} | {run['median_s']:.2f} | {runs} | {run['gflop_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, report in a temporary directory")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu | auto | cuda | cuda:N | mps")
    parser.add_argument("--out", type=Path, help="report directory (default: bench/results)")
    args = parser.parse_args()
    report = bench(QUICK if args.quick else FULL, k=args.k, rounds=args.rounds, device=args.device)
    save_report(args.out, args.quick, "knn", markdown(report), report)


if __name__ == "__main__":
    main()
