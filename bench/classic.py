"""The classic way of precomputing frozen-VGG features, re-implemented faithfully as the baseline.

fp32, NCHW, autograd left on (no inference mode), torchvision transforms producing float tensors in
the workers, a Python list of numpy arrays concatenated at the end, then ``np.save``. Run as
``python -m bench.classic --root DIR --image-size 224 --stats out.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from pipeline.backbones.vgg import cut, preprocessing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--layer", default="pool5")
    parser.add_argument("--pool", default="avg", choices=["avg", "flatten"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stats", type=Path, required=True)
    args = parser.parse_args()

    prep = preprocessing("vgg16", args.image_size)  # the same resize/crop/normalisation as the pipeline
    transform = transforms.Compose(
        [
            transforms.Resize(prep.resize_size),
            transforms.CenterCrop(prep.crop_size),
            transforms.ToTensor(),
            transforms.Normalize(prep.mean, prep.std),
        ]
    )
    dataset = datasets.ImageFolder(str(args.root), transform)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers)
    torch.manual_seed(0)
    model = torchvision.models.vgg16()
    model.eval()
    body = cut(model, args.layer)

    start, warm = time.perf_counter(), None
    feats, labels = [], []
    for images, targets in loader:
        out = body(images)
        out = out.mean((2, 3)) if args.pool == "avg" else torch.flatten(out, 1)
        feats.append(out.detach().numpy())
        labels.append(targets.numpy())
        warm = warm or (time.perf_counter(), len(images))
    features = np.concatenate(feats)
    np.save(args.out, features)
    end = time.perf_counter()
    stats = {"images": len(features), "seconds": end - start}
    if len(features) > warm[1]:
        stats |= {"warm_images": len(features) - warm[1], "warm_seconds": end - warm[0]}
    args.stats.write_text(json.dumps(stats) + "\n")


if __name__ == "__main__":
    main()
