"""Prepared launches: the fused step over FIXED tensors, re-run every training step with no
Python planning per layer (the host-light path behind the model-level ``bio_step``).

:func:`launch.launch` plans every call from scratch: it filters, groups, stages and keys the
tensors (a dozen Python operations per layer, ~300 µs for 100 layers). A
:class:`PreparedStep` does that once for a group of layers and keeps the result: its plans
(tables and buffers, held here, so the plan cache can never free them under it), the
kernel's scalars and flags, and the addresses the tables were built from. A call then only

1. checks (:meth:`PreparedStep.matches`) that the tensors still lie where the tables say:
   the addresses of the weights, and the addresses and strides of this step's gradients,
   which autograd may have reallocated. The rates' addresses are the caller's check
   (``step_cache.CachedStep.valid`` reads every layer's current rates buffer, which also
   catches a replaced buffer);
2. starts (:meth:`PreparedStep.launch`) the statistics pass (two launches, :mod:`.reduce`)
   when crystallization runs, and the step kernel (one launch), on the plan's buffers.

So a model-level ``bio_step()`` of one layer group is at most 3 launches, with no
``torch.stack``, no per-layer statistics launches and no host tensor per call (the keys, when
volume scaling runs, go through the plan's pinned buffers: :meth:`launch.Plan.keys`).
What it does not check: a weight or rates tensor re-pointed (``.data = ...``) to memory at
the SAME address with another shape or strides.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ..contract import StepParams
from . import reduce
from .launch import _on, fire, groups
from .step import _step_kernel, step_operands, step_scalars, step_switches

Tensor = torch.Tensor

_data_ptr = torch.Tensor.data_ptr
_stride = torch.Tensor.stride
_is_contiguous = torch.Tensor.is_contiguous
#: CUDA builds of torch check a list of data pointers in C++ (what CUDA graph trees use).
_ptrs_equal_c = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal", None)


def addresses_equal(tensors: list, ptrs: list, index: list) -> bool:
    """Whether ``tensors[i].data_ptr() == ptrs[i]`` for every ``i`` (``index`` is
    ``range(len(tensors))`` as a list, for the C++ check where torch has it). Raises
    TypeError (the C++ check: RuntimeError) when one of ``tensors`` is None."""
    return list(map(_data_ptr, tensors)) == ptrs


if _ptrs_equal_c is not None:
    addresses_equal = _ptrs_equal_c  # noqa: F811  (same contract, in C++)


class Unpreparable(Exception):
    """These tensors need per-call staging (a layout the kernels cannot index): use
    :func:`step.bio_step_`."""


class PreparedStep:
    """``step.bio_step_(weights, grads, rates, keys, params)`` over these weights and rates,
    planned once; each step :meth:`matches` then :meth:`launch` this step's gradients (and
    keys)."""

    def __init__(
        self, weights: Sequence[Tensor], grads: Sequence[Tensor], rates, params: StepParams
    ):
        p = self.params = params
        weights, grads = list(weights), list(grads)
        uses_rates = p.fuzzy or p.crystallize
        elems, written = step_operands(weights, grads, rates, p)
        self.groups = groups(elems, [], written)
        if any(g.copy_back for g in self.groups):
            raise Unpreparable("a tensor runs on a staged copy")
        for g in self.groups:
            g.cols = g.rcols = None  # hold no tensor (an old gradient kept alive would move
            # the next one to a new address)
        # per launch group: the device context it launches in (made once: reusable)
        self.contexts = [_on(g.plan.device) for g in self.groups]
        self.fixed = weights + (elems[2] if uses_rates else [])
        self.weights = weights
        self.weight_ptrs = list(map(_data_ptr, weights))
        self.grad_ptrs = list(map(_data_ptr, grads))
        # Layout check: ``is_contiguous`` for all (cheaper than strides), full strides of the
        # gradients that are not contiguous (channels_last, transposed).
        self.grad_contiguous = list(map(_is_contiguous, grads))
        self.permuted = [i for i, c in enumerate(self.grad_contiguous) if not c]
        self.grad_strides = [grads[i].stride() for i in self.permuted]
        self._index = list(range(len(grads)))
        self.n = len(grads)
        self.scalars = step_scalars(p)
        self.meta = step_switches(p)
        self.uses_rates = uses_rates

    def matches(self, grads: List[Optional[Tensor]]) -> bool:
        """Whether the tables still describe these gradients (False when one is None) and the
        weights."""
        if len(grads) != self.n:
            return False
        try:
            if not addresses_equal(grads, self.grad_ptrs, self._index):
                return False
        except (TypeError, RuntimeError):  # a gradient is None (torch's C++ check: a cast error)
            return False
        return (
            [grads[i].stride() for i in self.permuted] == self.grad_strides
            and list(map(_is_contiguous, grads)) == self.grad_contiguous
            if self.permuted
            else all(map(_is_contiguous, grads))
        ) and addresses_equal(self.weights, self.weight_ptrs, self._index)

    def launch(self, grads: List[Tensor], keys: Optional[Sequence[int]] = None) -> None:
        """One step with this step's ``grads`` (same order as at preparation, as checked by
        :meth:`matches`) and, when volume scaling runs, one key per layer (or a
        ``keys.DeviceKeys``)."""
        p = self.params
        n = self.n
        for g, context in zip(self.groups, self.contexts):
            first = g.index[0]
            w0, g0 = self.fixed[first], grads[first]
            witnesses = [w0, g0, self.fixed[n + first]] if self.uses_rates else [w0, g0]
            optional = {"keys": None, "stats": None}
            with context:
                g.plan.use()  # before this call writes any of the plan's buffers
                if p.volume and hasattr(keys, "derive"):  # capturable: keys.DeviceKeys
                    optional["keys"] = keys.derive(g.plan, g.index)
                elif p.volume:
                    optional["keys"] = g.plan.keys([v for i in g.index for v in (keys[i], 0)])
                if p.crystallize:
                    optional.update(reduce.crystallize_stats(g, (w0, g0)))
                fire(_step_kernel, g, witnesses, optional, self.scalars, self.meta)
