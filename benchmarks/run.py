"""Run the benchmark suite and write its results.

    python benchmarks/run.py                 # full run: build/bench/<device>/
    python benchmarks/run.py --quick         # short rounds: build/bench-quick/<device>/
    python benchmarks/run.py --record        # full run recorded into benchmarks/results/<device>/
    python benchmarks/run.py --device gpu    # the GPU cases (CUDA; Triton backend if it imports)

Runs ``pytest benchmarks/test_bench.py`` with a progress line per group, writes
``OUT/results.json`` (every case's timed samples per repeat, the machine, the git commit), then
``benchmarks/report.py`` writes ``OUT/results.md`` and the PNG plots and the table is printed.
Results go to ``build/`` unless ``--record`` is given (``make bench RECORD=1``): a recorded run
must come from a clean tree (no uncommitted changes to tracked files), covers every case (no
``-k``, ``--sizes``, ``--contenders`` or extra pytest arguments) and names its commit.
Arguments after ``--`` go to pytest (e.g. ``-- -x``). The published package is installed into
``benchmarks/.upstream`` on first use (``pip install --no-deps --target``);
``--contenders ours,compile,copy`` runs without it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import provenance  # noqa: E402


def _default_device() -> str:
    try:
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    except Exception:
        return "cpu"


def default_out(device: str, quick: bool, record: bool) -> str:
    if record:
        return os.path.join(HERE, "results", device)
    return os.path.join(ROOT, "build", "bench-quick" if quick else "bench", device)


def main(argv=None) -> int:
    raw = list(sys.argv[1:] if argv is None else argv)
    argv, extra = raw, []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short rounds")
    parser.add_argument("--record", action="store_true", help="record into benchmarks/results/")
    parser.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    parser.add_argument("--out", help="output folder (default build/bench[-quick]/<device>)")
    parser.add_argument("--contenders", help="comma list of upstream,ours,compile,copy,plain")
    parser.add_argument("--sizes", help="comma list of size labels, e.g. 64K,4M")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression")
    args = parser.parse_args(argv)

    if args.record:
        partial = [
            name
            for name, given in (
                ("--out", args.out),
                ("--contenders", args.contenders),
                ("--sizes", args.sizes),
                ("-k", args.keyword),
                ("pytest arguments after --", extra),
            )
            if given
        ]
        if partial:
            parser.error(f"--record records the whole suite: drop {', '.join(partial)}")
        problem = provenance.recording_problem(ROOT)
        if problem:
            print(f"refusing to record: {problem}", file=sys.stderr)
            return 2
    commit_before = provenance.git_state(ROOT)["commit"]

    device = _default_device() if args.device == "auto" else args.device
    out = os.path.abspath(args.out or default_out(device, args.quick, args.record))
    os.makedirs(out, exist_ok=True)
    results_json = os.path.join(out, "results.json")
    fresh_json = results_json + ".new"  # replaces results.json only when the run wrote it
    if os.path.exists(fresh_json):
        os.remove(fresh_json)

    cmd = [
        sys.executable, "-m", "pytest", os.path.join(HERE, "test_bench.py"),
        "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning",
        f"--bio-json={fresh_json}", f"--bio-device={device}", f"--bio-threads={args.threads}",
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
    env["BIO_BENCH_COMMAND"] = shlex.join(["python", "benchmarks/run.py", *raw])
    env["BIO_BENCH_RECORD"] = "1" if args.record else "0"
    mode = ("quick" if args.quick else "full") + (", recorded" if args.record else "")
    print(f"benchmarks on {device} ({mode}), results in {out}")
    sys.stdout.flush()
    start = time.perf_counter()
    code = subprocess.call(cmd, cwd=ROOT, env=env)
    elapsed = time.perf_counter() - start
    if not os.path.exists(fresh_json):
        print(f"no results were written (pytest exit code {code})", file=sys.stderr)
        return code or 1
    if args.record:
        moved = provenance.git_state(ROOT)["commit"] != commit_before
        problem = "HEAD moved" if moved else provenance.recording_problem(ROOT)
        if problem:
            os.remove(fresh_json)
            print(f"the checkout changed during the run ({problem}): nothing recorded",
                  file=sys.stderr)  # fmt: skip
            return 2
    os.replace(fresh_json, results_json)

    import report

    print()
    print(report.write_report(results_json, out))
    print(f"wrote {results_json}, {os.path.join(out, 'results.md')} and the plots")
    print(f"the suite took {elapsed / 60:.1f} min")
    return code


if __name__ == "__main__":
    sys.exit(main())
