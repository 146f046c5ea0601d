"""Per-layer statistics of a whole launch in two small launches over the launch's own table,
into buffers the plan allocated once (no per-layer launches, no ``torch.stack``).

1. ``partials``: one program per grid block of the table (the blocks of the main kernel)
   reduces its tile to a few float32 numbers, stored at its block index;
2. ``finish``: one program per table row adds its blocks' partials in a fixed order (float64)
   and writes the row's statistics where the main kernel reads them (``stats + K*t``).

Deterministic: the same inputs give the same bits on every run (no atomics). The sums run in a
different order than torch's reductions, so the statistics agree with
:mod:`~bio_transformations.kernels.stats` to float32 rounding, not bit for bit. The NaN and
layout rules are those of ``stats``: a NaN weight makes the mean NaN, a NaN gradient counts as
non-zero, and the sums run over memory order (they do not depend on the layout).

Sharded groups (``stats.reduced_over``) keep computing their statistics through ``stats``,
whose all-reduce needs the partial sums on the host side of the collective.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .draws import row_aligned
from .launch import _HEADER, BLOCK_SIZE, FIRST_BLOCK, NUMEL, Group, log, log1p, operand, sqrt

Tensor = torch.Tensor

#: Rows of partials each finish program adds per step.
_RBLOCK = 1024


@triton.jit
def _tile_of(tab, blocks, W: tl.constexpr, S: tl.constexpr, BLOCK: tl.constexpr):
    """This program's index, table row, element count, memory offsets and whether its block
    is full (then it runs unmasked, so aligned tiles get vector loads)."""
    pid = tl.program_id(0)
    row = tab + tl.load(blocks + pid).to(tl.int64) * W
    n = tl.load(row + S + NUMEL)
    start = (pid - tl.load(row + S + FIRST_BLOCK)) * BLOCK
    return pid, row, start + tl.arange(0, BLOCK), n, start + BLOCK <= n


@triton.jit
def _fast(full, aligned):
    """Whether this block runs the unmasked, vectorised tile: a full block of a row whose
    operands are aligned (``aligned`` None: the whole launch is; ``draws.row_aligned``), so
    one misaligned tensor (a DDP bucket view) costs only its own row the vector loads."""
    fast = full
    if aligned is not None:
        fast = fast & aligned
    return fast


@triton.jit
def _load(ptr, offs, n, MASKED: tl.constexpr):
    """A tile in float32; masked-off lanes read 0 (they add nothing to a sum)."""
    if MASKED:
        x = tl.load(ptr + offs, mask=offs < n, other=0.0)
    else:
        x = tl.load(ptr + offs)
    return x.to(tl.float32)


@triton.jit
def _crystal_tile(w_ptr, g_ptr, partials, pid, offs, n, MASKED: tl.constexpr):
    aw = tl.abs(_load(w_ptr, offs, n, MASKED))
    g = _load(g_ptr, offs, n, MASKED)
    tl.store(partials + 2 * pid, tl.sum(aw, axis=0))
    tl.store(partials + 2 * pid + 1, tl.sum((g != 0.0).to(tl.float32), axis=0))


@triton.jit
def _crystal_partials(
    tab, blocks, partials, W0, G0,
    S: tl.constexpr, W: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """Per block: ``sum |w|`` and the number of non-zero gradient elements (NaN counts)."""
    pid, row, offs, n, full = _tile_of(tab, blocks, W, S, BLOCK)
    w_ptr, g_ptr = operand(row, 0, W0, ALIGNED), operand(row, 1, G0, ALIGNED)
    w_fast, g_fast = operand(row, 0, W0, True), operand(row, 1, G0, True)
    if _fast(full, row_aligned(row, 2, ALIGNED)):
        _crystal_tile(w_fast, g_fast, partials, pid, offs, n, False)
    else:
        _crystal_tile(w_ptr, g_ptr, partials, pid, offs, n, True)


@triton.jit
def _row_total(tab, partials, t, K: tl.constexpr, j: tl.constexpr, S: tl.constexpr,
               W: tl.constexpr, BLOCK: tl.constexpr, RBLOCK: tl.constexpr):  # fmt: skip
    """``(sum, n)``: the float64 sum of partial ``j`` (of ``K`` per block) over table row
    ``t``'s blocks, in a fixed order, and the row's element count."""
    row = tab + t * W
    n = tl.load(row + S + NUMEL)
    first = tl.load(row + S + FIRST_BLOCK)
    nb = (n + BLOCK - 1) // BLOCK
    acc = tl.zeros([RBLOCK], dtype=tl.float64)
    for s in range(0, nb, RBLOCK):
        idx = s + tl.arange(0, RBLOCK)
        acc += tl.load(partials + K * (first + idx) + j, mask=idx < nb, other=0.0).to(tl.float64)
    return tl.sum(acc, axis=0), n


@triton.jit
def _crystal_finish(
    tab, partials, stats,
    S: tl.constexpr, W: tl.constexpr, BLOCK: tl.constexpr, RBLOCK: tl.constexpr,
):  # fmt: skip
    """Per row: ``stats[2t] = mean|w|`` (float32 of the float64 sum over the element count),
    ``stats[2t+1] = 1`` if the gradient has a non-zero element, else ``0``."""
    t = tl.program_id(0)
    sum_aw, n = _row_total(tab, partials, t, 2, 0, S, W, BLOCK, RBLOCK)
    nonzero, n = _row_total(tab, partials, t, 2, 1, S, W, BLOCK, RBLOCK)
    tl.store(stats + 2 * t, (sum_aw / n.to(tl.float64)).to(tl.float32))
    tl.store(stats + 2 * t + 1, tl.where(nonzero > 0.0, 1.0, 0.0))


def crystallize_stats(group: Group, witnesses=None) -> dict:
    """``stats`` for the step kernel of ``group`` (slots ``w, g, ...``): ``mean|w|`` and
    whether the gradient is non-zero, per row, in two launches into the plan's buffers.
    ``witnesses``: this call's ``(w, g)`` of the group's first row (default: the group's)."""
    plan = group.plan
    partials = plan.buffer("crystal_partials", 2 * plan.nblocks, torch.float32)
    stats = plan.buffer("crystal_stats", 2 * plan.nrows, torch.float32)
    if witnesses is None:
        witnesses = (group.cols[0][0], group.cols[1][0])
    reduce_into(_crystal_partials, _crystal_finish, plan, partials, stats, witnesses)
    return {"stats": stats}


def reduce_into(partial_kernel, finish_kernel, plan, partials, stats, witnesses, *args) -> None:
    """The two launches of one statistics pass over ``plan``'s table (``witnesses``: one
    operand per slot the partial kernel reads, for its element type; ``args``: its scalars)."""
    plan.use()
    S = (plan.width - _HEADER) - 3 * plan.ndim
    partial_kernel[(plan.nblocks,)](
        plan.table, plan.blocks, partials, *witnesses, *args, S=S, W=plan.width,
        BLOCK=BLOCK_SIZE, ALIGNED=plan.aligned,
    )  # fmt: skip
    finish_kernel[(plan.nrows,)](
        plan.table, partials, stats, S=S, W=plan.width, BLOCK=BLOCK_SIZE, RBLOCK=_RBLOCK
    )


@triton.jit
def _rejuvenation_tile(w_ptr, partials, pid, offs, n, MASKED: tl.constexpr):
    w = _load(w_ptr, offs, n, MASKED)
    clean = tl.where(w != w, 0.0, w)
    clean = tl.minimum(tl.maximum(clean, -1.0), 1.0)
    changed = clean != w  # NaN, or beyond [-1, 1]: the only elements written
    if MASKED:
        changed = changed & (offs < n)
    tl.store(w_ptr + offs, clean.to(w_ptr.dtype.element_ty), mask=changed)
    tl.store(partials + 3 * pid, tl.sum(clean, axis=0))
    tl.store(partials + 3 * pid + 1, tl.sum(clean * clean, axis=0))
    tl.store(partials + 3 * pid + 2, tl.sum(tl.abs(clean), axis=0))


@triton.jit
def _rejuvenation_partials(
    tab, blocks, partials, W0,
    S: tl.constexpr, W: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):  # fmt: skip
    """Per block, on the cleaned weight (NaN -> 0, clamped to [-1, 1], ``stats.clean_weights_``):
    ``sum w``, ``sum w^2``, ``sum |w|``; the cleaned values are stored back where they differ
    (so the rejuvenation kernel reads the cleaned weight, and clean weights cost no write)."""
    pid, row, offs, n, full = _tile_of(tab, blocks, W, S, BLOCK)
    w_ptr, w_fast = operand(row, 0, W0, ALIGNED), operand(row, 0, W0, True)
    if _fast(full, row_aligned(row, 1, ALIGNED)):
        _rejuvenation_tile(w_fast, partials, pid, offs, n, False)
    else:
        _rejuvenation_tile(w_ptr, partials, pid, offs, n, True)


@triton.jit
def _rejuvenation_finish(
    tab, partials, stats,
    S: tl.constexpr, W: tl.constexpr, BLOCK: tl.constexpr, RBLOCK: tl.constexpr,
):  # fmt: skip
    """Per row, ``stats.rejuvenation_stats`` from the three sums (float64, the same formula
    and clamps as ``stats._rejuvenation_fit``): ``stats[3t:3t+3] = std, mu, sigma``."""
    t = tl.program_id(0)
    s1, n = _row_total(tab, partials, t, 3, 0, S, W, BLOCK, RBLOCK)
    s2, n = _row_total(tab, partials, t, 3, 1, S, W, BLOCK, RBLOCK)
    a1, n = _row_total(tab, partials, t, 3, 2, S, W, BLOCK, RBLOCK)
    nf = n.to(tl.float64)
    dof = tl.maximum(nf - 1.0, 1.0)  # unbiased, as torch.std; one weight: std 0, not NaN
    tiny = 1e-12
    std = sqrt(tl.maximum((s2 - s1 * s1 / nf) / dof, 0.0))
    mean_aw = a1 / nf
    spread = sqrt(tl.maximum((s2 - a1 * a1 / nf) / dof, 0.0))
    std = tl.maximum(tl.where(std != std, 0.0, std), tiny)
    mean_aw = tl.maximum(tl.where(mean_aw != mean_aw, 0.0, mean_aw), tiny)
    spread = tl.where(spread != spread, 0.0, spread)
    ratio = spread / mean_aw
    sigma2 = log1p(ratio * ratio)
    mu = log(mean_aw) - 0.5 * sigma2
    tl.store(stats + 3 * t, std.to(tl.float32))
    tl.store(stats + 3 * t + 1, mu.to(tl.float32))
    tl.store(stats + 3 * t + 2, (0.5 * sqrt(sigma2)).to(tl.float32))


def rejuvenation_stats(group: Group) -> dict:
    """``stats`` for the rejuvenation kernel of ``group`` (slot 0: the weights): cleans the
    weights in place and computes ``(std, mu, sigma)`` per row, in two launches into the
    plan's buffers (``stats.clean_weights_`` + ``stats.rejuvenation_stats`` in one read)."""
    plan = group.plan
    partials = plan.buffer("rejuvenation_partials", 3 * plan.nblocks, torch.float32)
    stats = plan.buffer("rejuvenation_stats", 3 * plan.nrows, torch.float32)
    reduce_into(
        _rejuvenation_partials, _rejuvenation_finish, plan, partials, stats, (group.cols[0][0],)
    )
    return {"stats": stats}
