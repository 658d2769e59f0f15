"""The pipeline's ceiling: its own network, bare, on uint8 batches already in memory (no decoding, no I/O).

    python -m bench.ceiling --image-size 224 --precision bf16 --stats out.json   # a short burst (bench.gpu)
    python -m bench.ceiling --precision bf16 --trace bare.jsonl                 # runs until killed, a line a batch
    python -m bench.ceiling --pipeline --trace pipe.jsonl                       # pipeline.extract, a line a batch
    python -m bench.ceiling --arch resnet50 --precision bf16 --spread 3         # identical bare processes, paired

The burst (``--stats``: the median of a few batches after one warm-up call) is what bench.gpu takes on a GPU, where
a batch takes milliseconds. On a CPU it is no ceiling: a few batches of a few seconds each measure whatever the
machine did in those seconds (other processes, the host's CPU bursts), and the pipeline, measured as briefly,
came out above its own bare network in 7 of 12 rounds (bench/results/ceiling.md says why).

An honest ceiling is sustained and interleaved: :func:`paired` starts the pipeline's extraction and the bare network
in processes of their own, as the pipeline runs (same threads, batch size, channels_last, autocast precision),
and lets one run at a time, switching every few seconds (SIGSTOP / SIGCONT of each process group), until each has
had the same time on the CPU. Whatever the machine does in that span falls on both alike; each one's rate is its
batches after the first over its own running time between their ends.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch

from pipeline.backbones import build_extractor
from pipeline.config import ExtractConfig
from pipeline.hardware import resolve_device, resolve_precision, usable_cores

SLICE_S = 4.0  # running time of one side before the other's turn: shorter than the machine's swings, longer
# than a batch's context switch (a VGG16 batch of 32 takes 1-3 s on 2 cores)


# ---------------------------------------------------------------------------- the traced processes


def _line(out: TextIO, **fields: float) -> None:
    out.write(json.dumps(fields) + "\n")
    out.flush()  # the process is killed, not asked, to stop: every finished batch must be on disk


def bare(args: argparse.Namespace) -> None:
    """The bare network on one fixed batch; ``--trace``: one line a batch until killed, else the burst's median."""
    cfg = ExtractConfig(arch=args.arch, weights="random", layer=args.layer, image_size=args.image_size)
    device = resolve_device(args.device)
    model, prep, _ = build_extractor(cfg, 0, resolve_precision(args.precision, device))
    model = model.to(device, memory_format=torch.channels_last)
    images = _batch(prep, args.batch_size, args.images).to(device).contiguous(memory_format=torch.channels_last)
    if args.trace:
        with args.trace.open("w") as out, torch.inference_mode():
            _line(out, threads=torch.get_num_threads(), batch=args.batch_size)
            _line(out, ready=time.monotonic(), cpu=time.process_time())  # built: the first batch's cost from here
            while True:
                model(images).cpu()
                _line(out, end=time.monotonic(), cpu=time.process_time())
    times = []
    with torch.inference_mode():
        for i in range(args.repeats + 1):  # the first call warms up
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(images).cpu()
            if i:
                times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    stats = {"images": args.batch_size, "seconds": seconds, "images_per_s": args.batch_size / seconds}
    args.stats.write_text(json.dumps(stats) + "\n")


def _batch(prep: Any, n: int, folder: Path | None) -> torch.Tensor:
    """The batch the bare network runs on: random uint8 values, or the first ``n`` JPEGs of ``folder`` decoded as
    the pipeline decodes them (the network's time does not depend on which: bench/results/ceiling.md)."""
    if folder is None:
        return torch.randint(0, 256, (n, 3, prep.crop_size, prep.crop_size), dtype=torch.uint8)
    from pipeline.images import open_image

    files = sorted(folder.rglob("*.jpg"))[:n]
    return torch.stack([prep.to_uint8(open_image(f, reduce_for=prep.reduce_for("fast"))) for f in files])


def traced_extract(trace: Path) -> None:
    """``python -m pipeline.extract`` as bench.__main__.pipeline_extract runs it (in the run directory), with a
    line for each batch the network finishes: the same process, threads and decode workers, and a clock."""
    from pipeline import extract, extraction
    from pipeline.errors import run_stage

    forward = extraction._forward
    with trace.open("w") as out:

        def timed(*args: Any, **kwargs: Any) -> Any:
            result = forward(*args, **kwargs)
            _line(out, end=time.monotonic(), cpu=time.process_time())
            return result

        _line(out, threads=torch.get_num_threads())
        extraction._forward = timed
        sys.argv = ["pipeline.extract", "--prepared", "prepared", "--out", "features", "--metrics", "m.json"]
        run_stage(extract.main)


# ---------------------------------------------------------------------------- running them interleaved


@dataclass
class Side:
    """One of the two processes of :func:`paired`: its command, where it runs, and its trace file."""

    name: str
    cmd: list[str]
    cwd: Path
    trace: Path
    proc: subprocess.Popen[bytes] | None = None
    windows: list[tuple[float, float]] | None = None  # (from, to) monotonic: when it was let run

    def log(self) -> Path:
        return self.trace.with_suffix(".log")

    def ends(self) -> list[float]:
        lines = [json.loads(s) for s in self.trace.read_text().splitlines()] if self.trace.is_file() else []
        return [x["end"] for x in lines if "end" in x]

    def threads(self) -> int | None:
        first = self.trace.read_text().splitlines()[:1] if self.trace.is_file() else []
        return json.loads(first[0]).get("threads") if first else None

    def running_time(self) -> float:
        """Its time let run between the end of its first batch and the end of its last."""
        ends = self.ends()
        return _overlap(self.windows or [], ends[0], ends[-1]) if len(ends) > 1 else 0.0


def _overlap(windows: Sequence[tuple[float, float]], start: float, stop: float) -> float:
    return sum(max(0.0, min(b, stop) - max(a, start)) for a, b in windows)


def _signal(side: Side, sig: int) -> None:
    if side.proc and side.proc.poll() is None:
        os.killpg(side.proc.pid, sig)  # the process group: the pipeline's decode workers stop and go with it


def _group_cpu(pgid: int) -> dict[str, float]:
    """CPU seconds so far of every live process in a process group: the leader, and the rest (decode workers)."""
    tick, cpu = os.sysconf("SC_CLK_TCK"), {"main": 0.0, "others": 0.0}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # pgrp; utime and stime are fields 14 and 15 of stat
            cpu["main" if int(pid) == pgid else "others"] += (int(fields[11]) + int(fields[12])) / tick
    return cpu


def _busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (every process's, ours and others')."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def paired(sides: Sequence[Side], seconds: float, env: dict[str, str], slice_s: float = SLICE_S) -> dict[str, Any]:
    """Run the sides' processes one at a time, switching every ``slice_s`` of running time, until each has run
    ``seconds`` after its first batch (or has exited); returns each one's rate over its running time and CPU
    seconds (of its live processes: one that ended early counts as another's), and the share of the machine's CPU
    time that other processes took meanwhile, the measure of how quiet the machine was."""
    for side in sides:
        side.trace.unlink(missing_ok=True)
        side.windows = []
        with side.log().open("wb") as log:  # a file, not a pipe: a full pipe would stall the process (tqdm)
            side.proc = subprocess.Popen(side.cmd, cwd=side.cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)  # fmt: skip
        _signal(side, signal.SIGSTOP)
    busy0, cpu = _busy_seconds(), {}
    try:
        while any([_wants_more(s, seconds) for s in sides]):  # a list: every side checked (a failed one raises)
            for side in sides:  # every live side takes its turn, done or not: the span stays interleaved
                _turn(side, slice_s)
        for side in sides:
            assert side.proc is not None
            cpu[side.name] = _group_cpu(side.proc.pid)
    finally:
        for side in sides:
            _signal(side, signal.SIGKILL)
            _signal(side, signal.SIGCONT)
            if side.proc:
                side.proc.wait()
    others = _busy_seconds() - busy0 - sum(c["main"] + c["others"] for c in cpu.values())
    span = sum(b - a for s in sides for a, b in s.windows or [])
    share = others / (usable_cores() * span)
    return {s.name: _rate(s) | {"cpu_s": cpu[s.name]} for s in sides} | {"others_cpu_share": share, "span_s": span}


def _wants_more(side: Side, seconds: float) -> bool:
    """Still running, and short of ``seconds`` of running time after its first batch."""
    assert side.proc is not None
    if side.proc.poll() is None:
        return side.running_time() < seconds
    if side.proc.returncode or len(side.ends()) < 2:
        err = side.log().read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{' '.join(side.cmd)} failed or stopped before its second batch:\n{err}")
    return False  # the pipeline extracted every image it had


def _turn(side: Side, slice_s: float) -> None:
    """Let ``side`` alone run for ``slice_s`` (or until it exits)."""
    assert side.proc is not None and side.windows is not None
    if side.proc.poll() is not None:
        return
    _signal(side, signal.SIGCONT)
    start = time.monotonic()
    with contextlib.suppress(subprocess.TimeoutExpired):  # it ran to its end: fine
        side.proc.wait(timeout=slice_s)
    _signal(side, signal.SIGSTOP)
    side.windows.append((start, time.monotonic()))


def bare_side(name: str, cwd: Path, trace: Path, **options: object) -> Side:
    """A bare network's process for :func:`paired`: ``options`` are this command's (arch, image_size, ...)."""
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in options.items()]
    return Side(name, [sys.executable, "-m", "bench.ceiling", *flags, f"--trace={trace}"], cwd, trace)


def spread(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """``args.spread`` pairs of two identical bare processes, interleaved as :func:`paired` runs a round: each
    one's rate over its running time and over each third of it. The ratio of the two is the benchmark's own noise;
    its thirds say whether that noise comes and goes with the machine, or stays with the process for its life."""
    options = {"arch": args.arch, "layer": args.layer, "image_size": args.image_size, "precision": args.precision,
               "batch_size": args.batch_size}  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    pairs = []
    for _ in range(args.spread):
        sides = [bare_side(name, work, work / f"{name}.jsonl", **options) for name in "ab"]
        got = paired(sides, args.seconds, env)
        a, b = (_thirds(side) for side in sides)
        pairs.append({
            "images_per_s": [args.batch_size * got[side.name]["batch_rate"] for side in sides],
            "ratio": got["a"]["batch_rate"] / got["b"]["batch_rate"],
            "ratio_thirds": [x / y for x, y in zip(a, b, strict=True)],
        })  # fmt: skip
        print(json.dumps(pairs[-1]), flush=True)
    return pairs


def _thirds(side: Side) -> list[float]:
    """Batches/s over each third of the batches after the first, each over its own running time."""
    ends = side.ends()
    at = [_overlap(side.windows or [], ends[0], end) for end in ends]  # running time at each batch's end
    n = len(ends) - 1
    if n < 3:
        raise SystemExit(f"{side.name}: {n} batches after the first; give --seconds enough for at least 3")
    cuts = [0, n // 3, 2 * n // 3, n]
    return [(b - a) / (at[b] - at[a]) for a, b in zip(cuts, cuts[1:], strict=False)]


def _rate(side: Side) -> dict[str, Any]:
    ends, running = side.ends(), side.running_time()
    batches = len(ends) - 1
    return {"batches": batches, "running_s": running, "batch_rate": batches / running if running else 0.0,
            "threads": side.threads(), "windows": side.windows}  # fmt: skip


# ---------------------------------------------------------------------------- command line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", action="store_true", help="run pipeline.extract here, traced (needs --trace)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--precision", default="fp32", help="fp32 | bf16 | fp16 | auto")
    parser.add_argument("--arch", default="vgg16")
    parser.add_argument("--layer", default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images", type=Path, help="a folder of JPEGs: its first batch, not random values")
    parser.add_argument("--repeats", type=int, default=5, help="burst: batches timed after one warm-up")
    parser.add_argument("--stats", type=Path, help="burst: write its median images/s here")
    parser.add_argument("--trace", type=Path, help="sustained: a JSON line a batch, until killed")
    parser.add_argument("--spread", type=int, help="run this many pairs of identical bare processes, interleaved")
    parser.add_argument("--seconds", type=float, default=24.0, help="--spread: running time of each process")
    args = parser.parse_args()
    if args.spread:
        with tempfile.TemporaryDirectory(prefix="bench-spread-") as tmp:
            spread(args, Path(tmp))
        return
    if not (args.stats or args.trace) or (args.pipeline and not args.trace):
        parser.error("give --stats (a burst) or --trace (sustained; --pipeline needs it)")
    if args.pipeline:
        traced_extract(args.trace)
    else:
        bare(args)


if __name__ == "__main__":
    main()
