"""The audit stage's cost against evaluate's k-NN accuracy (knn_acc), in one run on this machine's CPU: the target is
an audit of 100,000 × 512-d features (1,000 classes; train / val / test 70,000 / 10,000 / 20,000) at most 3× the
knn_acc's time, in under 2 GB of peak memory.

    python -m bench.audit_cost            # report in bench/results/audit-cost.md
    python -m bench.audit_cost --quick    # a smoke run with tiny sizes, report in a temporary directory

The features are clustered (a centre a class, Gaussian spread, 3% of the labels flipped, 0.5% of the test rows
copies of training rows), written as extract writes them: float16 HDF5 through the one writer, one provenance in
the three split files. Each measured piece runs in a fresh process, so that its peak resident memory (ru_maxrss)
is its own, and the pieces take turns, round after round (a machine whose speed drifts slows each alike):

- ``knn_acc``: ``evaluate.knn_metrics``, the test split (read whole, as evaluate reads it) against the streamed
  training split, k = evaluate.knn_k (20);
- ``audit``: ``audit.neighbours`` then ``audit.audit`` (cleanlab included), the stage without its file writing;
  its parts timed in the same run by a stopwatch around each call of ``knn.nearest`` (train × train, val × train,
  val × val, test × train, test × test) and of the findings' functions (the votes' N × C float32 probabilities,
  cleanlab's ``find_label_issues``, leaks and duplicates, outliers).

Smaller sizes (25,000 and 50,000 rows) give the exponent of each part's growth, and from it the figure at
1,000,000 rows, on paper.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import features, provenance
from pipeline.config import AuditConfig, EvaluateConfig

# Each piece imports what its stage imports, inside the piece: the modules' own resident memory (torch's CUDA
# libraries alone are about 0.9 GB of it) counts in the peak of that stage's process and of no other.

FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}  # the pipeline's default split fractions
FULL = {"rows": 100_000, "dim": 512, "classes": 1000, "scaling": [25_000, 50_000], "rounds": 2}
QUICK = {"rows": 2_000, "dim": 32, "classes": 10, "scaling": [1_000], "rounds": 2}
PIECES = ("knn_acc", "audit")
IMPORTS = {"knn_acc": "pipeline.evaluate", "audit": "pipeline.audit, cleanlab.filter"}  # each stage's imports
TIME_TARGET, MEMORY_TARGET_MB = 3.0, 2000  # the targets: audit <= 3 × knn_acc, peak < 2 GB
PAPER_ROWS = 1_000_000
MODEL = {"knn_acc": 2, "neighbours": 2, "findings": 1}  # each part's exponent in N, on paper
DEVICE = torch.device("cpu")


def make_splits(folder: Path, *, rows: int, dim: int, classes: int, seed: int = 0) -> dict[str, Path]:
    """Three split files of clustered float16 features with one provenance; returns split -> path."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, dim), dtype=np.float32)
    names = [f"class{c:04d}" for c in range(classes)]
    counts = {s: round(rows * f) for s, f in FRACTIONS.items()}
    paths, train_x = {}, None
    for split, n in counts.items():
        y = rng.integers(0, classes, n)
        x = centres[y] + 1.5 * rng.standard_normal((n, dim), dtype=np.float32)
        flipped = rng.random(n) < 0.03  # label errors for cleanlab to find
        y[flipped] = rng.integers(0, classes, int(flipped.sum()))
        if split == "train":
            train_x = x
        elif split == "test":  # leaks: copies of training rows
            copies = rng.choice(n, max(1, n // 200), replace=False)
            x[copies] = train_x[rng.choice(len(train_x), len(copies), replace=False)]
        prov = {key: 0 for key in provenance.PROVENANCE_KEYS} | {
            "schema": provenance.SCHEMA, "split": split, "views": ["original"], "class_names": names,
            "feature_dim": dim, "storage_dtype": "float16",
        }  # fmt: skip
        paths[split] = folder / f"{split}.h5"
        with features.FeatureWriter(
            paths[split], n=n, dim=dim, dtype="float16", views=["original"], provenance=prov
        ) as w:
            w.write(0, {"original": x.astype(np.float16)}, y, [f"{split}/{i:07d}" for i in range(n)])
    return paths


def _split_paths(folder: Path) -> dict[str, Path]:
    return {s: folder / f"{s}.h5" for s in FRACTIONS}


def _clock() -> float:
    return time.perf_counter()


def _piece_knn_acc(folder: Path) -> dict[str, float]:
    from pipeline.evaluate import knn_metrics

    paths = _split_paths(folder)
    test = features.read_features(paths["test"])
    expected = provenance.identity(features.read_provenance(paths["train"]))
    start = _clock()
    knn_metrics(EvaluateConfig(), paths["train"], test, expected=expected, device=DEVICE)
    return {"knn_acc": _clock() - start}


def _piece_audit(folder: Path) -> dict[str, float]:
    """The stage's two calls, with a stopwatch around each call of knn.nearest and of the findings' functions
    (the parts, at no extra work): audit.neighbours calls nearest for train × train, then val × train and
    val × val, then test × train and test × test."""
    from cleanlab import filter as _  # noqa: F401  (the stage imports it at its first label check)

    from pipeline import audit, findings, knn

    cfg, paths = AuditConfig(), _split_paths(folder)
    classes = len(features.read_provenance(paths["train"])["class_names"])
    searches = iter(["train×train", "val×train", "val×val", "test×train", "test×test"])
    parts: dict[str, float] = {}
    watched = {
        (knn, "nearest"): lambda: next(searches), (findings, "vote_probabilities"): lambda: "votes (N × C)",
        (findings, "label_issues"): lambda: "cleanlab", (findings, "leaks"): lambda: "leaks + duplicates",
        (findings, "duplicates"): lambda: "leaks + duplicates", (findings, "outlier_scores"): lambda: "outliers",
        (findings, "outliers"): lambda: "outliers",
    }  # fmt: skip
    originals = {key: getattr(*key) for key in watched}
    for (module, name), part in watched.items():
        setattr(module, name, _stopwatch(getattr(module, name), part, parts))
    try:
        start = _clock()
        found = audit.neighbours(paths, cfg.k, DEVICE)
        searched = _clock()
        audit.audit(found, cfg, num_classes=classes)
        done = _clock()
    finally:  # a smoke run's pieces share this process
        for (module, name), function in originals.items():
            setattr(module, name, function)
    return parts | {"audit": done - start, "neighbours": searched - start, "findings": done - searched}


def _stopwatch(function: Any, part: Any, parts: dict[str, float]) -> Any:
    """``function``, adding its seconds to ``parts[part()]``."""

    def timed(*args: Any, **kwargs: Any) -> Any:
        name, start = part(), _clock()
        try:
            return function(*args, **kwargs)
        finally:
            parts[name] = parts.get(name, 0.0) + _clock() - start

    return timed


def _piece_imports(stage: str) -> dict[str, float]:
    """Nothing but the stage's imports: the floor of its peak."""
    import importlib

    for module in IMPORTS[stage].split(", "):
        importlib.import_module(module)
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {"file_mb": int(status["RssFile"].split()[0]) / 1024}  # shared libraries' pages: clean, shared


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


PIECE_RUNS = {
    "knn_acc": _piece_knn_acc, "audit": _piece_audit,
    "imports_knn_acc": lambda _: _piece_imports("knn_acc"), "imports_audit": lambda _: _piece_imports("audit"),
}  # fmt: skip


def run_piece(piece: str, folder: Path, *, fresh: bool = True) -> dict[str, float]:
    """One piece in a fresh process: its seconds (each part) and its peak resident memory in MB; not ``fresh``:
    in this process, the peak then that of everything this process did before (a smoke run's)."""
    if not fresh:
        return PIECE_RUNS[piece](folder) | {"peak_mb": _peak_mb()}
    out = subprocess.run(
        [sys.executable, "-m", "bench.audit_cost", "--piece", piece, "--data", str(folder)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_size(sizes: dict[str, Any], rows: int, rounds: int, *, fresh: bool) -> dict[str, Any]:
    """Every piece at ``rows`` rows, ``rounds`` times in turn: each part's median seconds and runs, and peaks."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_splits(folder, rows=rows, dim=sizes["dim"], classes=sizes["classes"])
        runs: dict[str, list[float]] = {}
        peaks: dict[str, list[float]] = {}
        for _ in range(rounds):
            for piece in PIECES:
                result = run_piece(piece, folder, fresh=fresh)
                print(f"{rows:,} rows, {piece}: {result}", file=sys.stderr, flush=True)
                peaks.setdefault(piece, []).append(result.pop("peak_mb"))
                for part, seconds in result.items():
                    runs.setdefault(part, []).append(seconds)
        for stage in IMPORTS:
            floor = run_piece(f"imports_{stage}", folder, fresh=fresh)
            peaks[f"imports_{stage}"], peaks[f"imports_{stage}_file"] = [floor["peak_mb"]], [floor["file_mb"]]
        mb = sum(f.stat().st_size for f in folder.glob("*.h5")) / 2**20
    parts = {part: {"median_s": statistics.median(s), "runs_s": s} for part, s in runs.items()}
    counts = {s: round(rows * f) for s, f in FRACTIONS.items()}
    return {"rows": rows, **counts, "files_mb": mb, "parts": parts, "peak_mb": {p: max(v) for p, v in peaks.items()}}


def exponent(xs: list[float], ys: list[float]) -> float:
    """The least-squares slope of log y on log x: y ∝ x^slope."""
    lx, ly = np.log(xs), np.log(ys)
    return float(np.polyfit(lx, ly, 1)[0])


def scaling(results: list[dict[str, Any]], rows: int) -> dict[str, Any]:
    """Each part's fitted exponent over the measured sizes and its figure at ``rows``, from the largest size by
    the fitted exponent; the time parts by their own exponents, summed; memory linear in the rows (what grows
    with N is the N × C probabilities and the (N, k) neighbours, O(N) each)."""
    xs = [r["rows"] for r in results]
    top = results[-1]
    out: dict[str, Any] = {"rows": rows, "parts": {}}
    for part in top["parts"]:
        ys = [r["parts"][part]["median_s"] for r in results]
        p = exponent(xs, ys) if min(ys) > 0 else float("nan")
        out["parts"][part] = {"exponent": p, "seconds": ys[-1] * (rows / xs[-1]) ** p}
    memory = {}
    for piece in ("knn_acc", "audit"):
        ys = [r["peak_mb"][piece] for r in results]
        slope, intercept = np.polyfit(xs, ys, 1)
        memory[piece] = {"exponent": exponent(xs, ys), "mb_per_1k_rows": slope * 1000, "mb": intercept + slope * rows}
    out["memory"] = memory
    # the model: the search (and knn_acc) O(N²·D), the findings O(N·C); from the largest size
    model = {part: top["parts"][part]["median_s"] * (rows / xs[-1]) ** p for part, p in MODEL.items()}
    out["model"] = model | {"audit": model["neighbours"] + model["findings"]}
    return out


def bench(sizes: dict[str, Any], rounds: int, *, fresh: bool) -> dict[str, Any]:
    load = os.getloadavg()[0]
    results = [bench_size(sizes, n, rounds, fresh=fresh) for n in [*sizes["scaling"], sizes["rows"]]]
    model = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next((line.split(":", 1)[1].strip() for line in model.splitlines() if line.startswith("Model name")), "?")
    main = results[-1]["parts"]
    return {
        "machine": f"{cpu or platform.processor()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "dim": sizes["dim"], "classes": sizes["classes"], "audit_k": AuditConfig().k, "knn_k": EvaluateConfig().knn_k,
        "rounds": rounds, "fresh": fresh, "load": [load, os.getloadavg()[0]], "sizes": results,
        "ratio": main["audit"]["median_s"] / main["knn_acc"]["median_s"],
        "paper": scaling(results, PAPER_ROWS),
    }  # fmt: skip


def _runs(part: dict[str, Any]) -> str:
    return ", ".join(f"{s:.2f}" for s in part["runs_s"])


def markdown(r: dict[str, Any]) -> str:
    top = r["sizes"][-1]
    parts, peaks = top["parts"], top["peak_mb"]
    ratio, peak = r["ratio"], peaks["audit"]
    lines = [
        "# The audit's cost against knn_acc",
        "",
        f"{r['machine']}; device cpu. {top['rows']:,} rows × {r['dim']}-d float16 HDF5 "
        f"({top['train']:,} / {top['val']:,} / {top['test']:,} train / val / test, {top['files_mb']:.0f} MB), "
        f"{r['classes']:,} classes; audit k = {r['audit_k']}, knn_acc k = {r['knn_k']}. Each piece in a fresh "
        f"process, the pieces in turn, median of {r['rounds']} rounds. Command: `python -m bench.audit_cost`.",
        "",
        "| piece | median s | runs s |",
        "|---|---|---|",
        f"| **knn_acc** (evaluate.knn_metrics: test × train) | **{parts['knn_acc']['median_s']:.1f}** | "
        f"{_runs(parts['knn_acc'])} |",
        f"| **audit** (neighbours + findings) | **{parts['audit']['median_s']:.1f}** | {_runs(parts['audit'])} |",
        f"| · neighbours (audit.neighbours) | {parts['neighbours']['median_s']:.1f} | {_runs(parts['neighbours'])} |",
        f"| · findings (audit.audit) | {parts['findings']['median_s']:.1f} | {_runs(parts['findings'])} |",
    ]
    for name in ("train×train", "val×train", "val×val", "test×train", "test×test"):
        lines.append(f"| · · search: {name} | {parts[name]['median_s']:.1f} | {_runs(parts[name])} |")
    for name in ("votes (N × C)", "cleanlab", "leaks + duplicates", "outliers"):
        lines.append(f"| · · findings: {name} | {parts[name]['median_s']:.2f} | {_runs(parts[name])} |")
    time_ok = "met" if ratio <= TIME_TARGET else f"**MISSED** ({ratio:.2f}×)"
    memory_ok = "met" if peak < MEMORY_TARGET_MB else f"**MISSED** ({peak:,.0f} MB)"
    lines += [
        "",
        f"**audit ÷ knn_acc = {ratio:.2f}×** (target ≤ {TIME_TARGET:.0f}×: {time_ok}). "
        f"**Peak memory: audit {peak:,.0f} MB** (target < 2 GB: {memory_ok}), knn_acc {peaks['knn_acc']:,.0f} MB "
        f"(ru_maxrss of each piece's own process{'' if r['fresh'] else ': NOT fresh here, a smoke run'}; "
        f"of which the stage's imports alone: audit {peaks['imports_audit']:,.0f} MB, knn_acc "
        f"{peaks['imports_knn_acc']:,.0f} MB, {peaks['imports_audit_file']:,.0f} and "
        f"{peaks['imports_knn_acc_file']:,.0f} MB of them the shared libraries' file pages). Load average "
        f"{r['load'][0]:.1f} at the start, {r['load'][1]:.1f} at the end (other work shares these 2 cores).",
        "",
        "## Scaling",
        "",
        "| rows | knn_acc s | audit s | neighbours s | findings s | cleanlab s | audit ÷ knn_acc | audit MB "
        "| knn_acc MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in r["sizes"]:
        p = s["parts"]
        lines.append(
            f"| {s['rows']:,} | {p['knn_acc']['median_s']:.2f} | {p['audit']['median_s']:.2f} | "
            f"{p['neighbours']['median_s']:.2f} | {p['findings']['median_s']:.2f} | {p['cleanlab']['median_s']:.2f} | "
            f"{p['audit']['median_s'] / p['knn_acc']['median_s']:.2f} | {s['peak_mb']['audit']:,.0f} | "
            f"{s['peak_mb']['knn_acc']:,.0f} |"
        )
    paper = r["paper"]
    fit = paper["parts"]
    mem = paper["memory"]
    n = paper["rows"]
    lines += [
        "",
        f"On paper at {n:,} rows (the same fractions, {r['dim']}-d, {r['classes']:,} classes), each part from the "
        f"largest measured size by its fitted exponent (time ∝ rows^p):",
        "",
        f"- knn_acc: p = {fit['knn_acc']['exponent']:.2f} → {_hours(fit['knn_acc']['seconds'])}; "
        f"neighbours: p = {fit['neighbours']['exponent']:.2f} → {_hours(fit['neighbours']['seconds'])}; "
        f"findings: p = {fit['findings']['exponent']:.2f} → {_hours(fit['findings']['seconds'])} "
        f"(cleanlab p = {fit['cleanlab']['exponent']:.2f}); audit → "
        f"{_hours(fit['neighbours']['seconds'] + fit['findings']['seconds'])}, "
        f"{(fit['neighbours']['seconds'] + fit['findings']['seconds']) / fit['knn_acc']['seconds']:.2f}× knn_acc.",
        f"- By the model (search and knn_acc ∝ N², findings ∝ N): knn_acc {_hours(paper['model']['knn_acc'])}, "
        f"audit {_hours(paper['model']['audit'])}: {paper['model']['audit'] / paper['model']['knn_acc']:.2f}× knn_acc.",
        "- Why: the search is O(N²·D) (every row against every training row) as knn_acc is, so their ratio holds at "
        "any N; the findings are O(N·C) (the votes and cleanlab's N × C probabilities), so their share shrinks.",
        f"- Peak memory, linear in the rows: audit {mem['audit']['mb_per_1k_rows']:.1f} MB per 1,000 rows → "
        f"{mem['audit']['mb']:,.0f} MB (the N × C float32 probabilities alone are {n * r['classes'] * 4 / 1e6:,.0f} "
        f"MB); knn_acc {mem['knn_acc']['mb_per_1k_rows']:.1f} MB per 1,000 rows → {mem['knn_acc']['mb']:,.0f} MB.",
    ]
    return "\n".join(lines) + "\n"


def _hours(seconds: float) -> str:
    return f"{seconds:,.0f} s ({seconds / 3600:.1f} h)" if seconds >= 3600 else f"{seconds:,.0f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, report in a temporary directory")
    parser.add_argument("--rounds", type=int, help="rounds of the pieces in turn (default 2)")
    parser.add_argument("--out", type=Path, help="report directory (default: bench/results)")
    parser.add_argument("--piece", choices=PIECE_RUNS, help=argparse.SUPPRESS)  # one piece, in its own process
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.piece:
        print(json.dumps(run_piece(args.piece, args.data, fresh=False)))
        return
    sizes = QUICK if args.quick else FULL
    rounds = args.rounds or sizes["rounds"]
    if rounds < 2:
        parser.error(f"--rounds {rounds}: at least 2, for a median of alternating runs")
    report = bench(sizes, rounds, fresh=not args.quick)  # a smoke run's pieces in this process: 30 s, not minutes
    from bench.__main__ import save_report  # here: a piece's process imports no more than its stage

    save_report(args.out, args.quick, "audit-cost", markdown(report), report)


if __name__ == "__main__":
    main()
