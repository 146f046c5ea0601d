"""Dale's principle: ``dale_enforce_``, ``w = relu(w * sign) * sign`` with one sign per output
unit."""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from .draws import for_block, row_aligned
from .launch import launch, logical, operand, per_unit, round_to, tile, unit_of

Tensor = torch.Tensor
Tensors = Sequence[Tensor]


@triton.jit
def _dale_body(
    ptrs, values, row, offs, n, FLAGS: tl.constexpr, MASKED: tl.constexpr, GROUPED: tl.constexpr
):
    w_ptr, s_ptr = ptrs
    S: tl.constexpr = FLAGS[0]
    NDIM: tl.constexpr = FLAGS[1]
    mask = offs < n if MASKED else None
    unit = unit_of(row, logical(row, offs, S, NDIM), S)
    w = tl.load(w_ptr + offs, mask=mask).to(tl.float32)
    s = tl.load(s_ptr + unit, mask=mask).to(tl.float32)
    out = tl.maximum(w * s, 0.0, propagate_nan=tl.PropagateNan.ALL) * s
    tl.store(w_ptr + offs, round_to(out, w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dale_kernel(
    tab, blocks, W0, S0,
    S: tl.constexpr, W: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    NDIM: tl.constexpr, INDEX32: tl.constexpr,
):  # fmt: skip
    t, row, n, offs, _, full = tile(tab, blocks, W, S, BLOCK, INDEX32)
    ptrs = (operand(row, 0, W0, ALIGNED), per_unit(row, 1, S0))
    fast = (operand(row, 0, W0, True), ptrs[1])  # the signs are gathered per unit: no hint
    aligned = row_aligned(row, 1, ALIGNED)
    for_block(_dale_body, fast, ptrs, (0,), row, offs, n, full, None, aligned, (S, NDIM))


def dale_enforce_(weights: Tensors, signs: Tensors) -> None:
    """``w = relu(w * sign) * sign`` with one sign (+1 or -1) per output unit (weight row)."""
    launch(_dale_kernel, [list(weights)], rows=[list(signs)], written=(0,))
