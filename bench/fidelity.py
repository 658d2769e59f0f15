"""How much ``decode: fast`` and ``decode: device`` change the features of camera photos, against ``decode:
exact`` on the same files; with bf16 against fp32 (both exact) as the yardstick. Photos of an even size
(4032x3024) and of an odd one (4031x3023, where libjpeg's reduced sides are rounded up), the same scenes.

    python -m bench.fidelity                # 240 photos of each size at 224 px, VGG16 pool5, fp32
    python -m bench.fidelity --quick

Every run is the pipeline's own extraction, stored as float32; the decode runs are in fp32, so that the only
difference from exact is the decode. ``device`` decodes on ``--device`` (the CPU by default: libjpeg-turbo there,
with torch's resize; nvJPEG on CUDA). Reported for each against exact: each row's relative L2 error and cosine
similarity, and the mean and largest difference of the network's input (the uint8 crop) on a sample of photos;
how many val/test rows get another nearest training row (cosine); and, for a logistic-regression head, how many
predictions change, both for one head fed either set of features and for a head trained on each set.

The network inputs of smaller JPEGs, odd-sized and one pixel larger, are compared at 64 px too (where 500x333
photos are reduced: ODD_SMALL).

The photos are bench.images.make_photos': two scenes, mirrored and tinted at random, labelled by index modulo
four, so that pairs of classes show the same scene: a head is unsure on many rows, which makes its
predictions as sensitive to small input changes as they get.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.gpu import compare
from bench.images import make_photos

RUNS = {  # tag: (decode, precision)
    "exact": ("exact", "fp32"),
    "fast": ("fast", "fp32"),
    "device": ("device", "fp32"),
    "bf16": ("exact", "bf16"),
}
INPUT_SAMPLE = 16  # photos whose network inputs are compared pixel by pixel
SIZES = {"even": (4032, 3024), "odd": (4031, 3023)}  # 12 MP; the odd set takes the runs of ODD_RUNS
ODD_RUNS = ("exact", "fast")  # device and bf16 decode at full size: the odd size changes nothing there
ODD_SMALL = [((500, 333), (500, 334)), ((333, 500), (334, 500)), ((655, 495), (656, 496))]  # (odd, even), at 64 px


def load(out: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from pipeline.features import read_features

    sets = {s: read_features(out / f"{s}.h5") for s in ("train", "val", "test")}
    return {s: (f.features["original"], f.labels) for s, f in sets.items()}


def head_predictions(train: tuple[np.ndarray, np.ndarray], *tests: np.ndarray) -> list[np.ndarray]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    head = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)).fit(*train)
    return [head.predict(x) for x in tests]


def nearest(train: np.ndarray, queries: np.ndarray) -> np.ndarray:
    a = train / np.linalg.norm(train, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return (q @ a.T).argmax(1)


def inputs(photos: Path, image_size: int, device: str, decodes=("fast", "device")) -> dict[str, dict[str, float]]:
    """The uint8 network inputs of INPUT_SAMPLE photos from each decode against exact's: mean and max difference."""
    import torch

    from pipeline.backbones.base import Images
    from pipeline.backbones.vgg import preprocessing
    from pipeline.decoder import DeviceDecoder, RawImages, collate
    from pipeline.images import open_image, read_bytes

    prep = preprocessing("vgg16", image_size)
    files = sorted(photos.rglob("*.jpg"))[:INPUT_SAMPLE]
    exact = torch.stack([prep.to_uint8(open_image(f)) for f in files]).int()
    made = {"fast": lambda: torch.stack([prep.to_uint8(open_image(f, prep.resize_size)) for f in files]).int()}
    if "device" in decodes:
        raw = RawImages(read_bytes, Images(files, open_image, prep))
        piece, _, errors = collate([raw[i] for i in range(len(files))])
        made["device"] = lambda: DeviceDecoder(prep, torch.device(device))([piece], errors)[0].cpu().int()
    return {
        tag: {"mean_abs": float((x - exact).abs().float().mean()), "max_abs": int((x - exact).abs().max())}
        for tag, x in ((t, made[t]()) for t in decodes)
    }


def run(work: Path, n: int, image_size: int = 224, device: str = "cpu") -> dict[str, Any]:
    sets = {name: measure(work / name, n, size, image_size, device, runs=RUNS if name == "even" else ODD_RUNS)
            for name, size in SIZES.items()}  # fmt: skip
    return {"photos": n, "image_size": image_size, "device": device, "sets": sets, "small": small_inputs(work)}


def measure(work: Path, n: int, size: tuple[int, int], image_size: int, device: str, *, runs) -> dict[str, Any]:
    """Each run of ``runs`` against exact on ``n`` photos of ``size``."""
    from bench.__main__ import pipeline_extract

    photos = make_photos(work / "photos", n, size=size)
    feats = {}
    for tag in runs:
        decode, precision = RUNS[tag]
        opts = {"image_size": image_size, "decode": decode, "precision": precision, "storage_dtype": "float32"}
        pipeline_extract(photos, work, tag, opts | {"device": "cpu" if tag != "device" else device})
        feats[tag] = load(work / f"pipeline-{tag}" / "features")
    ex = feats["exact"]
    queries = {t: np.concatenate([feats[t][s][0] for s in ("val", "test")]) for t in feats}
    truth = np.concatenate([ex[s][1] for s in ("val", "test")])
    nn_exact = nearest(ex["train"][0], queries["exact"])
    own_exact = head_predictions(ex["train"], queries["exact"])[0]
    pixels = inputs(photos, image_size, device)
    against = {}
    for tag in (t for t in runs if t != "exact"):
        f = feats[tag]
        same_head = head_predictions(ex["train"], queries["exact"], queries[tag])
        own = head_predictions(f["train"], queries[tag])[0]
        against[tag] = {
            "rows": compare(*(np.concatenate([d[s][0] for s in ("train", "val", "test")]) for d in (f, ex))),
            "input": pixels.get(tag),
            "nearest_changed": int((nearest(f["train"][0], queries[tag]) != nn_exact).sum()),
            "exact_head_changed": int((same_head[0] != same_head[1]).sum()),
            "own_heads_changed": int((own_exact != own).sum()),
            "accuracy": float((own == truth).mean()),
        }
    return {"size": list(size), "queries": len(truth), "accuracy_exact": float((own_exact == truth).mean()),
            "against_exact": against}  # fmt: skip


def small_inputs(work: Path, image_size: int = 64) -> list[dict[str, Any]]:
    """decode fast's network input against exact's, mean grey levels, for odd-sized JPEGs and even ones a pixel
    larger (the same scenes), at ``image_size``."""
    out = []
    for odd, even in ODD_SMALL:
        error = {}
        for name, size in (("odd", odd), ("even", even)):
            photos = make_photos(work / f"small-{size[0]}x{size[1]}", INPUT_SAMPLE, size=size)
            error[name] = inputs(photos, image_size, "cpu", decodes=("fast",))["fast"]
        out.append({"odd_size": list(odd), "even_size": list(even), "image_size": image_size} | error)
    return out


def markdown(r: dict[str, Any]) -> str:
    label = {"fast": "decode fast", "device": f"decode device (on {r['device']})", "bf16": "bf16 (decode exact)"}
    even = r["sets"]["even"]
    lines = [
        f"# decode fast and device against exact ({r['photos']} photos of each size, VGG16 pool5 at "
        f"{r['image_size']} px, fp32, random weights); bf16 against fp32 as the yardstick",
        "",
        f"Per row of features: relative L2 error and cosine against exact in fp32. Network input: the uint8 crop of "
        f"{INPUT_SAMPLE} photos against exact's, grey levels. Of the {even['queries']} val/test rows: nearest "
        "training row changed; predictions changed by one logistic-regression head trained on exact features, and "
        "by a head trained on each (accuracy with exact: "
        + ", ".join(f"{s['accuracy_exact']:.3f} {'x'.join(map(str, s['size']))}" for s in r["sets"].values())
        + ").",
        "",
        "| photos | against exact | rel. error median | max | cosine min | input mean / max | nearest changed "
        "| one head | own heads (accuracy) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in r["sets"].values():
        for tag, a in s["against_exact"].items():
            e, px = a["rows"], a["input"]
            pixel = f"{px['mean_abs']:.2f} / {px['max_abs']}" if px else "0 / 0"
            size = "x".join(map(str, s["size"]))
            lines.append(
                f"| {size} | {label[tag]} | {e['rel_err_median']:.2e} | {e['rel_err_max']:.2e} "
                f"| {e['cosine_min']:.6f} | {pixel} | {a['nearest_changed']} | {a['exact_head_changed']} "
                f"| {a['own_heads_changed']} ({a['accuracy']:.3f}) |"
            )
    odd, fast = r["sets"]["odd"]["against_exact"]["fast"], even["against_exact"]["fast"]
    ratio = odd["rows"]["rel_err_median"] / fast["rows"]["rel_err_median"]
    lines += ["", f"decode fast, odd against even size: {ratio:.2f}x the median relative error (at most 1.5x).", "",
              f"## Network input of smaller JPEGs at {r['small'][0]['image_size']} px (decode fast against exact, "
              f"{INPUT_SAMPLE} photos each, grey levels)", "",
              "| odd size | mean / max | even size | mean / max | odd / even |",
              "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for row in r["small"]:
        o, e = row["odd"], row["even"]
        lines.append(
            f"| {'x'.join(map(str, row['odd_size']))} | {o['mean_abs']:.2f} / {o['max_abs']} "
            f"| {'x'.join(map(str, row['even_size']))} | {e['mean_abs']:.2f} / {e['max_abs']} "
            f"| {o['mean_abs'] / e['mean_abs']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    from bench.__main__ import save_report

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=240, help="photos of each size")
    parser.add_argument("--quick", action="store_true", help="40 photos at 64 px, report in a temp dir")
    parser.add_argument("--device", default="cpu", help="where decode: device runs (cpu | cuda)")
    parser.add_argument("--out", type=Path, help="report directory (default: bench/results)")
    args = parser.parse_args()
    n, size = (40, 64) if args.quick else (args.photos, 224)
    with tempfile.TemporaryDirectory(prefix="bench-fidelity-") as tmp:
        report = run(Path(tmp), n, size, args.device)
    text = markdown(report)
    save_report(args.out, args.quick, "fidelity-cpu", text, report)


if __name__ == "__main__":
    main()
