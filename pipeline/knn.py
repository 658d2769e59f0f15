"""The training-free k-NN classifier of DINOv2's evaluation (dinov2/eval/knn.py) on cached features: each test row
takes the k training rows of highest cosine similarity, and they vote for their classes with weights
exp(similarity / T). The training split streams past in blocks of rows, each test row keeping a running top k:
neither the (test, train) similarity matrix nor the training split is ever whole."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch.nn import functional as F

BLOCK_ROWS = 4096  # test rows by training rows of one similarity block: 64 MiB of float32 at most


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
    votes = [
        _vote(sims[a : a + block_rows], labels[ids[a : a + block_rows]], temperature)
        for a in range(0, len(ids), block_rows)
    ]
    return torch.cat(votes).cpu().numpy() if votes else np.zeros(0, dtype=np.int64)


@torch.inference_mode()
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
    if k < 1 or block_rows < 1:
        raise ValueError(f"k = {k} and block_rows = {block_rows}: both must be at least 1")
    queries_t = [_unit(queries[a : a + block_rows], device) for a in range(0, len(queries), block_rows)]
    skip = None if exclude is None else torch.as_tensor(np.asarray(exclude, dtype=np.int64), device=device)
    # each block of query rows' candidates: a (rows, <= k) top k of similarities and key row numbers from each
    # block of key rows, merged into one once they are a block wide (rather than after every block: a merge
    # is a dozen small operations, which cost more than the block's top k itself on a busy 2-core CPU)
    found: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in queries_t]
    seen = 0
    for x in keys:
        for a in range(0, len(x), block_rows):
            block = _unit(x[a : a + block_rows], device).T.contiguous()  # (D, rows): a faster product than .T alone
            rows = torch.arange(seen, seen + block.shape[1], device=device)
            for i, q in enumerate(queries_t):
                sims = q @ block
                if skip is not None:
                    _leave_out(sims, skip[i * block_rows : i * block_rows + len(q)] - seen)
                top, pos = _top(sims, rows, k)
                found[i].append((top, rows[pos]))
                if len(found[i]) * k >= block_rows:
                    found[i] = [_merged(found[i], k)]
            seen += block.shape[1]
    if not seen:
        raise ValueError("k-NN needs training rows: the training blocks were empty")
    ranked = [_ranked(*_merged(candidates, k)) for candidates in found]
    if not ranked:
        return torch.zeros(0, min(k, seen), device=device), torch.zeros(
            0, min(k, seen), dtype=torch.long, device=device
        )
    return torch.cat([s for s, _ in ranked]), torch.cat([i for _, i in ranked])


def _leave_out(sims: torch.Tensor, cols: torch.Tensor) -> None:
    """Set each row's similarity at ``cols`` (a column of this block, or outside it) to -inf, in place."""
    rows = ((cols >= 0) & (cols < sims.shape[1])).nonzero()[:, 0]
    sims[rows, cols[rows]] = -torch.inf


def _unit(x: np.ndarray, device: torch.device) -> torch.Tensor:
    """(rows, D) rows as float32 on ``device``, L2-normalised: their products are cosine similarities."""
    return F.normalize(torch.as_tensor(x).to(device, torch.float32), dim=1)


def _top(sims: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (at most) k largest of each row of (rows, m) ``sims`` and their positions; among equal values at the
    cut, those of the lower ``ids`` (training row numbers, broadcast to ``sims``): topk alone picks any."""
    n = min(k, sims.shape[1])
    top, pos = sims.topk(min(n + 1, sims.shape[1]), dim=1)  # one more: does the cut split tied values?
    if top.shape[1] == n:
        return top, pos
    cut = (top[:, n - 1] == top[:, n]).nonzero()[:, 0]
    top, pos = top[:, :n], pos[:, :n]
    if len(cut):  # rare: duplicate training rows, or a zero feature vector
        order = ids.expand_as(sims)[cut].argsort(dim=1)
        values, ranks = sims[cut].gather(1, order).sort(dim=1, descending=True, stable=True)
        top[cut], pos[cut] = values[:, :n], order.gather(1, ranks[:, :n])
    return top, pos


def _merged(candidates: list[tuple[torch.Tensor, torch.Tensor]], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The top k of (rows, m) similarity and training row number pairs, side by side."""
    sims, ids = (torch.cat(part, 1) for part in zip(*candidates, strict=True))
    sims, pos = _top(sims, ids, k)
    return sims, ids.gather(1, pos)


def _ranked(sims: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The neighbours' similarities and row numbers by descending similarity, then row: the votes' sums then add
    in one order, whatever the blocks were."""
    order = ids.argsort(dim=1)
    sims, ranks = sims.gather(1, order).sort(dim=1, descending=True, stable=True)
    return sims, ids.gather(1, order.gather(1, ranks))


def _vote(sims: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """The class of highest summed weight among each row's neighbours, ties to the lower class: (rows, k) -> (rows,).
    Each neighbour's class total comes from a (rows, k, k) comparison of its k labels, the one-hot sums of DINOv2
    without a row as wide as the classes (25,000 of them)."""
    weights = torch.softmax(sims / temperature, dim=1)  # exp(sim / T) over its row sum: the same vote, no overflow
    votes = ((labels[:, :, None] == labels[:, None, :]) * weights[:, None, :]).sum(2)  # (rows, k)
    top = votes == votes.max(1, keepdim=True).values
    return torch.where(top, labels, torch.iinfo(labels.dtype).max).min(1).values
