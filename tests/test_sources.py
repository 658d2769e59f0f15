from __future__ import annotations

import collections
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, UnidentifiedImageError

from pipeline import listing, sources
from pipeline.config import DataConfig
from pipeline.errors import PipelineError
from tests.conftest import color_image, make_cifar, make_imagefolder


def counts(items: list[sources.Item]) -> collections.Counter:
    return collections.Counter(it.split for it in items)


def test_digits_are_the_bundled_1797_images_split_by_fraction():
    items, classes = sources.discover(DataConfig(), seed=0)
    assert classes == [str(d) for d in range(10)]
    assert len(items) == 1797 and len({it.id for it in items}) == 1797
    n = counts(items)  # binomial: standard deviations of 17 (test) and 13 (val) images
    assert abs(n["test"] - 359) < 3 * 17 and abs(n["val"] - 180) < 3 * 13
    test_labels = collections.Counter(it.label for it in items if it.split == "test")
    assert min(test_labels.values()) >= 20  # every digit is in the test split
    image = sources.ImageReader(DataConfig())(items[0].id)
    assert image.mode == "RGB" and image.size == (8, 8)


def test_splits_are_reproducible_from_the_seed():
    a, _ = sources.discover(DataConfig(), seed=0)
    b, _ = sources.discover(DataConfig(), seed=0)
    c, _ = sources.discover(DataConfig(), seed=1)
    assert a == b and a != c


def test_imagefolder_without_split_folders_is_split_by_fraction(imagefolder: Path):
    cfg = DataConfig(source="imagefolder", root=str(imagefolder), val_fraction=0.2, test_fraction=0.2)
    items, classes = sources.discover(cfg, seed=0)
    assert classes == ["cat", "dog"]
    assert len(items) == 20 and all(n >= 2 for n in counts(items).values())  # each class in each split
    assert {it.id.split("/")[0] for it in items} == {"cat", "dog"}
    assert all(it.label == classes.index(it.id.split("/")[0]) for it in items)


def test_imagefolder_uses_its_own_split_folders_and_carves_a_missing_one(tmp_path: Path):
    root = tmp_path / "images"
    make_imagefolder(root / "train", per_class=10)
    make_imagefolder(root / "test", per_class=3, seed=1)
    cfg = DataConfig(source="imagefolder", root=str(root), val_fraction=0.2, test_fraction=0.2)
    items, classes = sources.discover(cfg, seed=0)
    assert classes == ["cat", "dog"]
    n = counts(items)
    assert n["test"] == 6 and n["train"] + n["val"] == 20 and n["val"] >= 2  # val only out of train/
    assert all(it.id.startswith("test/") for it in items if it.split == "test")
    assert all(it.id.startswith("train/") for it in items if it.split == "val")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_train_and_test_folders_of_two_images_a_class_carve_val_out_of_train(tmp_path: Path, seed: int):
    """Regression: carving val alone out of train/ demanded 3 images a class, as if test were carved too."""
    root = tmp_path / "images"
    make_imagefolder(root / "train", per_class=2)
    make_imagefolder(root / "test", per_class=1, seed=1)
    items, _ = sources.discover(DataConfig(source="imagefolder", root=str(root)), seed=seed)
    assert counts(items) == {"train": 2, "val": 2, "test": 2}  # one image of each class in each split
    assert all(it.id.startswith("train/") for it in items if it.split == "val")


def test_a_train_folder_too_small_to_carve_val_from_says_to_add_images_under_train(tmp_path: Path):
    root = tmp_path / "images"
    make_imagefolder(root / "train", per_class=1)
    make_imagefolder(root / "test", per_class=1, seed=1)
    with pytest.raises(PipelineError, match=r"Add images of class 'cat' under train/, or add a val/ folder"):
        sources.discover(DataConfig(source="imagefolder", root=str(root)), seed=0)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "1", "I;16", "CMYK"])
def test_imagefolder_reader_converts_every_mode_to_rgb(tmp_path: Path, mode: str):
    (tmp_path / "a").mkdir()
    ext = ".jpg" if mode == "CMYK" else ".png"
    color_image(np.random.default_rng(0), 1, size=10, mode=mode).save(tmp_path / "a" / f"x{ext}")
    image = sources.ImageReader(DataConfig(source="imagefolder", root=str(tmp_path)))(f"a/x{ext}")
    assert image.mode == "RGB" and image.size == (10, 10)


def test_imagefolder_reader_applies_exif_orientation(tmp_path: Path):
    (tmp_path / "a").mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    Image.new("RGB", (20, 10)).save(tmp_path / "a" / "r.jpg", exif=exif)
    image = sources.ImageReader(DataConfig(source="imagefolder", root=str(tmp_path)))("a/r.jpg")
    assert image.size == (10, 20)


def test_imagefolder_ignores_hidden_and_non_image_files(imagefolder: Path):
    (imagefolder / "cat" / "notes.txt").write_text("not an image")
    (imagefolder / ".thumbs").mkdir()
    (imagefolder / "cat" / ".hidden.png").write_bytes(b"")
    items, classes = sources.discover(DataConfig(source="imagefolder", root=str(imagefolder)), seed=0)
    assert classes == ["cat", "dog"] and len(items) == 20


def test_imagefolder_missing_root_is_a_clear_error(tmp_path: Path):
    with pytest.raises(PipelineError, match="is not a directory"):
        sources.discover(DataConfig(source="imagefolder", root=str(tmp_path / "nowhere")), seed=0)


def test_per_class_limit_keeps_n_training_images_per_class_only(imagefolder: Path):
    cfg = DataConfig(
        source="imagefolder", root=str(imagefolder), val_fraction=0.2, test_fraction=0.2, per_class_limit=2
    )
    items, _ = sources.discover(cfg, seed=0)
    train = collections.Counter(it.label for it in items if it.split == "train")
    assert train == {0: 2, 1: 2}
    whole, _ = sources.discover(DataConfig(source="imagefolder", root=str(imagefolder), val_fraction=0.2), seed=0)
    assert [it for it in items if it.split != "train"] == [it for it in whole if it.split != "train"]


def test_cifar10_reads_the_official_layout(tmp_path: Path):
    root = make_cifar(tmp_path / "cifar", per_batch=20)
    cfg = DataConfig(source="cifar10", root=str(root), val_fraction=0.2)
    items, classes = sources.discover(cfg, seed=0)
    assert classes[:2] == ["airplane", "automobile"] and len(classes) == 10
    n = counts(items)  # val from train; test is the official batch
    assert n["test"] == 20 and n["train"] + n["val"] == 100 and n["val"] >= 10
    assert all(it.id.startswith("test/") for it in items if it.split == "test")
    reader = sources.ImageReader(cfg)
    image = reader("train/00021")  # second batch, second image
    with open(root / "cifar-10-batches-py" / "data_batch_2", "rb") as f:
        raw = pickle.load(f)["data"][1]
    assert np.array_equal(np.asarray(image), raw.reshape(3, 32, 32).transpose(1, 2, 0))


def test_cifar10_without_files_says_how_to_get_them(tmp_path: Path):
    with pytest.raises(PipelineError, match="data.download: true"):
        sources.discover(DataConfig(source="cifar10", root=str(tmp_path)), seed=0)


def test_cifar10_reader_refuses_arbitrary_pickled_objects(tmp_path: Path):
    root = make_cifar(tmp_path / "cifar")
    with open(root / "cifar-10-batches-py" / "batches.meta", "wb") as f:
        pickle.dump({"label_names": collections.OrderedDict()}, f)
    with pytest.raises(PipelineError, match="refusing to load collections.OrderedDict"):
        sources.discover(DataConfig(source="cifar10", root=str(root)), seed=0)


def test_manifest_round_trips_ids_with_commas_and_unicode(tmp_path: Path):
    items = [sources.Item("caf\u00e9/a, b.png", 0, "train"), sources.Item("dog/x.png", 1, "test")]
    sources.write_manifest(tmp_path, items, ["caf\u00e9", "dog"])
    assert sources.read_manifest(tmp_path) == (items, ["caf\u00e9", "dog"])


def test_a_reader_given_content_keys_refuses_a_file_that_changed_since_it_was_listed(imagefolder: Path):
    cfg = DataConfig(source="imagefolder", root=str(imagefolder))
    items, _ = sources.discover(cfg, 0)
    keys = {it.id: it.key for it in items}
    reader = sources.ImageReader(cfg, keys=keys)
    assert reader("cat/000.png").size == sources.ImageReader(cfg)("cat/000.png").size
    (imagefolder / "cat" / "000.png").write_bytes((imagefolder / "cat" / "001.png").read_bytes())
    with pytest.raises(OSError, match="changed after the scan stage listed it"):
        reader("cat/000.png")


def test_a_file_pillow_cannot_identify_is_named_by_its_id_not_by_a_bytes_object(imagefolder: Path):
    """Regression: extract said `cannot identify image file <_io.BytesIO object at 0x…>`, read through the bytes
    it checks against the listed key."""
    (imagefolder / "cat" / "notes.jpg").write_text("not an image")
    cfg = DataConfig(source="imagefolder", root=str(imagefolder))
    keys = {"cat/notes.jpg": listing.content_hash((imagefolder / "cat" / "notes.jpg").read_bytes()).hexdigest()}
    for reader in (sources.ImageReader(cfg, keys=keys), sources.ImageReader(cfg)):
        with pytest.raises(UnidentifiedImageError) as caught:
            reader("cat/notes.jpg")
        assert str(caught.value) == "cannot identify image file 'cat/notes.jpg'"


def test_a_class_whose_every_image_was_left_out_is_named_in_one_line():
    """A class folder with a refused name (not UTF-8, a control character) leaves a class with no usable image."""
    from pipeline.listing import Entry

    entries = [Entry(f"{c}/{i}.png", f"{c}{i}".ljust(32, "0"), "") for c in ("a", "b", "c\\x0d") for i in range(3)]
    bad = frozenset(e.id for e in entries if e.id.startswith("c"))
    with pytest.raises(PipelineError, match=r"class 'c\\x0d' has no usable image: each was left out"):
        sources.discover(DataConfig(source="imagefolder"), 0, entries, exclude=bad)
