"""timm's models: pretrained weights from the Hugging Face cache, offline errors, and a missing timm."""

from __future__ import annotations

import builtins
import dataclasses
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from pipeline import backbones
from pipeline.config import ExtractConfig
from pipeline.errors import PipelineError

CFG = ExtractConfig(arch="timm/test_vit", weights="random", image_size="auto")


def test_pretrained_weights_are_taken_from_the_hugging_face_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A file placed where huggingface_hub caches timm/test_vit.r160_in1k is used, with no network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "hub" / "models--timm--test_vit.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    torch.manual_seed(123)
    state = timm.create_model("test_vit").state_dict()
    save_file(state, repo / "snapshots" / ("0" * 40) / "model.safetensors")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    model, _, info = backbones.build_extractor(dataclasses.replace(CFG, weights="imagenet"), seed=0)
    got = dict(model.named_parameters())["body.model.patch_embed.proj.weight"]
    torch.testing.assert_close(got, state["patch_embed.proj.weight"], rtol=0, atol=0)
    assert (info["weights"], info["weights_source"]) == ("imagenet", "timm timm/test_vit.r160_in1k")
    assert info["timm_version"] == timm.__version__


def test_pretrained_weights_offline_fail_fast_with_one_line_that_says_where_they_go(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    start = time.monotonic()
    with pytest.raises(PipelineError) as err:
        backbones.build_extractor(dataclasses.replace(CFG, weights="imagenet"), seed=0)
    assert time.monotonic() - start < 30
    message = str(err.value)
    assert "\n" not in message and "models--timm--test_vit.r160_in1k" in message
    assert "huggingface-cli download timm/test_vit.r160_in1k" in message and "extract.weights: random" in message


def test_without_timm_a_timm_arch_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch):
    real_import = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm" or name.startswith("timm."):
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(PipelineError, match=r"timm is not installed: pip install -e '\.\[timm\]'"):
        backbones.build_extractor(CFG, seed=0)


def test_a_state_dict_file_is_loaded_through_timm(tmp_path: Path):
    torch.manual_seed(5)
    state = timm.create_model("test_vit").state_dict()
    torch.save(state, tmp_path / "w.pth")
    model, _, info = backbones.build_extractor(dataclasses.replace(CFG, weights=str(tmp_path / "w.pth")), seed=0)
    got = dict(model.named_parameters())["body.model.patch_embed.proj.weight"]
    torch.testing.assert_close(got, state["patch_embed.proj.weight"], rtol=0, atol=0)
    assert info["weights_source"].startswith("file w.pth sha256:")
