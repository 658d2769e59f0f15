from __future__ import annotations

import pytest
import torch

from pipeline import hardware
from pipeline.errors import PipelineError
from pipeline.hardware import decode_workers, native_bf16_cpu, resolve_device, resolve_precision

CPU = torch.device("cpu")


def test_auto_device_is_cuda_only_when_there_is_one():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_missing_cuda_device_is_a_clear_error():
    with pytest.raises(PipelineError, match="'cuda:1' was asked for, but this machine has no CUDA device"):
        resolve_device("cuda:1")


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
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda _pid: set(range(cores)))
    assert decode_workers("auto", processes) == workers
    assert decode_workers(3, processes) == 3 and decode_workers(0, processes) == 0
