"""The experiment's networks and the variants (which bio mechanisms a run uses).

Layers are direct children (not an ``nn.Sequential``) so that
``BioConverter.set_last_module_token_for_model`` finds and marks the output layer, which then
gets neither weight splitting nor Dale's principle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from bio_transformations import BioConverter, Distribution

__all__ = [
    "CNN",
    "DEFAULT_VARIANTS",
    "FCNet",
    "MODELS",
    "VARIANTS",
    "Variant",
    "build_model",
]

MODELS = ("fcnet", "cnn")


class FCNet(nn.Module):
    """The paper's fully connected net: one hidden ReLU layer (1,000 units for MNIST)."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 1000):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class CNN(nn.Module):
    """Three small conv layers and a linear read-out, 1-D for signals (MNIST-1D, ``(C, L)``
    samples) and 2-D for images (``(C, H, W)``). Channel counts are even, so Gamma=2 weight
    splitting divides them."""

    def __init__(self, sample_shape: tuple[int, ...], num_classes: int, width: int = 32):
        super().__init__()
        conv = nn.Conv1d if len(sample_shape) == 2 else nn.Conv2d
        self.spatial_dims = len(sample_shape) - 1
        self.conv1 = conv(sample_shape[0], width, 5, padding=2)
        self.conv2 = conv(width, width, 3, stride=2, padding=1)
        self.conv3 = conv(width, width, 3, stride=2, padding=1)
        self.pool_size = (4,) * self.spatial_dims
        self.fc = nn.Linear(width * 4**self.spatial_dims, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        pool = F.adaptive_avg_pool1d if self.spatial_dims == 1 else F.adaptive_avg_pool2d
        return self.fc(pool(x, self.pool_size).flatten(1))


@dataclass(frozen=True)
class Variant:
    """Which bio mechanisms one run uses (``training.attach_mechanisms`` attaches them).

    Attributes:
        convert: Convert the model with a ``BioConverter`` at all (False: plain baseline).
        fuzzy: ``fuzzy_learning_rates()`` (``g *= p``) every step.
        crystal: ``crystallize()`` every step (it damps the rates, so it acts through fuzzy).
        rejuv: ``rejuvenate_weights()`` once per epoch, after the optimiser step.
        volume: ``volume_dependent_lr()`` every step, first.
        split: Weight-splitting Gamma (0: none).
        dale: Dale's principle: signed initialisation and ``enforce_dales_principle()`` after
            every optimiser step.
        activity: Activity-dependent rates (``Distribution.ACTIVITY``, dynamic), updated in the
            forward pass and by ``update_fuzzy_learning_rates()``.
    """

    convert: bool = True
    fuzzy: bool = False
    crystal: bool = False
    rejuv: bool = False
    volume: bool = False
    split: int = 0
    dale: bool = False
    activity: bool = False

    def converter(self) -> BioConverter:
        """The converter of this variant (package defaults for everything not named here)."""
        settings: dict = {"weight_splitting_Gamma": self.split}
        if self.dale:
            settings["apply_dales_principle"] = True
        if self.activity:
            settings.update(fuzzy_lr_distribution=Distribution.ACTIVITY, fuzzy_lr_dynamic=True)
        return BioConverter(**settings)

    @property
    def scales_gradient(self) -> bool:
        """Whether the shared update differs from the plain gradient by per-weight factors."""
        return self.fuzzy or self.volume


VARIANTS: dict[str, Variant] = {
    "baseline": Variant(convert=False),
    "fuzzy": Variant(fuzzy=True),
    "crystal": Variant(fuzzy=True, crystal=True),
    "rejuv": Variant(rejuv=True),
    "volume": Variant(volume=True),
    "split2": Variant(split=2),
    "all": Variant(fuzzy=True, crystal=True, rejuv=True, volume=True, split=2),
    # Options, not in the default list.
    "dale": Variant(dale=True),
    "activity": Variant(fuzzy=True, activity=True),
}

#: The variants a default run trains and attacks.
DEFAULT_VARIANTS = ("baseline", "fuzzy", "crystal", "rejuv", "volume", "split2", "all")


def build_model(
    name: str, sample_shape: tuple[int, ...], num_classes: int, variant: Variant, seed: int
) -> nn.Module:
    """Build (and, for bio variants, convert) a model with seed-determined initial weights.

    The weights are drawn right after seeding, before any conversion, so every variant of one
    seed starts from the same weights (Dale's principle then flips signs); conversion draws the
    rates and layer seeds afterwards, also from this seed.
    """
    torch.manual_seed(seed)
    model: nn.Module
    if name == "fcnet":
        n_in = 1
        for d in sample_shape:
            n_in *= d
        model = FCNet(n_in, num_classes)
    elif name == "cnn":
        model = CNN(sample_shape, num_classes)
    else:  # guarded by the CLI; kept for direct callers
        raise ValueError(f"unknown model {name!r}; valid choices: {', '.join(MODELS)}")
    if not variant.convert:
        return model
    return variant.converter()(model)
