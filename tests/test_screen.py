"""The k-NN search's screen (pipeline/screen.py): its error bound holds and is nearly reached, the threshold and
the keys it leaves open, the process settings its products and bookkeeping leave as they found them (float32
products full whatever set_float32_matmul_precision asks), and which screen a device gets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import knn, screen
from tests.test_knn import fp32_brute_force, near_ties

CPU = torch.device("cpu")


@pytest.mark.parametrize("kind", ["bf16", "fp32"])
def test_the_screen_error_bound_holds_and_is_nearly_reached(kind: str):
    rng = np.random.default_rng(1)  # Cauchy rows: one coordinate holds most of the norm, its rounding all the error
    x = np.concatenate([rng.normal(size=(300, 512)), rng.standard_cauchy(size=(100, 512))]).astype(np.float32)
    q, keys = (knn._rows(x, 0, CPU, kind, keys=is_keys) for is_keys in (False, True))
    screened = screen.products(q.screen, keys.screen, kind)
    exact = (q.exact.double() @ keys.exact.T).float()
    error = (screened.float() - exact).abs()
    bound = screen.screen_error(512, q.residual[:, None], keys.residual[None, :]) + screen.output_error(screened)
    assert (error <= bound).all()
    if kind == "bf16":
        assert (error / bound).max() > 0.5
        assert screen.screen_error(512, q.residual, keys.residual.max()).max() < 2 * 2.0**-8 + 1e-4  # at most 2u


def test_a_search_leaves_the_process_settings_as_it_found_them_and_its_float32_products_full():
    def settings() -> tuple[int, str, str]:
        mkldnn = torch.backends.mkldnn.matmul.fp32_precision
        return torch.get_num_threads(), torch.get_float32_matmul_precision(), mkldnn

    keys, _, queries = near_ties()
    want, precision = fp32_brute_force(keys, queries, k=20)[1], torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")  # float32 products in bf16, where oneDNN can
    try:
        before = settings()
        for kind in ("bf16", "fp32", "direct"):
            found = knn.search([keys], queries, k=20, device=CPU, screen=kind)
            if kind != "direct":
                np.testing.assert_array_equal(found.ids.numpy(), want)
        assert settings() == before
    finally:
        torch.set_float32_matmul_precision(precision)


def test_a_cpu_with_bf16_hardware_screens_in_bf16():
    assert screen.screen_for(CPU) == ("bf16" if torch.cpu._is_avx512_bf16_supported() else "fp32")
    assert screen.screen_for(torch.device("meta")) == "direct"


def test_the_candidates_are_the_entries_at_least_their_rows_least_whatever_the_tiles():
    rng = np.random.default_rng(3)
    sims = torch.from_numpy(rng.uniform(-1, 1, size=(40, 300)).astype(np.float32))  # 300: 2 tiles and a padded one
    for dtype in (torch.float32, torch.bfloat16):
        for least in (torch.full((40,), 0.5), torch.linspace(-0.5, 0.9, 40)):  # all positive: maxima of the bits
            x, least = sims.to(dtype), least.to(dtype)
            rows, cols, many = screen.candidates(x, least, None)
            assert torch.equal(torch.stack([rows, cols], 1), (x >= least[:, None]).nonzero()) and not many.any()
            assert torch.equal(screen.candidates(x, least, 30)[2], (x >= least[:, None]).sum(1) > 30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_threshold_is_the_bound_rounded_down_to_the_screens_dtype(dtype: torch.dtype):
    rng = np.random.default_rng(4)
    sims = torch.from_numpy(rng.uniform(-1, 1, size=(40, 300)).astype(np.float32)).to(dtype)
    top = torch.from_numpy(rng.uniform(0, 1, size=(40, 5)).astype(np.float32)).sort(1, descending=True).values
    kth = sims.topk(5, dim=1).values[:, -1]
    for seen, bound in ((top, top[:, -1] - 1e-3), (top[:, :2], kth.float() - screen.output_error(kth) - 2e-3)):
        least = screen.threshold(seen, sims, 5, 1e-3)  # k keys seen, or fewer: the block's own k-th screened one
        assert least.dtype == dtype and (least.float() <= bound).all()
        assert (torch.nextafter(least, torch.full_like(least, torch.inf)).float() > bound).all()
    assert (screen.threshold(top[:, :2], sims[:, :3], 5, 1e-3) == -torch.inf).all()  # fewer than k keys in all
