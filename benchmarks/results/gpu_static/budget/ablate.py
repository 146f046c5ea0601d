"""Where the hot-path instructions of the random kernels go: each ablation removes one piece of
work from the kernel source (a temporary edit, restored afterwards), recompiles the variant
with ``benchmarks/gpu_static.py``'s ``compile_variant`` and records the hot-path SASS count.
The difference to the unedited kernel is what that piece costs on the hot path (an estimate:
the compiler schedules the rest a little differently). The edited kernels compute wrong
values; they are only compiled, never run.

    .venv/bin/python benchmarks/results/gpu_static/budget/ablate.py   # about 1 min, 2 jobs

Writes ``ablations.json`` and ``ablations.md`` next to this file. The last rows compile the
unedited kernels with ``BLOCK`` 2048 instead of ``launch.BLOCK_SIZE`` (16 elements per thread
instead of 8, the prologue amortised over twice the elements): not what the backend launches,
a measured option.
"""

from __future__ import annotations

import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[3]
sys.path.insert(0, str(REPO / "benchmarks"))

ON = dict(ALIGNED=True, NDIM=0, INDEX32=True)
VARIANTS = {
    "rejuvenate_ fp32": ("_rejuvenate_kernel", "fp32", ON),
    "rejuvenate_ bf16": ("_rejuvenate_kernel", "bf16", ON),
    "rates_init_ lognormal fp32": ("_init_kernel", "fp32", dict(ON, MODE=3)),
    "volume_scale_ bf16": (
        "_step_kernel", "bf16", dict(ON, VOLUME=True, FUZZY=False, CRYSTALLIZE=False)
    ),
    "bio_step_ (V+F+C) bf16": (
        "_step_kernel", "bf16", dict(ON, VOLUME=True, FUZZY=True, CRYSTALLIZE=True)
    ),
    "activity_update_ fp32": ("_activity_kernel", "fp32", ON),
}  # fmt: skip
DRAWS, REJ, RATES, STEP = (
    "kernels/triton/draws.py",
    "kernels/triton/rejuvenate.py",
    "kernels/triton/rates.py",
    "kernels/triton/step.py",
)
#: name -> [(file, old, new)]: the piece of work each ablation removes.
ABLATIONS = {
    "Philox rounds 2-10": [
        (DRAWS, "    for _ in tl.static_range(10):", "    for _ in tl.static_range(1):")
    ],
    "ln of Box-Muller": [
        (DRAWS, "tl.sqrt(-2.0 * tl.log(tl.maximum(", "tl.sqrt(-2.0 * (tl.maximum("),
    ],
    "sqrt, cos, sin of Box-Muller": [
        (DRAWS, "r = tl.sqrt(-2.0 * tl.log(", "r = (-2.0 * tl.log("),
        (DRAWS, "return r * fast_cos(theta), r * fast_sin(theta)", "return r * theta, r - theta"),
    ],
    "fast exp (rejuvenation, lognormal init)": [
        (REJ, "< fast_exp(tl.abs(w) * coef)", "< tl.abs(w) * coef"),
        (REJ, "magnitude = fast_exp(mu + sigma * z)", "magnitude = mu + sigma * z"),
        (RATES, "clamp(fast_exp(shift + nu * draw), lo, hi)", "clamp(shift + nu * draw, lo, hi)"),
    ],
    "replaced count (rejuvenation)": [
        (REJ, "    _count_replaced(counts, out_index, replace, offs, n, MASKED)\n\n\n@triton.jit\n"
         "def _rejuvenate_kernel", "\n\n@triton.jit\ndef _rejuvenate_kernel"),
    ],
    "volume factor (div_rn, expf)": [
        (STEP, "m = base_lr * exp(neg_stability * tl.math.div_rn(aw, aw + 1.0))",
         "m = base_lr * (neg_stability * aw)"),
    ],
    "div_rn of the activity ratio": [
        (RATES, "tl.math.div_rn(c, denominator), 1.0)\n    return",
         "c * denominator, 1.0)\n    return"),
    ],
}  # fmt: skip


def _compile(job):
    import gpu_static

    label, target, block = job
    if block is not None:
        gpu_static._init_worker()
        gpu_static._worker_state["settings"]["BLOCK_SIZE"] = block
    kernel, dtype, constexprs = VARIANTS[label]
    v = {"kernel": kernel, "dtype": dtype, "constexprs": dict(constexprs), "target": target}
    v["none"] = gpu_static.absent(kernel, v["constexprs"])
    r = gpu_static.compile_variant(v)
    if not r["ok"]:
        raise RuntimeError(f"{label}: {r['error']}")
    return label, r["sass_hot_path"], r["elements_per_thread"], r["registers"]


def measure(jobs: int = 2, target: int = 90, block=None) -> dict:
    with ProcessPoolExecutor(jobs) as pool:
        done = pool.map(_compile, [(v, target, block) for v in VARIANTS])
        return {lab: (hot, per, regs) for lab, hot, per, regs in done}


def main() -> None:
    os.environ.pop("TRITON_INTERPRET", None)
    out = {"target": 90, "variants": {k: [v[0], v[1], v[2]] for k, v in VARIANTS.items()}}
    base = measure()
    out["full"] = {k: v[0] for k, v in base.items()}
    per = {k: v[1] for k, v in base.items()}
    out["ablations"] = {}
    for name, edits in ABLATIONS.items():
        saved = {}
        try:
            for path, old, new in edits:
                p = REPO / path
                text = p.read_text()
                saved.setdefault(p, text)
                if old not in text:
                    raise RuntimeError(f"{name}: the source no longer contains {old!r}")
                p.write_text(text.replace(old, new))
            got = measure()
        finally:
            for p, text in saved.items():
                p.write_text(text)
        out["ablations"][name] = {k: out["full"][k] - v[0] for k, v in got.items()}
        print(name, out["ablations"][name], flush=True)
    out["registers"] = {k: v[2] for k, v in base.items()}
    wide = measure(block=2048)
    out["block_2048"] = {k: {"hot": v[0], "per_thread": v[1], "registers": v[2]}
                         for k, v in wide.items()}  # fmt: skip
    (HERE / "ablations.json").write_text(json.dumps(out, indent=1) + "\n")
    labels = list(VARIANTS)
    lines = [
        "sm_90, ALIGNED, NDIM 0, INDEX32: hot-path SASS instructions per element that each piece"
        " of work costs (the full kernel's count minus the count with that piece removed),"
        " and the full count.",
        "",
        "| removed | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for name, delta in out["ablations"].items():
        cells = [f"{delta[k] / per[k]:.2f}" if delta[k] else "-" for k in labels]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(
        "| **full kernel** | " + " | ".join(f"**{out['full'][k] / per[k]:.2f}**" for k in labels)
        + " |"
    )  # fmt: skip
    lines.append("| registers | " + " | ".join(str(out["registers"][k]) for k in labels) + " |")
    lines.append(
        "| *BLOCK 2048: full kernel* | "
        + " | ".join(f"*{wide[k][0] / wide[k][1]:.2f}*" for k in labels) + " |"
    )  # fmt: skip
    lines.append(
        "| *BLOCK 2048: registers* | " + " | ".join(str(wide[k][2]) for k in labels) + " |"
    )
    (HERE / "ablations.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
