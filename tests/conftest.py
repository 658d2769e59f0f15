"""Shared fixtures: tiny generated image folders, a tiny CIFAR-style directory, and a project copy for dvc."""

from __future__ import annotations

import importlib
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from filelock import FileLock
from PIL import Image

from pipeline.config import defaults, load_params
from pipeline.hardware import usable_cores

ROOT = Path(__file__).resolve().parents[1]
# What a test project copies of this repository: its code, DVC set-up and corrections file, and of data/raw only the
# README (the user's images there are not the repository's)
PROJECT_FILES = (
    "dvc.yaml", "pipeline", ".dvc/config", ".dvc/.gitignore", ".dvc/plots", ".dvcignore", ".gitignore",
    "data/raw/README.md", "data/corrections.csv",
)  # fmt: skip

# Fast settings for end-to-end runs: random weights, the smallest VGG, small images, few epochs.
FAST_PARAMS = {
    "extract": {"arch": "vgg11", "weights": "random", "image_size": 32, "batch_size": 16, "num_workers": 0},
    "train": {"epochs": 5},
    "curve": {"seeds": 1},  # one draw of each point: 6 fits rather than 26
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests first (the rest keep their order): xdist's workers take the next test as they free up, so the
    long ones start early on both and the short ones fill in at the end, rather than one worker running a 30 s test
    alone after the other has finished. Of the slow ones, the first needs the session's project, which takes about
    15 s to make, and the next few do not, so that the other worker need not wait for it."""
    slow = [item for item in items if item.get_closest_marker("slow")]
    needs = [item for item in slow if "reproduced_template" in item.fixturenames]
    others = [item for item in slow if item not in needs]
    items[:] = needs[:1] + others + needs[1:] + [item for item in items if item not in slow]


@pytest.fixture(autouse=True, scope="session")
def _isolated_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No analytics, no real torch hub or Hugging Face cache, and no way out of loopback for any download attempt."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        _isolate(monkeypatch, tmp_path_factory)
        yield


def _isolate(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    threads = worker_threads()
    if threads:  # each worker and every process it starts: their share of the cores, as extract.nproc gives
        monkeypatch.setenv("OMP_NUM_THREADS", str(threads))
        torch.set_num_threads(threads)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))  # timm's pretrained weights
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # the discard port: refused at once
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)


def worker_threads() -> int | None:
    """Threads for each of pytest-xdist's workers, when there are several: their share of the cores. With a
    worker per core, torch's default of a thread per core in every worker, and in every stage process it starts,
    left twice as many busy threads as cores; the suite ran about a quarter slower."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, usable_cores() // workers) if workers > 1 else None


def cached_hub_weights(monkeypatch: pytest.MonkeyPatch, home: Path, build: Callable[[], Any], url: str) -> dict:
    """``build()``'s state dict (seed 123) placed where torch hub caches ``url``, under TORCH_HOME ``home``."""
    monkeypatch.setenv("TORCH_HOME", str(home))
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(123)
    state = build().state_dict()
    torch.save(state, checkpoints / Path(url).name)
    return state


def color_image(rng: np.random.Generator, label: int, size: int = 12, mode: str = "RGB") -> Image.Image:
    """A noisy image whose dominant channel encodes ``label`` (easy to tell apart, even with random features)."""
    pixels = rng.integers(0, 60, size=(size, size, 3), dtype=np.uint8)
    pixels[..., label % 3] += 180
    if label >= 3:
        pixels[: size // 2] = 255 - pixels[: size // 2]
    return Image.fromarray(pixels).convert(mode)


@pytest.fixture(scope="session")
def pngs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two PNG photos of other sizes than any crop, as a user would have."""
    folder = tmp_path_factory.mktemp("pngs")
    rng = np.random.default_rng(0)
    paths = [folder / f"{i}.png" for i in range(2)]
    for i, path in enumerate(paths):
        color_image(rng, i, size=280 + 20 * i).resize((300, 250 + 20 * i)).save(path)
    return paths


def make_imagefolder(
    root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 10, *, seed: int = 0, ext: str = ".png"
) -> Path:
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            color_image(rng, label).save(root / name / f"{i:03d}{ext}")
    return root


@pytest.fixture
def imagefolder(tmp_path: Path) -> Path:
    return make_imagefolder(tmp_path / "images")


def make_cifar(root: Path, per_batch: int = 10, *, seed: int = 0) -> Path:
    """A CIFAR-10 python-format directory with the real file names and layout, and tiny batches."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [i % 10 for i in range(per_batch)]
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "labels": labels, "data": data, "filenames": []}, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch, "num_vis": 3072}, f, protocol=2)
    return root


def write_params(project: Path, overrides: dict) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in overrides.items():
        if isinstance(values, dict):
            params[section].update(values)
        else:
            params[section] = values
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def git(project: Path, *args: str) -> None:
    identity = ["-c", "user.email=ci@example.com", "-c", "user.name=ci"]
    subprocess.run(["git", *identity, *args], cwd=project, check=True, capture_output=True)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A committed copy of this project (no outputs) with fast parameters, ready for real dvc commands."""
    return copy_project(tmp_path / "project")


def made_once(factory: pytest.TempPathFactory, worker_id: str, name: str, make: Callable[[Path], object]) -> Path:
    """``make(path)`` once per test run, whichever xdist worker needs it first; the others wait for it. Tests take
    a copy of what it makes to change or to run dvc in."""
    root = factory.getbasetemp()
    root = root if worker_id == "master" else root.parent  # the run's directory, above each worker's own
    path, made = root / name / "project", root / name / "made"
    with FileLock(root / f"{name}.lock"):
        if not made.exists():
            make(path)
            made.touch()
    return path


@pytest.fixture(scope="session")
def reproduced_template(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """A three-class image folder project after one full `dvc repro`, with exact (fp32, float32) features."""
    return made_once(tmp_path_factory, worker_id, "reproduced", _reproduce)


def _reproduce(dest: Path) -> Path:
    project = copy_project(dest)
    make_imagefolder(project / "data" / "raw", classes=("cat", "dog", "owl"), per_class=10)
    write_params(project, {"data": {"source": "imagefolder", "val_fraction": 0.2, "test_fraction": 0.3}})
    write_params(project, {"extract": {"precision": "fp32", "storage_dtype": "float32"}})
    git(project, "add", "-A")
    git(project, "commit", "-qm", "images")
    run(project, "dvc", "repro")
    git(project, "add", "-A")
    git(project, "commit", "-qm", "results")
    return project


@pytest.fixture
def reproduced(reproduced_template: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(reproduced_template, tmp_path / "project", symlinks=True))


@pytest.fixture(scope="session")
def head_experiment_template(
    reproduced_template: Path, tmp_path_factory: pytest.TempPathFactory, worker_id: str
) -> Path:
    """The session's project after `dvc exp run -n logreg -S train.head=logreg`, a head experiment on its cached
    features (the sweep over heads, and compare against it); what the command printed is in exp-run.txt beside it."""

    def make(dest: Path) -> None:
        project = Path(shutil.copytree(reproduced_template, dest, symlinks=True))
        ran = run(project, "dvc", "exp", "run", "-n", "logreg", "-S", "train.head=logreg")
        (dest.parent / "exp-run.txt").write_text(ran.stdout)

    return made_once(tmp_path_factory, worker_id, "head-experiment", make)


@pytest.fixture
def head_experiment(head_experiment_template: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(head_experiment_template, tmp_path / "project", symlinks=True))


def project_files(source: Path) -> list[str]:
    """The files of PROJECT_FILES in ``source`` that the repository holds: those git tracks, and untracked ones it
    does not ignore (a module being written), never ignored ones (caches, `python -m pipeline.plots`'s output).
    Outside a git checkout, every file under PROJECT_FILES except __pycache__."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", *PROJECT_FILES],
            cwd=source, capture_output=True, check=True,
        ).stdout.decode()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):  # no git, or not a checkout
        listed = ""
    if listed:
        return sorted({name for name in listed.split("\0") if name and (source / name).is_file()})
    found = []
    for name in PROJECT_FILES:
        path = source / name
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        found += [p.relative_to(source).as_posix() for p in files if "__pycache__" not in p.parts]
    return sorted(found)


def copy_project(dest: Path, *, source: Path = ROOT) -> Path:
    """A git-committed copy of the repository at ``source`` (its PROJECT_FILES and the pipeline's default params)."""
    for name in project_files(source):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / name, dest / name)
    # the pipeline's defaults: a test project never depends on the user's edits of their params.yaml
    (dest / "params.yaml").write_text(yaml.safe_dump(defaults(), sort_keys=False))
    write_params(dest, FAST_PARAMS)
    record_backbone_check(dest)
    git(dest, "init", "-q")
    git(dest, "add", "-A")
    git(dest, "commit", "-qm", "project copy")
    return dest


_CHECKED: dict[str, str] = {}  # backbone settings -> scan's record that they passed its check


def record_backbone_check(project: Path) -> None:
    """What scan records once the project's backbone settings pass its check (data/.images-backbone.json, which
    git ignores), made by scan's own check in this process, once per settings: a new project's first scan then
    does not import torch and torchvision for it, about 2 s. A scan process checks settings that no record names:
    a fresh clone's (tests/test_dvc.py), a queued experiment's, and a typo stopping scan (tests/test_backbones.py)."""
    from pipeline import scan

    record = project / "data" / ".images-backbone.json"
    cfg = load_params(project / "params.yaml").extract
    if repr(cfg) not in _CHECKED:
        scan.check_backbone(cfg, record)
        _CHECKED[repr(cfg)] = record.read_text()
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(_CHECKED[repr(cfg)])


def project_env(project: Path) -> dict[str, str]:
    """The environment for commands in ``project``: `python` in the stages' commands, and `dvc`, are this one's."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return os.environ | {"PYTHONPATH": str(project), "PATH": path}


def run(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command in ``project`` (dvc or python -m pipeline.*), capturing output."""
    result = subprocess.run(args, cwd=project, env=project_env(project), capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def feature_provenance(**changes: object) -> dict:
    """Provenance as extract writes it for the FAST_PARAMS project settings."""
    from pipeline import provenance

    base = {
        "schema": provenance.SCHEMA,
        "arch": "vgg11",
        "weights": "random",
        "weights_source": "random init seeded by params seed",
        "seed": 0,
        "precision": "fp32",
        "layer": "pool5",
        "pool": "avg",
        "image_size": 32,
        "decode": "fast",
        "resize_size": 37,
        "interpolation": "bilinear",
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "views": ["original"],
        "storage_dtype": "float16",
        "class_names": ["a", "b", "c"],
        "split": "train",
        "feature_dim": 16,
        "torch_version": "2.x",
        "torchvision_version": "0.x",
    }
    return base | changes


def write_blob_features(out_dir: Path, *, n: int = 90, dim: int = 16, seed: int = 0, **changes: object) -> None:
    """train/val/test files of well separated Gaussian blobs, one per class, with the given provenance."""
    from pipeline import features

    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((3, dim)) * 4
    for k, split in enumerate(("train", "val", "test")):
        labels = np.arange(n) % 3
        x = (centers[labels] + rng.standard_normal((n, dim))).astype(np.float32)
        prov = feature_provenance(split=split, feature_dim=dim, **changes)
        views = prov["views"] if split == "train" else ["original"]
        with features.FeatureWriter(
            out_dir / f"{split}.h5", n=n, dim=dim, dtype="float32", views=views, provenance=prov, row_settings="blobs"
        ) as writer:
            blocks = {v: x + 10 * i for i, v in enumerate(views)}
            ids = [f"digits/{k * n + i:04d}" for i in range(n)]  # real digits ids: evaluate shows the worst images
            keys = [i.to_bytes(16, "big") for i in range(k * n, (k + 1) * n)]  # a content key per image
            writer.write(0, blocks, labels, ids, keys)


# The paths dvc.yaml passes to each stage.
STAGE_ARGS = {
    "scan": ["--out", "data/images.csv"],
    "prepare": ["--images", "data/images.csv", "--corrections", "data/corrections.csv"]
    + ["--out", "data/prepared", "--metrics", "reports/prepare/metrics.json"],
    "extract": ["--prepared", "data/prepared", "--out", "data/features", "--metrics", "reports/extract/metrics.json"],
    "train": ["--features", "data/features", "--out", "models/head.pt", "--live", "reports/train"],
    "audit": ["--prepared", "data/prepared", "--features", "data/features", "--out", "reports/audit"],
    "evaluate": ["--features", "data/features", "--head", "models/head.pt", "--audit", "reports/audit"]
    + ["--live", "reports/evaluate"],
    "curve": ["--features", "data/features", "--out", "reports/curve"],
}


def stage_main(monkeypatch: pytest.MonkeyPatch, stage: str, *args: str) -> None:
    """A stage's (or command's) main() in this process and its working directory, with ``args`` as its command
    line: what `python -m pipeline.<stage>` runs, less errors.run_stage around it."""
    monkeypatch.setattr(sys, "argv", [f"pipeline/{stage}.py", *args])
    importlib.import_module(f"pipeline.{stage}").main()


def extract_here() -> dict[str, float]:
    """The extraction of the working directory's project, in this process, from data/prepared into data/features
    (the stage's paths); its figures."""
    from pipeline import extraction

    stats = extraction.extract(load_params(), Path("data/prepared"), Path("data/features"))
    assert stats is not None
    return stats


def run_stage(project: Path, stage: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run one stage by hand, as dvc.yaml does, in ``project``; prepare after scan, as `dvc repro` runs it."""
    if stage == "prepare":
        run_stage(project, "scan", check=check)
    return run(project, "python", "-m", f"pipeline.{stage}", *STAGE_ARGS[stage], check=check)


def random_problem(rng: np.random.Generator, n: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, C) class probabilities of a head that is right about half the time, and their labels."""
    import torch

    labels = rng.permutation(np.arange(n) % classes)  # every class has test images
    logits = rng.normal(size=(n, classes)).astype(np.float32)
    logits[np.arange(n), labels] += 2.5  # about half right
    return torch.softmax(torch.from_numpy(logits), 1).numpy(), labels


def metrics_of(probs: np.ndarray, labels: np.ndarray, *, top_k: int = 2) -> dict[str, float]:
    """evaluate's headline metrics of one block of probabilities."""
    from pipeline.scores import compute_metrics, score

    return compute_metrics(score([probs], labels, top_k=top_k, seed=0), labels, val_accuracy=0.5, seed=0)
