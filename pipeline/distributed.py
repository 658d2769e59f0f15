"""The processes of a run: starting them, who this one is, its device and threads, and how they meet.

A stage started alone with ``nproc > 1`` starts its workers with PyTorch's elastic launcher (:func:`launch`);
under an outside ``torchrun`` (several machines) it is one of them already. Either launcher sets RANK,
WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE; a plain ``python -m`` run is a world of one. Processes exchange
only small control messages (their outcome, a check that they share the work directory), never features, so
the gloo backend serves CPU and GPU runs alike.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import logging
import os
import secrets
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from pipeline.errors import PipelineError, Stopped
from pipeline.hardware import resolve_device, usable_cores

T = TypeVar("T")

# A process that finishes its share early waits for the slowest one; a failed one is stopped by the launcher,
# which stops the others too, so this only bounds a wait that nothing else would end.
WAIT = datetime.timedelta(days=7)
STOPPED = (128 + signal.SIGTERM, 128 + signal.SIGINT)  # the status of a worker stopped because another failed
# the signals the launcher takes over (Windows has neither SIGHUP nor SIGQUIT)
LAUNCHER_SIGNALS = tuple(getattr(signal, s) for s in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT") if hasattr(signal, s))
PEER_GRACE = 10.0  # seconds a process whose peer died waits for the launcher to stop it


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @classmethod
    def from_env(cls) -> World:
        env = os.environ
        return cls(
            rank=int(env.get("RANK", 0)),
            size=int(env.get("WORLD_SIZE", 1)),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
        )

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """Whether a launcher (ours or an outside ``torchrun``) started this process as one of a run's workers."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def launch(nproc: int, module: str, args: Sequence[str]) -> int:
    """Run ``python -m module args`` as ``nproc`` workers on this machine with PyTorch's elastic launcher (what
    ``torchrun --standalone`` does), wait for them, and return the exit status for the run.

    A worker that fails prints its own ``error: rank R of N: …`` line, and the launcher stops the others (they
    keep their work and say ``terminated``); a worker that dies without a word (a signal) gets its line here.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name, logger in logging.Logger.manager.loggerDict.items():  # the workers' own lines say what went wrong
        if name.startswith("torch.distributed.elastic") and isinstance(logger, logging.Logger):
            logger.setLevel(logging.CRITICAL)
    handlers = {sig: signal.getsignal(sig) for sig in LAUNCHER_SIGNALS}  # the launcher replaces them for good
    with tempfile.TemporaryDirectory(prefix="extract-launch-") as logs:  # the workers' error files
        config = LaunchConfig(
            min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()), rdzv_backend="c10d",
            rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1, start_method="spawn",
            logs_specs=DefaultLogsSpecs(log_dir=logs),
        )  # fmt: skip
        try:
            elastic_launch(config, sys.executable)("-m", module, *args)
        except ChildFailedError as err:
            return _report(err.failures, nproc)
        except SignalException as err:  # Ctrl-C or SIGTERM to this launcher: the workers got it and keep their rows
            return 128 + int(err.sigval)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
    return 0


def _report(failures: dict[int, Any], nproc: int) -> int:
    """Print a line for each failed worker that could not say why itself; the run's exit status.

    ``failures``: rank -> torch's ProcessFailure. A worker that reported its error wrote an error file (and may
    have been killed afterwards); one the launcher stopped because another failed exits 143 or 130.
    """

    def status(f: Any) -> int:
        return f.exitcode if f.exitcode >= 0 else 128 - f.exitcode

    reported = {r: f for r, f in failures.items() if os.path.isfile(f.error_file)}
    silent = {r: f for r, f in failures.items() if r not in reported and status(f) not in STOPPED}
    for rank, failure in sorted(silent.items()):
        why = f"killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exited with status {failure.exitcode}"
        print(f"error: rank {rank} of {nproc}: {why}", file=sys.stderr)
    causes = reported or silent or failures
    return status(causes[min(causes)])


def die_with_launcher() -> None:
    """Under a launcher, get SIGTERM when it dies (it starts each process in a session of its own, so a killed
    ``dvc repro`` would otherwise leave this process running on)."""
    if not launched() or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() == 1:  # the launcher died before the call
        os.kill(os.getpid(), signal.SIGTERM)


@contextlib.contextmanager
def joined(world: World) -> Iterator[World]:
    """Join the process group for the block (nothing to join in a world of one)."""
    if world.size == 1:
        yield world
        return
    dist.init_process_group("gloo", rank=world.rank, world_size=world.size, timeout=WAIT)
    try:
        yield world
    finally:
        dist.destroy_process_group()


def device(spec: str, world: World) -> torch.device:
    """The device named by ``spec`` for this process: with several processes per machine, GPU ``LOCAL_RANK`` or
    the CPU. A Mac's GPU (MPS) is one device for the whole machine, so only a run of one process takes it."""
    if world.local_size == 1:
        return resolve_device(spec)
    if spec == "mps":
        raise PipelineError(
            f"extract.device 'mps' is one GPU for the whole machine, but {world.local_size} processes run on it: "
            "set extract.nproc to 1 to use it, or use cpu"
        )
    if spec not in ("auto", "cuda", "cpu"):
        raise PipelineError(
            f"extract.device {spec!r} names one GPU, but {world.local_size} processes run on this machine: "
            "use auto or cuda (each process takes the GPU of its LOCAL_RANK)"
        )
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if world.local_size > count:
        raise PipelineError(
            f"{world.local_size} processes per machine were started, but this machine has {count} CUDA device(s): "
            f"set extract.nproc to at most {count}"
        )
    return torch.device("cuda", world.local_rank)


def cpu_threads(world: World) -> int:
    """Threads for one process so that all of this machine's processes together use each core once."""
    return max(1, usable_cores() // world.local_size)


def gather(obj: T, world: World) -> list[T]:
    """Every process's ``obj``, in rank order (a picklable value; small: it travels through gloo)."""
    if world.size == 1:
        return [obj]
    out: list[Any] = [None] * world.size
    with _peers():
        dist.all_gather_object(out, obj)
    return out


def broadcast(obj: T, world: World) -> T:
    """Rank 0's ``obj``, on every process."""
    if world.size == 1:
        return obj
    box: list[Any] = [obj]
    with _peers():
        dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def _peers() -> Iterator[None]:
    """A collective that fails because a peer died reports that, not gloo's socket error: the peer's own
    error is the one to read."""
    try:
        yield
    except RuntimeError as err:  # DistBackendError and DistNetworkError are RuntimeErrors
        # the launcher, which saw the peer exit, stops this process within moments; exiting on our own first would
        # make this process a second failure, and a launcher might name it as the root cause instead of the peer
        time.sleep(PEER_GRACE)
        raise Stopped("stopped: another process failed (its error names its rank)") from err


def check_shared(directory: Path, world: World) -> None:
    """Refuse to start when a process cannot see a file that rank 0 writes in ``directory``: the shards of
    every process must reach rank 0, which writes the final files."""
    if world.size == 1:
        return
    token = directory / "world.json"
    nonce = secrets.token_hex(8)
    if world.main:
        directory.mkdir(parents=True, exist_ok=True)
        token.write_text(nonce)
    nonce = broadcast(nonce, world)
    seen = gather(token.is_file() and token.read_text() == nonce, world)
    if world.main:
        token.unlink()
    blind = [rank for rank, ok in enumerate(seen) if not ok]
    if blind:
        raise PipelineError(
            f"rank(s) {blind} cannot see {directory}, which rank 0 writes: processes on several machines "
            "need the project directory on a filesystem they all share"
        )
