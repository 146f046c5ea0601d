"""Sharded training with FSDP2 (``torch.distributed.fsdp.fully_shard``).

``fully_shard`` turns each weight into a DTensor sharded along dim 0 over a 1-D device mesh;
it shards parameters only, so the per-synapse rates (a buffer) would stay whole on every rank.
:func:`shard_rates` gives each converted layer rates sharded exactly like its weight: every
rank keeps only its rows, and the buffer becomes a DTensor with the weight's mesh, placements,
global shape and stride, so ``model.state_dict()`` shows it sharded and
``torch.distributed.checkpoint`` saves and loads it shard by shard. Dale signs and activity
counts follow when the weight's shard dim is their output-unit dim; otherwise (a transposed
layer, weight ``(in, out)`` sharded along ``in``) they are one small vector per layer and stay
whole on every rank.

The mechanisms (:mod:`bio_transformations.functional`) call :func:`local` on every tensor
they hand to an op, so the ops and both backends see plain local tensors; :func:`span_of` says
where a shard lies in its layer (random draws follow the global index), and
:class:`GroupReduction` reduces the per-layer statistics over the shard group (installed with
``kernels.stats.reduced_over``). A layer whose weight is sharded while its rates are not yet
(no :func:`shard_rates` call) is sharded at its first use by a mechanism, so code that calls
the functional API on any subset of layers needs nothing extra.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from .kernels.shards import Span
from .layers import out_dim

try:  # torch >= 2.5
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - older torch: no DTensor, nothing is ever sharded
    DTensor = None  # type: ignore[assignment,misc]
    Shard = None  # type: ignore[assignment,misc]

__all__ = [
    "GroupReduction",
    "fsdp_wrapped",
    "is_sharded",
    "local",
    "reduction_for",
    "shard_layer_rates",
    "shard_rates",
    "span_of",
]

_RATES = "fuzzy_learning_rate_parameters"


def fsdp_wrapped(model: nn.Module) -> bool:
    """Whether ``model`` or a module inside it is wrapped by FSDP2's ``fully_shard`` (its class
    derives from ``FSDPModule``)."""
    return any(base.__name__ == "FSDPModule" for m in model.modules() for base in type(m).__mro__)


def is_sharded(t: Any) -> bool:
    """Whether ``t`` is a DTensor (a sharded weight, gradient or rate tensor)."""
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The local shard of a DTensor (a view: writing it writes the DTensor), else ``t``."""
    return t.to_local() if is_sharded(t) else t


def _shard_dim(t: "DTensor") -> int:
    mesh = t.device_mesh
    if mesh.ndim != 1 or len(t.placements) != 1 or not isinstance(t.placements[0], Shard):
        raise NotImplementedError(
            f"bio mechanisms support tensors sharded over a 1-D device mesh (FSDP2's "
            f"fully_shard), got placements {t.placements} on a {mesh.ndim}-D mesh"
        )
    d = t.placements[0].dim
    return d + t.dim() if d < 0 else d


def span_of(t: "DTensor") -> Span:
    """Where this rank's shard of ``t`` lies: ``(dim, start, size)`` with ``t.to_local()``
    equal to ``full.narrow(dim, start, local_len)`` (``torch.chunk`` layout: every rank but
    the last ones holds ``ceil(size / world)`` entries, as ``Shard`` does)."""
    d = _shard_dim(t)
    size = t.shape[d]
    mesh = t.device_mesh
    chunk = math.ceil(size / mesh.size()) if size else 0
    start = min(mesh.get_local_rank() * chunk, size)
    have = t.to_local().shape[d]
    if have != max(0, min(chunk, size - start)):
        raise NotImplementedError(
            f"shard of {have} entries at {start} of {size} along dim {d} is not the even "
            "torch.chunk layout the bio mechanisms support"
        )
    return Span(d, start, size)


class GroupReduction:
    """The collectives a sharded layer group's statistics need, over one mesh's process group
    (``kernels.stats.Reduction``). ``torch.distributed`` collectives: on a GPU they queue on
    the stream and never wait on the host."""

    def __init__(self, mesh: Any):
        self.group = mesh.get_group()
        self.rank = mesh.get_local_rank()
        self.world = mesh.size()

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.stack(parts)


_reductions: Dict[Any, GroupReduction] = {}


def reduction_for(t: Any) -> Optional[GroupReduction]:
    """The reduction over ``t``'s shard group (None for a plain tensor)."""
    if not is_sharded(t):
        return None
    mesh = t.device_mesh
    red = _reductions.get(mesh)
    if red is None:
        red = _reductions[mesh] = GroupReduction(mesh)
    return red


def _like(full: torch.Tensor, weight: "DTensor", d: int, span: Span) -> "DTensor":
    """``full``'s shard along dim ``d`` as a DTensor on the weight's mesh (an own copy, so the
    whole tensor can be freed)."""
    piece = full.narrow(d, span.start, weight.to_local().shape[span.dim])
    return DTensor.from_local(
        piece.contiguous().clone(),
        weight.device_mesh,
        (Shard(d),),
        run_check=False,
        shape=full.shape,
        stride=full.stride(),
    )


@torch.no_grad()
def shard_layer_rates(layer: nn.Module, bio: nn.Module) -> bool:
    """Shard one converted layer's rates (and its per-unit tensors where its weight's shard dim
    is their unit dim) like its weight; False when there is nothing to do (weight not a
    DTensor, or already done)."""
    weight = layer.weight
    rates = bio._buffers.get(_RATES)
    if not is_sharded(weight) or rates is None or is_sharded(rates):
        return False
    span = span_of(weight)
    d = span.dim
    if math.prod(weight.shape[:d]) > 1:
        raise NotImplementedError(
            f"{type(layer).__name__}: weight sharded along dim {d}; the bio mechanisms need "
            "shards along the outermost dim (FSDP2's default Shard(0)), so each shard is one "
            "range of the layer's elements"
        )
    if tuple(rates.shape) != tuple(weight.shape):
        raise RuntimeError(
            f"{type(layer).__name__}: rates of shape {tuple(rates.shape)} do not match the "
            f"weight's {tuple(weight.shape)}"
        )
    bio._buffers[_RATES] = _like(rates, weight, d, span)
    if d == out_dim(layer):  # per-unit tensors follow the units only if the units are split
        sign = bio._buffers.get("sign")
        if sign is not None and not is_sharded(sign):
            bio._buffers["sign"] = _like(sign, weight, d, span)
        counts = bio._buffers.get("activation_count")
        if counts is not None and not is_sharded(counts):
            bio._buffers["activation_count"] = _like(counts, weight, 0, span)
    return True


def shard_rates(model: nn.Module) -> int:
    """Shard the rates of every converted layer of ``model`` like its weight; call it once
    after ``fully_shard``. Returns how many layers were sharded now (0 on a second call).

    Needs no communication: every rank holds the same whole rates after conversion (the
    converter agrees on the seeds) and keeps its own rows.
    """
    from .model_methods import bio_layers  # model_methods imports functional, which imports us

    return sum(shard_layer_rates(layer, bio) for _, layer, bio in bio_layers(model))
