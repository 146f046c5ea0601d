"""The hot ops as PyTorch custom ops (``torch.library``), so ``torch.compile`` sees them whole.

Each op dispatches at run time to the backend chosen for its tensors' device
(``kernels.backend_module``) and has a fake implementation for tracing, so a function calling
the model-level methods compiles with ``fullgraph=True``. The stochastic ops take each layer's
step counter (a CPU int64 scalar tensor, advanced here) and seed instead of a ready key: the
key is derived inside the op, so compiled code neither bakes it in nor recompiles per step.

Outside ``torch.compile`` the same implementation is called directly: the custom-op dispatch
costs more than a memory-bound op like ``g *= p`` on a large CPU tensor.
"""

from typing import List

import torch
from torch import Tensor

from . import kernels
from .kernels import philox

__all__ = [
    "activity_step_",
    "bio_step_",
    "crystallize_",
    "dale_enforce_",
    "fuzzy_scale_",
    "rejuvenate_",
    "rejuvenate_legacy_",
    "volume_scale_",
]

_NS = "bio_transformations"


def backend_of(t: Tensor):
    """The backend module that runs ops on ``t``'s device (``kernels.backend_module``)."""
    return kernels.backend_module(t.device)


def draw_keys(steps: List[Tensor], seeds: List[int], op_id: int) -> List[int]:
    """One stream key per layer from (seed, step, op id); advances each CPU step counter."""
    keys = []
    for step, seed in zip(steps, seeds):
        n = int(step)  # a CPU scalar: no device sync
        keys.append(philox.stream_key(seed, n, op_id))
        step.fill_(n + 1)
    return keys


def _fuzzy_scale_impl(grads: List[Tensor], rates: List[Tensor]) -> None:
    """``g *= p``."""
    if grads:
        backend_of(grads[0]).fuzzy_scale_(grads, rates)


_fuzzy_scale_op = torch.library.custom_op(
    f"{_NS}::fuzzy_scale_", _fuzzy_scale_impl, mutates_args=("grads",)
)


@_fuzzy_scale_op.register_fake
def _(grads, rates):
    return None


def _crystallize_impl(
    weights: List[Tensor],
    grads: List[Tensor],
    rates: List[Tensor],
    crystal_thresh: float,
    dampening: float,
) -> None:
    """``p[(|g|/|w| < crystal_thresh) | (|g| > mean|w|)] *= dampening``."""
    if weights:
        backend_of(weights[0]).crystallize_(weights, grads, rates, crystal_thresh, dampening)


_crystallize_op = torch.library.custom_op(
    f"{_NS}::crystallize_", _crystallize_impl, mutates_args=("rates",)
)


@_crystallize_op.register_fake
def _(weights, grads, rates, crystal_thresh, dampening):
    return None


def _volume_scale_impl(
    weights: List[Tensor],
    grads: List[Tensor],
    steps: List[Tensor],
    seeds: List[int],
    op_id: int,
    base_lr: float,
    stability_factor: float,
    lr_variability: float,
) -> None:
    """``g *= |N(m, lr_variability*m)|`` with ``m = base_lr*exp(-stability_factor*|w|/(|w|+1))``."""
    if weights:
        keys = draw_keys(steps, seeds, op_id)
        backend_of(weights[0]).volume_scale_(
            weights, grads, keys, base_lr, stability_factor, lr_variability
        )


_volume_scale_op = torch.library.custom_op(
    f"{_NS}::volume_scale_", _volume_scale_impl, mutates_args=("grads", "steps")
)


@_volume_scale_op.register_fake
def _(weights, grads, steps, seeds, op_id, base_lr, stability_factor, lr_variability):
    return None


def _bio_step_impl(
    weights: List[Tensor],
    grads: List[Tensor],
    rates: List[Tensor],
    steps: List[Tensor],
    seeds: List[int],
    op_id: int,
    volume: bool,
    fuzzy: bool,
    crystallize: bool,
    base_lr: float,
    stability_factor: float,
    lr_variability: float,
    crystal_thresh: float,
    dampening: float,
) -> None:
    """Volume scaling, fuzzy scaling and crystallization in one pass (each optional)."""
    if weights:
        keys = draw_keys(steps, seeds, op_id) if volume else [0] * len(weights)
        backend_of(weights[0]).bio_step_(
            weights, grads, rates, keys, volume, fuzzy, crystallize,
            base_lr, stability_factor, lr_variability, crystal_thresh, dampening,
        )  # fmt: skip


_bio_step_op = torch.library.custom_op(
    f"{_NS}::bio_step_", _bio_step_impl, mutates_args=("grads", "rates", "steps")
)


@_bio_step_op.register_fake
def _(weights, grads, rates, steps, seeds, op_id, volume, fuzzy, crystallize, *scalars):
    return None


def _rejuvenate_with(
    op: str, weights: List[Tensor], steps: List[Tensor], seeds: List[int], op_id: int, dre: float
) -> Tensor:
    """Run backend rejuvenation ``op``; the replaced count per layer (a fresh int64 tensor)."""
    if not weights:
        return torch.zeros(0, dtype=torch.int64)
    keys = draw_keys(steps, seeds, op_id)
    return getattr(backend_of(weights[0]), op)(weights, keys, dre)


def _rejuvenate_impl(
    weights: List[Tensor], steps: List[Tensor], seeds: List[int], op_id: int, dre: float
) -> Tensor:
    """Rejuvenation; returns the replaced count per layer (int64, on the device)."""
    return _rejuvenate_with("rejuvenate_", weights, steps, seeds, op_id, dre)


def _rejuvenate_legacy_impl(
    weights: List[Tensor], steps: List[Tensor], seeds: List[int], op_id: int, dre: float
) -> Tensor:
    """The original published rejuvenation rule; returns the replaced count per layer."""
    return _rejuvenate_with("rejuvenate_legacy_", weights, steps, seeds, op_id, dre)


def _fake_counts(weights, steps, seeds, op_id, dre):
    device = weights[0].device if weights else torch.device("cpu")
    return torch.empty(len(weights), dtype=torch.int64, device=device)


_rejuvenate_op = torch.library.custom_op(
    f"{_NS}::rejuvenate_", _rejuvenate_impl, mutates_args=("weights", "steps")
)
_rejuvenate_op.register_fake(_fake_counts)
_rejuvenate_legacy_op = torch.library.custom_op(
    f"{_NS}::rejuvenate_legacy_", _rejuvenate_legacy_impl, mutates_args=("weights", "steps")
)
_rejuvenate_legacy_op.register_fake(_fake_counts)


def _dale_enforce_impl(weights: List[Tensor], signs: List[Tensor]) -> None:
    """``w = relu(w * sign) * sign``."""
    if weights:
        backend_of(weights[0]).dale_enforce_(weights, signs)


_dale_enforce_op = torch.library.custom_op(
    f"{_NS}::dale_enforce_", _dale_enforce_impl, mutates_args=("weights",)
)


@_dale_enforce_op.register_fake
def _(weights, signs):
    return None


def host_uniform(key: int) -> float:
    """A uniform number in [0, 1) derived on the host from a stream key (no device work)."""
    return (philox.stream_key(key, 0, 0) >> 10) / float(1 << 53)


def _activity_step_impl(
    output: Tensor,
    counts: Tensor,
    rates: Tensor,
    step: Tensor,
    calls: Tensor,
    seed: int,
    op_id: int,
    channel_dim: int,
    nu: float,
    lo: float,
    hi: float,
) -> None:
    """Count the output units with ``|y| > 0.01`` over every other dim into ``counts``; on the
    first call, then with probability 0.1 per call (as upstream), redraw the rates from the
    counts. The redraw decision comes from the layer's own stream, on the host."""
    dims = [d for d in range(output.dim()) if d != channel_dim]
    active = output.abs() > 0.01
    counts.add_((active.sum(dim=dims) if dims else active).to(counts.dtype))
    (key,) = draw_keys([step], [seed], op_id)
    n = int(calls)  # a CPU scalar: no device sync
    calls.fill_(n + 1)
    if n == 0 or host_uniform(key) < 0.1:
        backend_of(rates).activity_update_([rates], [counts], [key], nu, lo, hi)


_activity_step_op = torch.library.custom_op(
    f"{_NS}::activity_step_",
    _activity_step_impl,
    mutates_args=("counts", "rates", "step", "calls"),
)


@_activity_step_op.register_fake
def _(output, counts, rates, step, calls, seed, op_id, channel_dim, nu, lo, hi):
    return None


def _eager_or_traced(op, impl):
    """The custom op when ``torch.compile`` traces, its plain implementation otherwise."""

    def call(*args, **kwargs):
        if torch.compiler.is_compiling():
            return op(*args, **kwargs)
        return impl(*args, **kwargs)

    call.__doc__ = impl.__doc__
    call.__name__ = impl.__name__.replace("_impl", "").lstrip("_")
    return call


fuzzy_scale_ = _eager_or_traced(_fuzzy_scale_op, _fuzzy_scale_impl)
crystallize_ = _eager_or_traced(_crystallize_op, _crystallize_impl)
volume_scale_ = _eager_or_traced(_volume_scale_op, _volume_scale_impl)
bio_step_ = _eager_or_traced(_bio_step_op, _bio_step_impl)
rejuvenate_ = _eager_or_traced(_rejuvenate_op, _rejuvenate_impl)
rejuvenate_legacy_ = _eager_or_traced(_rejuvenate_legacy_op, _rejuvenate_legacy_impl)
dale_enforce_ = _eager_or_traced(_dale_enforce_op, _dale_enforce_impl)
activity_step_ = _eager_or_traced(_activity_step_op, _activity_step_impl)
