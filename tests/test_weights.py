"""The one weight loader: fine-tuned heads of any size in every family, features equal to each library's own model
built with the file and its own preprocessing; checkpoints as training scripts save them; refusals in one line."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import pytest
import timm
import timm.data
import torch
import torchvision
from PIL import Image
from torch import nn

from pipeline import backbones
from pipeline.config import ExtractConfig
from pipeline.errors import PipelineError
from pipeline.images import open_image

RANDOM = ExtractConfig(weights="random", image_size="auto")


def ours(weights: Path, paths: list[Path], **changes) -> torch.Tensor:
    cfg = dataclasses.replace(RANDOM, weights=str(weights), **changes)
    extractor, prep, info = backbones.build_extractor(cfg, seed=0)
    assert info["weights_source"].startswith(f"file {weights.name} sha256:")
    with torch.inference_mode():
        return extractor(torch.stack([prep.to_uint8(open_image(p)) for p in paths]))


def torchvision_input(arch: str, paths: list[Path], **sizes: int) -> torch.Tensor:
    preset = torchvision.models.get_model_weights(arch).DEFAULT.transforms(**sizes)
    return torch.stack([preset(Image.open(p).convert("RGB")) for p in paths])


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.fixture(scope="session")
def two_way_vgg(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    """A VGG11 fine-tuned (random here) on two classes, and its state dict as a file (507 MB, made once)."""
    torch.manual_seed(3)
    model = torchvision.models.vgg11(num_classes=2).eval()
    torch.save(model.state_dict(), path := tmp_path_factory.mktemp("two-way") / "cats-dogs.pth")
    return model, path


@pytest.mark.parametrize("layer", ["pool5", "fc7"])
def test_a_vgg_fine_tuned_on_two_classes_gives_torchvision_s_features(two_way_vgg, pngs: list[Path], layer: str):
    """Regression: the 2-way classifier.6 of a fine-tuned VGG was refused ("size mismatch … does not fit")."""
    model, path = two_way_vgg
    got = ours(path, pngs, arch="vgg11", layer=layer, image_size=64)
    with torch.inference_mode():
        x = model.features(torchvision_input("vgg11", pngs, crop_size=64, resize_size=73))
        want = x.mean((2, 3)) if layer == "pool5" else model.classifier[:5](torch.flatten(model.avgpool(x), 1))
    assert relative_error(got, want) < 1e-5


def test_a_resnet_checkpoint_of_ten_classes_from_ddp_gives_torchvision_s_features(tmp_path: Path, pngs: list[Path]):
    """Regression: a 10-class fc was refused, and so was a checkpoint dict with DDP's `module.` keys."""
    torch.manual_seed(4)
    model = torchvision.models.resnet18(num_classes=10).eval()
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"model": state, "epoch": 30, "args": argparse.Namespace(lr=0.1)}, tmp_path / "checkpoint.pth")
    got = ours(tmp_path / "checkpoint.pth", pngs, arch="resnet18")
    model.fc = nn.Identity()
    with torch.inference_mode():
        want = model(torchvision_input("resnet18", pngs))
    assert relative_error(got, want) < 1e-5


@pytest.mark.parametrize(("name", "layer", "pool"), [("test_vit", "penultimate", "auto"),
                                                     ("test_convnext", "stage3", "max")])  # fmt: skip
def test_a_timm_model_of_ten_classes_gives_timm_s_features(tmp_path: Path, pngs: list[Path], name, layer, pool):
    """Regression: a timm model's 10-class head was refused. The CNN's stage is timm's own forward_intermediates."""
    torch.manual_seed(5)
    model = timm.create_model(name, num_classes=10).eval()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "ten.pth")
    got = ours(tmp_path / "ten.pth", pngs, arch=f"timm/{name}", layer=layer, pool=pool)
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in pngs])
    with torch.inference_mode():
        if layer == "penultimate":
            want = model.forward_head(model.forward_features(x), pre_logits=True)
        else:
            want = model.forward_intermediates(x, indices=[2], intermediates_only=True)[0].amax((2, 3))
    assert relative_error(got, want) < 1e-5


@pytest.mark.parametrize("wrap", ["bare", "model", "state_dict", "model_state_dict", "module.", "_orig_mod."])
def test_checkpoints_as_training_scripts_save_them_all_load(tmp_path: Path, wrap: str):
    torch.manual_seed(6)
    state = torchvision.models.resnet18(num_classes=3).state_dict()
    if wrap.endswith("."):
        saved: dict = {wrap + k: v for k, v in state.items()}
    else:
        saved = state if wrap == "bare" else {wrap: state, "optimizer": {"lr": 0.1}, "epoch": 2}
    torch.save(saved, tmp_path / "w.pth")
    cfg = dataclasses.replace(RANDOM, arch="resnet18", weights=str(tmp_path / "w.pth"), image_size=32)
    extractor, _, _ = backbones.build_extractor(cfg, 0)
    got = dict(extractor.named_parameters())["body.graph.layer4.1.conv2.weight"]
    torch.testing.assert_close(got, state["layer4.1.conv2.weight"], rtol=0, atol=0)


def resnet18_state(**changes: torch.Tensor) -> dict[str, torch.Tensor]:
    state = torchvision.models.resnet18().state_dict()
    return {k: v for k, v in (state | changes).items() if changes.get(k, 0) is not None}


@pytest.mark.parametrize(
    ("content", "fragments"),
    [(resnet18_state(**{"layer3.0.conv1.weight": None, "layer4.1.bn2.bias": None}),
      ["does not fit resnet18 penultimate", "2 of the", "missing (layer3.0.conv1.weight, layer4.1.bn2.bias)"]),
     (resnet18_state(**{"conv1.weight": torch.zeros(8, 3, 7, 7)}),
      ["1 of another shape", "conv1.weight (8, 3, 7, 7) instead of (64, 3, 7, 7)"]),
     ({"epoch": 3, "optimizer": {"lr": torch.tensor(0.1)}},
      ["holds a dict of 'epoch', 'optimizer'", "model | state_dict | model_state_dict", "model.state_dict()"]),
     ({"model": resnet18_state(), "config": Image.new("RGB", (1, 1))},
      ["holds a Python object (PIL.Image.Image)", "torch.save(checkpoint['model']"]),
     (b"not a checkpoint", ["is not a loadable state dict"])],
)  # fmt: skip
def test_a_file_that_does_not_fit_is_refused_in_one_line_that_names_the_keys(tmp_path: Path, content, fragments):
    path = tmp_path / "w.pth"
    path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
    with pytest.raises(PipelineError) as err:
        backbones.build_extractor(dataclasses.replace(RANDOM, arch="resnet18", weights=str(path), image_size=32), 0)
    message = str(err.value)
    assert "\n" not in message and all(f in message for f in fragments), message


def test_the_weights_of_a_bigger_model_load_with_a_warning_that_names_what_is_left(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """A ResNet-34's file has every tensor of a ResNet-18 in the same shapes: loaded, but never silently."""
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    with caplog.at_level(logging.WARNING):
        backbones.build_extractor(dataclasses.replace(RANDOM, arch="resnet18", weights=str(tmp_path / "r34.pth"),
                                                      image_size=32), 0)  # fmt: skip
    assert "96 of its tensors are not in resnet18 penultimate (layer1.2.conv1.weight" in caplog.text


def test_layers_past_the_cut_need_not_be_in_the_file(tmp_path: Path):
    """A VGG's features alone (a backbone saved without its classifier) serve every pool layer."""
    state = {k: v for k, v in torchvision.models.vgg11().state_dict().items() if k.startswith("features.")}
    torch.save(state, tmp_path / "features.pth")
    cfg = dataclasses.replace(RANDOM, arch="vgg11", weights=str(tmp_path / "features.pth"), image_size=32)
    assert backbones.build_extractor(cfg, 0)[2]["feature_dim"] == 512
    with pytest.raises(PipelineError, match=r"does not fit vgg11 fc6: 2 of the 18 tensors .* \(classifier.0.weight"):
        backbones.build_extractor(dataclasses.replace(cfg, layer="fc6"), 0)
