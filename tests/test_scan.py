"""The scan stage's check of the backbone settings: run when they change, remembered when they pass."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from pipeline import backbones, scan
from pipeline.config import ExtractConfig
from pipeline.errors import PipelineError


def test_the_backbone_check_runs_again_only_when_its_settings_or_the_weights_file_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    calls = []
    real = backbones.check
    monkeypatch.setattr(backbones, "check", lambda cfg: calls.append(cfg) or real(cfg))  # counts, then checks
    weights, passed = tmp_path / "w.pth", tmp_path / ".images-backbone.json"
    torch.save({}, weights)
    cfg = ExtractConfig(arch="vgg11", weights=str(weights))
    scan.check_backbone(cfg, passed)
    scan.check_backbone(cfg, passed)
    assert len(calls) == 1
    scan.check_backbone(dataclasses.replace(cfg, layer="fc7"), passed)
    assert len(calls) == 2
    weights.unlink()
    with pytest.raises(PipelineError, match=r"is not valid: expected imagenet \| random"):
        scan.check_backbone(dataclasses.replace(cfg, layer="fc7"), passed)
