"""timm's models, as ``extract.arch: timm/<name>`` (the optional ``timm`` extra).

Layers: ``penultimate``, timm's own pre-logits (``forward_head(forward_features(x), pre_logits=True)``) with
the model's own pooling, or, with another pool, its ``forward_features``: a ViT's tokens (``cls``, ``mean``) or
a CNN's last map (``avg``, ``max``); and on a CNN (whose ``feature_info`` has strides 4 to 32), ``stage1`` …
``stage4``: the map at stride 4, 8, 16 and 32 from timm's ``forward_intermediates``, the layers past it pruned.
ImageNet weights are the model's pretrained tag, from the Hugging Face cache.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import math
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pipeline.backbones import weights
from pipeline.backbones.base import Cut, Output, Preprocessing, choose_layer, choose_pool, scaled
from pipeline.config import ExtractConfig
from pipeline.errors import PipelineError

PREFIX = "timm/"
PENULTIMATE = "penultimate"
STAGE_STRIDES = {f"stage{k}": 2 ** (k + 1) for k in range(1, 5)}  # stage1 … stage4: strides 4 … 32, as zoo's


def claims(arch: str) -> bool:
    return arch.startswith(PREFIX)


def names() -> list[str]:
    if importlib.util.find_spec("timm") is None:
        return []
    import timm

    return [PREFIX + n for n in timm.list_models(pretrained=True)]


def layers(arch: str) -> tuple[str, ...]:
    return (PENULTIMATE, *facts(arch).stages)


def outputs(arch: str, layer: str) -> list[Output]:
    """What the cut at ``layer`` outputs: the pre-logits vector and forward_features' output beside it, or a stage's
    NCHW map."""
    return [Output("vector"), facts(arch).features] if layer == PENULTIMATE else [Output("map")]


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise PipelineError(
            "extract.arch names a timm model, but timm is not installed: pip install -e '.[timm]'"
        ) from None
    return timm


@dataclass(frozen=True)
class Facts:
    """What a timm model's cuts output, read off the model built on the meta device (no weights, no compute)."""

    features: Output  # forward_features: tokens (B, N, C) or a map, NCHW or NHWC
    stages: dict[str, int]  # stageK -> its index in forward_intermediates (and feature_info)


@functools.cache
def facts(arch: str) -> Facts:
    timm, name = _timm(), _name(arch)
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False).eval()
    size = timm.data.resolve_data_config({}, model=model)["input_size"]
    with torch.no_grad():
        shape = model.forward_features(torch.empty(1, *size, device="meta")).shape
    if len(shape) == 3:
        prefix = int(getattr(model, "num_prefix_tokens", 0))
        has_class = getattr(model, "has_class_token", getattr(model, "cls_token", None) is not None)
        features = Output("tokens", class_token=bool(has_class) and prefix > 0, prefix=prefix)
    else:  # a map: NHWC where the model says so (Swin, MambaOut), or where its channels are last
        channels = getattr(model, "num_features", None)
        last = channels is not None and shape[1] != channels and shape[3] == channels
        features = Output("map", layout="NHWC" if last else str(getattr(model, "output_fmt", "NCHW")))
    return Facts(features, _stages(model))


def _stages(model: nn.Module) -> dict[str, int]:
    """stageK: the last of timm's feature taps at stride 2^(K+1), on models that taps at strides 4 to 32 (CNNs and
    hierarchical transformers; a ViT's taps all have its patch stride)."""
    taps = [int(info["reduction"]) for info in getattr(model, "feature_info", [])]
    if not hasattr(model, "forward_intermediates") or not set(STAGE_STRIDES.values()) <= set(taps):
        return {}
    return {layer: max(i for i, r in enumerate(taps) if r == stride) for layer, stride in STAGE_STRIDES.items()}


class PreLogits(nn.Module):
    """The model's own pre-logits: forward_features, then its head's pooling and norm, without the classifier."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


class Features(nn.Module):
    """The model's ``forward_features``: a ViT's normalised tokens (B, N, C), or a CNN's last map."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


class Stage(nn.Module):
    """One map of timm's ``forward_intermediates`` (NCHW, without a norm), the layers past it pruned."""

    def __init__(self, model: nn.Module, index: int) -> None:
        super().__init__()
        model.prune_intermediate_layers([index], prune_norm=True, prune_head=True)
        self.model, self.index = model, index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        taps = self.model.forward_intermediates(x, indices=[self.index], intermediates_only=True, stop_early=True)
        return taps[0]


def build(cfg: ExtractConfig, seed: int) -> Cut:
    """The timm model with its weights, cut at ``extract.layer``, on the CPU."""
    timm, name = _timm(), _name(cfg.arch)
    found = facts(cfg.arch)
    layer = choose_layer(cfg.layer, layers(cfg.arch), cfg.arch)
    cuts = outputs(cfg.arch, layer)
    chosen, pool = choose_pool(cfg.pool, cuts, f"{cfg.arch} {layer}")
    if cfg.weights == "imagenet":
        model, info = _pretrained(timm, name), weights.imagenet(f"timm {_tag(timm, name)}")
    else:
        torch.manual_seed(seed)  # `random` weights are a function of the seed
        model, info = timm.create_model(name, pretrained=False), weights.RANDOM
    classifier, known = model.get_classifier(), list(model.state_dict())
    dropped = [m for m in (classifier if isinstance(classifier, tuple) else (classifier,)) if isinstance(m, nn.Module)]
    if layer != PENULTIMATE:
        body = Stage(model, found.stages[layer])  # prunes the model: the file may hold what it pruned
    else:
        body = PreLogits(model) if chosen == 0 else Features(model)
    if cfg.weights not in ("imagenet", "random"):
        info = weights.from_file(cfg.weights, model, body, target=f"{cfg.arch} {layer}", dropped=dropped,
                                 adapt=_converter(model), known=known)  # fmt: skip
    versions = {"timm_version": timm.__version__}
    return Cut(body.eval(), cuts[chosen], layer, pool, preprocessing(model, cfg.image_size), info, versions)


def _name(arch: str) -> str:
    """The timm model's name; an unknown one is refused with the closest names."""
    timm, name = _timm(), arch.removeprefix(PREFIX)
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(pretrained=True) + timm.list_models(), n=5)
        hint = f": did you mean {', '.join(PREFIX + c for c in dict.fromkeys(close))}?" if close else ""
        raise PipelineError(f"extract.arch = {arch!r} is not a model of timm {timm.__version__}{hint}")
    return name


def _converter(model: nn.Module) -> Any:
    """The model module's ``checkpoint_filter_fn``, which timm applies to its own pretrained files (original
    releases' names, a position embedding of another grid), as a function of the state dict alone."""
    convert = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    return None if convert is None else functools.partial(convert, model=model)


def preprocessing(model: nn.Module, image_size: int | str) -> Preprocessing:
    """From timm's ``resolve_data_config`` for the model: its input size, crop_pct, interpolation, mean, std."""
    import timm.data

    config = timm.data.resolve_data_config({}, model=model)
    if config.get("crop_mode", "center") != "center":
        raise PipelineError(f"timm's crop_mode {config['crop_mode']!r} is not supported: only center crops are")
    crop = config["input_size"][-1]
    resize = math.floor(crop / config["crop_pct"])  # as timm.data.transforms_factory's eval transform
    own = Preprocessing(resize, crop, config["interpolation"], tuple(config["mean"]), tuple(config["std"]))
    return scaled(own, image_size)


def _tag(timm: Any, name: str) -> str:
    return getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", None) or name


def _pretrained(timm: Any, name: str) -> nn.Module:
    """Pretrained from the Hugging Face cache; downloaded only when absent, failing fast when impossible."""
    try:
        with weights.download_timeout():
            return timm.create_model(name, pretrained=True)
    except Exception as err:  # huggingface_hub and requests raise many types offline
        from huggingface_hub import constants

        repo = _tag(timm, name)
        where = os.path.join(constants.HF_HUB_CACHE, "models--" + repo.replace("/", "--"))
        raise PipelineError(
            f"the pretrained weights of timm/{name} ({repo}) are not in the Hugging Face cache and could not be "
            f"downloaded ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Either fetch them "
            f"where there is a network (huggingface-cli download {repo}) and copy {where} into this machine's "
            "cache (set HF_HOME to move it), or set extract.weights to a local state-dict file, or use "
            "extract.weights: random"
        ) from None
