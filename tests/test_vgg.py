from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torchvision.models import VGG11_Weights, VGG16_Weights

from pipeline import backbones
from pipeline.backbones import vgg, weights
from pipeline.backbones.base import Cut, Output
from pipeline.config import ExtractConfig
from pipeline.errors import PipelineError
from tests.conftest import cached_hub_weights, color_image

CFG = ExtractConfig(arch="vgg11", weights="random", image_size=64)


@pytest.fixture(scope="session")
def vgg11() -> torchvision.models.VGG:
    torch.manual_seed(0)
    return torchvision.models.vgg11().eval()


@pytest.mark.parametrize(
    ("layer", "pool"),
    [("pool1", "avg"), ("pool2", "max"), ("pool3", "flatten"), ("pool4", "avg"), ("pool5", "flatten"),
     ("fc6", "flatten"), ("fc7", "flatten")],
)  # fmt: skip
def test_feature_dim_matches_the_network(layer: str, pool: str):
    model, _, info = backbones.build_extractor(dataclasses.replace(CFG, layer=layer, pool=pool), seed=0)
    with torch.inference_mode():
        out = model(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    channels = {"pool1": 64, "pool2": 128, "pool3": 256, "pool4": 512, "pool5": 512, "fc6": 4096, "fc7": 4096}[layer]
    side = 64 // 2 ** int(layer[-1]) if pool == "flatten" and layer.startswith("pool") else 1
    assert out.shape == (2, info["feature_dim"]) == (2, channels * side * side)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_cut_stops_at_the_requested_pool(vgg11, k: int):
    body = vgg.cut(vgg11, f"pool{k}")
    assert sum(isinstance(m, nn.MaxPool2d) for m in body) == k
    assert isinstance(body[-1], nn.MaxPool2d)
    assert not any(isinstance(m, nn.Linear) for m in body.modules())


def test_cut_at_fc6_keeps_one_linear_layer_and_its_relu(vgg11):
    body = vgg.cut(vgg11, "fc6")
    linears = [m for m in body.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and isinstance(body[-1], nn.ReLU)


def test_cut_works_for_batchnorm_variants():
    body = vgg.cut(torchvision.models.vgg11_bn(), "pool2")
    assert isinstance(body[-1], nn.MaxPool2d) and any(isinstance(m, nn.BatchNorm2d) for m in body)


def test_preprocessing_comes_from_the_weights_transforms():
    preset = VGG16_Weights.IMAGENET1K_V1.transforms()
    prep = vgg.preprocessing("vgg16", 224)
    assert (prep.resize_size, prep.crop_size) == (preset.resize_size[0], preset.crop_size[0]) == (256, 224)
    assert prep.mean == tuple(preset.mean) and prep.std == tuple(preset.std)
    assert vgg.preprocessing("vgg16", 64).resize_size == 73  # the same 256/224 ratio


def test_fp32_features_equal_plain_torchvision_on_the_preset_tensors(vgg11):
    """uint8 crop in the worker + normalisation on the device == the weights' own transform, then VGG."""
    image = color_image(np.random.default_rng(0), 2, size=90)
    prep = vgg.preprocessing("vgg11", 64)
    cut = Cut(vgg.cut(vgg11, "pool5"), Output("map"), "pool5", "avg", prep, weights.RANDOM)
    ours = backbones.FeatureExtractor(cut).eval()
    preset = VGG11_Weights.IMAGENET1K_V1.transforms(crop_size=64, resize_size=prep.resize_size)
    with torch.inference_mode():
        got = ours(prep.to_uint8(image)[None])
        want = vgg11.features(preset(image)[None]).mean((2, 3))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_extractor_is_frozen_and_in_eval_mode():
    model, _, info = backbones.build_extractor(CFG, seed=0)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert info["weights"] == "random" and "seed" in info["weights_source"]


def test_random_weights_are_a_function_of_the_seed():
    a, _, _ = backbones.build_extractor(CFG, seed=0)
    b, _, _ = backbones.build_extractor(CFG, seed=0)
    c, _, _ = backbones.build_extractor(CFG, seed=1)
    torch.testing.assert_close(a.body[0].weight, b.body[0].weight, rtol=0, atol=0)
    assert not torch.equal(a.body[0].weight, c.body[0].weight)


def test_imagenet_weights_are_taken_from_the_torch_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A state dict placed where torch hub caches VGG11_Weights.IMAGENET1K_V1 is used, with no network."""
    state = cached_hub_weights(monkeypatch, tmp_path, torchvision.models.vgg11, VGG11_Weights.IMAGENET1K_V1.url)
    model, _, info = backbones.build_extractor(dataclasses.replace(CFG, weights="imagenet"), seed=0)
    torch.testing.assert_close(model.body[0].weight, state["features.0.weight"], rtol=0, atol=0)
    assert (info["weights"], info["weights_source"]) == ("imagenet", "VGG11_Weights.IMAGENET1K_V1")


def test_imagenet_weights_offline_fail_fast_with_one_clear_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache; downloads go to a refused loopback proxy
    start = time.monotonic()
    with pytest.raises(PipelineError) as err:
        backbones.build_extractor(ExtractConfig(weights="imagenet"), seed=0)
    assert time.monotonic() - start < 30
    message = str(err.value)
    assert "vgg16-397923af.pth" in message and str(tmp_path / "hub" / "checkpoints") in message
    assert "extract.weights: random" in message and "local state-dict file" in message
    assert not list((tmp_path / "hub" / "checkpoints").glob("*"))  # no partial download left behind


def test_weights_from_a_local_state_dict_file_record_its_hash(tmp_path: Path):
    path = tmp_path / "finetuned.pth"
    torch.manual_seed(7)
    state = torchvision.models.vgg11().state_dict()
    torch.save(state, path)
    model, _, info = backbones.build_extractor(dataclasses.replace(CFG, weights=str(path)), seed=0)
    torch.testing.assert_close(model.body[0].weight, state["features.0.weight"], rtol=0, atol=0)
    assert info["weights"] == str(path)
    assert info["weights_source"] == f"file finetuned.pth sha256:{hashlib.sha256(path.read_bytes()).hexdigest()}"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "expected imagenet | random | the path of a state-dict file"),
        (b"not a checkpoint", "is not a loadable state dict"),
        ({"features.0.weight": torch.zeros(1)}, "does not fit vgg11"),
    ],
)
def test_bad_weight_files_are_clear_errors(tmp_path: Path, content, message: str):
    path = tmp_path / "w.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(PipelineError, match=message):
        backbones.build_extractor(dataclasses.replace(CFG, weights=str(path)), seed=0)


def test_only_the_layers_up_to_the_cut_are_materialised():
    model, _, _ = backbones.build_extractor(ExtractConfig(weights="random", layer="pool5"), seed=0)
    assert sum(p.numel() for p in model.parameters()) == 14_714_688  # VGG16's convolutions, no classifier
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_bf16_precision_runs_under_autocast_and_returns_float32():
    model, _, _ = backbones.build_extractor(CFG, seed=0, precision="bf16")
    with torch.inference_mode():
        out = model(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_row_has_the_same_bits_whatever_else_is_in_its_batch(precision: str):
    """The same image in two batches of one shape, with other images beside it, at another place and on another
    number of threads (extract.nproc), gives the same bits: what lets rows be computed once and reused."""
    extractor, _, _ = backbones.build_extractor(dataclasses.replace(CFG, image_size=32), seed=0, precision=precision)
    rng = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (15, 3, 32, 32), dtype=torch.uint8, generator=rng)
    first = torch.cat([images[:1], images[1:8]])  # image 0 first, beside images 1-7
    second = torch.cat([images[8:13], images[:1], images[13:15]])  # image 0 sixth, beside images 8-14
    threads = torch.get_num_threads()
    try:
        with torch.inference_mode():
            torch.set_num_threads(max(2, threads))  # two threads at least, whatever share of the cores this test has
            a = extractor(first)[0]
            torch.set_num_threads(1)
            b = extractor(second)[5]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, b)
