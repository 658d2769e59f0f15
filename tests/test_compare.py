"""`python -m pipeline.compare` on predictions.csv files at Git commits, the workspace and real `dvc exp` runs."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from pipeline import compare
from pipeline.errors import run_stage
from tests.conftest import git, run
from tests.test_pairing import correct_pairs, table

PREDICTIONS = Path("reports/evaluate/predictions.csv")


@pytest.fixture
def history(tmp_path: Path) -> Path:
    """A DVC project whose commits hold predictions.csv in Git: tag `before` has none, `base` A's, `better` B's
    (19 images B gets right and A wrong, 4 the other way, of 200); the workspace holds B's again."""
    project = tmp_path / "history"
    project.mkdir()
    git(project, "init", "-q")
    run(project, "dvc", "init", "-q")
    (project / "dvc.yaml").write_text("vars:\n  - paths:\n      evaluate_live: reports/evaluate\n")
    git(project, "add", "-A")
    git(project, "commit", "-qm", "project")
    git(project, "tag", "before")
    a, b = correct_pairs(150, 4, 19, 27)
    knn_a, knn_b = correct_pairs(180, 10, 10, 0, seed=1)
    for name, correct, knn in (("base", a, knn_a), ("better", b, knn_b)):
        (project / PREDICTIONS).parent.mkdir(parents=True, exist_ok=True)
        (project / PREDICTIONS).write_text(table(correct, knn=knn))
        git(project, "add", "-A")
        git(project, "commit", "-qm", name)
        git(project, "tag", name)
    return project


def compare_in(project: Path, *args: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> str:
    """compare's output in ``project``; an error ends the test unless the caller expects SystemExit."""
    monkeypatch.chdir(project)
    monkeypatch.setattr(sys, "argv", ["compare", *args])
    run_stage(compare.main)
    return capsys.readouterr().out


def test_the_workspace_against_head_and_two_tags_as_json(history: Path, monkeypatch, capsys):
    git(history, "checkout", "-q", "base")  # HEAD = A's commit; the workspace gets B's file back
    (history / PREDICTIONS).write_text(
        run(history, "git", "show", f"better:{PREDICTIONS}").stdout
    )  # fmt: skip
    out = compare_in(history, monkeypatch=monkeypatch, capsys=capsys)
    head = run(history, "git", "rev-parse", "--short=7", "HEAD").stdout.strip()
    assert out.splitlines()[0] == f"A = HEAD ({head}), B = workspace: 200 paired test images"
    assert re.search(r"^head +0\.770 +0\.845 +\+7\.5 points \[\+\d\.\d, \+\d+\.\d\] +4 +19 +0\.0026$", out, re.M), out
    assert re.search(r"^head: B is better: \+7\.5 points \[.*\], p = 0\.0026, on 200 paired test images$", out, re.M)
    assert re.search(r"^k-NN: no significant difference: \+0\.0 points \[.*\], p = 1, on 200", out, re.M), out

    doc = json.loads(compare_in(history, "better", "base", "--json", monkeypatch=monkeypatch, capsys=capsys))
    (pair,) = doc["comparisons"]
    assert (pair["a"]["name"], pair["b"]["name"], pair["images"]) == ("better", "base", 200)
    assert (pair["head"]["a_only"], pair["head"]["b_only"], pair["knn"]["a_only"]) == (19, 4, 10)
    assert pair["head"]["verdict"].startswith("A is better: -7.5 points")
    assert doc["corrected_for_multiple_comparisons"] is False


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["before", "base"], f"error: {PREDICTIONS} not found at before (.*): run `dvc repro evaluate` there, or "),
        (
            ["bse"],
            "error: unknown revision or experiment 'bse': not a branch, tag, commit or experiment; close ones: base",
        ),  # fmt: skip
        (["base", "workspace"], "error: the two runs have different test images: 1 only in A, 1 only in B"),
    ],
)
def test_refusals_are_one_error_line(history: Path, args: list[str], message: str, monkeypatch, capsys):
    lines = (history / PREDICTIONS).read_text().splitlines()
    lines[1] = lines[1].replace(lines[1].split(",")[1], "e" * 32)  # the workspace has one other test image
    (history / PREDICTIONS).write_text("\n".join(lines) + "\n")
    with pytest.raises(SystemExit) as stop:
        compare_in(history, *args, monkeypatch=monkeypatch, capsys=capsys)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.splitlines()) == 1 and re.match(message, err), err


@pytest.mark.slow
def test_an_experiment_against_head_the_workspace_and_all_of_them(head_experiment: Path, monkeypatch, capsys):
    """Real `dvc repro` and `dvc exp run` outputs, from the DVC cache: the experiment's results are also the
    workspace's, so all three ways say the same. The first is the command; the others, its main() here."""
    project = head_experiment
    by_name = run(project, "python", "-m", "pipeline.compare", "HEAD", "logreg").stdout
    workspace = compare_in(project, monkeypatch=monkeypatch, capsys=capsys)
    everything = compare_in(project, "--all", monkeypatch=monkeypatch, capsys=capsys)
    head = run(project, "git", "rev-parse", "--short=7", "HEAD").stdout.strip()
    exp = run(project, "git", "rev-parse", "--short=7", "refs/exps/" + _exp_ref(project)).stdout.strip()
    assert by_name.splitlines()[0] == f"A = HEAD ({head}), B = logreg ({exp}): 8 paired test images"
    assert workspace.splitlines()[0] == f"A = HEAD ({head}), B = workspace: 8 paired test images"
    assert by_name.splitlines()[1:] == workspace.splitlines()[1:]
    verdicts = [line for line in by_name.splitlines() if line.startswith(("head: ", "k-NN: "))]
    assert len(verdicts) == 2 and all(re.search(r", p = [\d.e-]+, on 8 paired test images$", v) for v in verdicts)
    assert everything.startswith(
        f"1 experiment(s) of HEAD ({head}) (A) each against it (B = the experiment); the p-values are not corrected"
    )
    assert by_name.strip() in everything and "2 comparisons stay significant under Bonferroni" in everything

    with pytest.raises(SystemExit) as stop:
        compare_in(project, "HEAD~1", "logreg", monkeypatch=monkeypatch, capsys=capsys)
    refused = capsys.readouterr()
    assert stop.value.code == 2 and refused.out == ""
    assert refused.err.strip().splitlines() == [
        "error: reports/evaluate/predictions.csv not found at HEAD~1 "
        f"({run(project, 'git', 'rev-parse', '--short=7', 'HEAD~1').stdout.strip()}): run `dvc repro evaluate` "
        "there, or `dvc exp run`"
    ]


def _exp_ref(project: Path) -> str:
    refs = run(project, "git", "for-each-ref", "--format=%(refname)", "refs/exps/").stdout.split()
    (ref,) = [r for r in refs if r.endswith("/logreg")]
    return ref.removeprefix("refs/exps/")
