"""Times the published ``pytorch-bio-transformations==0.0.5`` on the benchmark cases.

Its import name, ``bio_transformations``, is this project's too, so it runs in its own process:

    PYTHONPATH=benchmarks/.upstream python benchmarks/upstream_runner.py --op crystallize --size 4M
    PYTHONPATH=benchmarks/.upstream python benchmarks/upstream_runner.py --serve

The first form times one case and prints one JSON object with its samples (seconds per call).
``--serve`` (what the pytest side uses) reads one JSON request per line on stdin and answers
each with one JSON line: ``{"cmd": "prepare", "kind": "op", "op": ..., "size": ..., "device":
"cpu"|"gpu", "threads": 2, "plan": {...}}`` (or ``"kind": "model", "model": ...``) builds and
warms up a case and answers the rounds its plan asks for; ``{"cmd": "time", "n": k}`` times k
rounds and answers ``{"samples": [...]}``; ``{"cmd": "release"}`` drops the case. Every answer
has ``"ok"``; a failure answers ``{"ok": false, "error": traceback}``. The pytest side sends
``time`` requests in blocks, interleaved with the other contenders of the group, so upstream is
timed in the same seconds as the contenders it is compared with.

Data, config and the timing protocol come from ``bench_cases`` (torch only), the same module
the pytest side uses. The published package is called through its documented API only:
``BioModule`` methods on a layer with ``.weight.grad``, and the methods ``BioConverter``
attaches to a converted model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from typing import Callable, Tuple

import bench_cases as bc
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))


def _import_upstream():
    import bio_transformations as bt
    from bio_transformations.bio_config import BioConfig, Distribution

    where = os.path.abspath(bt.__file__)
    if os.path.join(_HERE, ".upstream") not in where:
        raise RuntimeError(
            f"bio_transformations was imported from {where}, not from benchmarks/.upstream: run "
            "with PYTHONPATH=benchmarks/.upstream (this project's package has the same name)"
        )
    return bt, BioConfig, Distribution


def _config(op: str):
    _, BioConfig, Distribution = _import_upstream()
    fields = dict(bc.config_overrides(op))
    if "fuzzy_lr_distribution" in fields:
        fields["fuzzy_lr_distribution"] = Distribution(fields["fuzzy_lr_distribution"])
    return BioConfig(**fields)


def upstream_version() -> str:
    try:
        from importlib.metadata import version

        return version("pytorch-bio-transformations")
    except Exception:  # metadata not on the path: the folder name says it
        return "0.0.5"


def op_case(op: str, size: str, device: str) -> Tuple[Callable, Callable]:
    """``(call, restore)`` for one upstream ``BioModule`` method on a fresh layer."""
    bt, _, _ = _import_upstream()
    w0, g0, p0 = bc.layer_data(size, device)
    layer = bc.make_linear(w0, g0)
    mod = bt.BioModule(lambda: layer, config=_config(op))
    if op == "dale":  # the initialisation flipped signs: restore to the initialised weights
        w0 = layer.weight.detach().clone()

    def rates():
        return mod.fuzzy_learning_rate_parameters

    restore_tensors = bc.restorer(
        [(lambda: layer.weight, w0), (lambda: layer.weight.grad, g0), (rates, p0)]
    )

    def bio_step() -> None:  # upstream has no fused op: the three calls, in the documented order
        mod.volume_dependent_lr()
        mod.fuzzy_learning_rates()
        mod.crystallize()

    call = bio_step if op == "bio_step" else getattr(mod, bc.OP_METHODS[op])

    def restore() -> None:
        restore_tensors()
        if op == "temporal":  # the next update is a due one, with noise
            mod.update_step = 10 * bc.UPDATE_FREQ - 1
        elif op == "weight_adaptive":  # the (non-dynamic) update refills the rates
            mod.weight_adaptive_initialized = False

    return call, restore


def model_case(model_name: str, op: str, device: str) -> Tuple[Callable, Callable]:
    """``(call, restore)`` for a model-level method of an upstream-converted model."""
    bt, _, _ = _import_upstream()
    model = bc.build_model(model_name, device)
    data = bc.model_data(model)
    bt.BioConverter().convert(model)
    layers = bc.learnable_layers(model)
    pairs = []
    for layer, (w0, g0, p0) in zip(layers, data):
        pairs += [
            (lambda l=layer: l.weight, w0),
            (lambda l=layer: l.weight.grad, g0),
            (lambda l=layer: l.bio_mod.fuzzy_learning_rate_parameters, p0),
        ]
    restore = bc.restorer(pairs)

    def step() -> None:
        model.volume_dependent_lr()
        model.fuzzy_learning_rates()
        model.crystallize()

    calls = {"step": step, "rejuvenate": model.rejuvenate_weights}
    return calls[op], restore


class Session:
    """The prepared case of the serving process (one at a time)."""

    def __init__(self) -> None:
        self.call = self.restore = self.sync = None

    def prepare(self, request: dict) -> dict:
        """Build the case, warm it up, and return the rounds its plan asks for."""
        self.release()
        torch.set_num_threads(int(request.get("threads", 2)))
        plan = bc.Plan(**request.get("plan", {}))
        device = request.get("device", "cpu")
        with torch.no_grad():
            if request["kind"] == "op":
                self.call, self.restore = op_case(request["op"], request["size"], device)
            else:
                self.call, self.restore = model_case(request["model"], request["op"], device)
            self.sync = bc.synchronizer(device)
            rounds = bc.probe(self.call, self.restore, self.sync, plan)
        bt, _, _ = _import_upstream()
        return {
            "rounds": rounds,
            "upstream_version": upstream_version(),
            "upstream_file": os.path.relpath(bt.__file__, _HERE),
            "threads": torch.get_num_threads(),
        }

    def time(self, n: int) -> dict:
        if self.call is None:
            raise RuntimeError("no prepared case: send a prepare request first")
        with torch.no_grad():
            return {"samples": bc.time_rounds(self.call, self.restore, self.sync, int(n))}

    def release(self) -> dict:
        self.call = self.restore = self.sync = None
        return {}


def handle_once(request: dict) -> dict:
    """Prepare one case and time all its planned rounds (the command-line mode)."""
    session = Session()
    answer = session.prepare(request)
    answer.update(session.time(answer["rounds"]))
    return answer


def serve() -> None:
    """Answer requests on stdin: ``{"cmd": "prepare", ...case}``, ``{"cmd": "time", "n": k}``,
    ``{"cmd": "release"}``; each answer is one JSON line with ``"ok"``."""
    out = sys.stdout
    sys.stdout = sys.stderr  # anything upstream prints must not corrupt the protocol
    session = Session()
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            cmd = request.get("cmd")
            if cmd == "prepare":
                answer = session.prepare(request)
            elif cmd == "time":
                answer = session.time(request["n"])
            elif cmd == "release":
                answer = session.release()
            else:
                raise ValueError(f"unknown cmd {cmd!r}; valid: prepare, time, release")
            answer["ok"] = True
        except Exception:
            answer = {"ok": False, "error": traceback.format_exc()}
        out.write(json.dumps(answer) + "\n")
        out.flush()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", action="store_true", help="answer JSON requests on stdin")
    parser.add_argument("--op", default="crystallize")
    parser.add_argument("--size", default="64K", choices=list(bc.SIZES))
    parser.add_argument("--model", choices=list(bc.MODELS), help="time a model-level op")
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.serve:
        serve()
        return
    plan = bc.QUICK_PLAN if args.quick else bc.FULL_PLAN
    request = {
        "kind": "model" if args.model else "op",
        "op": args.op,
        "size": args.size,
        "model": args.model,
        "device": args.device,
        "threads": args.threads,
        "plan": plan.__dict__,
    }
    print(json.dumps(handle_once(request)))


if __name__ == "__main__":
    main()
