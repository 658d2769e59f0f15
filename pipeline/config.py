"""Typed parameters: one frozen dataclass per ``params.yaml`` section, and the only reader of that file.

Every key is checked before any work: unknown keys (with the closest valid name), types, ranges
and choices. A failure raises :class:`ConfigError` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import PipelineError

PARAMS_FILE = Path("params.yaml")

Source = Literal["digits", "imagefolder", "cifar10"]
Layout = Literal["auto", "classes", "splits"]
Pool = Literal["auto", "avg", "max", "flatten", "cls", "mean"]  # maps: avg | max | flatten; ViT tokens: cls | mean
View = Literal["original", "hflip"]
StorageDtype = Literal["float16", "float32"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
Compression = Literal["none", "lzf"]
Decode = Literal["fast", "exact", "device"]
HeadKind = Literal["linear", "mlp", "logreg"]
Optimizer = Literal["sgd", "adamw"]

_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")


class ConfigError(PipelineError):
    """A parameter in ``params.yaml`` is unknown, of the wrong type or out of range."""


def _range(default: float, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> Any:
    """A numeric field with its default and its allowed range (``lo_open``: the bound itself is excluded)."""
    return field(default=default, metadata={"lo": lo, "hi": hi, "lo_open": lo_open})


@dataclass(frozen=True)
class DataConfig:
    source: Source = "digits"
    root: str = "data/raw"
    layout: Layout = "auto"  # imagefolder: are the top folders classes or train/ val/ test/? (folders.layout)
    download: bool = False
    val_fraction: float = _range(0.1, 0.0, 0.9, lo_open=True)
    test_fraction: float = _range(0.2, 0.0, 0.9, lo_open=True)
    per_class_limit: int = _range(0, 0)
    on_bad_image: Literal["raise", "skip"] = "raise"  # skip: scan decodes every image, prepare leaves bad ones out


@dataclass(frozen=True)
class ExtractConfig:
    arch: str = "vgg16"  # a torchvision classification model, or timm/<name>; checked by pipeline.backbones
    weights: str = "imagenet"  # imagenet | random | path to a state dict
    layer: str = "auto"  # auto: pool5 for a VGG, penultimate for any other model (pipeline.backbones)
    pool: Pool = "auto"  # auto: avg for a feature map, the model's own pooling for its pre-logits
    image_size: int | Literal["auto"] = _range(64, 32, 1024)  # auto: the crop of the model's own preprocessing
    views: tuple[View, ...] = ("original",)
    batch_size: int = _range(64, 1)
    storage_dtype: StorageDtype = "float16"
    device: str = "auto"
    num_workers: int | Literal["auto"] = _range("auto", 0, 64)  # auto: hardware.decode_workers
    decode: Decode = "fast"  # fast: large JPEGs at a reduced DCT scale (images.open_image); exact: full; device: on it
    precision: Precision = "auto"  # auto: bf16 on CPUs with native bf16 and on CUDA (fp16 where bf16 is missing)
    compile: bool = False  # torch.compile the network for a fixed batch shape
    compression: Compression = "none"  # HDF5 filter of the feature datasets
    nproc: int = _range(1, 1, 1024)  # processes on this machine (one per GPU); the features do not depend on it
    keep_stores: int = _range(5, 0)  # row stores kept (pipeline.store): this setting's and the last used others


@dataclass(frozen=True)
class TrainConfig:
    head: HeadKind = "mlp"
    hidden: tuple[int, ...] = (512, 256)
    dropout: float = _range(0.5, 0.0, 1.0)
    standardize: bool = True
    optimizer: Optimizer = "sgd"
    lr: float = _range(0.01, 0.0, lo_open=True)
    momentum: float = _range(0.8, 0.0, 1.0)
    weight_decay: float = _range(0.001, 0.0)
    epochs: int = _range(30, 1)
    batch_size: int = _range(64, 1)
    lr_step: int = _range(10, 1)
    lr_gamma: float = _range(0.5, 0.0, 1.0, lo_open=True)
    logreg_C: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
    device: str = "auto"
    in_memory_mb: int = _range(4096, 0)  # larger training splits (float32, all views) are streamed in blocks


@dataclass(frozen=True)
class EvaluateConfig:
    top_k: int = _range(5, 1)
    knn_k: int = _range(20, 0)  # neighbours of the training-free k-NN accuracy (knn_acc); 0 turns it off
    knn_temperature: float = _range(0.07, 0.0, lo_open=True)  # of the similarity-weighted votes, as in DINOv2


@dataclass(frozen=True)
class AuditConfig:
    k: int = _range(10, 1)  # neighbours of each image in train: its label votes and its outlier score
    duplicate_ratio: float = _range(
        0.5, 0.0, 1.0
    )  # near-duplicates: closer than this x the second neighbour's distance
    outlier_z: float = _range(10.0, 0.0, lo_open=True)  # outliers: mean neighbour distance this many robust SDs out
    temperature: float = _range(0.07, 0.0, lo_open=True)  # of the label votes, exp(similarity / T), as knn_acc's


@dataclass(frozen=True)
class CurveConfig:
    shots: tuple[int, ...] = field(default=(1, 2, 4, 8, 16, 0), metadata={"lo": 0})  # images per class; 0: all
    seeds: int = _range(5, 1)  # draws of each number of images, each with its own subset and head


@dataclass(frozen=True)
class Params:
    seed: int = _range(0, 0, 2**32 - 1)
    data: DataConfig = field(default_factory=DataConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    curve: CurveConfig = field(default_factory=CurveConfig)


def dvc_path(name: str, dvc_yaml: str | Path = "dvc.yaml") -> Path:
    """A path named under ``vars: paths:`` in dvc.yaml: the default of every path a stage or command takes."""
    try:
        for entry in yaml.safe_load(Path(dvc_yaml).read_text())["vars"]:
            if isinstance(entry, dict) and name in entry.get("paths", {}):
                return Path(entry["paths"][name])
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        pass
    raise ConfigError(f"no path {name!r} under vars: paths: in {dvc_yaml}: run from the project root")


def with_dvc_paths(args: argparse.Namespace, **names: str) -> argparse.Namespace:
    """``args`` with each path argument that was not given (``argument=name``) taken from dvc.yaml, so that a
    stage run by hand, ``python -m pipeline.<stage>``, reads and writes what ``dvc repro`` would."""
    for arg, name in names.items():
        if getattr(args, arg) is None:
            setattr(args, arg, dvc_path(name))
    return args


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate ``params.yaml``; every key is checked before any stage does work."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found: run the stage from the project root, where params.yaml is")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    return parse_params(raw)


def parse_params(raw: Any) -> Params:
    """Build :class:`Params` from the already-parsed YAML mapping."""
    params = _build(Params, raw, "")
    _check_combinations(params)
    return params


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "params.yaml"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} = {raw!r} is not valid: expected a mapping of keys to values")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
            allowed = ", ".join(prefix + name for name in fields)
            raise ConfigError(f"unknown key '{prefix}{key}'{hint} Valid keys here: {allowed}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        if name not in raw:
            continue  # the dataclass default applies
        values[name] = _coerce(hints[name], raw[name], f"{prefix}{name}", f.metadata)
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str, meta: typing.Mapping[str, Any]) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{key} = {value!r} is not valid: expected {expected}")

    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(hint):
            try:
                return _coerce(arm, value, key, meta)
            except ConfigError:
                pass
        raise bad(" or ".join(_describe(arm, meta) for arm in typing.get_args(hint)))
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise bad("one of " + " | ".join(map(str, choices)))
        return value
    if origin is tuple:
        (item,) = {a for a in typing.get_args(hint) if a is not Ellipsis}
        if not isinstance(value, list):
            raise bad(f"a list of {_describe(item)}")
        return tuple(_coerce(item, v, f"{key}[{i}]", meta) for i, v in enumerate(value))
    if hint is bool:
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if hint is str:
        if not isinstance(value, str) or not value:
            raise bad("a non-empty string")
        return value
    if hint in (int, float):
        ok = isinstance(value, int) if hint is int else isinstance(value, (int, float))
        if not ok or isinstance(value, bool):
            raise bad(_describe(hint, meta))
        lo, hi = meta.get("lo"), meta.get("hi")
        too_low = lo is not None and (value <= lo if meta.get("lo_open") else value < lo)
        if too_low or (hi is not None and value > hi):
            raise bad(_describe(hint, meta))
        return hint(value)
    raise AssertionError(f"unsupported parameter type {hint!r} for {key}")


def _describe(hint: Any, meta: typing.Mapping[str, Any] | None = None) -> str:
    if typing.get_origin(hint) is Literal:
        return " | ".join(map(str, typing.get_args(hint)))
    noun = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[hint]
    meta = meta or {}
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and hi is not None:
        return f"{noun} in {'(' if meta.get('lo_open') else '['}{lo}, {hi}]"
    if lo is not None:
        return f"{noun} {'>' if meta.get('lo_open') else '>='} {lo}"
    return noun


def _check_combinations(p: Params) -> None:
    """Checks that involve more than one key."""
    if p.data.val_fraction + p.data.test_fraction >= 1.0:
        raise ConfigError(
            f"data.val_fraction + data.test_fraction = {p.data.val_fraction + p.data.test_fraction:g} "
            "is not valid: expected a sum below 1, leaving images to train on"
        )
    ex = p.extract
    if ex.views[:1] != ("original",) or len(set(ex.views)) != len(ex.views):
        raise ConfigError(
            f"extract.views = {list(ex.views)!r} is not valid: expected 'original' first, "
            "then optionally 'hflip', without repeats"
        )
    for key, device in (("extract.device", ex.device), ("train.device", p.train.device)):
        if not _DEVICE.match(device):
            raise ConfigError(f"{key} = {device!r} is not valid: expected auto | cpu | cuda | cuda:N | mps")
    if not p.train.logreg_C or any(c <= 0 for c in p.train.logreg_C):
        raise ConfigError(
            f"train.logreg_C = {list(p.train.logreg_C)!r} is not valid: expected a non-empty list of numbers > 0"
        )
    if any(h < 1 for h in p.train.hidden):
        raise ConfigError(f"train.hidden = {list(p.train.hidden)!r} is not valid: expected layer widths >= 1")
    shots = p.curve.shots
    if not shots or len(set(shots)) != len(shots):
        raise ConfigError(
            f"curve.shots = {list(shots)!r} is not valid: expected a non-empty list of images per class "
            "(integers >= 0, 0 for all of them), without repeats"
        )


def defaults() -> dict[str, Any]:
    """Every parameter at its default, nested as params.yaml holds them (mappings and lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value

    return plain(dataclasses.asdict(Params()))


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain, JSON-able form of a config section, for logs and provenance."""
    out = dataclasses.asdict(obj)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}
