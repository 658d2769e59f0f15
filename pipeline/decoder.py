"""Decoding on the network's device (``extract.decode: device``): DataLoader workers read each file's bytes and
look at its header; the device decodes the JPEGs of a batch together (nvJPEG on CUDA, libjpeg-turbo on the CPU),
then resizes and crops them there with torchvision's tensor transforms.

What the device decoder might not decode as Pillow does goes through the CPU path (Pillow, full size, as with
``decode: exact``), and the batch still comes out whole: other formats (PNG, WebP …), CMYK and RGB-stored JPEGs,
an EXIF orientation other than upright, bytes that end before the JPEG's end marker (a truncated file, which
Pillow refuses), images over Pillow's pixel limit, and any JPEG the device fails on (then decoded by Pillow in the
main process). An image that Pillow cannot read either gives the same error as on the CPU path, so
``data.on_bad_image`` behaves the same.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
import torchvision
from torch.utils.data import Dataset
from torchvision.transforms import functional as F

from pipeline.backbones.base import Images, Preprocessing
from pipeline.images import IMAGE_ERRORS, identify, open_image, reason

# Decoded pixels per call of the device decoder: a batch of large photos is decoded in parts, each resized and
# cropped before the next, so that its memory stays near 3 bytes x this decoded (0.2 GB) and 12 bytes while
# resized in float32 (0.8 GB), whatever the batch size: about 5 photos of 12 MP, or 350 images of 500x375.
DECODE_PIXELS = 2**26
UPRIGHT = (None, 1)  # EXIF orientations that need no rotation (absent, or 1)

Decode = Callable[[list[torch.Tensor], torch.device], list[torch.Tensor]]


class Encoded(NamedTuple):
    """A piece of a batch from RawImages: each image as its file's bytes (1-D uint8, for the device to decode)
    or as the uint8 crop that the CPU path made (3-D), with its decoded pixel count (0 for a crop)."""

    payloads: list[torch.Tensor]
    pixels: list[int]


def device_pixels(data: bytes) -> int:
    """The pixels of the JPEG in ``data`` when the device decoder may take it, else 0 (see the module's list).
    Reads the header only, with Pillow, as the CPU path would open it."""
    try:
        with identify(io.BytesIO(data)) as img:  # over the limit: refused, as open_image refuses it
            if img.format != "JPEG" or img.mode not in ("RGB", "L") or img.info.get("adobe_transform") == 0:
                return 0
            if img.getexif().get(0x0112) not in UPRIGHT:
                return 0
            pixels = img.width * img.height
    except IMAGE_ERRORS:  # the CPU path says what is wrong
        return 0
    return pixels if data[-4096:].rstrip(b"\0").endswith(b"\xff\xd9") else 0  # padded with zeros, at most 4 KiB


def cpu_crop(data: bytes, prep: Preprocessing, name: str = "") -> tuple[torch.Tensor, str]:
    """The CPU path on bytes already read: (uint8 crop, "") or (a zero crop, why Pillow cannot read them);
    ``name``: what that reason calls the file."""
    try:
        return prep.to_uint8(open_image(io.BytesIO(data), name=name)), ""
    except IMAGE_ERRORS as err:
        return torch.zeros(3, prep.crop_size, prep.crop_size, dtype=torch.uint8), reason(err)


class RawImages(Dataset):
    """Runs in DataLoader workers: yields (payload, pixels, index, error), where the payload is the file's bytes
    for the device decoder, or the CPU path's crop (``images``' item) for anything else. ``read``: an item's
    bytes (None for an image held as an array: digits, CIFAR-10)."""

    def __init__(self, read: Callable[[Any], bytes | None], images: Images) -> None:
        self.read, self.images = read, images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, str]:
        try:
            data = self.read(self.images.keys[index])
        except IMAGE_ERRORS:  # as on the CPU path, which reads it again and reports it
            data = None
        if data is None:
            crop, _, error = self.images[index]
            return crop, 0, index, error
        pixels = device_pixels(data)
        if pixels:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), pixels, index, ""
        crop, error = cpu_crop(data, self.images.prep, str(self.images.keys[index]))
        return crop, 0, index, error


def collate(items: Sequence[tuple[torch.Tensor, int, int, str]]) -> tuple[Encoded, torch.Tensor, list[str]]:
    """RawImages' items as one piece: (Encoded, row indices, errors), as the CPU path's loader gives them."""
    payloads, pixels, index, errors = zip(*items, strict=True)
    return Encoded(list(payloads), list(pixels)), torch.tensor(index), list(errors)


def jpeg_decoder() -> tuple[Decode, str]:
    """The batched JPEG decoder and its name: TorchCodec's where it loads (torchvision's successor for image
    decoding), else torchvision's own (deprecated since 0.29, present in every torchvision this supports)."""
    try:
        import torchcodec
        from torchcodec.decoders import decode_jpeg
    except Exception:  # not installed, too old, or built for another torch: its libraries fail to load
        return _torchvision_decode, f"torchvision {torchvision.__version__}"
    return (lambda data, device: decode_jpeg(data, mode="RGB", device=device)), f"torchcodec {torchcodec.__version__}"


def _torchvision_decode(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated since torchvision")
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


class DeviceDecoder:
    """Turns the pieces of one batch from RawImages into one uint8 (B, 3, S, S) batch on ``device``. The JPEGs are
    decoded on CUDA there, else on the CPU of this process (the decoders have no MPS path), then moved."""

    def __init__(self, prep: Preprocessing, device: torch.device, decode: Decode | None = None) -> None:
        self.prep, self.device = prep, device
        self.decode_on = device if device.type == "cuda" else torch.device("cpu")
        self.decode, self.name = (decode, "custom") if decode else jpeg_decoder()

    def __call__(self, pieces: Sequence[Encoded], errors: Sequence[str]) -> tuple[torch.Tensor, list[str]]:
        payloads = [p for piece in pieces for p in piece.payloads]
        pixels = [n for piece in pieces for n in piece.pixels]
        crops: list[torch.Tensor | None] = [None] * len(payloads)
        errors = list(errors)
        for i, payload in enumerate(payloads):
            if not pixels[i]:
                crops[i] = payload.to(self.device, non_blocking=self.device.type == "cuda")
        for part in _parts([i for i, n in enumerate(pixels) if n], pixels, DECODE_PIXELS):
            sizes: dict[torch.Size, list[tuple[int, torch.Tensor]]] = {}  # decoded images by their shape
            for i, image in zip(part, self._decoded([payloads[i] for i in part]), strict=True):
                if image is None:  # the device failed on it: Pillow decides, as on the CPU path
                    crop, errors[i] = cpu_crop(payloads[i].numpy().tobytes(), self.prep)
                    crops[i] = crop.to(self.device)
                else:
                    sizes.setdefault(image.shape, []).append((i, image))
            for same in sizes.values():  # one resize per shape: a folder of one camera's photos is one call
                for (i, _), crop in zip(same, self._crop(torch.stack([image for _, image in same])), strict=True):
                    crops[i] = crop
        return torch.stack(crops), errors  # type: ignore[arg-type]  # every slot is filled

    def _decoded(self, data: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Decoded (3, H, W) images, None for each the device fails on. On CUDA the caller's stream is drained
        first: nvJPEG's batched decode can write into memory that work still queued on it reads (torchvision
        PR 9606, TorchCodec PR 1634); after a batch's features were copied back it is idle, so this costs nothing."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        try:
            return list(self.decode(data, self.decode_on))
        except RuntimeError:  # one bad image fails the whole call: find it
            if len(data) == 1:
                return [None]
            return [image for one in data for image in self._decoded([one])]

    def _crop(self, images: torch.Tensor) -> torch.Tensor:
        """The CPU path's resize and centre crop of (N, 3, H, W) images of one size, on the device (antialiased,
        rounded to uint8; each image's result does not depend on the others)."""
        mode = F.InterpolationMode(self.prep.interpolation)
        images = F.resize(images.to(self.device), [self.prep.resize_size], interpolation=mode, antialias=True)
        return F.center_crop(images, [self.prep.crop_size])


def _parts(rows: list[int], pixels: Sequence[int], budget: int) -> Iterator[list[int]]:
    """``rows`` in consecutive parts of at most ``budget`` pixels (one image over it is a part of its own)."""
    part: list[int] = []
    total = 0
    for i in rows:
        if part and total + pixels[i] > budget:
            yield part
            part, total = [], 0
        part.append(i)
        total += pixels[i]
    if part:
        yield part


def on_device(
    batches: Iterable[tuple[Sequence[Encoded], Any, list[str]]], decoder: DeviceDecoder
) -> Iterator[tuple[list[torch.Tensor], Any, list[str]]]:
    """Batches of RawImages' pieces as batches of one decoded uint8 tensor on the device, errors merged."""
    for pieces, index, errors in batches:
        images, problems = decoder(pieces, errors)
        yield [images], index, problems
