"""The benchmarks: every hot op at several sizes, and model-level steps, per contender.

Cases come from ``conftest.pytest_generate_tests`` (ids like ``crystallize-4M-cpu-upstream``).
The first case of a group measures the whole group (``bench_harness.measure_group``: the
contenders interleaved in blocks of rounds); each case then records its own samples, and
pytest-benchmark groups them by op, size and device so one table compares the contenders.
Run through ``python benchmarks/run.py`` for the recorded JSON, table and plots.
"""

from __future__ import annotations

import bench_harness as bh
import pytest


def _run(benchmark, case: bh.Case, group_result, pytestconfig) -> None:
    reason = bh.unavailable(case)
    if reason:
        pytest.skip(reason)
    benchmark.group = case.group  # read when the stats are made: set it first
    result = group_result(case)
    if result.skip:
        pytest.skip(result.skip)
    if result.error:
        pytest.fail(result.error, pytrace=False)
    bh.record_samples(benchmark, result.samples)
    numel = case.numel()
    benchmark.extra_info.update(
        {
            "kind": case.kind,
            "op": case.op,
            "title": case.spec.title,
            "size": case.size,
            "numel": numel,
            "device": case.device,
            "contender": case.contender,
            "backend": case.backend,
            "passes": case.spec.passes,
            "bytes_moved": case.spec.passes * numel * 4,
            "rounds_planned": result.rounds_planned,
            **result.info,
        }
    )
    pytestconfig._bio_progress.add(case, benchmark.stats.stats.median)


def test_op(benchmark, case, group_result, pytestconfig):
    _run(benchmark, case, group_result, pytestconfig)


def test_model(benchmark, case, group_result, pytestconfig):
    _run(benchmark, case, group_result, pytestconfig)


def test_train(benchmark, case, group_result, pytestconfig):
    _run(benchmark, case, group_result, pytestconfig)
