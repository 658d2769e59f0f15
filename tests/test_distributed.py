"""Extraction over several processes: the share of each, and real runs of the stage's own launcher and of an
outside `torchrun`, with the gloo backend on CPU."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from pipeline import distributed, extraction, sources
from pipeline.config import load_params
from pipeline.distributed import World
from pipeline.errors import PipelineError
from pipeline.hardware import usable_cores
from tests.conftest import STAGE_ARGS, extract_here, make_imagefolder, project_env, run, run_stage, write_params

FEATURES = Path("data/features")
STORE = Path("data/.feature-store")


@pytest.fixture(autouse=True)
def _every_core(monkeypatch: pytest.MonkeyPatch) -> None:
    """One process takes every core here, as it would outside the tests (conftest gives each test worker its share):
    the bytes of one process on all its threads are compared with those of two processes of fewer threads."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)


def stage(project: Path, nproc: int) -> list[str]:
    """The extract stage's command in dvc.yaml, with ``extract.nproc`` set to ``nproc``."""
    write_params(project, {"extract": {"nproc": nproc}})
    return ["python", "-m", "pipeline.extract", *STAGE_ARGS["extract"]]


def one_process(project: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """The extraction of one process on every core, as `python -m pipeline.extract` with nproc 1 runs it: here,
    in this process, with torch's threads raised to the cores for its length (conftest gives a worker its share)."""
    monkeypatch.chdir(project)
    threads = torch.get_num_threads()
    torch.set_num_threads(usable_cores())
    try:
        return extract_here()
    finally:
        torch.set_num_threads(threads)


def digests(project: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (project / FEATURES).glob("*.h5")}


def test_each_process_takes_its_gpu_or_its_share_of_the_cores():
    two = World(rank=1, size=2, local_rank=1, local_size=2)
    assert distributed.device("cpu", two) == torch.device("cpu")
    assert distributed.cpu_threads(two) == max(1, usable_cores() // 2)
    with pytest.raises(PipelineError, match="names one GPU"):
        distributed.device("cuda:0", two)
    if not torch.cuda.is_available():
        assert distributed.device("auto", two) == torch.device("cpu")
    elif torch.cuda.device_count() >= 2:
        assert distributed.device("auto", two) == torch.device("cuda", 1)


def test_each_process_has_its_share_of_the_cores_without_an_affinity_mask(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # macOS, Windows
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.delattr(os, "process_cpu_count", raising=False)
    assert distributed.cpu_threads(World(size=2, local_size=2)) == 4
    assert distributed.cpu_threads(World(size=16, local_size=16)) == 1


# The stage's command with extract.nproc 2, up to the launch: what the launcher process has imported by then
LAUNCHER = """
import sys
from pipeline import distributed, extract

def launch(nproc, module, args):
    print(sorted(m for m in ("torchvision", "timm", "h5py", "pipeline.extraction") if m in sys.modules))
    return 0

distributed.launch = launch
extract.main()
"""


def test_the_launcher_starts_the_workers_without_the_network_s_libraries(project: Path):
    """Regression: the process that only starts the workers imported torchvision, HDF5 and the extraction too,
    0.9 s of CPU before it started any worker; the workers load them (the tests below, and tests/test_dvc.py)."""
    write_params(project, {"extract": {"nproc": 2, "device": "cpu"}})
    launcher = run(project, "python", "-c", LAUNCHER, *STAGE_ARGS["extract"])
    assert launcher.stdout == "[]\n", launcher.stderr


def test_apples_gpu_serves_one_process_only(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    one, two = World(), World(rank=1, size=2, local_rank=1, local_size=2)
    assert distributed.device("mps", one) == distributed.device("auto", one) == torch.device("mps")
    assert distributed.device("auto", two) == torch.device("cpu")  # several processes share out the cores instead
    with pytest.raises(PipelineError, match="^extract.device 'mps' is one GPU for the whole machine, but 2 processes"):
        distributed.device("mps", two)


@pytest.fixture
def digits(project: Path) -> Path:
    """Digits through vgg11 at 32 px in batches of 16, with flipped training images, 5 training images a class
    and 5% of the images each for val and test (about 140 in all)."""
    write_params(project, {"extract": {"batch_size": 16, "views": ["original", "hflip"]}})
    write_params(project, {"data": {"per_class_limit": 5, "val_fraction": 0.05, "test_fraction": 0.05}})
    run_stage(project, "prepare")
    return project


@pytest.mark.slow
def test_two_processes_give_the_bytes_of_one_in_every_view(digits: Path, monkeypatch: pytest.MonkeyPatch):
    """VGG with a second view: the launcher's two processes, each with its share of the batches, against one
    process. A kill and the resume after it: below, for a CNN and a ViT."""
    n = len((digits / "data/prepared/manifest.csv").read_text().splitlines()) - 1
    assert one_process(digits, monkeypatch)["images"] == n
    single = digests(digits)
    for path in [FEATURES, STORE]:
        subprocess.run(["rm", "-rf", str(digits / path)], check=True)
    run(digits, *stage(digits, 2), "--stats", "stats.json")
    assert digests(digits) == single
    stats = json.loads((digits / "stats.json").read_text())
    assert (stats["processes"], stats["reused"], stats["images"]) == (2, 0, n)


def wait_for_rank_progress(project: Path, proc: subprocess.Popen, *, rank: int) -> int:
    """The pid of ``rank`` once it has committed rows to its segment of the row store, found among the launcher's
    children by its RANK."""
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, "extract finished before a process could be killed"
        assert time.monotonic() < deadline
        keys = list((project / STORE).glob(f"*/{rank}/original.keys"))
        if keys and keys[0].stat().st_size > 0:
            break
        time.sleep(0.01)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
        if ppid == proc.pid and f"RANK={rank}".encode() in environ:
            return int(pid)
    raise AssertionError(f"no process of rank {rank} under the launcher (pid {proc.pid})")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_machines(projects: list[Path]) -> list[subprocess.CompletedProcess]:
    """The README's several-machines command, one launcher per "machine", meeting at 127.0.0.1."""
    rdzv = ["--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}"]
    cmd = ["torchrun", *rdzv, "--rdzv-id=test", "-m", "pipeline.extract", *STAGE_ARGS["extract"]]
    procs = [
        subprocess.Popen(cmd, cwd=p, env=project_env(p), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for p in projects
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    return [subprocess.CompletedProcess(cmd, p.returncode, *out) for p, out in zip(procs, outputs, strict=True)]


@pytest.fixture
def small(project: Path) -> Path:
    make_imagefolder(project / "data" / "raw", classes=("cat", "dog"), per_class=20)
    write_params(project, {"data": {"source": "imagefolder"}, "extract": {"batch_size": 4}})
    run_stage(project, "prepare")
    return project


@pytest.mark.slow
def test_two_machines_sharing_the_project_give_the_one_process_bytes(small: Path, monkeypatch: pytest.MonkeyPatch):
    one_process(small, monkeypatch)
    single = digests(small)
    subprocess.run(["rm", "-rf", str(small / FEATURES), str(small / STORE)], check=True)
    results = launch_two_machines([small, small])
    assert all(r.returncode == 0 for r in results), [r.stderr[-2000:] for r in results]
    assert digests(small) == single


def test_machines_that_do_not_share_the_project_directory_are_refused(small: Path, tmp_path: Path):
    other = Path(shutil.copytree(small, tmp_path / "elsewhere"))
    results = launch_two_machines([small, other])
    assert all(r.returncode != 0 for r in results)
    assert all("need the project directory on a filesystem they all share" in r.stderr for r in results)
    assert not any("extract params" in r.stderr for r in results)  # refused first: nothing set up, no network built
    assert not (small / FEATURES).exists() and not (other / FEATURES).exists()


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "size"), [("resnet18", 32), ("timm/test_vit", "auto")])
def test_a_cnn_and_a_vit_give_the_same_bytes_grown_over_two_processes_and_after_a_kill(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arch: str, size: int | str
):
    """Beside VGG's (above, and tests/test_dvc.py): a CNN with batch norm and a ViT. From scratch in one
    process; then from rows of part of the folder, on two processes of which one is killed, and once more: the
    same bytes. The one-process runs run here, in this process."""
    monkeypatch.chdir(project)
    make_imagefolder(project / "data" / "raw", classes=("cat", "dog"), per_class=32)
    extract = {"arch": arch, "image_size": size, "batch_size": 2, "precision": "fp32"}
    write_params(project, {"data": {"source": "imagefolder"}, "extract": extract})
    params = load_params()

    def prepared(out: Path = FEATURES) -> tuple[Path, Path]:
        sources.write_manifest(Path("data/prepared"), *sources.discover(params.data, params.seed))
        return Path("data/prepared"), out

    extraction.extract(params, *prepared(Path("scratch/features")))
    single = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in Path("scratch/features").glob("*.h5")}
    held = tmp_path / "held"  # a third of the folder, added after a first run
    shutil.copytree("data/raw", held)
    for path in sorted(Path("data/raw").rglob("*.png"))[::3]:
        path.unlink()
    extraction.extract(params, *prepared())
    shutil.rmtree("data/raw")
    shutil.copytree(held, "data/raw")
    prepared()
    shutil.rmtree(FEATURES)  # as DVC removes a stage's outputs before it runs
    cmd = stage(project, 2)
    proc = subprocess.Popen(cmd, cwd=project, env=project_env(project), stderr=subprocess.PIPE, text=True)
    os.kill(wait_for_rank_progress(project, proc, rank=1), signal.SIGKILL)
    # the run fails, names the killed process, and leaves no final file; the other is stopped and keeps its rows
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGKILL
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == [
        "error: rank 1 of 2: killed by SIGKILL"
    ], stderr
    assert "rank 0 of 2: terminated" in stderr and "Traceback" not in stderr, stderr
    assert not (project / FEATURES).exists() and not (project / "reports/extract/metrics.json").exists()
    # the next run continues from the rows that both processes kept, and gives the one-process bytes
    result = run(project, *cmd, "--stats", "stats.json")
    assert digests(project) == single, result.stderr
    stats = json.loads((project / "stats.json").read_text())
    assert stats["reused"] > 64 - 64 // 3 and stats["images"] < 64 // 3  # the first run's rows and the kept ones
