"""torchvision's other classification models: their weights from the torch hub cache or a file, offline errors,
and where the layers are cut."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models import ResNet18_Weights

from pipeline import backbones
from pipeline.backbones import zoo
from pipeline.config import ExtractConfig
from pipeline.errors import PipelineError
from tests.conftest import cached_hub_weights

CFG = ExtractConfig(arch="resnet18", weights="random", image_size=32)


def test_imagenet_weights_are_the_default_enum_taken_from_the_torch_hub_cache(tmp_path: Path, monkeypatch):
    state = cached_hub_weights(monkeypatch, tmp_path, torchvision.models.resnet18, ResNet18_Weights.DEFAULT.url)
    model, _, info = backbones.build_extractor(dataclasses.replace(CFG, weights="imagenet"), seed=0)
    conv1 = dict(model.named_parameters())["body.graph.conv1.weight"]
    torch.testing.assert_close(conv1, state["conv1.weight"], rtol=0, atol=0)
    assert (info["weights"], info["weights_source"]) == ("imagenet", "ResNet18_Weights.IMAGENET1K_V1")


def test_imagenet_weights_offline_fail_fast_with_one_line_that_says_where_the_file_goes(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache; downloads go to a refused loopback proxy
    start = time.monotonic()
    with pytest.raises(PipelineError) as err:
        backbones.build_extractor(dataclasses.replace(CFG, arch="convnext_tiny", weights="imagenet"), seed=0)
    assert time.monotonic() - start < 30
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "hub" / "checkpoints") in message
    assert Path(torchvision.models.ConvNeXt_Tiny_Weights.DEFAULT.url).name in message


def test_weights_from_a_state_dict_file_are_loaded_and_recorded_by_content(tmp_path: Path):
    path = tmp_path / "finetuned.pth"
    torch.manual_seed(7)
    state = torchvision.models.resnet18().state_dict()
    torch.save(state, path)
    model, _, info = backbones.build_extractor(dataclasses.replace(CFG, weights=str(path)), seed=0)
    conv1 = dict(model.named_parameters())["body.graph.conv1.weight"]
    torch.testing.assert_close(conv1, state["conv1.weight"], rtol=0, atol=0)
    assert info["weights_source"].startswith("file finetuned.pth sha256:")
    torch.save({"conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(PipelineError, match="does not fit resnet18"):
        backbones.build_extractor(dataclasses.replace(CFG, weights=str(path)), seed=0)


@pytest.mark.parametrize(
    ("arch", "stages"),
    [("resnet50", {"stage1": "layer1", "stage4": "layer4"}),
     ("convnext_tiny", {"stage1": "features.2.0", "stage4": "features.7"}),  # 2.0: the downsampling's norm
     ("densenet121", {"stage1": "features.transition1.conv", "stage4": "relu"}),  # relu: after norm5
     ("efficientnet_b0", {"stage1": "features.3.0.block.0", "stage4": "features.8"})],  # block.0: the expansion
)  # fmt: skip
def test_a_stage_is_the_last_map_at_its_stride_that_all_later_nodes_depend_on(arch: str, stages: dict[str, str]):
    nodes = zoo.graph(arch).nodes
    assert all(nodes[layer].startswith(block) for layer, block in stages.items()), nodes


def test_nothing_past_the_cut_is_kept():
    model, _, _ = backbones.build_extractor(dataclasses.replace(CFG, layer="stage2"), seed=0)
    names = {name.split(".")[2] for name, _ in model.named_parameters()}
    assert names == {"conv1", "bn1", "layer1", "layer2"}  # no layer3, layer4 or fc
