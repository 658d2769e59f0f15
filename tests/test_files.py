from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.files import replaced


def test_a_completed_write_takes_the_place_of_the_old_output(tmp_path: Path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with replaced(tmp_path / "out") as tmp:
        tmp.mkdir()
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_failed_write_leaves_neither_a_partial_file_nor_a_changed_one(tmp_path: Path):
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(KeyboardInterrupt), replaced(tmp_path / "metrics.json") as tmp:
        tmp.write_text('{"half": ')
        raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    assert (tmp_path / "metrics.json").read_text() == "{}"
