"""GPU checks of the Triton backend that need a real CUDA device (driven by ``gpu_check.sh``).

``python gpu_check.py checks OUTDIR``   run the checks below, write ``OUTDIR/checks.json``
``python gpu_check.py summary OUTDIR``  merge ``steps.tsv`` (from the shell script) and
                                        ``checks.json`` into ``summary.json`` and ``summary.md``

Checks (each independent; one failing does not stop the others):

* ``no_host_sync``: every model-level op on the Triton backend under
  ``torch.cuda.set_sync_debug_mode("error")`` (after one warm-up call that builds the cached
  device tables): any host<->device synchronisation raises.
* ``cuda_graph``: one model-level ``bio_step()`` captured in a CUDA graph; its replay must equal
  an eager call with the same keys and inputs, bit for bit, and replay twice alike.
* ``one_launch``: a model-level ``bio_step()`` on a model of many layers launches one Triton
  kernel (counted with the profiler).
* ``timing`` (informative, never fails): ``bio_step_`` on the Triton backend against the torch
  backend for a few sizes, with CUDA events.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path


def _model(device, layers=3, width=256):
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
    model = converter(nn.Sequential(*blocks)).to(device)
    model[0].to(memory_format=torch.channels_last)
    x = torch.randn(16, 3, 8, 8, device=device)
    model(x).square().mean().backward()
    return model


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


def check_no_host_sync():
    import torch

    model = _model("cuda")
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


def check_cuda_graph():
    import torch

    model = _model("cuda")
    bios = [m for m in model.modules() if hasattr(m, "fuzzy_learning_rate_parameters")]
    params = [m.weight for m in model.modules() if hasattr(m, "bio_mod")]
    grads0 = [p.grad.clone() for p in params]
    rates0 = [b.fuzzy_learning_rate_parameters.clone() for b in bios]

    def restore():
        for p, g in zip(params, grads0):
            p.grad.copy_(g)
        for b, r in zip(bios, rates0):
            b.fuzzy_learning_rate_parameters.copy_(r)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graphs asks
        model.bio_step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    restore()
    steps = [b.rng_step for b in bios]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model.bio_step()
    torch.cuda.synchronize()
    restore()
    graph.replay()
    torch.cuda.synchronize()
    replayed = [p.grad.clone() for p in params] + [
        b.fuzzy_learning_rate_parameters.clone() for b in bios
    ]
    restore()
    graph.replay()
    torch.cuda.synchronize()
    again = [p.grad.clone() for p in params] + [
        b.fuzzy_learning_rate_parameters.clone() for b in bios
    ]
    restore()
    for b, s in zip(bios, steps):  # eager call with the keys the capture used
        b.rng_step = s
    model.bio_step()
    torch.cuda.synchronize()
    eager = [p.grad.clone() for p in params] + [
        b.fuzzy_learning_rate_parameters.clone() for b in bios
    ]
    for a, b in zip(replayed, eager):
        if not torch.equal(a, b):
            raise AssertionError("graph replay differs from the eager bio_step with the same keys")
    for a, b in zip(replayed, again):
        if not torch.equal(a, b):
            raise AssertionError("two replays differ")
    changed = any(not torch.equal(a, g) for a, g in zip(replayed, grads0))
    if not changed:
        raise AssertionError("the replay did not change the gradients")
    return f"captured and replayed bio_step over {len(params)} layers; replay == eager"


def check_one_launch():
    import torch
    from torch.profiler import ProfilerActivity, profile

    model = _model("cuda", layers=12, width=128)
    model.bio_step()  # warm-up
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model.bio_step()
        torch.cuda.synchronize()
    names = [e.key for e in prof.key_averages()]
    counts = {e.key: e.count for e in prof.key_averages()}
    step = [n for n in names if "_step_kernel" in n]
    if not step:
        raise AssertionError(f"no _step_kernel launch seen; kernels: {names}")
    launches = sum(counts[n] for n in step)
    layers = len([m for m in model.modules() if hasattr(m, "bio_mod")])
    # one (device, dtype) group, one config: one launch for all layers
    if launches != 1:
        raise AssertionError(f"{launches} _step_kernel launches for {layers} layers")
    return f"1 _step_kernel launch for {layers} layers; all kernels: {sorted(counts.items())}"


def timing():
    import torch

    from bio_transformations.kernels import torch_backend as tb
    from bio_transformations.kernels import triton_backend as trb

    rows = []
    for label, numel, layers in [
        ("1M x1", 1 << 20, 1),
        ("16M x1", 1 << 24, 1),
        ("16M x32", 1 << 24, 32),
    ]:
        n = numel // layers
        ws = [torch.randn(n, device="cuda") * 0.1 for _ in range(layers)]
        gs = [torch.randn(n, device="cuda") * 0.01 for _ in range(layers)]
        ps = [torch.ones(n, device="cuda") for _ in range(layers)]
        keys = list(range(layers))
        args = (True, True, True, 0.1, 2.0, 0.2, 4.5e-5, 0.6)
        result = {"case": label}
        for name, mod in (("triton", trb), ("torch", tb)):
            for _ in range(3):
                mod.bio_step_(ws, gs, ps, keys, *args)
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            reps = 20
            start.record()
            for _ in range(reps):
                mod.bio_step_(ws, gs, ps, keys, *args)
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end) / reps
            result[f"{name}_ms"] = round(ms, 4)
            if name == "triton":  # reads w, g, p; writes g, p: 5 passes of 4 bytes
                result["triton_GBps"] = round(5 * 4 * numel / (ms * 1e-3) / 1e9, 1)
        result["speedup"] = round(result["torch_ms"] / result["triton_ms"], 2)
        rows.append(result)
    return rows


def run_checks(out: Path) -> int:
    import torch

    logging.getLogger("bio_transformations").setLevel(logging.WARNING)
    if not torch.cuda.is_available():
        print("gpu_check.py: CUDA is not available", file=sys.stderr)
        return 2
    from bio_transformations import set_backend

    set_backend("triton")
    results = []
    failed = 0
    for name, fn in (
        ("no_host_sync", check_no_host_sync),
        ("cuda_graph", check_cuda_graph),
        ("one_launch", check_one_launch),
    ):
        t0 = time.time()
        try:
            detail = fn()
            status = "pass"
        except Exception:
            detail = traceback.format_exc(limit=6)
            status = "fail"
            failed += 1
        results.append(
            {
                "name": name,
                "status": status,
                "seconds": round(time.time() - t0, 1),
                "detail": detail,
            }
        )
        print(f"[{status.upper()}] {name} ({results[-1]['seconds']} s): {detail}", flush=True)
    timings = []
    try:
        timings = timing()
        for row in timings:
            print("[TIME]", row, flush=True)
    except Exception:
        print("[TIME] failed (informative only):", traceback.format_exc(limit=4), flush=True)
    (out / "checks.json").write_text(json.dumps({"checks": results, "timing": timings}, indent=2))
    return 1 if failed else 0


def _read_steps(out: Path):
    steps = []
    path = out / "steps.tsv"
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 4:
                steps.append(
                    {"name": parts[0], "status": parts[1], "seconds": parts[2], "detail": parts[3]}
                )
    return steps


def write_summary(out: Path) -> int:
    steps = _read_steps(out)
    checks, timings = [], []
    if (out / "checks.json").exists():
        data = json.loads((out / "checks.json").read_text())
        checks, timings = data.get("checks", []), data.get("timing", [])
    env = (out / "env.txt").read_text() if (out / "env.txt").exists() else ""
    failed = [s["name"] for s in steps + checks if s["status"] == "fail"]
    summary = {
        "ok": not failed,
        "failed": failed,
        "steps": steps,
        "checks": checks,
        "timing": timings,
        "environment": env,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
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
    if timings:
        keys = list(timings[0])
        lines += ["", "bio_step_ timing (CUDA events):", "", "| " + " | ".join(keys) + " |"]
        lines.append("|" + "---|" * len(keys))
        lines += ["| " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for r in timings]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failed else 0


def main(argv) -> int:
    if len(argv) != 3 or argv[1] not in ("checks", "summary"):
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[2])
    out.mkdir(parents=True, exist_ok=True)
    os.environ.pop("TRITON_INTERPRET", None)
    return run_checks(out) if argv[1] == "checks" else write_summary(out)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
