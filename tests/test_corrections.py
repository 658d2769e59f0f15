"""The corrections file: reading and checking its rows, and dropping and relabelling images by content key."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from pipeline import corrections
from pipeline.corrections import Correction
from pipeline.errors import PipelineError
from pipeline.sources import Item

HEADER = "key,action,label,note\n"
CLASSES = ["cat", "dog", "owl"]


def key(n: int) -> str:
    return f"{n:032x}"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "corrections.csv"
    path.write_text(text)
    return path


def items() -> list[Item]:
    """Two images of each class in each split; ``cat/same.png`` has the bytes of ``cat/0.png`` (the same key)."""
    made = [
        Item(f"{name}/{split}{i}.png", label, split, key(10 * label + 3 * s + i))
        for label, name in enumerate(CLASSES)
        for s, split in enumerate(("train", "val", "test"))
        for i in range(2)
    ]
    return [*made, Item("cat/same.png", 0, "val", made[0].key)]


def fix(n: int, action: str = "drop", label: str = "", line: int = 2) -> Correction:
    return Correction(key(n), action, label, note=f"image {n}", line=line)


def test_read_takes_rows_in_any_column_order_and_skips_blank_lines(tmp_path: Path):
    path = write(
        tmp_path, f'note,key,label,action\n\ncat/0.png,{key(1).upper()},,drop\n,,,\n"a, b",{key(2)},dog,relabel\n'
    )
    assert corrections.read(path) == [
        Correction(key(1), "drop", "", "cat/0.png", 3),  # keys are compared in lower case, as the manifest has them
        Correction(key(2), "relabel", "dog", "a, b", 5),
    ]


@pytest.mark.parametrize("text", ["", HEADER, HEADER + "\n\n"])
def test_an_empty_file_or_a_header_alone_means_no_corrections(tmp_path: Path, text: str):
    assert corrections.read(write(tmp_path, text)) == []


def test_a_missing_file_means_no_corrections(tmp_path: Path):
    assert corrections.read(tmp_path / "absent.csv") == []


@pytest.mark.parametrize(
    "text, message",
    [
        ("key,action,label,note,by\n", "has the columns key,action,label,note,by: expected key,action,label,note"),
        ("key,action,label\n", "has the columns key,action,label: expected key,action,label,note"),
        (HEADER + f"{key(1)},remove,,\n", "line 2: unknown action 'remove': expected drop or relabel"),
        (HEADER + f"{key(1)},relabel,,\n", "line 2: relabel without a label: put the class name in the label column"),
        (HEADER + f"{key(1)},drop,cat,\n", "line 2: drop with a label ('cat'): empty the label, or set the action"),
        (HEADER + "cat/0.png,drop,,\n", "line 2: key 'cat/0.png' is not 32 hex digits: copy the image's key from"),
        (HEADER + f"{key(1)[:-1]}g,drop,,\n", "is not 32 hex digits"),
        (HEADER + f"{key(1)},drop,,\n\n{key(1)},relabel,dog,\n", "line 4: key 0000"),
        (HEADER + f"{key(1)},drop,,a,b\n", "line 2: more than 4 fields: quote a note that has commas"),
    ],
)
def test_a_bad_file_is_refused_in_one_line_naming_the_file_and_the_line(tmp_path: Path, text: str, message: str):
    path = write(tmp_path, text)
    with pytest.raises(PipelineError) as err:
        corrections.read(path)
    assert str(err.value).startswith(str(path)) and message in str(err.value)
    assert "\n" not in str(err.value)


def test_the_key_length_is_that_of_a_content_key():
    from pipeline import listing

    assert corrections.KEY_CHARS == len(listing.content_hash(b"x").hexdigest()) == 32


def test_drop_removes_every_image_with_the_key_and_relabel_keeps_the_split():
    before = items()
    after, counts = corrections.apply(before, CLASSES, [fix(0), fix(14, "relabel", "owl", line=3)])
    ids = {it.id: it for it in after}
    assert "cat/train0.png" not in ids and "cat/same.png" not in ids  # two ids, one key: both go
    assert ids["dog/val1.png"] == Item("dog/val1.png", 2, "val", key(14))  # owl now, still in val
    assert len(after) == len(before) - 2
    assert counts == {"dropped": 2, "relabeled": 1, "stale": 0}


def test_relabel_changes_every_image_with_the_key_and_counts_only_those_it_changes():
    after, counts = corrections.apply(items(), CLASSES, [fix(0, "relabel", "dog"), fix(1, "relabel", "cat", line=3)])
    assert {it.id: (it.label, it.split) for it in after if it.key == key(0)} == {
        "cat/train0.png": (1, "train"),
        "cat/same.png": (1, "val"),
    }
    assert counts == {"dropped": 0, "relabeled": 2, "stale": 0}  # cat/train1.png was a cat already


def test_a_row_that_matches_no_image_is_counted_stale_and_logged_with_its_note(caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.WARNING, logger="pipeline.corrections"):
        after, counts = corrections.apply(items(), CLASSES, [fix(99, line=7)])
    assert after == items() and counts == {"dropped": 0, "relabeled": 0, "stale": 1}
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith("correction on line 7 (drop, note 'image 99') matches no image")


@pytest.mark.parametrize(
    "label, message",
    [
        ("dgo", "correction on line 2 relabels to 'dgo', which is no class: did you mean 'dog'?"),
        ("zebra", "correction on line 2 relabels to 'zebra', which is no class: the classes are 'cat', 'dog', 'owl'"),
    ],
)
def test_relabel_to_an_unknown_class_is_refused_with_close_matches(label: str, message: str):
    with pytest.raises(PipelineError) as err:
        corrections.apply(items(), CLASSES, [fix(0, "relabel", label)])
    assert str(err.value) == message


def test_corrections_that_empty_a_split_of_a_class_are_refused_naming_both():
    rows = [fix(26, line=4), fix(27, "relabel", "cat", line=9)]  # both owl test images
    with pytest.raises(PipelineError) as err:
        corrections.apply(items(), CLASSES, rows)
    assert str(err.value) == (
        "dropping and relabelling (corrections on lines 4, 9) leaves class 'owl' with no test image: every class "
        "needs images in every split; remove one of those rows, or add test images of 'owl'"
    )
