"""Stage `extract`: run the frozen VGG once over every split and cache its features in HDF5."""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader
from tqdm import tqdm

from pipeline import backbone, features, sources
from pipeline.config import ExtractConfig, Params, load_params, to_dict
from pipeline.errors import PipelineError, run_stage
from pipeline.files import replaced
from pipeline.hardware import resolve_device, resolve_precision
from pipeline.progress import Progress, run_key

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


def extract(params: Params, prepared: Path, out_dir: Path) -> dict[str, float]:
    """Write ``{split}.h5`` for every split; returns the images and seconds of the extraction loop."""
    cfg = params.extract
    items, classes = sources.read_manifest(prepared)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    model, prep, weights_info = backbone.build_extractor(cfg, params.seed, precision)
    model = model.to(device, memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one input shape throughout: let cuDNN pick its fastest kernels
    forward = torch.compile(model, dynamic=False) if cfg.compile else model
    base = provenance(cfg, params.seed, precision, prep) | weights_info | {"class_names": list(classes)}
    log.info(
        "extracting %s %s (%s weights, %s) on %s, %d-d features",
        cfg.arch, cfg.layer, cfg.weights, precision, device, base["feature_dim"],
    )  # fmt: skip

    rows = {split: [it for it in items if it.split == split] for split in sources.SPLITS}
    ordered = [it for split in sources.SPLITS for it in rows[split]]  # splits end to end, manifest order within
    labels = np.array([it.label for it in ordered], dtype=np.int64)
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
    progress = Progress(
        out_dir.parent / PROGRESS_DIR,
        key,
        n=len(ids),
        dim=base["feature_dim"],
        dtype=cfg.storage_dtype,
        views=cfg.views,
    )
    batches = split_batches([len(rows[s]) for s in sources.SPLITS], cfg.batch_size)
    loader = DataLoader(
        backbone.Images(ids, sources.ImageReader(params.data), prep),
        batch_sampler=[b for b in batches if b[0] >= progress.rows_done],  # commits happen on batch boundaries
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
    )
    resumed = done = progress.rows_done
    start_time, warm = time.perf_counter(), None  # warm: time and rows when the first batch is done
    try:
        with torch.inference_mode(), tqdm(total=len(ids), initial=done, desc="extract", unit="img") as bar:
            for n_batch, (images, index, errors) in enumerate(loader, start=1):
                for row, error in zip(index.tolist(), errors, strict=True):
                    if error:
                        raise PipelineError(f"cannot read image {ids[row]!r}: {error}")
                first = int(index[0])
                views = features.split_views(cfg.views, ordered[first].split)  # batches never straddle splits
                out = _forward(forward, images, views, device=device, pad_to=cfg.batch_size if cfg.compile else 0)
                progress.write(first, out)
                done = first + len(index)
                if n_batch % COMMIT_EVERY == 0:
                    progress.commit(done)
                bar.update(len(index))
                warm = warm or (time.perf_counter(), len(index))
    finally:  # on Ctrl-C or an error too: every finished batch is kept for the next run
        if done > progress.rows_done:
            progress.commit(done)
        if done < len(ids):
            log.info("kept %d of %d images in %s: run again to continue", done, len(ids), progress.dir)
    with replaced(out_dir) as tmp:
        _write_splits(progress, tmp, rows, base, labels, ids, compression=cfg.compression)
    end = time.perf_counter()  # the outputs' write counts, as the classic loop's np.save does
    progress.remove()
    extracted = len(ids) - resumed
    stats = {"images": extracted, "seconds": end - start_time}
    if warm and extracted > warm[1]:  # after start-up: worker launch, first decode, kernel selection
        stats |= {"warm_images": extracted - warm[1], "warm_seconds": end - warm[0]}
    log.info("extracted %d images in %.1f s (%.1f img/s)", extracted, stats["seconds"], extracted / stats["seconds"])
    return stats


def _write_splits(
    progress: Progress,
    out_dir: Path,
    rows: dict[str, list[sources.Item]],
    base: dict[str, Any],
    labels: np.ndarray,
    ids: list[str],
    *,
    compression: str,
) -> None:
    """One clean pass from the work files into ``{split}.h5``, each file atomic; the bytes never depend on how
    many runs the extraction took."""
    out_dir.mkdir(parents=True, exist_ok=True)
    offset = 0
    for split in sources.SPLITS:
        n = len(rows[split])
        views = features.split_views(base["views"], split)
        with features.FeatureWriter(
            out_dir / f"{split}.h5", n=n, dim=base["feature_dim"], dtype=base["storage_dtype"], views=views,
            provenance=base | {"split": split}, compression=compression,
        ) as writer:  # fmt: skip
            for a in range(0, n, WRITE_ROWS):
                b = min(n, a + WRITE_ROWS)
                blocks = {v: progress.read(v, offset + a, offset + b) for v in views}
                writer.write(a, blocks, labels[offset + a : offset + b], ids[offset + a : offset + b])
        offset += n


def _forward(
    model: torch.nn.Module, images: torch.Tensor, views: Sequence[str], *, device: torch.device, pad_to: int
) -> dict[str, np.ndarray]:
    """Features of one uint8 batch for each view, as float32 numpy; zero-pads to ``pad_to`` rows for a fixed shape."""
    n = len(images)
    images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    if n < pad_to:
        images = torch.cat([images, images.new_zeros(pad_to - n, *images.shape[1:])])
    out = {"original": model(images)[:n]}
    if "hflip" in views:
        out["hflip"] = model(images.flip(-1))[:n]
    if not all(bool(torch.isfinite(t).all()) for t in out.values()):
        raise PipelineError("the network produced non-finite features (inf or NaN): check extract.weights")
    return {view: t.cpu().numpy() for view, t in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prepared", type=Path, required=True, help="directory with manifest.csv and classes.json")
    parser.add_argument("--out", type=Path, required=True, help="directory for train.h5, val.h5, test.h5")
    parser.add_argument("--stats", type=Path, help="also write the loop's images and seconds here, as JSON")
    args = parser.parse_args()
    params = load_params()
    log.info("extract params: %s", to_dict(params.extract))
    stats = extract(params, args.prepared, args.out)
    if args.stats:
        args.stats.write_text(json.dumps(stats) + "\n")


if __name__ == "__main__":
    run_stage(main)
