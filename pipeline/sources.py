"""Image sources (digits, imagefolder, cifar10): labelled items, the split manifest, and image readers.

An item is identified by a string id that its source can open again:
- digits: ``digits/0042`` (index into scikit-learn's bundled digits);
- imagefolder: the image's path relative to ``data.root``, e.g. ``cat/001.jpg`` or ``train/cat/001.jpg``;
- cifar10: ``train/00042`` or ``test/00042`` (index into the official batches).
"""

from __future__ import annotations

import csv
import json
import logging
import pickle
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pipeline import splits
from pipeline.config import DataConfig
from pipeline.errors import PipelineError
from pipeline.images import open_image

log = logging.getLogger(__name__)

SPLITS = splits.SPLITS
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MANIFEST = "manifest.csv"
CLASSES = "classes.json"
_CIFAR_DIR = "cifar-10-batches-py"


@dataclass(frozen=True)
class Item:
    id: str
    label: int
    split: str


# ---------------------------------------------------------------------------- discovery


def discover(cfg: DataConfig, seed: int, exclude: frozenset[str] = frozenset()) -> tuple[list[Item], list[str]]:
    """All labelled items of the configured source with their splits, and the class names.

    ``exclude``: imagefolder ids to leave out (unreadable files), before the split is drawn.
    """
    if cfg.source == "digits":
        ids, labels, classes = _digits_items()
        items = _split(ids, labels, classes, cfg, seed)
    elif cfg.source == "cifar10":
        items, classes = _cifar_items(cfg, seed)
    else:
        items, classes = _imagefolder_items(cfg, seed, exclude)
    if cfg.per_class_limit:
        items = limit_per_class(items, classes, cfg.per_class_limit, seed)
    return items, classes


def _digits_items() -> tuple[list[str], list[int], list[str]]:
    from sklearn.datasets import load_digits

    target = load_digits().target
    return [f"digits/{i:04d}" for i in range(len(target))], target.tolist(), [str(d) for d in range(10)]


def _split(ids: Sequence[str], labels: Sequence[int], classes: Sequence[str], cfg: DataConfig, seed: int) -> list[Item]:
    """Train/val/test of one pool of items, each image's split from its id, class and ``seed`` (pipeline.splits)."""
    names = [classes[lab] for lab in labels]
    assigned = splits.assign(ids, names, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=seed)
    return [Item(i, lab, s) for i, lab, s in zip(ids, labels, assigned, strict=True)]


def limit_per_class(items: list[Item], classes: Sequence[str], limit: int, seed: int) -> list[Item]:
    """Keep ``limit`` training items per class, chosen by ``seed`` and stable as images are added; val and test
    are untouched."""
    train = [it for it in items if it.split == "train"]
    keep = splits.keep_per_class([it.id for it in train], [classes[it.label] for it in train], limit, seed)
    return [it for it in items if it.split != "train" or it.id in keep]


def _image_files(folder: Path) -> list[Path]:
    files = (
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )
    return sorted(files)


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _imagefolder_listing(root: Path) -> tuple[list[str], dict[str, tuple[list[str], list[int]]]]:
    """Classes and, per split folder ("" when there are none), the image ids and labels found under ``root``."""
    if not root.is_dir():
        raise PipelineError(f"data.root = {str(root)!r} is not a directory: put one folder of images per class there")
    split_dirs = {s: root / s for s in SPLITS if (root / s).is_dir()}
    if split_dirs and "train" not in split_dirs:
        raise PipelineError(f"{root} has {', '.join(split_dirs)} folders but no train/ folder")
    bases = split_dirs or {"": root}
    classes = sorted({d.name for base in bases.values() for d in _class_dirs(base)})
    if not classes:
        raise PipelineError(f"no class folders under {root}: expected {root}/<class>/<image> or {root}/train/<class>/…")
    listing = {}
    for split, base in bases.items():
        ids, labels = [], []
        for d in _class_dirs(base):
            files = _image_files(d)
            if not files:
                raise PipelineError(f"class folder {d} has no image files ({', '.join(IMAGE_EXTENSIONS)})")
            ids += [f.relative_to(root).as_posix() for f in files]
            labels += [classes.index(d.name)] * len(files)
        listing[split] = (ids, labels)
    return classes, listing


def imagefolder_ids(cfg: DataConfig) -> list[str]:
    """Every image id of an imagefolder root, before any split."""
    _, listing = _imagefolder_listing(Path(cfg.root))
    return [i for ids, _ in listing.values() for i in ids]


def _imagefolder_items(cfg: DataConfig, seed: int, exclude: frozenset[str]) -> tuple[list[Item], list[str]]:
    classes, listing = _imagefolder_listing(Path(cfg.root))
    _check_unique(i for ids, _ in listing.values() for i in ids)
    kept = {}
    for split, (ids, labels) in listing.items():
        pairs = [(i, lab) for i, lab in zip(ids, labels, strict=True) if i not in exclude]
        kept[split] = ([i for i, _ in pairs], [lab for _, lab in pairs])
    if len(classes) < 2:
        raise PipelineError(f"only one class ({classes[0]!r}) under {cfg.root}: a classifier needs at least two")
    if "" in kept:
        items = _split(*kept[""], classes, cfg, seed)
    else:
        carve = {"val": cfg.val_fraction, "test": cfg.test_fraction}
        missing = {s for s in carve if s not in kept}
        if missing:  # carve the missing splits out of train, stratified
            carved = DataConfig(val_fraction=carve["val"], test_fraction=carve["test"])
            cut = _split(*kept["train"], classes, carved, seed)
            items = [Item(it.id, it.label, it.split if it.split in missing else "train") for it in cut]
        else:
            items = [Item(i, lab, "train") for i, lab in zip(*kept["train"], strict=True)]
        for s in ("val", "test"):
            if s in kept:
                items += [Item(i, lab, s) for i, lab in zip(*kept[s], strict=True)]
    for split in SPLITS:
        absent = set(range(len(classes))) - {it.label for it in items if it.split == split}
        if absent:
            names = ", ".join(repr(classes[c]) for c in sorted(absent))
            raise PipelineError(f"the {split} split has no images of class {names}: every class must be in every split")
    return items, classes


def _check_unique(ids: Iterable[str]) -> None:
    """Refuse ids that differ only in letter case or Unicode normalisation: they collide on many file systems."""
    seen: dict[str, str] = {}
    for i in ids:
        key = unicodedata.normalize("NFC", i).casefold()
        if key in seen:
            raise PipelineError(f"image ids {seen[key]!r} and {i!r} differ only in case or accents: rename one")
        seen[key] = i


def _cifar_items(cfg: DataConfig, seed: int) -> tuple[list[Item], list[str]]:
    root = Path(cfg.root)
    if cfg.download:
        from torchvision.datasets import CIFAR10
        from torchvision.datasets.utils import download_and_extract_archive

        if not (root / _CIFAR_DIR).is_dir():
            download_and_extract_archive(CIFAR10.url, str(root), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
    classes = [str(c) for c in _unpickle(_cifar_file(root, "batches.meta"))["label_names"]]
    train_labels = np.concatenate([_cifar_batch(root, f"data_batch_{i}")[1] for i in range(1, 6)])
    test_labels = _cifar_batch(root, "test_batch")[1]
    train_ids = [f"train/{i:05d}" for i in range(len(train_labels))]
    # CIFAR-10 has an official test set; validation comes out of its training set
    carved = DataConfig(val_fraction=cfg.val_fraction, test_fraction=0.0)
    items = _split(train_ids, train_labels.tolist(), classes, carved, seed)
    items += [Item(f"test/{i:05d}", int(lab), "test") for i, lab in enumerate(test_labels)]
    return items, classes


# ---------------------------------------------------------------------------- manifest


def write_manifest(out_dir: Path, items: Sequence[Item], classes: Sequence[str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / MANIFEST, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["id", "split", "label"])
        writer.writerows([it.id, it.split, it.label] for it in items)
    (out_dir / CLASSES).write_text(json.dumps(list(classes), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def read_manifest(prepared_dir: Path) -> tuple[list[Item], list[str]]:
    path = prepared_dir / MANIFEST
    if not path.is_file():
        raise PipelineError(f"{path} not found: run the prepare stage first (dvc repro prepare)")
    with open(path, newline="", encoding="utf-8") as f:
        items = [Item(row["id"], int(row["label"]), row["split"]) for row in csv.DictReader(f)]
    classes = json.loads((prepared_dir / CLASSES).read_text(encoding="utf-8"))
    return items, classes


def fingerprint(cfg: DataConfig, ids: Sequence[str]) -> list[Any]:
    """A cheap identity of the images' content: each file's size and mtime (imagefolder), the batch files'
    (cifar10), the scikit-learn release that bundles them (digits)."""
    root = Path(cfg.root)
    if cfg.source == "imagefolder":
        return [(i, *_size_and_mtime(root / i)) for i in ids]
    if cfg.source == "cifar10":
        return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted((root / _CIFAR_DIR).iterdir())]
    import sklearn

    return [sklearn.__version__]


def _size_and_mtime(path: Path) -> tuple[int, int] | tuple[None, None]:
    try:
        st = path.stat()
    except OSError:  # a dangling link: reading it will fail with the reason
        return None, None
    return st.st_size, st.st_mtime_ns


# ---------------------------------------------------------------------------- readers


def find_images(paths: Sequence[Path]) -> list[Path]:
    """The image files among ``paths``, with folders searched recursively (hidden files skipped), in order."""
    found: list[Path] = []
    for path in paths:
        found += _image_files(path) if path.is_dir() else [path]
    return found


class ImageReader:
    """Opens an item id of one source as an RGB PIL image. Cheap to copy into DataLoader workers."""

    def __init__(self, cfg: DataConfig, reduce_for: int = 0) -> None:
        self.source = cfg.source
        self.root = Path(cfg.root)
        self.reduce_for = reduce_for  # see open_image
        self._arrays: dict[str, np.ndarray] = {}
        if cfg.source == "digits":
            from sklearn.datasets import load_digits

            # 8x8 intensities 0..16 -> uint8 0..255
            self._arrays["digits"] = np.round(load_digits().images * (255 / 16)).astype(np.uint8)
        elif cfg.source == "cifar10":
            train = [_cifar_batch(self.root, f"data_batch_{i}")[0] for i in range(1, 6)]
            self._arrays["train"] = np.concatenate(train)
            self._arrays["test"] = _cifar_batch(self.root, "test_batch")[0]

    def __call__(self, item_id: str) -> Image.Image:
        if self.source == "imagefolder":
            return open_image(self.root / item_id, self.reduce_for)
        group, index = item_id.split("/")
        return Image.fromarray(self._arrays[group][int(index)]).convert("RGB")


# ---------------------------------------------------------------------------- CIFAR-10 files


def _cifar_file(root: Path, name: str) -> Path:
    path = root / _CIFAR_DIR / name
    if not path.is_file():
        raise PipelineError(
            f"{path} not found: data.source is cifar10, so data.root must hold {_CIFAR_DIR}/ "
            "(set data.download: true to fetch it)"
        )
    return path


def _cifar_batch(root: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch as (N, 32, 32, 3) uint8 images and (N,) labels."""
    entry = _unpickle(_cifar_file(root, name))
    images = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), np.asarray(entry["labels"], dtype=np.int64)


class _ArrayUnpickler(pickle.Unpickler):
    """CIFAR-10 ships as pickles; this unpickler builds plain containers and numpy arrays only."""

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR-10 batch")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return _ArrayUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise PipelineError(f"{path} is not a readable CIFAR-10 batch: {err}") from None
