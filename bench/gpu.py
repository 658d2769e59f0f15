"""Extraction on one GPU: images/s, GPU utilisation and memory, against the bare network, with the JPEGs decoded
by the CPU's workers (``decode: fast``) or on the GPU (``decode: device``); and how far the GPU's features are
from the CPU's, and the device decode's from ``exact``. Run through ``bench/gpu.sh``, which sets up what this needs.

    bash bench/gpu.sh                       # 20,000 JPEGs of 500x375 and 2,000 12 MP photos, about 8 minutes
    bash bench/gpu.sh --quick --device cpu  # the whole script in a minute or two, on any machine

Every extraction is the pipeline's own (``python -m pipeline.extract``, each backbone's default layer at 224 px,
random weights, ``precision: auto``), in a process of its own: VGG16 and ResNet-50, each on both folders with
``decode`` fast and device. GPU utilisation and memory are ``nvidia-smi``'s, sampled every 200 ms, over the same
time as images/s: from the end of the first batch to the last file written. The memory of the first and the last
tenth of that time says whether it stays flat (nvJPEG's own buffers included); the peak is PyTorch's allocation.
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
        self.samples: list[tuple[float, float, float]] = []  # (time.time(), percent, MiB used)
        self._cmd = ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits"]
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
        for line in self._proc.stdout:  # one line per GPU: the first is the one used
            fields = [f.strip() for f in line.split(",")]
            if len(fields) == 2 and all(f.isdigit() for f in fields):
                self.samples.append((time.time(), float(fields[0]), float(fields[1])))

    def __exit__(self, *_: Any) -> None:
        if self._proc:
            self._proc.terminate()
            self._proc.wait()
            self._reader.join(timeout=2)

    def summary(self, start: float = 0.0, end: float = float("inf")) -> dict[str, float | None]:
        """Utilisation's mean and max over the samples from ``start`` to ``end`` (time.time()), and the memory
        used: the most in the first and in the last tenth of those samples, and overall."""
        s = [(util, mem) for t, util, mem in self.samples if start <= t <= end]
        util, mem = [u for u, _ in s], [m for _, m in s]
        tenth = max(1, len(s) // 10)
        return {
            "gpu_util_mean": float(np.mean(util)) if s else None,
            "gpu_util_max": max(util) if s else None,
            "gpu_mem_first_mib": max(mem[:tenth]) if s else None,
            "gpu_mem_last_mib": max(mem[-tenth:]) if s else None,
            "gpu_mem_max_mib": max(mem) if s else None,
        }


def extraction(root: Path, work: Path, tag: str, extract: dict[str, Any]) -> dict[str, Any]:
    from bench.__main__ import pipeline_extract

    with Utilisation() as util:
        stats = pipeline_extract(root, work, tag, extract)
    end = stats["end"]  # the warm part of the extraction, as for images/s: start-up and exit left out
    return stats | util.summary(end - stats.get("warm_seconds", stats["seconds"]), end)


def ceiling(work: Path, device: str, arch: str, image_size: int, batch: int, repeats: int) -> dict[str, Any]:
    from bench.__main__ import measured

    out = work / f"ceiling-{arch}.json"
    cmd = [sys.executable, "-m", "bench.ceiling", f"--arch={arch}", f"--image-size={image_size}", "--precision=auto"]
    cmd += [f"--device={device}"]
    with Utilisation() as util:
        measured([*cmd, f"--batch-size={batch}", f"--repeats={repeats}", f"--stats={out}"], work)
    return json.loads(out.read_text()) | util.summary()


AGREEMENT_RUNS = {  # tag: (device, precision, decode); every run stores float32
    "cpu-fp32-exact": ("cpu", "fp32", "exact"),
    "gpu-fp32-exact": (None, "fp32", "exact"),
    "gpu-fp32-device": (None, "fp32", "device"),
    "gpu-auto-exact": (None, "auto", "exact"),
}


def agreement(root: Path, work: Path, arch: str, device: str, image_size: int, batch: int) -> dict[str, Any]:
    """The same images, in the same batches, through the CPU and the device: the device's features in its
    precision against the CPU's in fp32; the device decode's against ``exact``'s, both in fp32 on the device; and
    as the bound for the latter, the device's own precision against fp32 there."""
    from bench.__main__ import pipeline_extract
    from pipeline.features import read_features

    rows = {}
    for tag, (on, precision, decode) in AGREEMENT_RUNS.items():
        if tag == "gpu-fp32-exact" and device == "cpu":  # the same run as cpu-fp32-exact
            rows[tag] = rows["cpu-fp32-exact"]
            continue
        opts = {"arch": arch, "device": on or device, "precision": precision, "decode": decode}
        opts |= {"storage_dtype": "float32"}
        pipeline_extract(root, work, f"agree-{tag}", opts | {"batch_size": batch, "image_size": image_size})
        splits = [work / f"pipeline-agree-{tag}" / "features" / f"{s}.h5" for s in ("train", "val", "test")]
        rows[tag] = np.concatenate([read_features(path).features["original"] for path in splits])
    return {
        "device_vs_cpu": compare(rows["gpu-auto-exact"], rows["cpu-fp32-exact"]),
        "decode_device_vs_exact": compare(rows["gpu-fp32-device"], rows["gpu-fp32-exact"]),
        "precision_auto_vs_fp32": compare(rows["gpu-auto-exact"], rows["gpu-fp32-exact"]),
    }


def compare(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Per-row relative L2 error of ``a`` against the reference ``b``, and cosine similarity."""
    err = np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), 1e-12)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return {"rows": len(a), "rel_err_median": float(np.median(err)), "rel_err_max": float(err.max()),
            "cosine_min": float(cos.min())}  # fmt: skip


def device_decode(photos: Path, device: str, n: int = 128) -> dict[str, Any]:
    """The pipeline's device decode (pipeline.decoder) alone on ``n`` photos, batches of 32, against Pillow's
    reduced decode (``fast``) on one core; and how far its 224 px network inputs are from ``exact``'s."""
    import torch

    from pipeline.backbones.base import Images
    from pipeline.backbones.vgg import preprocessing
    from pipeline.decoder import DeviceDecoder, RawImages, collate
    from pipeline.images import open_image, read_bytes

    prep, on = preprocessing("vgg16", 224), torch.device(device)
    decode = DeviceDecoder(prep, on)
    files = sorted(photos.rglob("*.jpg"))[:n]
    raw = RawImages(read_bytes, Images(files, open_image, prep))  # what the workers send, made here beforehand
    pieces = [collate([raw[i] for i in range(k, min(k + 32, len(files)))]) for k in range(0, len(files), 32)]
    decode([pieces[0][0]], pieces[0][2])  # start-up: the decoder's state, the resize kernels
    sync = torch.cuda.synchronize if on.type == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    crops = torch.cat([decode([piece], errors)[0].cpu() for piece, _, errors in pieces])
    device_s = time.perf_counter() - start
    start = time.perf_counter()
    few = min(16, len(files))
    for f in files[:few]:
        prep.to_uint8(open_image(f, prep.resize_size))
    fast_s = (time.perf_counter() - start) / few * len(files)
    exact = torch.stack([prep.to_uint8(open_image(f)) for f in files[:few]])
    diff = (crops[:few].int() - exact.int()).abs()
    return {"images": len(files), "decoder": decode.name, "device_images_per_s": len(files) / device_s,
            "pillow_fast_one_core_images_per_s": len(files) / fast_s,
            "input_mean_abs_diff": float(diff.float().mean()), "input_max_abs_diff": int(diff.max())}  # fmt: skip


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
            "archs": list(args.archs),
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
        for arch in args.archs:
            for decode in ("fast", "device"):
                opts = {"arch": arch, "image_size": args.image_size, "batch_size": args.batch_size}
                opts |= {"device": args.device, "decode": decode}
                runs[f"{arch}-{folder}-{decode}"] = extraction(folders[folder], work, f"{arch}-{folder}-{decode}", opts)
                save("extraction", runs)
    repeats = 2 if args.quick else 20
    bare = {arch: ceiling(work, args.device, arch, args.image_size, args.batch_size, repeats) for arch in args.archs}
    save("ceiling", bare)
    agree_root = work / "agree"
    if not agree_root.exists():
        agree_root.mkdir()
        for f in sorted(folders["small"].rglob("*.jpg"), key=lambda f: f.name)[: args.agree]:  # every class
            (agree_root / f.parent.name).mkdir(exist_ok=True)
            os.link(f, agree_root / f.parent.name / f.name)
    save("agreement", agreement(agree_root, work, args.archs[0], args.device, args.image_size, args.batch_size))
    save("device_decode", device_decode(folders["photos"], args.device, n=32 if args.quick else 128))
    return report


def markdown(report: dict[str, Any], tolerance: dict[str, float]) -> str:
    m, s, runs, ceil = report["machine"], report["settings"], report["extraction"], report["ceiling"]
    photo = "x".join(map(str, s.get("photo_size", (4032, 3024))))
    lines = [
        f"# Extraction on {m['gpu'] or 'the CPU'} ({m['cpus']} CPU cores, torch {m['torch']})",
        "",
        f"Each backbone's default layer at {s['image_size']} px, random weights, precision auto, batch "
        f"{s['batch_size']}; {s['small']} JPEGs of 500x375 and {s['photos']} photos of {photo}. Images/s after the "
        f"first batch; generating the files took {report['generate_s']:.0f} s. GPU memory is nvidia-smi's, the most "
        "used in the first and in the last tenth of the run; the peak is PyTorch's allocation.",
        "",
        "| run | decode workers | images/s | of the bare network | GPU util. mean / max % | GPU MiB first / last "
        "tenth | peak PyTorch MiB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in runs.items():
        arch = name.split("-")[0]
        util = f"{r['gpu_util_mean']:.0f} / {r['gpu_util_max']:.0f}" if r.get("gpu_util_mean") is not None else "-"
        mem = f"{r['gpu_mem_first_mib']:.0f} / {r['gpu_mem_last_mib']:.0f}" if r.get("gpu_mem_first_mib") else "-"
        peak = f"{r['gpu_peak_mib']:.0f}" if "gpu_peak_mib" in r else "-"
        share = r["images_per_s"] / ceil[arch]["images_per_s"]
        lines.append(
            f"| {name} | {r['decode_workers']} | {r['images_per_s']:.0f} | {share:.0%} | {util} | {mem} | {peak} |"
        )
    for arch, c in ceil.items():
        util = f"max {c['gpu_util_max']:.0f}" if c.get("gpu_util_max") is not None else "-"  # start-up included
        bare = f"| {arch} bare network, random uint8 batches | - | {c['images_per_s']:.0f} | 100% | {util} |"
        lines.append(bare + " - | - |")
    lines += ["", *targets(runs, ceil, s["archs"][0], s["archs"][-1]), ""]
    a = report["agreement"]
    gpu, dec, prec = a["device_vs_cpu"], a["decode_device_vs_exact"], a["precision_auto_vs_fp32"]
    ok = gpu["rel_err_max"] <= tolerance["rel_err_max"] and gpu["cosine_min"] >= tolerance["cosine_min"]
    closer = dec["rel_err_max"] < prec["rel_err_max"] and dec["rel_err_median"] < prec["rel_err_median"]
    lines += [
        f"Features of {gpu['rows']} images ({s['archs'][0]}), relative error median / max and the lowest cosine:",
        "",
        "| compared | median | max | cosine min |",
        "| --- | --- | --- | --- |",
        *(
            f"| {label} | {c['rel_err_median']:.2e} | {c['rel_err_max']:.2e} | {c['cosine_min']:.6f} |"
            for label, c in (
                (f"`{s['device']}` in precision auto against the CPU in fp32, decode exact", gpu),
                (f"decode device against exact, both fp32 on `{s['device']}`", dec),
                (f"precision auto against fp32, both decode exact on `{s['device']}`", prec),
            )
        ),
        "",
        f"The device against the CPU: tolerance (bf16) max relative error {tolerance['rel_err_max']}, cosine >= "
        f"{tolerance['cosine_min']}: **{'within' if ok else 'OUTSIDE'}**. The device decode is "
        f"**{'closer to exact than' if closer else 'NOT closer to exact than'}** the device's precision is to fp32.",
    ]
    g = report.get("device_decode", {})
    if "device_images_per_s" in g:
        lines += [
            "",
            f"The device decode alone ({g['decoder']}, batches of 32, resize and crop on the device) on {g['images']} "
            f"photos: {g['device_images_per_s']:.0f} images/s, against Pillow's reduced decode at "
            f"{g['pillow_fast_one_core_images_per_s']:.0f} images/s on one core. Its 224 px network inputs differ "
            f"from exact's by {g['input_mean_abs_diff']:.2f} grey levels on average, "
            f"{g['input_max_abs_diff']} at most.",
        ]
    return "\n".join(lines) + "\n"


def targets(runs: dict[str, Any], ceil: dict[str, Any], heavy: str, light: str) -> list[str]:
    """The targets of the device decode, each with its figure and whether it is met: the heavy network near its
    bare speed, 12 MP photos at 1,000 images/s, and the light network faster than with fast; memory flat."""
    rate = {name: r["images_per_s"] for name, r in runs.items()}
    share = rate[f"{heavy}-small-device"] / ceil[heavy]["images_per_s"]
    speedup = rate[f"{light}-small-device"] / rate[f"{light}-small-fast"]
    first, last = (runs[f"{heavy}-small-device"].get(k) for k in ("gpu_mem_first_mib", "gpu_mem_last_mib"))
    photos = rate[f"{heavy}-photos-device"]
    checks = [
        (f"{heavy}, 500x375 JPEGs, decode device: {share:.0%} of the bare network (target >= 85%)", share >= 0.85),
        (f"{heavy}, 12 MP photos, decode device: {photos:.0f} images/s (target >= 1,000)", photos >= 1000),
        (f"{light}, 500x375 JPEGs: decode device {speedup:.2f}x the images/s of fast (target > 1)", speedup > 1),
    ]
    if first is not None and last is not None:
        memory = f"GPU memory over the {heavy} device run: {first:.0f} MiB, then {last:.0f} MiB (flat: <= +256 MiB)"
        checks.append((memory, last <= first + 256))
    return [f"- {text}: **{'met' if ok else 'MISSED'}**" for text, ok in checks]


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
    parser.add_argument(
        "--archs", nargs="+", default=["vgg16", "resnet50"], help="a heavy network and a light one (one: both)"
    )
    parser.add_argument("--batch-size", type=int, default=256, help="extract.batch_size of every run")
    parser.add_argument("--image-size", type=int, default=224, help="extract.image_size of every run")
    parser.add_argument("--quick", action="store_true", help="a few images of each: a test of the script itself")
    parser.add_argument("--photo-size", type=int, nargs=2, default=PHOTO_SIZE, help="width and height of the photos")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="report directory")
    parser.add_argument("--workdir", type=Path, help="keep generated images and runs here")
    args = parser.parse_args()
    if len(args.archs) > 2:
        parser.error("--archs takes one or two networks")
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
