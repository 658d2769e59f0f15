"""Final feature files from the shards of a multi-process extraction: a merge copy against an HDF5 virtual dataset.

    python -m bench.shards                        # ImageNet-1k sized pool5+avg and a 50,000-row flatten run
    python -m bench.shards --quick                # a smoke run with tiny sizes
    python -m bench.shards --rows 1281167 --dim 512 --shards 8 --dir /scratch

Each process of a run leaves its rows in its own segment of the row store (see pipeline/store.py). Two ways
to present them as one ``features`` dataset in manifest order:

- merge: rank 0 copies every shard into one HDF5 file, as ``extract`` does (the pipeline's own code);
- vds: every rank converts its shard into an HDF5 file (the same bytes written, in parallel across ranks),
  then one small file maps them into a virtual dataset.

For each: the time to build, a full sequential read and a read in random block order (how ``train`` streams a
split larger than memory), the files DVC would track, and whether the bytes depend on the number of shards.
Reads go through the page cache when the files fit in memory; the report says so.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline import features, provenance
from pipeline.extraction import WRITE_ROWS
from pipeline.store import RowStore

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
CASES = [  # (name, rows, dim): ImageNet-1k train at 512-d, and 50,000 rows at 25,088-d (ImageNet's val size)
    ("pool5-avg", 1_281_167, 512),
    ("pool5-flatten", 50_000, 25_088),
]
QUICK = [("pool5-avg", 20_000, 512), ("pool5-flatten", 500, 25_088)]
LAYOUT = {"dtype": "float16"}


class Shards:
    """A row store of ``count`` segments, one per process, and the content keys of its rows in manifest order;
    segment k holds rows [bounds[k][0], bounds[k][1])."""

    def __init__(self, root: Path, rows: int, dim: int, count: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.keys = [i.to_bytes(16, "big") for i in range(rows)]
        self.bounds = [(k * rows // count, (k + 1) * rows // count) for k in range(count)]
        for k, (a, b) in enumerate(self.bounds):
            store = RowStore(root, segment=k, dim=dim, **LAYOUT)
            for s in range(a, b, 8192):
                e = min(b, s + 8192)
                store.append(self.keys[s:e], {"original": rng.standard_normal((e - s, dim), dtype=np.float32)})
            store.close()
        self.store = RowStore(root, segment=0, dim=dim, quiet=True, **LAYOUT)

    def read(self, a: int, b: int) -> np.ndarray:
        return self.store.read("original", self.keys[a:b])


def _writer(path: Path, n: int, dim: int) -> features.FeatureWriter:
    prov = {key: 0 for key in provenance.PROVENANCE_KEYS} | {"schema": provenance.SCHEMA, "views": ["original"]}
    return features.FeatureWriter(path, n=n, dim=dim, dtype="float16", views=["original"], provenance=prov)


def merge(shards: Shards, out: Path, rows: int, dim: int, offset: int = 0) -> None:
    """The pipeline's merge: one pass over rows [offset, offset + rows) in order, through the one FeatureWriter."""
    labels = np.zeros(WRITE_ROWS, dtype=np.int64)
    with _writer(out, rows, dim) as w:
        for a in range(0, rows, WRITE_ROWS):
            b = min(rows, a + WRITE_ROWS)
            w.write(a, {"original": shards.read(offset + a, offset + b)}, labels[: b - a], [""] * (b - a))


def vds(shards: Shards, out_dir: Path, dim: int) -> tuple[float, float]:
    """Each shard to its own HDF5 file (one per rank: in a real run these run in parallel), then the virtual
    dataset over them. Returns (seconds of the slowest shard conversion, seconds of the virtual file)."""
    slowest = 0.0
    layout = h5py.VirtualLayout(shape=(shards.bounds[-1][1], dim), dtype="float16")
    for k, (a, b) in enumerate(shards.bounds):
        start = time.perf_counter()
        merge(shards, out_dir / f"train.{k}.h5", b - a, dim, offset=a)
        slowest = max(slowest, time.perf_counter() - start)
        layout[a:b] = h5py.VirtualSource(f"train.{k}.h5", "features", shape=(b - a, dim))
    start = time.perf_counter()
    with h5py.File(out_dir / "train.h5", "w", libver="latest") as f:
        f.create_virtual_dataset("features", layout)
    return slowest, time.perf_counter() - start


def read_times(path: Path, block_rows: int, seed: int = 0) -> dict[str, float]:
    """Seconds for a full pass in order and in a random block order (a new file handle, as train opens it)."""
    out = {}
    with h5py.File(path, "r") as f:
        n = f["features"].shape[0]
        blocks = list(range(0, n, block_rows))
        for name, order in (("sequential", blocks), ("random_blocks", np.random.default_rng(seed).permutation(blocks))):
            start = time.perf_counter()
            for a in order:
                f["features"][a : a + block_rows]  # read and dropped
            out[name] = time.perf_counter() - start
    return out


def digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def case(work: Path, name: str, rows: int, dim: int, shard_counts: list[int]) -> dict[str, Any]:
    gb = rows * dim * 2 / 1e9
    result: dict[str, Any] = {"case": name, "rows": rows, "dim": dim, "gigabytes": gb, "by_shards": {}}
    chunk = features.chunk_rows(dim, 2, rows)
    block_rows = max(1, (64 << 20) // (dim * 4) // chunk) * chunk  # as train's BlockReader: ~64 MiB of float32
    for count in shard_counts:
        root = work / f"{name}-{count}"
        shards = Shards(root / "store", rows, dim, count)
        merged_dir, vds_dir = root / "merged", root / "vds"
        merged_dir.mkdir()
        vds_dir.mkdir()
        start = time.perf_counter()
        merge(shards, merged_dir / "train.h5", rows, dim)
        merge_s = time.perf_counter() - start
        shard_s, vds_s = vds(shards, vds_dir, dim)
        with h5py.File(merged_dir / "train.h5") as a, h5py.File(vds_dir / "train.h5") as b:
            assert np.array_equal(a["features"][-5:], b["features"][-5:])  # the same rows either way
        moved = vds_dir.rename(root / "vds-moved")  # a checkout elsewhere: the sources are found beside the file
        with h5py.File(moved / "train.h5") as b:
            readable_after_move = bool(np.array_equal(b["features"][:5], shards.read(0, 5)))
        result["by_shards"][count] = {
            "vds_readable_after_move": readable_after_move,
            "merge_s": merge_s,
            "merge_gb_per_s": gb / merge_s,
            "vds_shard_files_s": shard_s,
            "vds_file_s": vds_s,
            "merged_read": read_times(merged_dir / "train.h5", block_rows),
            "vds_read": read_times(moved / "train.h5", block_rows),
            "merged_files": 1,
            "vds_files": count + 1,
            "merged_digest": digest([merged_dir / "train.h5"]),
            "vds_digest": digest(list(moved.glob("*.h5"))),
        }
        shutil.rmtree(root)
    return result


def report(results: list[dict[str, Any]], fits_in_memory: bool) -> str:
    lines = [
        "# Final files from shards: merge copy vs HDF5 virtual dataset",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; reads "
        + ("through a warm page cache (the files fit in memory)." if fits_in_memory else "partly from disk."),
        "",
        "| case | GB | shards | merge s (GB/s) | vds: slowest shard file s + virtual file s "
        "| read in order merged / vds s | random blocks merged / vds s | files merged / vds "
        "| bytes independent of shards: merged / vds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        digests_m = {v["merged_digest"] for v in r["by_shards"].values()}
        digests_v = {v["vds_digest"] for v in r["by_shards"].values()}
        for count, v in r["by_shards"].items():
            lines.append(
                f"| {r['case']} ({r['rows']:,}×{r['dim']:,}) | {r['gigabytes']:.2f} | {count} "
                f"| {v['merge_s']:.2f} ({v['merge_gb_per_s']:.2f}) "
                f"| {v['vds_shard_files_s']:.2f} + {v['vds_file_s']:.3f} "
                f"| {v['merged_read']['sequential']:.2f} / {v['vds_read']['sequential']:.2f} "
                f"| {v['merged_read']['random_blocks']:.2f} / {v['vds_read']['random_blocks']:.2f} "
                f"| {v['merged_files']} / {v['vds_files']} "
                f"| {'yes' if len(digests_m) == 1 else 'no'} / {'yes' if len(digests_v) == 1 else 'no'} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, report in a temporary directory")
    parser.add_argument("--rows", type=int, help="one case of this many rows (with --dim)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--shards", type=int, nargs="+", default=[2, 8], help="process counts to compare")
    parser.add_argument("--dir", type=Path, help="where to write the files (default: a temporary directory)")
    args = parser.parse_args()
    cases = [("custom", args.rows, args.dim)] if args.rows else QUICK if args.quick else CASES
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        results = [case(Path(tmp), name, rows, dim, args.shards) for name, rows, dim in cases]
    largest = max(r["gigabytes"] for r in results) * 2  # merged + shards
    total_memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    text = report(results, largest < total_memory / 2)
    print(text)
    out = Path(tempfile.mkdtemp()) if args.quick or args.rows else RESULTS
    (out / "shards.md").write_text(text)
    (out / "shards.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"report: {out / 'shards.md'}")


if __name__ == "__main__":
    main()
