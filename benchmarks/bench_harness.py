"""The pytest side of the benchmarks: cases, contenders, the upstream worker, recording.

The contenders of one group (one op at one size on one device) are timed together, in
interleaved repeats (:func:`measure_group`), and each test hands its contender's timed samples
to the :class:`Recorder`, which computes the statistics and writes the results JSON itself (no
timing plugin). The contenders:

``upstream``        the published ``pytorch-bio-transformations==0.0.5``, timed in a separate
                    process (``upstream_runner.py --serve``; same import name as ours) with the
                    same data and protocol; its samples are recorded into this benchmark.
``ours_<backend>``  this project's ``BioModule``/model methods on the ``torch`` or ``triton``
                    backend (``ours_<backend>_fused``: the model's fused ``bio_step()``).
``compile``         the same formulas as plain torch on one tensor, through ``torch.compile``.
``copy``            ``Tensor.copy_`` of the bytes the op must move: the memory-bound limit.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import bench_cases as bc
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
UPSTREAM_DIR = os.path.join(HERE, ".upstream")
UPSTREAM_REQUIREMENT = "pytorch-bio-transformations==0.0.5"
CONTENDER_FAMILIES = ("upstream", "ours", "compile", "copy", "plain")

# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    kind: str  # "op", "model" or "train" (the model step beside the plain training step)
    op: str
    size: str  # a SIZES label, or a model name
    device: str  # "cpu" or "gpu"
    contender: str

    @property
    def id(self) -> str:
        prefix = "" if self.kind == "op" else f"{self.kind}_"
        return f"{prefix}{self.op}-{self.size}-{self.device}-{self.contender}"

    @property
    def group(self) -> str:
        if self.kind != "op":
            return f"{self.kind} {self.op} {self.size} {self.device}"
        return f"{self.op} {self.size} {self.device}"

    @property
    def spec(self) -> bc.OpSpec:
        return (bc.OPS if self.kind == "op" else bc.MODEL_OPS)[self.op]

    @property
    def family(self) -> str:
        return self.contender.split("_")[0]

    @property
    def backend(self) -> Optional[str]:
        return self.contender.split("_")[1] if self.family == "ours" else None

    def numel(self) -> int:
        if self.kind != "op":
            return _model_numel(self.size)
        return bc.SIZES[self.size]


_numel_cache: Dict[str, int] = {}


def _model_numel(name: str) -> int:
    if name not in _numel_cache:
        _numel_cache[name] = bc.model_numel(name)
    return _numel_cache[name]


#: Ops that BIO_CPU_FUSED=1 changes; on the CPU they also get the "ours_torch_cpufused"
#: contender (the torch backend with its opt-in fused loop compiled by torch.compile).
CPU_FUSED_OPS = ("crystallize", "volume", "bio_step", "step")


def contenders(device: str, fused: bool, op: str = "") -> List[str]:
    backends = ["torch", "triton"] if device == "gpu" else ["torch"]
    ours = [f"ours_{b}" for b in backends]
    if fused:
        ours += [f"ours_{b}_fused" for b in backends]
    if device == "cpu" and op in CPU_FUSED_OPS:
        ours.append("ours_torch_cpufused")  # model step: the fused bio_step with BIO_CPU_FUSED
    return ["upstream", *ours, "compile", "copy"]


def all_cases(
    devices: Sequence[str],
    families: Sequence[str],
    sizes: Optional[Dict[str, Sequence[str]]] = None,
) -> List[Case]:
    """Every case, grouped: all contenders of a group are adjacent, upstream first."""
    sizes = sizes or {"cpu": bc.CPU_SIZES, "gpu": bc.GPU_SIZES}
    cases = []
    for device in devices:
        for op in bc.OPS:
            for size in sizes[device]:
                for c in contenders(device, fused=False, op=op):
                    cases.append(Case("op", op, size, device, c))
        for model in bc.MODELS:
            for op in bc.MODEL_OPS:
                for c in contenders(device, fused=op == "step", op=op):
                    cases.append(Case("model", op, model, device, c))
        for model in bc.TRAIN_MODELS:
            for c in train_contenders(device):
                cases.append(Case("train", "step", model, device, c))
    return [c for c in cases if c.family in families]


def train_contenders(device: str) -> List[str]:
    """The training-step view: the plain step, then each bio step measured beside it."""
    backends = ["torch", "triton"] if device == "gpu" else ["torch"]
    ours = [f"ours_{b}{suffix}" for b in backends for suffix in ("", "_fused")]
    return ["plain", "upstream", *ours, "compile"]


# ---------------------------------------------------------------------------------------------
# The contenders that run in this process
# ---------------------------------------------------------------------------------------------


def _our_config(op: str):
    from bio_transformations import BioConfig, Distribution

    fields = dict(bc.config_overrides(op))
    if "fuzzy_lr_distribution" in fields:
        fields["fuzzy_lr_distribution"] = Distribution(fields["fuzzy_lr_distribution"])
    return BioConfig(**fields)


def ours_op(op: str, size: str, device: str) -> Tuple[Callable, Callable]:
    """``(call, restore)``: this project's ``BioModule`` method for ``op`` on a fresh layer."""
    from bio_transformations import BioModule

    w0, g0, p0 = bc.layer_data(size, device)
    layer = bc.make_linear(w0, g0)
    mod = BioModule(lambda: layer, config=_our_config(op))
    if op == "dale":  # the initialisation flipped signs: restore to the initialised weights
        w0 = layer.weight.detach().clone()
    restore_tensors = bc.restorer(
        [
            (lambda: layer.weight, w0),
            (lambda: layer.weight.grad, g0),
            (lambda: mod.fuzzy_learning_rate_parameters, p0),
        ]
    )
    call = getattr(mod, bc.OP_METHODS[op])

    def restore() -> None:
        restore_tensors()
        if op == "temporal":  # the next update is a due one, with noise
            mod._update_count = 10 * bc.UPDATE_FREQ - 1
        elif op == "weight_adaptive":  # the next update refills the rates
            mod._rates_filled = False

    return call, restore


def ours_model(model_name: str, op: str, device: str, fused: bool) -> Tuple[Callable, Callable]:
    """``(call, restore)``: a model-level method of a model converted by this project."""
    from bio_transformations import BioConverter

    model = bc.build_model(model_name, device)
    data = bc.model_data(model)
    BioConverter().convert(model)
    pairs = []
    for layer, (w0, g0, p0) in zip(bc.learnable_layers(model), data):
        pairs += [
            (lambda l=layer: l.weight, w0),
            (lambda l=layer: l.weight.grad, g0),
            (lambda l=layer: l.bio_mod.fuzzy_learning_rate_parameters, p0),
        ]

    def step() -> None:
        model.volume_dependent_lr()
        model.fuzzy_learning_rates()
        model.crystallize()

    if op == "step":
        call = model.bio_step if fused else step
    else:
        call = model.rejuvenate_weights
    return call, bc.restorer(pairs)


_compiled: Dict[str, Callable] = {}


def _compiled_formula(name: str, fn: Callable) -> Callable:
    if name not in _compiled:
        _compiled[name] = torch.compile(fn, dynamic=True)
    return _compiled[name]


def compile_op(op: str, size: str, device: str) -> Tuple[Callable, Callable]:
    """``(call, restore)``: the plain-torch formula of ``op`` through ``torch.compile``."""
    w0, g0, p0 = bc.layer_data(size, device)
    w, g, p = w0.clone(), g0.clone(), p0.clone()
    fn = _compiled_formula(op, bc.FORMULAS[op])
    if op == "dale":
        gen = torch.Generator(device=w0.device).manual_seed(7)
        rows = torch.rand((w0.shape[0], 1), generator=gen, device=w0.device)
        sign = torch.where(rows < 0.5, 1.0, -1.0)
        w0 = w0.abs() * sign

        def call() -> None:
            fn(w, sign)

    else:

        def call() -> None:
            fn(w, g, p)

    restore = bc.restorer([(lambda: w, w0), (lambda: g, g0), (lambda: p, p0)])
    return call, restore


def compile_model(model_name: str, op: str, device: str) -> Tuple[Callable, Callable]:
    """``(call, restore)``: the compiled per-tensor formula, called once per layer (flattened, so
    one dynamic-shape graph serves every layer)."""
    model = bc.build_model(model_name, device)
    data = bc.model_data(model)
    live = [(w.clone().view(-1), g.clone().view(-1), p.clone().view(-1)) for w, g, p in data]
    fn = _compiled_formula(f"model_{op}", bc.MODEL_FORMULAS[op])
    pairs = []
    for (w, g, p), (w0, g0, p0) in zip(live, data):
        pairs += [
            (lambda t=w: t, w0.view(-1)),
            (lambda t=g: t, g0.view(-1)),
            (lambda t=p: t, p0.view(-1)),
        ]

    def call() -> None:
        for w, g, p in live:
            fn(w, g, p)

    return call, bc.restorer(pairs)


def copy_case(case: Case) -> Tuple[Callable, Callable]:
    """``dst.copy_(src)`` moving the bytes ``case``'s op must move (see ``OpSpec.passes``)."""
    n = case.spec.passes * case.numel() // 2
    dev = bc.torch_device(case.device)
    src = torch.ones(n, device=dev)
    dst = torch.empty(n, device=dev)

    def call() -> None:
        dst.copy_(src)

    return call, lambda: None


def plain_case(case: Case) -> Tuple[Callable, Callable]:
    """``(call, restore)``: the plain forward+backward of the unconverted model."""
    model = bc.build_model(case.size, case.device)
    x, y = bc.train_batch(case.size, case.device)
    return bc.plain_step(model, x, y), lambda: None


def local_case(case: Case) -> Tuple[Callable, Callable]:
    """``(call, restore)`` for a contender that runs in this process."""
    if case.family == "copy":
        return copy_case(case)
    if case.family == "plain":
        return plain_case(case)
    if case.family == "compile":
        if case.kind != "op":
            return compile_model(case.size, case.op, case.device)
        return compile_op(case.op, case.size, case.device)
    if case.kind != "op":
        return ours_model(case.size, case.op, case.device, fused=case.contender.endswith("fused"))
    return ours_op(case.op, case.size, case.device)


# ---------------------------------------------------------------------------------------------
# The upstream worker
# ---------------------------------------------------------------------------------------------


class UpstreamUnavailable(RuntimeError):
    pass


def ensure_upstream_installed(python: str = sys.executable) -> None:
    """Install the published package into ``benchmarks/.upstream`` (ignored by git) if missing."""
    if os.path.isfile(os.path.join(UPSTREAM_DIR, "bio_transformations", "bio_module.py")):
        return
    cmd = [
        python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
        "--no-deps", "--target", UPSTREAM_DIR, UPSTREAM_REQUIREMENT,
    ]  # fmt: skip
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        done = None
        detail = repr(exc)
    else:
        detail = (done.stderr or done.stdout).strip()[-2000:]
    if done is None or done.returncode != 0:
        raise UpstreamUnavailable(
            f"could not install {UPSTREAM_REQUIREMENT} into {UPSTREAM_DIR} (is the package "
            f"registry reachable?).\n  command: {' '.join(cmd)}\n  pip said: {detail}\n"
            "Install it by hand with that command (or copy that folder from a machine that has "
            "it), or leave the upstream contender out: --bio-contenders=ours,compile,copy"
        )


class UpstreamWorker:
    """One long-lived ``upstream_runner.py --serve`` process; one JSON line per request."""

    def __init__(self, python: str = sys.executable):
        ensure_upstream_installed(python)
        env = dict(os.environ)
        env["PYTHONPATH"] = UPSTREAM_DIR  # ours is installed too, under the same import name
        env.pop("BIO_BACKEND", None)
        self.proc = subprocess.Popen(
            [python, os.path.join(HERE, "upstream_runner.py"), "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )

    def request(self, request: dict) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise UpstreamUnavailable(
                f"upstream_runner.py exited (code {self.proc.poll()}); see its stderr above"
            )
        answer = json.loads(line)
        if not answer.get("ok"):
            raise RuntimeError("upstream_runner.py failed:\n" + answer.get("error", "?"))
        return answer

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except Exception:
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------------------------------------
# Contenders and the interleaved measurement of a group
# ---------------------------------------------------------------------------------------------


class LocalContender:
    """A contender timed in this process (ours, torch.compile, copy)."""

    def __init__(self, case: Case):
        self.case = case
        self.call: Optional[Callable] = None
        self.restore: Optional[Callable] = None
        self.sync = bc.synchronizer(case.device)
        self.info: dict = {"timed_in": "this process"}

    def _backend(self) -> contextlib.ExitStack:
        from bio_transformations import kernels

        stack = contextlib.ExitStack()
        stack.enter_context(
            kernels.settings.override(
                backend=self.case.backend or "auto",
                cpu_fused=self.case.contender.endswith("cpufused"),
            )
        )
        return stack

    def prepare(self, plan: bc.Plan, threads: int) -> int:
        with torch.no_grad(), self._backend():
            self.call, self.restore = local_case(self.case)
            return bc.probe(self.call, self.restore, self.sync, plan)

    def time(self, n: int) -> List[float]:
        assert self.call is not None and self.restore is not None
        with torch.no_grad(), self._backend():
            return bc.time_rounds(self.call, self.restore, self.sync, n)

    def release(self) -> None:
        self.call = self.restore = None


class UpstreamContender:
    """The published package, timed by the upstream process on request."""

    def __init__(self, case: Case, worker: Callable[[], UpstreamWorker]):
        self.case = case
        self.worker = worker
        self.info: dict = {"timed_in": "upstream_runner.py (separate process)"}

    def prepare(self, plan: bc.Plan, threads: int) -> int:
        case = self.case
        request = {
            "cmd": "prepare",
            "kind": "op" if case.kind == "op" else "model",
            "op": case.op,
            "device": case.device,
            "threads": threads,
            "plan": plan.__dict__,
            "size" if case.kind == "op" else "model": case.size,
        }
        answer = self.worker().request(request)
        self.info["upstream_version"] = answer["upstream_version"]
        return int(answer["rounds"])

    def time(self, n: int) -> List[float]:
        return self.worker().request({"cmd": "time", "n": n})["samples"]

    def release(self) -> None:
        self.worker().request({"cmd": "release"})


@dataclass
class Result:
    """A contender's samples (seconds per call) per repeat, or why it has none."""

    repeats: List[List[float]] = field(default_factory=list)
    rounds_planned: int = 0  # per repeat
    skip: Optional[str] = None
    error: Optional[str] = None
    info: dict = field(default_factory=dict)

    @property
    def samples(self) -> List[float]:
        return [s for repeat in self.repeats for s in repeat]


def unavailable(case: Case) -> Optional[str]:
    """Why ``case`` cannot run on this machine, or None."""
    if case.device == "gpu" and not torch.cuda.is_available():
        return "no CUDA device"
    if case.backend == "triton":
        from bio_transformations import kernels

        if not kernels.triton_available():
            return "the Triton backend does not import here"
    return None


def measure_group(
    cases: Sequence[Case], plan: bc.Plan, threads: int, worker: Callable[[], UpstreamWorker]
) -> Dict[Case, Result]:
    """Time the contenders of one group: prepare each (build, warm up, plan its rounds per
    repeat), then ``plan.repeats`` repeats, each running every contender in turn for its rounds,
    the order rotating from repeat to repeat, so load from other processes falls on all of them
    alike. Repeat ``i`` of every contender is recorded as its repeat ``i``: ratios are taken per
    repeat. A contender that cannot run gets a skip (torch.compile failed: an optional peer) or
    an error, and the others go on."""
    results: Dict[Case, Result] = {c: Result() for c in cases}
    ready: list = []
    for case in cases:
        if case.family == "upstream":
            contender = UpstreamContender(case, worker)
        else:
            contender = LocalContender(case)
        try:
            rounds = contender.prepare(plan, threads)
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"
            if case.family == "compile":
                results[case].skip = f"torch.compile failed here: {message}"[:400]
            else:
                results[case].error = message
            continue
        results[case].rounds_planned = rounds
        results[case].info = contender.info
        ready.append((contender, rounds))
    try:
        for repeat in range(plan.repeats):
            shift = repeat % max(1, len(ready))
            for contender, n in ready[shift:] + ready[:shift]:
                results[contender.case].repeats.append(contender.time(n))
    except Exception as exc:
        for contender, _ in ready:
            results[contender.case].error = f"{type(exc).__name__}: {exc}"
    finally:
        for contender, _ in ready:
            try:
                contender.release()
            except Exception:
                pass
    return results


# ---------------------------------------------------------------------------------------------
# Recording
# ---------------------------------------------------------------------------------------------


_facts_cache: Dict[Tuple[str, str, str, str], dict] = {}


def input_facts(case: Case) -> dict:
    """Facts of the inputs every contender of ``case``'s group gets (computed from the data,
    so the same for all): the fraction crystallize's mask selects, for the ops that crystallize;
    the expected fraction rejuvenation replaces (the same law in both rules)."""
    key = (case.kind, case.op, case.size, case.device)
    if key not in _facts_cache:
        if case.kind == "op":
            data = [bc.layer_data(case.size, case.device)]
        else:
            data = bc.model_data(bc.build_model(case.size, case.device))
        total = sum(w.numel() for w, _, _ in data)

        def weighted(fn) -> float:
            return sum(fn(w, g) * w.numel() for w, g, _ in data) / total

        facts: dict = {}
        if case.op in ("crystallize", "bio_step", "step"):
            facts["input_mask_fraction"] = weighted(bc.crystallize_mask_fraction)
            facts["training_mask_fraction"] = bc.CRYSTALLIZE_MASK_FRACTION
        if case.op == "rejuvenate":
            facts["replace_probability"] = weighted(lambda w, g: bc.rejuvenation_probability(w))
        _facts_cache[key] = facts
    return dict(_facts_cache[key])


def sample_stats(repeats: Sequence[Sequence[float]]) -> dict:
    """Statistics of a contender's samples (field names as pytest-benchmark's JSON has them),
    plus the median, minimum, maximum and rounds of each repeat."""
    data = [s for repeat in repeats for s in repeat]
    q1, _, q3 = statistics.quantiles(data, n=4) if len(data) > 1 else (data[0],) * 3
    return {
        "min": min(data),
        "max": max(data),
        "mean": statistics.fmean(data),
        "stddev": statistics.stdev(data) if len(data) > 1 else 0.0,
        "median": statistics.median(data),
        "q1": q1,
        "q3": q3,
        "iqr": q3 - q1,
        "rounds": len(data),
        "repeats": [
            {"median": statistics.median(r), "min": min(r), "max": max(r), "rounds": len(r)}
            for r in repeats
        ],
        "data": data,
    }


class Recorder:
    """Collects each case's result (its own timed samples) and writes the results JSON:
    ``{"benchmarks": [{"group", "name", "stats", "extra_info"}, ...], "datetime", "bio"}``."""

    def __init__(self) -> None:
        self.benchmarks: List[dict] = []

    def add(self, name: str, case: Case, result: Result, extra_info: dict) -> dict:
        entry = {
            "group": case.group,
            "name": name,
            "stats": sample_stats(result.repeats),
            "extra_info": extra_info,
        }
        self.benchmarks.append(entry)
        return entry

    def write(self, path: str, bio: dict) -> None:
        data = {
            "datetime": bio.get("finished") or bio.get("started"),
            "bio": bio,
            "benchmarks": self.benchmarks,
        }
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        with open(path, "w") as f:
            json.dump(data, f, indent=1)


@dataclass
class Progress:
    """Per-group medians for the progress line printed when a group is done."""

    total_groups: int = 0
    done_groups: int = 0
    medians: Dict[str, Dict[str, float]] = field(default_factory=dict)

    def add(self, case: Case, median: float) -> None:
        self.medians.setdefault(case.group, {})[case.contender] = median

    def line(self, group: str) -> str:
        self.done_groups += 1
        found = self.medians.get(group, {})
        base = found.get("upstream")
        parts = []
        for contender, median in found.items():
            text = f"{contender} {format_seconds(median)}"
            if base and contender != "upstream":
                text += f" ({base / median:.2f}x)"
            parts.append(text)
        width = len(str(self.total_groups))
        counter = f"[{self.done_groups:>{width}}/{self.total_groups}]"
        return f"{counter} {group}: " + (" | ".join(parts) if parts else "(nothing ran)")


def format_seconds(s: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if s >= scale:
            return f"{s / scale:.3g} {unit}"
    return f"{s / 1e-9:.3g} ns"
