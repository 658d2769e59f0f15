"""The interface every family shares: every family through real `dvc repro`, predict and export (first: the
slowest tests here); names, layers and pools refused in one line; fidelity to each library's own model and
preprocessing; and rows that do not depend on their batch."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import timm.data
import torch
import torchvision
from PIL import Image
from torch import nn

from pipeline import backbones, features
from pipeline.backbones.base import Preprocessing
from pipeline.config import ExtractConfig
from pipeline.errors import PipelineError
from pipeline.images import open_image
from tests.conftest import color_image, run, write_params

# (arch, image_size): a torchvision CNN, torchvision's ViT and a timm ViT (random weights, on the CPU); the project's
# own vgg11 is the first run. ViT-B/32 takes ViT-B/16's path at a quarter of its work; EfficientNet's cut is
# checked in tests/test_zoo.py, its features in test_fp32_features_equal_torchvision_s_own_model_and_transforms.
SWEEPS = {"cnn": [("resnet50", 32)], "vit": [("timm/test_vit", "auto"), ("vit_b_32", "auto")]}  # first: bare export
BARE = """
import json, sys, torch
program = torch.export.load(sys.argv[1] + "/model.pt2").module()
print(json.dumps(program(torch.load(sys.argv[2])).tolist()))
"""


def repro(project: Path, arch: str, size: int | str) -> list[str]:
    write_params(project, {"extract": {"arch": arch, "image_size": size}})
    return re.findall(r"Running stage '(\w+)'", run(project, "dvc", "repro").stdout)


def predict_and_export(project: Path, out: Path, *, bare: bool) -> None:
    """Predict on the owl images and export, as `python -m pipeline.predict` and `pipeline.export` do (in this
    process: the stage commands are tested in tests/test_predict.py). With ``bare``, the exported program, loaded
    with torch alone in an isolated interpreter, on crops made as model.json says, gives predict's probabilities."""
    from pipeline import backbones, export, heads, predict

    head, spec = heads.load_head(project / "models" / "head.pt")
    extractor, prep = backbones.extractor_for(spec["provenance"])
    paths = sorted((project / "data" / "raw" / "owl").glob("*.png"))
    found = predict.predict(paths, extractor, head, prep, class_names=spec["provenance"]["class_names"], top_k=3,
                            device=torch.device("cpu"), num_workers=0, decode=spec["provenance"]["decode"])  # fmt: skip
    assert len(found) == 10 and not any(p.error for p in found)
    meta = export.export(project / "models" / "head.pt", out)
    if not bare:
        return
    made = meta["preprocessing"]
    prep = Preprocessing(**{k: made[k] for k in ("resize_size", "crop_size", "interpolation")},
                         mean=tuple(made["mean"]), std=tuple(made["std"]))  # fmt: skip
    torch.save(torch.stack([prep.to_uint8(open_image(p)) for p in paths]), out / "crops.pt")
    ran = subprocess.run(
        [sys.executable, "-I", "-c", BARE, str(out), str(out / "crops.pt")], capture_output=True, text=True, check=True
    )
    got = torch.tensor(json.loads(ran.stdout)).sort(dim=1, descending=True).values
    want = torch.tensor([[prob for _, prob in p.top] for p in found])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", list(SWEEPS))
def test_a_sweep_over_backbones_runs_every_family_through_and_back(reproduced: Path, family: str):
    for i, (arch, size) in enumerate(SWEEPS[family]):
        assert repro(reproduced, arch, size) == ["scan", "extract", "train", "evaluate"], arch
        prov = features.read_provenance(reproduced / "data" / "features" / "train.h5")
        assert (prov["arch"], prov["layer"], prov["pool"]) == (arch, "penultimate", "flatten")
        metrics = json.loads((reproduced / "reports" / "evaluate" / "metrics.json").read_text())
        assert 0 <= metrics["knn_acc"] <= 1 and 0 <= metrics["accuracy"] <= 1, (arch, metrics)
        predict_and_export(reproduced, reproduced / "models" / f"export-{i}", bare=i == 0)
    assert '"knn_acc"' in run(reproduced, "dvc", "exp", "show", "--json").stdout
    if family == "cnn":  # back to the project's VGG: its features come back from DVC's run cache, its rows are kept
        assert repro(reproduced, "vgg11", 32) == ["scan", "train", "evaluate"]
        run(reproduced, "python", "-m", "pipeline.extract")
        extracted = json.loads((reproduced / "reports" / "extract" / "metrics.json").read_text())
        assert (extracted["extracted"], extracted["reused"]) == (0, 30)


RANDOM = ExtractConfig(weights="random")


def build(arch: str, precision: str = "fp32", **changes):
    return backbones.build_extractor(dataclasses.replace(RANDOM, arch=arch, **changes), seed=0, precision=precision)


@pytest.mark.parametrize(
    ("arch", "fragments"),
    [("resnet5", ["'resnet5'", "resnet50", "resnet18"]), ("vit_b16", ["vit_b_16"]), ("timm/vit_smal_patch14_dinov2",
      ["timm/vit_small_patch14_dinov2"]), ("alexnet2", ["alexnet", "torchvision.models.list_models()"])],
)  # fmt: skip
def test_an_unknown_arch_is_one_line_with_the_closest_names(arch: str, fragments: list[str]):
    with pytest.raises(PipelineError) as err:
        backbones.family(arch) if not arch.startswith("timm/") else build(arch)
    assert "\n" not in str(err.value) and all(f in str(err.value) for f in fragments), str(err.value)


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [({"arch": "resnet50", "layer": "pool5"}, ["not a layer of resnet50", "auto | penultimate | stage1 | stage2"]),
     ({"arch": "vgg16", "layer": "penultimate"}, ["not a layer of vgg16", "pool5 | pool1"]),
     ({"arch": "resnet50", "pool": "avg"}, ["resnet50 penultimate", "a vector", "auto | flatten"]),
     ({"arch": "vgg16", "layer": "fc7", "pool": "max"}, ["vgg16 fc7", "auto | flatten"]),
     ({"arch": "resnet50", "layer": "stage2", "pool": "cls"}, ["a feature map", "avg | max | flatten"]),
     ({"arch": "vit_b_16", "image_size": 64}, ["vit_b_16 does not take 64-pixel images", "image_size: auto"])],
)  # fmt: skip
def test_a_layer_pool_or_size_the_model_lacks_is_one_line_with_what_it_has(changes: dict, fragments: list[str]):
    with pytest.raises(PipelineError) as err:
        build(**changes)
    assert "\n" not in str(err.value) and all(f in str(err.value) for f in fragments), str(err.value)


def test_every_family_has_the_one_interface():
    for family in backbones.FAMILIES:
        assert all(callable(getattr(family, name)) for name in ("claims", "names", "layers", "build"))
    assert [backbones.family(a).__name__.rsplit(".", 1)[1] for a in ("vgg16", "resnet50", "timm/x")] == [
        "vgg", "zoo", "timm_models",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def pngs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two PNG photos of other sizes than any crop, as a user would have."""
    folder = tmp_path_factory.mktemp("pngs")
    rng = np.random.default_rng(0)
    paths = [folder / f"{i}.png" for i in range(2)]
    for i, path in enumerate(paths):
        color_image(rng, i, size=280 + 20 * i).resize((300, 250 + 20 * i)).save(path)
    return paths


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def ours(arch: str, paths: list[Path], **changes) -> torch.Tensor:
    extractor, prep, _ = build(arch, **changes)
    with torch.inference_mode():
        return extractor(torch.stack([prep.to_uint8(open_image(p)) for p in paths]))


@pytest.mark.parametrize(("arch", "pool"), [("resnet18", "auto"), ("vit_b_16", "auto"), ("vit_b_16", "mean")])
def test_fp32_features_equal_torchvision_s_own_model_and_transforms(pngs: list[Path], arch: str, pool: str):
    """The reference: torchvision's model, seeded as `random` weights are, with its weights' transforms()."""
    got = ours(arch, pngs, pool=pool, image_size="auto")
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch).eval()
    preset = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
    x = torch.stack([preset(Image.open(p).convert("RGB")) for p in pngs])
    with torch.inference_mode():
        if arch.startswith("vit"):
            tokens = model._process_input(x)
            tokens = model.encoder(torch.cat([model.class_token.expand(len(x), -1, -1), tokens], dim=1))
            want = tokens[:, 0] if pool == "auto" else tokens[:, 1:].mean(1)
        else:
            model.fc = nn.Identity()  # ResNet's pre-logits: its pooled, flattened last stage
            want = model(x)
    assert relative_error(got, want) < 1e-5


@pytest.mark.parametrize("pool", ["auto", "cls", "mean"])
def test_fp32_features_equal_timm_s_own_model_and_data_config(pngs: list[Path], pool: str):
    got = ours("timm/test_vit", pngs, pool=pool, image_size="auto")
    torch.manual_seed(0)
    model = timm.create_model("test_vit").eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in pngs])
    with torch.inference_mode():
        tokens = model.forward_features(x)
        want = {"auto": model.forward_head(tokens, pre_logits=True), "cls": tokens[:, 0]}.get(pool)
        want = tokens[:, model.num_prefix_tokens :].mean(1) if want is None else want
    assert relative_error(got, want) < 1e-5


def test_a_stage_is_the_output_of_the_cnn_s_own_block():
    extractor, _, info = build("resnet18", layer="stage3", pool="max", image_size=64)
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.inference_mode():
        y = (x.float() - extractor.mean) / extractor.std
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3"):
            y = getattr(model, name)(y)
        torch.testing.assert_close(extractor(x), y.amax((2, 3)), rtol=1e-5, atol=1e-6)
    assert info["feature_dim"] == 256


@pytest.mark.parametrize(
    ("arch", "layers"),
    [("resnet50", ["penultimate", "stage1", "stage2", "stage3", "stage4"]),
     ("convnext_tiny", ["penultimate", "stage1", "stage2", "stage3", "stage4"]),
     ("vit_b_16", ["penultimate"]), ("swin_t", ["penultimate"]), ("timm/test_vit", ["penultimate"])],
)  # fmt: skip
def test_the_layer_vocabulary(arch: str, layers: list[str]):
    assert list(backbones.family(arch).layers(arch)) == layers


@pytest.mark.parametrize("arch", ["resnet18", "timm/test_convnext"])
def test_batch_norm_runs_in_eval_mode_and_keeps_its_statistics(arch: str):
    extractor, _, _ = build(arch, image_size=32)
    norms = [m for m in extractor.modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
    before = [m.running_mean.clone() for m in norms if m.running_mean is not None]
    with torch.inference_mode():
        extractor(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8))
    assert not any(m.training for m in extractor.modules())
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, norms, strict=False))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize(("arch", "size"), [("resnet18", 32), ("vit_b_32", "auto"), ("timm/test_vit", "auto")])
def test_a_row_has_the_same_bits_whatever_else_is_in_its_batch(arch: str, size, precision: str):
    """As for VGG (tests/test_vgg.py): a CNN with batch norm and ViTs with layer norm and attention. On another
    number of threads too, except where the rows say they depend on it (torch's MultiheadAttention in bf16)."""
    extractor, prep, _ = build(arch, precision, image_size=size)
    fixed = backbones.thread_dependent(extractor, precision, torch.device("cpu"))
    assert fixed == (arch == "vit_b_32" and precision == "bf16")
    s = prep.crop_size
    images = torch.randint(0, 256, (15, 3, s, s), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    first = torch.cat([images[:1], images[1:8]])  # image 0 first, beside images 1-7
    second = torch.cat([images[8:13], images[:1], images[13:15]])  # image 0 sixth, beside images 8-14
    threads = torch.get_num_threads()
    with torch.inference_mode():
        a = extractor(first)[0]
        torch.set_num_threads(threads if fixed else 1)
        try:
            b = extractor(second)[5]
        finally:
            torch.set_num_threads(threads)
    assert torch.equal(a, b)
