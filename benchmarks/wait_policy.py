"""What the OpenMP wait policy costs the default CPU crystallize at 4M weights.

    python benchmarks/wait_policy.py [--rounds 40] [--repeats 3] [--size 4M]

The benchmark suite runs with ``OMP_WAIT_POLICY=PASSIVE`` (spinning workers would steal the
shared machine from the other contenders). The chunked CPU pass makes many short two-thread
operations, and under PASSIVE each one wakes a sleeping OpenMP worker; upstream makes a few
large ones. This script times the same ``crystallize_`` call (the benchmark's 4M input, 40% of
the weights selected) in child processes under PASSIVE and under libgomp's default policy
(variable unset), alternating the two, and prints min / lower quartile / median per policy.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _child(rounds: int, size: str) -> None:
    import time

    import torch

    sys.path.insert(0, str(HERE))
    import bench_cases as bc

    from bio_transformations.kernels import torch_backend as tb

    torch.set_num_threads(2)
    w, g, p = bc.layer_data(size, "cpu")
    p0 = p.clone()
    times = []
    for _ in range(rounds + 5):
        p.copy_(p0)
        start = time.perf_counter()
        tb.crystallize_([w], [g], [p], bc.CRYSTAL_THRESH, 0.6)
        times.append(time.perf_counter() - start)
    print(" ".join(f"{t:.6f}" for t in times[5:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", default="4M", help="a size label of the suite (64K, 1M, 4M)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.rounds, args.size)
        return
    results = {"PASSIVE": [], "default": []}
    for repeat in range(args.repeats):
        for policy in results:
            env = dict(os.environ)
            env.pop("OMP_WAIT_POLICY", None)
            if policy == "PASSIVE":
                env["OMP_WAIT_POLICY"] = "PASSIVE"
            cmd = [sys.executable, __file__, "--child", "--rounds", str(args.rounds)]
            cmd += ["--size", args.size]
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
            results[policy] += [float(t) for t in out.split()]
            print(f"repeat {repeat + 1}/{args.repeats}: {policy} done", file=sys.stderr)
    for policy, times in results.items():
        times.sort()
        q = [times[0], times[len(times) // 4], times[len(times) // 2]]
        print(f"{policy:8s} crystallize {args.size}: " + " / ".join(f"{t * 1e3:.2f} ms" for t in q))


if __name__ == "__main__":
    main()
