"""The static GPU report (benchmarks/gpu_static.py): kernels compiled ahead of time, no GPU.

The compile test runs the tool's representative subset (``--subset test``: every kernel in fp32,
aligned, NDIM 0, all switches on (MODE 3), and in fp16 at NDIM 1 with its switches off (64-bit
index math, optional inputs None where the launcher passes None); plus the fused step in bf16
and unaligned at the largest NDIM and the statistics passes' partial kernels in bf16 and
unaligned; the finish kernels and ``_derive_keys`` once; sm_90; about a minute on 2 busy cores)
in a subprocess, because this test process imports Triton under ``TRITON_INTERPRET=1``. It is
the one ahead-of-time compile of the test suite: the interpreter accepts Python the compiler
rejects, so every kernel must also pass Triton's compiler here (the statistics passes and the
capturable mode's key derivation too). The full set (1368 op-kernel variants and 15 of the
statistics and key kernels x sm_90, sm_80) runs with ``make gpu-static``; its recorded results
are in benchmarks/results/gpu_static/.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_static  # noqa: E402

#: NDIM-0 variants of the test subset that spill today (ptxas -v), as "kernel|dtype|switches
#: on" (8 B stored and loaded since the zero-gradient gate, 4 B before; off the hot path:
#: ``local_mem_hot_path`` is 0; the full report lists every spilling variant). The test fails
#: both on a new spill and on a listed one that no longer spills, so this list can only shrink
#: deliberately.
KNOWN_NDIM0_SPILLS = {"_step_kernel|bf16|VOLUME+FUZZY+CRYSTALLIZE+ALIGNED"}
#: The host-light kernels (issue 15) besides the op kernels: the two statistics passes
#: (kernels/triton/reduce.py) and the capturable mode's key derivation (keys.py).
STATISTICS_PARTIALS = {"_crystal_partials", "_rejuvenation_partials"}
ROW_KERNELS = {"_crystal_finish", "_rejuvenation_finish", "_derive_keys"}


def _label(r: dict) -> str:
    on = "+".join(k for k, v in r["constexprs"].items() if isinstance(v, bool) and v)
    return f"{r['kernel']}|{r['dtype']}|{on}"


@pytest.fixture(scope="module")
def subset_report(tmp_path_factory):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("gpu_static")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_static.py"), "--subset", "test",
         "--out", str(out), "--jobs", "2"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert (out / "report.json").exists(), proc.stdout + proc.stderr
    report = json.loads((out / "report.json").read_text())
    return proc, report, out


def test_every_variant_of_the_subset_compiles(subset_report):
    proc, report, out = subset_report
    results = report["results"]
    failed = [f"{gpu_static.variant_key(r)}: {r['error']}" for r in results if not r["ok"]]
    assert not failed, "\n".join(failed)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kernels = {r["kernel"] for r in report["results"]}
    assert kernels == set(report["kernels"]) and len(kernels) >= 14
    assert kernels >= STATISTICS_PARTIALS | ROW_KERNELS
    for r in report["results"]:
        key = gpu_static.variant_key(r)
        assert r["registers"] and r["registers"] > 0
        if r["kernel"] in ROW_KERNELS:
            assert r["unit"] == "row" and r["sass_hot_per_row"] > 0, key
            continue
        assert r["unit"] == "element" and r["sass_hot_per_element"] > 0, key
        assert r["masked_ldg_hot_path"] == 0, key  # the full-tile path: unmasked loads
        if r["kernel"] not in STATISTICS_PARTIALS:  # they store a block's sums from one lane
            assert r["masked_mem_hot_path"] == 0, key
    for name in ("report.md", "analysis_table.md"):
        assert (out / name).read_text().strip()


def test_full_tiles_vectorise_in_aligned_and_unaligned_launches(subset_report):
    """Every variant's full-tile body (the common case: a full block of an aligned row that
    draws grouped) uses 128-bit accesses: in an unaligned launch (``ALIGNED`` False) only the
    misaligned rows fall back to the masked scalar body, chosen per block."""
    _, report, _ = subset_report
    aligned = [r for r in report["results"] if r["constexprs"].get("ALIGNED")]
    unaligned = [r for r in report["results"] if not r["constexprs"].get("ALIGNED", True)]
    assert aligned and unaligned
    for r in aligned + unaligned:
        assert r["ldg128_full_tile"] + r["stg128_full_tile"] > 0, gpu_static.variant_key(r)
        assert r["ptx_ld_v4"] + r["ptx_st_v4"] > 0, gpu_static.variant_key(r)


def test_statistics_and_key_kernels_compile_and_aligned_partials_vectorise(subset_report):
    """The statistics passes (per-block partial sums, per-row finish) and ``_derive_keys``
    compile for sm_90 without spills, so the GPU run meets no compile error the interpreter let
    by; every load of a partial kernel's full-tile body is a 128-bit load, also in an unaligned
    launch (its aligned rows: the alignment is checked per row)."""
    _, report, _ = subset_report
    by_kernel: dict = {}
    for r in report["results"]:
        by_kernel.setdefault(r["kernel"], []).append(r)
    for name in STATISTICS_PARTIALS | ROW_KERNELS:
        assert by_kernel.get(name), f"{name} not compiled"
        for r in by_kernel[name]:
            assert r["ok"] and (r["spill_stores"], r["spill_loads"]) == (0, 0), r
    for name in STATISTICS_PARTIALS:
        assert {r["dtype"] for r in by_kernel[name]} >= {"fp32", "bf16"}
        assert {r["constexprs"]["ALIGNED"] for r in by_kernel[name]} == {True, False}
        for r in by_kernel[name]:
            assert r["ldg_full_tile"] > 0 and r["ldg128_full_tile"] == r["ldg_full_tile"], r
    for name in ROW_KERNELS:
        assert [r["dtype"] for r in by_kernel[name]] == [gpu_static.NO_DTYPE]


def test_ndim0_variants_do_not_spill(subset_report):
    _, report, _ = subset_report
    ndim0 = [r for r in report["results"] if r["constexprs"].get("NDIM", 0) == 0]
    spilling = {_label(r) for r in ndim0 if (r["spill_stores"] or 0) + (r["spill_loads"] or 0)}
    compiled = {_label(r) for r in ndim0}
    assert spilling - KNOWN_NDIM0_SPILLS == set(), "new spills"
    fixed = (KNOWN_NDIM0_SPILLS & compiled) - spilling
    assert not fixed, f"no longer spill, remove from KNOWN_NDIM0_SPILLS: {fixed}"


_STATIC_INFO = """
import json, sys
sys.path.insert(0, 'benchmarks')
import gpu_static as g
k, s = g.discover()
v = g.variants(k)
consts = {}  # per (kernel, switches): the derived constexprs of its NDIM-0 aligned variant
for x in v:
    c = x['constexprs']
    if c.get('NDIM', 0) == 0 and c.get('ALIGNED', True) and c.get('INDEX32', True):
        _, full, _ = g.signature(k[x['kernel']], x['dtype'], c, s['constants'][x['kernel']])
        consts[repr((x['kernel'], sorted((a, b) for a, b in c.items()
                     if a not in ('ALIGNED', 'NDIM', 'INDEX32'))))] = {
            a: full[a] for a in g.DERIVED if a in full}
print(json.dumps({
    'kernels': list(k), 'n': len(v), 'settings': s, 'variants': v, 'consts': consts,
    'switches': {n: {a: list(b) for a, b in g._switches(f).items()} for n, f in k.items()},
    'kinds': {n: g.kind(f) for n, f in k.items()},
    'dtyped': {n: g._has_witness(f) for n, f in k.items()},
    'options': {n: g.launch_options(f, s) for n, f in k.items()},
}))
"""


@pytest.fixture(scope="module")
def static_info():
    """What ``gpu_static`` finds and would compile (a subprocess: it needs the compiled, not
    the interpreted, kernels)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", _STATIC_INFO], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def _switch_key(kernel: str, constexprs: dict) -> str:
    """``(kernel, switches)`` without the per-launch layout ones, as ``_STATIC_INFO`` keys it."""
    rest = sorted((k, v) for k, v in constexprs.items() if k not in ("ALIGNED", "NDIM", "INDEX32"))
    return repr((kernel, rest))


def test_variant_space_covers_every_kernel_and_switch(static_info):
    info = static_info
    # every launch entry point of the package: no helper (tile, for_block, ...), no probe
    assert set(info["kernels"]) == {
        "_fuzzy_kernel", "_step_kernel", "_rejuvenate_kernel", "_legacy_kernel", "_init_kernel",
        "_temporal_kernel", "_adaptive_kernel", "_activity_kernel", "_dale_kernel",
        "_crystal_partials", "_crystal_finish", "_rejuvenation_partials",
        "_rejuvenation_finish", "_derive_keys",
    }  # fmt: skip
    kinds = info["kinds"]
    assert {n for n, k in kinds.items() if k == "partials"} == STATISTICS_PARTIALS
    assert {n for n, k in kinds.items() if k == "rows"} == ROW_KERNELS
    expected = 0
    for name, switches in info["switches"].items():
        if kinds[name] == "op":
            assert switches["ALIGNED"] == [False, True]
            assert switches["NDIM"] == list(gpu_static.NDIM_VALUES)
        elif kinds[name] == "partials":
            assert switches == {"ALIGNED": [False, True]}
        else:
            assert switches == {}
        combos = [dict(zip(switches, c)) for c in itertools.product(*switches.values())]
        dtypes = len(gpu_static.DTYPES) if info["dtyped"][name] else 1
        expected += dtypes * sum(gpu_static.launched(name, c) for c in combos)
    assert info["n"] == expected
    assert set(info["switches"]["_step_kernel"]) >= {"VOLUME", "FUZZY", "CRYSTALLIZE"}
    assert info["switches"]["_init_kernel"]["MODE"] == [0, 1, 2, 3]
    assert info["settings"]["BLOCK_SIZE"] % (32 * info["settings"]["options"]["num_warps"]) == 0


class _LaunchRecorder:
    """Records every Triton launch ``kernel[grid](...)`` (name and keyword arguments) and
    runs it (the interpreter's launch path, like ``benchmarks/host_step.stub_launches``)."""

    def __init__(self):
        self.launches = []

    def __enter__(self):
        import triton.runtime.interpreter as interpreter

        self._cls = interpreter.InterpretedFunction
        self._saved = self._cls.__dict__.get("__getitem__")
        original = self._cls.__getitem__
        launches = self.launches

        def getitem(fn, grid):
            run = original(fn, grid)

            def launch(*args, **kwargs):
                launches.append((getattr(fn, "fn", fn).__name__, dict(kwargs)))
                return run(*args, **kwargs)

            return launch

        self._cls.__getitem__ = getitem
        return self

    def __exit__(self, *exc):
        if self._saved is None:
            del self._cls.__getitem__
        else:
            self._cls.__getitem__ = self._saved


def test_none_parameters_and_switches_are_those_the_launchers_pass(static_info):
    """Every op of the Triton backend, run in the interpreter on tiny tensors, with its launches
    recorded: the parameters each launch passes as None are ``gpu_static.absent``'s, every
    switch combination launched is one ``gpu_static`` compiles and every one it compiles is
    launched by some op (the statistics passes and the capturable key derivation included),
    with the derived constexprs (S, W, BLOCK, RBLOCK) and launch options it compiles with."""
    import torch

    trb = pytest.importorskip("bio_transformations.kernels.triton")
    from bio_transformations.kernels.contract import StepParams
    from bio_transformations.kernels.triton import dale, launch, rates, rejuvenate, step
    from bio_transformations.kernels.triton.keys import DeviceKeys

    if not trb.INTERPRETED:
        pytest.skip("needs the interpreter (CPU tensors)")
    calls = []

    def spy(kernel, elems, rows=(), written=(), keys=None, offsets=None, stats=None,
            counts=None, scalars=(), prelude=None, **meta):  # fmt: skip
        names = kernel.arg_names
        positional = [*(e[0] for e in elems), *(r[0] for r in rows), *scalars]
        none = {n for n, v in zip(names[2:], positional) if v is None}
        # a prelude (kernels/triton/reduce.py's statistics pass) computes the stats on device
        optional = {"keys": keys, "stats": stats if prelude is None else prelude, "counts": counts}
        none |= {n for n, v in optional.items() if n in names and v is None}
        name = getattr(kernel, "fn", kernel).__name__
        calls.append((name, dict(meta), sorted(none)))
        launch.launch(
            kernel, elems, rows, written, keys=keys, offsets=offsets, stats=stats,
            counts=counts, scalars=scalars, prelude=prelude, **meta,
        )  # fmt: skip

    mp = pytest.MonkeyPatch()
    for mod in (step, rejuvenate, rates, dale):
        mp.setattr(mod, "launch", spy)
    try:
        gen = torch.Generator().manual_seed(0)

        def t(*shape, scale=1.0, shift=0.0):
            return torch.randn(*shape, generator=gen).mul_(scale).add_(shift)

        w = [t(4, 16, scale=0.1), t(3, 5, scale=0.1)]
        g = [t(4, 16, scale=1e-3), t(3, 5, scale=1e-3)]
        p = [t(4, 16, scale=0.1, shift=1.0), t(3, 5, scale=0.1, shift=1.0)]
        keys = [11, 12]
        with _LaunchRecorder() as recorder:
            trb.fuzzy_scale_(g, p)
            for stages in itertools.product((False, True), repeat=3):
                trb.bio_step_(w, g, p, keys, StepParams(*stages, 0.1, 2.0, 0.2, 0.05, 0.6))
            trb.crystallize_(w, g, p, 0.05, 0.6)
            trb.volume_scale_(w, g, keys, 0.1, 2.0, 0.2)
            steps = [torch.tensor(5, dtype=torch.int64) for _ in w]  # capturable: device keys
            trb.volume_scale_(w, g, DeviceKeys(steps, keys, op_id=1), 0.1, 2.0, 0.2)
            trb.rejuvenate_(w, keys, 8.0)
            trb.rejuvenate_legacy_(w, keys, 8.0)
            for dist in ("baseline", "uniform", "normal", "lognormal"):
                trb.rates_init_(p, keys, dist, 0.16, 0.5, 2.0)
            for noise in (0.0, 0.016):
                trb.temporal_update_(p, keys, 0.9995, noise, 0.5, 2.0)
            trb.weight_adaptive_(p, w, keys, 0.16, 0.5, 2.0)
            counts = [torch.arange(4, dtype=torch.int64), torch.arange(3, dtype=torch.int64)]
            trb.activity_update_(p, counts, keys, 0.16, 0.5, 2.0)
            trb.dale_enforce_(w, [torch.tensor([1.0, -1.0, 1.0, -1.0]), torch.tensor([1.0, -1, 1])])
    finally:
        mp.undo()

    for name, meta, none in calls:
        assert gpu_static.launched(name, meta), (name, meta)
        assert gpu_static.absent(name, meta) == none, (name, meta, none)
    seen = set()
    option_names = {"num_warps", "num_stages", "num_ctas", "enable_fp_fusion"}
    for name, kwargs in recorder.launches:
        switches = {k: v for k, v in kwargs.items() if k in static_info["switches"][name]}
        key = _switch_key(name, switches)
        seen.add(key)
        assert key in static_info["consts"], (name, kwargs)
        derived = {k: v for k, v in kwargs.items() if k in gpu_static.DERIVED}
        assert derived == static_info["consts"][key], (name, kwargs)  # NDIM 0: contiguous
        options = {k: v for k, v in kwargs.items() if k in option_names}
        assert options == static_info["options"][name], (name, kwargs)
    assert {n for n, _ in recorder.launches} == set(static_info["kernels"])
    compiled = {_switch_key(v["kernel"], v["constexprs"]) for v in static_info["variants"]}
    assert compiled == seen


# A hand-made SASS listing: prologue, the full/masked split, a slow-path loop and a CALL in the
# full body, an out-of-line subroutine after the last EXIT.
_SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   S2R R0, SR_CTAID.X ;
        /*0020*/              @!P0 BRA 0x0100 ;
        /*0030*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0040*/              @!P1 BRA 0x0080 ;
        /*0050*/                   FADD R5, R5, 1 ;
        /*0060*/               @P2 BRA 0x0050 ;
        /*0070*/                   FADD R6, R6, 1 ;
        /*0080*/                   FMUL R4, R4, R5 ;
        /*0090*/              @!P3 BRA 0x00b0 ;
        /*00a0*/                   CALL.REL.NOINC 0x0140 ;
        /*00b0*/                   STG.E.128 desc[UR4][R2.64], R4 ;
        /*00c0*/                   NOP ;
        /*00d0*/                   EXIT ;
        /*0100*/               @P4 LDG.E R4, desc[UR4][R2.64] ;
        /*0110*/                   FMUL R4, R4, R4 ;
        /*0120*/               @P4 STG.E desc[UR4][R2.64], R4 ;
        /*0130*/                   EXIT ;
        /*0140*/                   FADD R4, R4, 1 ;
        /*0150*/                   RET.REL.NODEC R20 0x0 ;
        /*0160*/                   BRA 0x0160 ;
"""


def test_hot_path_definition_on_a_hand_made_listing():
    # the CALL named a slow path (as nvdisasm names div.rn's): its block is cold
    a = gpu_static.analyse_sass(_SASS, {0xA0: "__internal_0_$__cuda_sm3x_div_rn_f32_slowpath"})
    # entry (3) -> full body: LDG, BRA (2) -> skip the loop and its tail -> FMUL, BRA (2)
    # -> skip the CALL block -> STG, EXIT (2, NOP not counted) = 9
    assert a["sass_hot_path"] == 9
    # unnamed, the call on one side of a branch counts its call site (1) but not its callee
    assert gpu_static.analyse_sass(_SASS)["sass_hot_path"] == 10
    assert (a["ldg128_full_tile"], a["stg128_full_tile"]) == (1, 1)
    assert a["sass_instructions"] == 17  # the kernel, not the subroutine; NOPs excluded
    assert a["calls_hot_path"] == 0 and a["masked_mem_hot_path"] == 0


def test_a_call_no_path_avoids_is_hot_and_counts_its_callee():
    # the CALL can no longer be skipped (like the 64-bit division of NDIM > 0 index math)
    listing = _SASS.replace("@!P3 BRA 0x00b0", "MOV R0, R0")
    a = gpu_static.analyse_sass(listing)
    # entry (3) + LDG, BRA (2) + FMUL, MOV, CALL (3) + callee FADD, RET (2) + STG, EXIT (2)
    assert a["sass_hot_path"] == 12
    assert a["calls_hot_path"] == 1


def test_row_kernels_count_the_whole_body_and_a_loop_once():
    """A row kernel (``split=False``): no full-tile side is picked, the hot path runs over the
    whole body; ``loops="once"`` counts the loop block (0x50, branching to itself) once instead
    of leaving it cold."""
    names = {0xA0: "__internal_0_$__cuda_sm3x_div_rn_f32_slowpath"}
    # entry (3) -> LDG, BRA (2) -> the loop once: FADD, BRA (2) -> FADD (1) -> FMUL, BRA (2)
    # -> skip the slow-path CALL -> STG, EXIT (2) = 12; longer than the other side (3 + 4)
    once = gpu_static.analyse_sass(_SASS, names, split=False, loops="once")
    assert once["sass_hot_path"] == 12
    # loops cold: the loop block is skipped (3 + 2 + 2 + 2)
    assert gpu_static.analyse_sass(_SASS, names, split=False)["sass_hot_path"] == 9
    with pytest.raises(ValueError):
        gpu_static.analyse_sass(_SASS, names, loops="twice")
