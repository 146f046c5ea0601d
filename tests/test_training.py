"""Convert a ResNet-like conv net and an MLP and train a few steps with every mechanism on."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from bio_transformations import BioConverter, Distribution


class Block(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


class TinyResNet(nn.Module):
    def __init__(self, classes=4):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.blocks = nn.Sequential(Block(8), Block(8))
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        x = self.blocks(F.relu(self.stem(x)))
        return self.head(x.mean((2, 3)))


def mlp():
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )


def data(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > 0).long() + 2 * (x[:, 0, 4:].mean((1, 2)) > 0).long()
    return x, y


@pytest.mark.parametrize("make_model", [TinyResNet, mlp], ids=["resnet", "mlp"])
@pytest.mark.parametrize(
    "dist",
    [
        Distribution.UNIFORM,
        Distribution.TEMPORAL,
        Distribution.WEIGHT_ADAPTIVE,
        Distribution.ACTIVITY,
    ],
)
def test_training_with_every_mechanism(make_model, dist):
    torch.manual_seed(0)
    model = BioConverter(
        fuzzy_lr_distribution=dist,
        fuzzy_lr_dynamic=True,
        fuzzy_lr_update_freq=2,
        weight_splitting_Gamma=2,
        apply_dales_principle=True,
    )(make_model())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = data()
    losses = []
    for step in range(8):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        model.volume_dependent_lr()
        model.fuzzy_learning_rates()
        model.crystallize()
        model.update_fuzzy_learning_rates()
        optimizer.step()
        model.enforce_dales_principle()
        if step % 4 == 3:
            model.rejuvenate_weights()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[-4:]) < losses[0]
    for module in model.modules():
        bio = getattr(module, "bio_mod", None)
        if bio is not None:
            p = bio.fuzzy_learning_rate_parameters
            # crystallize dampens rates below fuzzy_lr_min on purpose (no clamp, as upstream)
            assert ((p > 0) & (p <= 2.0)).all()
            assert torch.isfinite(module.weight).all()
