"""How much ``decode: fast`` changes the features of camera photos, against ``decode: exact`` on the same files.

    python -m bench.fidelity                # 240 photos of 12 MP at 224 px, VGG16 pool5, fp32
    python -m bench.fidelity --quick

Both runs are the pipeline's own extraction, in fp32 and stored as float32, so that the only difference is the
decode. Reported: each row's relative L2 error and cosine similarity; how many val/test rows get another nearest
training row (cosine); and, for a logistic-regression head, how many predictions change, both for one head fed
either set of features and for a head trained on each set (the whole pipeline fast or exact).

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


def run(work: Path, n: int, image_size: int = 224) -> dict[str, Any]:
    from bench.__main__ import pipeline_extract

    photos = make_photos(work / "photos", n)
    feats = {}
    for decode in ("exact", "fast"):
        opts = {"image_size": image_size, "decode": decode, "precision": "fp32", "storage_dtype": "float32"}
        pipeline_extract(photos, work, decode, opts)
        feats[decode] = load(work / f"pipeline-{decode}" / "features")
    ex, fa = feats["exact"], feats["fast"]
    every = compare(*(np.concatenate([d[s][0] for s in ("train", "val", "test")]) for d in (fa, ex)))
    queries = {d: np.concatenate([feats[d][s][0] for s in ("val", "test")]) for d in feats}
    truth = np.concatenate([ex[s][1] for s in ("val", "test")])
    nn = {d: nearest(feats[d]["train"][0], queries[d]) for d in feats}
    same_head = head_predictions(ex["train"], queries["exact"], queries["fast"])
    own_head = [head_predictions(feats[d]["train"], queries[d])[0] for d in ("exact", "fast")]
    return {
        "photos": n,
        "image_size": image_size,
        "rows": every,
        "queries": len(truth),
        "nearest_changed": int((nn["exact"] != nn["fast"]).sum()),
        "exact_head_changed": int((same_head[0] != same_head[1]).sum()),
        "own_heads_changed": int((own_head[0] != own_head[1]).sum()),
        "accuracy": {"exact": float((own_head[0] == truth).mean()), "fast": float((own_head[1] == truth).mean())},
    }


def markdown(r: dict[str, Any]) -> str:
    e = r["rows"]
    return "\n".join(
        [
            f"# decode: fast against exact ({r['photos']} photos of 4032x3024, VGG16 pool5 at {r['image_size']} px, "
            "fp32, random weights)",
            "",
            f"- pool5 features, every row: relative L2 error median {e['rel_err_median']:.2e}, max "
            f"{e['rel_err_max']:.2e}; cosine similarity min {e['cosine_min']:.6f}",
            f"- nearest training row (cosine) of the {r['queries']} val/test rows: {r['nearest_changed']} changed",
            f"- one logistic-regression head (trained on exact features), fed exact or fast features: "
            f"{r['exact_head_changed']} of {r['queries']} predictions changed",
            f"- a head trained on each (the whole pipeline exact or fast): {r['own_heads_changed']} of "
            f"{r['queries']} predictions changed; accuracy {r['accuracy']['exact']:.3f} exact, "
            f"{r['accuracy']['fast']:.3f} fast",
            "",
        ]
    )


def main() -> None:
    from bench.__main__ import save_report

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=240)
    parser.add_argument("--quick", action="store_true", help="40 photos at 64 px, report in a temp dir")
    parser.add_argument("--out", type=Path, help="report directory (default: bench/results)")
    args = parser.parse_args()
    n, size = (40, 64) if args.quick else (args.photos, 224)
    with tempfile.TemporaryDirectory(prefix="bench-fidelity-") as tmp:
        report = run(Path(tmp), n, size)
    text = markdown(report)
    save_report(args.out, args.quick, "fidelity-cpu", text, report)


if __name__ == "__main__":
    main()
