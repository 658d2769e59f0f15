"""Stage `extract`: run the frozen VGG once over every split and cache its features in HDF5."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline import backbone, features, sources
from pipeline.config import ExtractConfig, Params, load_params, to_dict
from pipeline.errors import run_stage
from pipeline.hardware import resolve_device

log = logging.getLogger(__name__)


class _Images(Dataset):
    """Decodes and resizes in DataLoader workers; yields uint8 (3, S, S) tensors and row indices."""

    def __init__(self, ids: Sequence[str], reader: sources.ImageReader, prep: backbone.Preprocessing) -> None:
        self.ids, self.reader, self.prep = ids, reader, prep

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.prep.to_uint8(self.reader(self.ids[index])), index


def extract_split(
    model: backbone.FeatureExtractor,
    loader: DataLoader,
    writer: features.FeatureWriter,
    *,
    labels: np.ndarray,
    ids: Sequence[str],
    views: Sequence[str],
    device: torch.device,
    desc: str,
) -> None:
    """Stream one split through ``model`` into ``writer``, batch by batch; memory does not grow with N."""
    with torch.inference_mode(), tqdm(total=len(ids), desc=desc, unit="img", dynamic_ncols=True) as bar:
        for images, index in loader:
            images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            start, stop = int(index[0]), int(index[-1]) + 1  # batches arrive in order: no shuffle
            out = {"original": model(images)}
            if "hflip" in views:
                out["hflip"] = model(images.flip(-1))
            writer.write(start, {v: t.cpu().numpy() for v, t in out.items()}, labels[start:stop], ids[start:stop])
            bar.update(stop - start)


def provenance(
    cfg: ExtractConfig, seed: int, prep: backbone.Preprocessing, weights_info: dict[str, str]
) -> dict[str, Any]:
    """The provenance attributes shared by every split file (split, class names and D are added per file)."""
    return {
        "schema": features.SCHEMA,
        "arch": cfg.arch,
        **weights_info,
        "seed": seed,
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


def extract(params: Params, prepared: Path, out_dir: Path) -> None:
    cfg = params.extract
    items, classes = sources.read_manifest(prepared)
    device = resolve_device(cfg.device)
    model, prep, weights_info = backbone.build_extractor(cfg, params.seed)
    model = model.to(device, memory_format=torch.channels_last)
    reader = sources.ImageReader(params.data)
    base = provenance(cfg, params.seed, prep, weights_info) | {"class_names": list(classes)}
    log.info(
        "extracting %s %s (%s weights) on %s, %d-d features",
        cfg.arch,
        cfg.layer,
        cfg.weights,
        device,
        base["feature_dim"],
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    for split in sources.SPLITS:
        rows = [it for it in items if it.split == split]
        ids = [it.id for it in rows]
        labels = np.array([it.label for it in rows], dtype=np.int64)
        views = cfg.views if split == "train" else ("original",)
        loader = DataLoader(
            _Images(ids, reader, prep),
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
            pin_memory=device.type == "cuda",
        )
        with features.FeatureWriter(
            out_dir / f"{split}.h5",
            n=len(rows),
            dim=base["feature_dim"],
            dtype=cfg.storage_dtype,
            views=views,
            provenance=base | {"split": split},
        ) as writer:
            extract_split(model, loader, writer, labels=labels, ids=ids, views=views, device=device, desc=split)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prepared", type=Path, required=True, help="directory with manifest.csv and classes.json")
    parser.add_argument("--out", type=Path, required=True, help="directory for train.h5, val.h5, test.h5")
    args = parser.parse_args()
    params = load_params()
    log.info("extract params: %s", to_dict(params.extract))
    extract(params, args.prepared, args.out)


if __name__ == "__main__":
    run_stage(main)
