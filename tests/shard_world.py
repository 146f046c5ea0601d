"""A shard group simulated in one process: each rank is a thread, the collectives exchange
tensors through shared slots.

The sharded paths of the torch reference (statistics reduced over the group with
``kernels.stats.reduced_over``, draws that follow the global index of a local shard) need a
``kernels.stats.Reduction``: ``sum_``, ``max_`` and ``gather`` over the shard group, and the
rank. :func:`run_world` runs one function per rank, each on its own thread inside
``reduced_over`` of that rank's :class:`ThreadReduction`, so a test can shard a tensor, run the
op on every shard and compare the pieces with the op on the whole tensor, in one process and
in a fraction of a second (the real multi-process runs are in ``test_fsdp.py``).

Each thread runs in a copy of the caller's context, so ``settings.override`` (a context
variable) holds inside the ranks. Every exchange waits at a barrier with a timeout: a rank that
fails breaks the barrier, the others stop, and the first real error is raised.
"""

from __future__ import annotations

import contextvars
import threading
from typing import Any, Callable, List, Sequence

import torch

from bio_transformations.kernels import stats
from bio_transformations.kernels.shards import Span

#: Seconds a rank may wait for the others at an exchange.
TIMEOUT = 15.0


class ThreadWorld:
    """The shared state of ``world`` ranks: one slot per rank and a barrier."""

    def __init__(self, world: int):
        self.world = world
        self.barrier = threading.Barrier(world, timeout=TIMEOUT)
        self.slots: List[Any] = [None] * world

    def exchange(self, rank: int, t: torch.Tensor) -> List[torch.Tensor]:
        """Every rank's ``t``, in rank order."""
        self.slots[rank] = t.detach().clone()
        self.barrier.wait()
        parts = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before every rank has read it
        return parts


class ThreadReduction:
    """``kernels.stats.Reduction`` of one rank of a :class:`ThreadWorld`."""

    def __init__(self, world: ThreadWorld, rank: int):
        self.world, self.rank = world, rank

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        parts = self.world.exchange(self.rank, t)
        total = parts[0].clone()
        for p in parts[1:]:  # rank order: every rank gets bit-identical totals
            total += p
        return t.copy_(total)

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        return t.copy_(torch.stack(self.world.exchange(self.rank, t)).amax(0))

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        return torch.stack(self.world.exchange(self.rank, t))


def run_world(world: int, fn: Callable[[int], Any]) -> List[Any]:
    """``fn(rank)`` on ``world`` threads, each inside ``stats.reduced_over`` of its rank's
    reduction; the results in rank order. Re-raises the first error of any rank."""
    group = ThreadWorld(world)
    results: List[Any] = [None] * world
    errors: List[BaseException] = []

    def body(rank: int) -> None:
        try:
            with stats.reduced_over(ThreadReduction(group, rank)):
                results[rank] = fn(rank)
        except BaseException as e:  # noqa: B036 - handed to the caller below
            errors.append(e)
            group.barrier.abort()  # the other ranks stop waiting for this one

    threads = [
        threading.Thread(target=contextvars.copy_context().run, args=(body, r))
        for r in range(world)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if real or errors:
        raise (real or errors)[0]
    return results


def dim0_bounds(rows: int, world: int) -> List[tuple]:
    """``(start, length)`` of each rank's rows in ``torch.chunk``'s layout (FSDP2's): chunks of
    ``ceil(rows/world)``, the last ones shorter or empty."""
    chunk = -(-rows // world)
    return [(min(r * chunk, rows), max(0, min(chunk, rows - r * chunk))) for r in range(world)]


def dim0_shards(t: torch.Tensor, world: int) -> List[torch.Tensor]:
    """Each rank's rows of ``t`` (contiguous copies), in ``torch.chunk``'s layout."""
    return [t.narrow(0, s, n).clone() for s, n in dim0_bounds(t.shape[0], world)]


def dim0_spans(t: torch.Tensor, world: int) -> List[Span]:
    """Each rank's :class:`Span` of ``t``'s rows."""
    return [Span(0, s, t.shape[0]) for s, _ in dim0_bounds(t.shape[0], world)]


def gather_dim0(pieces: Sequence[torch.Tensor]) -> torch.Tensor:
    """The whole tensor from the ranks' rows, in rank order."""
    return torch.cat(list(pieces), 0)
