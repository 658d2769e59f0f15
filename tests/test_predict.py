"""predict and export against what the pipeline computed: one real dvc run shared by the tests here."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import features, heads, sources
from tests.conftest import copy_project, git, make_imagefolder, run, write_params


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project on a generated image folder, run through dvc repro with exact (fp32, float32) features."""
    project = copy_project(tmp_path_factory.mktemp("predict") / "project")
    make_imagefolder(project / "data" / "raw", classes=("cat", "dog", "owl"), per_class=10)
    write_params(project, {"data": {"source": "imagefolder", "val_fraction": 0.2, "test_fraction": 0.3}})
    write_params(project, {"extract": {"precision": "fp32", "storage_dtype": "float32"}})
    git(project, "add", "-A")
    git(project, "commit", "-qm", "images")
    run(project, "dvc", "repro")
    return project


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
    result = run(trained, "python", "-m", "pipeline.predict", *images, "notes.jpg", "--out", "predictions.csv")
    assert "1 of 10 files could not be read" in result.stderr
    rows = read_predictions(trained / "predictions.csv")
    assert [r["path"] for r in rows] == [*images, "notes.jpg"]
    assert rows[-1]["error"].startswith("UnidentifiedImageError") and rows[-1]["class_1"] == ""
    probs = cached_probabilities(trained)
    names = ["cat", "dog", "owl"]
    for row, p in zip(rows[:-1], probs, strict=True):
        assert row["error"] == ""
        for i in range(1, 4):
            assert float(row[f"prob_{i}"]) == pytest.approx(p[names.index(row[f"class_{i}"])], abs=1e-4)
    assert "cat" in result.stdout and "error: UnidentifiedImageError" in result.stdout


def test_predict_takes_folders(trained: Path):
    result = run(trained, "python", "-m", "pipeline.predict", "data/raw/owl", "--top-k", "1")
    assert result.stdout.count("data/raw/owl/") == 10


def test_export_runs_in_a_fresh_process_without_this_package(trained: Path, tmp_path: Path):
    run(trained, "python", "-m", "pipeline.export", "--out", str(tmp_path / "export"))
    meta = json.loads((tmp_path / "export" / "model.json").read_text())
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
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "export"), *images], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=True)  # fmt: skip
    np.testing.assert_allclose(np.array(json.loads(out.stdout)), cached_probabilities(trained), atol=1e-4)


def test_plots_cover_counts_normalised_curves_and_the_worst_images(trained: Path):
    shown = json.loads(run(trained, "dvc", "plots", "show", "--json").stdout)
    assert "errors" not in shown
    names = " ".join(shown["data"])
    for expected in ("confusion_matrix.json", "confusion_normalized", "roc.json", "precision_recall.json",
                     "worst_test_images.png", "loss.tsv"):  # fmt: skip
        assert expected in names, expected
    run(trained, "dvc", "plots", "show", "-o", "html")
    page = (trained / "html" / "index.html").read_text()
    assert page.count("vegaEmbed") >= 8 and "worst_test_images.png" in page  # every plot rendered on the page
    from PIL import Image

    sheet = Image.open(trained / "reports" / "evaluate" / "plots" / "images" / "worst_test_images.png")
    assert sheet.size == (4 * 128, 3 * (128 + 14))  # 9 test images: 3 rows of 4
