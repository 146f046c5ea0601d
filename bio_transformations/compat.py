"""Compatibility with the published package's private helpers.

Code and tests written against ``pytorch_bio_transformations`` 0.0.5 call a few of its
underscore methods directly. They live here, in one place, as thin aliases over this
package's own implementation, with upstream's semantics:

* ``BioConverter._count_learnable_layers(model)``: the number of convertible layers;
* ``BioConverter._set_layer_indices(model)``: for ``LAYER_ADAPTIVE``, store each converted
  layer's index and the total in its config (``fuzzy_lr_layer_index``,
  ``fuzzy_lr_total_layers``); the converter already does this *before* drawing the rates;
* ``BioModule._initialize_fuzzy_learning_rate_parameters()``: redraw the initial rates;
* ``BioModule._update_weight_adaptive_rates()``: the weight-adaptive fill
  ``1 + (2U-1)*nu*clamp(2 - |w|/(mean|w| + 1e-8), 0.5, 1.5)``;
* ``BioModule.weight_adaptive_initialized``: whether that fill has happened; setting it False
  makes the next ``update_fuzzy_learning_rates()`` fill again, which sets it back to True.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import ops
from .bio_config import Distribution
from .layers import is_convertible

__all__ = ["BioModuleCompat", "ConverterCompat"]


class ConverterCompat:
    """Upstream's private ``BioConverter`` helpers (mixed into ``BioConverter``)."""

    def _count_learnable_layers(self, model: nn.Module) -> int:
        """The number of layers of ``model`` the converter converts (Linear, Conv, ...)."""
        return sum(1 for m in model.modules() if is_convertible(m))

    def _set_layer_indices(self, model: nn.Module) -> None:
        """With ``LAYER_ADAPTIVE``, give every converted layer its index among the model's
        convertible layers and their total (in its config); otherwise do nothing."""
        if self.config.fuzzy_lr_distribution is not Distribution.LAYER_ADAPTIVE:
            return
        layers = [m for m in model.modules() if is_convertible(m)]
        for index, layer in enumerate(layers):
            bio = getattr(layer, "bio_mod", None)
            if bio is not None:
                bio.config = bio.config._replace(
                    fuzzy_lr_layer_index=index, fuzzy_lr_total_layers=len(layers)
                )


class BioModuleCompat:
    """Upstream's private ``BioModule`` helpers (mixed into ``BioModule``)."""

    def _initialize_fuzzy_learning_rate_parameters(self) -> None:
        """Redraw the initial rates from the configured distribution (a fresh draw)."""
        self._init_rates()

    @torch.no_grad()
    def _update_weight_adaptive_rates(self) -> None:
        """Fill the rates from the weights now (whatever the distribution, as upstream)."""
        c = self.config
        fill_now = torch.zeros((), dtype=torch.int64)  # "not filled yet": the op fills
        ops.weight_adaptive_step_(
            [self.fuzzy_learning_rate_parameters], [self._weight()],
            [torch.zeros((), dtype=torch.int64)], [fill_now], [self._rng_step],
            [self.layer_seed], c.fuzzy_lr_update_freq, False,
            c.fuzzy_learning_rate_factor_nu, c.fuzzy_lr_min, c.fuzzy_lr_max,
        )  # fmt: skip
        self._rates_filled = True

    @property
    def weight_adaptive_initialized(self) -> bool:
        """Whether the weight-adaptive rates were filled (False: the next update fills them)."""
        return self._rates_filled

    @weight_adaptive_initialized.setter
    def weight_adaptive_initialized(self, value: bool) -> None:
        self._rates_filled = bool(value)
