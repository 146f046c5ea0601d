"""Per-layer statistics both backends read, computed by the same torch code on the device.

The Triton kernels load these numbers through a pointer, so nothing is ever read on the
host. Math runs in float32 for float16/bfloat16 tensors (float64 stays float64). For the
statistics on the fused step's and rejuvenation's hot path the Triton backend runs the same
formulas as its own reduction over the launch table (``kernels/triton/reduce.py``: two
launches per layer group instead of several per layer; deterministic, equal to these to
float32 rounding, not bit for bit, since the sums run in another order); sharded groups and the
other ops use the functions here.

**Sharded layers.** Under FSDP2 an op sees each rank's local shard, while the statistics are
over the whole layer. :func:`reduced_over` installs a :class:`Reduction` (the shard group's
all-reduce) for a block; the list statistics (:func:`abs_means`, :func:`grads_nonzero`,
:func:`crystallize_stats`, :func:`rejuvenation_stats_many`, :func:`legacy_stats_many`) then
stack the partial sums (or maxima) of every tensor of the call into ONE tensor, reduce it once
and finish from the totals. Without a reduction (the default) they compute exactly what they
always did.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional, Protocol, Sequence

import torch

Tensor = torch.Tensor
Tensors = Sequence[Tensor]

LOW_PRECISION = (torch.float16, torch.bfloat16)

__all__ = [
    "LOW_PRECISION",
    "Reduction",
    "abs_means",
    "activity_stats",
    "clean_weights_",
    "compute_dtype",
    "crystallize_stats",
    "current_reduction",
    "grads_nonzero",
    "legacy_stats",
    "legacy_stats_many",
    "reduced_over",
    "rejuvenation_stats",
    "rejuvenation_stats_many",
    "rows_view",
    "upcast",
]


class Reduction(Protocol):
    """How partial statistics of a sharded layer group become whole-layer ones: collectives
    over the group that holds the shards (``bio_transformations.sharding.GroupReduction``)."""

    rank: int  # this process's index in the shard group (shards lie in rank order)

    def sum_(self, t: Tensor) -> Tensor:
        """Sum ``t`` over the group, in place; returns ``t``."""

    def max_(self, t: Tensor) -> Tensor:
        """Maximum of ``t`` over the group, in place; returns ``t``."""

    def gather(self, t: Tensor) -> Tensor:
        """Every rank's ``t``, stacked in rank order: shape ``(world, *t.shape)``."""


_reduction: contextvars.ContextVar[Optional[Reduction]] = contextvars.ContextVar(
    "bio_stats_reduction", default=None
)


def current_reduction() -> Optional[Reduction]:
    """The reduction installed by :func:`reduced_over`, or None (single process, unsharded)."""
    return _reduction.get()


@contextlib.contextmanager
def reduced_over(reduction: Optional[Reduction]) -> Iterator[None]:
    """Reduce the statistics computed in this block over ``reduction``'s group (None: no
    reduction, the default)."""
    token = _reduction.set(reduction)
    try:
        yield
    finally:
        _reduction.reset(token)


def _totals(red: Reduction, parts: list, tensors: Tensors) -> Tensor:
    """``[*parts, *element counts of tensors]`` of this rank as one float64 tensor, summed over
    the group (one all-reduce). The counts are filled on the device: no host-to-device copy."""
    counts = [parts[0].new_full((), float(t.numel())) for t in tensors]
    return red.sum_(torch.stack([p.double() for p in parts] + counts))


def compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype the math runs in: float32 for half types, the tensor's own dtype otherwise."""
    return torch.float32 if t.dtype in LOW_PRECISION else t.dtype


def upcast(t: Tensor) -> Tensor:
    """``t`` in its compute dtype (a copy only for half types)."""
    return t.float() if t.dtype in LOW_PRECISION else t


def rows_view(per_unit: Tensor, like: Tensor) -> Tensor:
    """Shape a per-output-unit vector so it broadcasts over a weight's other dims."""
    return per_unit.reshape((-1,) + (1,) * (like.dim() - 1))


#: CPU: elements per block of the one-pass statistics (a block's temporaries stay in cache).
STATS_CHUNK = 1 << 19


def _cpu_blocked(t: Tensor) -> bool:
    """Whether ``t``'s statistics are summed block by block on the CPU (float32/float64,
    contiguous): ``|t|.sum()`` is vectorized where ``vector_norm(t, 1)`` is not (2-4x faster)."""
    return (
        t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) and (t.is_contiguous())
    )


def _abs_sum(t: Tensor) -> Tensor:
    """``sum(|t|)`` as a 0-d tensor in the compute dtype; a function of ``t`` alone (its blocks
    never depend on what other tensors are in the call)."""
    if not _cpu_blocked(t):
        return torch.linalg.vector_norm(t, 1, dtype=compute_dtype(t))
    flat = t.view(-1)
    if flat.numel() <= STATS_CHUNK:
        return torch.abs(flat).sum()
    scratch = torch.empty(STATS_CHUNK, dtype=t.dtype)
    partial = [
        torch.abs(block, out=scratch[: block.numel()]).sum() for block in flat.split(STATS_CHUNK)
    ]
    return torch.stack(partial).sum()


def abs_means(tensors: Tensors) -> list:
    """``mean(|t|)`` of each tensor as a 0-d tensor on its device, in the compute dtype.

    One pass per tensor: on the CPU the sum of ``|t|`` block by block (:data:`STATS_CHUNK`),
    elsewhere the L1 norm; divided by the element count. A sharded group (:func:`reduced_over`)
    divides the group's sums by the group's counts, one all-reduce for the list.
    """
    if _reduction.get() is None:
        return [_abs_sum(t) / max(t.numel(), 1) for t in tensors]
    return crystallize_stats(tensors, None)[0]


def grads_nonzero(grads: Tensors) -> list:
    """Per layer, ``1`` if its gradient has an element that is not zero (NaN counts), else ``0``:
    0-d tensors on the device, in the compute dtype.

    Crystallization reads it as a gate: a layer whose gradient is all zero this step (unused,
    with ``zero_grad(set_to_none=False)``) keeps its rates. Decided on the device, no sync.
    A sharded group (:func:`reduced_over`) counts the non-zero elements over the group: a local
    shard that is all zero does not make the layer's gradient all zero.
    """
    if _reduction.get() is None:
        return _nonzero(list(grads))
    return crystallize_stats(None, grads)[1]


def _nonzero(grads: list) -> list:
    """:func:`grads_nonzero` without a reduction: a gradient is not all zero iff its minimum or
    its maximum is not zero. ``aminmax`` propagates NaN (NaN != 0: a NaN counts) and is one
    vectorized pass, where the count ``vector_norm(g, 0)`` is 7-10x slower on the CPU (3.6 ms
    for 4M weights); the extremes of every layer are compared in one op (many small layers)."""
    if not grads:
        return []
    ends = []
    for g in grads:
        if g.numel():
            ends += torch.aminmax(g)
        else:  # an empty tensor is all zero
            ends += [g.new_zeros(())] * 2
    nonzero = torch.ne(torch.stack(ends).view(-1, 2), 0).any(1)  # stack promotes mixed dtypes
    dtypes = {compute_dtype(g) for g in grads}
    if len(dtypes) == 1:  # one cast for the group
        return list(nonzero.to(dtypes.pop()).unbind(0))
    return [nz.to(compute_dtype(g)) for nz, g in zip(nonzero.unbind(0), grads)]


def crystallize_stats(weights: Optional[Tensors], grads: Optional[Tensors]) -> tuple:
    """``(abs_means(weights), grads_nonzero(grads))`` (an empty list for a None argument): what
    crystallization reads. A sharded group reduces both in ONE all-reduce."""
    red = _reduction.get()
    weights, grads = list(weights or ()), list(grads or ())
    if red is None:
        return abs_means(weights), grads_nonzero(grads)
    if not weights and not grads:
        return [], []
    parts = [_abs_sum(w) for w in weights]
    parts += [torch.linalg.vector_norm(g, 0, dtype=torch.float64) for g in grads]
    totals = _totals(red, parts, weights)  # [|w| sums, non-zero counts, weight counts]
    k, n = len(weights), len(grads)
    means = [
        (totals[i] / totals[k + n + i].clamp_min(1.0)).to(compute_dtype(w))
        for i, w in enumerate(weights)
    ]
    nonzero = [(totals[k + i] > 0).to(compute_dtype(g)) for i, g in enumerate(grads)]
    return means, nonzero


def clean_weights_(weights: Tensors) -> None:
    """Rejuvenation's view of a weight: NaN counts as 0, values clamped to [-1, 1] (in place)."""
    for w in weights:
        w.nan_to_num_(nan=0.0).clamp_(-1.0, 1.0)


def _power_sums(w: Tensor, wf: Tensor) -> tuple:
    """``(sum w, sum w^2, sum |w|)`` in float64: on the CPU block by block, so the three sums
    read each block while it is in cache (one pass over memory), elsewhere three reductions."""
    if not _cpu_blocked(w) or wf.numel() <= STATS_CHUNK:
        a1 = torch.abs(wf).sum() if _cpu_blocked(w) else torch.linalg.vector_norm(wf, 1)
        return torch.sum(wf).double(), torch.dot(wf, wf).double(), a1.double()
    scratch = torch.empty(STATS_CHUNK, dtype=wf.dtype)
    sums = torch.empty(3, -(-wf.numel() // STATS_CHUNK), dtype=torch.float64)
    for i, block in enumerate(wf.split(STATS_CHUNK)):
        sums[0, i] = torch.sum(block)
        sums[1, i] = torch.dot(block, block)
        sums[2, i] = torch.abs(block, out=scratch[: block.numel()]).sum()
    s1, s2, a1 = sums.sum(1).unbind(0)
    return s1, s2, a1


def rejuvenation_stats(w: Tensor) -> tuple:
    """``(std(w), log-normal mu, log-normal sigma)`` of a cleaned weight, all 0-d, on device.

    The log-normal is fitted to the mean ``m`` and std ``s`` of ``|w|``: ``sigma^2 =
    log(1 + s^2/m^2)``, ``mu = log(m) - sigma^2/2``; the returned sigma is halved (upstream's
    "log_std / 2"). Zero or undefined statistics are clamped so nothing becomes NaN.
    """
    wf = upcast(w).reshape(-1)
    n = wf.numel()
    # Three fast one-pass sums (sum w, sum w^2, sum |w|) instead of two-pass variances; the
    # cancellation in E[x^2] - E[x]^2 is done in float64 on the 0-d results.
    s1, s2, a1 = _power_sums(wf, wf)  # wf: logical order, so any layout sums alike
    dof = max(n - 1, 1)  # unbiased, as torch.std; one weight: std 0, not NaN
    return _rejuvenation_fit(s1, s2, a1, n, dof, wf.dtype)


def _rejuvenation_fit(s1, s2, a1, n, dof, out: torch.dtype) -> tuple:
    """:func:`rejuvenation_stats` from the sums ``sum w``, ``sum w^2``, ``sum |w|`` (float64)
    and the count ``n`` and ``dof`` (ints, or float64 0-d tensors for a sharded layer)."""
    tiny = 1e-12
    std = ((s2 - s1 * s1 / n) / dof).clamp_min(0.0).sqrt()
    m = a1 / n
    s = ((s2 - a1 * a1 / n) / dof).clamp_min(0.0).sqrt()
    std = torch.nan_to_num(std, nan=0.0).clamp_min(tiny)
    m = torch.nan_to_num(m, nan=0.0).clamp_min(tiny)
    s = torch.nan_to_num(s, nan=0.0)
    sigma2 = torch.log1p((s / m) ** 2)
    mu = torch.log(m) - 0.5 * sigma2
    return std.to(out), mu.to(out), (0.5 * torch.sqrt(sigma2)).to(out)


def rejuvenation_stats_many(weights: Tensors) -> list:
    """:func:`rejuvenation_stats` of each weight; for a sharded group (:func:`reduced_over`)
    the three sums of every weight are reduced in one all-reduce. Empty weights (an empty
    local shard) take part in the reduction, so every rank makes the same collective calls."""
    red = _reduction.get()
    if red is None:
        return [rejuvenation_stats(w) for w in weights]
    weights = list(weights)
    if not weights:
        return []
    flats = [upcast(w).reshape(-1) for w in weights]
    sums = [_power_sums(f, f) for f in flats]
    parts = [s[j] for j in range(3) for s in sums]  # k sums of w, k of w^2, k of |w|
    k = len(weights)
    totals = _totals(red, parts, weights)  # counts of the k weights follow the 3k sums
    out = []
    for i, f in enumerate(flats):
        n = totals[3 * k + i]
        dof = (n - 1.0).clamp_min(1.0)
        out.append(_rejuvenation_fit(totals[i], totals[k + i], totals[2 * k + i], n, dof, f.dtype))
    return out


def legacy_stats(w: Tensor, dre: float) -> tuple:
    """``(max|w|, max|w|/dre)`` of a weight (the legacy rule's range and threshold scale)."""
    max_aw = upcast(w).abs().amax()
    return max_aw, max_aw / dre


def legacy_stats_many(weights: Tensors, dre: float) -> list:
    """:func:`legacy_stats` of each weight (None for an empty one); for a sharded group the
    maxima are reduced in one all-reduce (an empty local shard counts as 0)."""
    red = _reduction.get()
    if red is None:
        return [legacy_stats(w, dre) if w.numel() else None for w in weights]
    weights = list(weights)
    if not weights:
        return []
    maxima = torch.stack(
        [upcast(w).abs().amax() if w.numel() else torch.zeros((), device=w.device) for w in weights]
    )
    red.max_(maxima)
    return [(m.to(compute_dtype(w)), m.to(compute_dtype(w)) / dre) for m, w in zip(maxima, weights)]


def activity_stats(counts: Tensor, dtype: torch.dtype = torch.float32) -> tuple:
    """``(mean(c), mean(c) clamped to >= 1e-30)`` of a layer's per-unit activity counts, in
    ``dtype`` (float32, the kernels' compute dtype, unless the rates are float64); over every
    unit of the layer when the counts are a shard and a reduction is installed."""
    red = _reduction.get()
    if red is None:
        mean_c = counts.to(dtype).mean()
    else:
        totals = _totals(red, [counts.to(torch.float64).sum()], [counts])
        mean_c = (totals[0] / totals[1].clamp_min(1.0)).to(dtype)
    return mean_c, mean_c.clamp_min(1e-30)
