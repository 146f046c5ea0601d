"""The rate family: initial draws (``rates_init_``) and the dynamic updates (temporal,
weight-adaptive, activity). Formulas and the Philox outputs used are those of
``torch_backend``; gamma and beta initial draws use ``torch_backend.rates_init_`` (torch's
samplers, a one-time draw)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from .. import settings, torch_backend
from ..stats import abs_means, activity_stats
from .draws import (
    draw_index,
    draw_run,
    for_block,
    grouped,
    normals,
    row_aligned,
    run_lanes,
    uniforms,
)
from .launch import (
    ROW_LEN,
    clamp,
    fast_exp,
    flat_offsets,
    launch,
    logical,
    operand,
    per_unit,
    round_to,
    stream_of,
    tile,
    unit_of,
)

Tensor = torch.Tensor
Tensors = Sequence[Tensor]

#: The initial distributions drawn in-kernel, and their kernel MODE.
_RATE_MODES = {"baseline": 0, "uniform": 1, "normal": 2, "lognormal": 3}


@triton.jit
def _init_body(
    ptrs, values, row, offs, n, FLAGS: tl.constexpr, MASKED: tl.constexpr, GROUPED: tl.constexpr
):
    (p_ptr,) = ptrs
    key, start, nu, shift, lo, hi = values
    S: tl.constexpr = FLAGS[0]
    NDIM: tl.constexpr = FLAGS[1]
    MODE: tl.constexpr = FLAGS[2]
    BLOCK: tl.constexpr = FLAGS[3]
    RUN: tl.constexpr = draw_run(p_ptr.dtype.element_ty)
    mask = offs < n if MASKED else None
    if MODE > 0:  # initial draws: whole layers, no shard offset
        idx = draw_index(row, offs, 0, S, NDIM, GROUPED)
    if MODE == 1:
        draw = uniforms(key, idx, start, 0, BLOCK, 0, GROUPED, RUN)
    elif MODE > 1:
        draw = normals(key, idx, start, 0, BLOCK, 0, GROUPED, RUN)
    if MODE == 0:
        value = tl.full(offs.shape, 1.0, tl.float32)  # baseline: no clamp, as torch's fill_
    elif MODE == 1:
        value = clamp(1.0 + (2.0 * draw - 1.0) * nu, lo, hi)
    elif MODE == 2:
        value = clamp(1.0 + nu * draw, lo, hi)
    else:  # lognormal: a random draw, so the fast exp (a few ulp)
        value = clamp(fast_exp(shift + nu * draw), lo, hi)
    tl.store(p_ptr + offs, round_to(value, p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _init_kernel(
    tab, blocks, P0, nu, shift, lo, hi, keys,
    S: tl.constexpr, W: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    NDIM: tl.constexpr, INDEX32: tl.constexpr, MODE: tl.constexpr,
):  # fmt: skip
    t, row, n, offs, start, full = tile(tab, blocks, W, S, BLOCK, INDEX32)
    key = 0
    if MODE != 0:  # baseline draws nothing (and gets no keys)
        key, _ = stream_of(keys, t)
    values = (key, start, nu, shift, lo, hi)
    draw = grouped(row, start, 0, S, NDIM) if MODE != 0 else None
    ptrs = (operand(row, 0, P0, ALIGNED),)
    aligned = row_aligned(row, 1, ALIGNED)
    fast = (operand(row, 0, P0, True),)
    for_block(
        _init_body, fast, ptrs, values, row, offs, n, full, draw, aligned, (S, NDIM, MODE, BLOCK)
    )


def rates_init_(
    rates: Tensors, keys: Sequence[int], distribution: str, nu: float, lo: float, hi: float
) -> None:
    """Initial rates, clamped to ``[lo, hi]`` (formulas in ``torch_backend.rates_init_``).

    baseline/uniform/normal/lognormal run here (``U(i)``/``N(i)``); gamma and beta, and
    unknown names (for the error), go to ``torch_backend.rates_init_``.
    """
    rates = list(rates)
    mode = _RATE_MODES.get(distribution)
    if mode is None:
        return torch_backend.rates_init_(rates, keys, distribution, nu, lo, hi)
    nu = float(nu)
    launch(
        _init_kernel, [rates], written=(0,), keys=None if mode == 0 else list(keys),
        scalars=(nu, -0.5 * nu * nu, float(lo), float(hi)), MODE=mode,
    )  # fmt: skip


@triton.jit
def _temporal_body(
    ptrs, values, row, offs, n, FLAGS: tl.constexpr, MASKED: tl.constexpr, GROUPED: tl.constexpr
):
    (p_ptr,) = ptrs
    key, start, base, decay, noise, lo, hi = values
    S: tl.constexpr = FLAGS[0]
    NDIM: tl.constexpr = FLAGS[1]
    NOISY: tl.constexpr = FLAGS[2]
    BLOCK: tl.constexpr = FLAGS[3]
    mask = offs < n if MASKED else None
    value = 1.0 + (tl.load(p_ptr + offs, mask=mask).to(tl.float32) - 1.0) * decay
    if NOISY:
        idx = draw_index(row, offs, base, S, NDIM, GROUPED)
        u = uniforms(key, idx, start, base, BLOCK, 0, GROUPED, draw_run(p_ptr.dtype.element_ty))
        value = value + noise * (2.0 * u - 1.0)
    tl.store(p_ptr + offs, round_to(clamp(value, lo, hi), p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _temporal_kernel(
    tab, blocks, P0, decay, noise, lo, hi, keys,
    S: tl.constexpr, W: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    NDIM: tl.constexpr, INDEX32: tl.constexpr, NOISY: tl.constexpr,
):  # fmt: skip
    t, row, n, offs, start, full = tile(tab, blocks, W, S, BLOCK, INDEX32)
    key = 0
    base = 0
    if NOISY:
        key, base = stream_of(keys, t)
    values = (key, start, base, decay, noise, lo, hi)
    draw = grouped(row, start, base, S, NDIM) if NOISY else None
    ptrs = (operand(row, 0, P0, ALIGNED),)
    aligned = row_aligned(row, 1, ALIGNED)
    fast = (operand(row, 0, P0, True),)
    for_block(
        _temporal_body,
        fast,
        ptrs,
        values,
        row,
        offs,
        n,
        full,
        draw,
        aligned,
        (S, NDIM, NOISY, BLOCK),
    )


def temporal_update_(
    rates: Tensors,
    keys: Optional[Sequence[int]],
    decay: float,
    noise: float,
    lo: float,
    hi: float,
    spans=None,
) -> None:
    """``p = clamp(1 + (p-1)*decay + noise*(2U-1), lo, hi)``; no draw when ``noise == 0``.

    Philox: ``U = U(i)`` (``kernels/triton/draws.py``).
    """
    noisy = noise != 0.0
    if noisy and keys is None:
        raise ValueError("temporal_update_ needs keys when noise is drawn")
    rates = list(rates)
    offsets = flat_offsets(rates, spans) if noisy else None
    launch(
        _temporal_kernel, [rates], written=(0,), keys=list(keys) if noisy else None,
        offsets=offsets, scalars=(float(decay), float(noise), float(lo), float(hi)),
        NOISY=noisy,
    )  # fmt: skip


@triton.jit
def _adaptive_body(
    ptrs, values, row, offs, n, FLAGS: tl.constexpr, MASKED: tl.constexpr, GROUPED: tl.constexpr
):
    p_ptr, w_ptr = ptrs
    key, start, base, denominator, nu, lo, hi = values
    S: tl.constexpr = FLAGS[0]
    NDIM: tl.constexpr = FLAGS[1]
    BLOCK: tl.constexpr = FLAGS[2]
    mask = offs < n if MASKED else None
    idx = draw_index(row, offs, base, S, NDIM, GROUPED)
    u = uniforms(key, idx, start, base, BLOCK, 0, GROUPED, draw_run(p_ptr.dtype.element_ty))
    aw = tl.abs(tl.load(w_ptr + offs, mask=mask).to(tl.float32))
    scale = clamp(2.0 - tl.math.div_rn(aw, denominator), 0.5, 1.5)
    value = clamp(1.0 + (2.0 * u - 1.0) * nu * scale, lo, hi)
    tl.store(p_ptr + offs, round_to(value, p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adaptive_kernel(
    tab, blocks, P0, W0, nu, lo, hi, keys, stats,
    S: tl.constexpr, W: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    NDIM: tl.constexpr, INDEX32: tl.constexpr,
):  # fmt: skip
    t, row, n, offs, start, full = tile(tab, blocks, W, S, BLOCK, INDEX32)
    ptrs = (operand(row, 0, P0, ALIGNED), operand(row, 1, W0, ALIGNED))
    key, base = stream_of(keys, t)
    denominator = tl.load(stats + t)  # mean|w| + 1e-8, from torch on the device
    values = (key, start, base, denominator, nu, lo, hi)
    draw = grouped(row, start, base, S, NDIM)
    aligned = row_aligned(row, 2, ALIGNED)
    fast = (operand(row, 0, P0, True), operand(row, 1, W0, True))
    for_block(
        _adaptive_body, fast, ptrs, values, row, offs, n, full, draw, aligned, (S, NDIM, BLOCK)
    )


def weight_adaptive_(
    rates: Tensors,
    weights: Tensors,
    keys: Sequence[int],
    nu: float,
    lo: float,
    hi: float,
    spans=None,
) -> None:
    """``p = clamp(1 + (2U-1)*nu*clamp(2 - |w|/(mean|w| + 1e-8), 0.5, 1.5), lo, hi)``.

    Philox: ``U = U(i)``.
    """
    rates, weights = list(rates), list(weights)
    stats = [[m + 1e-8] for m in abs_means(weights)]
    offsets = flat_offsets(rates, spans)
    launch(
        _adaptive_kernel, [rates, weights], written=(0,), keys=list(keys), offsets=offsets,
        stats=stats, scalars=(float(nu), float(lo), float(hi)),
    )  # fmt: skip


@triton.jit
def _activity_factor(c_ptr, unit, mean_c, denominator):
    """The redraw's scale for the counts of output units ``unit``."""
    c = tl.load(c_ptr + unit).to(tl.float32)
    ratio = tl.where(mean_c > 0, tl.math.div_rn(c, denominator), 1.0)
    return 2.0 - clamp(1.0 + (ratio - 1.0) * 0.1, 0.8, 1.2)


@triton.jit
def _run_factors(args, lane0, RUN: tl.constexpr):
    """The factors of a run of ``RUN`` consecutive elements from two units: rows of at least
    ``RUN`` elements (the fast body's condition) hold every run in at most two (one division
    per run instead of one per element; the same per-unit values)."""
    c_ptr, row_len, mean_c, denominator = args
    UT: tl.constexpr = tl.uint32 if lane0.dtype == tl.int32 else tl.uint64
    lane0 = lane0.to(UT)  # offsets are non-negative: unsigned division, no sign fix-ups
    L = row_len.to(UT)
    q0 = lane0 // L
    edge = L - (lane0 - q0 * L)  # lanes from here on lie in the next unit
    f0 = _activity_factor(c_ptr, q0, mean_c, denominator)
    f1 = _activity_factor(c_ptr, q0 + (edge < RUN).to(q0.dtype), mean_c, denominator)
    f = tl.where(edge <= 1, f1, f0), tl.where(edge <= 2, f1, f0), tl.where(edge <= 3, f1, f0)
    if RUN == 8:
        g = tl.where(edge <= 4, f1, f0), tl.where(edge <= 5, f1, f0)
        h = tl.where(edge <= 6, f1, f0), tl.where(edge <= 7, f1, f0)
        out = f0, f[0], f[1], f[2], g[0], g[1], h[0], h[1]
    else:
        out = f0, f[0], f[1], f[2]
    return out


@triton.jit
def _activity_body(
    ptrs, values, row, offs, n, FLAGS: tl.constexpr, MASKED: tl.constexpr, GROUPED: tl.constexpr
):
    p_ptr, c_ptr = ptrs
    key, start, base, mean_c, denominator, nu, lo, hi = values
    S: tl.constexpr = FLAGS[0]
    NDIM: tl.constexpr = FLAGS[1]
    BLOCK: tl.constexpr = FLAGS[2]
    RUN: tl.constexpr = draw_run(p_ptr.dtype.element_ty)
    mask = offs < n if MASKED else None
    idx = logical(row, offs, S, NDIM)  # the row index and the scattered draw share it
    u = uniforms(key, idx + base, start, base, BLOCK, 0, GROUPED, RUN)
    if MASKED:
        c = tl.load(c_ptr + unit_of(row, idx, S), mask=mask).to(tl.float32)
        ratio = tl.where(mean_c > 0, tl.math.div_rn(c, denominator), 1.0)
        factor = 2.0 - clamp(1.0 + (ratio - 1.0) * 0.1, 0.8, 1.2)
    else:  # a full block of a contiguous row with rows of >= RUN elements: per run
        args = (c_ptr, tl.load(row + S + ROW_LEN), mean_c, denominator)
        factor = run_lanes(_run_factors, args, start, BLOCK, RUN)
    new = clamp(1.0 + (2.0 * u - 1.0) * nu * factor, lo, hi)
    tl.store(p_ptr + offs, round_to(new, p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _activity_kernel(
    tab, blocks, P0, C0, nu, lo, hi, keys, stats,
    S: tl.constexpr, W: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
    NDIM: tl.constexpr, INDEX32: tl.constexpr,
):  # fmt: skip
    t, row, n, offs, start, full = tile(tab, blocks, W, S, BLOCK, INDEX32)
    ptrs = (operand(row, 0, P0, ALIGNED), per_unit(row, 1, C0))
    key, base = stream_of(keys, t)
    mean_c = tl.load(stats + 2 * t)  # stats.activity_stats, on the device
    denominator = tl.load(stats + 2 * t + 1)
    values = (key, start, base, mean_c, denominator, nu, lo, hi)
    draw = grouped(row, start, base, S, NDIM)
    aligned = row_aligned(row, 1, ALIGNED)
    fast = (operand(row, 0, P0, True), ptrs[1])  # the counts are gathered per unit: no hint
    # rows shorter than a thread's run of elements: the masked (per-element) body
    full = full & (tl.load(row + S + ROW_LEN) >= draw_run(P0.dtype.element_ty))
    for_block(
        _activity_body, fast, ptrs, values, row, offs, n, full, draw, aligned, (S, NDIM, BLOCK)
    )


def activity_update_(
    rates: Tensors,
    counts: Tensors,
    keys: Sequence[int],
    nu: float,
    lo: float,
    hi: float,
    spans=None,
) -> None:
    """Redraw the rates from the activity of their output units (rows); formula in
    ``torch_backend.activity_update_``. Philox: ``U = U(i)``."""
    rates, counts = list(rates), list(counts)
    try:
        offsets = flat_offsets(rates, spans)
    except ValueError:
        # A transposed layer sharded across its units' rows: its unit-major rates are strided
        # pieces of the layer. The torch backend's Philox draws the same numbers there.
        with settings.override(rng="philox"):
            return torch_backend.activity_update_(rates, counts, keys, nu, lo, hi, spans)
    # Every layer's statistics first (a sharded mean is a collective, even for an empty shard).
    fits = [activity_stats(c) for c in counts]
    stats = [list(fit) if p.numel() else [] for p, fit in zip(rates, fits)]
    launch(
        _activity_kernel, [rates], rows=[counts], written=(0,), keys=list(keys), offsets=offsets,
        stats=stats, scalars=(float(nu), float(lo), float(hi)),
    )  # fmt: skip
