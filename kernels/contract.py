"""The op contract: the ops every backend implements, and the records that carry their scalars.

Every op works in place on lists of tensors (one entry per layer, all on one device and of one
dtype), so a model-level call is one op call per layer group. Stochastic ops take one integer
``key`` per tensor (:func:`~bio_transformations.kernels.philox.stream_key` of the layer seed,
its step counter and the op id) and draw element ``i``'s numbers at counter ``i``.

========================  ======  ==========================================================
op                        writes  formula (w weight, g grad, p rates)
========================  ======  ==========================================================
``fuzzy_scale_``          g       ``g *= p``
``crystallize_``          p       ``p[|g|/|w| < t or |g| > mean|w|] *= d``
``volume_scale_``         g       ``g *= |N(m, var*m)|``, ``m = lr*exp(-s*|w|/(|w|+1))``
``bio_step_``             g, p    volume, fuzzy, crystallize in that order, one pass
``rejuvenate_``           w       replace weak weights (see ``torch_backend.rejuvenate_``)
``rejuvenate_legacy_``    w       the original published rule
``rates_init_``           p       uniform / normal / lognormal / gamma / beta
``temporal_update_``      p       ``p = 1 + (p-1)*decay + noise*(2U-1)``
``weight_adaptive_``      p       ``1 + (2U-1)*nu*clamp(2 - |w|/(mean|w| + 1e-8), .5, 1.5)``
``activity_update_``      p       row-wise redraw scaled by unit activity
``dale_enforce_``         w       ``w = relu(w*sign)*sign``
========================  ======  ==========================================================
"""

from __future__ import annotations

import dataclasses

__all__ = ["OPS", "StepParams", "one_stage_ops"]

#: Every op's name, in the order both backend modules define them.
OPS = (
    "fuzzy_scale_",
    "crystallize_",
    "volume_scale_",
    "bio_step_",
    "rejuvenate_",
    "rejuvenate_legacy_",
    "rates_init_",
    "temporal_update_",
    "weight_adaptive_",
    "activity_update_",
    "dale_enforce_",
)


@dataclasses.dataclass(frozen=True)
class StepParams:
    """What ``bio_step_`` does and with which scalars: which stages run (volume scaling, fuzzy
    scaling, crystallization, in that order) and the config values they read."""

    volume: bool = False
    fuzzy: bool = False
    crystallize: bool = False
    base_lr: float = 0.1
    stability_factor: float = 2.0
    lr_variability: float = 0.2
    crystal_thresh: float = 4.5e-05
    dampening: float = 0.6

    @classmethod
    def from_config(cls, config, *, volume: bool, fuzzy: bool, crystallize: bool) -> "StepParams":
        """The stages asked for, with the scalars of a ``BioConfig``."""
        return cls(
            volume=bool(volume),
            fuzzy=bool(fuzzy),
            crystallize=bool(crystallize),
            base_lr=float(config.base_lr),
            stability_factor=float(config.stability_factor),
            lr_variability=float(config.lr_variability),
            crystal_thresh=float(config.crystal_thresh),
            dampening=float(config.dampening_factor),
        )

    @classmethod
    def crystallize_only(cls, crystal_thresh: float, dampening: float) -> "StepParams":
        """The ``crystallize_`` op as a one-stage step."""
        return cls(crystallize=True, crystal_thresh=crystal_thresh, dampening=dampening)

    @classmethod
    def volume_only(
        cls, base_lr: float, stability_factor: float, lr_variability: float
    ) -> "StepParams":
        """The ``volume_scale_`` op as a one-stage step."""
        return cls(
            volume=True,
            base_lr=base_lr,
            stability_factor=stability_factor,
            lr_variability=lr_variability,
        )

    @property
    def any(self) -> bool:
        """Whether any stage runs."""
        return self.volume or self.fuzzy or self.crystallize


def one_stage_ops(bio_step_):
    """``crystallize_`` and ``volume_scale_`` for a backend whose ``bio_step_`` fuses the stages:
    each is that step with one stage on, so the fused kernel (or loop) is written once."""

    def crystallize_(weights, grads, rates, crystal_thresh: float, dampening: float) -> None:
        """``mask = (|g|/|w| < crystal_thresh) | (|g| > mean|w|)``; ``p[mask] *= dampening``."""
        bio_step_(
            weights, grads, rates, None, StepParams.crystallize_only(crystal_thresh, dampening)
        )

    def volume_scale_(
        weights, grads, keys, base_lr: float, stability_factor: float, lr_variability: float,
        spans=None,
    ) -> None:  # fmt: skip
        """``g *= |N(m, lr_variability*m)|``, ``m = base_lr*exp(-stability_factor*|w|/(|w|+1))``;
        Philox: ``z = N(i)``, the normal of element ``i`` (docs: "Randomness")."""
        params = StepParams.volume_only(base_lr, stability_factor, lr_variability)
        bio_step_(weights, grads, None, keys, params, spans)

    return crystallize_, volume_scale_
