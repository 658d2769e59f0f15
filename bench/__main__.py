"""Benchmark the pipeline against the classic precompute loop, on the same machine and the same JPEG files.

    python -m bench                 # the full run (about 10 minutes on 2 CPU cores), report in bench/results/
    python -m bench --quick         # a smoke run with tiny sizes, report in a temporary directory
    python -m bench --render        # measure nothing: rewrite cpu.md/.json with the ceiling report's figures

Measures (1) extraction images/s of the pipeline and the classic loop at two image sizes (the pipeline against
its bare network is bench.backbones's: sustained and interleaved, bench/results/ceiling.md says why); (2) peak
resident memory of both at N and 10·N images; (3) one head epoch on cached features against one epoch that
recomputes the frozen backbone; (4) `dvc repro` after a `train.lr` edit against a full `dvc repro`. Each
extraction runs in its own process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench import photos
from bench.images import make_jpegs
from pipeline.config import defaults, parse_params
from pipeline.scan import check_backbone

REPO = Path(__file__).resolve().parents[1]
PROJECT_FILES = ("dvc.yaml", "params.yaml", "pipeline", ".dvc/config", ".dvc/.gitignore", ".dvcignore")


@dataclass(frozen=True)
class Sizes:
    throughput: dict[int, int]  # image size -> number of images
    memory_n: int  # N for the memory test (10·N is the large run)
    dvc_images: int
    epochs: int  # cached head epochs to time (median)
    photos: int  # 12 MP photos (and as many 500x375 JPEGs) for bench.photos
    photo_rounds: int


FULL = Sizes(throughput={64: 1000, 224: 240}, memory_n=250, dvc_images=10000, epochs=5, photos=160, photo_rounds=3)
QUICK = Sizes(  # 40: enough for a 4-class split
    throughput={64: 48, 224: 40}, memory_n=40, dvc_images=48, epochs=2, photos=40, photo_rounds=1
)


def measured(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """Run ``cmd``; return its wall seconds and peak resident memory in MiB (of that process alone)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"  # `python` in dvc.yaml is this one
    env = os.environ | {"PYTHONPATH": str(REPO), "DVC_NO_ANALYTICS": "1", "PATH": path}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{output.decode(errors='replace')[-3000:]}")
    return wall, usage.ru_maxrss / 1024


def subset(images: Path, n: int, work: Path) -> Path:
    """A folder with the first ``n`` generated images (hard links, same files)."""
    root = work / f"images-{n}"
    if not root.exists():
        files = sorted(images.rglob("*.jpg"), key=lambda f: f.name)[:n]  # by index: every class takes its share
        for f in files:
            (root / f.parent.name).mkdir(parents=True, exist_ok=True)
            os.link(f, root / f.parent.name / f.name)
    return root


def save_report(out: Path | None, quick: bool, name: str, text: str, report: dict[str, Any]) -> Path:
    """Print ``text`` and write it and ``report`` as ``name``.md and .json to ``out`` (default: bench/results, or
    a temporary directory for a --quick run); returns the Markdown file."""
    print(text)
    out = out or (Path(tempfile.mkdtemp()) if quick else REPO / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"report: {out / name}.md")
    return out / f"{name}.md"


def params_for(root: Path, extract: dict[str, Any], train: dict[str, Any] | None = None) -> dict[str, Any]:
    params = defaults()  # the pipeline's defaults, whatever this clone's params.yaml says
    params["data"].update(source="imagefolder", root=str(root))
    params["extract"].update({"weights": "random"} | extract)
    params["train"].update(train or {})
    return params


def with_rate(stats: dict[str, float]) -> dict[str, float]:
    """images/s after the first batch (start-up excluded, as for the bare network), when there was more than one."""
    images, seconds = stats.get("warm_images", stats["images"]), stats.get("warm_seconds", stats["seconds"])
    return stats | {"images_per_s": images / seconds}


_PREPARED: dict[tuple[Path, str], Path] = {}  # (root, data params) -> a run directory that scanned and prepared it


def pipeline_extract(root: Path, work: Path, tag: str, extract: dict[str, Any]) -> dict[str, float]:
    """scan, prepare and extract as the stages run them; throughput from the extraction loop, memory of that
    process. Every call extracts every image: its row store and its features are removed first. scan and
    prepare run once per folder and data parameters in a process; later runs copy their outputs."""
    run_dir = pipeline_run_dir(root, work, tag, extract)
    cmd = [sys.executable, "-m", "pipeline.extract", "--prepared", "prepared", "--out", "features"]
    cmd += ["--metrics", "m.json", "--stats", "s.json"]
    wall, peak = measured(cmd, run_dir)
    return with_rate(json.loads((run_dir / "s.json").read_text())) | {"wall_s": wall, "peak_rss_mib": peak}


def pipeline_run_dir(root: Path, work: Path, tag: str, extract: dict[str, Any]) -> Path:
    """A run directory, scanned and prepared, where ``python -m pipeline.extract`` extracts every image of ``root``
    with the ``extract`` parameters: no row store nor features left from an earlier run."""
    run_dir = work / f"pipeline-{tag}"
    run_dir.mkdir(parents=True, exist_ok=True)
    params = params_for(root, extract)
    (run_dir / "params.yaml").write_text(yaml.safe_dump(params))
    key = (root, json.dumps([params["seed"], params["data"]], sort_keys=True))
    done = _PREPARED.get(key)
    if done == run_dir and (done / "prepared").is_dir():
        pass  # this directory's own earlier run prepared it
    elif done and (done / "prepared").is_dir():
        shutil.copy2(done / "images.csv", run_dir / "images.csv")
        shutil.rmtree(run_dir / "prepared", ignore_errors=True)
        shutil.copytree(done / "prepared", run_dir / "prepared")
    else:
        # scan's check of the backbone's settings, here, where torch is imported anyway: the scan process then
        # finds them passed, and lists the folder without importing torch for that alone
        check_backbone(parse_params(params).extract, run_dir / ".images-backbone.json")
        measured([sys.executable, "-m", "pipeline.scan", "--out", "images.csv"], run_dir)
        prepare = ["--images", "images.csv", "--corrections", "corrections.csv"]  # none there: no corrections
        prepare += ["--out", "prepared", "--metrics", "prepare.json"]
        measured([sys.executable, "-m", "pipeline.prepare", *prepare], run_dir)
        _PREPARED[key] = run_dir
    for previous in (".feature-store", "features"):  # the recorded features seed an empty store: remove both
        shutil.rmtree(run_dir / previous, ignore_errors=True)
    return run_dir


def classic_extract(root: Path, work: Path, tag: str, **options: Any) -> dict[str, float]:
    args = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    stats_file = work / f"classic-{tag}.json"
    cmd = [sys.executable, "-m", "bench.classic", f"--root={root}", f"--out={work / f'classic-{tag}.npy'}"]
    wall, peak = measured([*cmd, f"--stats={stats_file}", *args], work)
    return with_rate(json.loads(stats_file.read_text())) | {"wall_s": wall, "peak_rss_mib": peak}


def head_epochs(root: Path, features_dir: Path, epochs: int) -> dict[str, float]:
    """One MLP-head epoch on the cached train features vs one that recomputes the frozen backbone (fp32)."""
    import torch
    import torchvision
    from torch import nn
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    from pipeline import features, heads
    from pipeline.backbones.vgg import cut, preprocessing

    train_set = features.read_features(features_dir / "train.h5")
    x, y = torch.from_numpy(train_set.features["original"]), torch.from_numpy(train_set.labels)
    n, classes = len(x), len(train_set.provenance["class_names"])
    image_size = int(train_set.provenance["image_size"])

    def fresh_head() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        head = heads.Classifier(heads.build_net("mlp", x.shape[1], classes, hidden=[512, 256], dropout=0.5),
                                *heads.standardization([(x, y)], x.shape[1], True))  # fmt: skip
        return head, torch.optim.SGD(head.parameters(), lr=0.01, momentum=0.8, weight_decay=1e-3)

    head, optimizer = fresh_head()
    criterion, g = nn.CrossEntropyLoss(), torch.Generator().manual_seed(0)
    cached = []
    for _ in range(epochs):
        start = time.perf_counter()
        heads.train_one_epoch(head, criterion, optimizer, x, y, batch_size=64, generator=g)
        cached.append(time.perf_counter() - start)

    prep = preprocessing("vgg16", image_size)
    transform = transforms.Compose(
        [transforms.Resize(prep.resize_size), transforms.CenterCrop(prep.crop_size), transforms.ToTensor(),
         transforms.Normalize(prep.mean, prep.std)]
    )  # fmt: skip
    images = Subset(datasets.ImageFolder(str(root), transform), range(n))  # as many images as cached rows
    loader = DataLoader(images, batch_size=64, shuffle=True, num_workers=2)
    torch.manual_seed(0)
    body = cut(torchvision.models.vgg16().eval(), "pool5").requires_grad_(False)
    head, optimizer = fresh_head()
    head.train()
    start = time.perf_counter()
    for batch, target in loader:
        with torch.no_grad():
            feats = body(batch).mean((2, 3))
        loss = criterion(head(feats), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    recompute = time.perf_counter() - start
    return {"rows": n, "cached_epoch_s": statistics.median(cached), "recompute_epoch_s": recompute}


def dvc_repro(root: Path, work: Path, image_size: int) -> dict[str, float]:
    """A full `dvc repro` in a fresh project copy, then `dvc repro` after editing train.lr."""
    project = work / "dvc-project"
    shutil.rmtree(project, ignore_errors=True)
    for name in PROJECT_FILES:
        src, dest = REPO / name, project / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, dest)
    params = params_for(root, {"image_size": image_size})
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    ident = ["-c", "user.email=bench@example.com", "-c", "user.name=bench"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "bench"]):
        subprocess.run(["git", *ident, *args], cwd=project, check=True, capture_output=True)
    dvc = [sys.executable, "-m", "dvc", "repro"]
    full, _ = measured(dvc, project)
    params["train"]["lr"] = params["train"]["lr"] * 2
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    selective, _ = measured(dvc, project)
    return {"images": sum(1 for _ in root.rglob("*.jpg")), "full_s": full, "after_lr_edit_s": selective}


def run(sizes: Sizes, work: Path) -> dict[str, Any]:
    import torch

    from pipeline.hardware import resolve_device, resolve_precision

    device = resolve_device("auto")
    precision = resolve_precision("auto", device)
    largest = max(max(sizes.throughput.values()), 10 * sizes.memory_n, sizes.dvc_images)
    print(f"generating {largest} JPEG files ...", flush=True)
    images = make_jpegs(work / "jpegs", largest)
    report: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
            "torch": str(torch.__version__),
            "precision": precision,
        },
        "throughput": {},
    }
    batch = 32
    for size, n in sizes.throughput.items():
        print(f"throughput at {size}px on {n} images ...", flush=True)
        root = subset(images, n, work)
        opts = {"image_size": size, "batch_size": batch}
        report["throughput"][size] = {
            "pipeline": pipeline_extract(root, work, f"{size}", opts),
            "pipeline_fp32": pipeline_extract(root, work, f"{size}-fp32", opts | {"precision": "fp32"}),
            "classic": classic_extract(root, work, f"{size}", image_size=size, batch_size=batch),
        }
    print(f"12 MP photos against 500x375 JPEGs, {sizes.photo_rounds} rounds ...", flush=True)
    report["photos"] = photos.run(work / "photos", sizes.photos, sizes.photo_rounds)
    print("peak memory at N and 10N ...", flush=True)
    # flattened pool3 maps: 16,384 values per image, where a dataset's features outgrow the process
    memory: dict[str, Any] = {"layer": "pool3", "pool": "flatten", "image_size": 64}
    for n in (sizes.memory_n, 10 * sizes.memory_n):
        root = subset(images, n, work)
        opts = {"image_size": 64, "layer": "pool3", "pool": "flatten", "batch_size": batch}
        memory[n] = {
            "pipeline": pipeline_extract(root, work, f"mem-{n}", opts),
            "classic": classic_extract(root, work, f"mem-{n}", image_size=64, layer="pool3", pool="flatten"),
        }
    report["memory"] = memory
    print("head epochs ...", flush=True)
    size64 = min(sizes.throughput)
    report["head_epoch"] = head_epochs(
        subset(images, sizes.throughput[size64], work), work / f"pipeline-{size64}" / "features", sizes.epochs
    )
    print("dvc repro ...", flush=True)
    report["dvc"] = dvc_repro(subset(images, sizes.dvc_images, work), work, 224)
    report["checks"] = checks(report, sizes)
    return report


def checks(report: dict[str, Any], sizes: Sizes) -> dict[str, dict[str, Any]]:
    """The targets, as measured: ratio, target and whether it is met."""
    at224 = report["throughput"][224]
    n, n10 = sizes.memory_n, 10 * sizes.memory_n
    mem = report["memory"]

    def check(value: float, target: float, higher_is_better: bool = True) -> dict[str, Any]:
        ok = value >= target if higher_is_better else value <= target
        return {"value": round(value, 3), "target": target, "met": ok}

    return {
        "extract_vs_classic_224": check(at224["pipeline"]["images_per_s"] / at224["classic"]["images_per_s"], 3.0),
        **ceiling_check(report),
        "pipeline_peak_10N_over_N": check(
            mem[n10]["pipeline"]["peak_rss_mib"] / mem[n]["pipeline"]["peak_rss_mib"], 1.15, False
        ),
        "classic_peak_10N_over_N": {
            "value": round(mem[n10]["classic"]["peak_rss_mib"] / mem[n]["classic"]["peak_rss_mib"], 3),
        },
        "recompute_over_cached_epoch": check(
            report["head_epoch"]["recompute_epoch_s"] / report["head_epoch"]["cached_epoch_s"], 200.0
        ),
        "lr_edit_over_full_repro": check(report["dvc"]["after_lr_edit_s"] / report["dvc"]["full_s"], 0.05, False),
    } | report["photos"]["checks"]


CEILING_REPORT = REPO / "bench" / "results" / "backbones.json"  # bench.backbones: the pipeline against its ceiling


def ceiling_cases() -> dict[str, dict[str, Any]]:
    """The VGG16 cases of bench.backbones's committed report (pipeline / ceiling per round), if it has them."""
    cases = json.loads(CEILING_REPORT.read_text()).get("cases", {}) if CEILING_REPORT.is_file() else {}
    return {c: r for c, r in cases.items() if c.startswith("vgg16@")}


def ceiling_check(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """extract_vs_ceiling_224, from the ceiling report: a burst of the bare network measured here was no ceiling.
    That report is of this project's CPU machine: a report of another device gets no such check."""
    case = ceiling_cases().get("vgg16@224")
    if not case or report["machine"]["device"] != "cpu":
        return {}
    return {"extract_vs_ceiling_224": {"value": round(case["ratio_median"], 3), "target": case["target"],
                                       "met": case["met"], "from": "backbones.json"}}  # fmt: skip


def ceiling_lines() -> list[str]:
    lines = []
    for r in ceiling_cases().values():
        lines.append(
            f"- VGG16 at {r['image_size']} px: pipeline {r['ratio_median']:.0%} of its ceiling (median of "
            f"{len(r['rounds'])} rounds, {r['ratio_min']:.0%}-{r['ratio_max']:.0%})"
        )
    head = ("Against the bare network (the ceiling), sustained and interleaved with the pipeline in "
            "[backbones.md](backbones.md) (`python -m bench.backbones`; why: [ceiling.md](ceiling.md)):")  # fmt: skip
    return ["", head, "", *lines] if lines else []


def render(path: Path) -> None:
    """Rewrite a report (.json and .md) from its JSON with the ceiling report's figures, measuring nothing: the
    other sections keep the figures of their run. The bare-network bursts of older runs are dropped."""
    report = json.loads(path.read_text())
    for key in ("throughput", "memory"):
        report[key] = {int(k) if k.isdigit() else k: v for k, v in report[key].items()}
    for t in report["throughput"].values():
        for old in ("ceiling", "ceiling_fp32"):
            t.pop(old, None)
    checks = list(report["checks"].items())  # extract_vs_ceiling_224 in its place, second
    rest = [(k, v) for k, v in checks if k != "extract_vs_ceiling_224"]
    report["checks"] = dict(rest[:1]) | ceiling_check(report) | dict(rest[1:])
    report["rendered"] = {"date": time.strftime("%Y-%m-%d"), "remeasured": "extract_vs_ceiling (backbones.json)"}
    path.write_text(json.dumps(report, indent=1) + "\n")
    path.with_suffix(".md").write_text(markdown(report, FULL))  # the full run's sizes: what --render is for


def markdown(report: dict[str, Any], sizes: Sizes) -> str:
    m = report["machine"]
    lines = [
        "# Benchmark report",
        "",
        f"Machine: {m['processor']}, {m['cpus']} CPUs ({m['torch_threads']} torch threads), {m['device']}, "
        f"torch {m['torch']}, {m['platform']}. Pipeline precision (auto): **{m['precision']}**.",
        *_rendered_lines(report),
        "",
        "## Extraction throughput (images/s after the first batch; 500x375 JPEG files, VGG16 pool5 + avg, batch 32)",
        "",
        "| size | images | pipeline | pipeline fp32 | classic | vs classic |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for size, t in report["throughput"].items():
        p, c = t["pipeline"]["images_per_s"], t["classic"]["images_per_s"]
        lines.append(
            f"| {size} | {sizes.throughput[int(size)]} | {p:.1f} | {t['pipeline_fp32']['images_per_s']:.1f} | {c:.1f} "
            f"| {p / c:.2f}x |"
        )
    lines += ceiling_lines() if m["device"] == "cpu" else []
    if "photos" in report:  # reports of older runs, re-rendered, have none
        lines += ["", *photos.markdown(report["photos"])]
    mem = report["memory"]
    n, n10 = sizes.memory_n, 10 * sizes.memory_n
    lines += [
        "",
        f"## Peak resident memory (MiB; {mem['layer']} + {mem['pool']} at {mem['image_size']}px, 16,384 values/image)",
        "",
        f"| implementation | N = {n} | 10N = {n10} | ratio |",
        "| --- | --- | --- | --- |",
    ]
    for impl in ("pipeline", "classic"):
        a, b = mem[n][impl]["peak_rss_mib"], mem[n10][impl]["peak_rss_mib"]
        lines.append(f"| {impl} | {a:.0f} | {b:.0f} | {b / a:.2f}x |")
    h, d = report["head_epoch"], report["dvc"]
    lines += [
        "",
        f"## Head training: one epoch over {h['rows']} training rows (MLP head, 64px features)",
        "",
        f"- cached features: {h['cached_epoch_s'] * 1000:.1f} ms (median of {sizes.epochs})",
        f"- recomputing the frozen VGG16 (fp32) every epoch: {h['recompute_epoch_s']:.2f} s",
        f"- ratio: {h['recompute_epoch_s'] / h['cached_epoch_s']:.0f}x",
        "",
        f"## dvc repro ({d['images']} JPEGs at 224px, random weights)",
        "",
        f"- full run: {d['full_s']:.1f} s; after editing train.lr: {d['after_lr_edit_s']:.1f} s "
        f"({d['after_lr_edit_s'] / d['full_s']:.1%})",
        "",
        "## Targets",
        "",
        "| check | measured | target | met |",
        "| --- | --- | --- | --- |",
    ]
    for name, c in report["checks"].items():
        if "target" in c:
            lines.append(f"| {name} | {c['value']} | {c['target']} | {'yes' if c['met'] else '**no**'} |")
        else:
            lines.append(f"| {name} | {c['value']} | (grows) | |")
    return "\n".join(lines) + "\n"


def _rendered_lines(report: dict[str, Any]) -> list[str]:
    r = report.get("rendered")
    if not r:
        return []
    return ["", f"Re-rendered on {r['date']} (`python -m bench --render`): the pipeline against its ceiling from "
            "[backbones.md](backbones.md), re-measured there; every other figure from the last full run."]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the benchmark itself")
    parser.add_argument("--render", action="store_true", help="measure nothing: rewrite the report from its JSON")
    parser.add_argument(
        "--out", type=Path, help="report directory (default: bench/results, or a temp dir with --quick)"
    )
    parser.add_argument("--name", default="cpu", help="report file name stem, e.g. cpu or h100")
    parser.add_argument("--workdir", type=Path, help="keep generated images and runs here")
    args = parser.parse_args()
    if args.render:
        render((args.out or REPO / "bench" / "results") / f"{args.name}.json")
        return
    sizes = QUICK if args.quick else FULL
    out = args.out or (Path(tempfile.mkdtemp(prefix="bench-")) if args.quick else REPO / "bench" / "results")
    with tempfile.TemporaryDirectory(prefix="bench-work-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        report = run(sizes, work)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report, sizes)
    (out / f"{args.name}.md").write_text(text)
    print(text)
    print(f"report written to {out / args.name}.md and .json")


if __name__ == "__main__":
    main()
