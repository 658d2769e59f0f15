from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn

from pipeline import heads
from pipeline.errors import PipelineError


def blobs(n: int = 300, dim: int = 16, classes: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs far apart, offset and scaled so that standardisation matters."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    centers = torch.randn(classes, dim, generator=g) * 4
    return 50 + 10 * (centers[y] + torch.randn(n, dim, generator=g)), y


def test_mlp_follows_the_vgg_recipe_shape():
    net = heads.build_net("mlp", 512, 10, hidden=[256, 128], dropout=0.5)
    kinds = [type(m) for m in net]
    assert kinds == [nn.Linear, nn.ReLU, nn.Dropout] * 2 + [nn.Linear]
    assert net[0].in_features == 512 and net[-1].out_features == 10


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_torch_heads_learn_separable_features(kind: str):
    torch.manual_seed(0)
    x, y = blobs()
    mean, std = heads.standardization([(x, y)], 16, True)
    model = heads.Classifier(heads.build_net(kind, 16, 3, hidden=[32], dropout=0.1), mean, std)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.8)
    criterion = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    first = heads.train_one_epoch(model, criterion, optimizer, x, y, batch_size=32, generator=g)
    for _ in range(5):
        last = heads.train_one_epoch(model, criterion, optimizer, x, y, batch_size=32, generator=g)
    assert last[0] < first[0]
    loss, acc = heads.evaluate(model, criterion, x, y, batch_size=64)
    assert acc > 0.95 and loss == pytest.approx(criterion(heads.predict_logits(model, x), y).item())


def test_the_validation_loss_and_accuracy_take_a_block_of_rows_at_a_time():
    """Regression: the whole (N, C) logits and their loss were made at once, 5.9 GB of peak memory in train at
    25,000 rows of 25,000 classes."""
    torch.manual_seed(0)
    x, y = blobs(n=300, classes=7)
    model = heads.Classifier(heads.build_net("linear", 16, 7, hidden=[], dropout=0.0), x.mean(0), x.std(0))
    rows = []
    criterion = nn.CrossEntropyLoss()
    criterion.register_forward_hook(lambda _module, args, _out: rows.append(len(args[0])))  # the logits it takes
    loss, acc = heads.evaluate(model, criterion, x, y, batch_size=64)
    assert max(rows) == 64
    with torch.inference_mode():
        logits = model(x)
    assert loss == pytest.approx(criterion(logits, y).item(), rel=1e-6)
    assert acc == (logits.argmax(1) == y).float().mean().item()


def test_standardization_over_blocks_matches_the_whole_and_keeps_constant_features_finite():
    x = torch.tensor([[1.0, 5.0], [3.0, 5.0], [8.0, 5.0]])
    mean, std = heads.standardization([(x[:1], None), (x[1:], None)], 2, True)
    torch.testing.assert_close(mean, x.mean(0))
    torch.testing.assert_close(std, torch.tensor([x[:, 0].std().item(), 1.0]))
    assert torch.equal(heads.standardization([(x, None)], 2, False)[1], torch.ones(2))


@pytest.mark.parametrize("classes", [2, 3])
def test_logreg_is_scikit_learn_stored_as_a_linear_layer(classes: int):
    x, y = blobs(classes=classes)
    x = ((x - x.mean(0)) / x.std(0)).numpy()
    layer, C, curves = heads.fit_logreg(
        x[:200], y[:200].numpy(), x[200:], y[200:].numpy(), Cs=[0.01, 1.0], num_classes=classes
    )
    assert [set(c) for c in curves] == [{"train/loss", "train/acc", "val/loss", "val/acc"}] * 2
    assert [0.01, 1.0][int(curves[1]["val/acc"] > curves[0]["val/acc"])] == C
    reference = LogisticRegression(C=C, max_iter=1000).fit(x[:200], y[:200].numpy())
    assert curves[[0.01, 1.0].index(C)]["val/acc"] == reference.score(x[200:], y[200:].numpy())
    with torch.no_grad():
        probs = torch.softmax(layer(torch.from_numpy(x[200:])), 1).numpy()
    np.testing.assert_allclose(probs, reference.predict_proba(x[200:]), atol=1e-5)


def test_head_file_round_trips_with_weights_only(tmp_path: Path):
    x, y = blobs()
    mean, std = heads.standardization([(x, y)], 16, True)
    model = heads.Classifier(heads.build_net("mlp", 16, 3, hidden=[8], dropout=0.5), mean, std).eval()
    spec = {
        "head": "mlp",
        "in_dim": 16,
        "num_classes": 3,
        "hidden": [8],
        "dropout": 0.5,
        "provenance": {"arch": "vgg16"},
    }
    heads.save_head(tmp_path / "head.pt", model, spec)
    assert torch.load(tmp_path / "head.pt", weights_only=True)["spec"] == spec  # plain data only
    loaded, loaded_spec = heads.load_head(tmp_path / "head.pt")
    assert loaded_spec == spec
    torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "foreign"])
def test_damaged_head_files_are_clear_errors(tmp_path: Path, damage: str):
    path = tmp_path / "head.pt"
    model = heads.Classifier(nn.Linear(4, 2), torch.zeros(4), torch.ones(4))
    spec = {"head": "linear", "in_dim": 4, "num_classes": 2, "hidden": [], "dropout": 0.0, "provenance": {}}
    heads.save_head(path, model, spec)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 64)
    else:
        torch.save({"state_dict": {}, "spec": spec}, path)
    with pytest.raises(PipelineError, match="is not a head file of this pipeline"):
        heads.load_head(path)
