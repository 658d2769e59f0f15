"""timm's models, as ``extract.arch: timm/<name>`` (the optional ``timm`` extra).

The cut is timm's own: ``penultimate`` is ``forward_head(forward_features(x), pre_logits=True)``, the model's
pre-logits with its own pooling; a ViT's tokens (``forward_features``) pool as ``cls`` or ``mean`` instead.
ImageNet weights are the model's pretrained tag, from the Hugging Face cache.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
import os
import socket
from typing import Any

import torch
from torch import nn

from pipeline.backbones.base import (
    DOWNLOAD_TIMEOUT_S,
    Cut,
    Preprocessing,
    choose_layer,
    resolve_pool,
    scaled,
    state_file,
)
from pipeline.config import ExtractConfig
from pipeline.errors import PipelineError

PREFIX = "timm/"
LAYERS = ("penultimate",)


def claims(arch: str) -> bool:
    return arch.startswith(PREFIX)


def names() -> list[str]:
    if importlib.util.find_spec("timm") is None:
        return []
    import timm

    return [PREFIX + n for n in timm.list_models(pretrained=True)]


def layers(arch: str) -> tuple[str, ...]:
    return LAYERS


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise PipelineError(
            "extract.arch names a timm model, but timm is not installed: pip install -e '.[timm]'"
        ) from None
    return timm


class PreLogits(nn.Module):
    """The model's own pre-logits: forward_features, then its head's pooling and norm, without the classifier."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


class Features(nn.Module):
    """The model's ``forward_features``: a ViT's normalised tokens (B, N, C)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def build(cfg: ExtractConfig, seed: int) -> Cut:
    """The timm model with its weights, cut at its pre-logits or its tokens, on the CPU."""
    timm, name = _timm(), cfg.arch.removeprefix(PREFIX)
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(pretrained=True) + timm.list_models(), n=5)
        hint = f": did you mean {', '.join(PREFIX + c for c in dict.fromkeys(close))}?" if close else ""
        raise PipelineError(f"extract.arch = {cfg.arch!r} is not a model of timm {timm.__version__}{hint}")
    layer = choose_layer(cfg.layer, LAYERS, cfg.arch)
    tokens = cfg.pool in ("cls", "mean")
    output = "tokens" if tokens else "vector"
    pool = resolve_pool(cfg.pool, output, f"{cfg.arch} {layer}")
    model, info = _weighted(timm, name, cfg.weights, seed)
    if tokens and not getattr(model, "num_prefix_tokens", 0) and pool == "cls":
        raise PipelineError(f"extract.pool = 'cls' is not valid for {cfg.arch}: it has no class token; use mean")
    body = Features(model) if tokens else PreLogits(model)
    prefix = getattr(model, "num_prefix_tokens", 0)
    versions = {"timm_version": timm.__version__}
    return Cut(body, output, layer, pool, preprocessing(model, cfg.image_size), info, prefix, versions)


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


def _weighted(timm: Any, name: str, weights: str, seed: int) -> tuple[nn.Module, dict[str, str]]:
    if weights == "random":
        torch.manual_seed(seed)  # `random` weights are a function of the seed
        model = timm.create_model(name, pretrained=False)
        return model, {"weights": "random", "weights_source": "random init seeded by params seed"}
    if weights != "imagenet":
        path, info = state_file(weights)
        try:
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)})
        except (RuntimeError, KeyError, ValueError) as err:
            raise PipelineError(f"extract.weights = {weights!r} does not fit timm/{name}: {err}") from None
        return model, info
    return _pretrained(timm, name), {"weights": "imagenet", "weights_source": f"timm {_tag(timm, name)}"}


def _tag(timm: Any, name: str) -> str:
    return getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", None) or name


def _pretrained(timm: Any, name: str) -> nn.Module:
    """Pretrained from the Hugging Face cache; downloaded only when absent, failing fast when impossible."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
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
    finally:
        socket.setdefaulttimeout(previous)
