"""The frozen feature extractor: a torchvision VGG cut at a layer, with its weights and preprocessing."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torch.utils.data import Dataset
from torchvision.models import VGG, get_model_weights
from torchvision.transforms import functional as F
from torchvision.transforms._presets import ImageClassification

from pipeline.config import ExtractConfig
from pipeline.errors import PipelineError
from pipeline.hardware import DTYPES
from pipeline.images import IMAGE_ERRORS

log = logging.getLogger(__name__)

BLOCK_CHANNELS = (64, 128, 256, 512, 512)  # output channels of pool1 … pool5, the same in every VGG
FC_DIM = 4096
_FC_DEPTH = {"fc6": 2, "fc7": 5}  # classifier[:n]: Linear, ReLU (fc6) | + Dropout, Linear, ReLU (fc7)
_DOWNLOAD_TIMEOUT_S = 15


def feature_dim(layer: str, pool: str, image_size: int) -> int:
    """Width D of the (N, D) features for a layer, pooling and input size."""
    if layer in _FC_DEPTH:
        return FC_DIM
    k = int(layer.removeprefix("pool"))
    side = image_size // 2**k  # each 2x2 max-pool floors the side
    return BLOCK_CHANNELS[k - 1] * (1 if pool != "flatten" else side * side)


# ---------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class Preprocessing:
    """The weights' own eval transform, split in two: resize and crop on the CPU, normalise on the device."""

    resize_size: int
    crop_size: int
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def reduce_for(self, decode: str) -> int:
        """What ``images.open_image`` may reduce a JPEG towards under ``extract.decode`` (0: a full decode)."""
        return self.resize_size if decode == "fast" else 0

    def to_uint8(self, image: Any) -> torch.Tensor:
        """PIL image -> (3, crop, crop) uint8 tensor, as the weights' transform does before scaling."""
        mode = F.InterpolationMode(self.interpolation)
        image = F.resize(image, [self.resize_size], interpolation=mode, antialias=True)
        return F.pil_to_tensor(F.center_crop(image, [self.crop_size]))


def preprocessing(arch: str, image_size: int) -> Preprocessing:
    """Preprocessing from the arch's ImageNet weights meta, scaled to ``image_size`` (keeping its resize/crop ratio)."""
    preset = get_model_weights(arch).IMAGENET1K_V1.transforms()
    assert isinstance(preset, ImageClassification)
    ratio = preset.resize_size[0] / preset.crop_size[0]  # 256 / 224 for the VGG weights
    return Preprocessing(
        resize_size=round(image_size * ratio),
        crop_size=image_size,
        interpolation=preset.interpolation.value,
        mean=tuple(preset.mean),
        std=tuple(preset.std),
    )


class Images(Dataset):
    """Opens and resizes in DataLoader workers: yields (uint8 (3, S, S) crop, index, error). A file that cannot be
    read gives a zero crop and the reason, so that the caller decides whether that is fatal."""

    def __init__(self, keys: Sequence[Any], open_image: Callable[[Any], Any], prep: Preprocessing) -> None:
        self.keys, self.open_image, self.prep = keys, open_image, prep

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        try:
            return self.prep.to_uint8(self.open_image(self.keys[index])), index, ""
        except IMAGE_ERRORS as err:
            blank = torch.zeros(3, self.prep.crop_size, self.prep.crop_size, dtype=torch.uint8)
            return blank, index, f"{type(err).__name__}: {err}"


# ---------------------------------------------------------------------------- weights


def load_weights(arch: str, spec: str) -> tuple[dict[str, torch.Tensor] | None, dict[str, str]]:
    """State dict for ``extract.weights`` (None for ``random``) and its provenance description."""
    if spec == "random":
        return None, {"weights": "random", "weights_source": "random init seeded by params seed"}
    if spec == "imagenet":
        enum = get_model_weights(arch).IMAGENET1K_V1
        return _imagenet_state_dict(enum), {
            "weights": "imagenet",
            "weights_source": f"{type(enum).__name__}.{enum.name}",
        }
    path = Path(spec)
    if not path.is_file():
        raise PipelineError(
            f"extract.weights = {spec!r} is not valid: expected imagenet | random | the path of a state-dict file"
        )
    state = _torch_load(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return state, {"weights": spec, "weights_source": f"file {path.name} sha256:{digest}"}


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """Tensors only (``weights_only``), memory-mapped where the file format allows: layers past the cut are
    never read from disk."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except Exception as err:  # torch raises many types for a damaged or foreign file
        raise PipelineError(f"{path} is not a loadable state dict: {err}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PipelineError(f"{path} does not hold a state dict (a mapping of parameter names to tensors)")
    return state


def _imagenet_state_dict(enum: Any) -> dict[str, torch.Tensor]:
    """Load from the torch hub cache; download only when absent, and fail fast when that is impossible."""
    cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
    filename = os.path.basename(enum.url)
    cached = cache_dir / filename
    if not cached.is_file():
        log.info("downloading %s to %s", enum.url, cache_dir)
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_S)  # bounds connect and stalled reads, not a slow download
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            match = torch.hub.HASH_REGEX.search(filename)  # vgg16-397923af.pth -> 397923af
            torch.hub.download_url_to_file(enum.url, str(cached), hash_prefix=match.group(1) if match else None)
        except (OSError, RuntimeError) as err:
            raise PipelineError(
                f"ImageNet weights {filename} are not in the torch hub cache and could not be downloaded "
                f"({type(err).__name__}: {err}). Either put {filename} in {cache_dir}/ (set TORCH_HOME to move "
                "that cache), or set extract.weights to the path of a local state-dict file, or run offline "
                "with extract.weights: random (make repro WEIGHTS=random)"
            ) from None
        finally:
            socket.setdefaulttimeout(previous)
    return _torch_load(cached)


# ---------------------------------------------------------------------------- the network


class FeatureExtractor(nn.Module):
    """Frozen VGG cut at a layer: uint8 images (B, 3, H, W) -> float32 features (B, D).

    Normalisation runs in float32 on the device; the network runs in ``precision`` (bf16/fp16 through
    autocast, fp32 exact), and pooling happens on the device before anything is copied back.
    """

    def __init__(self, body: nn.Module, pool: str, prep: Preprocessing, precision: str = "fp32") -> None:
        super().__init__()
        self.body = body
        self.pool = {
            "avg": nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1)),
            "max": nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(1)),
            "flatten": nn.Flatten(1),
        }[pool]
        self.precision = precision
        self.register_buffer("mean", torch.tensor(prep.mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(prep.std).view(1, 3, 1, 1) * 255)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std  # same as (x / 255 - mean) / std
        if self.precision == "fp32":
            return self.pool(self.body(x))
        with torch.autocast(x.device.type, dtype=DTYPES[self.precision]):
            return self.pool(self.body(x)).float()


def cut(model: VGG, layer: str) -> nn.Sequential:
    """The part of ``model`` up to and including ``layer``; nothing after it is kept or computed."""
    if layer in _FC_DEPTH:
        return nn.Sequential(model.features, model.avgpool, nn.Flatten(1), *model.classifier[: _FC_DEPTH[layer]])
    pools = [i for i, m in enumerate(model.features) if isinstance(m, nn.MaxPool2d)]
    return model.features[: pools[int(layer.removeprefix("pool")) - 1] + 1]


def init_random(body: nn.Module) -> None:
    """Initialise the cut network as torchvision initialises VGG: Kaiming-normal convolutions, N(0, 0.01)
    linear layers, zero biases, identity batch norm. Draws from torch's global generator, seeded by the caller."""
    for m in body.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_parameters()
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def build_extractor(
    cfg: ExtractConfig, seed: int, precision: str = "fp32"
) -> tuple[FeatureExtractor, Preprocessing, dict[str, str]]:
    """The frozen extractor in eval mode with gradients off, its preprocessing, and its weights provenance.

    The architecture is built on the meta device and only the layers up to the cut are ever materialised,
    so a pool5 extractor holds 15M parameters, not VGG16's 138M.
    """
    state, weights_info = load_weights(cfg.arch, cfg.weights)
    with torch.device("meta"):
        model = torchvision.models.get_model(cfg.arch, weights=None)
    if state is None:
        body = cut(model, cfg.layer).to_empty(device="cpu")
        torch.manual_seed(seed)  # `random` weights are a function of the seed
        init_random(body)
    else:
        try:
            model.load_state_dict(state, assign=True)  # takes the (memory-mapped) tensors as they are
        except RuntimeError as err:
            raise PipelineError(f"extract.weights = {cfg.weights!r} does not fit {cfg.arch}: {err}") from None
        body = cut(model, cfg.layer).float()
    prep = preprocessing(cfg.arch, cfg.image_size)
    extractor = FeatureExtractor(body, cfg.pool, prep, precision).eval().requires_grad_(False)
    return extractor, prep, weights_info


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
    extractor, prep, weights_info = build_extractor(cfg, provenance["seed"], precision or provenance["precision"])
    if weights_info["weights_source"] != provenance["weights_source"]:
        raise PipelineError(
            f"the head was trained on features from {provenance['weights_source']}, but extract.weights = "
            f"{provenance['weights']!r} now gives {weights_info['weights_source']}; re-run the pipeline (dvc repro)"
        )
    return extractor, prep
