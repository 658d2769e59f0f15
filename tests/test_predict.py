"""predict and export against what the pipeline computed: one real dvc run shared by the tests here."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import features, heads, sources
from tests.conftest import run, stage_main


@pytest.fixture(scope="session")
def trained(reproduced_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's project on a generated image folder, with exact (fp32, float32) features, in a copy."""
    return Path(shutil.copytree(reproduced_template, tmp_path_factory.mktemp("predict") / "project", symlinks=True))


def images_of_test_split(project: Path) -> list[str]:
    items, _ = sources.read_manifest(project / "data" / "prepared")
    return [f"data/raw/{it.id}" for it in items if it.split == "test"]


def cached_probabilities(project: Path) -> np.ndarray:
    """What evaluate computes from the cached test features."""
    head, _ = heads.load_head(project / "models" / "head.pt")
    x = torch.from_numpy(features.read_features(project / "data" / "features" / "test.h5").features["original"])
    return torch.softmax(heads.predict_logits(head, x), 1).numpy()


def read_predictions(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_matches_evaluate_and_reports_bad_files(trained: Path):
    images = images_of_test_split(trained)
    (trained / "notes.jpg").write_text("not an image")
    os.mkfifo(trained / "pipe.jpg")  # regression: a FIFO named like an image blocked predict for good
    args = [*images, "notes.jpg", "pipe.jpg", "--out", "predictions.csv"]
    result = run(trained, "timeout", "120", "python", "-m", "pipeline.predict", *args)
    assert f"2 of {len(images) + 2} files could not be read" in result.stderr
    rows = read_predictions(trained / "predictions.csv")
    assert [r["path"] for r in rows] == [*images, "notes.jpg", "pipe.jpg"]
    assert rows[-2]["error"].startswith("UnidentifiedImageError") and rows[-2]["class_1"] == ""
    assert rows[-1]["error"] == "OSError: not a regular file: pipe.jpg"
    probs = cached_probabilities(trained)
    names = ["cat", "dog", "owl"]
    for row, p in zip(rows[:-2], probs, strict=True):
        assert row["error"] == ""
        for i in range(1, 4):
            assert float(row[f"prob_{i}"]) == pytest.approx(p[names.index(row[f"class_{i}"])], abs=1e-4)
    assert "cat" in result.stdout and "error: UnidentifiedImageError" in result.stdout


def test_predict_takes_folders(trained: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    """The command's main() in this process (the test above runs the command)."""
    monkeypatch.chdir(trained)
    stage_main(monkeypatch, "predict", "data/raw/owl", "--top-k", "1")
    assert capsys.readouterr().out.count("data/raw/owl/") == 10


@pytest.fixture(scope="session")
def exported(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`python -m pipeline.export` of the trained head: model.pt2 and model.json."""
    out = tmp_path_factory.mktemp("export") / "export"
    run(trained, "python", "-m", "pipeline.export", "--out", str(out))
    return out


def test_the_exported_model_is_frozen_and_runs_without_warnings(exported: Path):
    """Regression: the program kept the head's parameters trainable, so its probabilities required grad."""
    size = json.loads((exported / "model.json").read_text())["preprocessing"]["crop_size"]
    crops = torch.randint(0, 256, (3, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        program = torch.export.load(exported / "model.pt2").module()
        probs = program(crops)
    assert not probs.requires_grad and not any(p.requires_grad for p in program.parameters())
    torch.testing.assert_close(probs.sum(1), torch.ones(3))


def test_export_runs_in_a_fresh_process_without_this_package(trained: Path, exported: Path, tmp_path: Path):
    meta = json.loads((exported / "model.json").read_text())
    assert meta["class_names"] == ["cat", "dog", "owl"]
    images = [str(trained / p) for p in images_of_test_split(trained)]
    script = """
import sys
sys.modules["pipeline"] = None  # any import of this package now fails: the model must stand alone
import json, torch
from PIL import Image
from torchvision.transforms import functional as F
meta = json.load(open(sys.argv[1] + "/model.json"))
pre = meta["preprocessing"]
program = torch.export.load(sys.argv[1] + "/model.pt2").module()
crops = []
for path in sys.argv[2:]:
    image = Image.open(path).convert("RGB")
    mode = F.InterpolationMode(pre["interpolation"])
    image = F.resize(image, [pre["resize_size"]], interpolation=mode, antialias=True)
    crops.append(F.pil_to_tensor(F.center_crop(image, [pre["crop_size"]])))
print(json.dumps(program(torch.stack(crops)).tolist()))
"""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", script, str(exported), *images], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=True)  # fmt: skip
    np.testing.assert_allclose(np.array(json.loads(out.stdout)), cached_probabilities(trained), atol=1e-4)
