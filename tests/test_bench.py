from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from bench.gpu import TOLERANCE, Utilisation, compare
from tests.conftest import ROOT


def test_gpu_script_runs_whole_on_the_cpu(tmp_path: Path):
    """bench/gpu.sh as a person runs it, with --quick --device cpu: set-up check, generated files, the four
    extractions, the bare network and the feature check (bf16 against fp32 here: the tolerance's own basis)."""
    env = os.environ | {"PYTHON": sys.executable}
    cmd = ["bash", str(ROOT / "bench" / "gpu.sh"), "--quick", "--device", "cpu", "--out", str(tmp_path)]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert set(report["extraction"]) == {"small-fast", "small-exact", "photos-fast", "photos-exact"}
    for run in report["extraction"].values():
        assert run["images_per_s"] > 0 and run["decode_workers"] >= 2
    assert report["ceiling"]["images_per_s"] > 0
    assert report["agreement"]["rows"] == 32
    assert report["agreement"]["rel_err_max"] <= TOLERANCE["rel_err_max"]
    assert report["agreement"]["cosine_min"] >= TOLERANCE["cosine_min"]
    table = (tmp_path / "gpu.md").read_text()
    assert "| photos-fast |" in table and "| bare network" in table and "**within**" in table


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
    assert util.summary() == {"gpu_util_mean": None, "gpu_util_max": None}


def test_utilisation_summarises_the_samples_of_a_window():
    util = Utilisation()
    util.samples = [(1.0, 0.0), (2.0, 90.0), (3.0, 100.0), (4.0, 10.0)]
    assert util.summary(2.0, 3.0) == {"gpu_util_mean": 95.0, "gpu_util_max": 100.0}
    assert util.summary()["gpu_util_mean"] == 50.0
