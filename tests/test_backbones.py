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

import pytest
import timm
import timm.data
import torch
import torchvision
from PIL import Image
from torch import nn

from pipeline import backbones, features
from pipeline.backbones.base import Output, Pool, Preprocessing, choose_pool
from pipeline.config import ExtractConfig
from pipeline.errors import PipelineError
from pipeline.images import open_image
from tests.conftest import extract_here, record_backbone_check, run, stage_main, write_params

# Each family through dvc repro, with its contract's hard cases (random weights, on the CPU): fine-tuned files
# whose classifier has another size (a DDP checkpoint dict, a 2-way VGG, timm models of 10 classes), a timm ViT
# with a register token and no class token, a timm NHWC model (MambaOut) and a timm CNN's stage. The project's own
# vgg11 is the first run. ViT-B/32 takes ViT-B/16's path at a quarter of its work; EfficientNet's cut is checked in
# tests/test_zoo.py, and the 2-way VGG's fc7 cut (119M parameters to load and export here) in tests/test_weights.py.
# Each run: (extract params, the layer and pool it resolves to); the first of each: bare export.
SWEEPS = {
    "cnn": [({"arch": "resnet18", "image_size": 32, "weights": "resnet18-ddp.pth"}, ("penultimate", "flatten")),
            ({"arch": "vgg11", "image_size": 32, "weights": "vgg11-two.pth", "layer": "pool4"}, ("pool4", "avg"))],
    "vit": [({"arch": "timm/test_vit4", "weights": "test_vit4-ten.pth", "pool": "mean"}, ("penultimate", "mean")),
            ({"arch": "vit_b_32"}, ("penultimate", "flatten"))],
    "timm-cnn": [({"arch": "timm/test_mambaout", "pool": "max"}, ("penultimate", "max")),
                 ({"arch": "timm/test_convnext", "weights": "test_convnext-ten.pth", "layer": "stage3", "pool": "max"},
                  ("stage3", "max"))],
}  # fmt: skip
FINE_TUNED = {  # file: the model, fine-tuned (random here) on classes of the user's own, as training saves it
    "resnet18-ddp.pth": lambda: {"model": {f"module.{k}": v for k, v in torchvision.models.resnet18(
        num_classes=10).state_dict().items()}, "epoch": 30},
    "vgg11-two.pth": lambda: torchvision.models.vgg11(num_classes=2).state_dict(),
    "test_vit4-ten.pth": lambda: timm.create_model("test_vit4", num_classes=10).state_dict(),
    "test_convnext-ten.pth": lambda: {"state_dict": timm.create_model("test_convnext", num_classes=10).state_dict()},
}  # fmt: skip
BARE = """
import json, sys, torch
program = torch.export.load(sys.argv[1] + "/model.pt2").module()
print(json.dumps(program(torch.load(sys.argv[2])).tolist()))
"""


def repro(project: Path, params: dict, *targets: str) -> list[str]:
    if "weights" in params and params["weights"] in FINE_TUNED and not (project / params["weights"]).exists():
        torch.save(FINE_TUNED[params["weights"]](), project / params["weights"])
    extract = {"weights": "random", "layer": "auto", "pool": "auto", "image_size": "auto"} | params
    write_params(project, {"extract": extract})
    record_backbone_check(project)  # scan's own check, in this process: a scan process need not import torch for it
    return re.findall(r"Running stage '(\w+)'", run(project, "dvc", "repro", *targets).stdout)


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


@pytest.mark.slow
@pytest.mark.parametrize("family", list(SWEEPS))
def test_a_sweep_over_backbones_runs_every_family_through_and_back(
    reproduced: Path, family: str, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(reproduced)  # predict and export rebuild the backbone with its weights file, as recorded
    for i, (params, resolved) in enumerate(SWEEPS[family]):
        # each family's extraction through dvc repro, then the head that predict and export use, by the train
        # stage's own main() in this process: train, and the stages after it, read features as rows of numbers and
        # their provenance, the same whatever made them (the project's VGG features go through every stage by
        # dvc repro, and through train by dvc exp run in tests/test_dvc.py's sweep over heads)
        assert repro(reproduced, params, "extract") == ["scan", "extract"], params
        prov = features.read_provenance(reproduced / "data" / "features" / "train.h5")
        assert (prov["arch"], prov["layer"], prov["pool"]) == (params["arch"], *resolved)
        assert prov["weights_source"].startswith(f"file {params['weights']} ") if "weights" in params else True
        stage_main(monkeypatch, "train")
        predict_and_export(reproduced, reproduced / "models" / f"export-{i}", bare=i == 0)
    if family == "cnn":  # back to the project's VGG: its features come back from DVC's run cache, its rows are kept
        assert repro(reproduced, {"arch": "vgg11", "image_size": 32}, "extract") == ["scan"]
        stats = extract_here()
        assert (stats["images"], stats["reused"]) == (0, 30)


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
        assert all(callable(getattr(family, name)) for name in ("claims", "names", "layers", "outputs", "build"))
    assert [backbones.family(a).__name__.rsplit(".", 1)[1] for a in ("vgg16", "resnet50", "timm/x")] == [
        "vgg", "zoo", "timm_models",
    ]  # fmt: skip


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
     ("vit_b_16", ["penultimate"]), ("swin_t", ["penultimate"]), ("timm/test_vit", ["penultimate"]),
     ("timm/test_convnext", ["penultimate", "stage1", "stage2", "stage3", "stage4"]),
     ("timm/test_resnet", ["penultimate", "stage1", "stage2", "stage3", "stage4"])],
)  # fmt: skip
def test_the_layer_vocabulary(arch: str, layers: list[str]):
    assert list(backbones.family(arch).layers(arch)) == layers


def timm_reference(name: str, x: torch.Tensor, extractor) -> tuple[torch.nn.Module, torch.Tensor]:
    """timm's own model, seeded as `random` weights are, and its forward_features of uint8 images ``x``."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    with torch.inference_mode():
        return model, model.forward_features((x.float() - extractor.mean) / extractor.std)


@pytest.mark.parametrize("name", ["test_convnext", "test_mambaout"])  # NCHW, and NHWC (MambaOut: (B, H, W, C))
@pytest.mark.parametrize("pool", ["auto", "avg", "max", "flatten", "cls", "mean"])
def test_a_timm_cnn_takes_every_map_pool_and_refuses_the_token_pools(name: str, pool: str):
    """Regression: `mean` averaged a CNN's (B, C, H, W) map over its channels, giving H-wide rows that the store
    took (misaligned). Every pool of a map acts on NCHW and NHWC maps alike, to the same width."""
    if pool in ("cls", "mean"):
        with pytest.raises(PipelineError) as err:
            build(f"timm/{name}", pool=pool, image_size="auto")
        assert "\n" not in str(err.value) and "expected auto | flatten | avg | max" in str(err.value)
        return
    extractor, prep, info = build(f"timm/{name}", pool=pool, image_size="auto")
    x = torch.randint(0, 256, (2, 3, prep.crop_size, prep.crop_size), dtype=torch.uint8)
    model, fmap = timm_reference(name, x, extractor)
    fmap = fmap.permute(0, 3, 1, 2) if getattr(model, "output_fmt", "NCHW") == "NHWC" else fmap  # (B, C, H, W)
    with torch.inference_mode():
        if pool in ("auto", "flatten"):  # the model's own pre-logits: a vector, which flatten takes as it is
            want = model.forward_head(model.forward_features((x.float() - extractor.mean) / extractor.std), True)
        else:
            want = fmap.mean((2, 3)) if pool == "avg" else fmap.amax((2, 3))
        torch.testing.assert_close(extractor(x), want, rtol=1e-5, atol=1e-6)
    assert info["feature_dim"] == want.shape[1]


@pytest.mark.parametrize(("layer", "pool"), [("stage2", "flatten"), ("stage4", "avg")])
def test_an_nhwc_model_s_stage_maps_pool_as_nchw_ones(layer: str, pool: str):
    """MambaOut's blocks run NHWC; its stages come NCHW from timm's forward_intermediates, at strides 8 and 32."""
    extractor, prep, info = build("timm/test_mambaout", layer=layer, pool=pool, image_size="auto")
    x = torch.randint(0, 256, (2, 3, prep.crop_size, prep.crop_size), dtype=torch.uint8)
    torch.manual_seed(0)
    model = timm.create_model("test_mambaout").eval()
    index = {"stage2": 1, "stage4": 3}[layer]
    with torch.inference_mode():
        fmap = model.forward_intermediates((x.float() - extractor.mean) / extractor.std, indices=[index],
                                           intermediates_only=True)[0]  # fmt: skip
        want = fmap.flatten(1) if pool == "flatten" else fmap.mean((2, 3))
        torch.testing.assert_close(extractor(x), want, rtol=1e-5, atol=1e-6)
    assert fmap.shape[-1] == prep.crop_size // {"stage2": 8, "stage4": 32}[layer]


def test_the_nhwc_pool_gives_the_nchw_rows():
    nchw = torch.randn(2, 5, 3, 4)
    for pool in ("avg", "max", "flatten"):
        want = Pool(pool, Output("map"))(nchw)
        torch.testing.assert_close(Pool(pool, Output("map", layout="NHWC"))(nchw.permute(0, 2, 3, 1)), want)


def test_registers_without_a_class_token_refuse_cls_and_mean_averages_the_patch_tokens_alone():
    """Regression: `cls` on a ViT with a register token but no class token returned the register token."""
    with pytest.raises(PipelineError, match=r"tokens without a class token: expected auto \| flatten \| mean$"):
        build("timm/test_vit4", pool="cls", image_size="auto")
    extractor, prep, _ = build("timm/test_vit4", pool="mean", image_size="auto")
    x = torch.randint(0, 256, (2, 3, prep.crop_size, prep.crop_size), dtype=torch.uint8)
    model, tokens = timm_reference("test_vit4", x, extractor)
    assert (model.num_prefix_tokens, model.has_class_token) == (1, False)
    with torch.inference_mode():
        torch.testing.assert_close(extractor(x), tokens[:, 1:].mean(1), rtol=1e-5, atol=1e-6)


def test_every_pool_is_chosen_in_one_place_from_what_the_cut_outputs():
    vector, tokens = Output("vector"), Output("tokens", class_token=True, prefix=1)
    assert choose_pool("auto", [vector, tokens], "x") == (0, "flatten")
    assert choose_pool("mean", [vector, tokens], "x") == (1, "mean")
    assert choose_pool("auto", [Output("tokens", prefix=4)], "x") == (0, "mean")
    assert choose_pool("auto", [Output("map", layout="NHWC")], "x") == (0, "avg")
    with pytest.raises(PipelineError, match="which outputs a vector or tokens: expected auto | flatten | cls | mean"):
        choose_pool("max", [vector, tokens], "x")


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
    try:
        with torch.inference_mode():
            torch.set_num_threads(max(2, threads))  # two threads at least, whatever share of the cores this test has
            a = extractor(first)[0]
            torch.set_num_threads(max(2, threads) if fixed else 1)
            b = extractor(second)[5]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [({"arch": "resnet51"}, ["'resnet51' is not a known model", "resnet50"]),
     ({"arch": "timm/vit_smal_patch14_dinov2"}, ["timm/vit_small_patch14_dinov2"]),
     ({"arch": "resnet50", "layer": "pool5"}, ["not a layer of resnet50", "stage4"]),
     ({"arch": "timm/test_convnext", "pool": "cls"}, ["timm/test_convnext penultimate", "auto | flatten | avg | max"]),
     ({"arch": "vgg16", "layer": "fc7", "pool": "avg"}, ["vgg16 fc7", "auto | flatten"]),
     ({"weights": "models/finetuned.pth"}, ["'models/finetuned.pth' is not valid", "the path of a state-dict file"])],
)  # fmt: skip
def test_check_refuses_what_building_would_without_weights_or_compute(changes: dict, fragments: list[str]):
    with pytest.raises(PipelineError) as err:
        backbones.check(dataclasses.replace(RANDOM, **changes))
    assert "\n" not in str(err.value) and all(f in str(err.value) for f in fragments), str(err.value)


def test_a_typo_in_the_backbone_stops_at_scan_before_dvc_removes_the_features(reproduced: Path):
    """Regression: `-S extract.arch=resnet51` failed in extract, once DVC had removed its outputs."""
    write_params(reproduced, {"extract": {"arch": "resnet51"}})
    result = run(reproduced, "dvc", "repro", check=False)
    assert result.returncode != 0
    assert "error: extract.arch = 'resnet51' is not a known model: did you mean resnet50" in result.stderr
    assert "Running stage 'extract'" not in result.stdout
    assert (reproduced / "data" / "features" / "train.h5").is_file()
    assert (reproduced / "reports" / "extract" / "metrics.json").is_file()
