"""The paired statistics of pipeline.pairing on synthetic prediction tables: McNemar against statsmodels, the
bootstrap interval, pairing by content key, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest
from statsmodels.stats.contingency_tables import mcnemar  # a test dependency: missing, the suite fails

from pipeline import pairing
from pipeline.errors import PipelineError
from pipeline.pairing import compare, compare_correct, parse_predictions


def correct_pairs(both: int, a_only: int, b_only: int, neither: int, *, seed: int = 0) -> tuple[np.ndarray, ...]:
    """(N,) right answers of A and of B with exactly these counts of each (A, B) outcome, shuffled."""
    a = np.repeat([True, True, False, False], [both, a_only, b_only, neither])
    b = np.repeat([True, False, True, False], [both, a_only, b_only, neither])
    order = np.random.default_rng(seed).permutation(a.size)
    return a[order], b[order]


def table(a: np.ndarray, *, knn: np.ndarray | None = None, keys: list[str] | None = None) -> str:
    """predictions.csv's text for right answers ``a``: label cat, predicted cat or dog."""
    keys = keys or [f"{i:032x}" for i in range(a.size)]
    knn_cells = [""] * a.size if knn is None else [str(int(v)) for v in knn]
    rows = [
        f"img/{i},{key},cat,{'cat' if ok else 'dog'},0.6,0.6,{cell}"
        for i, (key, ok, cell) in enumerate(zip(keys, a, knn_cells, strict=True))
    ]
    return "\n".join([",".join(pairing.COLUMNS), *rows]) + "\n"


@pytest.mark.parametrize(
    ("both", "a_only", "b_only", "neither"), [(150, 7, 19, 24), (40, 0, 5, 5), (30, 3, 3, 4), (10, 0, 0, 2)]
)
def test_the_p_value_is_mcnemars_exact_test(both: int, a_only: int, b_only: int, neither: int):
    a, b = correct_pairs(both, a_only, b_only, neither)
    (c,) = compare(parse_predictions(table(a), source="A"), parse_predictions(table(b), source="B"))
    assert (c.a_only, c.b_only, c.images) == (a_only, b_only, a.size)
    expected = mcnemar([[both, a_only], [b_only, neither]], exact=True).pvalue
    assert c.p_value == pytest.approx(expected, rel=1e-12)
    assert c.accuracy_a == pytest.approx(a.mean()) and c.accuracy_b == pytest.approx(b.mean())


def test_the_interval_holds_the_observed_difference_and_is_seeded():
    a, b = correct_pairs(800, 20, 45, 135)
    c = compare_correct(a, b, metric="head", seed=3)
    assert c.difference == pytest.approx(25 / 1000)
    assert c.low < c.difference < c.high
    assert c == compare_correct(a, b, metric="head", seed=3)
    assert (c.significant, c.verdict()) == (
        True, f"B is better: +2.5 points [{100 * c.low:+.1f}, {100 * c.high:+.1f}], p = 0.0026, on 1,000 paired "
        "test images",
    )  # fmt: skip
    reverse = compare_correct(b, a, metric="head", seed=3)
    assert reverse.verdict().startswith("A is better: -2.5 points")


def test_a_few_discordant_images_are_no_significant_difference_and_identical_runs_have_p_1():
    a, b = correct_pairs(300, 4, 6, 63)
    c = compare_correct(a, b, metric="head")
    assert c.verdict().startswith("no significant difference: +0.5 points") and c.p_value > 0.5
    same = compare_correct(a, a, metric="head")
    assert (same.p_value, same.low, same.high) == (1.0, 0.0, 0.0)
    assert same.verdict() == "no significant difference: +0.0 points [+0.0, +0.0], p = 1, on 373 paired test images"


def test_images_pair_by_content_key_not_by_row_order():
    a, b = correct_pairs(60, 10, 20, 10)
    keys = [f"{i:032x}" for i in range(a.size)]
    order = np.random.default_rng(1).permutation(a.size)
    shuffled = table(b[order], keys=[keys[i] for i in order])
    (paired,) = compare(parse_predictions(table(a), source="A"), parse_predictions(shuffled, source="B"))
    assert (paired.a_only, paired.b_only) == (10, 20)
    (by_rows,) = compare(
        parse_predictions(table(a), source="A"), parse_predictions(table(b[order], keys=keys), source="B")
    )
    assert (by_rows.a_only, by_rows.b_only) != (10, 20)  # the same rows paired by position would differ


def test_different_test_images_are_refused_with_the_counts_on_each_side():
    a, b = correct_pairs(10, 0, 0, 0)
    keys = [f"{i:032x}" for i in range(10)]
    other = keys[:7] + ["f" * 32]  # 3 only in A, 1 only in B
    with pytest.raises(PipelineError, match="different test images: 3 only in A, 1 only in B"):
        compare(parse_predictions(table(a), source="A"), parse_predictions(table(b[:8], keys=other), source="B"))


def test_knn_is_compared_when_both_runs_have_it():
    a, b = correct_pairs(50, 5, 5, 10)
    head_a, head_b = correct_pairs(60, 2, 8, 0, seed=1)
    with_knn = compare(
        parse_predictions(table(head_a, knn=a), source="A"), parse_predictions(table(head_b, knn=b), source="B")
    )
    assert [c.metric for c in with_knn] == ["head", "knn"] and with_knn[1].a_only == 5
    one_side = compare(
        parse_predictions(table(head_a), source="A"), parse_predictions(table(head_b, knn=b), source="B")
    )
    assert [c.metric for c in one_side] == ["head"]
    text = pairing.format_comparisons(with_knn)
    assert text.splitlines()[1].startswith("head ") and text.splitlines()[-1].startswith("k-NN: ")
    assert with_knn[1].to_dict()["verdict"] == with_knn[1].verdict()
    assert pairing.bonferroni(with_knn).startswith("0 of 2 comparisons stay significant under Bonferroni")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("id,key,label,predicted\nx,k,a,a\n", "expected 'id,key,label,predicted,p_label,p_predicted,knn_correct'"),
        (",".join(pairing.COLUMNS) + "\n", "has no rows"),
        (",".join(pairing.COLUMNS) + "\nx,k,a,a,1,1,yes\n", "knn_correct = 'yes'"),
    ],
)
def test_a_malformed_table_is_refused(text: str, message: str):
    with pytest.raises(PipelineError, match=message):
        parse_predictions(text, source="predictions.csv at HEAD")
