"""Cost of attach()'s update mode (adaptive optimizers) against its gradient mode and plain AdamW.

    python benchmarks/attach_cost.py [--width 1024] [--layers 4] [--steps 10] [--rounds 5]

Per step of AdamW on an MLP, the fastest round's median wall time of the whole step (forward,
backward, step, mechanisms) and of the mechanisms' own work (the hooks), for plain AdamW,
attach(scale="grad") and attach(scale="update"); and the extra memory update mode holds during
the step (one copy of each attached weight with a gradient).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from bio_transformations import BioConverter, attach


def make(width: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    mods = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.ReLU()]
    return BioConverter()(nn.Sequential(*mods, nn.Linear(width, 10)))


def _timed(fn, total: list):
    def run() -> None:
        t0 = time.perf_counter()
        fn()
        total[0] += time.perf_counter() - t0

    return run


def time_steps(model: nn.Module, scale: str | None, steps: int, batch: int, width: int):
    """Median seconds per whole step and per step of the mechanisms' own work (the hooks)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    handle = attach(model, opt, scale=scale) if scale else None
    bio = [0.0]
    if handle:
        handle.before_step = _timed(handle.before_step, bio)
        handle.after_step = _timed(handle.after_step, bio)
    x, y = torch.randn(batch, width), torch.randint(0, 10, (batch,))
    times, bio_times = [], []
    for i in range(steps + 3):
        bio[0] = 0.0
        t0 = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if i >= 3:  # warm-up
            times.append(time.perf_counter() - t0)
            bio_times.append(bio[0])
    if handle:
        handle.remove()
    return statistics.median(times), statistics.median(bio_times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = make(args.width, args.layers)
    weights = sum(m.weight.numel() for m in model if hasattr(m, "bio_mod"))
    params = sum(p.numel() for p in model.parameters())
    print(f"MLP {args.layers}x{args.width}: {weights:,} converted weights, {params:,} parameters")
    # Rounds interleave the three modes; the fastest round of each counts (shared machines).
    modes = (("plain AdamW", None), ("grad", "grad"), ("update", "update"))
    results = {name: (float("inf"), float("inf")) for name, _ in modes}
    for _ in range(args.rounds):
        for name, scale in modes:
            t, b = time_steps(model, scale, args.steps, args.batch, args.width)
            results[name] = (min(results[name][0], t), min(results[name][1], b))
    base = results["plain AdamW"][0]
    for name, (t, b) in results.items():
        print(
            f"{name:12s} step {1e3 * t:8.2f} ms ({t / base:.2f}x plain), "
            f"mechanisms {1e3 * b:7.2f} ms"
        )
    extra = weights * 4  # float32: one copy of each converted weight during the step
    state = 2 * params * 4  # AdamW's exp_avg and exp_avg_sq
    print(
        f"update mode holds {extra / 2**20:.1f} MiB extra during the step "
        f"(AdamW's own state: {state / 2**20:.1f} MiB; +{100 * extra / state:.0f}%)"
    )


if __name__ == "__main__":
    main()
