"""Configuration of the bio mechanisms: :class:`BioConfig` and :class:`Distribution`.

``BioConfig`` is a ``NamedTuple`` with the same fields, order and defaults as the published
``pytorch_bio_transformations`` package. :func:`validate_config` checks
every value and raises :class:`BioConfigError`, which is both a ``ValueError`` and an
``AssertionError`` so code written against upstream's ``assert`` statements keeps working while
the checks survive ``python -O``.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Callable, NamedTuple

import torch.nn as nn

__all__ = ["BioConfig", "BioConfigError", "DEFAULT_BIO_CONFIG", "Distribution", "validate_config"]


class Distribution(str, Enum):
    """How the per-synapse fuzzy learning rates are drawn and updated."""

    BASELINE = "baseline"
    UNIFORM = "uniform"
    NORMAL = "normal"
    LOGNORMAL = "lognormal"
    GAMMA = "gamma"
    BETA = "beta"
    LAYER_ADAPTIVE = "layer_adaptive"
    WEIGHT_ADAPTIVE = "weight_adaptive"
    TEMPORAL = "temporal"
    ACTIVITY = "activity"


class BioConfig(NamedTuple):
    """All settings of the bio mechanisms (field order and defaults as upstream)."""

    weight_splitting_activation_function: Callable[..., Any] = nn.Identity()
    fuzzy_learning_rate_factor_nu: float = 0.16
    dampening_factor: float = 0.6
    crystal_thresh: float = 4.5e-05
    rejuvenation_parameter_dre: float = 8.0
    weight_splitting_Gamma: int = 0
    apply_dales_principle: bool = False
    base_lr: float = 0.1
    stability_factor: float = 2.0
    lr_variability: float = 0.2
    fuzzy_lr_distribution: Distribution = Distribution.UNIFORM
    fuzzy_lr_min: float = 0.5
    fuzzy_lr_max: float = 2.0
    fuzzy_lr_dynamic: bool = False
    fuzzy_lr_decay: float = 0.9995
    fuzzy_lr_update_freq: int = 100
    fuzzy_lr_layer_index: int = -1
    fuzzy_lr_total_layers: int = -1


DEFAULT_BIO_CONFIG = BioConfig()


class BioConfigError(ValueError, AssertionError):
    """A config value is out of range: a ``ValueError`` that is also an ``AssertionError``."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise BioConfigError(message)


def _msg(upstream_message: str, value: Any) -> str:
    """Upstream's exact message (so ``match=`` patterns keep working), then the bad value."""
    return f"{upstream_message} (got {value!r})"


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def validate_config(config: BioConfig) -> BioConfig:
    """Check every field of ``config``; return it (with the distribution coerced to the enum).

    Raises:
        BioConfigError: with upstream's message for upstream's checks, and a message naming the
            field and the bad value for the checks this project adds.
    """
    if not isinstance(config, BioConfig):
        raise TypeError(f"config must be a BioConfig, got {type(config).__name__}")
    c = config
    for name in (
        "fuzzy_learning_rate_factor_nu",
        "dampening_factor",
        "crystal_thresh",
        "rejuvenation_parameter_dre",
        "base_lr",
        "stability_factor",
        "lr_variability",
        "fuzzy_lr_min",
        "fuzzy_lr_max",
        "fuzzy_lr_decay",
    ):
        value = getattr(c, name)
        _check(_is_number(value), f"{name} must be a number, got {value!r}")
    _check(
        c.fuzzy_learning_rate_factor_nu > 0,
        _msg("fuzzy_learning_rate_factor_nu must be positive", c.fuzzy_learning_rate_factor_nu),
    )
    _check(
        0 < c.dampening_factor < 1,  # upstream's range: 0 would zero every rate for ever
        _msg("dampening_factor must be between 0 and 1", c.dampening_factor),
    )
    _check(c.crystal_thresh > 0, _msg("crystal_thresh must be positive", c.crystal_thresh))
    _check(
        c.rejuvenation_parameter_dre > 0,
        _msg("rejuvenation_parameter_dre must be positive", c.rejuvenation_parameter_dre),
    )
    _check(
        isinstance(c.weight_splitting_Gamma, int)
        and not isinstance(c.weight_splitting_Gamma, bool),
        f"weight_splitting_Gamma must be an int, got {c.weight_splitting_Gamma!r}",
    )
    _check(
        c.weight_splitting_Gamma >= 0,
        _msg("weight_splitting_Gamma cannot be negative", c.weight_splitting_Gamma),
    )
    _check(
        callable(c.weight_splitting_activation_function),
        _msg(
            "weight_splitting_activation_function must be Callable",
            c.weight_splitting_activation_function,
        ),
    )
    _check(0 < c.base_lr < 1, _msg("base_lr must be between 0 and 1", c.base_lr))
    _check(c.stability_factor > 0, _msg("stability_factor must be positive", c.stability_factor))
    _check(c.lr_variability > 0, _msg("lr_variability must be positive", c.lr_variability))
    try:
        distribution = Distribution(c.fuzzy_lr_distribution)
    except ValueError:
        valid = ", ".join(d.value for d in Distribution)
        raise BioConfigError(
            f"fuzzy_lr_distribution must be one of {valid}; got {c.fuzzy_lr_distribution!r}"
        ) from None
    _check(
        c.fuzzy_lr_min <= c.fuzzy_lr_max,
        f"fuzzy_lr_min must be <= fuzzy_lr_max, got {c.fuzzy_lr_min} > {c.fuzzy_lr_max}",
    )
    _check(
        isinstance(c.fuzzy_lr_update_freq, int)
        and not isinstance(c.fuzzy_lr_update_freq, bool)
        and c.fuzzy_lr_update_freq > 0,
        f"fuzzy_lr_update_freq must be a positive int, got {c.fuzzy_lr_update_freq!r}",
    )
    _check(
        0 < c.fuzzy_lr_decay <= 1,
        f"fuzzy_lr_decay must be in (0, 1], got {c.fuzzy_lr_decay!r}",
    )
    if distribution is not c.fuzzy_lr_distribution:
        c = c._replace(fuzzy_lr_distribution=distribution)
    return c
