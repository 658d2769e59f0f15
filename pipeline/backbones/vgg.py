"""torchvision's VGGs, cut by a table of layers: pool1 … pool5 (block outputs), fc6, fc7.

Only the layers up to the cut are ever materialised (a pool5 extractor holds 15M parameters, not VGG16's 138M),
and ``random`` weights initialise the cut as torchvision initialises a VGG.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn
from torchvision.models import VGG, get_model_weights

from pipeline.backbones import weights
from pipeline.backbones.base import Cut, Output, Preprocessing, choose_layer, choose_pool, from_transforms, scaled
from pipeline.config import ExtractConfig

ARCHS = ("vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn")
LAYERS = ("pool5", "pool1", "pool2", "pool3", "pool4", "fc6", "fc7")  # the first is the default
_FC_DEPTH = {"fc6": 2, "fc7": 5}  # classifier[:n]: Linear, ReLU (fc6) | + Dropout, Linear, ReLU (fc7)


def claims(arch: str) -> bool:
    return arch in ARCHS


def names() -> list[str]:
    return list(ARCHS)


def layers(arch: str) -> tuple[str, ...]:
    return LAYERS


def outputs(arch: str, layer: str) -> list[Output]:
    """What the cut at ``layer`` outputs: a map at a pool, a vector at fc6 and fc7."""
    return [Output("vector" if layer in _FC_DEPTH else "map")]


def preprocessing(arch: str, image_size: int | str) -> Preprocessing:
    """From the arch's ImageNet weights meta, scaled to ``image_size`` (auto: the weights' own 224)."""
    return scaled(from_transforms(get_model_weights(arch).IMAGENET1K_V1.transforms()), image_size)


def cut(model: VGG, layer: str) -> nn.Sequential:
    """The part of ``model`` up to and including ``layer``; nothing after it is kept or computed."""
    if layer in _FC_DEPTH:
        return nn.Sequential(model.features, model.avgpool, nn.Flatten(1), *model.classifier[: _FC_DEPTH[layer]])
    pools = [i for i, m in enumerate(model.features) if isinstance(m, nn.MaxPool2d)]
    return model.features[: pools[int(layer.removeprefix("pool")) - 1] + 1]


def init_random(body: nn.Module) -> None:
    """Initialise the cut network as torchvision initialises VGG: Kaiming-normal convolutions, N(0, 0.01)
    linear layers, zero biases, identity batch norm. Draws from torch's global generator, seeded by the caller."""
    for m in body.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_parameters()
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def build(cfg: ExtractConfig, seed: int) -> Cut:
    """The VGG cut at ``extract.layer``, with its weights, on the CPU: only the cut is ever materialised."""
    layer = choose_layer(cfg.layer, LAYERS, cfg.arch)
    [output] = outputs(cfg.arch, layer)
    _, pool = choose_pool(cfg.pool, [output], f"{cfg.arch} {layer}")
    with torch.device("meta"):
        model = torchvision.models.get_model(cfg.arch, weights=None)
    body = cut(model, layer).to_empty(device="cpu")
    if cfg.weights == "random":
        torch.manual_seed(seed)  # `random` weights are a function of the seed
        init_random(body)
        info = weights.RANDOM
    elif cfg.weights == "imagenet":
        enum = get_model_weights(cfg.arch).IMAGENET1K_V1
        state = weights.read_state(weights.hub_checkpoint(enum.url))
        weights.load(model, weights.needed(model, body), state, source=enum.url, target=cfg.arch)
        info = weights.imagenet(f"{type(enum).__name__}.{enum.name}")
    else:
        info = weights.from_file(cfg.weights, model, body, target=f"{cfg.arch} {layer}")
    return Cut(body, output, layer, pool, preprocessing(cfg.arch, cfg.image_size), info)
