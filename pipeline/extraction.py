"""The extraction itself: the frozen network over every image that lacks a row for this setting, on this process's
share of the batches, into the row store; then, on rank 0, the store's rows in manifest order into ``{split}.h5``.
Stage `extract` (pipeline.extract) loads it once it knows that this process extracts, rather than launches workers.
"""

from __future__ import annotations

import functools
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline import backbones, committed, decoder, distributed, features, provenance, sources
from pipeline.batches import joined, pieces, shard_bounds, split_batches
from pipeline.config import ExtractConfig, Params
from pipeline.distributed import World
from pipeline.errors import PipelineError, Stopped
from pipeline.files import replaced
from pipeline.hardware import decode_workers, resolve_precision
from pipeline.store import STORE_DIR, RowStore, prune_stores, settings_key

log = logging.getLogger(__name__)

OLD_PROGRESS_DIR = ".extract-progress"  # the resumable work files of earlier releases, which the store replaced
COMMIT_EVERY = 4  # batches between store commits (fsync): at most this many are redone after a kill
WRITE_ROWS = 4096  # rows per block when the stored rows are copied into the HDF5 outputs


def extract(
    params: Params, prepared: Path, out_dir: Path, world: World | None = None, *, keep: frozenset[bytes] = frozenset()
) -> dict[str, float] | None:
    """Write ``{split}.h5`` for every split; returns the run's figures (on rank 0; None elsewhere).

    Rows are kept in the row store by the content key of their image: only images without a row for this
    setting go through the network, each process taking its contiguous share of their batches. Once every
    process is done, rank 0 copies the rows, in manifest order, into the final files. The rows kept afterwards
    are those of the manifest's images and of ``keep`` (the content keys of every listed image, those that
    data.per_class_limit left out too), in every view the store has.
    """
    cfg, world = params.extract, world or World()
    items, classes = sources.read_manifest(prepared)
    forward, device, base, prep = _network(cfg, params.seed, world)
    on_device = decoder.DeviceDecoder(prep, device) if cfg.decode == "device" else None
    base |= {"decoder": on_device.name} if on_device else {}  # what decoded the JPEGs, as the rows depend on it
    if on_device and device.type != "cuda" and world.main:
        log.info("decode: device on %s decodes the JPEGs in this process, not in the workers: slower", device)
    base |= {"class_names": list(classes)}
    rows = {split: [it for it in items if it.split == split] for split in sources.SPLITS}
    store_root = out_dir.parent / STORE_DIR
    threads = torch.get_num_threads() if backbones.thread_dependent(forward, base["precision"], device) else None
    store = _open_store(store_root, base, cfg, device, world, threads)
    needs = features.needed_views({split: [it.key for it in items] for split, items in rows.items()}, cfg.views)
    if world.main:  # take what the recorded features hold of the rows this store lacks
        committed.seed(store, needs, out_dir)
    # content key -> views without a row, in manifest order; rank 0's, which every process reads before any writes
    todo = distributed.broadcast(store.missing(needs) if world.main else None, world)
    first_id = {bytes.fromhex(it.key): it.id for it in reversed(items)}  # the id of the first image of each key
    groups = {views: [k for k, v in todo.items() if v == views] for views in dict.fromkeys(todo.values())}
    keys = [k for group in groups.values() for k in group]  # grouped by their views, so a batch has one set of views
    batches = split_batches([len(g) for g in groups.values()], cfg.batch_size)
    start, stop = shard_bounds(batches, world.size)[world.rank]
    workers = decode_workers(cfg.num_workers, world.local_size)
    reused = sum(1 for it in items if bytes.fromhex(it.key) not in todo)
    if world.main:
        log.info(
            "reused %s rows, extracting %s images: %s on %s (%d threads, %d decode workers)",
            f"{reused:,}", f"{len(keys):,}", _describe(cfg, base), device, torch.get_num_threads(), workers,
        )  # fmt: skip
    listed = {it.id: it.key for it in items}  # a file must still have the bytes its rows are stored under
    reader = sources.ImageReader(params.data, reduce_for=prep.reduce_for(cfg.decode), keys=listed)
    mine = [b for b in batches if start <= b[0] < stop]
    images = backbones.Images([first_id[k] for k in keys], reader, prep)
    loader = DataLoader(
        decoder.RawImages(reader.raw, images) if on_device else images,  # device: the files' bytes, mostly
        batch_sampler=pieces(mine, workers),
        num_workers=workers,
        collate_fn=decoder.collate if on_device else None,
        prefetch_factor=2 * workers if workers else None,  # two whole batches a worker ahead, as without pieces
        pin_memory=device.type == "cuda",
    )
    step = functools.partial(_forward, forward, device=device, pad_to=cfg.batch_size)
    work = [(keys[b[0] : b[-1] + 1], todo[keys[b[0]]]) for b in mine]
    batches_in = joined(loader, mine) if mine else iter(())  # no work: no decode workers started
    batches_in = decoder.on_device(batches_in, on_device) if on_device else batches_in
    done = _extract_shard(step, batches_in, store, work, ids=first_id, bar=world.main)
    store.close()
    shares = distributed.gather(done, world)  # waits for every process: a failed one stops the run here
    if not world.main:
        return None
    merge_start = time.time()
    store = _open_store(store_root, base, cfg, device, world, threads)  # with every process's rows
    with replaced(out_dir) as tmp:
        _write_splits(store, tmp, rows, base, compression=cfg.compression)
    live = keep | needs.keys()
    dropped = store.keep_only({v: [key for key in keys if key in live] for v, keys in store.index.items()})
    store.close()
    prune_stores(store_root, cfg.keep_stores, store.dir)
    stats = _totals(shares, merge_start, time.time()) | {"reused": reused, "dropped": dropped}
    stats |= {"processes": world.size, "decode_workers": workers}
    if device.type == "cuda":
        stats["gpu_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    log.info(
        "extracted %d images in %.1f s (%.1f img/s) with %d process(es), reused %d rows, dropped %d stale ones; "
        "the final files took %.1f s",
        stats["images"], stats["seconds"], stats["images_per_second"], world.size, reused, dropped,
        stats["merge_seconds"],
    )  # fmt: skip
    return stats


def _network(
    cfg: ExtractConfig, seed: int, world: World
) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.device, dict[str, Any], backbones.Preprocessing]:
    """The frozen network on this process's device, ready to run: (forward, device, provenance, preprocessing)."""
    device = distributed.device(cfg.device, world)
    if device.type == "cpu" and world.local_size > 1:
        torch.set_num_threads(distributed.cpu_threads(world))
    precision = resolve_precision(cfg.precision, device)
    model, prep, built = backbones.build_extractor(cfg, seed, precision)
    model = model.to(device, memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True  # one input shape throughout: let cuDNN pick its fastest kernels
    forward = torch.compile(model, dynamic=False) if cfg.compile else model
    return forward, device, provenance.of_extraction(cfg, seed, precision, prep, built), prep


def _open_store(
    root: Path, base: dict[str, Any], cfg: ExtractConfig, device: torch.device, world: World, threads: int | None
) -> RowStore:
    """This setting's row store (provenance.store_settings picks it)."""
    if world.main and (root.parent / OLD_PROGRESS_DIR).is_dir():
        shutil.rmtree(root.parent / OLD_PROGRESS_DIR, ignore_errors=True)
    settings = provenance.store_settings(base, cfg, device, threads)
    return RowStore(root / settings_key(settings), segment=world.rank, dim=base["feature_dim"], dtype=cfg.storage_dtype)


def _describe(cfg: ExtractConfig, base: dict[str, Any]) -> str:
    layer = f"{base['layer']} ({base['pool']})"
    return f"{cfg.arch} {layer}, {cfg.weights} weights, {base['precision']}, {base['feature_dim']}-d features"


def _extract_shard(
    step: Callable[[list[torch.Tensor], Sequence[str]], dict[str, np.ndarray]],
    loader: Iterable[tuple[list[torch.Tensor], torch.Tensor, list[str]]],
    store: RowStore,
    work: Sequence[tuple[Sequence[bytes], Sequence[str]]],
    *,
    ids: dict[bytes, str],
    bar: bool,
) -> dict[str, Any]:
    """Run the network over this process's batches, given as (content keys, views), into the row store; returns
    its images and times."""
    done, start_time, warm = 0, time.time(), None  # warm: time and rows when the first batch is done
    total, interrupted = sum(len(keys) for keys, _ in work), False
    try:
        with torch.inference_mode(), tqdm(total=total, desc="extract", unit="img", disable=not bar) as pbar:
            for n_batch, ((images, _, errors), (keys, views)) in enumerate(zip(loader, work, strict=True), start=1):
                for key, error in zip(keys, errors, strict=True):
                    if error:
                        raise PipelineError(f"cannot read image {ids[key]!r}: {error}")
                store.append(keys, step(images, views))
                done += len(keys)
                if n_batch % COMMIT_EVERY == 0:
                    store.commit()
                pbar.update(len(keys))
                warm = warm or (time.time(), len(keys))
    except (KeyboardInterrupt, Stopped):
        interrupted = True
        raise
    finally:  # on Ctrl-C, SIGTERM or an error too: every finished batch is kept for the next run
        store.commit()
        if done < total and (interrupted or done):  # an unreadable image fails the same way again: no "run again"
            then = "run again to continue" if interrupted else "the next run starts from there"
            log.info("kept %d of %d new rows in %s: %s", done, total, store.dir, then)
    return {"images": done, "start": start_time, "seconds": time.time() - start_time, "warm": warm}


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
    store: RowStore, out_dir: Path, rows: dict[str, list[sources.Item]], base: dict[str, Any], *, compression: str
) -> None:
    """One clean pass from the row store into ``{split}.h5``, each file atomic; the bytes never depend on how many
    runs or processes made the rows, nor on which rows were already there."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for split in sources.SPLITS:
        items, n = rows[split], len(rows[split])
        labels = np.array([it.label for it in items], dtype=np.int64)
        keys = [bytes.fromhex(it.key) for it in items]
        views = features.split_views(base["views"], split)
        with features.FeatureWriter(
            out_dir / f"{split}.h5", n=n, dim=base["feature_dim"], dtype=base["storage_dtype"], views=views,
            provenance=base | {"split": split}, compression=compression, row_settings=store.dir.name,
        ) as writer:  # fmt: skip
            for a in range(0, n, WRITE_ROWS):
                b = min(n, a + WRITE_ROWS)
                blocks = {v: store.read(v, keys[a:b]) for v in views}
                writer.write(a, blocks, labels[a:b], [it.id for it in items[a:b]], keys[a:b])


def _forward(
    model: torch.nn.Module, pieces: list[torch.Tensor], views: Sequence[str], *, device: torch.device, pad_to: int
) -> dict[str, np.ndarray]:
    """Features of one uint8 batch, given in pieces, for each of ``views``, as float32 numpy. The pieces are joined
    on the device, after their (pinned, asynchronous) copies. A short batch is zero-padded to ``pad_to`` rows: every
    forward pass has one shape, so a row's bits do not depend on how many images share its batch, nor on the
    thread count (a lone image in a batch of one differed in the last bit between 1 and 2 CPU threads)."""
    parts = [p.to(device, non_blocking=device.type == "cuda") for p in pieces]  # MPS: wrong values (torch #139550)
    n = sum(len(p) for p in parts)
    if n < pad_to:
        parts.append(parts[0].new_zeros(pad_to - n, *parts[0].shape[1:]))
    images = parts[0] if len(parts) == 1 else torch.cat(parts)  # one copy at most: join and pad together
    images = images.contiguous(memory_format=torch.channels_last)
    out = {view: model(images if view == "original" else images.flip(-1))[:n] for view in views}
    if not all(bool(torch.isfinite(t).all()) for t in out.values()):
        raise PipelineError("the network produced non-finite features (inf or NaN): check extract.weights")
    return {view: t.cpu().numpy() for view, t in out.items()}
