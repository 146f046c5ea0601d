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

from .launch import _HEADER, BLOCK_SIZE, FIRST_BLOCK, NUMEL, Group

Tensor = torch.Tensor

#: Rows of partials each finish program adds per step.
_RBLOCK = 1024


@triton.jit
def _tile_of(tab, blocks, W: tl.constexpr, S: tl.constexpr, BLOCK: tl.constexpr):
    """This program's table row, element count, memory offsets and mask."""
    pid = tl.program_id(0)
    row = tab + tl.load(blocks + pid).to(tl.int64) * W
    n = tl.load(row + S + NUMEL)
    offs = (pid - tl.load(row + S + FIRST_BLOCK)) * BLOCK + tl.arange(0, BLOCK)
    return pid, row, offs, offs < n


@triton.jit
def _crystal_partials(
    tab, blocks, partials, W0, G0,
    S: tl.constexpr, W: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Per block: ``sum |w|`` and the number of non-zero gradient elements (NaN counts)."""
    pid, row, offs, mask = _tile_of(tab, blocks, W, S, BLOCK)
    w_ptr = tl.load(row + 0).to(W0.dtype)
    g_ptr = tl.load(row + 1).to(G0.dtype)
    aw = tl.abs(tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32))
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(partials + 2 * pid, tl.sum(aw, axis=0))
    tl.store(partials + 2 * pid + 1, tl.sum((g != 0.0).to(tl.float32), axis=0))


@triton.jit
def _crystal_finish(
    tab, partials, stats,
    S: tl.constexpr, W: tl.constexpr, BLOCK: tl.constexpr, RBLOCK: tl.constexpr,
):  # fmt: skip
    """Per row: ``stats[2t] = mean|w|`` (float32 of the float64 sum over the element count),
    ``stats[2t+1] = 1`` if the gradient has a non-zero element, else ``0``."""
    t = tl.program_id(0)
    row = tab + t * W
    n = tl.load(row + S + NUMEL)
    first = tl.load(row + S + FIRST_BLOCK)
    nb = (n + BLOCK - 1) // BLOCK
    acc_w = tl.zeros([RBLOCK], dtype=tl.float64)
    acc_g = tl.zeros([RBLOCK], dtype=tl.float64)
    for s in range(0, nb, RBLOCK):
        idx = s + tl.arange(0, RBLOCK)
        m = idx < nb
        at = partials + 2 * (first + idx)
        acc_w += tl.load(at, mask=m, other=0.0).to(tl.float64)
        acc_g += tl.load(at + 1, mask=m, other=0.0).to(tl.float64)
    mean = tl.sum(acc_w, axis=0) / n.to(tl.float64)
    tl.store(stats + 2 * t, mean.to(tl.float32))
    tl.store(stats + 2 * t + 1, tl.where(tl.sum(acc_g, axis=0) > 0.0, 1.0, 0.0))


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
        BLOCK=BLOCK_SIZE,
    )  # fmt: skip
    finish_kernel[(plan.nrows,)](
        plan.table, partials, stats, S=S, W=plan.width, BLOCK=BLOCK_SIZE, RBLOCK=_RBLOCK
    )
