"""The in-process ceiling: the pipeline's own network on random uint8 batches, no data loading or I/O.

Run as ``python -m bench.ceiling --image-size 224 --precision bf16 --stats out.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from pipeline.backbones import build_extractor
from pipeline.config import ExtractConfig
from pipeline.hardware import resolve_device, resolve_precision


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--precision", default="fp32", help="fp32 | bf16 | fp16 | auto")
    parser.add_argument("--arch", default="vgg16")
    parser.add_argument("--layer", default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stats", type=Path, required=True)
    args = parser.parse_args()

    cfg = ExtractConfig(arch=args.arch, weights="random", layer=args.layer, image_size=args.image_size)
    device = resolve_device(args.device)
    model, _, _ = build_extractor(cfg, 0, resolve_precision(args.precision, device))
    model = model.to(device, memory_format=torch.channels_last)
    size = (args.batch_size, 3, args.image_size, args.image_size)
    images = torch.randint(0, 256, size, dtype=torch.uint8, device=device).contiguous(memory_format=torch.channels_last)
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


if __name__ == "__main__":
    main()
