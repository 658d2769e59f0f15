"""The training-free k-NN classifier of DINOv2's evaluation (dinov2/eval/knn.py) on cached features: each test row
takes the k training rows of highest cosine similarity, and they vote for their classes with weights
exp(similarity / T). The training split streams past in blocks of rows, each test row keeping a running top k:
neither the (test, train) similarity matrix nor the training split is ever whole.

On a CPU the block products only screen the keys, as bf16 products where the CPU has bf16 hardware (AMX or
AVX512-BF16: 3-8x float32's speed): each key whose screened similarity is within a proven error bound of the row's
k-th best so far is scored exactly (a float64 dot of the float32 unit vectors, rounded to float32), and only exact
scores rank: the neighbours of a float32 brute force, certified, whatever the screen. A row with near-ties scores
more keys exactly; one the bf16 screen leaves wide open is screened again by float32 products. On CUDA and MPS the
float32 products rank directly."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.nn import functional as F

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
    with _one_thread():  # small ops: see _one_thread
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


def screen_for(device: torch.device) -> str:
    """The products that screen the keys: "bf16" on a CPU that multiplies bf16 in hardware (AMX or AVX512-BF16,
    through oneDNN), "fp32" on other CPUs, both rescored exactly; "direct" on CUDA and MPS, where the float32
    products rank (float64 is slow or absent there)."""
    if device.type != "cpu":
        return "direct"
    mkldnn = torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
    bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)  # AMX CPUs have AVX512-BF16 too
    return "bf16" if mkldnn and bf16() else "fp32"


def screen_error(dim: int, residual_q: torch.Tensor, residual_k: torch.Tensor) -> torch.Tensor:
    """A bound on |x - exact similarity| for float32 unit vectors a, b of ``dim`` values, x the float32 sum of the
    screen's products of a' and b' (a and b rounded to bf16, or a and b) before its output is rounded; the
    residuals: |a' - a| and |b' - b|. By Cauchy-Schwarz |a'.b' - a.b| <= |a'-a| |b| + |a| |b'-b| + |a'-a| |b'-b|,
    where F.normalize leaves |a| <= 1 + 2 gamma; float32 sums of dim + 1 roundings err by gamma sum|a'_i b'_i| in
    any order (Higham, Accuracy and Stability, eq. 3.4), |a'| <= (1 + 2^-8) |a|; the exact score, rounded to
    float32, by 2^-24 |a| |b|. The float32 residuals err by 2 gamma at most; 2^-20 covers the float32 subtractions
    of the thresholds, flushed subnormals and the float64 dot's own error (about 2^-44)."""
    u = 2.0**-24
    gamma = (dim + 1) * u / (1 - (dim + 1) * u)
    rounding = (residual_q + residual_k + residual_q * residual_k) * (1 + 2 * gamma) ** 3
    return rounding + (gamma * (1 + 2.0**-8) ** 2 + u) * (1 + 2 * gamma) ** 2 + 2.0**-20


def output_error(screened: torch.Tensor) -> torch.Tensor:
    """A bound on |screened - x| for a bf16 output, whatever its rounding (to nearest or not, one of x's two bf16
    neighbours): a unit in the last place, at most 2^-7 |x|, and |x| <= |screened| / (1 - 2^-7); none for float32
    outputs, which are x."""
    if screened.dtype != torch.bfloat16:
        return torch.zeros_like(screened, dtype=torch.float32)
    return screened.float().abs() * (2.0**-7 / (1 - 2.0**-7))


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
            with _one_thread():
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
        sims = _products(queries.screen, keys.screen, screen)  # (rows, keys)
        eps = 0.0 if screen == "direct" else screen_error(len(keys.screen), queries.residual, keys.residual.max())
        with _one_thread():
            least = _threshold(found.sims, _left_out(sims, own), k, eps)
            rows, cols, heavy = _candidates(sims, least, k + OPEN if screen == "bf16" else None)
    if heavy.any():  # the bf16 products left too many keys of these rows open: float32 ones screen them again
        rows, cols = _reopened(rows, cols, heavy, found.sims, queries, keys, own, k)
    with _one_thread():
        scores = sims[rows, cols] if screen == "direct" else _exact(queries.exact.double(), keys.exact, rows, cols)
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
    sims = _products(queries.exact[at], keys.exact.float().T, "fp32")
    with _one_thread():
        least = _threshold(
            top[at], _left_out(sims, None if own is None else own[at]), k, screen_error(len(keys.screen), 0, 0)
        )
        again = _candidates(sims, least, None)
        kept = ~heavy[rows]
        rows, cols = torch.cat([rows[kept], at[again[0]]]), torch.cat([cols[kept], again[1]])
        order = rows.sort(stable=True).indices  # each row's columns, in order, come from one of the two
        return rows[order], cols[order]


def _products(queries: torch.Tensor, keys_t: torch.Tensor, screen: str) -> torch.Tensor:
    """The screened (rows, keys) similarities: bf16 products of bf16 unit vectors (float32 sums, bf16 output) or
    float32 ones. A float32 screen's error bound needs full float32 products, whatever the process asks of oneDNN
    (torch.set_float32_matmul_precision may make them bf16): set for this product alone, then restored. A small
    product runs on one thread (oneDNN's bf16 ones take two whatever the size: 10 ms for 16 x 64 x 16 on a busy CPU)."""
    small = len(queries) * keys_t.shape[0] * keys_t.shape[1] < 2**26
    with _one_thread() if small else nullcontext(), _ieee() if screen == "fp32" else nullcontext():
        return queries @ keys_t


def _ieee() -> AbstractContextManager[None]:
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9: oneDNN's own setting, which the generic one may not reach
        return _set(lambda: matmul.fp32_precision, lambda value: setattr(matmul, "fp32_precision", value), "ieee")
    return _set(torch.get_float32_matmul_precision, torch.set_float32_matmul_precision, "highest")


def _one_thread() -> AbstractContextManager[None]:
    """A block's bookkeeping on one thread: on a 2-core machine that runs other work too, each small parallel op
    waits for a descheduled second thread (a (4096, 32) row sort: 1.8 ms on one thread, 24 ms on two). The thread
    count is process-wide: set for this block, then restored."""
    return _set(torch.get_num_threads, torch.set_num_threads, 1)


@contextmanager
def _set(get: Callable[[], Any], put: Callable[[Any], None], value: Any) -> Iterator[None]:
    """A process-wide setting at ``value`` for the block of a with statement, then as it was."""
    before = get()
    put(value)
    try:
        yield
    finally:
        put(before)


def _left_out(sims: torch.Tensor, cols: torch.Tensor | None) -> torch.Tensor:
    """``sims``, each row's similarity at ``cols`` (a column of this block, or outside it) set to -inf in place."""
    if cols is not None:
        rows = ((cols >= 0) & (cols < sims.shape[1])).nonzero()[:, 0]
        sims[rows, cols[rows]] = -torch.inf
    return sims


def _threshold(top: torch.Tensor, sims: torch.Tensor, k: int, eps: torch.Tensor | float) -> torch.Tensor:
    """The least screened similarity of a key of this block that may still be among each row's k nearest, in the
    screen's dtype. Its sum x before rounding is within ``eps`` of its exact similarity, which must reach the k-th
    exact one so far (a later key that ties it comes second); or, while fewer than k keys were seen, that of the
    block's own k-th screened one, whose x is at least it less its output_error, and exact similarity at least that
    less eps. An x at least ``least`` is screened at least ``least`` rounded down: its rounding is one of its two
    neighbours in the screen's dtype, neither below that."""
    if top.shape[1] == k:
        least = top[:, -1] - eps
    elif sims.shape[1] >= k:
        kth = sims.topk(k, dim=1).values[:, -1]
        least = kth.float() - output_error(kth) - 2 * eps
    else:
        least = torch.full((len(sims),), -torch.inf, device=sims.device)
    low = least.to(sims.dtype)
    return torch.where(low.float() > least, torch.nextafter(low, torch.full_like(low, -torch.inf)), low)


def _candidates(
    sims: torch.Tensor, least: torch.Tensor, limit: int | None, tile: int = 128
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (row, col) of each similarity at least its row's ``least``, in order of row then col: first the tiles of
    ``tile`` columns whose max reaches it, then their entries (a (rows, keys) mask and its nonzero cost 3x more).
    Where every least is positive the maxima are of the floats' bits as integers (positive floats order alike,
    negative ones fall below): bf16's own max is 7x slower on this CPU. And the rows with more than ``limit``
    entries (none without a limit), whose entries then need not be listed: where many tiles are open, those that
    are wholly so (features all alike open whole blocks) count first."""
    n, m = sims.shape
    tiles = (F.pad(sims, (0, -m % tile), value=-torch.inf) if m % tile else sims).view(n, -1, tile)
    bits = _BITS.get(sims.element_size()) if bool((least > 0).all()) else None

    def reached(reduce: Callable[..., torch.Tensor]) -> torch.Tensor:
        return (reduce(tiles, 2) if bits is None else reduce(tiles.view(bits), 2).view(sims.dtype)) >= least[:, None]

    hit, many = reached(torch.amax), torch.zeros(n, dtype=torch.bool, device=sims.device)
    if limit is not None and hit.sum() > 8 * n:
        many = reached(torch.amin).sum(1) * tile > limit
        hit &= ~many[:, None]
    rows, at = hit.nonzero().unbind(1)
    i, j = (tiles[rows, at] >= least[rows, None]).nonzero().unbind(1)
    rows, cols = rows[i], at[i] * tile + j
    if m % tile:
        rows, cols = rows[cols < m], cols[cols < m]  # padding reaches a -inf least
    return rows, cols, many if limit is None else many | (torch.bincount(rows, minlength=n) > limit)


_BITS = {2: torch.int16, 4: torch.int32}  # a float's bits as an integer of its size


def _exact(queries: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The similarities of the (row, col) pairs, in order of row then col, as float64 dots of the float32 unit
    vectors rounded to float32 (within 2^-24 of the true ones): one fixed computation per pair (sampled_addmm: a
    vectorised dot of the two rows), so equal keys score equal, whatever the blocks; a GEMM's float32 sums differ in
    their last bits with the shapes."""
    counts = torch.bincount(rows, minlength=len(queries))
    crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
        pattern = torch.sparse_csr_tensor(
            crow, cols, queries.new_zeros(len(cols)), size=(len(queries), len(keys)), check_invariants=False
        )
        return torch.sparse.sampled_addmm(pattern, queries, keys.T, beta=0.0).values().float()


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
