"""Export the backbone cut, its pooling and the trained head as one self-contained model.

    python -m pipeline.export [--out models/export]

writes ``model.pt2`` (a ``torch.export`` program: uint8 RGB crops (B, 3, S, S) -> class probabilities
(B, C), any batch size) and ``model.json`` (class names, the preprocessing that makes the crops, and
the features' provenance). Loading needs torch alone, not this package::

    program = torch.export.load("models/export/model.pt2").module()
    probs = program(crops)  # crops: resize shorter side to resize_size, center-crop crop_size, uint8 CHW

The network is exported in fp32, whatever precision extraction used, so it runs the same everywhere.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline import backbones, heads
from pipeline.config import with_dvc_paths
from pipeline.errors import run_stage
from pipeline.files import replaced

log = logging.getLogger(__name__)

MODEL, META = "model.pt2", "model.json"


class Deployed(nn.Module):
    """uint8 images (B, 3, S, S) -> class probabilities (B, C): the frozen extractor and the head in one."""

    def __init__(self, extractor: backbones.FeatureExtractor, head: heads.Classifier) -> None:
        super().__init__()
        self.extractor, self.head = extractor, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.head(self.extractor(images)), dim=1)


def export(head_path: Path, out_dir: Path) -> dict[str, Any]:
    """Write model.pt2 and model.json for the head at ``head_path``; returns the JSON written."""
    head, spec = heads.load_head(head_path)
    extractor, prep = backbones.extractor_for(spec["provenance"], precision="fp32")
    # frozen: load_head's parameters require grad, torch.export records that, and the output then requires grad
    model = Deployed(extractor, head).eval().requires_grad_(False)
    size = prep.crop_size
    example = torch.zeros(2, 3, size, size, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    meta = {
        "class_names": spec["provenance"]["class_names"],
        "input": f"uint8 RGB, shape (batch, 3, {size}, {size})",
        "output": "float32 class probabilities, shape (batch, classes)",
        "preprocessing": {
            "resize_size": prep.resize_size,
            "crop_size": size,
            "interpolation": prep.interpolation,
            "mean": list(prep.mean),
            "std": list(prep.std),
            "steps": "resize the shorter side to resize_size (antialiased), center-crop crop_size, keep uint8; "
            "the model normalises with mean and std itself",
        },
        "head": {k: spec[k] for k in ("head", "in_dim", "num_classes", "hidden")},
        "provenance": spec["provenance"],
    }
    with replaced(out_dir) as tmp:
        tmp.mkdir()
        torch.export.save(program, tmp / MODEL)
        (tmp / META).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head", type=Path, help="head file (default: the train stage's output in dvc.yaml)")
    parser.add_argument("--out", type=Path, default=Path("models/export"), help="output directory")
    args = with_dvc_paths(parser.parse_args(), head="head")
    meta = export(args.head, args.out)
    log.info("wrote %s and %s (%d classes)", args.out / MODEL, args.out / META, len(meta["class_names"]))


if __name__ == "__main__":
    run_stage(main)
