"""The training-free k-NN classifier of DINOv2's evaluation (dinov2/eval/knn.py) on cached features: each test row
takes the k training rows of highest cosine similarity, and they vote for their classes with weights
exp(similarity / T). The training split streams past in blocks of rows, each test row keeping a running top k:
neither the (test, train) similarity matrix nor the training split is ever whole.

On a CPU the block products only screen the keys (bf16 products where the CPU has bf16 hardware): the keys a screen
cannot rule out are scored exactly, and only exact scores rank, so the neighbours are those of a float32 brute
force, whatever the screen. On CUDA and MPS the float32 products rank directly. The screens, their error bounds and
the exact scores: pipeline/screen.py."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch.nn import functional as F

from pipeline.screen import candidates, exact_scores, one_thread, products, screen_error, screen_for, threshold

BLOCK_ROWS = 4096  # test rows by training rows of one similarity block: 64 MiB of float32 at most
OPEN = 128  # keys past k a bf16 screen may leave open in a row and block, then float32 products screen them: an exact
# score costs ~0.4 us, a row of products ~40 us (features all alike, cos 0.92 +- 0.005, leave thousands open)
NO_KEY = torch.iinfo(torch.int64).max  # the row number of a padding entry: after every real key at equal similarity


class Found(NamedTuple):
    """Each query row's neighbours, its keys scored exactly (those its screen left open), and its blocks of keys that
    the bf16 screen left so wide open that float32 products screened them again."""

    sims: torch.Tensor  # (N, min(k, keys)) float32, descending
    ids: torch.Tensor  # (N, min(k, keys)) int64 key rows, ties to the lower one
    rescored: torch.Tensor  # (N,) int64
    fell_back: torch.Tensor  # (N,) int64


@torch.inference_mode()
def knn_predict(
    train: Iterable[tuple[np.ndarray, np.ndarray]],
    test: np.ndarray,
    *,
    k: int,
    temperature: float,
    device: torch.device,
    block_rows: int = BLOCK_ROWS,
) -> np.ndarray:
    """The k-NN class of each (N, D) test row, the training split given as consecutive blocks of (rows, D)
    features and (rows,) labels; with fewer than k training rows, all are neighbours. Ties in similarity go to
    the earlier training row, ties in votes to the lower class: the classes do not depend on the block sizes."""
    classes: list[torch.Tensor] = []  # every training row's class: 8 bytes a row, all that stays of the split

    def rows() -> Iterator[np.ndarray]:
        for x, y in train:
            classes.append(torch.as_tensor(y, device=device))
            yield x

    sims, ids = nearest(rows(), test, k=k, device=device, block_rows=block_rows)
    labels = torch.cat(classes)
    with one_thread():  # small ops: see screen.one_thread
        votes = [
            _vote(sims[a : a + block_rows], labels[ids[a : a + block_rows]], temperature)
            for a in range(0, len(ids), block_rows)
        ]
    return torch.cat(votes).cpu().numpy() if votes else np.zeros(0, dtype=np.int64)


def nearest(
    keys: Iterable[np.ndarray],
    queries: np.ndarray,
    *,
    k: int,
    device: torch.device,
    block_rows: int = BLOCK_ROWS,
    exclude: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The k key rows of highest cosine similarity to each (N, D) query row, the keys given as consecutive
    blocks of (rows, D) features numbered from 0: (N, min(k, keys)) similarities, descending, and key row
    numbers, ties to the lower row. ``exclude``: (N,) the key row that is no neighbour of each query (the query
    itself, where queries and keys are one split), -1 for none; with fewer than k + 1 keys it may still be
    listed, at similarity -inf."""
    found = search(keys, queries, k=k, device=device, block_rows=block_rows, exclude=exclude)
    return found.sims, found.ids


@torch.inference_mode()
def search(
    keys: Iterable[np.ndarray],
    queries: np.ndarray,
    *,
    k: int,
    device: torch.device,
    block_rows: int = BLOCK_ROWS,
    exclude: np.ndarray | None = None,
    screen: str | None = None,
) -> Found:
    """nearest's neighbours with the counts of Found; ``screen``: "bf16", "fp32" or "direct" (default:
    screen_for(device))."""
    if k < 1 or block_rows < 1:
        raise ValueError(f"k = {k} and block_rows = {block_rows}: both must be at least 1")
    screen = screen or screen_for(device)
    query_blocks = [
        _rows(queries[a : a + block_rows], a, device, screen, keys=False) for a in range(0, len(queries), block_rows)
    ]
    skip = None if exclude is None else torch.as_tensor(np.asarray(exclude, dtype=np.int64), device=device)
    found = [_none(len(q.screen), device) for q in query_blocks]
    dense = [False] * len(query_blocks)  # the bf16 screen left most rows of the last block wide open
    seen = 0
    for x in keys:
        for a in range(0, len(x), block_rows):
            with one_thread():
                block = _rows(x[a : a + block_rows], seen, device, screen, keys=True)
            for i, q in enumerate(query_blocks):
                own = None if skip is None else skip[q.first : q.first + len(found[i].sims)] - seen
                step = _step(found[i], q, block, own, k=k, screen=screen, dense=dense[i])
                dense[i] = bool((step.fell_back > found[i].fell_back).float().mean() > 0.5)  # and stays so
                found[i] = step
            seen += block.screen.shape[1]
    if not seen:
        raise ValueError("k-NN needs training rows: the training blocks were empty")
    if not found:
        return _none(0, device, width=min(k, seen))
    return Found(*(torch.cat(part) for part in zip(*found, strict=True)))


class _Rows(NamedTuple):
    """One block of unit rows, as the screen multiplies them and as they are scored exactly."""

    screen: torch.Tensor  # queries (rows, D), keys (D, rows): a faster product than .T of (rows, D)
    exact: torch.Tensor | None  # (rows, D): keys' float64, queries' float32 (made float64 a product at a time)
    first: int  # the number of the block's first row
    residual: torch.Tensor  # (rows,) |screened - unit| of each row: 0 but for a bf16 screen


def _rows(x: np.ndarray, first: int, device: torch.device, screen: str, *, keys: bool) -> _Rows:
    """``x`` as unit rows (products of them: cosines). No float64 copy of the queries: twice their float32 memory."""
    unit = F.normalize(torch.as_tensor(x).to(device, torch.float32), dim=1)
    rounded = unit.to(torch.bfloat16) if screen == "bf16" else unit
    residual = torch.linalg.vector_norm(rounded.float() - unit, dim=1) if screen == "bf16" else unit.new_zeros(len(x))
    exact = None if screen == "direct" else unit.double() if keys else unit
    return _Rows((rounded.T if keys else rounded).contiguous(), exact, first, residual)


def _none(rows: int, device: torch.device, width: int = 0) -> Found:
    ids, counts = torch.zeros(rows, width, dtype=torch.long, device=device), torch.zeros(rows, dtype=torch.long)
    return Found(ids.float(), ids, counts.to(device), counts.to(device))


def _step(
    found: Found, queries: _Rows, keys: _Rows, own: torch.Tensor | None, *, k: int, screen: str, dense: bool
) -> Found:
    """One block of query rows' neighbours after one more block of keys. ``own``: each row's key to leave out, as a
    column of this block (or outside it); ``dense``: float32 products screen every row."""
    heavy = torch.full((len(found.sims),), dense, device=found.sims.device)
    rows = cols = torch.zeros(0, dtype=torch.long, device=found.sims.device)
    if not dense:
        sims = products(queries.screen, keys.screen, screen)  # (rows, keys)
        eps = 0.0 if screen == "direct" else screen_error(len(keys.screen), queries.residual, keys.residual.max())
        with one_thread():
            least = threshold(found.sims, _left_out(sims, own), k, eps)
            rows, cols, heavy = candidates(sims, least, k + OPEN if screen == "bf16" else None)
    if heavy.any():  # the bf16 products left too many keys of these rows open: float32 ones screen them again
        rows, cols = _reopened(rows, cols, heavy, found.sims, queries, keys, own, k)
    with one_thread():
        scores = (
            sims[rows, cols] if screen == "direct" else exact_scores(queries.exact.double(), keys.exact, rows, cols)
        )
        if own is not None:
            scores[cols == own[rows]] = -torch.inf  # a left-out key's exact score
        width = min(k, keys.first + keys.screen.shape[1])
        return _merged(found, rows, scores, cols + keys.first, width, rescored=screen != "direct", fell_back=heavy)


def _reopened(
    rows: torch.Tensor, cols: torch.Tensor, heavy: torch.Tensor, top: torch.Tensor, queries: _Rows, keys: _Rows,
    own: torch.Tensor | None, k: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The open keys again, the ``heavy`` rows' from float32 products (an error bound of ~2^-15, not bf16's ~2^-8),
    in order of row then col."""
    at = heavy.nonzero()[:, 0]
    sims = products(queries.exact[at], keys.exact.float().T, "fp32")
    with one_thread():
        least = threshold(
            top[at], _left_out(sims, None if own is None else own[at]), k, screen_error(len(keys.screen), 0, 0)
        )
        again = candidates(sims, least, None)
        kept = ~heavy[rows]
        rows, cols = torch.cat([rows[kept], at[again[0]]]), torch.cat([cols[kept], again[1]])
        order = rows.sort(stable=True).indices  # each row's columns, in order, come from one of the two
        return rows[order], cols[order]


def _left_out(sims: torch.Tensor, cols: torch.Tensor | None) -> torch.Tensor:
    """``sims``, each row's similarity at ``cols`` (a column of this block, or outside it) set to -inf in place."""
    if cols is not None:
        rows = ((cols >= 0) & (cols < sims.shape[1])).nonzero()[:, 0]
        sims[rows, cols[rows]] = -torch.inf
    return sims


def _merged(
    found: Found, rows: torch.Tensor, sims: torch.Tensor, ids: torch.Tensor, width: int, *, rescored: bool,
    fell_back: torch.Tensor,
) -> Found:  # fmt: skip
    """Each row's ``width`` best of its neighbours so far and its new candidates (``rows``, ``sims``, ``ids``, in
    order of row then id; ids above every old one): by descending similarity, then id. Each row's new ones go,
    ranked, right of the old ones (padded with -inf at NO_KEY), and a stable sort keeps ties in that order."""
    n = len(found.sims)
    order = sims.sort(descending=True, stable=True).indices
    order = order[rows[order].sort(stable=True).indices]  # by row, then similarity descending, then id
    rows, sims, ids = rows[order], sims[order], ids[order]
    counts = torch.bincount(rows, minlength=n)
    rank = torch.arange(len(rows), device=rows.device) - (counts.cumsum(0) - counts)[rows]
    keep = rank < width
    new_sims = torch.full((n, min(width, int(counts.max()) if len(rows) else 0)), -torch.inf, device=sims.device)
    new_ids = torch.full(new_sims.shape, NO_KEY, dtype=torch.long, device=sims.device)
    new_sims[rows[keep], rank[keep]], new_ids[rows[keep], rank[keep]] = sims[keep], ids[keep]
    both_sims, both_ids = torch.cat([found.sims, new_sims], 1), torch.cat([found.ids, new_ids], 1)
    best, pos = both_sims.sort(dim=1, descending=True, stable=True)
    counts, fell_back = found.rescored + counts * rescored, found.fell_back + fell_back
    return Found(best[:, :width], both_ids.gather(1, pos[:, :width]), counts, fell_back)


def _vote(sims: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """The class of highest summed weight among each row's neighbours, ties to the lower class: (rows, k) -> (rows,).
    Each neighbour's class total comes from a (rows, k, k) comparison of its k labels, the one-hot sums of DINOv2
    without a row as wide as the classes (25,000 of them)."""
    weights = torch.softmax(sims / temperature, dim=1)  # exp(sim / T) over its row sum: the same vote, no overflow
    votes = ((labels[:, :, None] == labels[:, None, :]) * weights[:, None, :]).sum(2)  # (rows, k)
    top = votes == votes.max(1, keepdim=True).values
    return torch.where(top, labels, torch.iinfo(labels.dtype).max).min(1).values
