"""The screen of the k-NN search (pipeline/knn.py) on a CPU: which products screen the keys, their proven error
bounds, the keys they cannot rule out, the exact scores of those, and the process-wide settings (threads, oneDNN's
float32 precision) the products and the bookkeeping run under, each set for a block and then restored.

The block products only screen the keys, as bf16 products where the CPU has bf16 hardware (AMX or AVX512-BF16: 3-8x
float32's speed): each key whose screened similarity is within a proven error bound of the row's k-th best so far is
scored exactly (a float64 dot of the float32 unit vectors, rounded to float32), and only exact scores rank: the
neighbours of a float32 brute force, certified, whatever the screen. A row with near-ties scores more keys exactly;
one the bf16 screen leaves wide open is screened again by float32 products."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch.nn import functional as F

_BITS = {2: torch.int16, 4: torch.int32}  # a float's bits as an integer of its size


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


def threshold(top: torch.Tensor, sims: torch.Tensor, k: int, eps: torch.Tensor | float) -> torch.Tensor:
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


def candidates(
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


def products(queries: torch.Tensor, keys_t: torch.Tensor, screen: str) -> torch.Tensor:
    """The screened (rows, keys) similarities: bf16 products of bf16 unit vectors (float32 sums, bf16 output) or
    float32 ones. A float32 screen's error bound needs full float32 products, whatever the process asks of oneDNN
    (torch.set_float32_matmul_precision may make them bf16): set for this product alone, then restored. A small
    product runs on one thread (oneDNN's bf16 ones take two whatever the size: 10 ms for 16 x 64 x 16 on a busy CPU)."""
    small = len(queries) * keys_t.shape[0] * keys_t.shape[1] < 2**26
    with one_thread() if small else nullcontext(), _ieee() if screen == "fp32" else nullcontext():
        return queries @ keys_t


def exact_scores(queries: torch.Tensor, keys: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
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


def _ieee() -> AbstractContextManager[None]:
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9: oneDNN's own setting, which the generic one may not reach
        return _set(lambda: matmul.fp32_precision, lambda value: setattr(matmul, "fp32_precision", value), "ieee")
    return _set(torch.get_float32_matmul_precision, torch.set_float32_matmul_precision, "highest")


def one_thread() -> AbstractContextManager[None]:
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
