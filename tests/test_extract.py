from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pipeline import backbone, features, sources
from pipeline.config import parse_params
from pipeline.extract import extract
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
    params, items, classes = prepare(tmp_path, {"source": source, "root": str(root), "val_fraction": 0.2})
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
    model, prep, _ = backbone.build_extractor(params.extract, params.seed)
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
