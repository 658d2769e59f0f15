"""Frozen backbones behind one interface: a family module builds a model cut at a layer, with its weights and
the preprocessing of its own metadata. Adding a family is one module with ``claims``, ``names``, ``layers``,
``outputs`` and ``build``, listed in FAMILIES. ``outputs`` reports what a cut outputs (``base.Output``: map,
vector or tokens, its layout, class and register tokens), and ``build`` returns the cut
(:class:`pipeline.backbones.base.Cut`); the pool is chosen, checked and run in ``base`` from that report, and
weights files load through ``weights`` alone.

- ``vgg``: torchvision's VGGs by a table of layers (pool1 … pool5, fc6, fc7), as this project began;
- ``zoo``: every other classification model of torchvision's registry, cut by ``create_feature_extractor``;
- ``timm_models``: ``timm/<name>``, cut by ``forward_features`` and ``forward_head(pre_logits=True)``.
"""

from __future__ import annotations

import difflib
from types import ModuleType
from typing import Any

import torch

from pipeline.backbones import timm_models, vgg, weights, zoo
from pipeline.backbones.base import Cut, FeatureExtractor, Images, Preprocessing, choose_layer, choose_pool
from pipeline.config import ExtractConfig
from pipeline.errors import PipelineError

__all__ = [
    "FAMILIES",
    "FeatureExtractor",
    "Images",
    "Preprocessing",
    "build_extractor",
    "check",
    "extractor_for",
    "family",
    "thread_dependent",
]

FAMILIES: tuple[ModuleType, ...] = (vgg, zoo, timm_models)  # the first that claims an arch builds it


def family(arch: str) -> ModuleType:
    """The family that builds ``arch``; an unknown name is refused with the closest valid names."""
    for fam in FAMILIES:
        if fam.claims(arch):
            return fam
    known = [name for fam in FAMILIES for name in fam.names()]
    close = difflib.get_close_matches(arch, known, n=5, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise PipelineError(
        f"extract.arch = {arch!r} is not a known model: {hint}Expected a torchvision classification model "
        "(vgg16, resnet50, convnext_tiny, vit_b_16 …: torchvision.models.list_models()) or timm/<name>"
    )


def check(cfg: ExtractConfig) -> None:
    """What building would refuse of ``cfg`` and can be known without weights or compute: the model's name, the
    layer and pool for it, and that a weights file exists. The scan stage runs it, so that a typo stops the run
    before DVC removes the extract stage's outputs."""
    fam = family(cfg.arch)
    layer = choose_layer(cfg.layer, fam.layers(cfg.arch), cfg.arch)
    choose_pool(cfg.pool, fam.outputs(cfg.arch, layer), f"{cfg.arch} {layer}")
    weights.check(cfg.weights)


def build_extractor(
    cfg: ExtractConfig, seed: int, precision: str = "fp32"
) -> tuple[FeatureExtractor, Preprocessing, dict[str, Any]]:
    """The frozen extractor in eval mode with gradients off, its preprocessing, and what the provenance records
    of it: the layer and pool resolved, the feature width, the weights, and the libraries that made it."""
    fam = family(cfg.arch)
    cut: Cut = fam.build(cfg, seed)
    extractor = FeatureExtractor(cut, precision).eval().requires_grad_(False)  # BatchNorm, dropout: eval mode
    dim = _width(extractor, cfg.arch, cut.prep)
    info = {"layer": cut.layer, "pool": cut.pool, "image_size": cut.prep.crop_size, "feature_dim": dim}
    return extractor, cut.prep, info | cut.weights | cut.versions


def thread_dependent(extractor: FeatureExtractor, precision: str, device: torch.device) -> bool:
    """Whether rows depend on the number of CPU threads: torch's MultiheadAttention under bf16 or fp16 autocast
    gives other last bits on another thread count (measured on torch 2.14), so those rows are kept apart."""
    attention = any(isinstance(m, torch.nn.MultiheadAttention) for m in extractor.modules())
    return attention and precision != "fp32" and device.type == "cpu"


def _width(extractor: FeatureExtractor, arch: str, prep: Preprocessing) -> int:
    """D of the (N, D) features, from one image through the network; a size the model refuses is one line."""
    try:
        with torch.inference_mode():
            out = extractor(torch.zeros(1, 3, prep.crop_size, prep.crop_size, dtype=torch.uint8))
    except (AssertionError, RuntimeError, ValueError) as err:
        raise PipelineError(
            f"{arch} does not take {prep.crop_size}-pixel images ({type(err).__name__}: {err}): set "
            "extract.image_size: auto, its own size"
        ) from None
    if out.dim() != 2 or len(out) != 1:  # the contract: a family's Output and the pool give one row an image
        raise RuntimeError(f"{arch}: one image gave features of shape {tuple(out.shape)}, not (1, D)")
    return int(out.shape[1])


def extractor_for(provenance: dict[str, Any], precision: str | None = None) -> tuple[FeatureExtractor, Preprocessing]:
    """The extractor that made features with this provenance (for a head trained on them), on the CPU.

    Refuses weights that no longer match what the features were made with (a changed local weights file).
    """
    cfg = ExtractConfig(
        arch=provenance["arch"],
        weights=provenance["weights"],
        layer=provenance["layer"],
        pool=provenance["pool"],
        image_size=provenance["image_size"],
    )
    extractor, prep, info = build_extractor(cfg, provenance["seed"], precision or provenance["precision"])
    if info["weights_source"] != provenance["weights_source"]:
        raise PipelineError(
            f"the head was trained on features from {provenance['weights_source']}, but extract.weights = "
            f"{provenance['weights']!r} now gives {info['weights_source']}; re-run the pipeline (dvc repro)"
        )
    return extractor, prep
