"""Per-rank rate memory and bio step time, FSDP2-sharded against unsharded (2 gloo ranks, CPU).

Writes ``build/fsdp_bench.json`` (never ``benchmarks/results/``)::

    .venv/bin/python benchmarks/fsdp_bench.py [--width 1024] [--layers 4] [--steps 10]

Each rank converts the same MLP; the unsharded copy keeps every rate on every rank, the sharded
copy (``fully_shard`` per layer, ``shard_rates``) keeps its rows. The timed step is one
``bio_step()`` + ``update_fuzzy_learning_rates()`` + ``rejuvenate_weights()`` after a backward
pass (the backward pass is not timed), in each ``BIO_RNG`` mode.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from bio_transformations import BioConverter, Distribution, shard_rates
from bio_transformations.kernels import settings


def _model(width: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    mods = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.ReLU()]
    cfg = dict(fuzzy_lr_distribution=Distribution.TEMPORAL, fuzzy_lr_dynamic=True)
    return BioConverter(**cfg)(nn.Sequential(*mods[:-1]))


def _rate_bytes(model: nn.Module) -> int:
    total = 0
    for m in model.modules():
        rates = getattr(m, "fuzzy_learning_rate_parameters", None)
        if rates is not None:
            local = rates.to_local() if hasattr(rates, "to_local") else rates
            total += local.numel() * local.element_size()
    return total


def _time(model: nn.Module, width: int, steps: int) -> float:
    x = torch.randn(16, width)
    times = []
    for _ in range(steps):
        model.zero_grad()
        model(x).pow(2).mean().backward()
        t0 = time.perf_counter()
        model.bio_step()
        model.update_fuzzy_learning_rates()
        model.rejuvenate_weights()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) * 1e3


def _worker(rank: int, world: int, init: str, args, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        plain = _model(args.width, args.layers)
        sharded = copy.deepcopy(plain)
        for m in sharded:
            if isinstance(m, nn.Linear):
                fully_shard(m)
        fully_shard(sharded)
        shard_rates(sharded)
        row = {"rank": rank, "rate_bytes": {}, "step_ms": {}}
        row["rate_bytes"]["unsharded"] = _rate_bytes(plain)
        row["rate_bytes"]["sharded"] = _rate_bytes(sharded)
        for mode in ("torch", "philox"):
            with settings.override(rng=mode):
                row["step_ms"][f"unsharded/{mode}"] = _time(plain, args.width, args.steps)
                row["step_ms"][f"sharded/{mode}"] = _time(sharded, args.width, args.steps)
        rows = [None] * world
        dist.all_gather_object(rows, row)
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"world": world, "args": vars(args), "ranks": rows}, f, indent=1)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default=os.path.join("build", "fsdp_bench.json"))
    args = parser.parse_args()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), args, args.out), nprocs=2)
    with open(args.out) as f:
        print(f.read())


if __name__ == "__main__":
    main()
