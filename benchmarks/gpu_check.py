"""One prepared GPU run of the Triton backend: correctness first, then timings (``gpu_check.sh``).

``python gpu_check.py run OUTDIR [--dry-run] [--budget S]``  checks, then benchmarks
``python gpu_check.py summary OUTDIR``                     summary.json + summary.md from what
                                                          is on disk (also after a kill)

Everything goes to disk as it happens: ``checks.json`` is rewritten after every check, and every
measurement (or the reason an item was skipped) is one line of ``results.jsonl``, flushed at
once. ``--budget`` (seconds, default 330) is a hard deadline for this process: an item starts only
when its estimated cost fits in what is left, in this priority order:

0. checks: ``agreement`` (every op, triton against torch with the Philox stream,
   ``settings.override(rng="philox")``, on ~1M elements, fp32 and bf16, contiguous,
   channels_last and unaligned), ``no_host_sync``, ``cuda_graph``, ``cuda_graph_capturable``
   (the ``capturable`` mode: fresh draws per replay, equal to eager), ``streams`` (a table
   used on a second stream), ``one_launch`` (also:
   the default model-level ``bio_step()`` is at most 3 device ops);
1. every op at 64M elements, fp32, contiguous (NDIM 0), aligned, with ``copy_`` of the same bytes;
2. the same in bf16;
3. the fused step in 4-D: contiguous against channels_last, and one channels_last conv in a launch
   with a 64M Linear weight;
4. the fused step unaligned (views at a 4-byte offset), and one unaligned tensor in a launch with
   an aligned 64M one;
5. model-level ``bio_step(volume=True)`` on a 100-layer model (64M weights): device and host time;
6. ``torch.compile`` of the same formula (``bench_cases.FORMULAS``), fused step first.

Timing (per item): the tensors the op writes are restored from pristine copies, L2 is flushed
(a 512 MB buffer zeroed), ``torch.cuda._sleep`` keeps the GPU busy while the host enqueues the
call, then CUDA events bracket the call: the event window holds GPU work only, not host time
(which is measured separately: ``host_us``, the median wall time of an unsynchronised call).
The median of ``reps`` such rounds is reported. ``triton.testing.do_bench`` is not used because it
cannot restore inputs outside the timed window.

Bytes per element: ``bytes_floor`` is what the op must move (each operand read once, each result
written once, plus one read of ``w`` where a per-layer statistic of it is needed first);
``bytes_moved`` estimates what the current implementation moves (statistics passes included:
e.g. the fp32 fused step 28, rejuvenation 12). ``copy_`` of ``bytes_floor`` is timed on the
same device: ``frac_copy = copy time / op time`` is the fraction of measured copy bandwidth the
op reaches; ``GBps_floor`` = ``bytes_floor * n / time``.

``--dry-run``: CPU, tiny sizes, the Triton kernels in the interpreter (``TRITON_INTERPRET=1``, set
by ``gpu_check.sh --dry-run``) or the torch backend if triton is missing, perf_counter timing,
``torch.compile(backend="eager")``: proves the plumbing (files, priorities, deadline) end to end.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# Op arguments (the benchmark suite's: bench_cases imports torch only).
NU, DAMP, THRESH, DRE = 0.16, 0.6, 4.5e-05, 8.0
BASE_LR, STAB, VAR = 0.1, 2.0, 0.2
LO, HI, DECAY, NOISE = 0.5, 2.0, 0.9995, 0.016
KEY = 0x5EED_0001


def step_params():
    """The fused step's stages and scalars (imported here: ``main`` sets TRITON_INTERPRET
    before anything imports triton)."""
    from bio_transformations.kernels.contract import StepParams

    return StepParams(True, True, True, BASE_LR, STAB, VAR, THRESH, DAMP)


#: op -> (writes, floor bytes in units of the element size). Floor: every operand read once,
#: every result written once, one read of w where a statistic of it comes first.
OPS: Dict[str, tuple] = {
    "bio_step_": (("g", "p"), 6),
    "volume_scale_": (("g",), 3),
    "crystallize_": (("p",), 5),
    "fuzzy_scale_": (("g",), 3),
    "rejuvenate_": (("w",), 3),
    "rejuvenate_legacy_": (("w",), 3),
    "rates_init_": (("p",), 1),
    "temporal_update_": (("p",), 2),
    "weight_adaptive_": (("p",), 3),
    "activity_update_": (("p",), 1),
    "dale_enforce_": (("w",), 2),
}
#: The torch.compile contender for each op, from bench_cases.FORMULAS (same formulas as the
#: benchmark suite); fused step first.
COMPILE_OPS = {
    "bio_step_": "bio_step",
    "volume_scale_": "volume",
    "crystallize_": "crystallize",
    "fuzzy_scale_": "fuzzy",
    "rejuvenate_": "rejuvenate",
    "temporal_update_": "temporal",
    "weight_adaptive_": "weight_adaptive",
}


def bytes_moved(op: str, dt: int) -> int:
    """Bytes per element the current implementation moves (kernel plus statistics passes)."""
    up = 0 if dt == 4 else dt + 4  # _upcast: a float32 copy of a 16-bit weight for statistics
    return {
        # kernel r w,g,p w g,p; the statistics pass (kernels/triton/reduce.py) reads w and g
        "bio_step_": 5 * dt + 2 * dt,
        "volume_scale_": 3 * dt,
        "crystallize_": 4 * dt + 2 * dt,
        "fuzzy_scale_": 3 * dt,
        # kernel r/w w; one statistics pass reads w (cleaning writes only changed elements)
        "rejuvenate_": 2 * dt + dt,
        # kernel r/w w; nan_to_num_ r/w; abs() r/w fp32; amax r fp32
        "rejuvenate_legacy_": 2 * dt + 2 * dt + up + 8 + 4,
        "rates_init_": dt,
        "temporal_update_": 2 * dt,
        "weight_adaptive_": 2 * dt + dt,
        "activity_update_": dt,
        "dale_enforce_": 2 * dt,
    }[op]


# ---------------------------------------------------------------------------------------------
# Output: checks.json and results.jsonl, written as they happen
# ---------------------------------------------------------------------------------------------


class Recorder:
    def __init__(self, out: Path, deadline: float):
        self.out, self.deadline = out, deadline
        self.checks: List[dict] = []
        self.results = out / "results.jsonl"
        self.results.touch()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def write_checks(self) -> None:
        tmp = self.out / "checks.json.tmp"
        tmp.write_text(json.dumps({"checks": self.checks}, indent=2) + "\n")
        os.replace(tmp, self.out / "checks.json")

    def check(self, name: str, fn: Callable[[], str], skip: Optional[str] = None) -> None:
        t0 = time.time()
        if skip:
            status, detail = "skip", skip
        else:
            try:
                detail, status = fn(), "pass"
            except Exception:
                detail, status = traceback.format_exc(limit=6), "fail"
        row = {"name": name, "status": status, "seconds": round(time.time() - t0, 1)}
        row["detail"] = detail
        self.checks.append(row)
        self.write_checks()
        print(f"[{status.upper()}] {name} ({row['seconds']} s): {detail}", flush=True)

    def line(self, row: dict) -> None:
        with open(self.results, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        print("[RESULT]", json.dumps(row), flush=True)


# ---------------------------------------------------------------------------------------------
# Setup: device, backends, sizes
# ---------------------------------------------------------------------------------------------


class Env:
    def __init__(self, dry: bool):
        import torch

        from bio_transformations import kernels, set_backend

        self.dry = dry
        self.device = torch.device("cpu" if dry else "cuda")
        self.torch_backend = kernels.torch_backend
        if kernels.triton_available():
            set_backend("triton")
        # kernels.triton (the torch backend in a dry run without triton); the same module for
        # every dtype the timings use
        self.ours = kernels.backend_module(self.device, torch.float32)
        self.ours_name = "triton" if self.ours is not self.torch_backend else "torch"
        self.n = (1 << 10) if dry else (1 << 26)
        self.agree_n = (1 << 10) if dry else (1 << 20)
        self.layers = 10 if dry else 100
        self.conv = (8, 4, 3, 3) if dry else (64, 32, 3, 3)
        self.reps = 1 if dry else 15
        self.warmup = 1 if dry else 2
        self.flush = None if dry else torch.empty(512 << 20, dtype=torch.uint8, device="cuda")

    def sync(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()


def make_data(env: Env, shape, dtype, layout: str = "contiguous", offset: int = 0) -> dict:
    """Pristine ``w, g, p`` (+ per-row signs and counts) of ``shape``: layout ``contiguous`` or
    ``channels_last``; ``offset`` elements into a larger buffer (4 bytes: unaligned)."""
    import torch

    gen = torch.Generator(device=env.device)
    gen.manual_seed(1234)
    n = math.prod(shape)

    def make(scale, shift=0.0, uniform=False):
        base = torch.empty(n + offset, dtype=torch.float32, device=env.device)
        if uniform:
            base.uniform_(-1, 1, generator=gen)
        else:
            base.normal_(0, 1, generator=gen)
        base.mul_(scale).add_(shift)
        t = base.to(dtype)[offset:].view(shape)
        if layout == "channels_last":
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    rows = shape[0]
    signs = torch.where(torch.arange(rows, device=env.device) % 2 == 0, 1.0, -1.0).to(dtype)
    counts = torch.randint(0, 100, (rows,), generator=gen, device=env.device)
    return {
        "w": make(0.02),
        "g": make(1e-3),
        "p": make(NU, 1.0, uniform=True),
        "sign": signs,
        "counts": counts,
    }


def op_call(B, op: str, d: Dict[str, list]) -> Callable[[], object]:
    """``op`` of backend module ``B`` on the lists in ``d`` (one entry per layer)."""
    w, g, p = d["w"], d["g"], d["p"]
    keys = [KEY + i for i in range(len(w))]
    step = step_params()
    return {
        "bio_step_": lambda: B.bio_step_(w, g, p, keys, step),
        "volume_scale_": lambda: B.volume_scale_(w, g, keys, BASE_LR, STAB, VAR),
        "crystallize_": lambda: B.crystallize_(w, g, p, THRESH, DAMP),
        "fuzzy_scale_": lambda: B.fuzzy_scale_(g, p),
        "rejuvenate_": lambda: B.rejuvenate_(w, keys, DRE),
        "rejuvenate_legacy_": lambda: B.rejuvenate_legacy_(w, keys, DRE),
        "rates_init_": lambda: B.rates_init_(p, keys, "lognormal", NU, LO, HI),
        "temporal_update_": lambda: B.temporal_update_(p, keys, DECAY, NOISE, LO, HI),
        "weight_adaptive_": lambda: B.weight_adaptive_(p, w, keys, NU, LO, HI),
        "activity_update_": lambda: B.activity_update_(p, d["counts"], keys, NU, LO, HI),
        "dale_enforce_": lambda: B.dale_enforce_(w, d["sign"]),
    }[op]


def restorer(d: Dict[str, list], writes) -> Callable[[], None]:
    pristine = [(t, t.clone()) for k in writes for t in d[k]]

    def restore():
        for t, c in pristine:
            t.copy_(c)

    return restore


def lists(*datas: dict) -> Dict[str, list]:
    return {k: [d[k] for d in datas] for k in datas[0]}


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def measure(env: Env, fn: Callable, restore: Callable, reps: Optional[int] = None) -> dict:
    """Median device time of ``fn`` (µs) over ``reps`` rounds, inputs restored and L2 flushed
    before each, and the median host time of one unsynchronised call."""
    import torch

    reps = reps or env.reps
    for _ in range(env.warmup):  # warm-up: compiles, caches tables
        restore()
        fn()
    env.sync()
    host = []
    for _ in range(max(1, reps // 3)):
        restore()
        env.sync()
        t0 = time.perf_counter()
        fn()
        host.append(time.perf_counter() - t0)
        env.sync()
    host_s = statistics.median(host)
    times = []
    if env.device.type == "cuda":
        sleep = getattr(torch.cuda, "_sleep", None)
        cycles = int((2 * host_s + 100e-6) * 2.0e9)  # outlasts the host's enqueueing
        events = []
        for _ in range(reps):
            restore()
            env.flush.zero_()
            if sleep is not None:
                sleep(cycles)
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            events.append((s, e))
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) * 1e3 for s, e in events]
    else:
        for _ in range(reps):
            restore()
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    times.sort()
    return {
        "us": round(statistics.median(times), 2),
        "us_min": round(times[0], 2),
        "us_max": round(times[-1], 2),
        "host_us": round(host_s * 1e6, 1),
        "reps": reps,
    }


_copy_cache: Dict[int, dict] = {}


def copy_time(env: Env, nbytes: int) -> dict:
    """``dst.copy_(src)`` moving ``nbytes`` in all (half read, half written); cached."""
    import torch

    half = max(16, nbytes // 2)
    if half not in _copy_cache:
        src = torch.ones(half, dtype=torch.uint8, device=env.device)
        dst = torch.empty_like(src)
        r = measure(env, lambda: dst.copy_(src), lambda: None)
        r["GBps"] = round(2 * half / (r["us"] * 1e-6) / 1e9, 1)
        _copy_cache[half] = r
        del src, dst
    return _copy_cache[half]


def bench_op(env: Env, rec: Recorder, item: str, op: str, d: Dict[str, list], dtype_size: int,
             extra: Optional[dict] = None, fn: Optional[Callable] = None) -> None:  # fmt: skip
    """Time ``op`` on the lists ``d`` (or ``fn``, a contender doing the same work on them)
    against ``copy_`` of the op's floor bytes, and write one result line."""
    writes, floor_units = OPS[op]
    restore = restorer(d, writes)
    call = fn or op_call(env.ours, op, d)
    n = sum(t.numel() for t in d["g"])
    r = measure(env, call, restore)
    floor = floor_units * dtype_size
    c = copy_time(env, floor * n)
    row = {
        "item": item,
        "op": op,
        "backend": env.ours_name,
        "elements": n,
        "bytes_floor": floor,
        "bytes_moved": bytes_moved(op, dtype_size),
        **r,
        "copy_us": c["us"],
        "copy_GBps": c["GBps"],
        "frac_copy": round(c["us"] / r["us"], 3),
        "GBps_floor": round(floor * n / (r["us"] * 1e-6) / 1e9, 1),
        "GBps_moved": round(bytes_moved(op, dtype_size) * n / (r["us"] * 1e-6) / 1e9, 1),
    }
    row.update(extra or {})
    rec.line(row)


# ---------------------------------------------------------------------------------------------
# Checks (priority 0)
# ---------------------------------------------------------------------------------------------


def check_agreement(env: Env) -> str:
    """Every op, ours against torch_backend drawing Triton's Philox stream, on ~1M elements:
    fp32 and bf16, contiguous, channels_last and unaligned in one launch. Elements may differ
    where a random decision sits at its threshold (rejuvenation, crystallize after the volume
    draw): at most 1e-4 of them, beyond a tolerance of 16 ulp (fp32) / 2 ulp (bf16)."""
    from bio_transformations.kernels import settings

    if env.ours is env.torch_backend:
        return "skipped: ours is the torch backend (triton does not import)"
    with settings.override(rng="philox"):  # the torch backend draws Triton's Philox numbers
        return _agreement(env)


def _agreement(env: Env) -> str:
    import torch

    side = int(math.isqrt(env.agree_n))
    worst = {}
    for dtype, eps in ((torch.float32, 16 * 2.0**-23), (torch.bfloat16, 2 * 2.0**-7)):
        size = 2 if dtype == torch.bfloat16 else 4
        for op, (writes, _) in OPS.items():
            outs = []
            for B in (env.ours, env.torch_backend):
                datas = [
                    make_data(env, (side, side), dtype),
                    make_data(env, env.conv, dtype, "channels_last"),
                    make_data(env, (side // 4, side), dtype, offset=1),
                ]
                d = lists(*datas)
                res = op_call(B, op, d)()
                env.sync()
                outs.append([t.float() for k in writes for t in d[k]] + (
                    [res.float()] if isinstance(res, torch.Tensor) else []))  # fmt: skip
            bad, total = 0, 0
            for a, b in zip(*outs):
                close = torch.isclose(a, b, rtol=eps, atol=1e-30, equal_nan=True)
                bad += int((~close).sum())
                total += a.numel()
            worst[f"{op}/{size}B"] = bad / max(total, 1)
            if bad / max(total, 1) > 1e-4:
                raise AssertionError(
                    f"{op} {dtype}: {bad} of {total} elements differ from torch_backend"
                )
    top = sorted(worst.items(), key=lambda kv: -kv[1])[:4]
    return f"{len(worst)} op/dtype pairs agree; largest mismatch fractions: {top}"


def _model(env: Env, layers=3, width=256):
    import torch
    import torch.nn as nn

    from bio_transformations import BioConverter, Distribution

    torch.manual_seed(0)
    blocks = [nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, width)]
    for _ in range(layers - 2):
        blocks += [nn.ReLU(), nn.Linear(width, width)]
    blocks += [nn.ReLU(), nn.Linear(width, 10)]
    converter = BioConverter(
        fuzzy_lr_distribution=Distribution.TEMPORAL,
        fuzzy_lr_dynamic=True,
        fuzzy_lr_update_freq=1,
        apply_dales_principle=True,
    )
    model = converter(nn.Sequential(*blocks)).to(env.device)
    model[0].to(memory_format=torch.channels_last)
    x = torch.randn(16, 3, 8, 8, device=env.device)
    model(x).square().mean().backward()
    return model


def _step_state(model):
    """``(bio modules, weights, restore, state)`` of a model with gradients: ``restore()`` puts
    back the gradients and rates as they are now, ``state()`` clones what a step changes."""
    bios = [m for m in model.modules() if hasattr(m, "fuzzy_learning_rate_parameters")]
    params = [m.weight for m in model.modules() if hasattr(m, "bio_mod")]
    grads0 = [p.grad.clone() for p in params]
    rates0 = [b.fuzzy_learning_rate_parameters.clone() for b in bios]

    def restore():
        for p, g in zip(params, grads0):
            p.grad.copy_(g)
        for b, r in zip(bios, rates0):
            b.fuzzy_learning_rate_parameters.copy_(r)

    def state():
        return [p.grad.clone() for p in params] + [
            b.fuzzy_learning_rate_parameters.clone() for b in bios
        ]

    return bios, params, restore, state


MODEL_OPS = (
    "volume_dependent_lr",
    "fuzzy_learning_rates",
    "crystallize",
    "bio_step",
    "update_fuzzy_learning_rates",
    "rejuvenate_weights",
    "rejuvenate_weights_old",
    "enforce_dales_principle",
)


def check_no_host_sync(env: Env) -> str:
    import torch

    model = _model(env)
    for name in MODEL_OPS:  # warm-up: compiles kernels and caches the tables
        getattr(model, name)()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            for name in MODEL_OPS:
                getattr(model, name)()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return f"{len(MODEL_OPS)} model-level ops x2 ran with sync debug mode 'error'"


def check_cuda_graph(env: Env) -> str:
    """One captured model-level bio_step(volume=True): replay == eager with the same keys,
    twice alike."""
    import torch

    model = _model(env)
    bios, params, restore, state = _step_state(model)
    initial = state()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs asks
        model.bio_step(volume=True)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    restore()
    steps = [b.rng_step.clone() if torch.is_tensor(b.rng_step) else b.rng_step for b in bios]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model.bio_step(volume=True)
    torch.cuda.synchronize()
    restore()
    graph.replay()
    torch.cuda.synchronize()
    replayed = state()
    restore()
    graph.replay()
    torch.cuda.synchronize()
    again = state()
    restore()
    for b, s in zip(bios, steps):  # eager call with the keys the capture used
        if torch.is_tensor(b.rng_step):
            b.rng_step.copy_(s)
        else:
            b.rng_step = s
    model.bio_step(volume=True)
    torch.cuda.synchronize()
    eager = state()
    if not all(torch.equal(a, b) for a, b in zip(replayed, eager)):
        raise AssertionError("graph replay differs from the eager bio_step with the same keys")
    if not all(torch.equal(a, b) for a, b in zip(replayed, again)):
        raise AssertionError("two replays differ")
    if all(torch.equal(a, g) for a, g in zip(replayed, initial)):
        raise AssertionError("the replay did not change the gradients")
    return f"captured and replayed bio_step over {len(params)} layers; replay == eager"


def check_cuda_graph_capturable(env: Env) -> str:
    """``capturable`` mode: one captured model-level bio_step(volume=True) replayed twice draws
    fresh numbers each replay, equal to eager steps with host keys from the same counters,
    and the device counters advance by one per replay."""
    import torch

    from bio_transformations import step_cache
    from bio_transformations.kernels import settings

    model = _model(env)
    bios, params, restore, state = _step_state(model)

    with settings.override(capturable=True):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: tables, buffers, device counters
            model.bio_step(volume=True)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        restore()
        step_cache.sync_steps(model)
        start = [int(b.rng_step) for b in bios]
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model.bio_step(volume=True)
        torch.cuda.synchronize()
        replays = []
        for _ in range(2):
            restore()
            graph.replay()
            torch.cuda.synchronize()
            replays.append(state())
        restore()
        step_cache.sync_steps(model)
        after = [int(b.rng_step) for b in bios]
    if after != [n + 2 for n in start]:
        raise AssertionError(f"device counters {after} after two replays from {start}")
    for k, replayed in enumerate(replays):
        for b, n in zip(bios, start):
            b.rng_step = n + k
        model.bio_step(volume=True)  # eager, host keys
        torch.cuda.synchronize()
        eager = state()
        restore()
        if not all(torch.equal(a, b) for a, b in zip(replayed, eager)):
            raise AssertionError(f"replay {k + 1} differs from the eager step at counter +{k}")
    if all(torch.equal(a, b) for a, b in zip(*replays)):
        raise AssertionError("two replays drew the same numbers")
    return f"2 replays over {len(params)} layers: fresh draws, each == eager; counters +2"


def check_streams(env: Env) -> str:
    """A launch table built on one stream and used on another: the second stream waits for
    the table's copy and is recorded on the plan; results equal the default stream's."""
    import torch

    from bio_transformations.kernels import triton as trb
    from bio_transformations.kernels.triton import launch

    torch.manual_seed(0)
    g0 = [torch.randn(1 << 16, device="cuda"), torch.randn(3000, device="cuda")]
    p = [torch.rand_like(t) + 0.5 for t in g0]
    g = [t.clone() for t in g0]
    trb.fuzzy_scale_(g, p)  # builds the plan on the default stream
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(1_000_000)  # the side stream lags: ordering must come from events
        trb.fuzzy_scale_(g, p)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    if not all(torch.equal(a, b * q * q) for a, b, q in zip(g, g0, p)):
        raise AssertionError("the side-stream launch differs from g * p * p")
    streams = [len(plan._streams) for plan in launch._plans.values() if plan._streams]
    if max(streams, default=0) < 2:
        raise AssertionError(f"no plan recorded a second stream: {streams}")
    return "table built on the default stream, used on a side stream: waits, records, agrees"


def check_one_launch(env: Env) -> str:
    import torch
    from torch.profiler import ProfilerActivity, profile

    model = _model(env, layers=12, width=128)
    model.bio_step(volume=True)  # warm-up
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model.bio_step(volume=True)
        torch.cuda.synchronize()
    counts = {e.key: e.count for e in prof.key_averages()}
    step = [n for n in counts if "_step_kernel" in n]
    if not step:
        raise AssertionError(f"no _step_kernel launch seen; kernels: {sorted(counts)}")
    launches = sum(counts[n] for n in step)
    if launches != 1:
        raise AssertionError(f"{launches} _step_kernel launches for one group")
    model.bio_step()  # the default step: statistics pass + step kernel, nothing else
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model.bio_step()
        torch.cuda.synchronize()
    default = {e.key: e.count for e in prof.key_averages()}
    if sum(default.values()) > 3:
        raise AssertionError(f"bio_step(): {sum(default.values())} > 3 device ops: {default}")
    return (
        f"1 _step_kernel launch; all kernels and counts: {sorted(counts.items())}; "
        f"bio_step(): {sorted(default.items())}"
    )


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def plan(env: Env) -> List[tuple]:
    """``(priority, item, estimated seconds, function)`` in the order they run."""
    import torch

    side = int(math.isqrt(env.n))
    sizes = {torch.float32: 4, torch.bfloat16: 2}
    items: List[tuple] = []
    est = 2 if env.dry else 8  # seconds per op timing item (data, warm-up, reps, copy)

    def op_item(op, dtype):
        def run(rec):
            datas = [make_data(env, (side, side), dtype)]
            bench_op(
                env,
                rec,
                f"op/{op}/{str(dtype)[6:]}",
                op,
                lists(*datas),
                sizes[dtype],
                {"dtype": str(dtype)[6:], "layout": "contiguous", "aligned": True},
            )

        return run

    for prio, dtype in ((1, torch.float32), (2, torch.bfloat16)):
        for op in OPS:
            items.append((prio, f"op/{op}/{str(dtype)[6:]}", est, op_item(op, dtype)))

    shape4 = (side // 16, side // 16, 16, 16) if not env.dry else (8, 8, 4, 4)

    def layout_item(layout):
        def run(rec):
            datas = [make_data(env, shape4, torch.float32, layout)]
            bench_op(env, rec, f"layout/{layout}", "bio_step_", lists(*datas), 4,
                     {"dtype": "float32", "layout": layout, "shape": list(shape4)})  # fmt: skip

        return run

    def mixed_layout(rec):
        datas = [
            make_data(env, (side, side), torch.float32),
            make_data(env, env.conv, torch.float32, "channels_last"),
        ]
        bench_op(
            env,
            rec,
            "layout/linear+one_channels_last_conv",
            "bio_step_",
            lists(*datas),
            4,
            {"dtype": "float32", "layout": "mixed: NDIM of the conv for the whole launch"},
        )

    items += [
        (3, "layout/contiguous", est, layout_item("contiguous")),
        (3, "layout/channels_last", est, layout_item("channels_last")),
        (3, "layout/linear+one_channels_last_conv", est, mixed_layout),
    ]

    def unaligned(rec):
        datas = [make_data(env, (side, side), torch.float32, offset=1)]
        bench_op(env, rec, "aligned/unaligned", "bio_step_", lists(*datas), 4,
                 {"dtype": "float32", "aligned": False})  # fmt: skip

    def mixed_aligned(rec):
        datas = [
            make_data(env, (side, side), torch.float32),
            make_data(env, (16, 16), torch.float32, offset=1),
        ]
        bench_op(env, rec, "aligned/one_unaligned_in_launch", "bio_step_", lists(*datas), 4,
                 {"dtype": "float32", "aligned": "mixed: one 4-byte-offset tensor"})  # fmt: skip

    items += [(4, "aligned/unaligned", est, unaligned),
              (4, "aligned/one_unaligned_in_launch", est, mixed_aligned)]  # fmt: skip
    item = f"model/{env.layers}_layers_bio_step"
    items.append((5, item, 3 * est, lambda rec: bench_model(env, rec, item)))

    def compile_item(op, name):
        def run(rec):
            import bench_cases

            formula = bench_cases.FORMULAS[name]
            d = make_data(env, (side, side), torch.float32)
            compiled = torch.compile(formula, backend="eager" if env.dry else "inductor")
            call = lambda: compiled(d["w"], d["g"], d["p"])  # noqa: E731
            t0 = time.perf_counter()
            call()  # compiles
            env.sync()
            secs = round(time.perf_counter() - t0, 1)
            bench_op(env, rec, f"compile/{op}", op, lists(d), 4,
                     {"dtype": "float32", "contender": "torch.compile", "compile_s": secs},
                     fn=call)  # fmt: skip

        return run

    for op, name in COMPILE_OPS.items():
        items.append((6, f"compile/{op}", 5 if env.dry else 40, compile_item(op, name)))
    return items


def bench_model(env: Env, rec: Recorder, item: str) -> None:
    """Model-level bio_step(volume=True) on a converted bias-free MLP of ``env.layers`` layers
    (100; 10 in a dry run) and ~n weights."""
    import torch
    import torch.nn as nn

    from bio_transformations import BioConverter

    width = max(8, int(math.isqrt(env.n // env.layers)))
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(env.layers)])
    model = BioConverter()(model).to(env.device)
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    for w in weights:
        w.grad = torch.randn_like(w).mul_(1e-3)
    bios = [m for m in model.modules() if hasattr(m, "fuzzy_learning_rate_parameters")]
    d = {"g": [w.grad for w in weights], "p": [b.fuzzy_learning_rate_parameters for b in bios]}
    bench_op(env, rec, item, "bio_step_", d, 4,
             {"dtype": "float32", "layers": env.layers, "width": width},
             fn=lambda: model.bio_step(volume=True))  # fmt: skip


def run(out: Path, dry: bool, budget: float) -> int:
    import torch

    logging.getLogger("bio_transformations").setLevel(logging.WARNING)
    deadline = time.monotonic() + budget
    rec = Recorder(out, deadline)
    if not dry and not torch.cuda.is_available():
        print("gpu_check.py: CUDA is not available (use --dry-run on a CPU)", file=sys.stderr)
        return 2
    env = Env(dry)
    meta = {
        "item": "environment",
        "dry_run": dry,
        "device": torch.cuda.get_device_name(0) if not dry else "cpu",
        "torch": torch.__version__,
        "ours": env.ours_name,
        "n": env.n,
        "budget_s": budget,
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    rec.line(meta)
    no_cuda = "dry run: needs CUDA" if dry else None
    rec.check("agreement", lambda: check_agreement(env))
    rec.check("no_host_sync", lambda: check_no_host_sync(env), skip=no_cuda)
    rec.check("cuda_graph", lambda: check_cuda_graph(env), skip=no_cuda)
    rec.check("cuda_graph_capturable", lambda: check_cuda_graph_capturable(env), skip=no_cuda)
    rec.check("streams", lambda: check_streams(env), skip=no_cuda)
    rec.check("one_launch", lambda: check_one_launch(env), skip=no_cuda)
    for prio, item, est, fn in plan(env):
        left = rec.left()
        if left < est:
            rec.line({"item": item, "priority": prio, "skipped": f"{left:.0f} s left < {est} s"})
            continue
        try:
            fn(rec)
        except Exception:
            rec.line({"item": item, "priority": prio, "error": traceback.format_exc(limit=4)})
        if env.device.type == "cuda":
            torch.cuda.empty_cache()
    failed = [c["name"] for c in rec.checks if c["status"] == "fail"]
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------


def _read_steps(out: Path) -> List[dict]:
    steps = []
    path = out / "steps.tsv"
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 4:
                steps.append(dict(zip(("name", "status", "seconds", "detail"), parts)))
    return steps


def write_summary(out: Path) -> int:
    steps = _read_steps(out)
    checks = []
    if (out / "checks.json").exists():
        checks = json.loads((out / "checks.json").read_text()).get("checks", [])
    rows = []
    if (out / "results.jsonl").exists():
        for line in (out / "results.jsonl").read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill
                pass
    env = (out / "env.txt").read_text() if (out / "env.txt").exists() else ""
    failed = [s["name"] for s in steps + checks if s["status"] == "fail"]
    summary = {"ok": not failed, "failed": failed, "steps": steps, "checks": checks,
               "results": rows, "environment": env}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        "# GPU check of the Triton backend",
        "",
        f"**Result: {'PASS' if not failed else 'FAIL (' + ', '.join(failed) + ')'}**",
        "",
        "```",
        env.strip(),
        "```",
        "",
        "| step | status | seconds | detail |",
        "|---|---|---|---|",
    ]
    for s in steps + checks:
        detail = " ".join(str(s["detail"]).split())[:300].replace("|", "\\|")
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']} | {detail} |")
    timed = [r for r in rows if "us" in r]
    if timed:
        lines += [
            "",
            "Device time (median µs; CUDA events, inputs restored, L2 flushed), host time of one "
            "call, and the fraction of `copy_` bandwidth (copy of `bytes_floor` / op time):",
            "",
            "| item | elements | B/elem floor / moved | µs | host µs | copy µs | frac copy | "
            "GB/s (floor) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in timed:
            lines.append(
                f"| {r['item']} | {r['elements']:,} | {r['bytes_floor']} / {r['bytes_moved']} | "
                f"{r['us']} | {r['host_us']} | {r['copy_us']} | {r['frac_copy']} | "
                f"{r['GBps_floor']} |"
            )
    skipped = [r for r in rows if "skipped" in r or "error" in r]
    if skipped:
        lines += ["", "Not measured:", ""]
        for r in skipped:
            why = r.get("skipped") or " ".join(r["error"].split())[-300:]
            lines.append(f"- {r['item']} (priority {r['priority']}): {why}")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failed else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("command", choices=("run", "summary"))
    ap.add_argument("out", type=Path)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--budget", type=float, default=330.0)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:  # the kernels in Triton's CPU interpreter (decided when triton loads)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    else:
        os.environ.pop("TRITON_INTERPRET", None)
    if args.command == "summary":
        return write_summary(args.out)
    return run(args.out, args.dry_run, args.budget)


if __name__ == "__main__":
    sys.exit(main())
