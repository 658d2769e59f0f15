"""Where work runs: the device named by ``extract.device`` / ``train.device``, its precision, and the decode
processes beside it."""

from __future__ import annotations

import os

import torch

from pipeline.errors import PipelineError


def resolve_device(spec: str) -> torch.device:
    """``auto`` picks the current CUDA device when there is one, else a Mac's GPU (MPS), else the CPU; an explicit
    CUDA or MPS device must exist. A CUDA device always comes with its index (``torch.cuda.set_device`` refuses a
    bare ``cuda``)."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = torch.device(spec)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise PipelineError(
            f"device {spec!r} was asked for, but this machine has no MPS device (a Mac's GPU through Metal, macOS "
            "12.3 or later, with a PyTorch built for it); use auto or cpu"
        )
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
    """``auto``: bf16 where the hardware runs it natively, else fp16 on CUDA and fp32 on the CPU and on MPS."""
    if spec != "auto":
        return spec
    if device.type == "mps":
        # torch.autocast("mps") exists, but torch's documentation nowhere says that it is reliable (bf16 there
        # needs macOS 14 besides): fp32 always works. An explicit fp16 or bf16 still runs through autocast on MPS.
        return "fp32"
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "bf16" if native_bf16_cpu() else "fp32"


def usable_cores() -> int:
    """The cores this process may run on: its affinity mask where the system has one (Linux), else Python's count
    for the process (3.13+), else the machine's (macOS and Windows before 3.13)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    if hasattr(os, "process_cpu_count"):
        return os.process_cpu_count() or 1
    return os.cpu_count() or 1


MIN_DECODE_WORKERS = 2
MAX_DECODE_WORKERS = 32  # past this, a process's decode workers cost memory and start-up for no throughput


def decode_workers(spec: int | str, processes: int = 1) -> int:
    """DataLoader workers for one of ``processes`` extraction processes on this machine. ``auto``: its share of
    the cores this process may use, less one for the process itself (which feeds the GPU, or runs the network on
    the CPU), at least 2 and at most MAX_DECODE_WORKERS. Two at least: where the network shares the cores with
    decoding (a CPU run), one worker is descheduled as often as not, and the network waits for its batch."""
    if spec != "auto":
        return int(spec)
    share = usable_cores() // max(1, processes)
    return max(MIN_DECODE_WORKERS, min(share - 1, MAX_DECODE_WORKERS))
