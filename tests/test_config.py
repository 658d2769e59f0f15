from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import errors
from pipeline.config import ConfigError, Params, parse_params
from tests.conftest import ROOT, STAGE_ARGS, run_stage, write_params


def shipped_text() -> str:
    """params.yaml as shipped with this pipeline/config.py, not as a user edited it since (`make repro
    WEIGHTS=random` applies its experiment to the workspace): the file of the last commit that changed config.py,
    or the workspace's while config.py itself has uncommitted changes (or outside a git checkout)."""

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)

    config = "pipeline/config.py"
    last = git("log", "-1", "--format=%H", "--", config).stdout.strip()
    if last and git("diff", "--quiet", "HEAD", "--", config).returncode == 0:
        found = git("show", f"{last}:params.yaml")
        if found.returncode == 0:
            return found.stdout
    return (ROOT / "params.yaml").read_text()


def shipped() -> dict:
    return yaml.safe_load(shipped_text())


def with_change(section: str, key: str, value: object) -> dict:
    raw = shipped()
    raw[section][key] = value
    return raw


def test_shipped_params_parse_and_match_the_defaults():
    params = parse_params(shipped())
    assert params.extract.arch == "vgg16" and params.train.head == "mlp"
    assert params.extract.views == ("original",)
    # the dataclass defaults are the shipped file, so a key left out means the documented value
    assert parse_params({}) == params


def test_num_workers_is_auto_or_a_count():
    assert parse_params({}).extract.num_workers == "auto"
    assert parse_params(with_change("extract", "num_workers", 0)).extract.num_workers == 0


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_a_device_is_auto_cpu_a_cuda_device_or_apples_gpu(device: str):
    assert parse_params(with_change("extract", "device", device)).extract.device == device
    assert parse_params(with_change("train", "device", device)).train.device == device


def test_params_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Params().seed = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (with_change("extract", "imagesize", 64), ["extract.imagesize", "did you mean 'extract.image_size'"]),
        ({"sed": 1}, ["'sed'", "did you mean 'seed'"]),
        (with_change("extract", "batch_size", "big"), ["extract.batch_size", "'big'", "an integer >= 1"]),
        (with_change("extract", "batch_size", 0), ["extract.batch_size", "0", "an integer >= 1"]),
        (with_change("extract", "image_size", 16), ["extract.image_size", "16", "[32, 1024]"]),
        (with_change("train", "lr", 0), ["train.lr", "a number > 0"]),
        (with_change("train", "lr", True), ["train.lr", "True", "a number"]),
        (with_change("train", "standardize", "yes"), ["train.standardize", "'yes'", "true or false"]),
        (with_change("train", "head", "svm"), ["train.head", "'svm'", "linear | mlp | logreg"]),
        (with_change("extract", "views", ["hflip"]), ["extract.views", "'original' first"]),
        (with_change("extract", "views", "original"), ["extract.views", "a list of original | hflip"]),
        (with_change("extract", "device", "gpu"), ["extract.device", "'gpu'", "auto | cpu | cuda | cuda:N | mps"]),
        (with_change("train", "device", "mps:0"), ["train.device", "'mps:0'", "auto | cpu | cuda | cuda:N | mps"]),
        (with_change("data", "test_fraction", 0.95), ["data.test_fraction", "0.95", "(0.0, 0.9]"]),
        (with_change("train", "hidden", [512, "x"]), ["train.hidden[1]", "'x'", "an integer"]),
        (with_change("train", "logreg_C", []), ["train.logreg_C", "non-empty"]),
        ({"data": [1, 2]}, ["data", "a mapping"]),
        (with_change("extract", "num_workers", "many"), ["extract.num_workers", "an integer in [0, 64] or auto"]),
        (with_change("extract", "num_workers", 65), ["extract.num_workers", "65", "[0, 64] or auto"]),
        (with_change("extract", "decode", "turbo"), ["extract.decode", "'turbo'", "fast | exact"]),
        (with_change("extract", "image_size", "big"), ["extract.image_size", "[32, 1024] or auto"]),
        (with_change("extract", "pool", "sum"), ["extract.pool", "auto | avg | max | flatten | cls | mean"]),
        (with_change("evaluate", "knn_temperature", 0), ["evaluate.knn_temperature", "a number > 0"]),
    ],
)
def test_bad_parameters_name_key_value_and_what_is_allowed(raw, expected):
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    for fragment in expected:
        assert fragment in str(err.value)


def test_fractions_must_leave_training_images():
    raw = with_change("data", "val_fraction", 0.5)
    raw["data"]["test_fraction"] = 0.5
    with pytest.raises(ConfigError, match=r"val_fraction \+ data.test_fraction = 1"):
        parse_params(raw)


@pytest.mark.parametrize("stage", list(STAGE_ARGS))
def test_every_stage_rejects_bad_params_before_any_work(
    project: Path, stage: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    """Every stage's main() as its command runs it; one of them in a process of its own, as dvc runs it, where
    nothing else may reach stderr (every stage runs as a process of its own in tests/test_dvc.py)."""
    write_params(project, {"train": {"epochs": -1}})
    if stage == "evaluate":  # the stage with the most imports
        result = run_stage(project, stage, check=False)
        code, err = result.returncode, result.stderr
    else:
        monkeypatch.chdir(project)
        monkeypatch.setattr(sys, "argv", [stage, *STAGE_ARGS[stage]])
        with pytest.raises(SystemExit) as stopped:
            errors.run_stage(importlib.import_module(f"pipeline.{stage}").main)
        code, err = stopped.value.code, capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == ["error: train.epochs = -1 is not valid: expected an integer >= 1"]
    assert not any((project / d).exists() for d in ("data/prepared", "data/features", "models", "reports"))


def test_pipeline_debug_shows_the_traceback(project: Path, monkeypatch: pytest.MonkeyPatch):
    write_params(project, {"train": {"epochs": -1}})
    monkeypatch.setenv("PIPELINE_DEBUG", "1")
    result = run_stage(project, "prepare", check=False)
    assert result.returncode != 0 and "Traceback" in result.stderr and "ConfigError" in result.stderr
