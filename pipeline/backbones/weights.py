"""Weights for every family: the one loader of a state-dict file into a cut network, its provenance, and the
download of ImageNet weights with a bounded wait.

A weights file is most often a model fine-tuned on the user's own classes, so its classifier has another size
than ImageNet's. The cut never runs the classifier, so the loader takes from the file exactly the tensors that the
cut uses, checks their names and shapes, and ignores the rest. It accepts what training scripts save: a bare
state dict, a checkpoint dict that holds one (``model``, ``state_dict``, ``model_state_dict``), and keys prefixed
``module.`` (DataParallel, DistributedDataParallel) or ``_orig_mod.`` (``torch.compile``).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import os
import pickle
import re
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = 15
RANDOM = {"weights": "random", "weights_source": "random init seeded by params seed"}
CHECKPOINT_KEYS = ("model", "state_dict", "model_state_dict")  # where training scripts put the state dict
PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP, and torch.compile
OPTIONAL = ("num_batches_tracked",)  # buffers that eval never reads: older files lack them
SHOWN = 3  # keys named in an error
SAFE = [argparse.Namespace]  # besides tensors and containers: the `args` that timm's and DeiT's checkpoints hold


def imagenet(source: str) -> dict[str, str]:
    """The provenance of a family's ImageNet weights, named by ``source`` (an enum member, a hub tag)."""
    return {"weights": "imagenet", "weights_source": source}


def check(spec: str) -> None:
    """Refuse an ``extract.weights`` that is none of imagenet, random or an existing file, in one line."""
    if spec not in ("imagenet", "random") and not Path(spec).is_file():
        raise PipelineError(
            f"extract.weights = {spec!r} is not valid: expected imagenet | random | the path of a state-dict file"
        )


def state_file(spec: str) -> tuple[Path, dict[str, str]]:
    """The state-dict file that ``extract.weights`` names, and its provenance (by content)."""
    check(spec)
    path = Path(spec)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return path, {"weights": spec, "weights_source": f"file {path.name} sha256:{digest}"}


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in ``path``: tensors only (``weights_only``), memory-mapped where the format allows, so that
    tensors the cut does not use are never read from disk; unwrapped from a checkpoint dict, prefixes removed."""
    try:
        with torch.serialization.safe_globals(SAFE):
            try:
                loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
                loaded = torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-zip) format
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: (GLOBAL )?(\S+)", str(err))
        if found is None:  # not a pickle at all
            raise PipelineError(f"{path} is not a loadable state dict: {_first_line(err)}") from None
        raise PipelineError(  # weights_only met a Python object other than SAFE's
            f"{path} holds a Python object ({found.group(2)}) besides tensors, which is never unpickled here "
            "(torch.load's weights_only): where it was trained, save the state dict alone, "
            "torch.save(checkpoint['model'], 'weights.pth'), with the key that holds it"
        ) from None
    except Exception as err:  # torch raises many types for a damaged or foreign file
        raise PipelineError(f"{path} is not a loadable state dict: {_first_line(err)}") from None
    return _unprefixed(_unwrapped(loaded, path))


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _is_state(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrapped(loaded: Any, path: Path) -> Mapping[str, torch.Tensor]:
    if _is_state(loaded):
        return loaded
    for key in CHECKPOINT_KEYS if isinstance(loaded, Mapping) else ():
        if _is_state(loaded.get(key)):
            log.info("%s: the state dict under %r of the checkpoint", path, key)
            return loaded[key]
    held = f"a dict of {_few([repr(k) for k in loaded])}" if isinstance(loaded, Mapping) else type(loaded).__name__
    raise PipelineError(
        f"{path} holds {held}, not a state dict nor a checkpoint with one under {' | '.join(CHECKPOINT_KEYS)}: "
        "save the model's weights alone, torch.save(model.state_dict(), path)"
    )


def _unprefixed(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(state)
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in out):
            out = {k.removeprefix(prefix): v for k, v in out.items()}
    return out


def needed(model: nn.Module, body: nn.Module, dropped: Iterable[nn.Module] = ()) -> list[str]:
    """The state-dict keys of ``model`` whose tensors ``body`` (a cut that shares its modules) holds, less those
    of ``dropped`` (a classifier that the cut keeps but never runs)."""
    unused = {id(t) for m in dropped for t in m.state_dict(keep_vars=True).values()}
    used = {id(t) for t in body.state_dict(keep_vars=True).values()} - unused
    return [k for k, t in model.state_dict(keep_vars=True).items() if id(t) in used]


Convert = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


def load(
    model: nn.Module,
    keys: Iterable[str],
    state: Mapping[str, torch.Tensor],
    *,
    source: str,
    target: str,
    adapt: Convert | None = None,
    known: Iterable[str] | None = None,
) -> None:
    """Copy ``state``'s tensors of ``keys`` into ``model`` (materialised), in place, so that a cut sharing its
    modules sees them. Refuses in one line ("``source`` does not fit ``target``: …") when one of them is missing
    or has another shape; every other tensor of the file (its classifier, layers past the cut) is ignored, and
    those that the model lacks are named in a warning. ``adapt``: the family's conversion of a file to its
    model's names and shapes (timm's checkpoint filters), applied first. ``known``: the model's keys before it
    was pruned to its cut (default: its keys now)."""
    state = dict(state)
    if adapt is not None:
        try:
            state = adapt(state)
        except Exception as err:  # a family's converter meets a file it does not know
            raise PipelineError(f"{source} does not fit {target} ({type(err).__name__}: {err})") from None
    own, keys = model.state_dict(keep_vars=True), list(keys)
    problems = _misfits(keys, state, own)
    if problems:
        raise PipelineError(f"{source} does not fit {target}: {problems}. It must hold the weights of this model")
    known = own.keys() if known is None else set(known)
    foreign = [k for k in state if k not in known]
    if foreign:
        log.warning("%s: %d of its tensors are not in %s (%s): the weights of another model?",
                    source, len(foreign), target, _few(foreign))  # fmt: skip
    with torch.no_grad():
        for k in keys:
            if k in state:
                own[k].copy_(state[k])


def _misfits(keys: list[str], state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> str:
    """What of ``keys`` the file lacks or holds in another shape, in words ("" when nothing)."""
    missing = [k for k in keys if k not in state and not k.endswith(OPTIONAL)]
    shapes = [k for k in keys if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    found = []
    if missing:
        found.append(f"{len(missing)} of the {len(keys)} tensors that the cut needs are missing ({_few(missing)})")
    if shapes:
        wrong = [f"{k} {tuple(state[k].shape)} instead of {tuple(own[k].shape)}" for k in shapes]
        found.append(f"{len(shapes)} of another shape ({_few(wrong)})")
    return "; ".join(found)


def from_file(
    spec: str,
    model: nn.Module,
    body: nn.Module,
    *,
    target: str,
    dropped: Iterable[nn.Module] = (),
    adapt: Convert | None = None,
    known: Iterable[str] | None = None,
) -> dict[str, str]:
    """Load the file that ``extract.weights`` names into ``model``, for the cut ``body`` (see ``needed`` and
    ``load``); its provenance."""
    path, info = state_file(spec)
    keys, source = needed(model, body, dropped), f"extract.weights = {spec!r}"
    load(model, keys, read_state(path), source=source, target=target, adapt=adapt, known=known)
    return info


def _few(names: list[str]) -> str:
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more


@contextlib.contextmanager
def download_timeout() -> Iterator[None]:
    """Bounds a download's connect and stalled reads (not a slow download), for this process, while it lasts."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def hub_checkpoint(url: str) -> Path:
    """The torch hub cache's copy of ``url``; downloaded only when absent, failing fast when that is impossible."""
    cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
    filename = os.path.basename(url)
    cached = cache_dir / filename
    if cached.is_file():
        return cached
    log.info("downloading %s to %s", url, cache_dir)
    try:
        with download_timeout():
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
    return cached
