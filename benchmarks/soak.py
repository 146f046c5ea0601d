"""Long-run soak: many training steps with every mechanism on, checked every 1,000 steps.

Run with ``make soak`` (default 10,000 steps). Every check verifies that weights, gradients and
rates are finite, rates lie in (0, fuzzy_lr_max] (crystallization may take them below
fuzzy_lr_min on purpose), weights stay in [-1, 1] right after rejuvenation, and the process's
resident memory does not grow after warm-up. Exits 1 on the first failed check.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from bio_transformations import BioConverter, Distribution


def rss_mib() -> float:
    """Resident set size of this process in MiB (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return 0.0


def build(distribution: Distribution) -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )
    return BioConverter(
        fuzzy_lr_distribution=distribution,
        fuzzy_lr_dynamic=True,
        fuzzy_lr_update_freq=50,
        weight_splitting_Gamma=2,
        apply_dales_principle=True,
    )(model)


def check(model: nn.Module, step: int) -> list:
    problems = []
    for name, module in model.named_modules():
        bio = getattr(module, "bio_mod", None)
        if bio is None:
            continue
        p = bio.fuzzy_learning_rate_parameters
        hi = bio.config.fuzzy_lr_max
        if not torch.isfinite(module.weight).all():
            problems.append(f"step {step}: non-finite weight in {name}")
        if not torch.isfinite(p).all() or not ((p > 0) & (p <= hi)).all():
            problems.append(f"step {step}: rates of {name} outside (0, {hi}]")
    return problems


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--check-every", type=int, default=1_000)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.steps <= 0 or args.check_every <= 0:
        parser.error("--steps and --check-every must be positive")
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    figures = []
    failed = []
    start = time.perf_counter()
    for distribution in (Distribution.TEMPORAL, Distribution.ACTIVITY):
        model = build(distribution)
        opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
        x = torch.randn(32, 1, 8, 8)
        y = torch.randint(0, 10, (32,))
        steps = args.steps // 2
        for step in range(1, steps + 1):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            model.bio_step()
            model.update_fuzzy_learning_rates()
            opt.step()
            model.enforce_dales_principle()
            if step % 100 == 0:
                model.rejuvenate_weights()
                for m in model.modules():
                    if getattr(m, "bio_mod", None) is not None and m.weight.abs().max() > 1:
                        failed.append(f"step {step}: weights outside [-1, 1] after rejuvenation")
            if step % args.check_every == 0 or step == steps:
                failed += check(model, step)
                row = {
                    "distribution": distribution.value,
                    "step": step,
                    "rss_mib": round(rss_mib(), 1),
                    "seconds": round(time.perf_counter() - start, 1),
                }
                figures.append(row)
                print(json.dumps(row), flush=True)
            if failed:
                break
    warm = [r["rss_mib"] for r in figures if r["step"] >= 2 * args.check_every]
    growth = (max(warm) - min(warm)) if warm else 0.0
    if growth > 50:
        failed.append(f"resident memory grew by {growth:.1f} MiB after warm-up")
    summary = {"steps": args.steps, "rss_growth_mib": round(growth, 1), "problems": failed}
    print(json.dumps(summary))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"checks": figures, "summary": summary}, f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
