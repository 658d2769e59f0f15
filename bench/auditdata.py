"""The images of bench.audit: scikit-learn's digits as PNG files, a generated photo-like image folder, copies of
images with a small change, injected outliers, and a ResNet-18 stand-in for discriminative (trained) features."""

from __future__ import annotations

import io
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("ellipse", "rectangle", "triangle", "stripes", "rings")
COPY_CHANGES = ("jpeg90", "crop", "brightness")


def write_digits(root: Path, n: int = 0) -> list[str]:
    """scikit-learn's 8x8 digits (the first ``n``, 0: all 1797) as 32x32 PNGs (NEAREST), ``root/<digit>/NNNN.png``;
    returns their ids."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    count = n or len(digits.target)
    ids = []
    for i in range(count):
        pixels = (digits.images[i] * (255 / 16)).round().astype(np.uint8)  # 0..16 -> 0..255
        item = f"{digits.target[i]}/{i:04d}.png"
        (root / item).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels, "L").resize((32, 32), Image.NEAREST).save(root / item)
        ids.append(item)
    return ids


def photo(index: int, label: int, *, size: int = 96, seed: int = 0) -> Image.Image:
    """A photo-like image of class ``label``: a gradient background in the class's colours, a smooth noise texture,
    a few shapes of the class's kind and sensor grain; every parameter jittered per image, so no two are alike."""
    style = np.random.default_rng([12345, label])  # the class: the same for every seed
    palette = style.integers(0, 256, size=(3, 3)).astype(np.float64)
    shape = SHAPES[int(style.integers(len(SHAPES)))]
    angle0, grid = style.uniform(0, np.pi), int(style.integers(3, 10))
    rng = np.random.default_rng([seed, label, index])
    angle = angle0 + rng.normal(0, 0.6)
    yy, xx = np.mgrid[0:size, 0:size] / size
    t = np.clip((np.cos(angle) * xx + np.sin(angle) * yy + rng.uniform(-0.3, 0.3)), 0, 1)[..., None]
    a, b = palette[0] + rng.normal(0, 30, 3), palette[1] + rng.normal(0, 30, 3)
    field = a * (1 - t) + b * t
    coarse = rng.normal(0, 1, (grid, grid, 3))
    texture = np.stack([np.asarray(Image.fromarray(coarse[..., c].astype(np.float32)).resize((size, size),
                        Image.BICUBIC)) for c in range(3)], -1)  # fmt: skip
    field += texture * rng.uniform(12, 35)
    img = Image.fromarray(np.clip(field, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        colour = tuple(int(v) for v in np.clip(palette[2] + rng.normal(0, 40, 3), 0, 255))
        cx, cy, r = rng.uniform(0.1, 0.9) * size, rng.uniform(0.1, 0.9) * size, rng.uniform(0.08, 0.3) * size
        box = [cx - r, cy - r * rng.uniform(0.5, 1.5), cx + r, cy + r * rng.uniform(0.5, 1.5)]
        if shape == "ellipse":
            draw.ellipse(box, fill=colour)
        elif shape == "rectangle":
            draw.rectangle(box, fill=colour)
        elif shape == "triangle":
            turn = rng.uniform(0, 2 * np.pi)
            draw.polygon([(cx + r * np.cos(turn + k * 2.09), cy + r * np.sin(turn + k * 2.09)) for k in range(3)],
                         fill=colour)  # fmt: skip
        elif shape == "stripes":
            step = max(2, int(r / 3))
            for k in range(int(box[0]), int(box[2]), 2 * step):
                draw.rectangle([k, box[1], k + step, box[3]], fill=colour)
        else:
            for k in range(3):
                draw.ellipse([v + (k * r / 4) * (1 if j < 2 else -1) for j, v in enumerate(box)], outline=colour,
                             width=max(1, size // 40))  # fmt: skip
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    grain = rng.integers(-8, 9, size=(size, size, 3))
    return Image.fromarray(np.clip(np.asarray(img, np.int16) + grain, 0, 255).astype(np.uint8))


def write_photos(root: Path, n: int, *, classes: int = 10, size: int = 96, seed: int = 0) -> list[str]:
    """``n`` photo-like JPEGs (quality 95) under ``root/class<k>/NNNNNN.jpg``; returns their ids."""
    ids = []
    for i in range(n):
        item = f"class{i % classes}/{i:06d}.jpg"
        (root / item).parent.mkdir(parents=True, exist_ok=True)
        photo(i, i % classes, size=size, seed=seed).save(root / item, quality=95)
        ids.append(item)
    return ids


def changed_copy(root: Path, item: str, change: str, rng: np.random.Generator) -> str:
    """A copy of ``root/item`` beside it with a small change (COPY_CHANGES): re-saved as JPEG quality 90, cropped by
    1-2 pixels on each side, or its brightness changed by 3-5% either way; returns the copy's id."""
    src = root / item
    img = Image.open(src).convert("RGB")
    if change == "crop":
        left, top, right, bottom = (int(v) for v in rng.integers(1, 3, size=4))
        img = img.crop((left, top, img.width - right, img.height - bottom))
    elif change == "brightness":
        factor = 1 + rng.choice([-1, 1]) * rng.uniform(0.03, 0.05)
        img = Image.fromarray(np.clip(np.asarray(img, np.float64) * factor, 0, 255).round().astype(np.uint8))
    elif change != "jpeg90":
        raise ValueError(f"unknown change {change!r}: expected one of {', '.join(COPY_CHANGES)}")
    suffix = ".jpg" if change == "jpeg90" or src.suffix == ".jpg" else src.suffix
    copy = f"{Path(item).parent.as_posix()}/{src.stem}_copy{suffix}"
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG" if suffix == ".jpg" else "PNG", quality=90 if change == "jpeg90" else 95)
    (root / copy).write_bytes(buffer.getvalue())
    return copy


def write_outliers(root: Path, classes: Sequence[str], size: int, *, seed: int = 0) -> dict[str, str]:
    """Images unlike any dataset: blank frames, pure noise and text-like screenshots, one per class folder in
    turn; returns id -> kind."""
    rng = np.random.default_rng([seed, 777])
    pictures = {
        "blank-black": Image.new("RGB", (size, size), (0, 0, 0)),
        "blank-white": Image.new("RGB", (size, size), (255, 255, 255)),
        "blank-grey": Image.new("RGB", (size, size), (128, 128, 128)),
        "noise-uniform": Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)),
        "noise-grey": Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).convert("RGB"),
        "text-1": _screenshot(rng, size),
        "text-2": _screenshot(rng, size),
    }
    found = {}
    for k, (kind, img) in enumerate(pictures.items()):
        item = f"{classes[k % len(classes)]}/outlier-{kind}.png"
        img.save(root / item)
        found[item] = kind
    return found


def _screenshot(rng: np.random.Generator, size: int) -> Image.Image:
    """White page, a title bar and lines of random 'words': what a stray screenshot looks like."""
    img = Image.new("RGB", (size, size), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    draw.rectangle([0, 0, size, size // 10], fill=(60, 90, 160))
    letters = list("abcdefghijklmnopqrstuvwxyz   ")
    for y in range(size // 10 + 2, size - 8, 10):
        words = "".join(rng.choice(letters, 30))
        draw.text((2, y), words, fill=(20, 20, 20))
    return img


def move(root: Path, item: str, folder: str) -> str:
    """Move ``root/item`` into class folder ``folder``; returns the new id."""
    new = f"{folder}/{Path(item).name}"
    shutil.move(root / item, root / new)
    return new


def train_standin(path: Path, *, classes: int, per_class: int, seconds: float, seed: int = 0) -> dict[str, float]:
    """A torchvision ResNet-18 trained from scratch at 64 px on photo-like classes 100..100+classes (none of the
    benchmark's), for about ``seconds``; its state dict saved to ``path``. Returns what it reached."""
    import torch
    import torchvision
    from torch import nn

    torch.manual_seed(seed)
    mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    labels = np.arange(classes * per_class) % classes
    x = torch.stack([
        (torch.from_numpy(np.asarray(photo(i, 100 + int(c), size=64, seed=seed + 1), np.float32) / 255).permute(2, 0, 1)
         - mean) / std for i, c in enumerate(labels)
    ])  # fmt: skip
    y = torch.from_numpy(labels)
    held = (np.arange(len(y)) // classes) % 10 == 0  # a tenth of every class held out for the accuracy
    xt, yt, xv, yv = x[~held], y[~held], x[held], y[held]
    model = torchvision.models.resnet18(num_classes=classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    start, steps, epochs = time.perf_counter(), 0, 0
    while time.perf_counter() - start < seconds:
        model.train()
        for b in torch.randperm(len(yt)).split(64):
            batch = xt[b]
            flip = torch.rand(len(b)) < 0.5
            batch = torch.where(flip[:, None, None, None], batch.flip(3), batch)
            loss = nn.functional.cross_entropy(model(batch), yt[b])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
            if time.perf_counter() - start >= seconds:
                break
        epochs += 1
    trained = time.perf_counter() - start
    model.eval()
    with torch.inference_mode():
        accuracy = float((model(xv).argmax(1) == yv).float().mean())
    torch.save(model.state_dict(), path)
    return {"classes": classes, "images": int(len(yt)), "steps": steps, "epochs": epochs, "seconds": trained,
            "heldout_acc": accuracy}  # fmt: skip
