"""Stage `extract`: run the frozen VGG once over every split and cache its features in HDF5.

With ``extract.nproc: 1`` this is one plain process; with more it starts that many workers on this machine
(one per GPU) with PyTorch's elastic launcher. Under your own ``torchrun`` (several machines) each process
is one worker and ``extract.nproc`` is not used.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline import backbone, distributed, features, sources
from pipeline.config import ExtractConfig, Params, load_params, to_dict, with_dvc_paths
from pipeline.distributed import World
from pipeline.errors import PipelineError, run_stage
from pipeline.files import replaced
from pipeline.hardware import decode_workers, resolve_precision
from pipeline.progress import Progress, Shards, discard_stale, run_key, shard_dir

log = logging.getLogger(__name__)

PROGRESS_DIR = ".extract-progress"  # next to the features directory, outside DVC's outputs
COMMIT_EVERY = 4  # batches between progress commits (fsync): at most this many are redone after a kill
WRITE_ROWS = 4096  # rows per block when the work files are copied into the HDF5 outputs


def split_batches(sizes: Sequence[int], batch_size: int) -> list[list[int]]:
    """Batches of consecutive row indices that never straddle two splits laid end to end."""
    batches, offset = [], 0
    for size in sizes:
        batches += [
            list(range(a, min(a + batch_size, offset + size))) for a in range(offset, offset + size, batch_size)
        ]
        offset += size
    return batches


def pieces(batches: Sequence[Sequence[int]], workers: int) -> list[list[int]]:
    """Each batch cut into one piece per decode worker, so that every worker decodes a share of every batch: the
    first batch is ready after batch_size / workers decodes, not batch_size, and a run of few batches keeps every
    worker busy. The network still sees the whole batches (see _joined), so the features do not change."""
    out = []
    for batch in batches:
        size = -(-len(batch) // max(1, workers))
        out += [list(batch[i : i + size]) for i in range(0, len(batch), size)]
    return out


def _joined(loader: Iterable[Any], batches: Sequence[Sequence[int]]) -> Iterator[tuple[list[torch.Tensor], Any, list]]:
    """The loader's pieces, in order, joined back into ``batches``: (image pieces, row indices, errors)."""
    pieces_in = iter(loader)
    for batch in batches:
        images, index, errors, n = [], [], [], 0
        while n < len(batch):
            piece, rows, problems = next(pieces_in)
            images.append(piece)
            index.append(rows)
            errors += problems
            n += len(rows)
        yield images, torch.cat(index), errors


def provenance(cfg: ExtractConfig, seed: int, precision: str, prep: backbone.Preprocessing) -> dict[str, Any]:
    """The provenance attributes shared by every split file (weights, split and class names are added)."""
    return {
        "schema": features.SCHEMA,
        "arch": cfg.arch,
        "seed": seed,
        "precision": precision,
        "layer": cfg.layer,
        "pool": cfg.pool,
        "image_size": cfg.image_size,
        "decode": cfg.decode,
        "resize_size": prep.resize_size,
        "interpolation": prep.interpolation,
        "mean": list(prep.mean),
        "std": list(prep.std),
        "views": list(cfg.views),
        "storage_dtype": cfg.storage_dtype,
        "feature_dim": backbone.feature_dim(cfg.layer, cfg.pool, cfg.image_size),
        "torch_version": str(torch.__version__),  # TorchVersion, a str subclass h5py cannot store
        "torchvision_version": str(torchvision.__version__),
    }


def shard_bounds(batches: Sequence[Sequence[int]], size: int) -> list[tuple[int, int]]:
    """Each process's rows [start, stop): as equal as whole batches allow, cut only between batches, so that a
    batch, and so its features bit for bit, is the same whatever the number of processes."""
    starts = [b[0] for b in batches] + [batches[-1][-1] + 1 if batches else 0]
    n = starts[-1]
    cuts = [min(starts, key=lambda s: (abs(s - r * n / size), s)) for r in range(1, size)]  # nearest boundary
    edges = [0, *cuts, n]
    return list(zip(edges[:-1], edges[1:], strict=True))


def extract(params: Params, prepared: Path, out_dir: Path, world: World | None = None) -> dict[str, float] | None:
    """Write ``{split}.h5`` for every split; returns the run's images and seconds (on rank 0; None elsewhere).

    Each process extracts its own contiguous shard of the rows into its own work files; once every shard is
    complete, rank 0 copies them, in manifest order, into the final files.
    """
    cfg, world = params.extract, world or World()
    items, classes = sources.read_manifest(prepared)
    device = distributed.device(cfg.device, world)
    if device.type == "cpu" and world.local_size > 1:
        torch.set_num_threads(distributed.cpu_threads(world))
    precision = resolve_precision(cfg.precision, device)
    model, prep, weights_info = backbone.build_extractor(cfg, params.seed, precision)
    model = model.to(device, memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # one input shape throughout: let cuDNN pick its fastest kernels
    forward = torch.compile(model, dynamic=False) if cfg.compile else model
    base = provenance(cfg, params.seed, precision, prep) | weights_info | {"class_names": list(classes)}

    rows = {split: [it for it in items if it.split == split] for split in sources.SPLITS}
    ordered = [it for split in sources.SPLITS for it in rows[split]]  # splits end to end, manifest order within
    ids = [it.id for it in ordered]
    key = run_key(
        {
            "provenance": base,
            "batch_size": cfg.batch_size,  # batch composition can change the last bits of the arithmetic
            "device": device.type,
            "manifest": [(it.id, it.label, it.split) for it in ordered],
            "images": sources.fingerprint(params.data, ids),
        }
    )
    batches = split_batches([len(rows[s]) for s in sources.SPLITS], cfg.batch_size)
    bounds = shard_bounds(batches, world.size)
    root = out_dir.parent / PROGRESS_DIR
    dirs = [shard_dir(root, key, rank, world.size) for rank in range(world.size)]
    if world.main:
        discard_stale(root, dirs)
    distributed.check_shared(root / key, world)
    layout = {"dim": base["feature_dim"], "dtype": cfg.storage_dtype, "views": cfg.views}
    start, stop = bounds[world.rank]
    progress = Progress(dirs[world.rank], start=start, stop=stop, **layout)
    workers = decode_workers(cfg.num_workers, world.local_size)
    log.info(
        "extracting %s %s (%s weights, %s) on %s (%d threads, %d decode workers), %d-d features, images %d to %d of %d",
        cfg.arch, cfg.layer, cfg.weights, precision, device, torch.get_num_threads(), workers, base["feature_dim"],
        start, stop, len(ids),
    )  # fmt: skip
    reader = sources.ImageReader(params.data, reduce_for=prep.reduce_for(cfg.decode))
    todo = [b for b in batches if progress.done <= b[0] < stop]  # commits happen on batch boundaries
    loader = DataLoader(
        backbone.Images(ids, reader, prep),
        batch_sampler=pieces(todo, workers),
        num_workers=workers,
        prefetch_factor=2 * workers if workers else None,  # two whole batches a worker ahead, as without pieces
        pin_memory=device.type == "cuda",
    )
    step = functools.partial(_forward, forward, device=device, pad_to=cfg.batch_size)
    mine = _extract_shard(step, _joined(loader, todo), progress, ordered, views=cfg.views, bar=world.main)
    if not world.main:
        progress.close()  # rank 0 reads it from here
        log.info("extracted %d images in %.1f s; waiting for the other processes", mine["images"], mine["seconds"])
    shares = distributed.gather(mine, world)  # waits for every process: a failed one stops the run here
    if not world.main:
        return None
    merge_start = time.time()
    others = [Progress.finished(d, start=a, stop=b, **layout) for d, (a, b) in zip(dirs[1:], bounds[1:], strict=True)]
    shards = Shards([progress, *others])
    with replaced(out_dir) as tmp:
        _write_splits(shards, tmp, rows, base, compression=cfg.compression)
    shards.remove()
    stats = _totals(shares, merge_start, time.time())  # the write counts, as np.save's does
    stats |= {"processes": world.size, "decode_workers": workers}
    if device.type == "cuda":
        stats["gpu_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    log.info(
        "extracted %d images in %.1f s (%.1f img/s) with %d process(es); the final files took %.1f s",
        stats["images"], stats["seconds"], stats["images_per_second"], world.size, stats["merge_seconds"],
    )  # fmt: skip
    return stats


def _extract_shard(
    step: Callable[[list[torch.Tensor], Sequence[str]], dict[str, np.ndarray]],
    loader: Iterable[tuple[list[torch.Tensor], torch.Tensor, list[str]]],
    progress: Progress,
    ordered: Sequence[sources.Item],
    *,
    views: Sequence[str],
    bar: bool,
) -> dict[str, Any]:
    """Run the network over this process's batches into its work files; returns its images and times."""
    resumed = done = progress.done
    start_time, warm = time.time(), None  # warm: time and rows when the first batch is done
    try:
        with torch.inference_mode(), tqdm(
            total=progress.stop - progress.start, initial=done - progress.start, desc="extract", unit="img",
            disable=not bar,
        ) as pbar:  # fmt: skip
            for n_batch, (images, index, errors) in enumerate(loader, start=1):
                for row, error in zip(index.tolist(), errors, strict=True):
                    if error:
                        raise PipelineError(f"cannot read image {ordered[row].id!r}: {error}")
                first = int(index[0])
                progress.write(first, step(images, features.split_views(views, ordered[first].split)))
                done = first + len(index)  # batches never straddle splits: the first row's split is the batch's
                if n_batch % COMMIT_EVERY == 0:
                    progress.commit(done)
                pbar.update(len(index))
                warm = warm or (time.time(), len(index))
    finally:  # on Ctrl-C, SIGTERM or an error too: every finished batch is kept for the next run
        if done > progress.done:
            progress.commit(done)
        if done < progress.stop:
            log.info(
                "kept %d of %d images in %s: run again to continue",
                done - progress.start, progress.stop - progress.start, progress.dir,
            )  # fmt: skip
    return {"images": done - resumed, "start": start_time, "seconds": time.time() - start_time, "warm": warm}


def _totals(shares: Sequence[dict[str, Any]], merge_start: float, end: float) -> dict[str, float]:
    """The run's figures from every process's: images summed, seconds from the earliest start to the end."""
    images = sum(s["images"] for s in shares)
    seconds = end - min(s["start"] for s in shares)
    stats = {"images": images, "seconds": seconds, "images_per_second": images / seconds, "end": end}
    stats["merge_seconds"] = end - merge_start
    warm = [s for s in shares if s["warm"] and s["images"] > s["warm"][1]]
    if warm:  # after start-up (worker launch, first decode, kernel selection) of each process
        warm_images = sum(s["images"] - s["warm"][1] for s in warm)
        stats |= {"warm_images": warm_images, "warm_seconds": end - min(s["warm"][0] for s in warm)}
    return stats


def _write_splits(
    shards: Shards, out_dir: Path, rows: dict[str, list[sources.Item]], base: dict[str, Any], *, compression: str
) -> None:
    """One clean pass from the work files into ``{split}.h5``, each file atomic; the bytes never depend on how
    many runs or processes the extraction took."""
    out_dir.mkdir(parents=True, exist_ok=True)
    offset = 0
    for split in sources.SPLITS:
        items, n = rows[split], len(rows[split])
        labels = np.array([it.label for it in items], dtype=np.int64)
        views = features.split_views(base["views"], split)
        with features.FeatureWriter(
            out_dir / f"{split}.h5", n=n, dim=base["feature_dim"], dtype=base["storage_dtype"], views=views,
            provenance=base | {"split": split}, compression=compression,
        ) as writer:  # fmt: skip
            for a in range(0, n, WRITE_ROWS):
                b = min(n, a + WRITE_ROWS)
                blocks = {v: shards.read(v, offset + a, offset + b) for v in views}
                writer.write(a, blocks, labels[a:b], [it.id for it in items[a:b]])
        offset += n


def _forward(
    model: torch.nn.Module, pieces: list[torch.Tensor], views: Sequence[str], *, device: torch.device, pad_to: int
) -> dict[str, np.ndarray]:
    """Features of one uint8 batch, given in pieces, for each view, as float32 numpy. The pieces are joined on the
    device, after their (pinned, asynchronous) copies. A short batch is zero-padded to ``pad_to`` rows: every
    forward pass has one shape, so a row's bits do not depend on how many images share its batch, nor on the
    thread count (a lone image in a batch of one differed in the last bit between 1 and 2 CPU threads)."""
    parts = [p.to(device, non_blocking=True) for p in pieces]
    n = sum(len(p) for p in parts)
    if n < pad_to:
        parts.append(parts[0].new_zeros(pad_to - n, *parts[0].shape[1:]))
    images = parts[0] if len(parts) == 1 else torch.cat(parts)  # one copy at most: join and pad together
    images = images.contiguous(memory_format=torch.channels_last)
    out = {"original": model(images)[:n]}
    if "hflip" in views:
        out["hflip"] = model(images.flip(-1))[:n]
    if not all(bool(torch.isfinite(t).all()) for t in out.values()):
        raise PipelineError("the network produced non-finite features (inf or NaN): check extract.weights")
    return {view: t.cpu().numpy() for view, t in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prepared", type=Path, help="directory with manifest.csv and classes.json")
    parser.add_argument("--out", type=Path, help="directory for train.h5, val.h5, test.h5")
    parser.add_argument("--metrics", type=Path, help="JSON file for the images extracted and images/s")
    parser.add_argument("--stats", type=Path, help="also write every timing of the run here, as JSON (benchmarks)")
    args = with_dvc_paths(parser.parse_args(), prepared="prepared", out="features", metrics="extract_metrics")
    params = load_params()
    if params.extract.nproc > 1 and not distributed.launched():
        nproc = params.extract.nproc
        distributed.device(params.extract.device, World(size=nproc, local_size=nproc))  # its errors, once, here
        sys.exit(distributed.launch(nproc, "pipeline.extract", sys.argv[1:]))
    world = World.from_env()
    distributed.die_with_launcher()
    if world.main:
        log.info("extract params: %s", to_dict(params.extract))
    with distributed.joined(world):
        stats = extract(params, args.prepared, args.out, world)
    if stats is None:
        return
    headline = {
        "images": stats["images"],
        "images/s": round(stats["images_per_second"], 2),
        "decode_workers": stats["decode_workers"],
    }
    with replaced(args.metrics) as tmp:
        tmp.write_text(json.dumps(headline, indent=1) + "\n")
    if args.stats:
        with replaced(args.stats) as tmp:
            tmp.write_text(json.dumps(stats, indent=2) + "\n")


if __name__ == "__main__":
    run_stage(main)
