"""The CPU step of two revisions side by side in one process: a before/after check that a shared
machine cannot blur.

    python benchmarks/ab_revisions.py dd227d8            # that commit against the working tree
    python benchmarks/ab_revisions.py HEAD~2 --rounds 100 --size 1M

Loads ``kernels/torch_backend.py`` and ``kernels/stats.py`` of ``REV`` (``git show``) as
throwaway modules beside the package's own (the other kernel modules are shared: revisions that
changed those cannot be compared this way), then times, on the benchmark inputs
(``bench_cases``), ``crystallize_`` of one square layer and ``bio_step_`` (volume + fuzzy +
crystallize) of the 64-layer MLP and the FCNet, calling the backend functions directly.
Rounds interleave the contenders, the order rotating, and each round first restores the tensors
(untimed); it prints min, lower quartile and median per contender, the new/old ratio of each,
and whether both revisions computed bit-identical results. On a busy machine compare the
lower quartiles, not the medians.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import bench_cases as bc  # noqa: E402
import torch  # noqa: E402


def _load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(f"bio_transformations.kernels.{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def load_revision(rev: str, tmp: str):
    """``torch_backend`` of ``rev`` importing ``stats`` of ``rev`` (as ``_ab_stats``)."""
    import bio_transformations.kernels  # noqa: F401  (the package the modules load into)

    def show(path: str) -> str:
        return subprocess.run(
            ["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True, capture_output=True, text=True
        ).stdout

    stats_path = os.path.join(tmp, "_ab_stats.py")
    backend_path = os.path.join(tmp, "_ab_torch_backend.py")
    with open(stats_path, "w") as f:
        f.write(show("kernels/stats.py"))
    backend = show("kernels/torch_backend.py").replace(
        "from .stats import", "from ._ab_stats import"
    )
    with open(backend_path, "w") as f:
        f.write(backend)
    _load("_ab_stats", stats_path)
    return _load("_ab_torch_backend", backend_path)


def cases(size: str):
    """``[(name, make_call(backend), restore, outputs)]`` on the benchmark inputs."""
    from bio_transformations.kernels.contract import StepParams

    step = StepParams(True, True, True, 0.1, 2.0, 0.2, bc.CRYSTAL_THRESH, bc.DAMPENING)
    w0, g0, p0 = bc.layer_data(size, "cpu")
    layer = [t.clone() for t in (w0, g0, p0)]
    out = [
        (
            f"crystallize {size}",
            lambda tb, t=layer: (
                lambda: tb.crystallize_([t[0]], [t[1]], [t[2]], bc.CRYSTAL_THRESH, bc.DAMPENING)
            ),
            _restorer([(layer, (w0, g0, p0))]),
            [layer[2]],
        )
    ]
    for model_name in ("mlp64", "fcnet"):
        data = bc.model_data(bc.build_model(model_name, "cpu"))
        live = [[t.clone() for t in d] for d in data]
        keys = list(range(len(live)))
        ws, gs, ps = ([t[j] for t in live] for j in range(3))
        out.append(
            (
                f"{model_name} bio_step",
                lambda tb, ws=ws, gs=gs, ps=ps, keys=keys: (
                    lambda: tb.bio_step_(ws, gs, ps, keys, step)
                ),
                _restorer(list(zip(live, data))),
                gs + ps,
            )
        )
    return out


def _restorer(pairs):
    def restore() -> None:
        for live, pristine in pairs:
            for t, t0 in zip(live, pristine):
                t.copy_(t0)

    return restore


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rev", help="the git revision to compare the working tree against")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--size", default="4M", choices=list(bc.SIZES))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from bio_transformations.kernels import torch_backend as new

    with tempfile.TemporaryDirectory() as tmp:
        old = load_revision(args.rev, tmp)
    print(
        f"{args.rev} (old) against the working tree (new), {args.rounds} rounds, "
        f"{torch.get_num_threads()} threads"
    )
    for name, make, restore, outputs in cases(args.size):
        contenders = [("old", make(old)), ("new", make(new))]
        times = {label: [] for label, _ in contenders}
        for r in range(args.rounds):
            for label, call in contenders[r % 2 :] + contenders[: r % 2]:
                restore()
                start = time.perf_counter()
                call()
                times[label].append(time.perf_counter() - start)
        results = []
        for _, call in contenders:
            restore()
            call()
            results.append([t.clone() for t in outputs])
        same = all(torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(*results))
        q = {}
        for label, ts in times.items():
            ts.sort()
            q[label] = (ts[0], ts[len(ts) // 4], ts[len(ts) // 2])
            print(
                f"  {name:18s} {label}: min {ts[0] * 1e3:7.2f} ms  q25 {q[label][1] * 1e3:7.2f} ms"
                f"  median {q[label][2] * 1e3:7.2f} ms"
            )
        ratio = " ".join(f"{a / b:.2f}" for a, b in zip(q["new"], q["old"]))
        print(f"  {name:18s} new/old (min q25 median): {ratio}; bit-identical: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
