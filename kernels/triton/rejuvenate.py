"""The rejuvenation family: ``rejuvenate_`` (Bernoulli + log-normal magnitude + random sign) and
``rejuvenate_legacy_`` (the original published rule), replaced counts summed on the device.
Formulas and the Philox outputs used are those of ``torch_backend``."""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from ..stats import clean_weights_, current_reduction, legacy_stats_many, rejuvenation_stats_many
from . import reduce
from .draws import (
    draw_index,
    draw_run,
    for_block,
    grouped,
    normals,
    row_aligned,
    uniform,
    uniforms,
    words_of,
)
from .launch import (
    LIST_INDEX,
    clamp,
    fast_exp,
    flat_offsets,
    launch,
    operand,
    round_to,
    stream_of,
    tile,
)

Tensor = torch.Tensor
Tensors = Sequence[Tensor]


@triton.jit
def _count_replaced(counts, out_index, replace, offs, n, MASKED: tl.constexpr):
    hits = replace
    if MASKED:
        hits = hits & (offs < n)  # masked-off lanes hold junk draws: never count them
    # at most BLOCK per block: summed in 32 bits (half the shuffles), added to the int64 count
    total = tl.sum(hits.to(tl.int32), axis=0)
    tl.atomic_add(counts + out_index, total.to(tl.int64), sem="relaxed")


@triton.jit
def _rejuvenate_body(
    ptrs, values, row, offs, n, FLAGS: tl.constexpr, MASKED: tl.constexpr, GROUPED: tl.constexpr
):
    (w_ptr,) = ptrs
    key, start, base, coef, mu, sigma, counts, out_index = values
    S: tl.constexpr = FLAGS[0]
    NDIM: tl.constexpr = FLAGS[1]
    BLOCK: tl.constexpr = FLAGS[2]
    RUN: tl.constexpr = draw_run(w_ptr.dtype.element_ty)
    mask = offs < n if MASKED else None
    # Two Philox calls per four elements: stream 0 decides and signs, stream 1 the normals.
    idx = draw_index(row, offs, base, S, NDIM, GROUPED)  # the index math once for both draws
    word = words_of(key, idx, start, base, BLOCK, 0, GROUPED, RUN)
    z = normals(key, idx, start, base, BLOCK, 1, GROUPED, RUN)
    w = tl.load(w_ptr + offs, mask=mask).to(tl.float32)
    # Random decisions and draws: fast exp, and -dre/std once per block instead of a division
    # per element (within an ulp or two of the torch backend's; flips only at the threshold).
    replace = uniform(word) < fast_exp(tl.abs(w) * coef)
    magnitude = fast_exp(mu + sigma * z)
    positive = word.to(tl.int32, bitcast=True) >= 0  # bit 31 clear; U(word) folds it away
    new = clamp(tl.where(positive, magnitude, -magnitude), -1.0, 1.0)
    tl.store(w_ptr + offs, round_to(tl.where(replace, new, w), w_ptr.dtype.element_ty), mask=mask)
    _count_replaced(counts, out_index, replace, offs, n, MASKED)


@triton.jit
def _rejuvenate_kernel(
    tab, blocks, W0, neg_dre, keys, stats, counts,
    S: tl.constexpr, W: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    NDIM: tl.constexpr, INDEX32: tl.constexpr,
):  # fmt: skip
    t, row, n, offs, start, full = tile(tab, blocks, W, S, BLOCK, INDEX32)
    key, base = stream_of(keys, t)
    std = tl.load(stats + 3 * t)  # stats.rejuvenation_stats, on the device
    mu = tl.load(stats + 3 * t + 1)
    sigma = tl.load(stats + 3 * t + 2)
    out_index = tl.load(row + S + LIST_INDEX)
    # -dre/std once per block (the approximate division: no slow-path branch in the prologue)
    values = (key, start, base, tl.math.fdiv(neg_dre, std), mu, sigma, counts, out_index)
    ptrs = (operand(row, 0, W0, ALIGNED),)
    draw = grouped(row, start, base, S, NDIM)
    aligned = row_aligned(row, 1, ALIGNED)
    fast = (operand(row, 0, W0, True),)
    for_block(
        _rejuvenate_body, fast, ptrs, values, row, offs, n, full, draw, aligned, (S, NDIM, BLOCK)
    )


def _zero_counts(weights: list) -> Tensor:
    if not weights:
        return torch.zeros(0, dtype=torch.int64)
    return torch.zeros(len(weights), dtype=torch.int64, device=weights[0].device)


def rejuvenate_(weights: Tensors, keys: Sequence[int], dre: float, spans=None) -> Tensor:
    """Replace weights at random, most likely where ``|w|`` is small relative to ``std(w)``
    (formula in ``torch_backend.rejuvenate_``). Philox: ``rng.rejuvenation_draws`` (the
    element's stream-0 word decides and signs, ``N(i)`` of stream 1). Returns the number of
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
def _legacy_body(
    ptrs, values, row, offs, n, FLAGS: tl.constexpr, MASKED: tl.constexpr, GROUPED: tl.constexpr
):
    (w_ptr,) = ptrs
    key, start, base, max_aw, scale, counts, out_index = values
    S: tl.constexpr = FLAGS[0]
    NDIM: tl.constexpr = FLAGS[1]
    BLOCK: tl.constexpr = FLAGS[2]
    RUN: tl.constexpr = draw_run(w_ptr.dtype.element_ty)
    mask = offs < n if MASKED else None
    idx = draw_index(row, offs, base, S, NDIM, GROUPED)  # the index math once for both draws
    z = normals(key, idx, start, base, BLOCK, 0, GROUPED, RUN)  # the threshold's
    u = uniforms(key, idx, start, base, BLOCK, 1, GROUPED, RUN)  # the new value's
    w = tl.load(w_ptr + offs, mask=mask).to(tl.float32)
    replace = tl.abs(w) < tl.abs(z * scale)
    new = (2.0 * u - 1.0) * max_aw
    tl.store(w_ptr + offs, round_to(tl.where(replace, new, w), w_ptr.dtype.element_ty), mask=mask)
    _count_replaced(counts, out_index, replace, offs, n, MASKED)


@triton.jit
def _legacy_kernel(
    tab, blocks, W0, keys, stats, counts,
    S: tl.constexpr, W: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    NDIM: tl.constexpr, INDEX32: tl.constexpr,
):  # fmt: skip
    t, row, n, offs, start, full = tile(tab, blocks, W, S, BLOCK, INDEX32)
    key, base = stream_of(keys, t)
    max_aw = tl.load(stats + 2 * t)  # stats.legacy_stats, on the device
    scale = tl.load(stats + 2 * t + 1)
    out_index = tl.load(row + S + LIST_INDEX)
    values = (key, start, base, max_aw, scale, counts, out_index)
    ptrs = (operand(row, 0, W0, ALIGNED),)
    draw = grouped(row, start, base, S, NDIM)
    aligned = row_aligned(row, 1, ALIGNED)
    fast = (operand(row, 0, W0, True),)
    for_block(_legacy_body, fast, ptrs, values, row, offs, n, full, draw, aligned, (S, NDIM, BLOCK))


def rejuvenate_legacy_(weights: Tensors, keys: Sequence[int], dre: float, spans=None) -> Tensor:
    """The original published rule (``torch_backend.rejuvenate_legacy_``): threshold
    ``|N(0, max|w|/dre)|`` from ``N(i)`` (stream 0), new value ``(2*U(i) - 1)*max|w|``
    (stream 1). Returns the replaced count per tensor (int64, on the device)."""
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
