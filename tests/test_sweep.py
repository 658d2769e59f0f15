"""Real `dvc repro` over backbones in one project: each family extracts, trains, evaluates (with its k-NN
accuracy), predicts and exports; switching back to a backbone reuses its rows."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import features
from pipeline.backbones.base import Preprocessing
from pipeline.images import open_image
from tests.conftest import run, write_params

# (arch, image_size): CNNs of two more families, torchvision's ViT and a timm ViT (random weights, on the CPU)
SWEEPS = {"cnn": [("resnet50", 32), ("efficientnet_b0", 32)], "vit": [("vit_b_16", "auto"), ("timm/test_vit", "auto")]}
BARE = """
import json, sys, torch
program = torch.export.load(sys.argv[1] + "/model.pt2").module()
print(json.dumps(program(torch.load(sys.argv[2])).tolist()))
"""


def repro(project: Path, arch: str, size: int | str) -> list[str]:
    write_params(project, {"extract": {"arch": arch, "image_size": size}})
    return re.findall(r"Running stage '(\w+)'", run(project, "dvc", "repro").stdout)


def exported_gives_predicts_probabilities(project: Path, out: Path, predictions: Path) -> None:
    """The exported program, loaded with torch alone in an isolated interpreter, on crops made as model.json
    says, gives the probabilities that `python -m pipeline.predict` wrote."""
    with open(predictions, newline="") as f:
        rows = list(csv.DictReader(f))
    prep = json.loads((out / "model.json").read_text())["preprocessing"]
    prep = Preprocessing(**{k: prep[k] for k in ("resize_size", "crop_size", "interpolation")},
                         mean=tuple(prep["mean"]), std=tuple(prep["std"]))  # fmt: skip
    torch.save(torch.stack([prep.to_uint8(open_image(project / r["path"])) for r in rows]), out / "crops.pt")
    bare = subprocess.run(
        [sys.executable, "-I", "-c", BARE, str(out), str(out / "crops.pt")], capture_output=True, text=True, check=True
    )
    got = torch.tensor(json.loads(bare.stdout)).sort(dim=1, descending=True).values
    want = torch.tensor([[float(r[f"prob_{i}"]) for i in range(1, got.shape[1] + 1)] for r in rows])
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)  # predict writes 6 decimals


@pytest.mark.parametrize("family", list(SWEEPS))
def test_a_sweep_over_backbones_runs_every_family_through_and_back(reproduced: Path, family: str):
    for arch, size in SWEEPS[family]:
        assert repro(reproduced, arch, size) == ["scan", "extract", "train", "evaluate"], arch
        prov = features.read_provenance(reproduced / "data" / "features" / "train.h5")
        assert (prov["arch"], prov["layer"], prov["pool"]) == (arch, "penultimate", "flatten")
        metrics = json.loads((reproduced / "reports" / "evaluate" / "metrics.json").read_text())
        assert 0 <= metrics["knn_acc"] <= 1 and 0 <= metrics["accuracy"] <= 1, (arch, metrics)
        out = reproduced / "models" / f"export-{arch.replace('/', '-')}"
        run(reproduced, "python", "-m", "pipeline.predict", "data/raw/owl", "--out", "predictions.csv")
        run(reproduced, "python", "-m", "pipeline.export", "--out", str(out))
        exported_gives_predicts_probabilities(reproduced, out, reproduced / "predictions.csv")
    assert '"knn_acc"' in run(reproduced, "dvc", "exp", "show", "--json").stdout
    # back to the project's VGG: its features come back from DVC's run cache, and its rows are still kept
    assert repro(reproduced, "vgg11", 32) == ["scan", "train", "evaluate"]
    run(reproduced, "python", "-m", "pipeline.extract")
    extracted = json.loads((reproduced / "reports" / "extract" / "metrics.json").read_text())
    assert (extracted["extracted"], extracted["reused"]) == (0, 30)
