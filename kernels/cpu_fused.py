"""The opt-in compiled CPU path (``BIO_CPU_FUSED=1``): crystallize, volume scaling and the fused
bio step as one loop per layer group, compiled by ``torch.compile`` (Inductor's C++ backend).

Every other op is the torch backend's. The random numbers come from the same eager draws as
the torch backend, so the stream is unchanged; the arithmetic follows the eager ops' order and
equals them bit for bit (within an ulp where ``exp`` is involved). The first call compiles
(seconds, and it needs a C++ compiler); if compiling or running fails, one warning is given and
the torch backend's ops run from then on (:func:`usable` turns False, and the dispatcher
reports ``"torch"``).
"""

from __future__ import annotations

import functools
import warnings
from typing import Optional, Sequence

import torch

from . import torch_backend
from .contract import StepParams
from .rng import normal
from .stats import abs_means
from .torch_backend import (  # noqa: F401  (the ops this path does not change)
    activity_update_,
    dale_enforce_,
    fuzzy_scale_,
    rates_init_,
    rejuvenate_,
    rejuvenate_legacy_,
    temporal_update_,
    weight_adaptive_,
)

Tensor = torch.Tensor
Tensors = Sequence[Tensor]

#: Dtypes the compiled loop handles (half types use the torch backend).
DTYPES = (torch.float32, torch.float64)

_state = {"broken": False, "compiled": None}


def usable() -> bool:
    """False once compiling or running the fused loop has failed in this process."""
    return not _state["broken"]


def _step_core(w, g, p, z, mean_aw, params: StepParams):
    """One layer's volume / fuzzy / crystallize as plain tensor math in the eager ops' order."""
    grad = g
    if params.volume:
        aw = w.abs()
        m = params.base_lr * torch.exp(-params.stability_factor * (aw / (aw + 1.0)))
        grad = grad * (torch.abs(1.0 + params.lr_variability * z) * m)
    if params.fuzzy:
        grad = grad * p
    if params.volume or params.fuzzy:
        g.copy_(grad)
    if params.crystallize:
        ag = grad.abs()
        mask = (ag < w.abs() * params.crystal_thresh) | (ag > mean_aw)
        p.copy_(p * torch.where(mask, params.dampening, 1.0))


def _step_core_many(ws, gs, ps, zs, means, params: StepParams):
    """:func:`_step_core` over a group of layers: one compiled call for the whole group, since
    per-call overhead dominates for many small layers."""
    for w, g, p, z, mean_aw in zip(ws, gs, ps, zs, means):
        _step_core(w, g, p, z, mean_aw, params)


def _compiled():
    if _state["compiled"] is None:
        _state["compiled"] = torch.compile(_step_core_many, dynamic=True, fullgraph=True)
    return _state["compiled"]


def _or_eager(eager):
    """Run the fused loop; after a failure (one warning) run the torch backend's ``eager`` op."""

    def decorate(fused):
        @functools.wraps(fused)
        def run(*args, **kwargs):
            if not _state["broken"]:
                try:
                    return fused(*args, **kwargs)
                except Exception as exc:  # no compiler, unsupported platform, ...: keep training
                    _state["broken"] = True
                    warnings.warn(
                        f"BIO_CPU_FUSED: the fused CPU step failed ({exc!r}); using the torch "
                        "backend's eager ops from now on",
                        RuntimeWarning,
                        stacklevel=2,
                    )
            return eager(*args, **kwargs)

        return run

    return decorate


@_or_eager(torch_backend.bio_step_)
def bio_step_(
    weights: Tensors,
    grads: Tensors,
    rates: Optional[Tensors],
    keys: Optional[Sequence[int]],
    params: StepParams,
    spans=None,
) -> None:
    """``torch_backend.bio_step_`` as one compiled loop per layer group (local shards of a
    sharded group run the eager ops, which draw along the global index)."""
    if spans is not None:
        return torch_backend.bio_step_(weights, grads, rates, keys, params, spans)
    layers = [i for i, w in enumerate(weights) if w.numel()]
    if not layers or not params.any:
        return
    ws = [weights[i] for i in layers]
    gs = [grads[i] for i in layers]
    none = [None] * len(ws)  # operands a stage that does not run never reads
    ps = [rates[i] for i in layers] if params.fuzzy or params.crystallize else none
    # The random numbers come from the eager generator: the stream stays the same.
    zs = none
    if params.volume:
        zs = [normal(keys[i], w.numel(), w.device).view(w.shape) for i, w in zip(layers, ws)]
    means = abs_means(ws) if params.crystallize else none
    # One compile per group shape (layer count, flags): allow more than dynamo's default 8
    # recompiles for this function, or it would silently fall back to unfused eager code.
    config = torch._dynamo.config  # torch >= 2.6 calls it recompile_limit
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    with config.patch(**{limit: 512}):
        _compiled()(ws, gs, ps, zs, means, params)


def crystallize_(
    weights: Tensors, grads: Tensors, rates: Tensors, crystal_thresh: float, dampening: float
) -> None:
    """``torch_backend.crystallize_`` as one compiled loop per layer group."""
    params = StepParams(crystallize=True, crystal_thresh=crystal_thresh, dampening=dampening)
    bio_step_(weights, grads, rates, None, params)


def volume_scale_(
    weights: Tensors,
    grads: Tensors,
    keys: Sequence[int],
    base_lr: float,
    stability_factor: float,
    lr_variability: float,
    spans=None,
) -> None:
    """``torch_backend.volume_scale_`` as one compiled loop per layer group."""
    params = StepParams(
        volume=True, base_lr=base_lr, stability_factor=stability_factor,
        lr_variability=lr_variability,
    )  # fmt: skip
    bio_step_(weights, grads, None, keys, params, spans)
