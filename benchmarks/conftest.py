"""pytest configuration of the benchmark suite: options, case generation, progress lines.

Options (all optional):

``--bio-quick``         short rounds (the ``make bench QUICK=1`` mode)
``--bio-device``        ``cpu``, ``gpu`` or ``all`` (default; GPU cases skip without CUDA).
                        ``-k gpu`` / ``-k cpu`` select the same way.
``--bio-contenders``    comma list of ``upstream,ours,compile,copy,plain`` (default: all)
``--bio-sizes``         comma list of size labels (default: 64K,1M,4M on CPU, plus 16M,64M on GPU)
``--bio-threads``       torch CPU threads (default 2)
``--bio-json``          write the results (every case's timed samples per repeat, the machine,
                        the git commit) to this JSON file when the session ends
"""

from __future__ import annotations

import datetime
import os
import platform
import sys

# Before torch loads libgomp: on a shared machine, OpenMP workers that spin before sleeping (the
# default) lose their CPU to other processes and stall every 2-thread parallel region by a
# scheduler slice (10-20 ms, measured here on 64K-element copies); passive workers do not.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import bench_cases as bc  # noqa: E402
import bench_harness as bh  # noqa: E402
import provenance  # noqa: E402


def pytest_addoption(parser):
    group = parser.getgroup("bio benchmarks")
    group.addoption("--bio-quick", action="store_true", help="short rounds (quick mode)")
    group.addoption("--bio-device", default="all", choices=["cpu", "gpu", "all"])
    group.addoption(
        "--bio-contenders",
        default=",".join(bh.CONTENDER_FAMILIES),
        help="comma list of: " + ",".join(bh.CONTENDER_FAMILIES),
    )
    group.addoption("--bio-sizes", default="", help="comma list of size labels, e.g. 64K,4M")
    group.addoption("--bio-threads", type=int, default=2, help="torch CPU threads (default 2)")
    group.addoption("--bio-json", default="", help="write the results JSON here")


def _families(config):
    families = [f.strip() for f in config.getoption("--bio-contenders").split(",") if f.strip()]
    unknown = sorted(set(families) - set(bh.CONTENDER_FAMILIES))
    if unknown:
        raise pytest.UsageError(
            f"unknown --bio-contenders {unknown}; valid: {', '.join(bh.CONTENDER_FAMILIES)}"
        )
    return families


def _sizes(config):
    chosen = [s.strip() for s in config.getoption("--bio-sizes").split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(bc.SIZES))
    if unknown:
        raise pytest.UsageError(f"unknown --bio-sizes {unknown}; valid: {', '.join(bc.SIZES)}")
    if not chosen:
        return None
    return {"cpu": chosen, "gpu": chosen}


def pytest_configure(config):
    torch.set_num_threads(config.getoption("--bio-threads"))
    config._bio_progress = bh.Progress()
    config._bio_recorder = bh.Recorder()
    config._bio_groups = {}
    config._bio_meta = {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "git": provenance.git_state(ROOT),  # at the start: the code this run measures
    }


def pytest_generate_tests(metafunc):
    if "case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    device = config.getoption("--bio-device")
    devices = ["cpu", "gpu"] if device == "all" else [device]
    kind = {"test_model": "model", "test_train": "train"}.get(metafunc.function.__name__, "op")
    cases = [c for c in bh.all_cases(devices, _families(config), _sizes(config)) if c.kind == kind]
    metafunc.parametrize("case", cases, ids=[c.id for c in cases])


@pytest.fixture(scope="session")
def plan(pytestconfig):
    return bc.QUICK_PLAN if pytestconfig.getoption("--bio-quick") else bc.FULL_PLAN


@pytest.fixture(scope="session")
def upstream_worker():
    """A getter of the upstream process, started on first use. An install failure is remembered,
    so every upstream case fails with the same message instead of retrying the install."""
    state = {}

    def get():
        if "error" in state:
            raise state["error"]
        if "worker" not in state:
            try:
                state["worker"] = bh.UpstreamWorker()
            except bh.UpstreamUnavailable as exc:
                state["error"] = exc
                raise
        return state["worker"]

    yield get
    if "worker" in state:
        state["worker"].close()


@pytest.fixture(scope="session")
def group_result(pytestconfig, plan, upstream_worker):
    """``get(case)``: the result of ``case``, measuring its whole group (every selected, runnable
    contender of it, interleaved) the first time one of them asks."""
    cache = {}
    threads = pytestconfig.getoption("--bio-threads")

    def get(case):
        if case.group not in cache:
            cache.clear()
            selected = pytestconfig._bio_groups.get(case.group, [case])
            runnable = [c for c in selected if bh.unavailable(c) is None]
            cache[case.group] = bh.measure_group(runnable, plan, threads, upstream_worker)
        return cache[case.group][case]

    return get


def _case_of(item):
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("case") if callspec is not None else None


def pytest_collection_finish(session):
    groups = {}
    for case in map(_case_of, session.items):
        if case is not None:
            groups.setdefault(case.group, []).append(case)
    session.config._bio_groups = groups
    session.config._bio_progress.total_groups = len(groups)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    yield
    case = _case_of(item)
    if case is None:
        return
    following = _case_of(nextitem) if nextitem is not None else None
    if following is not None and following.group == case.group:
        return
    progress = item.config._bio_progress
    if not progress.medians.get(case.group) and case.device == "gpu" and not _has_cuda():
        progress.done_groups += 1  # skipped GPU groups on a CPU machine: no line
        return
    reporter = item.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(progress.line(case.group))


def pytest_report_teststatus(report, config):
    # The progress line per group replaces the dots of passed benchmark cases.
    if (
        report.when == "call"
        and report.passed
        and "[" in report.nodeid
        and "benchmarks" in (report.nodeid)
    ):
        return "passed", "", "PASSED"
    return None


def _has_cuda() -> bool:
    return torch.cuda.is_available()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_info(config) -> dict:
    import bio_transformations
    from bio_transformations import kernels

    info = dict(config._bio_meta)
    info.update(
        {
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "loadavg_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "cpu_model": _cpu_model(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "bio_transformations": bio_transformations.__version__,
            "upstream": bh.UPSTREAM_REQUIREMENT,
            "memory_gb": _memory_gb(),
            "machine": platform.machine(),
            "quick": bool(config.getoption("--bio-quick")),
            "plan": (bc.QUICK_PLAN if config.getoption("--bio-quick") else bc.FULL_PLAN).__dict__,
            "crystallize_mask_fraction_training": bc.CRYSTALLIZE_MASK_FRACTION,
            "git_changed_during_run": provenance.git_state(ROOT) != info["git"],
            "recorded": os.environ.get("BIO_BENCH_RECORD") == "1",
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "command": os.environ.get("BIO_BENCH_COMMAND")
            or " ".join(["pytest", *config.invocation_params.args]),
            "cuda": torch.cuda.is_available(),
            "triton_backend": kernels.triton_available() and torch.cuda.is_available(),
        }
    )
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("--bio-json")
    if path:
        session.config._bio_recorder.write(path, machine_info(session.config))
