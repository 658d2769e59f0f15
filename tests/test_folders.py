"""What the top folders of an image folder are, whatever the classes are called."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import folders
from pipeline.errors import PipelineError
from tests.conftest import make_imagefolder


@pytest.mark.parametrize(
    ("tops", "spec", "expected"),
    [
        (["car", "train"], "classes", "classes"),  # PASCAL VOC's class "train"
        (["train", "val"], "auto", "splits"),
        (["bus", "car"], "auto", "classes"),
        (["test", "train"], "splits", "splits"),
        (["train", "val"], "classes", "classes"),
    ],
)
def test_the_layout_is_what_the_user_says_or_what_the_names_leave_no_doubt_about(tops, spec, expected):
    assert folders.layout(Path("raw"), spec, tops) == expected


@pytest.mark.parametrize(
    ("tops", "spec", "message"),
    [
        (
            ["bus", "car", "train"],
            "auto",
            r"split folders \(train\) beside other folders \(bus, car\): set data.layout",
        ),
        (["bus", "train"], "splits", r"folders other than train/ val/ test/ \(bus\)"),
        (["test", "val"], "auto", "no train/ folder"),
    ],
)
def test_an_ambiguous_or_wrong_layout_is_refused_in_one_line(tops, spec, message):
    with pytest.raises(PipelineError, match=message):
        folders.layout(Path("raw"), spec, tops)


def test_a_class_called_train_is_a_class_under_layout_classes(tmp_path: Path):
    """Regression: flat raw/{train,car,bus}/ failed with "no class folders"; with train/ holding subfolders, those
    silently became the classes and car/ and bus/ were dropped."""
    root = make_imagefolder(tmp_path / "flat", classes=("bus", "car", "train"), per_class=3)
    with pytest.raises(PipelineError, match="set data.layout: classes if train is a class"):
        folders.imagefolder_ids(root)
    assert {i.split("/")[0] for i in folders.imagefolder_ids(root, "classes")} == {"bus", "car", "train"}
    make_imagefolder(root / "train", classes=("x", "y"), per_class=2)  # train/ with subfolders of its own
    with pytest.raises(PipelineError, match="split folders"):
        folders.imagefolder_ids(root)


@pytest.mark.parametrize(
    ("source", "download", "message"),
    [
        ("imagefolder", False, "put the images there, one folder per class"),
        ("cifar10", False, "put cifar-10-batches-py/ there, or set data.download: true"),
        ("cifar10", True, None),  # prepare downloads it there
        ("digits", False, None),  # bundled: no root is read
    ],
)
def test_a_root_that_does_not_exist_is_said_first_where_the_source_reads_one(tmp_path: Path, source, download, message):
    missing = tmp_path / "raww"
    if message is None:
        folders.check_root(source, missing, download=download)
        return
    with pytest.raises(PipelineError) as caught:
        folders.check_root(source, missing, download=download)
    said = f"data.root = '{missing}' does not exist (no {missing}): fix data.root in params.yaml, or {message}"
    assert str(caught.value) == said
