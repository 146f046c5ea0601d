"""Where a local shard lies in its global tensor, so random draws follow the global index.

A sharded run (FSDP2's ``fully_shard``) hands the ops each rank's local shard. Element ``j``
of a layer must draw the same numbers wherever it lives, so a stochastic op takes, per tensor,
an optional :class:`Span` ``(dim, start, size)``: the local tensor is
``global.narrow(dim, start, local.shape[dim])`` of a global tensor whose ``dim`` has ``size``
entries (all other dims as the local tensor's). ``None`` means the tensor is the whole layer,
the single-process case, which draws exactly as before.

* ``BIO_RNG=philox``: element ``i`` of the local tensor draws at counter
  :func:`global_index` ``[i]``, its row-major index in the global tensor (for a shard along
  dim 0 that is ``flat_start + i``, which the Triton kernels add as an element offset).
* ``BIO_RNG=torch``: a ``torch.Generator`` stream cannot be entered in the middle, so the whole
  layer is drawn and the local elements taken (:func:`take`): each rank draws ``size / local``
  times as many numbers as it keeps (the cost is measured in the docs, "Training setups").
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Tuple

import torch

Tensor = torch.Tensor

__all__ = ["Slab", "Span", "flatten_spans", "slab", "unflatten_spans"]


class Span(NamedTuple):
    """A local shard's place in its global tensor: ``global.narrow(dim, start, local)``."""

    dim: int
    start: int
    size: int


class Slab(NamedTuple):
    """A local tensor's shape and its :class:`Span`: what a draw needs to follow the global
    index."""

    shape: Tuple[int, ...]
    span: Span

    @property
    def global_shape(self) -> Tuple[int, ...]:
        shape = list(self.shape)
        shape[self.span.dim] = self.span.size
        return tuple(shape)

    @property
    def global_numel(self) -> int:
        return math.prod(self.global_shape)

    @property
    def flat_start(self) -> Optional[int]:
        """The global flat index of the first local element when the local elements are one
        contiguous range of the global flat index (a shard along the outermost non-unit dim),
        else None."""
        if math.prod(self.shape[: self.span.dim]) > 1:
            return None
        return self.span.start * math.prod(self.shape[self.span.dim + 1 :])

    def counters(self, device: torch.device) -> Tensor:
        """The global row-major index of every local element, in local row-major order."""
        start = self.flat_start
        n = math.prod(self.shape)
        if start is not None:
            return torch.arange(start, start + n, device=device, dtype=torch.int64)
        index = torch.zeros((), dtype=torch.int64, device=device)
        stride = 1
        for d in range(len(self.shape) - 1, -1, -1):
            first = self.span.start if d == self.span.dim else 0
            ar = torch.arange(first, first + self.shape[d], device=device, dtype=torch.int64)
            index = index + (ar * stride).reshape((-1,) + (1,) * (len(self.shape) - 1 - d))
            stride *= self.global_shape[d]
        return index.reshape(-1)

    def take(self, whole: Tensor) -> Tensor:
        """The local elements (flat, row-major) of a flat draw over the whole global tensor."""
        start = self.flat_start
        if start is not None:
            return whole[start : start + math.prod(self.shape)]
        local = whole.view(self.global_shape).narrow(
            self.span.dim, self.span.start, self.shape[self.span.dim]
        )
        return local.reshape(-1)


def slab(t: Tensor, spans: Optional[Sequence[Optional[Span]]], i: int) -> Optional[Slab]:
    """Tensor ``t`` (entry ``i`` of an op's list) as a :class:`Slab`, or None when unsharded."""
    if spans is None or spans[i] is None:
        return None
    return Slab(tuple(t.shape), Span(*spans[i]))


def flatten_spans(spans: Optional[Sequence[Optional[Span]]]) -> Optional[list]:
    """Spans as a flat ``[dim, start, size, ...]`` int list (``-1, 0, 0`` for an unsharded
    tensor), the form a custom op takes; None when no tensor is sharded."""
    if spans is None or all(s is None for s in spans):
        return None
    out: list = []
    for s in spans:
        out.extend((-1, 0, 0) if s is None else (int(s[0]), int(s[1]), int(s[2])))
    return out


def unflatten_spans(flat: Optional[Sequence[int]]) -> Optional[list]:
    """The inverse of :func:`flatten_spans`."""
    if flat is None:
        return None
    triples = (tuple(flat[i : i + 3]) for i in range(0, len(flat), 3))
    return [None if t[0] < 0 else Span(*t) for t in triples]
