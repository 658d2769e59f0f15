"""Where tensors run: the device named by ``extract.device`` / ``train.device``."""

from __future__ import annotations

import torch

from pipeline.errors import PipelineError


def resolve_device(spec: str) -> torch.device:
    """``auto`` picks the first CUDA device when there is one; an explicit CUDA device must exist."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if (device.index or 0) >= count:
            found = f"{count} CUDA device(s)" if count else "no CUDA device"
            raise PipelineError(f"device {spec!r} was asked for, but this machine has {found}; use auto or cpu")
    return device
