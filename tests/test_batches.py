"""How an extraction's work is cut: batches, shards and pieces."""

from __future__ import annotations

import pytest

from pipeline.batches import pieces, shard_bounds, split_batches


def test_batches_never_straddle_two_splits():
    assert split_batches([5, 0, 3], 2) == [[0, 1], [2, 3], [4], [5, 6], [7]]


def test_every_decode_worker_takes_a_piece_of_every_batch():
    batches = split_batches([10, 3], 8)
    assert pieces(batches, 3) == [[0, 1, 2], [3, 4, 5], [6, 7], [8], [9], [10], [11], [12]]
    assert pieces(batches, 0) == pieces(batches, 1) == batches


@pytest.mark.parametrize("size", [1, 2, 3, 7, 40])
def test_shards_cover_every_row_once_and_cut_only_between_batches(size: int):
    batches = split_batches([54, 18, 20], batch_size=16)
    bounds = shard_bounds(batches, size)
    assert len(bounds) == size and bounds[0][0] == 0 and bounds[-1][1] == 92
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))  # contiguous, in rank order
    starts = {b[0] for b in batches} | {92}
    assert all(a in starts and b in starts for a, b in bounds)
    assert all(abs((b - a) - 92 / size) <= 16 for a, b in bounds)  # as even as whole batches allow
