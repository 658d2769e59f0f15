"""Stage `audit`: leaks between splits, duplicates, likely label errors and outliers, found in the cached features
(pipeline.findings) without running the backbone; counts in metrics.json, one row per finding in issues.csv, and a
contact sheet of the worst of each kind."""

from __future__ import annotations

import argparse
import csv
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline import features, findings, knn, sheets, sources
from pipeline.config import AuditConfig, DataConfig, load_params, to_dict, with_dvc_paths
from pipeline.errors import PipelineError, run_stage
from pipeline.files import replaced
from pipeline.hardware import resolve_device
from pipeline.provenance import identity

log = logging.getLogger(__name__)

ISSUES = "issues.csv"
# key: the image's content key, what a row of data/corrections.csv names
COLUMNS = ("id", "key", "path", "split", "label", "kind", "score", "other_id", "other_path", "other_split", "suggested")
SHEET_COUNT = 16  # findings of each kind on its contact sheet
BLOCK_MB = 16  # the key rows stream past in blocks of about this much float32
QUERY_MB = 256  # and the query rows are read this much float32 at a time
VOTE_ROWS = 8192  # rows of label votes made at a time: 32 MB of float32 at 1,000 classes


def neighbours(paths: dict[str, Path], k: int, device: torch.device) -> dict[str, findings.Neighbours]:
    """Every split's rows with their k nearest training rows and k nearest rows of their own split, both streamed:
    neither a split nor a similarity matrix is ever whole."""
    out = {}
    for split, path in paths.items():
        reader = features.BlockReader(path, block_mb=QUERY_MB, views=["original"])
        found_train, found_own, labels = [], [], []
        for b in range(reader.num_blocks):
            a = b * reader.block_rows
            x, y = reader.read(b)
            own_rows = np.arange(a, a + len(x))
            found = knn.nearest(
                _keys(paths["train"]), x, k=k, device=device, exclude=own_rows if split == "train" else None
            )
            found_train.append(found)
            if split != "train":
                found_own.append(knn.nearest(_keys(path), x, k=k, device=device, exclude=own_rows))
            labels.append(y)
        train = _joined(found_train, k)
        own = train if split == "train" else _joined(found_own, k)
        out[split] = findings.Neighbours(split, np.concatenate(labels) if labels else np.zeros(0, np.int64), train, own)
    return out


def _keys(path: Path) -> Iterator[np.ndarray]:
    reader = features.BlockReader(path, block_mb=BLOCK_MB, views=["original"])
    for b in range(reader.num_blocks):
        yield reader.read(b)[0]


def _joined(parts: list[tuple[torch.Tensor, torch.Tensor]], k: int) -> tuple[np.ndarray, np.ndarray]:
    if not parts:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return tuple(torch.cat(p).cpu().numpy() for p in zip(*parts, strict=True))  # type: ignore[return-value]


def audit(
    found: dict[str, findings.Neighbours], cfg: AuditConfig, *, num_classes: int
) -> tuple[list[findings.Finding], dict[str, int | float]]:
    """The findings, worst first, and the counts of metrics.json."""
    scales = np.concatenate([findings.local_scale(n) for n in found.values()])
    log.info(
        "distance to the second-nearest training image: median %.4g; near-duplicates within %g x that of the image",
        float(np.median(scales)) if len(scales) else 0.0, cfg.duplicate_ratio,
    )  # fmt: skip
    result, groups = [], 0
    for n in found.values():
        result += findings.leaks(n, cfg.duplicate_ratio)
        pairs, count = findings.duplicates(n, cfg.duplicate_ratio)
        result, groups = result + pairs, groups + count
    result += _label_findings(found, cfg, num_classes)
    result += findings.outliers({s: findings.outlier_scores(n) for s, n in found.items()}, cfg.outlier_z)
    result = findings.ranked(result)
    counts = {kind: sum(f.kind == kind for f in result) for kind in findings.KINDS}
    # short keys: `dvc metrics show` puts every key of every metrics file in one line of at most 160 characters
    metrics = {"leaks": counts["leak"], "dups": groups, "mislabeled": counts["label"], "outliers": counts["outlier"]}
    return result, metrics


def _label_findings(
    found: dict[str, findings.Neighbours], cfg: AuditConfig, num_classes: int
) -> list[findings.Finding]:
    """Confident learning over every split at once, each image's votes from its training neighbours (never
    itself). A training image whose class has no other training image has no vote for its label: left out."""
    train_labels = found["train"].labels
    per_class = np.bincount(train_labels, minlength=num_classes)
    usable = {s: per_class[n.labels] > 1 if s == "train" else np.ones(len(n.labels), bool) for s, n in found.items()}
    if not usable["train"].all():
        log.warning(
            "label check: %d training image(s) left out: their class has no other training image to vote for it",
            int((~usable["train"]).sum()),
        )
    # (N, C) float32, the one copy (cleanlab makes one more): filled VOTE_ROWS rows at a time, not a list of
    # per-split arrays concatenated and both kept alive through cleanlab (400 MB more at 100,000 x 1,000)
    probs_all = np.empty((sum(int(u.sum()) for u in usable.values()), num_classes), np.float32)
    labels, where, a = [], [], 0
    for split, n in found.items():
        sims, rows = n.train[0][usable[split]], n.train[1][usable[split]]
        for b in range(0, len(sims), VOTE_ROWS):
            c = min(b + VOTE_ROWS, len(sims))
            probs_all[a + b : a + c] = findings.vote_probabilities(
                sims[b:c], train_labels[rows[b:c]], num_classes, temperature=cfg.temperature
            )
        a += len(sims)
        labels.append(n.labels[usable[split]])
        where += [(split, int(i)) for i in np.flatnonzero(usable[split])]
    labels_all = np.concatenate(labels)
    if len(labels_all) < 2:
        return []
    doubted, scores = findings.label_issues(labels_all, probs_all)
    suggested = probs_all[doubted].argmax(1)
    return [
        findings.Finding("label", *where[i], float(s), suggested=int(c))
        for i, s, c in zip(doubted, scores, suggested, strict=True)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prepared", type=Path, help="directory with manifest.csv and classes.json")
    parser.add_argument("--features", type=Path, help="directory with train.h5, val.h5 and test.h5")
    parser.add_argument("--out", type=Path, help="directory for metrics.json, issues.csv and the contact sheets")
    args = with_dvc_paths(parser.parse_args(), prepared="prepared", features="features", out="audit")
    params = load_params()
    cfg = params.audit
    log.info("audit params: %s", to_dict(cfg))
    items, classes = sources.read_manifest(args.prepared)
    paths = checked_splits(args.features, items, classes)
    device = resolve_device(params.train.device)
    found = neighbours(paths, cfg.k, device)
    result, metrics = audit(found, cfg, num_classes=len(classes))
    ids = {s: [it.id for it in items if it.split == s] for s in paths}
    keys = {it.id: it.key for it in items}
    log.info("%s", ", ".join(f"{key} {value}" for key, value in metrics.items()))
    with replaced(args.out) as out:
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        write_issues(out / ISSUES, result, ids, keys, classes, params.data, found)
        write_sheets(out / "plots", result, ids, classes, params.data, found)


def checked_splits(folder: Path, items: Sequence[sources.Item], classes: Sequence[str]) -> dict[str, Path]:
    """The feature file of each split that has images, checked against the manifest: one provenance, the
    manifest's classes, and each split's ids in the manifest's order; a split without images is left out."""
    paths, first = {}, None
    for split in sources.SPLITS:
        path = folder / f"{split}.h5"
        prov = features.read_provenance(path)
        want = [it.id for it in items if it.split == split]
        stale = f"{path} does not hold the features of data/prepared's manifest"
        if prov.get("class_names") != list(classes):
            raise PipelineError(f"{stale}: its classes differ: run dvc repro extract")
        first = identity(prov) if first is None else first
        if identity(prov) != first:
            raise PipelineError(f"{stale}: it was extracted with other settings than train.h5: run dvc repro extract")
        if features.read_ids(path) != want:
            raise PipelineError(f"{stale}: its images differ: run dvc repro extract")
        if not want:
            if split == "train":
                raise PipelineError("the train split has no images: there is nothing to compare the others with")
            log.warning("the %s split has no images: nothing to audit there", split)
            continue
        paths[split] = path
    return paths


def _path(cfg: DataConfig, item_id: str) -> str:
    return (Path(cfg.root) / item_id).as_posix() if cfg.source == "imagefolder" else ""


def write_issues(
    path: Path,
    result: Sequence[findings.Finding],
    ids: dict[str, list[str]],
    keys: dict[str, str],
    classes: Sequence[str],
    data: DataConfig,
    found: dict[str, findings.Neighbours],
) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(COLUMNS)
        for r in result:
            item_id = ids[r.split][r.row]
            other = ids[r.other_split][r.other_row] if r.other_split else ""
            writer.writerow([
                item_id, keys[item_id], _path(data, item_id), r.split, classes[found[r.split].labels[r.row]],
                r.kind, f"{r.score:.6g}", other, _path(data, other) if other else "", r.other_split,
                classes[r.suggested] if r.suggested >= 0 else "",
            ])  # fmt: skip


def write_sheets(
    folder: Path,
    result: Sequence[findings.Finding],
    ids: dict[str, list[str]],
    classes: Sequence[str],
    data: DataConfig,
    found: dict[str, findings.Neighbours],
) -> None:
    """One contact sheet per kind of finding, its worst SHEET_COUNT; a pair (leak, duplicate) side by side."""
    folder.mkdir(parents=True, exist_ok=True)
    for kind in findings.KINDS:
        shown = [r for r in result if r.kind == kind][:SHEET_COUNT]
        tiles, captions = [], []
        for rank, r in enumerate(shown, 1):  # the rank: the finding's row among its kind's in issues.csv
            label = classes[found[r.split].labels[r.row]]
            tiles.append((r.split, r.row))
            doubt = f" -> {classes[r.suggested]}?" if r.suggested >= 0 else ""
            captions.append(f"{rank}. {r.split} {label}{doubt}")
            if r.other_split:
                tiles.append((r.other_split, r.other_row))
                captions.append(f"{r.other_split} {classes[found[r.other_split].labels[r.other_row]]} ({r.score:.4f})")
        pictures = sheets.images(data, [ids[s][i] for s, i in tiles]) if tiles else []
        sheet = sheets.contact_sheet(pictures, captions) if tiles else sheets.empty(f"no {kind} found")
        sheet.save(folder / f"{kind}s.png")


if __name__ == "__main__":
    run_stage(main)
