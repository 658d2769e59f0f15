"""extract.decode: device, with the decode on the CPU device: the raw bytes from the workers, the batched decode,
the fallbacks to the CPU path, and the row store and provenance of the setting."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.images import make_jpegs
from pipeline import decoder, features
from pipeline.backbones import build_extractor
from pipeline.backbones.base import Images, Preprocessing
from pipeline.errors import PipelineError
from pipeline.extraction import extract
from pipeline.images import open_image, read_bytes
from pipeline.store import STORE_DIR
from tests.test_extract import prepare
from tests.test_prepare import BAD, GOOD, jpeg_bytes

PREP = Preprocessing(36, 32, "bilinear", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
CPU = torch.device("cpu")


def odd_files(root: Path) -> list[Path]:
    """Every file the CPU path reads fine but the device must not take, plain JPEGs, and one truncated JPEG."""
    root.mkdir(parents=True, exist_ok=True)
    for name, make in (GOOD | {"truncated.jpg": BAD["truncated.jpg"]}).items():
        make(root / name)
    (root / "plain.jpg").write_bytes(jpeg_bytes(quality=90))
    (root / "progressive.jpg").write_bytes(jpeg_bytes(progressive=True))
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (75, 100), dtype=np.uint8)).save(root / "grey.jpg")
    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), "teal").save(buffer, "JPEG")
    (root / "padded.jpg").write_bytes(buffer.getvalue() + b"\0" * 64)  # zeros after the end marker, as cameras do
    return sorted(root.iterdir())


DEVICE = {"plain.jpg", "progressive.jpg", "grey.jpg", "padded.jpg"}  # the JPEGs the device decodes


def test_the_device_takes_plain_jpegs_only(tmp_path: Path):
    """PNG, CMYK, EXIF-rotated and truncated files go to the CPU path; baseline, progressive and grey JPEGs do not."""
    taken = {p.name for p in odd_files(tmp_path) if decoder.device_pixels(p.read_bytes())}
    assert taken == DEVICE
    assert decoder.device_pixels((tmp_path / "grey.jpg").read_bytes()) == 75 * 100


def test_a_batch_of_every_kind_comes_out_whole_and_as_the_cpu_path_makes_it(tmp_path: Path):
    paths = odd_files(tmp_path)
    images = Images(paths, open_image, PREP)
    raw = decoder.RawImages(read_bytes, images)
    halves = [decoder.collate([raw[i] for i in part]) for part in (range(0, 6), range(6, len(paths)))]
    batch, errors = decoder.DeviceDecoder(PREP, CPU)([h[0] for h in halves], [e for h in halves for e in h[2]])
    assert batch.shape == (len(paths), 3, 32, 32) and batch.dtype == torch.uint8
    for i, path in enumerate(paths):
        crop, _, error = images[i]
        assert errors[i] == error, path.name  # the truncated file: Pillow's own error, as on the CPU path
        difference = (batch[i].int() - crop.int()).abs()
        if path.name in DEVICE:  # decoded as Pillow does; torch's antialiased resize rounds differently
            assert difference.max() <= 1 and difference.float().mean() < 0.5, path.name
        else:
            assert difference.max() == 0, path.name
    assert "truncated" in errors[paths.index(tmp_path / "truncated.jpg")]


def test_bytes_pillow_cannot_identify_are_named_by_their_file(tmp_path: Path):
    """Regression: the bytes read for the device decoder went to Pillow as `<_io.BytesIO object at 0x…>`."""
    (tmp_path / "notes.jpg").write_text("not an image")
    raw = decoder.RawImages(read_bytes, Images([tmp_path / "notes.jpg"], open_image, PREP))
    assert raw[0][3] == f"UnidentifiedImageError: cannot identify image file '{tmp_path / 'notes.jpg'}'"


@pytest.mark.parametrize("library", ["torchcodec", "torchvision"])
def test_each_decoder_gives_pillows_pixels_on_the_cpu(library: str, monkeypatch: pytest.MonkeyPatch):
    """The batched decoders (TorchCodec where it loads, else torchvision's) equal Pillow's libjpeg decode."""
    if library == "torchvision":
        monkeypatch.setitem(__import__("sys").modules, "torchcodec", None)  # as if not installed
    elif not decoder.jpeg_decoder()[1].startswith("torchcodec"):
        pytest.skip("TorchCodec does not load here (not installed, or built for another torch)")
    decode, name = decoder.jpeg_decoder()
    assert name.startswith(library)
    data = [jpeg_bytes(quality=q, progressive=q > 80) for q in (75, 95)]
    decoded = decode([torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data], CPU)
    for d, image in zip(data, decoded, strict=True):
        assert torch.equal(image, torch.from_numpy(np.array(open_image(io.BytesIO(d)))).permute(2, 0, 1))


def test_an_image_the_device_fails_on_goes_through_pillow(tmp_path: Path):
    """One bad image fails a whole batched call: the others are decoded again one by one, the bad one by Pillow."""
    paths = [p for p in odd_files(tmp_path) if p.name in DEVICE]
    refused = paths[1].read_bytes()
    real, _ = decoder.jpeg_decoder()
    calls = []

    def fussy(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        calls.append(len(data))
        if any(d.numpy().tobytes() == refused for d in data):
            raise RuntimeError("nvjpegDecode failed")
        return real(data, device)

    images = Images(paths, open_image, PREP)
    piece, _, errors = decoder.collate([decoder.RawImages(read_bytes, images)[i] for i in range(len(paths))])
    batch, errors = decoder.DeviceDecoder(PREP, CPU, decode=fussy)([piece], errors)
    assert calls == [len(paths)] + [1] * len(paths) and errors == [""] * len(paths)
    assert torch.equal(batch[1], images[1][0])  # Pillow's crop, bit for bit


def test_large_batches_are_decoded_in_parts_under_the_pixel_budget():
    pixels = [40, 70, 10, 200, 30, 30]
    assert list(decoder._parts([0, 1, 2, 3, 4, 5], pixels, 100)) == [[0], [1, 2], [3], [4, 5]]
    assert list(decoder._parts([1, 4], pixels, 100)) == [[1, 4]]


def test_device_decode_has_its_own_store_and_provenance(tmp_path: Path):
    """decode: device rows never mix with fast's, they are reused on a rerun, and stay near exact's features."""
    root = make_jpegs(tmp_path / "photos", 16, classes=2, size=(120, 90))
    GOOD["cmyk.jpg"](root / "class0" / "cmyk.jpg")
    GOOD["rotated.jpg"](root / "class1" / "rotated.jpg")
    data = {"source": "imagefolder", "root": str(root), "val_fraction": 0.25, "test_fraction": 0.25}
    out, made = tmp_path / "features", {}
    for decode in ("exact", "device", "device"):
        params, items, _ = prepare(tmp_path, data, {"decode": decode, "storage_dtype": "float32"})
        stats = extract(params, tmp_path / "prepared", out)
        made[decode] = features.read_features(out / "train.h5").features["original"]
    assert stats["reused"] == len(items) and stats["images"] == 0  # the second device run: every row reused
    assert len(list((tmp_path / STORE_DIR).iterdir())) == 2
    prov = features.read_provenance(out / "train.h5")
    assert prov["decode"] == "device" and prov["decoder"] == decoder.DeviceDecoder(PREP, CPU).name
    a, b = made["exact"], made["device"]
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert not np.array_equal(a, b) and cosine.min() > 0.99


def test_a_truncated_jpeg_stops_extraction_with_the_cpu_paths_error(tmp_path: Path):
    root = make_jpegs(tmp_path / "photos", 8, classes=2, size=(64, 48))
    BAD["truncated.jpg"](root / "class0" / "truncated.jpg")
    data = {"source": "imagefolder", "root": str(root), "val_fraction": 0.25, "test_fraction": 0.25}
    messages = []
    for decode in ("exact", "device"):
        params, _, _ = prepare(tmp_path, data, {"decode": decode})
        with pytest.raises(PipelineError, match="cannot read image 'class0/truncated.jpg'") as caught:
            extract(params, tmp_path / "prepared", tmp_path / "features")
        messages.append(str(caught.value))
    assert messages[0] == messages[1]


def test_predict_decodes_as_the_features_were_decoded(tmp_path: Path):
    """predict with decode: device takes the same path: JPEGs decoded there, the rest and the errors as Pillow's."""
    from pipeline.config import parse_params
    from pipeline.predict import predict

    paths = odd_files(tmp_path / "images")
    os.mkfifo(tmp_path / "pipe.jpg")  # read as bytes, a FIFO would block: refused as on the CPU path
    paths.append(tmp_path / "pipe.jpg")
    extractor, prep, _ = build_extractor(parse_params({"extract": {"arch": "vgg11", "weights": "random"}}).extract, 0)
    head = torch.nn.Linear(512, 3)
    got = {
        decode: predict(
            paths, extractor, head, prep, class_names=["a", "b", "c"], top_k=3, device=CPU, num_workers=0, decode=decode
        )  # fmt: skip
        for decode in ("exact", "device")
    }
    for exact, device in zip(got["exact"], got["device"], strict=True):
        assert exact.error == device.error and exact.path == device.path
        if not exact.error:
            assert dict(exact.top) == pytest.approx(dict(device.top), abs=0.05), exact.path.name
    assert [p.path.name for p in got["device"] if p.error] == ["truncated.jpg", "pipe.jpg"]


def test_images_of_one_size_are_resized_together_with_the_same_bits_as_alone():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (5, 3, 75, 100), dtype=np.uint8))
    crop = decoder.DeviceDecoder(PREP, CPU, decode=lambda data, device: [])._crop
    together = crop(images)
    assert together.shape == (5, 3, 32, 32)
    assert all(torch.equal(together[k], crop(images[k : k + 1])[0]) for k in range(5))
