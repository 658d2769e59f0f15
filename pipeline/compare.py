"""Command `compare`: is B really better than A? evaluate's test predictions of two Git revisions or `dvc exp`
experiments, or the workspace, paired image by image (pipeline.pairing); nothing is checked out.

    python -m pipeline.compare                 # the workspace (B) against HEAD (A): is my change better?
    python -m pipeline.compare my-exp          # the workspace (B) against the experiment my-exp (A)
    python -m pipeline.compare main my-exp     # the experiment (B) against the branch main (A)
    python -m pipeline.compare --all           # every experiment of HEAD (B) against HEAD (A)
"""

from __future__ import annotations

import argparse
import difflib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline import pairing
from pipeline.config import dvc_path
from pipeline.errors import PipelineError, run_stage

if TYPE_CHECKING:
    from dvc.repo import Repo

WORKSPACE = "workspace"
RUN_THERE = "run `dvc repro evaluate` there, or `dvc exp run`"
FINISHED = (None, "Success")  # `dvc exp show`'s State of an experiment with results (Queued, Running, Failed: none)


@dataclass(frozen=True)
class Side:
    """One side of a comparison: a name as the user gave it and its commit; no commit for the workspace."""

    name: str
    rev: str | None = None

    def __str__(self) -> str:
        return self.name if self.rev is None or self.rev.startswith(self.name) else f"{self.name} ({self.rev[:7]})"


Result = tuple[Side, Side, list[pairing.Comparison]]  # A, B, and B's comparisons against A, a metric each


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", nargs="?", default="HEAD", help="Git revision or experiment name (default: HEAD)")
    parser.add_argument("b", nargs="?", default=WORKSPACE, help=f"another, or {WORKSPACE} (the default)")
    parser.add_argument("--all", action="store_true", help="every experiment of HEAD against HEAD")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--predictions", type=Path, help="the file at each revision (default: evaluate's)")
    args = parser.parse_args()
    path = args.predictions or dvc_path("evaluate_live") / pairing.PREDICTIONS
    read = _reader(path)
    with _open_repo() as repo:
        baseline, experiments, known = _revisions(repo)
        pair = None if args.all else [_resolve(repo, name, experiments, known) for name in (args.a, args.b)]
    if pair:
        a, b = pair
        results, skipped = [(a, b, pairing.compare(read(a), read(b)))], []
    else:
        results, skipped = against(baseline, list(experiments.values()), read)
    print(as_json(results, skipped) if args.json else as_text(results, skipped, baseline=None if pair else baseline))


def against(
    baseline: Side, experiments: list[Side], read: Callable[[Side], pairing.Predictions]
) -> tuple[list[Result], list[tuple[Side, str]]]:
    """Each experiment against the baseline; one that cannot be compared (no predictions, other test images) is
    set aside with the reason, and the others go on."""
    if not experiments:
        raise PipelineError(f"no finished experiment of {baseline} to compare: run `dvc exp run` first")
    base = read(baseline)
    results, skipped = [], []
    for exp in experiments:
        try:
            results.append((baseline, exp, pairing.compare(base, read(exp))))
        except PipelineError as err:
            skipped.append((exp, str(err)))
    return results, skipped


def _open_repo() -> Repo:
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo

    try:
        return Repo()
    except NotDvcRepoError:
        raise PipelineError("not in a DVC project: run compare from the project root") from None


def _revisions(repo: Repo) -> tuple[Side, dict[str, Side], list[str]]:
    """HEAD, its finished experiments by name (`dvc exp show`), and every branch, tag and experiment name."""
    import dvc.api

    scm = repo.scm
    rows = dvc.api.exp_show(repo.root_dir)
    experiments = {
        row["Experiment"]: Side(row["Experiment"], scm.resolve_rev(row["rev"]))  # rev: the commit's first 7 digits
        for row in rows
        if row["typ"] != "baseline" and row["Experiment"] and row["State"] in FINISHED
    }
    names = [row["Experiment"] for row in rows if row["Experiment"]]
    return Side("HEAD", scm.get_rev()), experiments, [*scm.list_branches(), *scm.list_tags(), *names]


def _resolve(repo: Repo, name: str, experiments: dict[str, Side], known: list[str]) -> Side:
    """A Git revision (branch, tag, commit) or experiment name as a Side, or an error naming the close ones."""
    from dvc.scm import RevError, resolve_rev

    if name == WORKSPACE:
        return Side(WORKSPACE)
    if name in experiments:
        return experiments[name]
    try:
        return Side(name, resolve_rev(repo.scm, name))  # also an experiment of another commit than HEAD
    except RevError:
        pass
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"; close ones: {', '.join(close)}" if close else " (git branch, git tag and dvc exp show list them)"
    raise PipelineError(f"unknown revision or experiment {name!r}: not a branch, tag, commit or experiment{hint}")


def _reader(path: Path) -> Callable[[Side], pairing.Predictions]:
    """A function that reads ``path`` at a Side: from disk for the workspace, else dvc.api.read (the DVC cache or
    Git), with no checkout."""
    import dvc.api
    from dvc.exceptions import DvcException, PathMissingError

    def read(side: Side) -> pairing.Predictions:
        if side.rev is None:
            if not path.is_file():
                raise PipelineError(f"{path} not found in the {WORKSPACE}: run `dvc repro evaluate`")
            return pairing.parse_predictions(path.read_text(encoding="utf-8"), source=str(path))
        try:
            text = dvc.api.read(path.as_posix(), rev=side.rev)
        except PathMissingError:
            raise PipelineError(f"{path} not found at {side}: {RUN_THERE}") from None
        except (DvcException, FileNotFoundError) as err:  # an output of that run whose cache is not here
            raise PipelineError(f"cannot read {path} at {side} ({err}): `dvc pull` it, or {RUN_THERE}") from None
        return pairing.parse_predictions(text, source=f"{path} at {side}")

    return read


def as_text(results: list[Result], skipped: list[tuple[Side, str]], *, baseline: Side | None) -> str:
    """Each pair's table and verdicts; with ``baseline`` (--all) the note on multiple comparisons and Bonferroni."""
    blocks = []
    if baseline is not None:
        blocks.append(
            f"{len(results)} experiment(s) of {baseline} (A) each against it (B = the experiment); the p-values are "
            "not corrected for multiple comparisons"
        )
    for a, b, found in results:
        blocks.append(f"A = {a}, B = {b}: {found[0].images:,} paired test images\n{pairing.format_comparisons(found)}")
    blocks += [f"not compared: {b}: {reason}" for b, reason in skipped]
    every = [c for _, _, found in results for c in found]
    if baseline is not None and len(every) > 1:
        blocks.append(pairing.bonferroni(every))
    return "\n\n".join(blocks)


def as_json(results: list[Result], skipped: list[tuple[Side, str]]) -> str:
    def side(s: Side) -> dict[str, Any]:
        return {"name": s.name, "rev": s.rev}

    doc = {
        "comparisons": [
            {"a": side(a), "b": side(b), "images": found[0].images} | {c.metric: c.to_dict() for c in found}
            for a, b, found in results
        ],
        "not_compared": [{"b": side(b), "reason": reason} for b, reason in skipped],
        "corrected_for_multiple_comparisons": False,
    }
    return json.dumps(doc, indent=1)


if __name__ == "__main__":
    run_stage(main)
