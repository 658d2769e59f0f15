"""Where tensors run: the device named by ``extract.device`` / ``train.device``."""

from __future__ import annotations

import torch

from pipeline.errors import PipelineError


def resolve_device(spec: str) -> torch.device:
    """``auto`` picks the current CUDA device when there is one; an explicit CUDA device must exist. A CUDA
    device always comes with its index (``torch.cuda.set_device`` refuses a bare ``cuda``)."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if (device.index or 0) >= count:
            found = f"{count} CUDA device(s)" if count else "no CUDA device"
            raise PipelineError(f"device {spec!r} was asked for, but this machine has {found}; use auto or cpu")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def native_bf16_cpu() -> bool:
    """True on CPUs that run bf16 matrix work in hardware (AVX512-BF16 or AMX), where it beats fp32."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_precision(spec: str, device: torch.device) -> str:
    """``auto``: bf16 where the hardware runs it natively, else fp16 on CUDA and fp32 on the CPU."""
    if spec != "auto":
        return spec
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "bf16" if native_bf16_cpu() else "fp32"
