"""Outputs appear whole or not at all: every file or directory is written beside its final path and renamed."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def replaced(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write (a file or a directory); it takes ``path``'s place only
    when the block completes, so a failed or killed run never leaves a partial output under the real name."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.partial")
    _remove(tmp)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    _remove(path)
    os.replace(tmp, path)
