"""Every other classification model of torchvision's registry, cut with ``create_feature_extractor``.

Layers: ``penultimate``, the input of the model's last Linear (or Conv) layer: its pre-logits representation;
and, on CNNs, ``stage1`` … ``stage4``: the last feature map at stride 4, 8, 16 and 32 that everything after it
depends on (a cut of the traced graph), found by tracing the model on the meta device. A ViT also gives its
encoder's tokens, pooled as ``cls`` or ``mean``.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch
import torchvision
from torch import fx, nn
from torchvision.models import get_model_weights
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer

from pipeline.backbones import weights
from pipeline.backbones.base import Cut, Output, Preprocessing, choose_layer, choose_pool, from_transforms, scaled
from pipeline.config import ExtractConfig

PENULTIMATE = "penultimate"
STAGE_STRIDES = {f"stage{k}": 2 ** (k + 1) for k in range(1, 5)}  # stage1 … stage4: strides 4 … 32
_TOKEN_MODELS = (VisionTransformer,)  # their pre-logits come from tokens: encoder output (B, 1 + N, C)
_NO_STAGES = (VisionTransformer, SwinTransformer)  # transformers: no CNN stage maps (Swin's are (B, H, W, C))


def claims(arch: str) -> bool:
    return arch in names()


@functools.cache
def names() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


@dataclass(frozen=True)
class Graph:
    """Where a model can be cut: return-node names of ``create_feature_extractor`` for each layer."""

    nodes: dict[str, str]  # layer -> node name, penultimate first
    tokens: str | None  # a ViT's encoder output node (its normalised tokens)
    output: dict[str, str]  # layer -> map | vector


def layers(arch: str) -> tuple[str, ...]:
    return tuple(graph(arch).nodes)


def outputs(arch: str, layer: str) -> list[Output]:
    """What the cut at ``layer`` outputs: a map or the pre-logits vector, and a ViT's encoder tokens (class token
    first) beside its penultimate."""
    found = graph(arch)
    tokens = [Output("tokens", class_token=True, prefix=1)] if layer == PENULTIMATE and found.tokens else []
    return [Output(found.output[layer]), *tokens]


def preprocessing(arch: str, image_size: int | str) -> Preprocessing:
    """From the default weights' own ``transforms()``, scaled to ``image_size`` (auto: the weights' crop)."""
    return scaled(from_transforms(get_model_weights(arch).DEFAULT.transforms()), image_size)


def _model(arch: str, crop: int, device: str) -> nn.Module:
    """The architecture as its default weights build it (a ViT at their image size), weights not loaded."""
    kwargs = {"image_size": crop} if arch.startswith("vit_") else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # googlenet and inception_v3: their init's future default
        with torch.device(device):
            return torchvision.models.get_model(arch, weights=None, **kwargs)


@functools.cache
def graph(arch: str) -> Graph:
    """Trace ``arch`` on the meta device (no weights, no compute) and find its penultimate node and stages."""
    crop = get_model_weights(arch).DEFAULT.transforms().crop_size[0]
    try:
        model = _model(arch, crop, "meta").eval()
    except NotImplementedError:  # RegNet computes its widths with tensors as it is built
        model = _model(arch, crop, "cpu").eval().to("meta")
    _, names_ = get_graph_node_names(model)
    traced = create_feature_extractor(model, return_nodes=names_)
    order = [n for n in traced.graph.nodes if n.op in ("placeholder", "call_module", "call_function", "call_method")]
    name = {node: q for q, node in _output(traced).args[0].items()}
    shapes = traced(torch.empty(1, 3, crop, crop, device="meta"))
    weighted = (nn.Linear, nn.Conv2d)
    last = [n for n in order if n.op == "call_module" and isinstance(traced.get_submodule(n.target), weighted)][-1]
    penultimate = last.args[0]  # the input of the logits layer
    pen_shape = shapes[name[penultimate]].shape
    nodes = {PENULTIMATE: name[penultimate]}
    output = {PENULTIMATE: "vector" if len(pen_shape) == 2 else "map"}
    if not isinstance(model, _NO_STAGES):
        for layer, node in _stages(order, name, shapes, crop, upto=order.index(penultimate)).items():
            nodes[layer], output[layer] = node, "map"
    tokens = "encoder" if isinstance(model, _TOKEN_MODELS) else None
    return Graph(nodes, tokens, output)


def _output(traced: fx.GraphModule) -> fx.Node:
    return next(n for n in traced.graph.nodes if n.op == "output")


def _stages(order: list[fx.Node], name: dict[fx.Node, str], shapes: dict, crop: int, *, upto: int) -> dict[str, str]:
    """stageK: the last node at stride 2^(K+1) that every later node depends on through it alone."""
    index = {n: i for i, n in enumerate(order)}
    opened = [0] * (len(order) + 1)  # edges that jump over a node: it is then no cut of the graph
    for node in order:
        for source in node.all_input_nodes:
            if source in index and index[node] - index[source] > 1:
                opened[index[source] + 1] += 1
                opened[index[node]] -= 1
    found, jumping = {}, 0
    for i, node in enumerate(order[: upto + 1]):
        jumping += opened[i]
        value = shapes.get(name.get(node, ""))
        if jumping or not isinstance(value, torch.Tensor) or value.dim() != 4 or value.shape[2] != value.shape[3]:
            continue
        stride = 2 ** round(math.log2(crop / value.shape[3]))
        for layer, s in STAGE_STRIDES.items():
            if s == stride:
                found[layer] = name[node]
    return dict(sorted(found.items()))


class _Node(nn.Module):
    """``create_feature_extractor``'s graph, which returns a dict, as a module that returns its one tensor."""

    def __init__(self, model: nn.Module, node: str) -> None:
        super().__init__()
        self.graph = create_feature_extractor(model, return_nodes={node: "out"})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)["out"]


def build(cfg: ExtractConfig, seed: int) -> Cut:
    """The model cut at ``extract.layer`` with its weights, on the CPU; nothing past the cut is kept."""
    found = graph(cfg.arch)
    layer = choose_layer(cfg.layer, tuple(found.nodes), cfg.arch)
    cuts = outputs(cfg.arch, layer)
    chosen, pool = choose_pool(cfg.pool, cuts, f"{cfg.arch} {layer}")
    node = found.nodes[layer] if chosen == 0 else found.tokens
    crop = get_model_weights(cfg.arch).DEFAULT.transforms().crop_size[0]
    if cfg.weights == "imagenet":
        enum = get_model_weights(cfg.arch).DEFAULT
        weights.hub_checkpoint(enum.url)  # in the cache, or a clear error: the builder then loads it from there
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            body = _Node(torchvision.models.get_model(cfg.arch, weights=enum).eval(), node)
        info = weights.imagenet(f"{type(enum).__name__}.{enum.name}")
    else:
        torch.manual_seed(seed)  # `random` weights are a function of the seed
        model = _model(cfg.arch, crop, "cpu").eval()  # materialised: some buffers (Swin's) are in no state dict
        body = _Node(model, node)
        info = (
            weights.RANDOM
            if cfg.weights == "random"
            else weights.from_file(cfg.weights, model, body, target=f"{cfg.arch} {layer}")
        )
    return Cut(body, cuts[chosen], layer, pool, preprocessing(cfg.arch, cfg.image_size), info)
