from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.gpu import TOLERANCE, Utilisation, compare
from tests.conftest import ROOT


@pytest.mark.slow
def test_gpu_script_runs_whole_on_the_cpu(tmp_path: Path):
    """bench/gpu.sh as a person runs it, with --quick --device cpu: set-up check, generated files, extractions
    with decode fast and device on both folders, the bare network, the feature checks (bf16 against fp32 here:
    the tolerance's own basis), the device decode alone and the report's targets."""
    env = os.environ | {"PYTHON": sys.executable}
    cmd = ["bash", str(ROOT / "bench" / "gpu.sh"), "--quick", "--device", "cpu", "--out", str(tmp_path)]
    cmd += ["--archs", "resnet18"]  # one network as the heavy and the light one: half the runs, the same code
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    runs = {f"resnet18-{folder}-{decode}" for folder in ("small", "photos") for decode in ("fast", "device")}
    assert set(report["extraction"]) == runs
    for run in report["extraction"].values():
        assert run["images_per_s"] > 0 and run["decode_workers"] >= 2
    assert report["ceiling"]["resnet18"]["images_per_s"] > 0
    agreement = report["agreement"]
    assert agreement["device_vs_cpu"]["rows"] == 32
    assert agreement["device_vs_cpu"]["rel_err_max"] <= TOLERANCE["rel_err_max"]
    assert agreement["device_vs_cpu"]["cosine_min"] >= TOLERANCE["cosine_min"]
    assert 0 < agreement["decode_device_vs_exact"]["rel_err_max"] < 0.05
    assert report["device_decode"]["device_images_per_s"] > 0 and report["device_decode"]["input_max_abs_diff"] > 0
    table = (tmp_path / "gpu.md").read_text()
    assert "| resnet18-photos-device |" in table and "| resnet18 bare network" in table and "**within**" in table
    assert "resnet18, 500x375 JPEGs: decode device" in table


def test_feature_comparison_measures_relative_error_and_cosine():
    b = np.array([[3.0, 4.0], [1.0, 0.0]])
    a = b + np.array([[0.3, 0.4], [0.0, 1.0]])
    got = compare(a, b)
    assert got["rel_err_median"] == np.median([0.1, 1.0]) and got["rel_err_max"] == 1.0
    assert np.isclose(got["cosine_min"], 1 / np.sqrt(2))


def test_utilisation_is_empty_without_nvidia_smi(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with Utilisation() as util:
        pass
    assert set(util.summary().values()) == {None}


def test_utilisation_summarises_the_samples_of_a_window():
    util = Utilisation()
    util.samples = [(1.0, 0.0, 500.0), (2.0, 90.0, 900.0), (3.0, 100.0, 950.0), (4.0, 10.0, 400.0)]
    window = util.summary(2.0, 3.0)
    assert window["gpu_util_mean"] == 95.0 and window["gpu_util_max"] == 100.0
    assert (window["gpu_mem_first_mib"], window["gpu_mem_last_mib"], window["gpu_mem_max_mib"]) == (900, 950, 950)
    assert util.summary()["gpu_util_mean"] == 50.0
