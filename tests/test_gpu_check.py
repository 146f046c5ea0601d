"""The one-shot GPU check (benchmarks/gpu_check.sh + gpu_check.py), run here in its --dry-run
mode: CPU, tiny sizes, the Triton kernels in the interpreter. Proves the plumbing end to end
(checks.json at once, one results.jsonl line per planned item, priorities under a deadline, the
summary) so the single run on a lent GPU does not fail on a script error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "BIO_BACKEND")}
    env["PYTHON"] = sys.executable
    return env


def _planned() -> set:
    ops = {f"op/{op}/{dt}" for op in gpu_check.OPS for dt in ("float32", "bfloat16")}
    return (
        ops
        | {
            "layout/contiguous",
            "layout/channels_last",
            "layout/linear+one_channels_last_conv",
            "aligned/unaligned",
            "aligned/one_unaligned_in_launch",
            "model/10_layers_bio_step",
        }
        | {f"compile/{op}" for op in gpu_check.COMPILE_OPS}
    )


def _rows(out: Path) -> list:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils timeout")  # fmt: skip
def test_dry_run_end_to_end(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(out), "--dry-run"],
        env=_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    checks = {c["name"]: c for c in json.loads((out / "checks.json").read_text())["checks"]}
    assert checks["agreement"]["status"] == "pass", checks["agreement"]
    for name in ("no_host_sync", "cuda_graph", "cuda_graph_capturable", "streams", "one_launch"):
        assert checks[name]["status"] == "skip"
    rows = _rows(out)
    assert rows[0]["item"] == "environment" and rows[0]["dry_run"] and rows[0]["ours"] == "triton"
    items = [r["item"] for r in rows[1:]]
    assert sorted(items) == sorted(_planned())  # each planned item once: measured or skipped
    measured = [r for r in rows[1:] if "us" in r]
    assert any(r["item"].startswith("op/") for r in measured)
    for r in measured:
        assert r["us"] > 0 and r["copy_us"] > 0 and r["elements"] > 0
        assert r["bytes_moved"] >= r["bytes_floor"] > 0
    for r in rows[1:]:
        assert "us" in r or "skipped" in r, r  # no errors
    summary = (out / "summary.md").read_text()
    assert "**Result: PASS**" in summary and "op/bio_step_/float32" in summary
    steps = (out / "steps.tsv").read_text()
    assert "environment\tpass" in steps and "run\tpass" in steps


def test_deadline_drops_every_item_but_keeps_the_checks(tmp_path):
    env = _env()
    env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "run", str(tmp_path),
         "--dry-run", "--budget", "0"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert json.loads((tmp_path / "checks.json").read_text())["checks"][0]["status"] == "pass"
    rows = _rows(tmp_path)[1:]
    assert {r["item"] for r in rows} == _planned()
    assert all("skipped" in r and "priority" in r for r in rows)
    assert [r["priority"] for r in rows] == sorted(r["priority"] for r in rows)


def test_bytes_per_element_accounting():
    # float32: the fused step moves 28 B (20 in the kernel, mean|w| reads w, the zero-gradient
    # gate reads g; the 24 predates the gate), rejuvenation 12 B, the ideal (its
    # statistics pass cleans on the fly; it was 36 B with separate cleaning and sums)
    assert gpu_check.bytes_moved("bio_step_", 4) == 28
    assert gpu_check.bytes_moved("rejuvenate_", 4) == 12
    assert gpu_check.OPS["rejuvenate_"][1] * 4 == 12
    assert gpu_check.bytes_moved("volume_scale_", 2) == 6
    for op, (_, floor) in gpu_check.OPS.items():
        for dt in (4, 2):
            assert gpu_check.bytes_moved(op, dt) >= floor * dt, op


def test_summary_reads_a_run_cut_mid_line(tmp_path):
    (tmp_path / "checks.json").write_text(
        json.dumps(
            {"checks": [{"name": "agreement", "status": "pass", "seconds": 1, "detail": "ok"}]}
        )  # fmt: skip
    )
    row = {"item": "op/fuzzy_scale_/float32", "op": "fuzzy_scale_", "elements": 8,
           "bytes_floor": 12, "bytes_moved": 12, "us": 2.0, "host_us": 1.0, "copy_us": 1.0,
           "frac_copy": 0.5, "GBps_floor": 0.1}  # fmt: skip
    (tmp_path / "results.jsonl").write_text(json.dumps(row) + "\n" + '{"item": "op/cut')
    assert gpu_check.write_summary(tmp_path) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] and len(summary["results"]) == 1
    assert "op/fuzzy_scale_/float32" in (tmp_path / "summary.md").read_text()
