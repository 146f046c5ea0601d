"""Every op of the contract as a PyTorch custom op (``torch.library``), from one table, so
``torch.compile`` sees each call whole and a function calling the model-level methods compiles
with ``fullgraph=True``.

Each op dispatches at run time to the backend :func:`bio_transformations.kernels.backend_module`
picks for its tensors' device and dtype, and has a fake implementation for tracing. Where the
backend op takes random-stream keys, the custom op takes each layer's step counter (a CPU int64
scalar tensor, advanced here) and seed, and derives the key inside: compiled code neither
bakes a key in nor recompiles per step. The dynamic rate updates also keep their update
counters in CPU tensors and decide on the host, inside the op, whether an update is due.

Outside ``torch.compile`` the implementation is called directly: the custom-op dispatch costs
more than a memory-bound op like ``g *= p`` on a large CPU tensor.
"""

import dataclasses
from typing import Callable, List, Optional

import torch
from torch import Tensor

from . import kernels
from .kernels import philox
from .kernels.contract import StepParams
from .kernels.shards import unflatten_spans

__all__ = [
    "OP_IDS",
    "activity_step_",
    "backend_of",
    "bio_step_",
    "capturable_keys",
    "crystallize_",
    "dale_enforce_",
    "draw_keys",
    "fuzzy_scale_",
    "rates_init_",
    "rejuvenate_",
    "rejuvenate_legacy_",
    "temporal_step_",
    "volume_keys",
    "volume_scale_",
    "weight_adaptive_step_",
]

_NS = "bio_transformations"

#: Op ids mixed into each random stream's key, so ops never share draws.
OP_IDS = {
    "volume": 1,
    "rejuvenate": 2,
    "rejuvenate_legacy": 3,
    "rates_init": 4,
    "temporal": 5,
    "weight_adaptive": 6,
    "activity": 7,
    "dale_init": 8,
}


def backend_of(t: Tensor):
    """The backend module that runs ops on ``t`` (``kernels.backend_module``)."""
    return kernels.backend_module(t.device, t.dtype)


def draw_keys(steps: List[Tensor], seeds: List[int], op: str) -> List[int]:
    """One stream key per layer from (seed, step, op); advances each CPU step counter."""
    op_id = OP_IDS[op]
    if len(set(map(id, steps))) < len(steps):  # a counter twice: each use takes the next key
        return [_next_key(step, seed, op_id) for step, seed in zip(steps, seeds)]
    values = list(map(int, steps))  # CPU scalars: no device sync
    for step, n in zip(steps, values):
        step.fill_(n + 1)
    return philox.stream_keys(seeds, values, op_id)


def _next_key(step: Tensor, seed: int, op_id: int) -> int:
    n = int(step)
    step.fill_(n + 1)
    return philox.stream_key(seed, n, op_id)


def capturable_keys(steps: List[Tensor], seeds: List[int], like: Tensor, op: str = "volume"):
    """In ``capturable`` mode on the Triton backend, keys the launch derives on the device
    (``kernels.triton.keys.DeviceKeys``; the CPU counters stay put); None otherwise."""
    if kernels.settings.current().capturable and (
        kernels.backend_for(like.device, like.dtype) == "triton"
    ):
        from .kernels.triton.keys import DeviceKeys

        return DeviceKeys(steps, seeds, OP_IDS[op])
    return None


def volume_keys(steps: List[Tensor], seeds: List[int], like: Tensor):
    """Volume scaling's keys: :func:`capturable_keys` in that mode, else :func:`draw_keys`."""
    keys = capturable_keys(steps, seeds, like)
    return draw_keys(steps, seeds, "volume") if keys is None else keys


def _sharded(spans: Optional[List[int]], index: Optional[List[int]] = None) -> dict:
    """The backend's ``spans`` keyword for the tensors at ``index`` (all when None): nothing
    for unsharded tensors, so single-process calls reach the backends unchanged. ``spans`` is
    the flat ``[dim, start, size, ...]`` list of ``kernels.shards.flatten_spans``."""
    if spans is None:
        return {}
    triples = unflatten_spans(spans)
    return {"spans": triples if index is None else [triples[i] for i in index]}


def _no_output(*args, **kwargs) -> None:
    return None


def _counts_like(weights, *args) -> Tensor:
    device = weights[0].device if weights else torch.device("cpu")
    return torch.empty(len(weights), dtype=torch.int64, device=device)


def _define(name: str, mutates: tuple, fake: Callable = _no_output) -> Callable:
    """Register ``impl`` as custom op ``bio_transformations::name``; return what callers use:
    the custom op while ``torch.compile`` traces, the plain implementation otherwise."""

    def register(impl: Callable) -> Callable:
        op = torch.library.custom_op(f"{_NS}::{name}", impl, mutates_args=mutates)
        op.register_fake(fake)

        def call(*args):
            return op(*args) if torch.compiler.is_compiling() else impl(*args)

        call.__name__ = call.__qualname__ = name
        call.__doc__ = impl.__doc__
        call.custom_op = op
        return call

    return register


# -- the gradient step ---------------------------------------------------------------------


@_define("fuzzy_scale_", mutates=("grads",))
def fuzzy_scale_(grads: List[Tensor], rates: List[Tensor]) -> None:
    """``g *= p``."""
    if grads:
        backend_of(grads[0]).fuzzy_scale_(grads, rates)


@_define("crystallize_", mutates=("rates",))
def crystallize_(
    weights: List[Tensor],
    grads: List[Tensor],
    rates: List[Tensor],
    crystal_thresh: float,
    dampening: float,
) -> None:
    """``p[(|g|/|w| < crystal_thresh) | (|g| > mean|w|)] *= dampening``."""
    if weights:
        backend_of(weights[0]).crystallize_(weights, grads, rates, crystal_thresh, dampening)


@_define("volume_scale_", mutates=("grads", "steps"))
def volume_scale_(
    weights: List[Tensor],
    grads: List[Tensor],
    steps: List[Tensor],
    seeds: List[int],
    base_lr: float,
    stability_factor: float,
    lr_variability: float,
    spans: Optional[List[int]] = None,
) -> None:
    """``g *= |N(m, lr_variability*m)|`` with ``m = base_lr*exp(-stability_factor*|w|/(|w|+1))``.

    ``spans`` (every stochastic op takes it): where each tensor lies in its sharded layer,
    flat ``[dim, start, size, ...]`` (``kernels.shards``); None when nothing is sharded."""
    if weights:
        keys = volume_keys(steps, seeds, weights[0])
        backend_of(weights[0]).volume_scale_(
            weights, grads, keys, base_lr, stability_factor, lr_variability, **_sharded(spans)
        )


@_define("bio_step_", mutates=("grads", "rates", "steps"))
def _bio_step(
    weights: List[Tensor],
    grads: List[Tensor],
    rates: List[Tensor],
    steps: List[Tensor],
    seeds: List[int],
    volume: bool,
    fuzzy: bool,
    crystallize: bool,
    base_lr: float,
    stability_factor: float,
    lr_variability: float,
    crystal_thresh: float,
    dampening: float,
    spans: Optional[List[int]] = None,
) -> None:
    """``bio_step_`` with ``StepParams`` spelled out (custom ops take no records)."""
    if weights:
        params = StepParams(
            volume, fuzzy, crystallize, base_lr, stability_factor, lr_variability,
            crystal_thresh, dampening,
        )  # fmt: skip
        keys = volume_keys(steps, seeds, weights[0]) if volume else None
        backend_of(weights[0]).bio_step_(weights, grads, rates, keys, params, **_sharded(spans))


def bio_step_(
    weights: List[Tensor],
    grads: List[Tensor],
    rates: List[Tensor],
    steps: List[Tensor],
    seeds: List[int],
    params: StepParams,
    spans: Optional[List[int]] = None,
) -> None:
    """Volume scaling, fuzzy scaling and crystallization in one pass, as ``params`` says."""
    _bio_step(weights, grads, rates, steps, seeds, *dataclasses.astuple(params), spans)


# -- rejuvenation --------------------------------------------------------------------------


@_define("rejuvenate_", mutates=("weights", "steps"), fake=_counts_like)
def rejuvenate_(
    weights: List[Tensor],
    steps: List[Tensor],
    seeds: List[int],
    dre: float,
    spans: Optional[List[int]] = None,
) -> Tensor:
    """Rejuvenation; returns the replaced count per layer (int64, on the device)."""
    if not weights:
        return torch.zeros(0, dtype=torch.int64)
    keys = draw_keys(steps, seeds, "rejuvenate")
    return backend_of(weights[0]).rejuvenate_(weights, keys, dre, **_sharded(spans))


@_define("rejuvenate_legacy_", mutates=("weights", "steps"), fake=_counts_like)
def rejuvenate_legacy_(
    weights: List[Tensor],
    steps: List[Tensor],
    seeds: List[int],
    dre: float,
    spans: Optional[List[int]] = None,
) -> Tensor:
    """The original published rejuvenation rule; returns the replaced count per layer."""
    if not weights:
        return torch.zeros(0, dtype=torch.int64)
    keys = draw_keys(steps, seeds, "rejuvenate_legacy")
    return backend_of(weights[0]).rejuvenate_legacy_(weights, keys, dre, **_sharded(spans))


# -- the rates -----------------------------------------------------------------------------


@_define("rates_init_", mutates=("rates", "steps"))
def rates_init_(
    rates: List[Tensor],
    steps: List[Tensor],
    seeds: List[int],
    distribution: str,
    nu: float,
    lo: float,
    hi: float,
) -> None:
    """Draw the initial rates from ``distribution`` (``torch_backend.rates_init_``)."""
    if rates:
        keys = draw_keys(steps, seeds, "rates_init")
        backend_of(rates[0]).rates_init_(rates, keys, distribution, nu, lo, hi)


@dataclasses.dataclass(frozen=True)
class RateUpdate:
    """What one dynamic rate update does to a layer: whether it runs, and with fresh noise."""

    due: bool
    noisy: bool = False


def plan_temporal(count: int, freq: int) -> RateUpdate:
    """TEMPORAL after ``count`` updates: decay every ``freq``, noise every ``10*freq``."""
    return RateUpdate(due=count % freq == 0, noisy=count % (10 * freq) == 0)


def plan_weight_adaptive(count: int, freq: int, dynamic: bool, filled: bool) -> RateUpdate:
    """WEIGHT_ADAPTIVE after ``count`` updates: fill once, then every ``freq`` when dynamic."""
    return RateUpdate(due=not filled or (dynamic and count % freq == 0), noisy=True)


def _advance(counter: Tensor) -> int:
    n = int(counter) + 1  # a CPU scalar: no device sync
    counter.fill_(n)
    return n


@_define("temporal_step_", mutates=("rates", "counts", "steps"))
def temporal_step_(
    rates: List[Tensor],
    counts: List[Tensor],
    steps: List[Tensor],
    seeds: List[int],
    freq: int,
    decay: float,
    nu: float,
    lo: float,
    hi: float,
    spans: Optional[List[int]] = None,
) -> None:
    """One TEMPORAL update of each layer: advance its update count; when due,
    ``p = clamp(1 + (p-1)*decay [+ 0.1*nu*(2U-1)], lo, hi)`` (:func:`plan_temporal`)."""
    quiet, noisy = [], []
    for i, count in enumerate(counts):
        plan = plan_temporal(_advance(count), freq)
        if plan.due:
            (noisy if plan.noisy else quiet).append(i)
    if quiet:
        backend_of(rates[0]).temporal_update_(
            [rates[i] for i in quiet], None, decay, 0.0, lo, hi, **_sharded(spans, quiet)
        )
    if noisy:
        keys = draw_keys([steps[i] for i in noisy], [seeds[i] for i in noisy], "temporal")
        backend_of(rates[0]).temporal_update_(
            [rates[i] for i in noisy], keys, decay, 0.1 * nu, lo, hi, **_sharded(spans, noisy)
        )


@_define("weight_adaptive_step_", mutates=("rates", "counts", "filled", "steps"))
def weight_adaptive_step_(
    rates: List[Tensor],
    weights: List[Tensor],
    counts: List[Tensor],
    filled: List[Tensor],
    steps: List[Tensor],
    seeds: List[int],
    freq: int,
    dynamic: bool,
    nu: float,
    lo: float,
    hi: float,
    spans: Optional[List[int]] = None,
) -> None:
    """One WEIGHT_ADAPTIVE update of each layer (:func:`plan_weight_adaptive`): when due,
    ``p = clamp(1 + (2U-1)*nu*clamp(2 - |w|/(mean|w| + 1e-8), 0.5, 1.5), lo, hi)``."""
    due = []
    for i, (count, flag) in enumerate(zip(counts, filled)):
        if plan_weight_adaptive(_advance(count), freq, dynamic, bool(flag)).due:
            flag.fill_(1)
            due.append(i)
    if due:
        keys = draw_keys([steps[i] for i in due], [seeds[i] for i in due], "weight_adaptive")
        backend_of(rates[0]).weight_adaptive_(
            [rates[i] for i in due], [weights[i] for i in due], keys, nu, lo, hi,
            **_sharded(spans, due),
        )  # fmt: skip


def host_uniform(key: int) -> float:
    """A uniform number in [0, 1) derived on the host from a stream key (no device work)."""
    return (philox.stream_key(key, 0, 0) >> 10) / float(1 << 53)


@_define("activity_step_", mutates=("counts", "rates", "step", "calls"))
def activity_step_(
    output: Tensor,
    counts: Tensor,
    rates: Tensor,
    step: Tensor,
    calls: Tensor,
    seed: int,
    channel_dim: int,
    nu: float,
    lo: float,
    hi: float,
    spans: Optional[List[int]] = None,
) -> None:
    """Count the output units with ``|y| > 0.01`` over every other dim into ``counts``; on the
    first call, then with probability 0.1 per call (as upstream), redraw the rates from the
    counts. The redraw decision comes from the layer's own stream, on the host.

    ``spans``: the span of the unit-major rates in a sharded layer; when it splits the units
    (dim 0), ``counts`` holds this shard's units and only their activity is added."""
    dims = [d for d in range(output.dim()) if d != channel_dim]
    active = output.abs() > 0.01
    per_unit = active.sum(dim=dims) if dims else active
    triples = unflatten_spans(spans)
    if triples is not None and triples[0] is not None and triples[0].dim == 0:
        per_unit = per_unit.narrow(0, triples[0].start, counts.shape[0])
    counts.add_(per_unit.to(counts.dtype))
    (key,) = draw_keys([step], [seed], "activity")
    if _advance(calls) == 1 or host_uniform(key) < 0.1:
        backend_of(rates).activity_update_([rates], [counts], [key], nu, lo, hi, **_sharded(spans))


# -- Dale's principle ----------------------------------------------------------------------


@_define("dale_enforce_", mutates=("weights",))
def dale_enforce_(weights: List[Tensor], signs: List[Tensor]) -> None:
    """``w = relu(w * sign) * sign``."""
    if weights:
        backend_of(weights[0]).dale_enforce_(weights, signs)
