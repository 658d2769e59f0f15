"""Extraction on one GPU: images/s, GPU utilisation and peak memory, against the bare network; and whether the
GPU's features agree with the CPU's. Run through ``bench/gpu.sh``, which sets up what this needs.

    bash bench/gpu.sh                       # 20,000 JPEGs of 500x375 and 2,000 12 MP photos, about 5 minutes
    bash bench/gpu.sh --quick --device cpu  # the whole script in seconds, on any machine

Every extraction is the pipeline's own (``python -m pipeline.extract``, VGG16 pool5 at 224 px, random weights,
``precision: auto``), in a process of its own, with ``decode`` fast and exact. GPU utilisation is
``nvidia-smi``'s, sampled every 200 ms, over the same time as images/s: from the end of the first batch to the
last file written. Peak memory is PyTorch's peak allocation.
The report is printed as a table and written, with every figure, to ``--out`` as JSON and Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.images import PHOTO_SIZE, make_jpegs, make_photos
from pipeline.hardware import usable_cores


class Utilisation:
    """``nvidia-smi``'s GPU utilisation, sampled in the background while the block runs; empty without it."""

    def __init__(self, interval_ms: int = 200) -> None:
        self.samples: list[tuple[float, float]] = []  # (time.time(), percent)
        self._cmd = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]
        self._cmd += [f"--loop-ms={interval_ms}"]
        self._proc: subprocess.Popen | None = None

    def __enter__(self) -> Utilisation:
        if shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(self._cmd, stdout=subprocess.PIPE, text=True)
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
        return self

    def _read(self) -> None:
        assert self._proc and self._proc.stdout
        for line in self._proc.stdout:
            first = line.strip().split(",")[0]  # first GPU
            if first.isdigit():
                self.samples.append((time.time(), float(first)))

    def __exit__(self, *_: Any) -> None:
        if self._proc:
            self._proc.terminate()
            self._proc.wait()
            self._reader.join(timeout=2)

    def summary(self, start: float = 0.0, end: float = float("inf")) -> dict[str, float | None]:
        """Mean and max of the samples taken from ``start`` to ``end`` (time.time())."""
        s = [value for t, value in self.samples if start <= t <= end]
        return {"gpu_util_mean": float(np.mean(s)) if s else None, "gpu_util_max": max(s) if s else None}


def extraction(root: Path, work: Path, tag: str, extract: dict[str, Any]) -> dict[str, Any]:
    from bench.__main__ import pipeline_extract

    with Utilisation() as util:
        stats = pipeline_extract(root, work, tag, extract)
    end = stats["end"]  # the warm part of the extraction, as for images/s: start-up and exit left out
    return stats | util.summary(end - stats.get("warm_seconds", stats["seconds"]), end)


def ceiling(work: Path, device: str, image_size: int, batch: int, repeats: int) -> dict[str, Any]:
    from bench.__main__ import measured

    out = work / "ceiling.json"
    cmd = [sys.executable, "-m", "bench.ceiling", f"--image-size={image_size}", "--precision=auto"]
    cmd += [f"--device={device}"]
    with Utilisation() as util:
        measured([*cmd, f"--batch-size={batch}", f"--repeats={repeats}", f"--stats={out}"], work)
    return json.loads(out.read_text()) | util.summary()


def agreement(root: Path, work: Path, device: str, image_size: int, batch: int) -> dict[str, Any]:
    """The same images, in the same batches, through the device (precision auto) and the CPU in fp32, both
    stored as float32."""
    from bench.__main__ import pipeline_extract
    from pipeline.features import read_features

    rows = {}
    for tag, opts in (("cpu-fp32", {"device": "cpu", "precision": "fp32"}), ("device-auto", {"device": device})):
        opts |= {"storage_dtype": "float32", "batch_size": batch, "image_size": image_size}
        pipeline_extract(root, work, f"agree-{tag}", opts)
        rows[tag] = np.concatenate(
            [
                read_features(work / f"pipeline-agree-{tag}" / "features" / f"{s}.h5").features["original"]
                for s in ("train", "val", "test")
            ]  # fmt: skip
        )
    return compare(rows["device-auto"], rows["cpu-fp32"])


def compare(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Per-row relative L2 error of ``a`` against the reference ``b``, and cosine similarity."""
    err = np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-12)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return {"rows": len(a), "rel_err_median": float(np.median(err)), "rel_err_max": float(err.max()),
            "cosine_min": float(cos.min())}  # fmt: skip


def gpu_decode(photos: Path, n: int = 128) -> dict[str, Any]:
    """torchvision's nvJPEG decode of a list of photos on the GPU, against Pillow's reduced decode on one core,
    with the pixel difference of the 224 px network input from both (the pipeline's own resize and crop)."""
    import torch
    from torchvision.io import decode_jpeg, read_file
    from torchvision.transforms import functional as F

    from pipeline.backbones.vgg import preprocessing
    from pipeline.images import open_image

    if not torch.cuda.is_available():
        return {"skipped": "no CUDA device"}
    prep = preprocessing("vgg16", 224)
    files = sorted(photos.rglob("*.jpg"))[:n]
    data = [read_file(str(f)) for f in files]
    decode_jpeg(data[:4], device="cuda")  # initialise nvJPEG
    torch.cuda.synchronize()
    start = time.perf_counter()
    crops = []
    for k in range(0, len(data), 32):
        for image in decode_jpeg(data[k : k + 32], device="cuda"):
            small = F.resize(image, [prep.resize_size], antialias=True)
            crops.append(F.center_crop(small, [prep.crop_size]))
    torch.cuda.synchronize()
    gpu_s = time.perf_counter() - start
    start = time.perf_counter()
    pil = [prep.to_uint8(open_image(f, prep.resize_size)) for f in files[:16]]
    cpu_s = (time.perf_counter() - start) / 16 * len(files)
    diff = torch.stack([(c.cpu().int() - p.int()).abs().float().mean() for c, p in zip(crops, pil, strict=False)])
    return {"images": len(files), "gpu_images_per_s": len(files) / gpu_s, "pillow_fast_one_core_images_per_s":
            len(files) / cpu_s, "mean_abs_pixel_diff": float(diff.mean())}  # fmt: skip


def run(args: argparse.Namespace, work: Path, out: Path) -> dict[str, Any]:
    import torch

    report: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "cpus": usable_cores(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "torch": str(torch.__version__),
        },
        "settings": {
            "small": args.small,
            "photos": args.photos,
            "photo_size": list(args.photo_size),
            "device": args.device,
            "batch_size": args.batch_size,
            "image_size": args.image_size,
        },
    }

    def save(key: str, value: Any) -> None:  # after every step: a run cut short keeps what it measured
        report[key] = value
        (out / "gpu.json").write_text(json.dumps(report, indent=1) + "\n")
        print(f"{key}: {json.dumps(value)}", flush=True)

    start = time.perf_counter()
    folders = {"small": make_jpegs(work / "small", args.small, workers=-1)}
    folders["photos"] = make_photos(work / "photos", args.photos, size=args.photo_size, workers=-1)
    save("generate_s", time.perf_counter() - start)
    runs = {}
    for folder in ("small", "photos"):
        for decode in ("fast", "exact"):
            opts = {"image_size": args.image_size, "batch_size": args.batch_size, "device": args.device}
            opts["decode"] = decode
            runs[f"{folder}-{decode}"] = extraction(folders[folder], work, f"{folder}-{decode}", opts)
            save("extraction", runs)
    save("ceiling", ceiling(work, args.device, args.image_size, args.batch_size, repeats=2 if args.quick else 20))
    agree_root = work / "agree"
    if not agree_root.exists():
        agree_root.mkdir()
        for f in sorted(folders["small"].rglob("*.jpg"), key=lambda f: f.name)[: args.agree]:  # every class
            (agree_root / f.parent.name).mkdir(exist_ok=True)
            os.link(f, agree_root / f.parent.name / f.name)
    save("agreement", agreement(agree_root, work, args.device, args.image_size, args.batch_size))
    save("gpu_decode", gpu_decode(folders["photos"]))
    return report


def markdown(report: dict[str, Any], tolerance: dict[str, float]) -> str:
    m, s = report["machine"], report["settings"]
    photo = "x".join(map(str, s.get("photo_size", (4032, 3024))))
    lines = [
        f"# Extraction on {m['gpu'] or 'the CPU'} ({m['cpus']} CPU cores, torch {m['torch']})",
        "",
        f"VGG16 pool5 at {s['image_size']} px, random weights, precision auto, batch {s['batch_size']}; "
        f"{s['small']} JPEGs of 500x375 and {s['photos']} photos of {photo}. Images/s after the first batch; "
        f"generating the files took {report['generate_s']:.0f} s.",
        "",
        "| run | decode workers | images/s | of the bare network | GPU util. mean / max % | peak GPU MiB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    ceil = report["ceiling"]["images_per_s"]
    for name, r in report["extraction"].items():
        util = f"{r['gpu_util_mean']:.0f} / {r['gpu_util_max']:.0f}" if r.get("gpu_util_mean") is not None else "-"
        peak = f"{r['gpu_peak_mib']:.0f}" if "gpu_peak_mib" in r else "-"
        lines.append(
            f"| {name} | {r['decode_workers']} | {r['images_per_s']:.0f} | {r['images_per_s'] / ceil:.0%} "
            f"| {util} | {peak} |"
        )
    c = report["ceiling"]
    util = f"max {c['gpu_util_max']:.0f}" if c.get("gpu_util_max") is not None else "-"  # start-up included
    lines += [f"| bare network, random uint8 batches | - | {ceil:.0f} | 100% | {util} | - |", ""]
    a = report["agreement"]
    ok = a["rel_err_max"] <= tolerance["rel_err_max"] and a["cosine_min"] >= tolerance["cosine_min"]
    lines += [
        f"Features from `{s['device']}` (precision auto) against the CPU in fp32, {a['rows']} images: relative "
        f"error median {a['rel_err_median']:.2e}, max {a['rel_err_max']:.2e}; cosine similarity min "
        f"{a['cosine_min']:.6f}. Tolerance (bf16): max relative error {tolerance['rel_err_max']}, cosine "
        f">= {tolerance['cosine_min']}: **{'within' if ok else 'OUTSIDE'}**.",
    ]
    g = report.get("gpu_decode", {})
    if "gpu_images_per_s" in g:
        lines += [
            "",
            f"nvJPEG (torchvision.io.decode_jpeg on the GPU, batches of 32) on {g['images']} photos, with resize "
            f"and crop on the GPU: {g['gpu_images_per_s']:.0f} images/s, against Pillow's reduced decode at "
            f"{g['pillow_fast_one_core_images_per_s']:.0f} images/s on one core; network inputs differ by "
            f"{g['mean_abs_pixel_diff']:.2f} grey levels on average.",
        ]
    return "\n".join(lines) + "\n"


# bf16 against fp32 on the same images, as measured on this project's CPU (`bash bench/gpu.sh --quick --device
# cpu`): relative error at most 4.9e-3, cosine similarity at least 0.99998. A GPU's kernels round differently,
# so the bound is four times that error.
TOLERANCE = {"rel_err_max": 0.02, "cosine_min": 0.9995}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=20000, help="JPEGs of 500x375")
    parser.add_argument("--photos", type=int, default=2000, help="12-megapixel photos")
    parser.add_argument("--agree", type=int, default=512, help="images for the GPU-against-CPU feature check")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=256, help="extract.batch_size of every run")
    parser.add_argument("--image-size", type=int, default=224, help="extract.image_size of every run")
    parser.add_argument("--quick", action="store_true", help="a few images of each: a test of the script itself")
    parser.add_argument("--photo-size", type=int, nargs=2, default=PHOTO_SIZE, help="width and height of the photos")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="report directory")
    parser.add_argument("--workdir", type=Path, help="keep generated images and runs here")
    args = parser.parse_args()
    if args.quick:
        args.small, args.photos, args.agree = 48, 40, 32  # 40: enough for a four-class split
        args.batch_size, args.image_size = 16, 64
        args.photo_size = (1600, 1200)  # still reduced on decode (to 1/8 for 64 px), at a sixth of the pixels
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        report = run(args, work, args.out)
    text = markdown(report, TOLERANCE)
    (args.out / "gpu.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
