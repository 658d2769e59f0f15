from __future__ import annotations

import ast
import hashlib
import inspect
import json
import logging
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torchvision

from bench.images import make_jpegs
from pipeline import backbones, batches, decoder, extraction, features, images, provenance, sources
from pipeline.backbones import base, timm_models, vgg, weights, zoo
from pipeline.config import parse_params
from pipeline.distributed import World
from pipeline.errors import PipelineError
from pipeline.extraction import extract
from pipeline.store import STORE_DIR
from tests.conftest import make_cifar

FAST = {"arch": "vgg11", "weights": "random", "image_size": 32, "batch_size": 8, "num_workers": 0, "precision": "fp32"}


def prepare(tmp_path: Path, data: dict, extract_overrides: dict | None = None):
    params = parse_params({"data": data, "extract": FAST | (extract_overrides or {})})
    items, classes = sources.discover(params.data, params.seed)
    sources.write_manifest(tmp_path / "prepared", items, classes)
    return params, items, classes


@pytest.mark.parametrize("source", ["imagefolder", "cifar10", "digits"])
def test_every_source_extracts_rows_aligned_with_the_manifest(tmp_path: Path, imagefolder: Path, source: str):
    root = {"imagefolder": imagefolder, "cifar10": make_cifar(tmp_path / "cifar"), "digits": tmp_path}[source]
    data = {"source": source, "root": str(root), "val_fraction": 0.2, "per_class_limit": 10}  # 827 digits, not 1797
    params, items, classes = prepare(tmp_path, data)
    extract(params, tmp_path / "prepared", tmp_path / "features")
    for split in sources.SPLITS:
        rows = [it for it in items if it.split == split]
        with h5py.File(tmp_path / "features" / f"{split}.h5") as f:
            assert [s.decode() for s in f["ids"][:]] == [it.id for it in rows]
            assert f["labels"][:].tolist() == [it.label for it in rows]
            assert f["features"].shape == (len(rows), 512) and f["features"].dtype == np.float16
            assert np.isfinite(f["features"][:]).all()
        prov = features.read_provenance(tmp_path / "features" / f"{split}.h5")
        assert prov["split"] == split and prov["class_names"] == classes
        assert prov["arch"] == "vgg11" and prov["weights"] == "random" and prov["seed"] == 0
        assert prov["torch_version"] == str(torch.__version__)


def test_hflip_view_is_cached_for_train_only_and_equals_flipped_images(tmp_path: Path, imagefolder: Path):
    data = {"source": "imagefolder", "root": str(imagefolder), "val_fraction": 0.2}
    params, items, _ = prepare(tmp_path, data, {"views": ["original", "hflip"], "storage_dtype": "float32"})
    extract(params, tmp_path / "prepared", tmp_path / "features")
    with h5py.File(tmp_path / "features" / "train.h5") as f:
        hflip, first_id = f["features_hflip"][:], f["ids"][0].decode()
    with h5py.File(tmp_path / "features" / "test.h5") as f:
        assert "features_hflip" not in f
    model, prep, _ = backbones.build_extractor(params.extract, params.seed)
    image = prep.to_uint8(sources.ImageReader(params.data)(first_id))
    with torch.inference_mode():
        want = model(image.flip(-1)[None])[0].numpy()
    np.testing.assert_allclose(hflip[0], want, rtol=1e-4, atol=1e-5)


def test_two_runs_give_byte_identical_files(tmp_path: Path, imagefolder: Path):
    params, _, _ = prepare(tmp_path, {"source": "imagefolder", "root": str(imagefolder)}, {"num_workers": 2})
    digests = []
    for run in ("a", "b"):
        extract(params, tmp_path / "prepared", tmp_path / run)
        digests.append([hashlib.sha256((tmp_path / run / f"{s}.h5").read_bytes()).hexdigest() for s in sources.SPLITS])
    assert digests[0] == digests[1]


def read_split(path: Path) -> tuple[np.ndarray, dict]:
    with h5py.File(path) as f:
        return f["features"][:], {"compression": f["features"].compression}


def extract_each(tmp_path: Path, data: dict, key: str, values: tuple[str, ...]) -> dict[str, np.ndarray]:
    """One extraction per value of ``extract.<key>`` (float32 storage): each run's train features, once its
    files are checked to record that value."""
    runs = {}
    for value in values:
        params, _, _ = prepare(tmp_path, data, {key: value, "storage_dtype": "float32"})
        extract(params, tmp_path / "prepared", tmp_path / value)
        runs[value], _ = read_split(tmp_path / value / "train.h5")
        assert features.read_provenance(tmp_path / value / "test.h5")[key] == value
    return runs


def test_precision_is_recorded_and_bf16_stays_close_to_fp32(tmp_path: Path, imagefolder: Path):
    runs = extract_each(tmp_path, {"source": "imagefolder", "root": str(imagefolder)}, "precision", ("fp32", "bf16"))
    scale = np.abs(runs["fp32"]).max()
    np.testing.assert_allclose(runs["bf16"], runs["fp32"], atol=0.05 * scale)
    assert not np.array_equal(runs["bf16"], runs["fp32"])


def test_lzf_compression_changes_the_filter_not_the_values(tmp_path: Path, imagefolder: Path):
    data = {"source": "imagefolder", "root": str(imagefolder)}
    values = {}
    for compression in ("none", "lzf"):
        params, _, _ = prepare(tmp_path, data, {"compression": compression, "pool": "flatten", "layer": "pool4"})
        extract(params, tmp_path / "prepared", tmp_path / compression)
        values[compression], info = read_split(tmp_path / compression / "train.h5")
        assert info["compression"] == (None if compression == "none" else "lzf")
    np.testing.assert_array_equal(values["none"], values["lzf"])


@pytest.mark.slow
def test_compiled_network_gives_the_same_features(tmp_path: Path, imagefolder: Path):
    data = {"source": "imagefolder", "root": str(imagefolder)}
    runs = {}
    for compiled in (False, True):
        params, _, _ = prepare(tmp_path, data, {"compile": compiled, "layer": "pool2", "storage_dtype": "float32"})
        extract(params, tmp_path / "prepared", tmp_path / str(compiled))
        runs[compiled], _ = read_split(tmp_path / str(compiled) / "train.h5")
    np.testing.assert_allclose(runs[True], runs[False], rtol=1e-4, atol=1e-4)


def test_non_finite_features_stop_extraction_and_leave_no_file(tmp_path: Path, imagefolder: Path):
    state = {k: v for k, v in torchvision.models.vgg11().state_dict().items() if k.startswith("features.")}
    state["features.0.weight"][:] = float("nan")
    torch.save(state, tmp_path / "broken.pth")  # the layers up to pool5: all the cut uses (37 MB, not 507)
    data = {"source": "imagefolder", "root": str(imagefolder)}
    params, _, _ = prepare(tmp_path, data, {"weights": str(tmp_path / "broken.pth")})
    with pytest.raises(PipelineError, match="non-finite features"):
        extract(params, tmp_path / "prepared", tmp_path / "features")
    assert not (tmp_path / "features").exists()


def digests(out: Path) -> list[str]:
    return [hashlib.sha256((out / f"{s}.h5").read_bytes()).hexdigest() for s in sources.SPLITS]


def test_decode_is_in_the_provenance_and_picks_the_row_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Photos large enough to reduce (300x225 for a 37 px resize): fast and exact features differ a little, the
    rows an interrupted fast run kept are never used by an exact run, and the next fast run continues them."""
    root = make_jpegs(tmp_path / "photos", 24, classes=2, size=(300, 225))
    data = {"source": "imagefolder", "root": str(root)}
    out = extract_each(tmp_path, data, "decode", ("fast", "exact"))
    assert not np.array_equal(out["fast"], out["exact"])
    np.testing.assert_allclose(out["fast"], out["exact"], rtol=0.05, atol=0.05 * np.abs(out["exact"]).max())
    store = tmp_path / STORE_DIR
    assert len(list(store.iterdir())) == 2  # one store per setting
    shutil.rmtree(store)

    calls = 0

    def stop_after_one_batch(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls > 1:
            raise KeyboardInterrupt
        return forward(*args, **kwargs)

    forward = extraction._forward
    fast, _, _ = prepare(tmp_path, data, {"decode": "fast", "storage_dtype": "float32"})
    monkeypatch.setattr(extraction, "_forward", stop_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        extract(fast, tmp_path / "prepared", tmp_path / "features")
    monkeypatch.setattr(extraction, "_forward", forward)
    exact, _, _ = prepare(tmp_path, data, {"decode": "exact", "storage_dtype": "float32"})
    assert extract(exact, tmp_path / "prepared", tmp_path / "features")["reused"] == 0
    assert digests(tmp_path / "features") == digests(tmp_path / "exact")
    stats = extract(fast, tmp_path / "prepared", tmp_path / "features")
    assert (stats["reused"], stats["images"]) == (8, 16)  # the interrupted run's batch of 8, kept
    assert digests(tmp_path / "features") == digests(tmp_path / "fast")


# The code that turns an image's bytes into its row. A change to any of it changes this digest; then decide whether
# what a row holds changed: if so, raise provenance.ROWS_VERSION and name the decodes whose rows changed in
# provenance.ROWS_CHANGED (their old stores are left alone); either way, record the new digest under the version.
ROW_CODE = (
    images.open_image, images._oriented, base.Preprocessing, base.scaled, base.from_transforms, base.Images,
    base.Output, base.choose_pool, base.Pool, base.FeatureExtractor, weights.read_state, weights.needed, weights.load,
    vgg.preprocessing, vgg.cut, vgg.init_random, vgg.build, zoo.graph, zoo._stages, zoo._Node, zoo.build, zoo._model,
    zoo.preprocessing, timm_models.facts, timm_models._stages, timm_models.PreLogits, timm_models.Features,
    timm_models.Stage, timm_models.build, timm_models.preprocessing, timm_models._converter, backbones.build_extractor,
    extraction._forward, sources.ImageReader, batches.joined, images.read_bytes, decoder.device_pixels,
    decoder.cpu_crop, decoder.RawImages, decoder.collate, decoder.jpeg_decoder, decoder._torchvision_decode,
    decoder.DeviceDecoder, decoder.on_device,
)  # fmt: skip
ROW_CODE_DIGESTS = {2: "cdeeb057a8427f94"}  # 1: the rows of every release before the backbone contract; 2: decode:
# fast resizes a reduced JPEG from the region the photo covers (ROWS_CHANGED); the others kept their bytes


def canonical(node: object) -> str:
    """An AST as nested node types and fields, docstrings, empty fields and positions left out: the same text on
    every Python that the project supports (3.10 on), where ast.unparse and ast.dump are not (3.12 added
    type_params to every def, 3.13 leaves empty fields out of dump, and unparse changed its quoting)."""
    if isinstance(node, ast.AST):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        doc = isinstance(first, ast.Expr) and isinstance(getattr(first.value, "value", None), str)
        fields = [(k, v[1:] if doc and k == "body" else v) for k, v in ast.iter_fields(node)]
        shown = ",".join(f"{k}={canonical(v)}" for k, v in fields if v not in (None, []))
        return f"{type(node).__name__}({shown})"
    if isinstance(node, list):
        return "[" + ",".join(canonical(v) for v in node) + "]"
    return repr(node)


def row_code_digest() -> str:
    """A digest of the syntax of ROW_CODE and of the constants it reads, without docstrings and comments."""
    h = hashlib.sha256()
    for obj in ROW_CODE:
        h.update(canonical(ast.parse(textwrap.dedent(inspect.getsource(obj)))).encode())
    h.update(repr((images.REDUCE_GAP, vgg.LAYERS, vgg._FC_DEPTH, zoo.STAGE_STRIDES, base.POOLS)).encode())
    h.update(repr((timm_models.STAGE_STRIDES, weights.CHECKPOINT_KEYS, weights.PREFIXES)).encode())
    return h.hexdigest()[:16]


def test_the_rows_version_follows_the_code_that_makes_a_row():
    """Regression: code that changes rows did not pick a new store, so old and new rows mixed silently."""
    assert ROW_CODE_DIGESTS.get(provenance.ROWS_VERSION) == row_code_digest(), (
        "the code that makes a row changed: if what a row holds changed, raise pipeline.provenance.ROWS_VERSION; "
        f"then record ROW_CODE_DIGESTS[{provenance.ROWS_VERSION}] = {row_code_digest()!r} (tests/test_extract.py)"
    )


CANONICAL_ELSEWHERE = """
import ast, hashlib, json, sys, textwrap
{canonical}
h = hashlib.sha256()
for path, start, n in json.loads(sys.argv[1]):
    with open(path) as f:
        h.update(canonical(ast.parse(textwrap.dedent("".join(f.readlines()[start - 1 : start - 1 + n])))).encode())
print(h.hexdigest())
"""


def other_pythons() -> list[str]:
    """The interpreters of the supported versions other than this one that this machine has (beside this one's
    installation too: pyenv's versions/)."""
    found = {}
    for minor in range(10, 15):
        if minor != sys.version_info.minor:
            candidates = [
                shutil.which(f"python3.{minor}"),
                *sorted(Path(sys.base_prefix).parent.glob(f"3.{minor}.*/bin/python3")),
            ]
            for exe in filter(None, candidates):  # a pyenv shim of a version not selected fails to run
                if subprocess.run([exe, "-c", "pass"], capture_output=True).returncode == 0:
                    found[minor] = str(exe)
                    break
    return list(found.values())


def test_the_row_code_digest_is_the_same_on_every_supported_python():
    """Regression: the digest was of ast.unparse's text, which differs on 3.10, 3.11 and 3.12 on."""
    pythons = other_pythons()
    if not pythons:
        pytest.skip("no other Python 3.10+ on this machine")
    spans = []
    for obj in ROW_CODE:
        lines, start = inspect.getsourcelines(obj)
        spans.append([inspect.getsourcefile(inspect.unwrap(obj)), start, len(lines)])
    script = CANONICAL_ELSEWHERE.format(canonical=inspect.getsource(canonical))
    digests = {sys.executable: subprocess.run([sys.executable, "-c", script, json.dumps(spans)], capture_output=True,
                                              text=True, check=True).stdout}  # fmt: skip
    for exe in pythons:
        digests[exe] = subprocess.run([exe, "-I", "-c", script, json.dumps(spans)], capture_output=True, text=True,
                                      check=True).stdout  # fmt: skip
    assert len(set(digests.values())) == 1, digests


@pytest.mark.parametrize("decode", ["fast", "exact"])
def test_the_rows_version_picks_the_store_of_the_decodes_it_changed(
    tmp_path: Path, imagefolder: Path, monkeypatch: pytest.MonkeyPatch, decode: str
):
    params, _, _ = prepare(tmp_path, {"source": "imagefolder", "root": str(imagefolder)}, {"decode": decode})
    extract(params, tmp_path / "prepared", tmp_path / "features")
    version = provenance.ROWS_VERSION + 1
    monkeypatch.setattr(provenance, "ROWS_VERSION", version)
    monkeypatch.setattr(provenance, "ROWS_CHANGED", provenance.ROWS_CHANGED | {version: ("fast",)})
    assert extract(params, tmp_path / "prepared", tmp_path / "features")["reused"] == (0 if decode == "fast" else 20)
    assert len(list((tmp_path / STORE_DIR).iterdir())) == (2 if decode == "fast" else 1)


def test_each_device_type_has_its_own_row_store(tmp_path: Path):
    """Rows of a Mac's GPU (MPS) never mix with the CPU's or CUDA's, nor come from their recorded features."""
    params = parse_params({"extract": FAST})
    base = {"feature_dim": 512, "storage_dtype": "float16", "arch": "vgg11", "weights": "random", "seed": 0}
    dirs = set()
    for device in ("cpu", "mps", "cuda"):
        store = extraction._open_store(tmp_path, base, params.extract, torch.device(device), World(), None)
        dirs.add(store.dir.name)
        store.close()
    assert len(dirs) == 3


def interrupted_after(n: int, batches: list[list[str]]):
    """(images, index, errors) batches of two images, with the errors given; Ctrl-C before batch ``n``."""
    for k, errors in enumerate(batches):
        if k == n:
            raise KeyboardInterrupt
        yield [torch.zeros(2, 3, 4, 4, dtype=torch.uint8)], torch.arange(2), errors


@pytest.mark.parametrize(
    "batches, stop, raised, said",
    [
        ([["UnidentifiedImageError: …", ""], ["", ""]], 9, PipelineError, None),  # nothing kept: nothing to say
        ([["", ""], ["", "OSError: cut"]], 9, PipelineError, "2 of 4 new rows in {}: the next run starts from there"),
        ([["", ""], ["", ""]], 1, KeyboardInterrupt, "2 of 4 new rows in {}: run again to continue"),
        ([["", ""], ["", ""]], 0, KeyboardInterrupt, "0 of 4 new rows in {}: run again to continue"),
    ],
)  # fmt: skip
def test_run_again_is_said_only_when_running_again_continues(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, batches, stop, raised, said
):
    """Regression: an unreadable image logged `kept 0 of 1 new rows … run again to continue`, and running again
    failed the same way. Rows kept are said; "run again" only after an interruption."""
    from pipeline.store import RowStore

    keys = [bytes([k]) * 16 for k in range(4)]
    work = [(keys[:2], ["original"]), (keys[2:], ["original"])]
    store = RowStore(tmp_path / "store", segment=0, dim=2, dtype="float32")
    step = lambda images, views: {"original": np.zeros((2, 2), np.float32)}  # noqa: E731
    ids = {k: f"circle/{k[0]}.png" for k in keys}
    with caplog.at_level(logging.INFO, logger="pipeline.extraction"), pytest.raises(raised):
        extraction._extract_shard(step, interrupted_after(stop, batches), store, work, ids=ids, bar=False)
    store.close()
    kept = [r.getMessage() for r in caplog.records if r.getMessage().startswith("kept ")]
    assert kept == ([f"kept {said.format(tmp_path / 'store')}"] if said else [])
