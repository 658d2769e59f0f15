"""The image folder under ``data.root``: what its top folders are (classes, or train/ val/ test/ split folders:
``data.layout``), its class folders, and the image files in them; and which files each source lists."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pipeline.errors import PipelineError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
SPLIT_DIRS = ("train", "val", "test")
CIFAR_DIR = "cifar-10-batches-py"


def image_files(folder: Path) -> list[Path]:
    """The image files under ``folder``, recursively, hidden files and folders skipped, sorted."""
    files = (
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    return sorted(files)


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def layout(root: Path, spec: str, folders: Sequence[str]) -> str:
    """``classes`` or ``splits``: what the top-level ``folders`` of an image folder are. ``auto`` decides by their
    names and refuses a folder that mixes split names with others (a class may be called ``train``)."""
    named = [f for f in folders if f in SPLIT_DIRS]
    others = [f for f in folders if f not in SPLIT_DIRS]
    if spec == "auto" and named and others:
        raise PipelineError(
            f"{root} has split folders ({', '.join(named)}) beside other folders ({few(others)}): set data.layout: "
            f"classes if {'/'.join(named)} {'is a class' if len(named) == 1 else 'are classes'}, or data.layout: "
            f"splits and move the class folders under {root}/train/"
        )
    if spec == "splits" and others:
        raise PipelineError(
            f"data.layout is splits, but {root} has folders other than train/ val/ test/ ({few(others)}): move "
            "them into a split folder, or set data.layout: classes"
        )
    chosen = spec if spec != "auto" else "splits" if named else "classes"
    if chosen == "splits" and "train" not in named:
        raise PipelineError(f"{root} has {', '.join(named) or 'no split'} folders but no train/ folder")
    return chosen


def few(names: Sequence[str], shown: int = 5) -> str:
    """Up to ``shown`` names, and how many more."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def imagefolder_ids(root: Path, spec: str = "auto") -> list[str]:
    """Every image id of an image folder: ``<class>/…`` or, when its layout is splits, ``<split>/<class>/…``."""
    if not root.is_dir():
        raise PipelineError(f"data.root = {str(root)!r} is not a directory: put one folder of images per class there")
    top = _class_dirs(root)
    if not top:
        raise PipelineError(f"no class folders under {root}: expected {root}/<class>/<image> or {root}/train/<class>/…")
    splits = layout(root, spec, [d.name for d in top]) == "splits"
    ids = []
    for base in top if splits else [root]:
        dirs = _class_dirs(base)
        if not dirs:
            hint = f" (if {base.name} is a class, set data.layout: classes)" if splits else ""
            raise PipelineError(f"no class folders under {base}: expected {base}/<class>/<image>{hint}")
        for d in dirs:
            files = image_files(d)
            if not files:
                raise PipelineError(f"class folder {d} has no image files ({', '.join(IMAGE_EXTENSIONS)})")
            ids += [f.relative_to(root).as_posix() for f in files]
    return ids


def check_root(source: str, root: Path, *, download: bool = False) -> None:
    """Refuse a ``data.root`` that does not exist, in a line that says so first. Digits reads no root, and
    CIFAR-10 with data.download makes it."""
    if root.exists() or source == "digits" or (source == "cifar10" and download):
        return
    wanted = "the images there, one folder per class"
    wanted = f"{CIFAR_DIR}/ there, or set data.download: true" if source == "cifar10" else wanted
    raise PipelineError(
        f"data.root = {str(root)!r} does not exist (no {root.absolute()}): fix data.root in params.yaml, or put "
        f"{wanted}"
    )


def present(source: str, root: Path) -> bool:
    """Whether ``root`` holds the files of ``source`` (a clone without the images has none)."""
    if source == "imagefolder":
        return root.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir())
    return source != "cifar10" or (root / CIFAR_DIR).is_dir()


def source_ids(source: str, root: Path, layout_spec: str = "auto") -> list[str]:
    """The files of ``source`` under ``root``: the images of an image folder, CIFAR-10's batch files, none for
    digits (bundled with scikit-learn)."""
    if source == "imagefolder":
        return imagefolder_ids(root, layout_spec)
    if source == "cifar10" and (root / CIFAR_DIR).is_dir():
        return sorted(f"{CIFAR_DIR}/{p.name}" for p in (root / CIFAR_DIR).iterdir() if not p.name.startswith("."))
    return []
