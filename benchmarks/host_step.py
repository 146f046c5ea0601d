"""Host time and launch count of the model-level ``bio_step()`` (issue 15's host-light target).

    TRITON_INTERPRET=1 python benchmarks/host_step.py [--layers 100] [--calls 3000] [--json F]

Method: the Triton backend runs in its CPU interpreter on CPU tensors, and every Triton
kernel's launch (``kernel[grid](...)``) is replaced by a counter (:func:`stub_launches`), so
the time measured is the Python the call runs on the host (the cached checks, gathering the
gradients, the statistics and step launches' argument packing) and nothing a kernel would
do. Triton's own launcher (binding the arguments, finding the compiled kernel; ~10-20 µs per
launch on triton 3.x on a GPU machine) is not in the figure. The minimum and the median of
``--calls`` single calls are reported (the minimum is the least disturbed call on a shared
machine), for the cached model-level call and for ``functional.bio_step`` on the same layers
(what every call cost before the cache), with and without volume scaling, and with volume
scaling in the ``capturable`` mode (keys derived on the device: no per-layer host counter).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")


@contextlib.contextmanager
def stub_launches():
    """Replace every Triton kernel launch (``kernel[grid](...)``) with a counter; yields the
    ``Counter`` of launches by kernel name."""
    import triton.runtime.interpreter as interpreter
    import triton.runtime.jit as jit

    counts: collections.Counter = collections.Counter()

    def stub(self, grid):
        def launch(*args, **kwargs):
            counts[getattr(self, "fn", self).__name__] += 1

        return launch

    saved = []
    for cls in {jit.JITFunction, interpreter.InterpretedFunction}:
        saved.append((cls, cls.__dict__.get("__getitem__")))
        cls.__getitem__ = stub
    try:
        yield counts
    finally:
        for cls, original in saved:
            if original is None:
                del cls.__getitem__
            else:
                cls.__getitem__ = original


def times_us(fn, calls: int) -> dict:
    """Minimum and median wall time of one call of ``fn``, in µs."""
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return {"min_us": samples[0] * 1e6, "median_us": samples[len(samples) // 2] * 1e6}


def model_of(layers: int, width: int = 16):
    """A converted bias-free MLP of ``layers`` Linear layers, with gradients."""
    import torch
    import torch.nn as nn

    from bio_transformations import BioConverter

    torch.manual_seed(0)
    model = BioConverter()(nn.Sequential(*[nn.Linear(width, width, bias=False)
                                           for _ in range(layers)]))  # fmt: skip
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.weight.grad = torch.randn_like(m.weight)
    return model


def measure(layers: int, calls: int) -> dict:
    from bio_transformations import functional
    from bio_transformations.kernels import triton as trb
    from bio_transformations.kernels import use_backend
    from bio_transformations.model_methods import bio_layers

    if not trb.INTERPRETED:
        raise SystemExit("run with TRITON_INTERPRET=1 (the method needs the interpreter)")
    from bio_transformations.kernels import settings

    model = model_of(layers)
    out = {"layers": layers, "calls": calls, "method": "CPU, interpreter, launches stubbed"}
    for name, volume, capturable in CASES:
        with use_backend("triton"), settings.override(capturable=capturable):
            with stub_launches() as counts:
                model.bio_step(volume=volume)  # builds the cache
                counts.clear()
                model.bio_step(volume=volume)
                row = {"launches": sum(counts.values()), "kernels": dict(counts)}
                row["cached"] = times_us(lambda v=volume: model.bio_step(volume=v), calls)
                row["uncached"] = times_us(
                    lambda v=volume: functional.bio_step(bio_layers(model), volume=v),
                    max(calls // 20, 20),
                )
        out[name] = row
    return out


#: (name, volume, capturable) of the measured calls.
CASES = (
    ("bio_step()", False, False),
    ("bio_step(volume=True)", True, False),
    ("bio_step(volume=True) capturable", True, True),
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=100)
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args(argv)
    result = measure(args.layers, args.calls)
    for name, _, _ in CASES:
        row = result[name]
        print(
            f"{name:34s} {args.layers} layers: {row['launches']} launches {row['kernels']}; "
            f"host {row['cached']['min_us']:.1f} µs min / {row['cached']['median_us']:.1f} µs "
            f"median (uncached: {row['uncached']['min_us']:.0f} µs min)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
