"""The gradient step family: ``fuzzy_scale_``, and volume scaling, fuzzy scaling and
crystallization fused in one pass (``bio_step_``; ``crystallize_`` and ``volume_scale_`` are its
one-stage cases). Formulas and the Philox outputs used are those of ``torch_backend``."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ..contract import StepParams, one_stage_ops
from ..stats import crystallize_stats, current_reduction
from . import reduce
from .draws import draw_index, draw_run, for_block, grouped, normals, row_aligned
from .launch import exp, flat_offsets, launch, operand, round_to, stream_of, tile

Tensor = torch.Tensor
Tensors = Sequence[Tensor]


@triton.jit
def _fuzzy_body(
    ptrs, values, row, offs, n, FLAGS: tl.constexpr, MASKED: tl.constexpr, GROUPED: tl.constexpr
):
    g_ptr, p_ptr = ptrs
    mask = offs < n if MASKED else None
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    tl.store(g_ptr + offs, round_to(g * p, g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fuzzy_kernel(
    tab, blocks, G0, P0,
    S: tl.constexpr, W: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    NDIM: tl.constexpr, INDEX32: tl.constexpr,
):  # fmt: skip
    t, row, n, offs, start, full = tile(tab, blocks, W, S, BLOCK, INDEX32)
    ptrs = (operand(row, 0, G0, ALIGNED), operand(row, 1, P0, ALIGNED))
    fast = (operand(row, 0, G0, True), operand(row, 1, P0, True))
    aligned = row_aligned(row, 2, ALIGNED)
    for_block(_fuzzy_body, fast, ptrs, (0,), row, offs, n, full, None, aligned, (S, NDIM))


def fuzzy_scale_(grads: Tensors, rates: Tensors) -> None:
    """``g *= p`` for every (grad, rates) pair."""
    launch(_fuzzy_kernel, [list(grads), list(rates)], written=(0,))


@triton.jit
def _step_body(
    ptrs, values, row, offs, n, FLAGS: tl.constexpr, MASKED: tl.constexpr, GROUPED: tl.constexpr
):
    w_ptr, g_ptr, p_ptr = ptrs
    key, start, base, mean_aw, nonzero, base_lr, neg_stability, variability, thresh, damp = values
    S: tl.constexpr = FLAGS[0]
    NDIM: tl.constexpr = FLAGS[1]
    VOLUME: tl.constexpr = FLAGS[2]
    FUZZY: tl.constexpr = FLAGS[3]
    CRYSTALLIZE: tl.constexpr = FLAGS[4]
    BLOCK: tl.constexpr = FLAGS[5]
    mask = offs < n if MASKED else None
    GT: tl.constexpr = g_ptr.dtype.element_ty
    aw = tl.abs(tl.load(w_ptr + offs, mask=mask).to(tl.float32))
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    if VOLUME:
        # correctly rounded: the torch backend's factor, bit for bit (only z is a draw)
        m = base_lr * exp(neg_stability * tl.math.div_rn(aw, aw + 1.0))
        # N(i): one Philox call per four elements, both Box-Muller outputs used
        idx = draw_index(row, offs, base, S, NDIM, GROUPED)
        z = normals(key, idx, start, base, BLOCK, 0, GROUPED, draw_run(GT))
        g = round_to(g * (m * tl.abs(1.0 + variability * z)), GT).to(tl.float32)  # as stored
    if FUZZY or CRYSTALLIZE:
        p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    if FUZZY:
        g = round_to(g * p, GT).to(tl.float32)
    if VOLUME or FUZZY:
        tl.store(g_ptr + offs, round_to(g, GT), mask=mask)
    if CRYSTALLIZE:
        ag = tl.abs(g)
        hit = (ag < thresh * aw) | (ag > mean_aw)  # |g|/|w| < t as |g| < t*|w|, like torch
        hit = hit & (tl.zeros_like(ag) + nonzero > 0.0)  # all-zero gradient: no crystallizing
        damped = tl.where(hit, p * damp, p)
        tl.store(p_ptr + offs, round_to(damped, p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _step_kernel(
    tab, blocks, W0, G0, P0,
    base_lr, neg_stability, variability, thresh, damp, keys, stats,
    S: tl.constexpr, W: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    NDIM: tl.constexpr, INDEX32: tl.constexpr, VOLUME: tl.constexpr, FUZZY: tl.constexpr,
    CRYSTALLIZE: tl.constexpr,
):  # fmt: skip
    t, row, n, offs, start, full = tile(tab, blocks, W, S, BLOCK, INDEX32)
    w_ptr = operand(row, 0, W0, ALIGNED)
    g_ptr = operand(row, 1, G0, ALIGNED)
    # The alignment hint must sit on the pointer's own load: the fast body's copies.
    w_fast = operand(row, 0, W0, True)
    g_fast = operand(row, 1, G0, True)
    if FUZZY or CRYSTALLIZE:
        p_ptr = operand(row, 2, P0, ALIGNED)
        p_fast = operand(row, 2, P0, True)
    else:
        p_ptr = g_ptr  # volume scaling alone has no rates operand; never read
        p_fast = g_fast
    key = 0
    base = 0
    if VOLUME:
        key, base = stream_of(keys, t)
    mean_aw = 0.0
    nonzero = 0.0
    if CRYSTALLIZE:
        mean_aw = tl.load(stats + 2 * t)  # stats.abs_means, computed on the device
        nonzero = tl.load(stats + 2 * t + 1)  # stats.grads_nonzero, of the unscaled gradient
    values = (key, start, base, mean_aw, nonzero, base_lr, neg_stability, variability, thresh,
              damp)  # fmt: skip
    for_block(
        _step_body,
        (w_fast, g_fast, p_fast),
        (w_ptr, g_ptr, p_ptr),
        values,
        row,
        offs,
        n,
        full,
        grouped(row, start, base, S, NDIM) if VOLUME else None,
        row_aligned(row, S, ALIGNED),  # S: the step's operands are all elementwise
        (S, NDIM, VOLUME, FUZZY, CRYSTALLIZE, BLOCK),
    )


def bio_step_(
    weights: Tensors,
    grads: Tensors,
    rates: Optional[Tensors],
    keys: Optional[Sequence[int]],
    params: StepParams,
    spans=None,
) -> None:
    """Volume scaling, fuzzy scaling and crystallization (each as ``params`` says) in ONE pass
    over memory; equal to the separate ops called in that order with the same key (the
    gradient is rounded to its dtype between the stages, as the separate ops store it).
    ``spans``: local shards of a sharded layer draw at their global index."""
    p = params
    if not p.any:
        return
    weights, grads = list(weights), list(grads)
    offsets = flat_offsets(weights, spans) if p.volume else None
    elems, written = step_operands(weights, grads, rates, p)
    # Crystallization's statistics: two launches over the step's own table (a sharded group
    # reduces them across ranks through stats instead).
    on_device = p.crystallize and current_reduction() is None
    launch(
        _step_kernel, elems, written=written,
        keys=keys if p.volume else None, offsets=offsets,
        stats=[[m, nz] for m, nz in zip(*crystallize_stats(weights, grads))]
        if p.crystallize and not on_device
        else None,
        prelude=reduce.crystallize_stats if on_device else None,
        scalars=step_scalars(p), **step_switches(p),
    )  # fmt: skip


def step_operands(weights: list, grads: list, rates, p: StepParams) -> tuple:
    """``(elems, written)`` of the step kernel's launch: the element slots ``[w, g]`` plus
    ``p`` when a stage reads the rates, and the slots it writes (g: volume/fuzzy; p:
    crystallize)."""
    elems = [weights, grads] + ([list(rates)] if p.fuzzy or p.crystallize else [])
    written = ((1,) if p.volume or p.fuzzy else ()) + ((2,) if p.crystallize else ())
    return elems, written


def step_scalars(p: StepParams) -> tuple:
    """The step kernel's scalar arguments; without rates its P0 is None (it goes first: it
    follows the witnesses)."""
    return (() if p.fuzzy or p.crystallize else (None,)) + (
        float(p.base_lr), -float(p.stability_factor), float(p.lr_variability),
        float(p.crystal_thresh), float(p.dampening),
    )  # fmt: skip


def step_switches(p: StepParams) -> dict:
    """The step kernel's stage constexprs."""
    return dict(VOLUME=p.volume, FUZZY=p.fuzzy, CRYSTALLIZE=p.crystallize)


# The one-stage ops are this fused step with one stage on.
crystallize_, volume_scale_ = one_stage_ops(bio_step_)
