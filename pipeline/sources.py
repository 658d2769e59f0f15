"""Image sources (digits, imagefolder, cifar10): labelled items, the split manifest, and image readers.

An item is identified by a string id that its source can open again:
- digits: ``digits/0042`` (index into scikit-learn's bundled digits);
- imagefolder: the image's path relative to ``data.root``, e.g. ``cat/001.jpg`` or ``train/cat/001.jpg``;
- cifar10: ``train/00042`` or ``test/00042`` (index into the official batches).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import pickle
import unicodedata
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline import folders, listing, splits
from pipeline.config import DataConfig
from pipeline.errors import PipelineError
from pipeline.images import open_image, read_bytes

log = logging.getLogger(__name__)

SPLITS = splits.SPLITS
MANIFEST = "manifest.csv"
CLASSES = "classes.json"
_CIFAR_DIR = folders.CIFAR_DIR


@dataclass(frozen=True)
class Item:
    id: str
    label: int
    split: str
    key: str = ""  # hex content key of the image's bytes (files) or pixels (digits, cifar10): what its rows are kept by


# ---------------------------------------------------------------------------- discovery


def discover(
    cfg: DataConfig, seed: int, entries: Sequence[listing.Entry] | None = None, exclude: frozenset[str] = frozenset()
) -> tuple[list[Item], list[str]]:
    """All labelled items of the configured source with their splits and content keys, and the class names.

    ``entries``: the image folder's listing (read from the folder when None); ``exclude``: ids to leave out
    (unreadable files), before the split is drawn.
    """
    if cfg.source == "digits":
        ids, labels, classes, keys = _digits_items()
        items = _split(ids, labels, classes, cfg, seed, keys)
    elif cfg.source == "cifar10":
        items, classes = _cifar_items(cfg, seed)
    else:
        if entries is None:
            root = Path(cfg.root)
            entries = listing.scan(root, folders.imagefolder_ids(root, cfg.layout), cache_path=None)
        items, classes = _imagefolder_items(entries, cfg, seed, exclude)
    if cfg.per_class_limit:
        items = limit_per_class(items, classes, cfg.per_class_limit, seed)
    return items, classes


def _digits_items() -> tuple[list[str], list[int], list[str], list[str]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    ids = [f"digits/{i:04d}" for i in range(len(digits.target))]
    return ids, digits.target.tolist(), [str(d) for d in range(10)], [pixel_key(a) for a in digits.images]


def pixel_key(pixels: np.ndarray) -> str:
    """The content key of an image given as an array: its shape, dtype and values."""
    header = f"{pixels.shape}{pixels.dtype}".encode()
    return listing.content_hash(header + np.ascontiguousarray(pixels).tobytes()).hexdigest()


def _split(
    ids: Sequence[str],
    labels: Sequence[int],
    classes: Sequence[str],
    cfg: DataConfig,
    seed: int,
    keys: Sequence[str],
    *,
    carve: Collection[str] | None = None,
) -> list[Item]:
    """Train/val/test of one pool of items, each image's split from its id, class and ``seed`` (pipeline.splits);
    with ``carve``, only those splits are carved out of the pool, a train/ folder."""
    names = [classes[lab] for lab in labels]
    assigned = splits.assign(
        ids, names, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=seed, carve=carve
    )
    return [Item(i, lab, s, k) for i, lab, s, k in zip(ids, labels, assigned, keys, strict=True)]


def limit_per_class(items: list[Item], classes: Sequence[str], limit: int, seed: int) -> list[Item]:
    """Keep ``limit`` training items per class, chosen by ``seed`` and stable as images are added; val and test
    are untouched."""
    train = [it for it in items if it.split == "train"]
    keep = splits.keep_per_class([it.id for it in train], [classes[it.label] for it in train], limit, seed)
    return [it for it in items if it.split != "train" or it.id in keep]


def _imagefolder_items(
    entries: Sequence[listing.Entry], cfg: DataConfig, seed: int, exclude: frozenset[str]
) -> tuple[list[Item], list[str]]:
    """Items from the listing (see folders.imagefolder_ids for the layout): classes from every listed file, the
    excluded ones included, so that leaving a file out never renumbers the classes."""
    _check_unique(e.id for e in entries)
    tops = sorted({e.id.split("/", 1)[0] for e in entries})
    by_split = folders.layout(Path(cfg.root), cfg.layout, tops) == "splits"
    parts = [e.id.split("/")[1:] if by_split else e.id.split("/") for e in entries]
    classes = sorted({p[0] for p in parts})
    if len(classes) < 2:
        raise PipelineError(f"only one class ({classes[0]!r}) under {cfg.root}: a classifier needs at least two")
    label = {name: k for k, name in enumerate(classes)}
    kept: dict[str, list[Item]] = {}  # split folder ("" without them) -> its items
    for e, p in zip(entries, parts, strict=True):
        if e.id not in exclude:
            folder = e.id.split("/", 1)[0] if by_split else ""
            kept.setdefault(folder, []).append(Item(e.id, label[p[0]], "", e.key))
    usable = {it.label for group in kept.values() for it in group}
    if len(usable) < len(classes):  # every image of a class was left out (a class folder with a refused name)
        names = folders.few([f"'{c}'" for k, c in enumerate(classes) if k not in usable])
        raise PipelineError(
            f"class {names} has no usable image: each was left out (the warnings above say why); rename or remove "
            "its folder"
        )
    if "" in kept:
        items = _split_items(kept[""], classes, cfg, seed)
    else:
        missing = [s for s in ("val", "test") if s not in kept]
        if missing:  # carve the missing splits out of train, stratified; a class needs train and those only
            items = _split_items(kept.get("train", []), classes, cfg, seed, carve=missing)
        else:
            items = [Item(it.id, it.label, "train", it.key) for it in kept["train"]]
        for s in ("val", "test"):
            items += [Item(it.id, it.label, s, it.key) for it in kept.get(s, [])]
    for split in SPLITS:
        absent = set(range(len(classes))) - {it.label for it in items if it.split == split}
        if absent:
            names = ", ".join(repr(classes[c]) for c in sorted(absent))
            raise PipelineError(f"the {split} split has no images of class {names}: every class must be in every split")
    return items, classes


def _split_items(
    items: Sequence[Item], classes: Sequence[str], cfg: DataConfig, seed: int, *, carve: Collection[str] | None = None
) -> list[Item]:
    ids, labels, keys = [it.id for it in items], [it.label for it in items], [it.key for it in items]
    return _split(ids, labels, classes, cfg, seed, keys, carve=carve)


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
    train = [_cifar_batch(root, f"data_batch_{i}") for i in range(1, 6)]
    train_images, train_labels = np.concatenate([b[0] for b in train]), np.concatenate([b[1] for b in train])
    test_images, test_labels = _cifar_batch(root, "test_batch")
    train_ids = [f"train/{i:05d}" for i in range(len(train_labels))]
    # CIFAR-10 has an official test set; validation comes out of its training set
    carved = DataConfig(val_fraction=cfg.val_fraction, test_fraction=0.0)
    items = _split(train_ids, train_labels.tolist(), classes, carved, seed, [pixel_key(a) for a in train_images])
    tests = zip(test_labels, test_images, strict=True)
    items += [Item(f"test/{i:05d}", int(lab), "test", pixel_key(a)) for i, (lab, a) in enumerate(tests)]
    return items, classes


# ---------------------------------------------------------------------------- manifest


def write_manifest(out_dir: Path, items: Sequence[Item], classes: Sequence[str]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / MANIFEST, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["id", "split", "label", "key"])
        writer.writerows([it.id, it.split, it.label, it.key] for it in items)
    (out_dir / CLASSES).write_text(json.dumps(list(classes), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def read_manifest(prepared_dir: Path) -> tuple[list[Item], list[str]]:
    path = prepared_dir / MANIFEST
    if not path.is_file():
        raise PipelineError(f"{path} not found: run the prepare stage first (dvc repro prepare)")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if "key" not in (reader.fieldnames or []):
            raise PipelineError(f"{path} has no content keys (an earlier release wrote it): re-run prepare")
        items = [Item(row["id"], int(row["label"]), row["split"], row["key"]) for row in reader]
    classes = json.loads((prepared_dir / CLASSES).read_text(encoding="utf-8"))
    return items, classes


# ---------------------------------------------------------------------------- readers


def find_images(paths: Sequence[Path]) -> list[Path]:
    """The image files among ``paths``, with folders searched recursively (hidden files skipped), in order."""
    found: list[Path] = []
    for path in paths:
        found += folders.image_files(path) if path.is_dir() else [path]
    return found


class ImageReader:
    """Opens an item id of one source as an RGB PIL image. Cheap to copy into DataLoader workers.

    ``keys``: image id -> the content key the file had when it was listed; a file whose bytes no longer have it
    is refused (a row must be the row of the bytes it is stored under)."""

    def __init__(self, cfg: DataConfig, reduce_for: int = 0, keys: Mapping[str, str] | None = None) -> None:
        self.source = cfg.source
        self.root = Path(cfg.root)
        self.reduce_for = reduce_for  # see open_image
        self.keys = keys
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
        if self.source == "imagefolder":  # named by its id: a file object's name would be its repr
            data = self.root / item_id if self.keys is None else io.BytesIO(self.raw(item_id))
            return open_image(data, self.reduce_for, name=item_id)
        group, index = item_id.split("/")
        return Image.fromarray(self._arrays[group][int(index)]).convert("RGB")

    def raw(self, item_id: str) -> bytes | None:
        """The file's bytes, checked against its listed key where there is one; None for an array's image."""
        if self.source != "imagefolder":
            return None
        data = read_bytes(self.root / item_id)
        if self.keys is not None and listing.content_hash(data).hexdigest() != self.keys[item_id]:
            raise OSError("the file changed after the scan stage listed it: run dvc repro again")
        return data


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
