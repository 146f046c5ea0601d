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
from .contract import StepParams, one_stage_ops
from .rng import normal
from .stats import abs_means, current_reduction, grads_nonzero
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


def _step_core(w, g, p, z, mean_aw, nonzero, params: StepParams):
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
        # nonzero: stats.grads_nonzero, an all-zero gradient crystallizes nothing (as eager)
        mask = ((ag < w.abs() * params.crystal_thresh) | (ag > mean_aw)) & (nonzero > 0)
        p.copy_(torch.where(mask, p * params.dampening, p))  # p*d in p's own dtype, as eager


def _compiled():
    """The one compiled function of this path: :func:`_step_core` on flat tensors with dynamic
    shapes, so every layer size shares one graph per set of stages and scalars (no recompiles
    per layer or group shape). Inductor's FX graph cache (on by default, on disk) lets a second
    process skip the C++ compile; dynamo still traces once per process."""
    if _state["compiled"] is None:
        _state["compiled"] = torch.compile(_step_core, dynamic=True, fullgraph=True)
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
    sharded group run the eager ops, which draw along the global index and reduce the
    statistics of the whole list over the shard group)."""
    if spans is not None or current_reduction() is not None:
        return torch_backend.bio_step_(weights, grads, rates, keys, params, spans)
    layers = [i for i, w in enumerate(weights) if w.numel()]
    if not layers or not params.any:
        return
    uses_rates = params.fuzzy or params.crystallize
    flat, other = [], []
    for i in layers:
        parts = (weights[i], grads[i]) + ((rates[i],) if uses_rates else ())
        (flat if all(t.is_contiguous() for t in parts) else other).append(i)
    means = abs_means([weights[i] for i in flat]) if params.crystallize else [None] * len(flat)
    # Read before the compiled step scales the gradients, as the eager step does.
    gates = grads_nonzero([grads[i] for i in flat]) if params.crystallize else [None] * len(flat)
    step = _compiled()
    # One graph per set of stages and scalars (each separate op, the fused step): allow more
    # than dynamo's default 8 before it would silently run the function uncompiled.
    config = torch._dynamo.config  # torch >= 2.6 calls it recompile_limit
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    with config.patch(**{limit: 64}):
        _run_layers(step, flat, means, gates, weights, grads, rates, keys, params, uses_rates)
    if other:  # strided layouts: the torch backend's op
        torch_backend.bio_step_(
            [weights[i] for i in other], [grads[i] for i in other],
            [rates[i] for i in other] if uses_rates else None,
            [keys[i] for i in other] if params.volume else None, params,
        )  # fmt: skip


def _run_layers(step, flat, means, gates, weights, grads, rates, keys, params, uses_rates):
    for i, mean, gate in zip(flat, means, gates):
        w, g = weights[i].view(-1), grads[i].view(-1)
        p = rates[i].view(-1) if uses_rates else None
        # The random numbers come from the eager generator: the stream stays the same.
        z = normal(keys[i], w.numel(), w.device) if params.volume else None
        step(w, g, p, z, mean, gate, params)


# The one-stage ops are this fused step with one stage on.
crystallize_, volume_scale_ = one_stage_ops(bio_step_)
