"""The benchmarks: every hot op at several sizes, and model-level steps, per contender.

Cases come from ``conftest.pytest_generate_tests`` (ids like ``crystallize-4M-cpu-upstream``).
The first case of a group measures the whole group (``bench_harness.measure_group``: the
contenders interleaved in repeats); each case then hands its contender's timed samples to the
session's ``bench_harness.Recorder``, which writes the results JSON (``--bio-json``).
Run through ``python benchmarks/run.py`` for the JSON, the table and the plots.
"""

from __future__ import annotations

import bench_harness as bh
import pytest


def _run(request, case: bh.Case, group_result, pytestconfig) -> None:
    reason = bh.unavailable(case)
    if reason:
        pytest.skip(reason)
    result = group_result(case)
    if result.skip:
        pytest.skip(result.skip)
    if result.error:
        pytest.fail(result.error, pytrace=False)
    numel = case.numel()
    extra_info = {
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
        "rounds_planned_per_repeat": result.rounds_planned,
        **bh.input_facts(case),
        **result.info,
    }
    entry = pytestconfig._bio_recorder.add(request.node.name, case, result, extra_info)
    pytestconfig._bio_progress.add(case, entry["stats"]["median"])


def test_op(request, case, group_result, pytestconfig):
    _run(request, case, group_result, pytestconfig)


def test_model(request, case, group_result, pytestconfig):
    _run(request, case, group_result, pytestconfig)


def test_train(request, case, group_result, pytestconfig):
    _run(request, case, group_result, pytestconfig)
