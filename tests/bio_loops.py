"""The hand-written training loop that ``attach()`` and the framework callbacks must equal:
the model-level methods called around ``optimizer.step()`` in the documented order."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from bio_transformations import BioConverter, Distribution
from bio_transformations.bio_module import EXTRA_STATE_FIELDS

# Every mechanism that runs around a step does something observable here: TEMPORAL rates
# updated every step, Dale's principle on, crystallization with a threshold that fires.
CONFIG = dict(
    fuzzy_learning_rate_factor_nu=0.3,
    fuzzy_lr_distribution=Distribution.TEMPORAL,
    fuzzy_lr_dynamic=True,
    fuzzy_lr_update_freq=1,
    apply_dales_principle=True,
    crystal_thresh=1e-2,
)
_STEPS = EXTRA_STATE_FIELDS.index("optimizer_steps")
assert _STEPS == len(EXTRA_STATE_FIELDS) - 1  # the fields compared without it come first


def make_net(seed: int = 0, **config) -> nn.Module:
    """A small converted MLP, identical for the same seed."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    return BioConverter(**{**CONFIG, **config})(net)


def batches(n: int, seed: int = 1, size: int = 4):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 6, generator=g), torch.randn(size, 3, generator=g)) for _ in range(n)
    ]


def bio_before_step(model: nn.Module, volume: bool = False) -> None:
    if volume:
        model.volume_dependent_lr()
    model.fuzzy_learning_rates()
    model.crystallize()
    model.update_fuzzy_learning_rates()


def bio_after_step(model: nn.Module, step: int, rejuvenate_every: int, dales: bool) -> None:
    """``step`` counts from 1: rejuvenation after every ``rejuvenate_every``-th step."""
    if dales:
        model.enforce_dales_principle()
    if rejuvenate_every and step % rejuvenate_every == 0:
        model.rejuvenate_weights()


def assert_same_state(a: nn.Module, b: nn.Module, optimizer_steps: bool = False) -> None:
    """Every state-dict tensor (weights, rates, signs, seeds and counters) equal bit for bit;
    the optimizer step count too when ``optimizer_steps`` (the hand-written loop has none)."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        x, y = sa[key], sb[key]
        if key.endswith("_extra_state") and not optimizer_steps:
            x, y = x[:_STEPS], y[:_STEPS]
        assert torch.equal(x, y), key


def twin(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
