"""Smoke tests of the benchmark suite: one tiny benchmark run, and report.py on a tiny JSON.

No timing is asserted; these only check that the suite, its recording and its report work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")

pytest.importorskip("pytest_benchmark")


def _report():
    sys.path.insert(0, BENCH)
    try:
        import report
    finally:
        sys.path.remove(BENCH)
    return report


def test_one_tiny_benchmark_runs_and_records(tmp_path):
    out = tmp_path / "results.json"
    cmd = [
        sys.executable, "-m", "pytest", os.path.join(BENCH, "test_bench.py"),
        "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning",
        "--bio-device=cpu", "--bio-quick", "--bio-sizes=64K", "--bio-contenders=ours,copy",
        "-k", "test_op and fuzzy", f"--benchmark-json={out}", "--benchmark-quiet",
    ]  # fmt: skip
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    # cwd outside the checkout: `python -m` puts cwd first on sys.path, where the repository's
    # bio_transformations/ (without its kernels/) would shadow a non-editable install.
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "fuzzy 64K cpu" in done.stdout  # the progress line of the group
    data = json.loads(out.read_text())
    contenders = {b["extra_info"]["contender"] for b in data["benchmarks"]}
    assert contenders == {"ours_torch", "copy"}
    for bench in data["benchmarks"]:
        assert bench["group"] == "fuzzy 64K cpu"
        assert bench["stats"]["rounds"] >= 1 and bench["stats"]["median"] > 0
    assert data["bio"]["torch_threads"] == 2

    report = _report()
    text = report.write_report(str(out), str(tmp_path / "report"))
    assert "| fuzzy | 64K | ours (torch) |" in text
    assert (tmp_path / "report" / "cpu_fuzzy.png").stat().st_size > 0


def _fake_bench(kind, op, size, numel, contender, median):
    group = f"{'model ' if kind == 'model' else ''}{op} {size} cpu"
    return {
        "group": group,
        "name": f"test_{kind}[{op}-{size}-cpu-{contender}]",
        "extra_info": {
            "kind": kind, "op": op, "title": op, "size": size, "numel": numel,
            "device": "cpu", "contender": contender, "passes": 3, "bytes_moved": 12 * numel,
        },
        "stats": {
            "median": median, "iqr": median / 10, "min": median * 0.9, "rounds": 7,
        },
    }  # fmt: skip


def test_report_on_a_tiny_json(tmp_path):
    benches = []
    for contender, t in (("upstream", 0.050), ("ours_torch", 0.008), ("copy", 0.004)):
        benches.append(_fake_bench("op", "crystallize", "4M", 1 << 22, contender, t))
        benches.append(_fake_bench("op", "crystallize", "64K", 1 << 16, contender, t / 50))
    for contender, t in (("upstream", 0.09), ("ours_torch", 0.04), ("ours_torch_fused", 0.02)):
        benches.append(_fake_bench("model", "step", "mlp64", 1 << 20, contender, t))
    data = {
        "benchmarks": benches,
        "datetime": "2026-01-01T00:00:00",
        "bio": {"cpu_model": "Test CPU", "torch_threads": 2, "torch": "2.x", "quick": True},
    }
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(data))
    outdir = tmp_path / "out"
    report = _report()
    assert report.main([str(path), str(outdir), "--quiet"]) == 0
    text = (outdir / "results.md").read_text()
    assert "Test CPU" in text and "2 CPU threads" in text
    assert "| crystallize | 4M | ours (torch) | 8 ms |" in text
    assert "6.25x" in text  # upstream / ours at 4M
    assert "0.50x" in text  # copy / ours: the fraction of copy bandwidth
    assert "| crystallize at 4M | >= 5x | ours (torch) |" in text  # the speed target row
    assert "4.50x | yes |" in text  # the fused model step meets its 3x target
    for name in ("cpu_crystallize.png", "cpu_models.png"):
        assert (outdir / name).stat().st_size > 0
