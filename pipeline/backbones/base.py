"""What every backbone family shares: preprocessing from the model's metadata, the image dataset, and the
contract of a cut: the family reports what its cut outputs (:class:`Output`), and the pools are chosen, checked
and run here alone, in the frozen extractor (normalise, run the cut network, pool). Weights: ``weights``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from torchvision.transforms import functional as F

from pipeline.errors import PipelineError
from pipeline.hardware import DTYPES
from pipeline.images import FRAME, IMAGE_ERRORS

log = logging.getLogger(__name__)

# What a cut network outputs, and the pools that apply to it, the default first: maps (B, C, H, W), vectors
# (B, D), tokens (B, N, C)
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
        """PIL image -> (3, crop, crop) uint8 tensor, as the weights' transform does before scaling. A JPEG that
        ``open_image`` reduced is resized from the region that the whole photo covers (its ``info[FRAME]``), to
        the size that the full photo would get: as torchvision's ``Resize``, short side to ``resize_size``."""
        mode = F.InterpolationMode(self.interpolation)
        frame = image.info.get(FRAME)
        if frame is None:
            image = F.resize(image, [self.resize_size], interpolation=mode, antialias=True)
        else:  # torchvision's own output size, from the photo's proportions (exact: the scale is a power of 2)
            w, h = frame[2] - frame[0], frame[3] - frame[1]
            long = int(self.resize_size * max(w, h) / min(w, h))
            size = (self.resize_size, long) if w <= h else (long, self.resize_size)
            image = image.resize(size, F.pil_modes_mapping[mode], box=frame)
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


@dataclass(frozen=True)
class Output:
    """What a cut network outputs, as its family reports it: the pools that fit follow from this alone."""

    kind: str  # map (B, C, H, W) | vector (B, D) | tokens (B, N, C)
    layout: str = "NCHW"  # a map's axes: NCHW, or NHWC (Swin, MambaOut); pooled alike, to the same width
    class_token: bool = False  # tokens: token 0 is a class token
    prefix: int = 0  # tokens: the class and register tokens before the patch tokens

    def __post_init__(self) -> None:
        if self.kind not in POOLS or self.layout not in ("NCHW", "NHWC"):
            raise ValueError(f"an output is map | vector | tokens, NCHW | NHWC, not {self.kind} {self.layout}")

    @property
    def pools(self) -> tuple[str, ...]:
        """cls needs a class token: a ViT with registers alone has none (timm's ``*_reg*_gap``)."""
        return tuple(p for p in POOLS[self.kind] if p != "cls" or self.class_token)

    def describe(self) -> str:
        if self.kind == "tokens":
            return "tokens" if self.class_token else "tokens without a class token"
        return {"map": "a feature map", "vector": "a vector"}[self.kind]


def choose_pool(pool: str, outputs: Sequence[Output], where: str) -> tuple[int, str]:
    """Which of a layer's outputs ``extract.pool`` takes, and the pool resolved: the first output that the pool
    fits (auto: the first output, avg on a map, flatten on a vector, cls on tokens with a class token, else
    mean). A pool that fits none is refused in one line with the valid ones."""
    if pool == "auto":
        return 0, outputs[0].pools[0]
    for index, output in enumerate(outputs):
        if pool in output.pools:
            return index, pool
    valid = dict.fromkeys(p for output in outputs for p in output.pools)
    kinds = " or ".join(dict.fromkeys(output.describe() for output in outputs))
    raise PipelineError(
        f"extract.pool = {pool!r} is not valid for {where}, which outputs {kinds}: expected auto | {' | '.join(valid)}"
    )


class Pool(nn.Module):
    """(B, …) -> (B, D), as ``pool`` reads ``output``: avg or max over a map's positions, or its C x H x W values
    in NCHW order (NHWC maps alike); a vector as it is; a class token, or the mean of the patch tokens alone (the
    tokens after the class and register tokens, as timm's ``global_pool='avg'``)."""

    def __init__(self, pool: str, output: Output) -> None:
        super().__init__()
        if pool not in output.pools:
            raise ValueError(f"pool {pool!r} does not fit {output}")
        self.pool, self.output = pool, output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind, pool = self.output.kind, self.pool
        if kind == "tokens":
            return x[:, 0] if pool == "cls" else x[:, self.output.prefix :].mean(dim=1)
        if kind == "map" and self.output.layout == "NHWC":
            x = x.permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)
        if pool == "avg":  # the adaptive pools, as before this class: a row's bits stay those of its store
            return nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        if pool == "max":
            return nn.functional.adaptive_max_pool2d(x, 1).flatten(1)
        return x.flatten(1)


@dataclass
class Cut:
    """A family's network cut at a layer: normalised float images -> ``output``."""

    body: nn.Module
    output: Output
    layer: str  # the layer resolved (auto -> pool5 or penultimate)
    pool: str  # the pool resolved (auto -> avg on a map, flatten on a vector)
    prep: Preprocessing
    weights: dict[str, str]  # weights, weights_source
    versions: dict[str, str] = field(default_factory=dict)  # libraries besides torch that make the rows


class FeatureExtractor(nn.Module):
    """Frozen network cut at a layer: uint8 images (B, 3, H, W) -> float32 features (B, D).

    Normalisation runs in float32 on the device; the network runs in ``precision`` (bf16/fp16 through
    autocast, fp32 exact), and pooling happens on the device before anything is copied back.
    """

    def __init__(self, cut: Cut, precision: str = "fp32"):
        super().__init__()
        self.body = cut.body
        self.pool = Pool(cut.pool, cut.output)
        self.precision = precision
        self.register_buffer("mean", torch.tensor(cut.prep.mean).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(cut.prep.std).view(1, 3, 1, 1) * 255)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - self.mean) / self.std  # same as (x / 255 - mean) / std
        if self.precision == "fp32":
            return self.pool(self.body(x))
        with torch.autocast(x.device.type, dtype=DTYPES[self.precision]):
            return self.pool(self.body(x)).float()


def choose_layer(layer: str, valid: Sequence[str], arch: str) -> str:
    """``extract.layer`` checked against the model's layers (auto: the first, its default)."""
    if layer == "auto":
        return valid[0]
    if layer not in valid:
        raise PipelineError(f"extract.layer = {layer!r} is not a layer of {arch}: expected auto | {' | '.join(valid)}")
    return layer
