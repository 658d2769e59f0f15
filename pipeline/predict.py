"""Classify new images with the trained head: ``python -m pipeline.predict PATH… [--out predictions.csv]``.

The frozen backbone is rebuilt exactly as the features' provenance records it (arch, weights, layer,
pooling, image size, precision), then the head runs on its output. Unreadable files are reported one
by one and skipped.
"""

from __future__ import annotations

import argparse
import csv
import functools
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from pipeline import backbones, decoder, heads, sources
from pipeline.config import load_params, with_dvc_paths
from pipeline.errors import PipelineError, run_stage
from pipeline.hardware import decode_workers, resolve_device
from pipeline.images import open_image, read_bytes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    path: Path
    top: list[tuple[str, float]]  # (class, probability), most probable first; empty when error is set
    error: str = ""


@torch.inference_mode()
def predict(
    paths: Sequence[Path],
    extractor: backbones.FeatureExtractor,
    head: heads.Classifier,
    prep: backbones.Preprocessing,
    *,
    class_names: Sequence[str],
    top_k: int,
    device: torch.device,
    batch_size: int = 64,
    num_workers: int = 2,
    decode: str = "exact",
) -> list[Prediction]:
    """Top-k classes for each image, batched through the same decode, uint8 crop and on-device path as
    extraction (``decode`` as the features were made)."""
    extractor = extractor.to(device, memory_format=torch.channels_last)
    head = head.to(device).eval()
    images = backbones.Images(list(paths), functools.partial(open_image, reduce_for=prep.reduce_for(decode)), prep)
    on_device = decoder.DeviceDecoder(prep, device) if decode == "device" else None
    loader = DataLoader(
        decoder.RawImages(read_bytes, images) if on_device else images,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=decoder.collate if on_device else None,
        pin_memory=device.type == "cuda",
    )
    k = min(top_k, len(class_names))
    results: list[Prediction] = []
    for images, index, errors in loader:
        if on_device:  # the files' bytes, decoded here
            images, errors = on_device([images], errors)
        images = images.to(device, non_blocking=device.type == "cuda").contiguous(memory_format=torch.channels_last)
        probs = torch.softmax(head(extractor(images)), 1).cpu()
        values, classes = probs.topk(k, dim=1)
        for row, i in enumerate(index.tolist()):
            if errors[row]:
                results.append(Prediction(paths[i], [], errors[row]))
                continue
            top = [(class_names[c], float(v)) for c, v in zip(classes[row].tolist(), values[row].tolist(), strict=True)]
            results.append(Prediction(paths[i], top))
    return results


def write_csv(path: Path, predictions: Sequence[Prediction], top_k: int) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        header = ["path", "error"] + [f"{kind}_{i}" for i in range(1, top_k + 1) for kind in ("class", "prob")]
        writer.writerow(header)
        for p in predictions:
            cells = [value for c, prob in p.top for value in (c, f"{prob:.6f}")]
            writer.writerow([str(p.path), p.error, *cells, *[""] * (len(header) - 2 - len(cells))])


def format_table(predictions: Sequence[Prediction]) -> str:
    width = max([len(str(p.path)) for p in predictions] + [4])
    lines = [f"{'path':<{width}}  {'class':<12} {'prob':>6}  others"]
    for p in predictions:
        if p.error:
            lines.append(f"{str(p.path):<{width}}  error: {p.error}")
            continue
        (best, prob), rest = p.top[0], p.top[1:]
        others = ", ".join(f"{c} {v:.3f}" for c, v in rest)
        lines.append(f"{str(p.path):<{width}}  {best:<12} {prob:>6.3f}  {others}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", type=Path, help="image files or folders (searched recursively)")
    parser.add_argument("--head", type=Path, help="head file (default: the train stage's output in dvc.yaml)")
    parser.add_argument("--out", type=Path, help="also write a CSV: path, error, class_i, prob_i for i = 1..k")
    parser.add_argument("--top-k", type=int, help="classes to list (default: evaluate.top_k)")
    args = with_dvc_paths(parser.parse_args(), head="head")
    params = load_params()
    missing = [str(p) for p in args.paths if not p.exists()]
    if missing:
        raise PipelineError(f"not found: {', '.join(missing)}")
    paths = sources.find_images(args.paths)
    if not paths:
        raise PipelineError(f"no image files in {', '.join(map(str, args.paths))}")
    head, spec = heads.load_head(args.head)
    extractor, prep = backbones.extractor_for(spec["provenance"])
    class_names = spec["provenance"]["class_names"]
    top_k = min(args.top_k or params.evaluate.top_k, len(class_names))
    device = resolve_device(params.extract.device)
    predictions = predict(
        paths, extractor, head, prep, class_names=class_names, top_k=top_k, device=device,
        batch_size=params.extract.batch_size, num_workers=decode_workers(params.extract.num_workers),
        decode=spec["provenance"].get("decode", "exact"),  # heads from before extract.decode saw full decodes
    )  # fmt: skip
    print(format_table(predictions))
    failed = sum(bool(p.error) for p in predictions)
    if failed:
        print(f"{failed} of {len(predictions)} files could not be read", file=sys.stderr)
    if args.out:
        write_csv(args.out, predictions, top_k)
        log.info("wrote %s", args.out)


if __name__ == "__main__":
    run_stage(main)
