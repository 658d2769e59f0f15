"""The k-NN accuracy of the evaluate stage (pipeline/knn.py) at ImageNet-like sizes: 100,000 training rows of
512-d features against 10,000 test rows, k = 20, on this machine's CPU (or --device).

    python -m bench.knn                  # report in bench/results/knn.md
    python -m bench.knn --quick          # a smoke run with tiny sizes, report in a temporary directory

Two ways in, each timed whole, the variants in turn (median of --rounds runs): the training rows as float32
tensors in memory, and streamed from a float16 HDF5 features file through evaluate's own reader
(``evaluate.knn_metrics``), as the stage runs it; and, in the same rounds, the float32 block products of the same
shapes alone (2 * test * train * dim floating-point operations: the report gives their rate), the floor of a
float32 k-NN. The stage's goal: within 1.3x of those products, round by round. On a CPU with bf16 hardware the
stage screens with bf16 products and scores the keys they cannot rule out exactly (pipeline/knn.py,
pipeline/screen.py): the report says which screen ran, how many keys per query row it scored exactly and how many
rows fell back to float32 products (a bf16 screen that left too many keys open), and the run asserts that the
stage's predictions and neighbours are those of a float32 brute force (the whole similarity matrix, computed once).
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
from torch.nn import functional as F

from bench.__main__ import save_report
from pipeline import features, knn, provenance
from pipeline.config import EvaluateConfig
from pipeline.evaluate import knn_metrics
from pipeline.hardware import resolve_device
from pipeline.screen import screen_for

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

    want = brute_force(x32, y, test.features["original"], k=k, temperature=cfg.knn_temperature, device=where)
    found = knn.search([x32], test.features["original"], k=k, device=where)
    assert torch.equal(found.ids.cpu(), want["ids"]), "k-NN neighbours differ from the float32 brute force"
    assert np.array_equal(in_memory(), want["classes"]), "k-NN classes differ from the float32 brute force"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.h5"
        write_train(path, x, y, sizes["classes"])
        expected = provenance.identity(features.read_provenance(path))
        acc = knn_metrics(cfg, path, test, expected=expected, device=where)["knn_acc"]
        assert acc == float(np.mean(want["classes"] == test.labels)), "the stage's knn_acc is not the brute force's"
        runs = {
            "in_memory": in_memory,
            "streamed": lambda: knn_metrics(cfg, path, test, expected=expected, device=where),
            "products": lambda: _products(x32, test.features["original"], where),
        }
        times = timed(runs, rounds)
    flops = 2 * sizes["train"] * sizes["test"] * sizes["dim"]
    rescored = found.rescored.double()
    return {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "device": str(where), "k": k, "block_rows": knn.BLOCK_ROWS, **sizes, "knn_acc": acc,
        "screen": screen_for(where), "open": knn.OPEN,
        "amx": where.type == "cpu" and torch.cpu._is_amx_tile_supported(),
        "rescored_per_row": {"mean": rescored.mean().item(), "max": rescored.max().item()},
        "rows_fell_back": int((found.fell_back > 0).sum()), "blocks_fell_back": int(found.fell_back.sum()),
        "brute_force_s": want["seconds"],
        "stage_over_products": ratios(times["streamed"], times["products"]),
        "in_memory_over_products": ratios(times["in_memory"], times["products"]),
    } | {name: t | {"gflop_per_s": flops / t["median_s"] / 1e9} for name, t in times.items()}  # fmt: skip


def ratios(run: dict[str, Any], products: dict[str, Any]) -> dict[str, Any]:
    """Each round's seconds over the products' of the same round, and their median."""
    rounds = [a / b for a, b in zip(run["runs_s"], products["runs_s"], strict=True)]
    return {"median": statistics.median(rounds), "rounds": rounds}


@torch.inference_mode()
def brute_force(
    train: np.ndarray, labels: np.ndarray, test: np.ndarray, *, k: int, temperature: float, device: torch.device
) -> dict[str, Any]:
    """The float32 k-NN, by brute force: the float32 unit vectors (as F.normalize makes them), the whole (test,
    train) similarity matrix as float64 products rounded to float32, each row's k largest, ties to the lower row,
    and knn's own vote. A top k + 64 (topk's order among ties is any), sorted by id then stably by similarity,
    holds the k first whenever its last is below the k-th (asserted)."""
    start = time.perf_counter()
    keys = F.normalize(torch.from_numpy(train).to(device, torch.float32), dim=1).double()
    found: list[tuple[torch.Tensor, torch.Tensor]] = []
    for a in range(0, len(test), 256):
        q = F.normalize(torch.from_numpy(test[a : a + 256]).to(device, torch.float32), dim=1).double()
        sims = (q @ keys.T).float()
        top, at = sims.topk(min(k + 64, sims.shape[1]), dim=1)
        assert top.shape[1] == sims.shape[1] or (top[:, -1] < top[:, k - 1]).all(), "ties past the top k + 64"
        at = at.sort(dim=1).values
        best, order = sims.gather(1, at).sort(dim=1, descending=True, stable=True)
        found.append((best[:, :k], at.gather(1, order[:, :k])))
    sims_t, ids_t = (torch.cat(part) for part in zip(*found, strict=True))
    classes = knn._vote(sims_t, torch.as_tensor(labels, device=device)[ids_t], temperature)
    return {"ids": ids_t.cpu(), "classes": classes.cpu().numpy(), "seconds": time.perf_counter() - start}


@torch.inference_mode()
def _products(train: np.ndarray, test: np.ndarray, device: torch.device) -> None:
    """Float32 block products of knn_predict's shapes and nothing else (no normalising, no top k): the floor of a
    float32 k-NN (knn_predict's own products are bf16 ones on a CPU with bf16 hardware)."""
    rows = knn.BLOCK_ROWS
    queries = [torch.from_numpy(test[a : a + rows]).to(device) for a in range(0, len(test), rows)]
    for a in range(0, len(train), rows):
        keys = torch.from_numpy(train[a : a + rows]).to(device).T.contiguous()
        for q in queries:
            q @ keys
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def markdown(r: dict[str, Any]) -> str:
    screen = {
        "bf16": f"bf16 products ({'AMX' if r['amx'] else 'AVX512-BF16'}) screen the keys, then each query row's "
        "undecided keys are scored exactly (float64 dots of the float32 unit vectors, rounded to float32)",
        "fp32": "float32 products screen the keys, then each query row's undecided keys are scored exactly",
        "direct": "float32 products rank the keys",
    }[r["screen"]]
    stage, in_memory = r["stage_over_products"], r["in_memory_over_products"]
    rescored = r["rescored_per_row"]
    lines = [
        "# k-NN accuracy (evaluate's knn_acc): streamed top k",
        "",
        f"{r['machine']}; device {r['device']}; {r['train']:,} training rows × {r['dim']}-d against {r['test']:,} "
        f"test rows, {r['classes']:,} classes, k = {r['k']}, blocks of {r['block_rows']:,} rows. Median of "
        f"{len(r['in_memory']['runs_s'])} runs, the variants in turn.",
        "",
        "| training rows | median s | runs s | ÷ products, by round | similarity GFLOP/s |",
        "|---|---|---|---|---|",
    ]
    for name, label, ratio in (
        ("streamed", "float16 HDF5, streamed (the stage)", stage),
        ("in_memory", "float32 in memory", in_memory),
        ("products", "float32 in memory: the float32 similarity products alone", None),
    ):
        run = r[name]
        runs = ", ".join(f"{s:.2f}" for s in run["runs_s"])
        rounds = "" if ratio is None else ", ".join(f"{x:.2f}" for x in ratio["rounds"])
        lines.append(f"| {label} | {run['median_s']:.2f} | {runs} | {rounds} | {run['gflop_per_s']:.0f} |")
    goal = "within" if stage["median"] <= 1.3 else "**not** within"
    lines += [
        "",
        f"The stage takes {stage['median']:.2f}x the float32 products (median of the rounds' ratios; in memory "
        f"{in_memory['median']:.2f}x): {goal} the goal of 1.3x.",
        "",
        f"Screen: {screen}. Keys scored exactly per query row: {rescored['mean']:.0f} on average, "
        f"{rescored['max']:.0f} at most, of {r['train']:,}. Rows whose bf16 screen left more than k + "
        f"{r['open']} keys of a block open, so that float32 products screened them again (the fallback): "
        f"{r['rows_fell_back']:,} of {r['test']:,} ({r['blocks_fell_back']:,} row-blocks).",
        "",
        f"Checked once before timing: the neighbours (row numbers) and classes equal a float32 brute force (the whole "
        f"similarity matrix, float64 products of the float32 unit vectors rounded to float32, ties to the lower row; "
        f"{r['brute_force_s']:.0f} s), and the stage's knn_acc, {r['knn_acc']:.4f}, is its accuracy.",
    ]
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
