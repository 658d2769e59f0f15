"""The audit stage's thresholds, measured on injected truth, through the real pipeline (a project copy per dataset
and backbone, `dvc repro` once, then the stages by hand, the audit stage once per threshold setting).

    python -m bench.audit                # about 10 minutes on 2 CPU cores, report in bench/results/audit.md
    python -m bench.audit --standin S    # reuse a stand-in trained by an earlier run (S.pth, its stats in S.json)
    python -m bench.audit --quick        # a smoke run with tiny sizes (stand-in only), report in a temporary dir

Datasets: scikit-learn's digits as 32x32 PNGs, and generated photo-like JPEGs (96x96, 10 classes). Backbones: VGG16
with random weights, and a ResNet-18 stand-in trained here for a few minutes on other generated classes (trained,
discriminative features). Phases, each one scan/prepare/extract/audit: (1) clean; (2) digits only: 5% of the
training labels flipped (files moved to another class folder); (3) copies of 2% of the test images beside them,
each with a small change, plus injected outliers. Truth: the flipped files, the copy pairs (a leak where exactly
one of the pair is in train), the outliers.

The audit stage runs once per (duplicate_ratio, outlier_z) pair, the two lists zipped to save runs, but the sweeps
are independent: leaks and duplicates depend on duplicate_ratio only, outliers on outlier_z (and k) only, label
findings on neither (pipeline/audit.py), so each is reported on its own.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import auditdata
from bench.__main__ import save_report

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Sizes:
    digits: int  # 0: all 1797
    photos: int
    standin_classes: int
    standin_per_class: int
    standin_seconds: float
    ratios: tuple[float, ...]  # audit.duplicate_ratio swept (zipped with outlier_z into audit runs: independent)
    zs: tuple[float, ...]  # audit.outlier_z swept; (DEFAULT_RATIO, DEFAULT_Z) must be one of the zipped pairs
    ks: tuple[int, ...]  # audit.k for the label check
    backbones: tuple[str, ...]
    repro: bool  # the first run of each project is `dvc repro` (else the stages by hand)


FULL = Sizes(0, 5200, 20, 150, 150.0, (0.3, 0.4, 0.5, 0.6), (6.0, 8.0, 10.0, 12.0), (5, 10, 20),
             ("vgg16-random", "resnet18-standin"), True)  # fmt: skip
QUICK = Sizes(300, 400, 4, 20, 3.0, (0.5,), (10.0,), (10,), ("resnet18-standin",), False)
NOISE, COPIES = 0.05, 0.02
DEFAULT_RATIO, DEFAULT_Z, DEFAULT_K = 0.5, 10.0, 10  # params.yaml's audit defaults


def _project(work: Path, name: str, root: Path, extract: dict[str, Any]) -> Path:
    from tests.conftest import copy_project, write_params

    project = copy_project(work / name)
    extract = {"image_size": 64, "batch_size": 64, "num_workers": "auto"} | extract
    write_params(project, {"data": {"source": "imagefolder", "root": str(root)}, "extract": extract})
    return project


def _run(project: Path, *args: str) -> None:
    from tests.conftest import run

    run(project, *args)


def _refresh(project: Path, first: bool, repro: bool) -> None:
    """scan, prepare, extract and audit at the params' thresholds (the first run: `dvc repro`, when asked)."""
    from tests.conftest import STAGE_ARGS

    if first and repro:
        _run(project, "dvc", "repro")
        return
    for stage in ("scan", "prepare", "extract"):
        _run(project, "python", "-m", f"pipeline.{stage}", *STAGE_ARGS[stage])


def _audit(project: Path, **params: Any) -> list[dict[str, str]]:
    """The audit stage at ``params`` (audit.*): the rows of issues.csv."""
    from tests.conftest import write_params

    write_params(project, {"audit": params})
    _run(project, "python", "-m", "pipeline.audit")
    with open(project / "reports/audit/issues.csv", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _splits(project: Path) -> dict[str, str]:
    from pipeline.sources import read_manifest

    return {it.id: it.split for it in read_manifest(project / "data/prepared")[0]}


def _inside(project: Path, k: int) -> dict[str, Any]:
    """The stage's own neighbours, in this process: each row's distance to its nearest training image, its local
    scale (findings.local_scale: the distance to its second-nearest training image), its robust outlier z, and
    every feature row by id (unit length)."""
    import torch

    from pipeline import features, findings
    from pipeline.audit import neighbours

    paths = {s: project / f"data/features/{s}.h5" for s in SPLITS}
    found = neighbours(paths, k, torch.device("cpu"))
    scores = {s: findings.outlier_scores(n) for s, n in found.items()}
    every = np.concatenate(list(scores.values()))
    median = float(np.median(every))
    spread = 1.4826 * float(np.median(np.abs(every - median)))
    ids, nearest, local, z, vectors = [], [], [], [], {}
    for s in SPLITS:
        fs = features.read_features(paths[s])
        x = fs.features["original"] / np.linalg.norm(fs.features["original"], axis=1, keepdims=True)
        vectors |= dict(zip(fs.ids, x, strict=True))
        ids += fs.ids
        nearest += list(findings.distance(found[s].train[0][:, 0]))
        local += list(findings.local_scale(found[s]))
        z += list((scores[s] - median) / spread)
    nearest_d, local_d = np.array(nearest), np.array(local)
    return {"ids": ids, "nearest": nearest_d, "local": local_d, "ratio": nearest_d / local_d, "z": np.array(z),
            "vectors": vectors}  # fmt: skip


def _judged(a: str, b: str, vec: dict[str, np.ndarray], split: dict[str, str], local: np.ndarray) -> float:
    """A copy pair's d over the local scale the stage judges it by (``local``: a's and b's): the held-out image's
    for a leak, the larger of the two inside one split (near when near for either)."""
    d = float(np.linalg.norm(vec[a] - vec[b]))
    if (split[a] == "train") != (split[b] == "train"):
        return d / float(local[1] if split[a] == "train" else local[0])
    return d / float(local.max())


def _pct(values: np.ndarray, qs: tuple[float, ...]) -> dict[str, float]:
    return {f"p{q:g}": float(np.percentile(values, q)) for q in qs} if len(values) else {}


def _pairs(rows: list[dict[str, str]], kind: str) -> set[frozenset[str]]:
    return {frozenset((r["id"], r["other_id"])) for r in rows if r["kind"] == kind}


def _label_scores(rows: list[dict[str, str]], flipped: dict[str, str]) -> dict[str, Any]:
    found = {r["id"]: r["suggested"] for r in rows if r["kind"] == "label"}
    hits = [i for i in found if i in flipped]
    return {
        "flipped": len(flipped), "found": len(found), "true": len(hits),
        "recall": len(hits) / max(len(flipped), 1), "precision": len(hits) / max(len(found), 1),
        "suggested_right": sum(found[i] == flipped[i] for i in hits),
    }  # fmt: skip


def _leak_scores(rows: list[dict[str, str]], copies: list[tuple[str, str, str]], split: dict[str, str],
                 outliers: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    """Recall of the copy pairs that are leaks (one in train, the other held out) and of those that are duplicates
    (both in one split); leaks that are no copy pair: false (test ones per 1,000 test images)."""
    truth = {frozenset((a, b)) for a, b, _ in copies}
    leaks, dups = _pairs(rows, "leak"), _pairs(rows, "duplicate")
    want_leak = [frozenset((a, b)) for a, b, _ in copies if (split[a] == "train") != (split[b] == "train")]
    want_dup = [frozenset((a, b)) for a, b, _ in copies if split[a] == split[b]]
    false = [r for r in rows if r["kind"] == "leak" and frozenset((r["id"], r["other_id"])) not in truth]
    n_test = sum(s == "test" for s in split.values())
    false_test = sum(r["split"] == "test" for r in false)
    return {
        "leaks_expected": len(want_leak), "leaks_found": sum(p in leaks for p in want_leak),
        "leak_recall": sum(p in leaks for p in want_leak) / len(want_leak) if want_leak else None,
        "dups_expected": len(want_dup), "dups_found": sum(p in dups for p in want_dup),
        "false_leaks": len(false), "false_leaks_test": false_test, "test_images": n_test,
        "false_leaks_per_1000_test": 1000 * false_test / max(n_test, 1),
        "outliers_in_false_leaks": sum(r["id"] in outliers or r["other_id"] in outliers for r in false),
        "dup_findings": sum(r["kind"] == "duplicate" for r in rows),
        "false_dups": sum(p not in truth for p in dups),
    }  # fmt: skip


def _outlier_scores(rows: list[dict[str, str]], outliers: dict[str, str]) -> dict[str, int]:
    found = {r["id"] for r in rows if r["kind"] == "outlier"}
    return {"true": len(found & set(outliers)), "false": len(found - set(outliers)), "injected": len(outliers)}


def _counts(rows: list[dict[str, str]]) -> dict[str, int]:
    return {kind: sum(r["kind"] == kind for r in rows) for kind in ("leak", "label", "duplicate", "outlier")}


def _examples(rows: list[dict[str, str]], n: int = 4) -> dict[str, list[dict[str, str]]]:
    keep = ("id", "split", "label", "score", "other_id", "other_split", "suggested")
    out: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        if len(out.setdefault(r["kind"], [])) < n:
            out[r["kind"]].append({k: r[k] for k in keep})
    return out


def _standin(sizes: Sizes, work: Path, reuse: Path | None) -> tuple[Path, dict[str, Any]]:
    """The ResNet-18 stand-in: trained here (its stats saved beside it, .json), or ``reuse``d with its stats."""
    import json

    if reuse is not None:
        print(f"reusing the stand-in {reuse}", flush=True)
        return reuse, json.loads(reuse.with_suffix(".json").read_text()) | {"reused": str(reuse)}
    path = work / "standin.pth"
    print(f"training the ResNet-18 stand-in for {sizes.standin_seconds:.0f} s ...", flush=True)
    stats = auditdata.train_standin(
        path, classes=sizes.standin_classes, per_class=sizes.standin_per_class, seconds=sizes.standin_seconds
    )
    path.with_suffix(".json").write_text(json.dumps(stats, indent=1) + "\n")
    return path, stats


def _sweep(sizes: Sizes) -> list[tuple[float, float]]:
    pairs = list(zip(sizes.ratios, sizes.zs, strict=True))
    assert (DEFAULT_RATIO, DEFAULT_Z) in pairs, "the defaults must be one of the zipped settings"
    return pairs


def run(sizes: Sizes, work: Path, reuse: Path | None = None) -> dict[str, Any]:
    import shutil

    import torch

    start = time.perf_counter()
    rng = np.random.default_rng(0)
    report: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), load average {os.getloadavg()[0]:.1f} at start",
        "sizes": asdict(sizes),
        "defaults": {"duplicate_ratio": DEFAULT_RATIO, "outlier_z": DEFAULT_Z, "k": DEFAULT_K},
        "runs": {},
    }
    standin, report["standin"] = _standin(sizes, work, reuse)
    backbones = {
        "vgg16-random": {"arch": "vgg16", "weights": "random"},
        "resnet18-standin": {"arch": "resnet18", "weights": str(standin)},
    }
    roots = {"digits": work / "digits", "photos": work / "photos"}
    print("writing the images ...", flush=True)
    auditdata.write_digits(roots["digits"], sizes.digits)
    auditdata.write_photos(roots["photos"], sizes.photos)
    projects = {(d, b): _project(work, f"{d}-{b}", roots[d], backbones[b]) for d in roots for b in sizes.backbones}

    # (1) clean: every finding is false but the labels (the digits and photos may hold genuinely doubtful ones)
    for (data, bb), project in projects.items():
        print(f"{data} / {bb}: clean ...", flush=True)
        _refresh(project, True, sizes.repro)
        split = _splits(project)
        r = report["runs"].setdefault(f"{data}/{bb}", {})
        r["clean_leaks"], r["clean_outliers"] = {}, {}
        for ratio, z in _sweep(sizes):
            rows = _audit(project, duplicate_ratio=ratio, outlier_z=z, k=DEFAULT_K)
            c = _counts(rows)
            r["clean_leaks"][str(ratio)] = {
                "leak": c["leak"], "duplicate": c["duplicate"],
                "false_leaks_per_1000_test": _leak_scores(rows, [], split, {})["false_leaks_per_1000_test"],
            }  # fmt: skip
            r["clean_outliers"][str(z)] = c["outlier"]
            if (ratio, z) == (DEFAULT_RATIO, DEFAULT_Z):
                r["clean_default"] = c
                r["clean_examples"] = _examples(rows)
                sheets = work / "sheets" / f"{data}-{bb}-clean"
                shutil.rmtree(sheets, ignore_errors=True)
                shutil.copytree(project / "reports/audit", sheets)
        inside = _inside(project, DEFAULT_K)
        r["clean_ratio"] = _pct(inside["ratio"], (0.1, 1, 5, 50))
    clean = {data: _splits(projects[(data, sizes.backbones[0])]) for data in roots}  # id -> split
    clean_split = clean["digits"]

    # (2) digits: 5% of the training labels flipped
    train = sorted(i for i, s in clean_split.items() if s == "train")
    classes = sorted({i.split("/")[0] for i in clean_split})
    chosen = rng.choice(train, size=round(NOISE * len(train)), replace=False)
    flipped: dict[str, str] = {}  # new id -> the true class
    for item in chosen:
        true = item.split("/")[0]
        new = auditdata.move(roots["digits"], item, str(rng.choice([c for c in classes if c != true])))
        flipped[new] = true
    for bb in sizes.backbones:
        print(f"digits / {bb}: {len(flipped)} labels flipped ...", flush=True)
        project = projects[("digits", bb)]
        _refresh(project, False, sizes.repro)
        report["runs"][f"digits/{bb}"]["labels"] = {
            str(k): _label_scores(_audit(project, duplicate_ratio=DEFAULT_RATIO, outlier_z=DEFAULT_Z, k=k), flipped)
            for k in sizes.ks
        }
    for new, true in flipped.items():
        auditdata.move(roots["digits"], new, true)

    # (3) copies of 2% of the test images, and outliers
    for data, root in roots.items():
        split = clean[data]
        test = sorted(i for i, s in split.items() if s == "test")
        picked = rng.choice(test, size=max(3, round(COPIES * len(test))), replace=False)
        copies = [(a, auditdata.changed_copy(root, a, c, rng), c)
                  for a, c in zip(picked, np.resize(auditdata.COPY_CHANGES, len(picked)), strict=True)]  # fmt: skip
        size = 32 if data == "digits" else 96
        outliers = auditdata.write_outliers(root, sorted({i.split("/")[0] for i in split}), size)
        for bb in sizes.backbones:
            print(f"{data} / {bb}: {len(copies)} copies, {len(outliers)} outliers ...", flush=True)
            project = projects[(data, bb)]
            _refresh(project, False, sizes.repro)
            split = _splits(project)
            r = report["runs"][f"{data}/{bb}"]
            r["copies"] = {"n": len(copies), "in_train": sum(split[b] == "train" for _, b, _ in copies)}
            r["sweep"], r["outliers_by_z"] = {}, {}
            for ratio, z in _sweep(sizes):
                rows = _audit(project, duplicate_ratio=ratio, outlier_z=z, k=DEFAULT_K)
                r["sweep"][str(ratio)] = _leak_scores(rows, copies, split, outliers)
                r["outliers_by_z"][str(z)] = _outlier_scores(rows, outliers)
            inside = _inside(project, DEFAULT_K)
            vec, where = inside["vectors"], {i: n for n, i in enumerate(inside["ids"])}
            local = inside["local"]
            injected = {x for a, b, _ in copies for x in (a, b)} | set(outliers)
            genuine = np.array([d for i, d in zip(inside["ids"], inside["ratio"], strict=True) if i not in injected])

            copy_d = np.array([_judged(a, b, vec, split, local[[where[a], where[b]]]) for a, b, _ in copies])
            rest_z = np.array([z for i, z in zip(inside["ids"], inside["z"], strict=True) if i not in outliers])
            r["distances"] = {
                "copies": _pct(copy_d, (50, 90, 100)),
                "copies_by_change": {
                    c: float(copy_d[[k for k, x in enumerate(copies) if x[2] == c]].max())
                    for c in auditdata.COPY_CHANGES
                },  # fmt: skip
                "genuine_nearest": _pct(genuine, (0.1, 1, 5, 50)),
                "genuine_below": {str(q): float(np.mean(genuine <= q)) for q in sizes.ratios},
            }
            r["z"] = {
                "outliers": {kind: float(inside["z"][where[i]]) for i, kind in outliers.items()},
                "rest": _pct(rest_z, (50, 99, 99.9, 100)),
            }
    report["seconds"] = time.perf_counter() - start
    report["recommended"] = recommend(report, sizes)
    return report


def recommend(report: dict[str, Any], sizes: Sizes) -> dict[str, Any]:
    """duplicate_ratio: of the swept values with <= 1 false leak per 1,000 clean test images on every run, the one
    with the highest leak recall on its worst run; outlier_z: the smallest with no false outlier on any run."""
    runs = list(report["runs"].values())
    quiet = [q for q in sizes.ratios if all(r["clean_leaks"][str(q)]["false_leaks_per_1000_test"] <= 1 for r in runs)]
    worst = {q: min((r["sweep"][str(q)]["leak_recall"] or 1) for r in runs) for q in quiet}
    ratio = max(quiet, key=lambda q: (worst[q], -q)) if quiet else None
    z = next(
        (z for z in sorted(sizes.zs)
         if all(r["outliers_by_z"][str(z)]["false"] == 0 and r["clean_outliers"][str(z)] == 0 for r in runs)),
        None,
    )  # fmt: skip
    return {"duplicate_ratio": ratio, "worst_leak_recall": worst.get(ratio), "outlier_z": z}


# The previous run of this benchmark, under the old rule (bench/results/audit.md as it was): per data / backbone,
# copies' d / the global median nearest distance (p50, p90, max; max by change: jpeg90, crop, brightness), genuine
# nearest pairs' (p0.1, p1, p5, p50), and the share of genuine pairs at or below ratio 0.1, 0.2, 0.3, 0.5
BEFORE_D = {
    "digits/vgg16-random": ("0.240 0.997 1.018", "0.110, 1.018, 0.242", "0.513 0.706 0.779 1.000", "0 0 0 0.11"),
    "digits/resnet18-standin": ("0.448 1.629 2.421", "0.106, 2.421, 0.559", "0.311 0.446 0.611 0.999", "0 0 0.11 1.79"),
    "photos/vgg16-random": ("0.253 0.383 0.420", "0.373, 0.420, 0.384", "0.705 0.753 0.829 1.001", "0 0 0 0"),
    "photos/resnet18-standin": ("0.107 0.558 1.185", "0.087, 0.238, 1.185", "0.183 0.245 0.367 1.003",
                                "0 0.21 2.63 11.97"),
}  # fmt: skip
BEFORE = """## Before: a ratio to the global median nearest-neighbour distance

From the previous run of this benchmark (same data, sizes and truth; its stand-in is the one reused here), when a
pair was near at d <= duplicate_ratio x the median, over every image, of the distance to its nearest training
image. Copies' and genuine nearest pairs' d / that median:

{table}

Leak recall with copies / false leaks per 1,000 clean test images, per ratio (0.1, 0.2, 0.3, 0.5): photos random
VGG16 0% / 0, 28% / 0, 83% / 0, 100% / 0; photos stand-in 44% / 0, 50% / 4.6, 67% / 28.5, 78% / 125.9; digits
random VGG16 20%, 40%, 80%, 80% (0 false); digits stand-in 20%, 40%, 40%, 60% / 0, 0, 0, 26.8. No ratio met both
targets on both backbones: random features needed 0.5, trained ones were over 1 false leak per 1,000 from 0.3
(4.6 at 0.2).
"""


def _before() -> str:
    rows = [
        "| data / backbone | copies p50 | p90 | max | max by change (jpeg90, crop, brightness) | genuine p0.1 | p1 "
        "| p5 | p50 | genuine at or below each ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, (copies, by, genuine, below) in BEFORE_D.items():
        shares = ", ".join(f"{q}: {float(v):.2f}%" for q, v in zip((0.1, 0.2, 0.3, 0.5), below.split(), strict=True))
        rows.append(f"| {name} | {' | '.join(copies.split())} | {by} | {' | '.join(genuine.split())} | {shares} |")
    return BEFORE.format(table="\n".join(rows))


def markdown(r: dict[str, Any]) -> str:
    s, st, dflt = r["sizes"], r["standin"], r["defaults"]
    trained = (f"trained by the previous run and reused here (`--standin`): {st['seconds']:.0f} s"
               if st.get("reused") else f"{st['seconds']:.0f} s")  # fmt: skip
    lines = [
        "# Audit thresholds: leaks, label errors and outliers on injected truth",
        "",
        f"{r['machine']}. `python -m bench.audit`, {r['seconds'] / 60:.1f} min in all. Image size 64, batch 64, "
        f"float16 features. Digits: {s['digits'] or 1797} as 32x32 PNGs; photos: {s['photos']} generated 96x96 JPEGs, "
        "10 classes. Backbones: VGG16 with random weights (pool5, avg), and a ResNet-18 stand-in trained from "
        f"scratch at 64 px on {st['classes']} other generated classes ({st['images']} images, {st['steps']} steps, "
        f"{trained}; held-out accuracy {st['heldout_acc']:.2f}). Truth: {NOISE:.0%} of the digits' "
        f"training labels flipped; copies of {COPIES:.0%} of the test images (JPEG q90, 1-2 px crop, brightness "
        "±3-5%, in turn) beside their originals; 7 outliers (3 blank frames, 2 noise, 2 text screenshots).",
        "",
        "Near-duplicate rule (pipeline/findings.py): a pair is near when d(i, j) <= duplicate_ratio x i's distance "
        "to its second-nearest training image (exact copies skipped), Lowe's ratio test. The audit stage ran once "
        "per (duplicate_ratio, outlier_z) pair, "
        + ", ".join(f"({q:g}, {z:g})" for q, z in zip(s["ratios"], s["zs"], strict=True))
        + ", but the two sweeps are independent (leaks and duplicates depend on the ratio only, outliers on z and k "
        f"only, labels on neither), so each has its own table. Defaults: duplicate_ratio {dflt['duplicate_ratio']:g}, "
        f"outlier_z {dflt['outlier_z']:g}, k {dflt['k']}.",
        "",
        "## Label errors (digits, 5% flipped; audit.k swept, T = 0.07)",
        "",
        "| backbone | k | flipped | found | recall | precision | suggested = true class |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, run in r["runs"].items():
        for k, x in run.get("labels", {}).items():
            lines.append(f"| {name.split('/')[1]} | {k} | {x['flipped']} | {x['found']} | {x['recall']:.0%} | "
                         f"{x['precision']:.0%} | {x['suggested_right']}/{x['true']} |")  # fmt: skip
    lines += ["", "## Findings on the clean data (no injected truth)", "",
              "At the defaults (every leak, duplicate and outlier here is false; the labels may be genuinely "
              "doubtful images):", "",
              "| data / backbone | leaks | labels | duplicates | outliers |",
              "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for name, run in r["runs"].items():
        c = run["clean_default"]
        lines.append(f"| {name} | {c['leak']} | {c['label']} | {c['duplicate']} | {c['outlier']} |")
    lines += ["", "Per duplicate_ratio (leaks, duplicates, false leaks per 1,000 test images) and per outlier_z "
              "(outliers):", "",
              "| data / backbone | " + " | ".join(f"ratio {q:g}" for q in s["ratios"]) + " | "
              + " | ".join(f"z {z:g}" for z in s["zs"]) + " |",
              "| --- | " + " | ".join("---" for _ in [*s["ratios"], *s["zs"]]) + " |"]  # fmt: skip
    for name, run in r["runs"].items():
        leaks = " | ".join(f"{x['leak']}, {x['duplicate']}, {x['false_leaks_per_1000_test']:.2f}"
                           for x in run["clean_leaks"].values())  # fmt: skip
        outs = " | ".join(str(v) for v in run["clean_outliers"].values())
        lines.append(f"| {name} | {leaks} | {outs} |")
    lines += ["", "## Distance d / local scale: injected copies against genuinely different nearest pairs", "",
              "local scale = an image's distance to its second-nearest training image (findings.local_scale). "
              "Copies: the pair's d over the held-out image's local scale (a leak), or over the larger of the two "
              "(both in one split: near for either). Genuine: every image but the injected ones, its nearest "
              "training image's d over its own local scale (at most 1). Clean: the same before any injection.", "",
              "| data / backbone | copies p50 | p90 | max | max by change (jpeg90, crop, brightness) | genuine p0.1 "
              "| p1 | p5 | p50 | clean p0.1, p1 | genuine at or below each ratio |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for name, run in r["runs"].items():
        d = run["distances"]
        c, g, cl = d["copies"], d["genuine_nearest"], run["clean_ratio"]
        by = ", ".join(f"{v:.3f}" for v in d["copies_by_change"].values())
        below = ", ".join(f"{q}: {v:.2%}" for q, v in d["genuine_below"].items())
        lines.append(f"| {name} | {c['p50']:.3f} | {c['p90']:.3f} | {c['p100']:.3f} | {by} | {g['p0.1']:.3f} | "
                     f"{g['p1']:.3f} | {g['p5']:.3f} | {g['p50']:.3f} | {cl['p0.1']:.3f}, {cl['p1']:.3f} | "
                     f"{below} |")  # fmt: skip
    lines += ["", "## Leaks and duplicates with copies, per duplicate_ratio", "",
              "| data / backbone | ratio | copies (in train) | leaks found / expected | recall | false leaks (test, "
              "per 1,000 test) | copy duplicates found / expected | other duplicates |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for name, run in r["runs"].items():
        for q, x in run["sweep"].items():
            recall = "-" if x["leak_recall"] is None else f"{x['leak_recall']:.0%}"
            lines.append(
                f"| {name} | {q} | {run['copies']['n']} ({run['copies']['in_train']}) | {x['leaks_found']} / "
                f"{x['leaks_expected']} | {recall} | {x['false_leaks']} ({x['false_leaks_test']}, "
                f"{x['false_leaks_per_1000_test']:.2f}) | {x['dups_found']} / {x['dups_expected']} "
                f"| {x['false_dups']} |"
            )
    lines += ["", "## Outliers: robust z of the injected ones against the rest, per outlier_z", "",
              "| data / backbone | injected z (min, median) | rest p50 | p99 | p99.9 | max | "
              + " | ".join(f"z > {z:g}: true / false" for z in s["zs"]) + " |",
              "| --- | --- | --- | --- | --- | --- | " + " | ".join("---" for _ in s["zs"]) + " |"]  # fmt: skip
    for name, run in r["runs"].items():
        zs, rest = np.array(list(run["z"]["outliers"].values())), run["z"]["rest"]
        cells = " | ".join(f"{x['true']} / {x['false']}" for x in run["outliers_by_z"].values())
        lines.append(f"| {name} | {zs.min():.1f}, {np.median(zs):.1f} | {rest['p50']:.2f} | {rest['p99']:.2f} | "
                     f"{rest['p99.9']:.2f} | {rest['p100']:.2f} | {cells} |")  # fmt: skip
    lines += ["", "Injected outliers' z, each: " + "; ".join(
        f"{name}: " + ", ".join(f"{k} {v:.1f}" for k, v in run["z"]["outliers"].items())
        for name, run in r["runs"].items())]  # fmt: skip
    rec = r["recommended"]
    worst = "-" if rec["worst_leak_recall"] is None else f"{rec['worst_leak_recall']:.0%}"
    lines += ["", "## Defaults, by rule", "",
              f"Of the duplicate_ratio values with <= 1 false leak per 1,000 clean test images on every run, the best "
              f"leak recall on its worst run: **{rec['duplicate_ratio']}** (worst-run recall {worst}). Smallest "
              f"outlier_z with no false outlier on any run: **{rec['outlier_z']}**."]  # fmt: skip
    if len(s["ratios"]) > 1:
        lines += ["", _before().rstrip("\n")]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, report in a temporary directory")
    parser.add_argument("--out", type=Path, help="report directory (default: bench/results)")
    parser.add_argument("--workdir", type=Path, help="keep the images and projects here")
    parser.add_argument("--standin", type=Path, help="reuse this stand-in (.pth, its stats in .json beside it)")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    os.environ["DVC_NO_ANALYTICS"] = "1"
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        report = run(sizes, work, args.standin)
    save_report(args.out, args.quick, "audit", markdown(report), report)


if __name__ == "__main__":
    main()
