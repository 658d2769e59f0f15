"""What every backbone family shares: preprocessing from the model's metadata, the image dataset, the frozen
extractor (normalise, run the cut network, pool), and weight files."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from torchvision.transforms import functional as F

from pipeline.errors import PipelineError
from pipeline.hardware import DTYPES
from pipeline.images import IMAGE_ERRORS

log = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = 15
# What a cut network outputs, and the pools that apply to it: maps (B, C, H, W), vectors (B, D), tokens (B, N, C)
POOLS = {"map": ("avg", "max", "flatten"), "vector": ("flatten",), "tokens": ("cls", "mean")}


# ---------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class Preprocessing:
    """The model's own eval transform, split in two: resize and crop on the CPU, normalise on the device."""

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


def scaled(preset: Preprocessing, image_size: int | str) -> Preprocessing:
    """The preset at crop side ``image_size`` (auto: its own), keeping its resize/crop ratio (256/224 for
    torchvision's VGG)."""
    size = preset.crop_size if image_size == "auto" else int(image_size)
    ratio = preset.resize_size / preset.crop_size
    return Preprocessing(round(size * ratio), size, preset.interpolation, preset.mean, preset.std)


def from_transforms(preset: Any) -> Preprocessing:
    """torchvision's ``weights.transforms()`` (an ImageClassification preset) as a Preprocessing."""
    return Preprocessing(
        preset.resize_size[0], preset.crop_size[0], preset.interpolation.value, tuple(preset.mean), tuple(preset.std)
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


# ---------------------------------------------------------------------------- the network


@dataclass
class Cut:
    """A family's network cut at a layer: normalised float images -> ``output`` (map, vector or tokens)."""

    body: nn.Module
    output: str  # map | vector | tokens
    layer: str  # the layer resolved (auto -> pool5 or penultimate)
    pool: str  # the pool resolved (auto -> avg on a map, flatten on a vector)
    prep: Preprocessing
    weights: dict[str, str]  # weights, weights_source
    prefix_tokens: int = 0  # tokens: the class (and register) tokens before the patch tokens
    versions: dict[str, str] = field(default_factory=dict)  # libraries besides torch that make the rows


class TokenPool(nn.Module):
    """(B, N, C) tokens -> (B, C): the class token, or the mean of the patch tokens (those after the prefix)."""

    def __init__(self, pool: str, prefix_tokens: int) -> None:
        super().__init__()
        self.pool, self.prefix_tokens = pool, prefix_tokens

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 0] if self.pool == "cls" else tokens[:, self.prefix_tokens :].mean(dim=1)


class FeatureExtractor(nn.Module):
    """Frozen network cut at a layer: uint8 images (B, 3, H, W) -> float32 features (B, D).

    Normalisation runs in float32 on the device; the network runs in ``precision`` (bf16/fp16 through
    autocast, fp32 exact), and pooling happens on the device before anything is copied back.
    """

    def __init__(self, body: nn.Module, pool: str, prep: Preprocessing, precision: str = "fp32", prefix: int = 0):
        super().__init__()
        self.body = body
        pools = {
            "avg": lambda: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1)),
            "max": lambda: nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(1)),
            "flatten": lambda: nn.Flatten(1),
        }
        self.pool = pools[pool]() if pool in pools else TokenPool(pool, prefix)
        self.precision = precision
        self.register_buffer("mean", torch.tensor(prep.mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(prep.std).view(1, 3, 1, 1) * 255)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std  # same as (x / 255 - mean) / std
        if self.precision == "fp32":
            return self.pool(self.body(x))
        with torch.autocast(x.device.type, dtype=DTYPES[self.precision]):
            return self.pool(self.body(x)).float()


def resolve_pool(pool: str, output: str, where: str) -> str:
    """``extract.pool`` for a cut with this output: auto picks avg on a map and the vector as it is."""
    if pool == "auto":
        return {"map": "avg", "vector": "flatten"}[output]
    if pool not in POOLS[output]:
        kind = {"map": "a feature map", "vector": "a vector", "tokens": "tokens"}[output]
        raise PipelineError(
            f"extract.pool = {pool!r} is not valid for {where}, which outputs {kind}: expected auto | "
            + " | ".join(POOLS[output])
        )
    return pool


def choose_layer(layer: str, valid: Sequence[str], arch: str) -> str:
    """``extract.layer`` checked against the model's layers (auto: the first, its default)."""
    if layer == "auto":
        return valid[0]
    if layer not in valid:
        raise PipelineError(f"extract.layer = {layer!r} is not a layer of {arch}: expected auto | {' | '.join(valid)}")
    return layer


# ---------------------------------------------------------------------------- weight files


def torch_load(path: Path) -> dict[str, torch.Tensor]:
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


def state_file(spec: str) -> tuple[Path, dict[str, str]]:
    """The state-dict file that ``extract.weights`` names, and its provenance (by content)."""
    path = Path(spec)
    if not path.is_file():
        raise PipelineError(
            f"extract.weights = {spec!r} is not valid: expected imagenet | random | the path of a state-dict file"
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return path, {"weights": spec, "weights_source": f"file {path.name} sha256:{digest}"}


def hub_checkpoint(url: str) -> Path:
    """The torch hub cache's copy of ``url``; downloaded only when absent, failing fast when that is impossible."""
    cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
    filename = os.path.basename(url)
    cached = cache_dir / filename
    if cached.is_file():
        return cached
    log.info("downloading %s to %s", url, cache_dir)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # bounds connect and stalled reads, not a slow download
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        match = torch.hub.HASH_REGEX.search(filename)  # vgg16-397923af.pth -> 397923af
        torch.hub.download_url_to_file(url, str(cached), hash_prefix=match.group(1) if match else None)
    except (OSError, RuntimeError) as err:
        raise PipelineError(
            f"ImageNet weights {filename} are not in the torch hub cache and could not be downloaded "
            f"({type(err).__name__}: {err}). Either put {filename} in {cache_dir}/ (set TORCH_HOME to move "
            "that cache), or set extract.weights to the path of a local state-dict file, or run offline "
            "with extract.weights: random (make repro WEIGHTS=random)"
        ) from None
    finally:
        socket.setdefaulttimeout(previous)
    return cached
