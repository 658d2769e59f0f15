"""What the audit finds in cached features, as pure functions over each split's nearest neighbours: leaks (a val or
test image with a near-duplicate in train), duplicates inside a split, likely label errors (cleanlab's confident
learning on out-of-sample k-NN votes) and outliers (images far from all their neighbours).

Distances are between L2-normalised features, d = sqrt(2 - 2 cos), and every threshold is relative to the features'
own spread. Random-weight features sit ten times closer together than pretrained ones, so a threshold on d itself
would flag nothing for one and everything for the other. Near-duplicates are judged against each image's own
neighbourhood, as Lowe's ratio test judges a match: a pair is near when it is closer than ``duplicate_ratio`` times
the image's distance to its second-nearest training image. On injected copies this held for random and trained
features alike, where a ratio to the median nearest distance of the whole set (cleanlab's rule) gave 28 false
leaks per 1,000 test images on trained features at the ratio that random ones needed (bench/results/audit.md).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

KINDS = ("leak", "label", "duplicate", "outlier")  # the order of issues.csv: what changes a score first


@dataclass(frozen=True)
class Neighbours:
    """One split's rows and their nearest neighbours: (N, k) cosine similarities, descending, and row numbers, in
    the training split (``train``) and in their own split (``own``; for train the same as ``train``); a row is never
    its own neighbour."""

    split: str
    labels: np.ndarray  # (N,) class of each row
    train: tuple[np.ndarray, np.ndarray]
    own: tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Finding:
    kind: str  # one of KINDS
    split: str
    row: int  # of its split
    score: float  # higher is worse: similarity (leak, duplicate), 1 - p(label) (label), robust z (outlier)
    other_split: str = ""  # leak, duplicate: the other image
    other_row: int = -1
    suggested: int = -1  # label: the class the features vote for


def distance(sims: np.ndarray) -> np.ndarray:
    """Euclidean distance between unit vectors of cosine similarity ``sims``; -inf (no neighbour) gives inf."""
    return np.sqrt(np.clip(2.0 - 2.0 * np.asarray(sims, dtype=np.float64), 0.0, None))


def local_scale(neighbours: Neighbours) -> np.ndarray:
    """Each row's distance to its second-nearest training image, identical ones (exact copies) skipped: how far
    apart images are where it lies (Lowe's ratio test compares a match with it). With fewer such neighbours,
    the farthest one listed."""
    d = distance(neighbours.train[0])
    if not d.shape[1]:
        return np.zeros(len(d))
    d = np.where(np.isfinite(d) & (d > 0), d, np.inf)
    second = np.sort(d, axis=1)[:, min(1, d.shape[1] - 1)]
    farthest = np.where(np.isfinite(d), d, 0.0).max(1)
    return np.where(np.isfinite(second), second, farthest)


def leaks(neighbours: Neighbours, ratio: float) -> list[Finding]:
    """Each val or test row whose nearest training row is within ``ratio`` x its local scale (identical features
    always)."""
    sims, rows = neighbours.train
    if neighbours.split == "train" or not sims.shape[1]:
        return []
    d = distance(sims[:, 0])
    hit = np.flatnonzero((d <= ratio * local_scale(neighbours)) | (d == 0))
    return [Finding("leak", neighbours.split, int(i), float(sims[i, 0]), "train", int(rows[i, 0])) for i in hit]


def duplicates(neighbours: Neighbours, ratio: float) -> tuple[list[Finding], int]:
    """Pairs inside one split within ``ratio`` x the local scale of either image, as the edges that join them into
    groups (Kruskal's, most similar first: a group of n images is n - 1 findings, each naming the image it joins),
    and the number of groups."""
    sims, rows = neighbours.own
    near = distance(sims) <= ratio * local_scale(neighbours)[:, None]
    i, j = np.nonzero(near | (sims >= 1.0))
    pairs = sorted(
        {(min(a, b), max(a, b)): float(s) for a, b, s in zip(i, rows[i, j], sims[i, j], strict=True)}.items(),
        key=lambda pair: (-pair[1], pair[0]),
    )
    parent: dict[int, int] = {}

    def root(a: int) -> int:
        while parent.setdefault(a, a) != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    found = []
    for (a, b), s in pairs:
        ra, rb = root(int(a)), root(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
            found.append(Finding("duplicate", neighbours.split, int(b), s, neighbours.split, int(a)))
    groups = len({root(a) for a in parent})
    return found, groups


def vote_probabilities(sims: np.ndarray, classes: np.ndarray, num_classes: int, *, temperature: float) -> np.ndarray:
    """(N, C) float32 class probabilities from each row's k neighbours (similarities and their classes, (N, k)),
    weighted exp(sim / T) as the k-NN accuracy's votes: out of sample when no row is its own neighbour."""
    finite = np.isfinite(sims)
    z = np.where(finite, sims / temperature, -np.inf)
    z = z - z.max(1, keepdims=True, initial=-np.inf, where=finite)
    weights = np.where(finite, np.exp(z), 0.0)
    total = weights.sum(1, keepdims=True)
    probs = np.zeros((len(sims), num_classes), dtype=np.float32)
    rows = np.repeat(np.arange(len(sims)), sims.shape[1])
    np.add.at(probs, (rows, classes.ravel()), (weights / np.where(total > 0, total, 1.0)).ravel())
    return probs


def label_issues(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose label cleanlab's confident learning doubts (prune by noise rate, on out-of-sample ``probs``),
    ranked by self-confidence, lowest first; and each one's score, 1 - p(label)."""
    from cleanlab.filter import find_label_issues

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ranked = find_label_issues(
            labels, probs, filter_by="prune_by_noise_rate", return_indices_ranked_by="self_confidence", n_jobs=1
        )
    for warning in caught:  # e.g. a class too small to estimate its noise: the log, not a traceback-like warning
        log.info("cleanlab: %s", str(warning.message).split("\n")[0])
    ranked = np.asarray(ranked, dtype=np.int64)
    return ranked, 1.0 - probs[ranked, labels[ranked]].astype(np.float64)


def outlier_scores(neighbours: Neighbours) -> np.ndarray:
    """Each row's mean distance to its k nearest training images: large for an image unlike the dataset."""
    d = distance(neighbours.train[0])
    return np.where(np.isfinite(d), d, np.nan).mean(1) if d.shape[1] else np.zeros(len(d))


def outliers(scores: Mapping[str, np.ndarray], z: float) -> list[Finding]:
    """Rows whose score lies more than ``z`` robust standard deviations above the median of every split's scores
    (1.4826 median absolute deviations: one standard deviation of a normal spread, unmoved by the outliers)."""
    every = np.concatenate(list(scores.values()))
    every = every[np.isfinite(every)]
    if not len(every):
        return []
    median = float(np.median(every))
    spread = 1.4826 * float(np.median(np.abs(every - median)))
    if spread == 0:
        return []
    found = []
    for split, values in scores.items():
        robust = (values - median) / spread
        found += [Finding("outlier", split, int(i), float(robust[i])) for i in np.flatnonzero(robust > z)]
    return found


def ranked(found: Sequence[Finding]) -> list[Finding]:
    """Findings in the order of issues.csv: by kind (KINDS), worst score first, then split and row."""
    return sorted(found, key=lambda f: (KINDS.index(f.kind), -f.score, f.split, f.row))
