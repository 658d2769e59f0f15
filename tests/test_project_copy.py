"""The test projects copy what the repository holds, never what a user added to their workspace (conftest)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import copy_project, git

HELD = {
    "dvc.yaml": "stages: {}\n",
    "pipeline/__init__.py": "",
    "pipeline/scan.py": "",
    ".dvc/config": "[core]\n    analytics = false\n",
    ".dvc/.gitignore": "/cache\n",
    ".dvc/plots/curve.json": "{}\n",
    ".dvcignore": "",
    ".gitignore": "__pycache__/\n",
    "data/raw/README.md": "Put your own images here\n",
}
ADDED = {  # what a user adds after following the README: images of their own, and a text file named like one
    "data/raw/circle/0.png": "",
    "data/raw/circle/notes.jpg": "not an image",
}


def source_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def copied(project: Path) -> set[str]:
    return {p.relative_to(project).as_posix() for p in project.rglob("*") if p.is_file() and ".git" not in p.parts}


def test_a_project_copy_holds_the_committed_files_and_none_of_the_users_images(tmp_path: Path):
    source = source_tree(tmp_path / "checkout", HELD)
    git(source, "init", "-q")
    git(source, "add", "-A")
    git(source, "commit", "-qm", "the repository")
    source_tree(source, ADDED | {"pipeline/__pycache__/scan.cpython-311.pyc": "", "pipeline/audit.py": ""})
    project = copy_project(tmp_path / "project", source=source)
    # a module being written (untracked, not ignored) is part of the code under test; caches are not
    # and scan's record that the backbone settings passed its check, which git ignores (record_backbone_check)
    assert copied(project) == set(HELD) | {"pipeline/audit.py", "params.yaml", "data/.images-backbone.json"}


def test_a_project_copy_outside_a_git_checkout_leaves_the_users_images_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # git looks for no checkout above this one
    source = source_tree(tmp_path / "unpacked", HELD | ADDED | {"pipeline/__pycache__/scan.cpython-311.pyc": ""})
    project = copy_project(tmp_path / "project", source=source)
    assert copied(project) == set(HELD) | {"params.yaml", "data/.images-backbone.json"}
