from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import hardware
from pipeline.errors import PipelineError
from pipeline.hardware import decode_workers, native_bf16_cpu, resolve_device, resolve_precision, usable_cores

CPU = torch.device("cpu")
MPS = torch.device("mps")
CUDA0 = torch.device("cuda", 0)
ROOT = Path(__file__).resolve().parents[1]


def machine(monkeypatch: pytest.MonkeyPatch, *, cuda: bool, mps: bool) -> None:
    """Pretend to be a machine with or without a CUDA GPU (one) and Apple's GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: int(cuda))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)


def test_auto_device_is_cuda_only_when_there_is_one():
    gpu = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto").type == gpu
    assert resolve_device("cpu") == CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_missing_cuda_device_is_a_clear_error():
    with pytest.raises(PipelineError, match="'cuda:1' was asked for, but this machine has no CUDA device"):
        resolve_device("cuda:1")


@pytest.mark.parametrize(
    ("cuda", "mps", "expected"), [(True, True, CUDA0), (False, True, MPS), (True, False, CUDA0), (False, False, CPU)]
)
def test_auto_device_is_cuda_then_apples_gpu_then_the_cpu(monkeypatch, cuda: bool, mps: bool, expected: torch.device):
    machine(monkeypatch, cuda=cuda, mps=mps)
    assert resolve_device("auto") == expected


def test_apples_gpu_is_taken_where_it_is_and_refused_in_one_line_where_it_is_not(monkeypatch):
    machine(monkeypatch, cuda=False, mps=True)
    assert resolve_device("mps") == MPS
    machine(monkeypatch, cuda=True, mps=False)
    with pytest.raises(PipelineError, match="^device 'mps' was asked for, but this machine has no MPS device") as err:
        resolve_device("mps")
    assert "\n" not in str(err.value) and str(err.value).endswith("use auto or cpu")


def test_auto_precision_on_apples_gpu_is_fp32_and_an_explicit_one_is_kept(monkeypatch):
    monkeypatch.setattr(hardware, "native_bf16_cpu", lambda: True)  # whatever the CPU beside it does
    assert resolve_precision("auto", MPS) == "fp32"
    assert resolve_precision("fp16", MPS) == "fp16" and resolve_precision("bf16", MPS) == "bf16"


def test_auto_precision_on_the_cpu_follows_native_bf16_support():
    assert resolve_precision("auto", CPU) == ("bf16" if native_bf16_cpu() else "fp32")
    assert resolve_precision("fp32", CPU) == "fp32" and resolve_precision("fp16", CPU) == "fp16"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_device_comes_with_its_index():
    assert resolve_device("auto").index is not None and resolve_device("cuda").index is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_precision_on_cuda_is_half():
    assert resolve_precision("auto", torch.device("cuda")) in ("bf16", "fp16")


@pytest.mark.parametrize(
    ("cores", "processes", "workers"),
    [(2, 1, 2), (4, 1, 3), (16, 1, 15), (16, 2, 7), (16, 8, 2), (16, 32, 2), (128, 1, hardware.MAX_DECODE_WORKERS)],
)
def test_auto_decode_workers_are_a_share_of_the_cores_less_one_at_least_two(monkeypatch, cores, processes, workers):
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda _pid: set(range(cores)), raising=False)
    assert decode_workers("auto", processes) == workers
    assert decode_workers(3, processes) == 3 and decode_workers(0, processes) == 0


def test_the_usable_cores_where_there_is_no_affinity_mask(monkeypatch):
    """macOS and Windows have no os.sched_getaffinity; Python 3.13 has os.process_cpu_count."""
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "process_cpu_count", lambda: 6, raising=False)
    assert usable_cores() == 6 and decode_workers("auto") == 5 and decode_workers("auto", 2) == 2
    monkeypatch.delattr(os, "process_cpu_count")
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert usable_cores() == 8 and decode_workers("auto") == 7
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # undeterminable
    assert usable_cores() == 1 and decode_workers("auto") == 2


# What Windows lacks (macOS has all of these but os.sched_getaffinity): a pipeline module that needs one of them at
# import time fails there before any work.
WITHOUT_LINUX = """
import importlib, os, pkgutil, signal, sys

for name in ("fcntl", "resource", "termios", "pwd", "grp"):
    sys.modules[name] = None  # import fails
for name in ("SIGHUP", "SIGQUIT", "SIGKILL", "SIGUSR1", "SIGUSR2", "SIGALRM"):
    delattr(signal, name)
del os.sched_getaffinity

import pipeline
from pipeline import hardware

failed = []
for module in pkgutil.iter_modules(pipeline.__path__):
    try:
        importlib.import_module(f"pipeline.{module.name}")
    except Exception as err:
        failed.append(f"pipeline.{module.name}: {type(err).__name__}: {err}")
print("; ".join(failed) or f"imported, {hardware.decode_workers('auto')} decode workers")
"""


def test_every_module_imports_without_linux_only_modules_signals_or_calls():
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_LINUX], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip().startswith("imported,"), result.stdout
