from __future__ import annotations

import collections

import numpy as np
import pytest

from pipeline import splits
from pipeline.errors import PipelineError


def folder(n: int, classes: int = 4, start: int = 0) -> tuple[list[str], list[str]]:
    ids = [f"c{i % classes}/{i:06d}.jpg" for i in range(start, start + n)]
    return ids, [i.split("/")[0] for i in ids]


def assign(ids: list[str], names: list[str], seed: int = 0) -> dict[str, str]:
    got = splits.assign(ids, names, val_fraction=0.1, test_fraction=0.2, seed=seed)
    return dict(zip(ids, got, strict=True))


def test_adding_or_removing_images_moves_no_other_image():
    ids, names = folder(2000)
    before = assign(ids, names)
    more_ids, more_names = folder(2100)  # 100 more, 5%
    after = assign(more_ids, more_names)
    assert all(after[i] == s for i, s in before.items())
    fewer = assign(ids[::2], names[::2])  # half of them gone
    assert all(before[i] == s for i, s in fewer.items())


def test_each_class_gets_close_to_the_fractions():
    ids, names = folder(4000)
    got = assign(ids, names)
    for c in {*names}:
        share = collections.Counter(s for i, s in got.items() if i.startswith(c + "/"))
        # 1,000 images a class: binomial standard deviations of 12.6 (test) and 9.5 (val) images
        assert abs(share["test"] - 200) < 4 * 12.6 and abs(share["val"] - 100) < 4 * 9.5


def test_a_split_depends_on_the_seed_and_on_nothing_else_of_the_folder():
    ids, names = folder(400)
    a, b = assign(ids, names, seed=0), assign(ids, names, seed=1)
    assert a == assign(list(reversed(ids)), list(reversed(names)), seed=0)
    assert sum(a[i] != b[i] for i in ids) > 100


@pytest.mark.parametrize("n", [3, 4, 6])
def test_a_small_class_still_has_one_image_in_every_split(n: int):
    ids, names = folder(n, classes=1)
    got = collections.Counter(assign(ids, names).values())
    assert got["train"] >= 1 and got["val"] >= 1 and got["test"] >= 1


@pytest.mark.parametrize(("val", "test"), [(0.1, 0.2), (0.3, 0.3), (0.0, 0.2), (0.45, 0.45)])
def test_every_split_of_every_small_class_has_an_image_whatever_the_seed(val: float, test: float):
    """Regression: the only train image of a class could stand in for val or test (3 images, seed 7), and a class
    with no train image crashed with min() of an empty sequence."""
    needed = {"train", "test"} | ({"val"} if val else set())
    sizes = range(len(needed), 9)
    ids = [f"c{n}/{i}.jpg" for n in sizes for i in range(n)]
    names = [i.split("/")[0] for i in ids]
    for seed in range(300):
        got = splits.assign(ids, names, val_fraction=val, test_fraction=test, seed=seed)
        per_class = collections.defaultdict(set)
        for name, split in zip(names, got, strict=True):
            per_class[name].add(split)
        assert all(found == needed for found in per_class.values()), (seed, dict(per_class))


@pytest.mark.parametrize("seed", [3, 8])  # 3: its only train image stood in for val; 8: a crash, no train image at all
def test_a_three_image_class_keeps_one_train_image(seed: int):
    ids, names = folder(3, classes=1)
    assert sorted(assign(ids, names, seed=seed).values()) == ["test", "train", "val"]


def test_a_growing_small_class_moves_only_stand_ins():
    """Adding images to a class never moves an image that hashed into its split by itself."""
    for seed in range(200):
        ids, names = folder(3, classes=1)
        before = assign(ids, names, seed=seed)
        natural = {i for i, s in before.items() if _band(splits.position("c0", i, seed)) == s}
        after = assign(*folder(12, classes=1), seed=seed)
        assert all(after[i] == before[i] for i in natural), seed


def _band(u: float) -> str:
    return "test" if u < 0.2 else "val" if u < 0.3 else "train"


def test_a_class_too_small_for_three_splits_is_a_clear_error():
    ids, names = folder(2, classes=1)
    with pytest.raises(PipelineError, match="class 'c0' has 2 image.*train, test, val needs at least 3"):
        assign(ids, names)


@pytest.mark.parametrize("n", [2, 3, 4, 12])
def test_carving_val_alone_needs_two_images_a_class_and_keeps_the_val_band(n: int):
    """Regression: carving val out of train/ demanded a test image too (3 a class) though test had its folder."""
    ids, names = folder(n, classes=1)
    for seed in range(50):
        got = splits.assign(ids, names, val_fraction=0.1, test_fraction=0.2, seed=seed, carve=("val",))
        assert sorted(set(got)) == ["train", "val"], seed
        in_val = [_band(splits.position("c0", i, seed)) == "val" for i in ids]
        if any(in_val) and not all(in_val):  # else an image stands in for the empty split
            assert [s == "val" for s in got] == in_val, seed  # the val band's images only: the test band's stay train


@pytest.mark.parametrize(
    ("n", "carve", "hint"),
    [
        (2, None, r"splitting it into train, test, val needs at least 3\. Add images, or give explicit train/ val/"),
        (1, ("val",), r"carving val out of train/ needs at least 2 \(train, val\)\. Add images of class 'c0' under "
         r"train/, or add a val/ folder"),
        (2, ("val", "test"), r"carving test and val out of train/ needs at least 3 \(train, test, val\)\. Add images "
         r"of class 'c0' under train/, or add test/ and val/ folders"),
    ],
)  # fmt: skip
def test_a_class_too_small_to_split_or_carve_gets_the_fitting_hint(n: int, carve: tuple[str, ...], hint: str):
    ids, names = folder(n, classes=1)
    with pytest.raises(PipelineError, match=f"class 'c0' has {n} image\\(s\\)[^:]*: {hint}"):
        splits.assign(ids, names, val_fraction=0.1, test_fraction=0.2, seed=0, carve=carve)


def test_positions_are_uniform():
    ids, names = folder(20000)
    u = np.array([splits.position(c, i, 0) for i, c in zip(ids, names, strict=True)])
    assert u.min() >= 0 and u.max() < 1
    assert np.allclose(np.histogram(u, bins=10, range=(0, 1))[0] / len(u), 0.1, atol=0.01)


def test_a_per_class_subset_changes_by_at_most_one_image_when_one_is_added():
    ids, names = folder(400)
    before = splits.keep_per_class(ids, names, 5, seed=0)
    after = splits.keep_per_class(*folder(401), 5, seed=0)
    assert len(before) == len(after) == 20 and len(before - after) <= 1
