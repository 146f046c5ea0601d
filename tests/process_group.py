"""Run a test function on several CPU processes joined in a gloo process group.

One place for the multi-process plumbing of the tests (DDP replicas, ``sync_layer_seeds``):

* each rank is a fresh ``spawn`` process running ``worker(ctx, *args)``; the worker calls
  ``ctx.join()`` when it wants the process group (a worker may do local work first, e.g. convert
  a model before ``torch.distributed`` is initialised);
* shutdown is orderly: every rank passes a barrier before ``destroy_process_group``, so no rank
  tears gloo down while another still talks to it (tearing down mid-collective aborted a worker
  with "terminate called without an active exception");
* everything has a timeout: the process group's collectives, and the parent's wait, after which
  the stragglers are killed and the test fails with what each rank reported;
* results come back through files (``torch.save``), not pipes, so a crashing rank cannot
  leave the parent blocked on a queue.
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import pathlib
import tempfile
import time
import traceback
from typing import Any, Callable, List

import torch
import torch.distributed as dist

#: Seconds a collective may wait for the other ranks, and the parent for all of them.
DEFAULT_TIMEOUT = 120.0


class RankContext:
    """What a worker gets: its rank, the world size, and ``join()`` for the process group."""

    def __init__(self, rank: int, world_size: int, init_file: str, timeout: float):
        self.rank, self.world_size = rank, world_size
        self._init_file, self._timeout = init_file, timeout

    def join(self) -> None:
        """Initialise the gloo process group (once)."""
        if not dist.is_initialized():
            dist.init_process_group(
                "gloo",
                init_method=f"file://{self._init_file}",
                rank=self.rank,
                world_size=self.world_size,
                timeout=datetime.timedelta(seconds=self._timeout),
            )


def _entry(worker, rank, world_size, workdir, timeout, args):
    torch.set_num_threads(1)  # two ranks on a shared 2-core machine: no oversubscription
    ctx = RankContext(rank, world_size, os.path.join(workdir, "init"), timeout)
    out = pathlib.Path(workdir)
    try:
        result = worker(ctx, *args)
        torch.save(result, out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        # No barrier: the other ranks fail at theirs (timeout) instead of waiting forever.
        os._exit(1)
    if dist.is_initialized():
        dist.barrier()  # nobody destroys the group while another rank still uses it
        dist.destroy_process_group()


def run_ranks(
    worker: Callable[..., Any],
    *args: Any,
    world_size: int = 2,
    timeout: float = DEFAULT_TIMEOUT,
) -> List[Any]:
    """Run ``worker(ctx, *args)`` on ``world_size`` processes; return each rank's result.

    ``worker`` must be a module-level function (spawned processes import it by name).

    Raises:
        AssertionError: a rank failed (its traceback is in the message), exited abnormally
            (its exit code), or did not finish within ``timeout`` seconds.
    """
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="bio-ranks-") as workdir:
        procs = [
            context.Process(target=_entry, args=(worker, r, world_size, workdir, timeout, args))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in hung:
            procs[r].kill()
            procs[r].join()
        problems = []
        for r, p in enumerate(procs):
            err = pathlib.Path(workdir, f"rank{r}.err")
            if err.exists():
                problems.append(f"rank {r} raised:\n{err.read_text()}")
            elif r in hung:
                problems.append(f"rank {r} did not finish within {timeout:.0f} s")
            elif p.exitcode != 0:
                problems.append(f"rank {r} exited with code {p.exitcode}")
        assert not problems, "\n".join(problems)
        return [torch.load(pathlib.Path(workdir, f"rank{r}.pt")) for r in range(world_size)]
