"""What the features were made with, in one place: the provenance fields of a feature file, the part of them
that must match between files and heads (their identity), the record of an extraction setting, and the settings
that pick the row store of its rows (with ROWS_VERSION, the version of the code that makes a row)."""

from __future__ import annotations

import platform
from collections.abc import Mapping
from typing import Any

import PIL
import torch

from pipeline.config import ExtractConfig
from pipeline.errors import PipelineError

SCHEMA = 1  # the layout of a feature file (pipeline.features)
# What determines the features; train and evaluate compare these against what they were asked to use.
IDENTITY_KEYS = (
    "arch", "weights", "layer", "pool", "image_size", "decode", "precision", "views", "storage_dtype", "class_names",
)  # fmt: skip
PROVENANCE_KEYS = IDENTITY_KEYS + (
    "schema",
    "split",
    "feature_dim",
    "weights_source",
    "seed",
    "resize_size",
    "interpolation",
    "mean",
    "std",
    "torch_version",
    "torchvision_version",
)
OPTIONAL_KEYS = ("decoder", "timm_version")  # written where the setting has them: decode: device, timm models

# The version of the code that turns an image's bytes into its row (decoding, preprocessing, the cut, the forward
# pass): part of what picks a row store, so that rows made by other code are never mixed in. Raise it whenever that
# code changes what a row holds, and name in ROWS_CHANGED the decodes whose rows it changed: the stores of the
# others keep their names and their rows. tests/test_extract.py ties it to the code. 1: the rows of every release
# before this constant, whose stores keep their names (the version joins the settings from 2 on).
ROWS_VERSION = 2
ROWS_CHANGED = {2: ("fast",)}  # 2: a reduced JPEG is resized from the region the photo covers (images.FRAME)


def identity(provenance: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a provenance that determines the features (what must match between files and heads)."""
    return {key: provenance.get(key) for key in IDENTITY_KEYS}  # a key older files lack is None: a mismatch


def check_provenance(provenance: Mapping[str, Any], expected: Mapping[str, Any], *, source: str) -> None:
    """Refuse features (or a head) made with other settings than the ones asked for, naming what differs."""
    for key, want in expected.items():
        have = provenance.get(key)
        if have != want:
            raise PipelineError(
                f"{source} was made with {key} = {have!r}, but {want!r} is asked for. "
                "Re-run the stages before this one (dvc repro) so that they match"
            )


def of_extraction(cfg: ExtractConfig, seed: int, precision: str, prep: Any, built: dict[str, Any]) -> dict[str, Any]:
    """The provenance attributes shared by every split file (split and class names are added). ``prep``: the
    backbone's Preprocessing (not imported here: train and evaluate read provenance without any backbone);
    ``built``: what building the backbone resolved (layer, pool, image size, feature width) and its weights."""
    import torchvision  # here alone: at the top it would cost every stage that reads features 1.5 s of start-up

    resolved = ("layer", "pool", "image_size", "feature_dim")
    return {
        "schema": SCHEMA,
        "arch": cfg.arch,
        "seed": seed,
        "precision": precision,
        "layer": built["layer"],
        "pool": built["pool"],
        "image_size": built["image_size"],
        "decode": cfg.decode,
        "resize_size": prep.resize_size,
        "interpolation": prep.interpolation,
        "mean": list(prep.mean),
        "std": list(prep.std),
        "views": list(cfg.views),
        "storage_dtype": cfg.storage_dtype,
        "feature_dim": built["feature_dim"],
        "torch_version": str(torch.__version__),  # TorchVersion, a str subclass h5py cannot store
        "torchvision_version": str(torchvision.__version__),
    } | {k: v for k, v in built.items() if k not in resolved}  # weights, then timm_version for timm models


def rows_version(decode: str) -> int:
    """The last ROWS_VERSION that changed the rows of ``decode``: what picks its store."""
    return max([1, *(v for v, changed in ROWS_CHANGED.items() if v <= ROWS_VERSION and decode in changed)])


def store_settings(
    base: Mapping[str, Any], cfg: ExtractConfig, device: torch.device, threads: int | None
) -> dict[str, Any]:
    """What picks a setting's row store: what a row's bytes depend on; not the class names (renaming a class
    folder reuses its rows), nor the views (each view has its own rows), nor the seed with trained weights.
    ``threads``: the CPU threads, where rows depend on them (backbones.thread_dependent)."""
    ignored = ("class_names", "views") + (() if cfg.weights == "random" else ("seed",))
    settings = {k: v for k, v in base.items() if k not in ignored}
    version = rows_version(cfg.decode)
    settings |= {"rows": version} if version > 1 else {}  # the code that makes a row,
    settings |= {
        "batch_size": cfg.batch_size,  # the batch shape can change the last bits, and so can
        "compile": cfg.compile,  # compiled kernels,
        "device": device.type,
        "pillow": PIL.__version__,  # the decoder and resampling,
        "cuda": torch.version.cuda if device.type == "cuda" else None,  # and the GPU libraries
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
    }
    settings |= {"macos": platform.mac_ver()[0]} if device.type == "mps" else {}  # Metal's kernels come with macOS
    settings |= {"threads": threads} if threads else {}
    return settings
