"""Run the benchmark suite and record its results.

    python benchmarks/run.py                 # full run on this machine's device
    python benchmarks/run.py --quick         # short rounds (a few minutes on 2 CPU cores)
    python benchmarks/run.py --device gpu    # the GPU cases (CUDA; Triton backend if it imports)

Runs ``pytest benchmarks/test_bench.py`` (pytest-benchmark) with a progress line per group,
writes ``OUT/results.json`` (the raw ``--benchmark-json``), then ``benchmarks/report.py``
writes ``OUT/results.md`` and the PNG plots and the table is printed. ``OUT`` defaults to
``benchmarks/results/<device>``. Arguments after ``--`` go to pytest (e.g. ``-- -k crystallize``).
The published package is installed into ``benchmarks/.upstream`` on first use
(``pip install --no-deps --target``); ``--contenders ours,compile,copy`` runs without it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _default_device() -> str:
    try:
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    except Exception:
        return "cpu"


def main(argv=None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    argv, extra = raw, []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short rounds")
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    parser.add_argument("--out", help="output folder (default benchmarks/results/<device>)")
    parser.add_argument("--contenders", help="comma list of upstream,ours,compile,copy")
    parser.add_argument("--sizes", help="comma list of size labels, e.g. 64K,4M")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression")
    args = parser.parse_args(argv)

    device = _default_device() if args.device == "auto" else args.device
    out = os.path.abspath(args.out or os.path.join(HERE, "results", device))
    os.makedirs(out, exist_ok=True)
    results_json = os.path.join(out, "results.json")
    if os.path.exists(results_json):
        os.remove(results_json)

    cmd = [
        sys.executable, "-m", "pytest", os.path.join(HERE, "test_bench.py"),
        "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning",
        f"--benchmark-json={results_json}", "--benchmark-quiet",
        f"--bio-device={device}", f"--bio-threads={args.threads}",
    ]  # fmt: skip
    if args.quick:
        cmd.append("--bio-quick")
    if args.contenders:
        cmd.append(f"--bio-contenders={args.contenders}")
    if args.sizes:
        cmd.append(f"--bio-sizes={args.sizes}")
    if args.keyword:
        cmd += ["-k", args.keyword]
    cmd += extra

    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/conftest.py
    shown = ["python", "benchmarks/run.py", *raw]
    env["BIO_BENCH_COMMAND"] = shlex.join(shown)
    print(f"benchmarks on {device} ({'quick' if args.quick else 'full'}), results in {out}")
    sys.stdout.flush()
    code = subprocess.call(cmd, cwd=ROOT, env=env)
    if not os.path.exists(results_json):
        print(f"no results were written (pytest exit code {code})", file=sys.stderr)
        return code or 1

    sys.path.insert(0, HERE)
    import report

    print()
    print(report.write_report(results_json, out))
    print(f"wrote {results_json}, {os.path.join(out, 'results.md')} and the plots")
    return code


if __name__ == "__main__":
    sys.exit(main())
