"""Corrections that users keep in Git: images to drop or relabel, named by content key so that a row survives renames.

``data/corrections.csv`` has the columns ``key,action,label,note``: ``key`` is the image's content key (the ``key``
column of the manifest: the hash of a file's bytes, or of a digits/CIFAR-10 image's pixels), ``action`` is ``drop``
or ``relabel``, ``label`` the class to relabel to (empty for drop), and ``note`` free text for people (the image's id
when the row was written, say). prepare applies them after the splits are drawn, so a relabelled image keeps its
split, and every image with that key (the same bytes under several names) gets the row's action.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline import folders, listing
from pipeline.errors import PipelineError
from pipeline.sources import SPLITS, Item

log = logging.getLogger(__name__)

COLUMNS = ("key", "action", "label", "note")
ACTIONS = ("drop", "relabel")
KEY_CHARS = len(listing.content_hash().hexdigest())  # 32: a 16-byte BLAKE2b digest in hex
_KEY = re.compile(f"[0-9a-f]{{{KEY_CHARS}}}")


@dataclass(frozen=True)
class Correction:
    key: str
    action: str  # drop | relabel
    label: str  # the class name to relabel to; "" for drop
    note: str
    line: int  # in the corrections file, for messages


def read(path: Path) -> list[Correction]:
    """The rows of the corrections file, checked; none when there is no file."""
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a spreadsheet's byte-order mark
        reader = csv.DictReader(f)
        if reader.fieldnames is not None and sorted(reader.fieldnames) != sorted(COLUMNS):
            raise PipelineError(
                f"{path} has the columns {','.join(reader.fieldnames)}: expected {','.join(COLUMNS)} in its first line"
            )
        rows = [(reader.line_num, row) for row in reader]
    found: dict[str, Correction] = {}
    for line, row in rows:
        if None in row:  # more fields than columns
            raise PipelineError(f"{path}, line {line}: more than {len(COLUMNS)} fields: quote a note that has commas")
        values = {k: (v or "").strip() for k, v in row.items()}
        if not any(values.values()):
            continue  # a line of bare commas
        fix = Correction(values["key"].lower(), values["action"], values["label"], values["note"], line)
        _check(path, fix)
        if fix.key in found:
            raise PipelineError(
                f"{path}, line {line}: key {fix.key} is on line {found[fix.key].line} too: keep one row per image"
            )
        found[fix.key] = fix
    return list(found.values())


def _check(path: Path, fix: Correction) -> None:
    where = f"{path}, line {fix.line}"
    if not _KEY.fullmatch(fix.key):
        raise PipelineError(
            f"{where}: key {fix.key!r} is not {KEY_CHARS} hex digits: copy the image's key from the key column of "
            "data/prepared/manifest.csv"
        )
    if fix.action not in ACTIONS:
        raise PipelineError(f"{where}: unknown action {fix.action!r}: expected {' or '.join(ACTIONS)}")
    if fix.action == "relabel" and not fix.label:
        raise PipelineError(f"{where}: relabel without a label: put the class name in the label column")
    if fix.action == "drop" and fix.label:
        raise PipelineError(f"{where}: drop with a label ({fix.label!r}): empty the label, or set the action relabel")


def apply(
    items: Sequence[Item], classes: Sequence[str], corrections: Sequence[Correction]
) -> tuple[list[Item], dict[str, int]]:
    """``items`` with the corrections applied, and how many images were dropped and relabelled and how many rows
    matched no image (``stale``: the image was removed or left out; each is logged)."""
    index = {name: k for k, name in enumerate(classes)}
    for fix in corrections:
        if fix.action == "relabel" and fix.label not in index:
            close = difflib.get_close_matches(fix.label, classes, n=3)
            hint = f"did you mean {_quoted(close)}?" if close else f"the classes are {_quoted(classes)}"
            raise PipelineError(f"correction on line {fix.line} relabels to {fix.label!r}, which is no class: {hint}")
    by_key = {fix.key: fix for fix in corrections}
    kept: list[Item] = []
    matched: set[str] = set()
    dropped = relabeled = 0
    for it in items:
        fix = by_key.get(it.key)
        if fix is None:
            kept.append(it)
            continue
        matched.add(fix.key)
        if fix.action == "drop":
            dropped += 1
        else:
            relabeled += int(index[fix.label] != it.label)  # an image already of that class counts for nothing
            kept.append(dataclasses.replace(it, label=index[fix.label]))  # the same split: splits never move
    stale = [fix for fix in corrections if fix.key not in matched]
    for fix in stale:
        log.warning(
            "correction on line %d (%s, note %r) matches no image: key %s was removed or left out; delete the row if "
            "the image is gone for good",
            fix.line, fix.action, fix.note, fix.key,
        )  # fmt: skip
    _check_every_split(items, kept, classes, by_key)
    return kept, {"dropped": dropped, "relabeled": relabeled, "stale": len(stale)}


def _check_every_split(
    before: Sequence[Item], after: Sequence[Item], classes: Sequence[str], by_key: dict[str, Correction]
) -> None:
    """Refuse corrections that leave a class with no image in a split it had images in."""
    emptied = {(it.label, it.split) for it in before} - {(it.label, it.split) for it in after}
    if not emptied:
        return
    label, split = min(emptied, key=lambda pair: (pair[0], SPLITS.index(pair[1])))
    lines = sorted({by_key[it.key].line for it in before if (it.label, it.split) == (label, split)})
    where = f"line{'s' * (len(lines) > 1)} {folders.few([str(n) for n in lines])}"
    raise PipelineError(
        f"dropping and relabelling (corrections on {where}) "
        f"leaves class {classes[label]!r} with no {split} image: every class needs images in every split; remove one "
        f"of those rows, or add {split} images of {classes[label]!r}"
    )


def _quoted(names: Sequence[str]) -> str:
    return folders.few([repr(name) for name in names])
