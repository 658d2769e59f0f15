from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline import features
from pipeline import provenance as fields
from pipeline.errors import PipelineError
from tests.conftest import feature_provenance


def provenance(**changes: object) -> dict:
    base = {"pool": "flatten", "feature_dim": 2048, "views": ["original", "hflip"], "class_names": ["caf\u00e9", "dog"]}
    return feature_provenance(**(base | changes))


def write(path: Path, n: int = 300, dim: int = 2048, batch: int = 64, dtype: str = "float16") -> np.ndarray:
    rng = np.random.default_rng(0)
    data = rng.standard_normal((n, dim)).astype(np.float32)
    labels = np.arange(n) % 2
    with features.FeatureWriter(
        path, n=n, dim=dim, dtype=dtype, views=["original", "hflip"], provenance=provenance(storage_dtype=dtype)
    ) as writer:
        for start in range(0, n, batch):
            block = data[start : start + batch]
            ids = [f"img/{i}" for i in range(start, start + len(block))]
            writer.write(start, {"original": block, "hflip": -block}, labels[start : start + len(block)], ids)
    return data


def test_layout_chunking_and_provenance(tmp_path: Path):
    path = tmp_path / "train.h5"
    data = write(path)
    with h5py.File(path) as f:
        assert set(f) == {"features", "features_hflip", "labels", "ids", "class_names"}
        assert f["features"].shape == (300, 2048) and f["features"].dtype == np.float16
        rows, cols = f["features"].chunks
        assert cols == 2048 and rows * 2048 * 2 <= features.CHUNK_BYTES  # chunked along N, <= 1 MiB
        assert f["labels"].dtype == np.int64 and f["labels"].chunks is not None
        assert set(f.attrs) == set(fields.PROVENANCE_KEYS) - {"class_names"}
    fs = features.read_features(path)
    np.testing.assert_allclose(fs.features["original"], data, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(fs.features["hflip"], -data, rtol=1e-3, atol=1e-3)
    assert fs.features["original"].dtype == np.float32
    assert fs.ids[:2] == ["img/0", "img/1"] and fs.labels[:4].tolist() == [0, 1, 0, 1]
    assert fs.provenance == provenance()


def test_25000_class_names_fit_and_the_file_stays_byte_stable(tmp_path: Path):
    """Regression: class names were an attribute, and HDF5 refused more than about 4,091 of them at the end of
    extract (object header message is too large)."""
    names = [f"n{k:08d} some long synset name" for k in range(25_000)]
    for name in ("a.h5", "b.h5"):
        with features.FeatureWriter(
            tmp_path / name, n=2, dim=4, dtype="float32", views=["original"], provenance=provenance(class_names=names)
        ) as writer:
            writer.write(0, {"original": np.ones((2, 4), np.float32)}, np.array([0, 24_999]), ["x/0", "x/1"])
    assert features.read_provenance(tmp_path / "a.h5")["class_names"] == names
    assert (tmp_path / "a.h5").read_bytes() == (tmp_path / "b.h5").read_bytes()


def test_files_of_earlier_releases_with_class_names_as_an_attribute_still_read(tmp_path: Path):
    path = tmp_path / "old.h5"
    write(path)
    with h5py.File(path, "r+") as f:
        del f["class_names"]
        f.attrs["class_names"] = np.array(["caf\u00e9", "dog"], dtype=h5py.string_dtype("utf-8"))
    assert features.read_provenance(path) == provenance()


def test_same_inputs_give_byte_identical_files(tmp_path: Path):
    write(tmp_path / "a.h5")
    write(tmp_path / "b.h5")
    digest = [hashlib.sha256((tmp_path / n).read_bytes()).hexdigest() for n in ("a.h5", "b.h5")]
    assert digest[0] == digest[1]


def test_float32_storage_is_exact(tmp_path: Path):
    data = write(tmp_path / "f.h5", dtype="float32")
    np.testing.assert_array_equal(features.read_features(tmp_path / "f.h5").features["original"], data)


def test_a_failed_write_leaves_no_file(tmp_path: Path):
    path = tmp_path / "train.h5"
    with (
        pytest.raises(RuntimeError),
        features.FeatureWriter(path, n=4, dim=2, dtype="float32", views=["original"], provenance=provenance()),
    ):
        raise RuntimeError("killed midway")  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_provenance_mismatch_names_the_attribute(tmp_path: Path):
    with pytest.raises(PipelineError, match=r"made with layer = 'pool5', but 'fc6' is asked for"):
        fields.check_provenance(provenance(), {"arch": "vgg11", "layer": "fc6"}, source="train.h5")


@pytest.mark.parametrize("content", [b"", b"garbage, not HDF5"])
def test_unreadable_files_are_clear_errors(tmp_path: Path, content: bytes):
    path = tmp_path / "train.h5"
    path.write_bytes(content)
    with pytest.raises(PipelineError, match="not a readable HDF5 feature file"):
        features.read_features(path)


def test_foreign_hdf5_files_are_refused(tmp_path: Path):
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["features"] = np.zeros((2, 2))
    with pytest.raises(PipelineError, match="not a feature file of this pipeline"):
        features.read_provenance(tmp_path / "other.h5")


def test_values_beyond_float16_are_refused(tmp_path: Path):
    with pytest.raises(PipelineError, match="beyond float16's range"), features.FeatureWriter(
        tmp_path / "t.h5", n=2, dim=2, dtype="float16", views=["original"], provenance=provenance()
    ) as writer:  # fmt: skip
        writer.write(0, {"original": np.full((2, 2), 1e6, dtype=np.float32)}, np.zeros(2), ["a", "b"])
    assert list(tmp_path.iterdir()) == []


def test_an_error_on_the_writer_thread_reaches_the_caller(tmp_path: Path):
    writer = features.FeatureWriter(
        tmp_path / "t.h5", n=2, dim=2, dtype="float32", views=["original"], provenance=provenance()
    )
    writer.write(0, {"original": np.zeros((2, 3), dtype=np.float32)}, np.zeros(2), ["a", "b"])  # wrong width
    with pytest.raises(TypeError):
        writer.close()
    assert list(tmp_path.iterdir()) == []


def test_block_reader_reads_whole_chunks_and_every_row_once(tmp_path: Path):
    write(tmp_path / "train.h5", n=1000, dim=2048)  # float16: 256 rows per chunk
    reader = features.BlockReader(tmp_path / "train.h5", block_mb=2)
    assert reader.block_rows % 256 == 0 and reader.num_blocks == -(-1000 // reader.block_rows)
    whole = features.read_features(tmp_path / "train.h5")
    start = 0
    for k in range(reader.num_blocks):
        x, y = reader.read(k)
        rows = len(x) // 2  # the original view's rows, then the same rows of the hflip view
        np.testing.assert_array_equal(x[:rows], whole.features["original"][start : start + rows])
        np.testing.assert_array_equal(x[rows:], whole.features["hflip"][start : start + rows])
        np.testing.assert_array_equal(y, np.tile(whole.labels[start : start + rows], 2))
        start += rows
    assert start == 1000


def test_block_reader_reads_the_views_asked_for_and_refuses_others(tmp_path: Path):
    write(tmp_path / "train.h5", n=1000, dim=2048)
    reader = features.BlockReader(tmp_path / "train.h5", block_mb=4, views=["original"])
    whole = features.read_features(tmp_path / "train.h5")
    assert reader.block_rows == 2 * features.BlockReader(tmp_path / "train.h5", block_mb=4).block_rows  # 1 view
    x, y = reader.read_rows(0, 1000)
    np.testing.assert_array_equal(x, whole.features["original"])
    np.testing.assert_array_equal(y, whole.labels)
    with pytest.raises(PipelineError, match=r"caches the views \['original', 'hflip'\], not \['vflip'\]"):
        features.BlockReader(tmp_path / "train.h5", views=["vflip"])


def test_a_truncated_feature_file_is_a_clear_error(tmp_path: Path):
    path = tmp_path / "train.h5"
    write(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(PipelineError, match="not a readable HDF5 feature file"):
        features.read_features(path)
