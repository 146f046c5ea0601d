"""The rejuvenation family: ``rejuvenate_`` (Bernoulli + log-normal magnitude + random sign) and
``rejuvenate_legacy_`` (the original published rule), replaced counts summed on the device.
Formulas and the Philox outputs used are those of ``torch_backend``."""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl
from triton.language.random import pair_uniform_to_normal, uint_to_uniform_float

from ..stats import clean_weights_, current_reduction, legacy_stats_many, rejuvenation_stats_many
from . import reduce
from .launch import (
    LIST_INDEX,
    clamp,
    exp,
    flat_offsets,
    for_tile,
    launch,
    logical,
    operand,
    round_to,
    stream_of,
    tile,
)

Tensor = torch.Tensor
Tensors = Sequence[Tensor]


@triton.jit
def _count_replaced(counts, out_index, replace, offs, n):
    hits = replace & (offs < n)  # masked-off lanes hold junk draws: never count them
    tl.atomic_add(counts + out_index, tl.sum(hits.to(tl.int64), axis=0), sem="relaxed")


@triton.jit
def _rejuvenate_body(ptrs, values, row, offs, n, FLAGS: tl.constexpr, MASKED: tl.constexpr):
    (w_ptr,) = ptrs
    key, std, mu, sigma, neg_dre, counts, out_index, base = values
    S: tl.constexpr = FLAGS[0]
    NDIM: tl.constexpr = FLAGS[1]
    mask = offs < n if MASKED else None
    w = tl.load(w_ptr + offs, mask=mask).to(tl.float32)
    r0, r1, r2, r3 = tl.randint4x(key, logical(row, offs, S, NDIM) + base)
    u_replace = uint_to_uniform_float(r0)
    u_sign = uint_to_uniform_float(r1)
    normal, _ = pair_uniform_to_normal(uint_to_uniform_float(r2), uint_to_uniform_float(r3))
    replace = u_replace < exp(tl.math.div_rn(neg_dre * tl.abs(w), std))
    magnitude = exp(mu + sigma * normal)
    new = clamp(tl.where(u_sign < 0.5, magnitude, -magnitude), -1.0, 1.0)
    tl.store(w_ptr + offs, round_to(tl.where(replace, new, w), w_ptr.dtype.element_ty), mask=mask)
    _count_replaced(counts, out_index, replace, offs, n)


@triton.jit
def _rejuvenate_kernel(
    tab, blocks, W0, neg_dre, keys, stats, counts,
    S: tl.constexpr, W: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    NDIM: tl.constexpr,
):  # fmt: skip
    t, row, n, offs, full = tile(tab, blocks, W, S, BLOCK)
    key, base = stream_of(keys, t)
    std = tl.load(stats + 3 * t)  # stats.rejuvenation_stats, on the device
    mu = tl.load(stats + 3 * t + 1)
    sigma = tl.load(stats + 3 * t + 2)
    out_index = tl.load(row + S + LIST_INDEX)
    values = (key, std, mu, sigma, neg_dre, counts, out_index, base)
    for_tile(
        _rejuvenate_body, (operand(row, 0, W0, ALIGNED),), values, row, offs, n, full, (S, NDIM)
    )


def _zero_counts(weights: list) -> Tensor:
    if not weights:
        return torch.zeros(0, dtype=torch.int64)
    return torch.zeros(len(weights), dtype=torch.int64, device=weights[0].device)


def rejuvenate_(weights: Tensors, keys: Sequence[int], dre: float, spans=None) -> Tensor:
    """Replace weights at random, most likely where ``|w|`` is small relative to ``std(w)``
    (formula in ``torch_backend.rejuvenate_``). Philox: ``r0`` decides, ``r1 < 0.5`` is a
    positive sign, ``n`` is the first Box-Muller normal of ``(r2, r3)``. Returns the number of
    replaced weights per tensor (int64, on the device; counted with atomics in the kernel)."""
    weights = list(weights)
    counts = _zero_counts(weights)
    offsets = flat_offsets(weights, spans)
    if current_reduction() is None:
        # Cleaning and statistics in one pass over the weights, two launches for the group
        # (reduce.rejuvenation_stats), instead of ~35 small ops per layer.
        launch(
            _rejuvenate_kernel, [weights], written=(0,), keys=list(keys), offsets=offsets,
            counts=counts, scalars=(-float(dre),), prelude=reduce.rejuvenation_stats,
        )  # fmt: skip
        return counts
    clean_weights_(weights)
    # Every weight's statistics (a sharded group: one all-reduce, empty shards included).
    fits = rejuvenation_stats_many(weights)
    stats = [list(fit) if w.numel() else [] for w, fit in zip(weights, fits)]
    launch(
        _rejuvenate_kernel, [weights], written=(0,), keys=list(keys), offsets=offsets,
        stats=stats, counts=counts, scalars=(-float(dre),),
    )  # fmt: skip
    return counts


@triton.jit
def _legacy_body(ptrs, values, row, offs, n, FLAGS: tl.constexpr, MASKED: tl.constexpr):
    (w_ptr,) = ptrs
    key, max_aw, scale, counts, out_index, base = values
    S: tl.constexpr = FLAGS[0]
    NDIM: tl.constexpr = FLAGS[1]
    mask = offs < n if MASKED else None
    w = tl.load(w_ptr + offs, mask=mask).to(tl.float32)
    r0, r1, r2, _ = tl.randint4x(key, logical(row, offs, S, NDIM) + base)
    normal, _ = pair_uniform_to_normal(uint_to_uniform_float(r0), uint_to_uniform_float(r1))
    replace = tl.abs(w) < tl.abs(normal * scale)
    new = (2.0 * uint_to_uniform_float(r2) - 1.0) * max_aw
    tl.store(w_ptr + offs, round_to(tl.where(replace, new, w), w_ptr.dtype.element_ty), mask=mask)
    _count_replaced(counts, out_index, replace, offs, n)


@triton.jit
def _legacy_kernel(
    tab, blocks, W0, keys, stats, counts,
    S: tl.constexpr, W: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    NDIM: tl.constexpr,
):  # fmt: skip
    t, row, n, offs, full = tile(tab, blocks, W, S, BLOCK)
    key, base = stream_of(keys, t)
    max_aw = tl.load(stats + 2 * t)  # stats.legacy_stats, on the device
    scale = tl.load(stats + 2 * t + 1)
    out_index = tl.load(row + S + LIST_INDEX)
    values = (key, max_aw, scale, counts, out_index, base)
    for_tile(_legacy_body, (operand(row, 0, W0, ALIGNED),), values, row, offs, n, full, (S, NDIM))


def rejuvenate_legacy_(weights: Tensors, keys: Sequence[int], dre: float, spans=None) -> Tensor:
    """The original published rule (``torch_backend.rejuvenate_legacy_``): threshold
    ``|N(0, max|w|/dre)|`` from the Box-Muller normal of ``(r0, r1)``, new value
    ``(2*r2 - 1)*max|w|``. Returns the replaced count per tensor (int64, on the device)."""
    weights = list(weights)
    for w in weights:
        w.nan_to_num_(nan=0.0)
    stats = [list(s) if w.numel() else [] for w, s in zip(weights, legacy_stats_many(weights, dre))]
    counts = _zero_counts(weights)
    offsets = flat_offsets(weights, spans)
    launch(
        _legacy_kernel, [weights], written=(0,), keys=list(keys), offsets=offsets, stats=stats,
        counts=counts,
    )  # fmt: skip
    return counts
