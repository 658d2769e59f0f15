"""How the work of an extraction is cut: batches, each process's share of them, and each decode worker's piece
of every batch. Pure functions of counts and sizes, so that every process computes the same cut."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch


def split_batches(sizes: Sequence[int], batch_size: int) -> list[list[int]]:
    """Batches of consecutive row indices that never straddle two splits laid end to end."""
    batches, offset = [], 0
    for size in sizes:
        batches += [
            list(range(a, min(a + batch_size, offset + size))) for a in range(offset, offset + size, batch_size)
        ]
        offset += size
    return batches


def pieces(batches: Sequence[Sequence[int]], workers: int) -> list[list[int]]:
    """Each batch cut into one piece per decode worker, so that every worker decodes a share of every batch: the
    first batch is ready after batch_size / workers decodes, not batch_size, and a run of few batches keeps every
    worker busy. The network still sees the whole batches (see joined), so the features do not change."""
    out = []
    for batch in batches:
        size = -(-len(batch) // max(1, workers))
        out += [list(batch[i : i + size]) for i in range(0, len(batch), size)]
    return out


def joined(loader: Iterable[Any], batches: Sequence[Sequence[int]]) -> Iterator[tuple[list[torch.Tensor], Any, list]]:
    """The loader's pieces, in order, joined back into ``batches``: (image pieces, row indices, errors)."""
    pieces_in = iter(loader)
    for batch in batches:
        images, index, errors, n = [], [], [], 0
        while n < len(batch):
            piece, rows, problems = next(pieces_in)
            images.append(piece)
            index.append(rows)
            errors += problems
            n += len(rows)
        yield images, torch.cat(index), errors


def shard_bounds(batches: Sequence[Sequence[int]], size: int) -> list[tuple[int, int]]:
    """Each process's rows [start, stop): as equal as whole batches allow, cut only between batches, so that a
    batch, and so its features bit for bit, is the same whatever the number of processes."""
    starts = [b[0] for b in batches] + [batches[-1][-1] + 1 if batches else 0]
    n = starts[-1]
    cuts = [min(starts, key=lambda s: (abs(s - r * n / size), s)) for r in range(1, size)]  # nearest boundary
    edges = [0, *cuts, n]
    return list(zip(edges[:-1], edges[1:], strict=True))
