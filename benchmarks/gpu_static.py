"""Static GPU report of the Triton backend: every kernel variant compiled ahead of time, no GPU.

    python benchmarks/gpu_static.py                       # full report, sm_90 and sm_80
    python benchmarks/gpu_static.py --subset test         # the representative subset the test uses
    python benchmarks/gpu_static.py --compare OLD.json    # also diff against an earlier report
    make gpu-static                                       # the full report

Output (``--out``, default ``benchmarks/results/gpu_static/``): ``report.json`` (every variant),
``report.md`` (summary tables), ``analysis_table.md`` (per-op instructions per element against
the H200 bandwidth floor: this report as "before", or with ``--compare OLD.json`` the old one as
"before" and this one as "after") and, with ``--compare``, ``compare.md`` (every variant's
changes). ``--from-json REPORT`` re-renders the markdown of a recorded report without
compiling. Results are checkpointed in ``partial-<subset>.jsonl`` as they complete (removed once
the report of the whole set is written): an interrupted run picks up where it stopped;
``--targets``/``--ndim``/``--kernels`` restrict a run (their results also go to the
checkpoint), and ``--from-json partial-full.jsonl`` renders what a checkpoint holds, marked
partial. Exit status 1 when a
variant fails to compile.

**Kernels** are found, not listed: every ``triton.JITFunction`` defined in the package
``bio_transformations.kernels.triton`` that no other one refers to by name (a launch entry
point; the helpers ``tile``, ``for_block``, the ``*_body`` functions, ... are compiled inside
the kernels that use them) and that takes parameters (``launch._probe``, the interpreter probe,
takes none). Their first parameters say how they are launched (:func:`kind`):

* **op kernels** ``(tab, blocks, <operand witnesses>, <scalars>, [keys], [stats], [counts], S,
  W, BLOCK, ALIGNED, NDIM, <switches>)``: ``launch.fire`` starts one program per ``BLOCK``
  elements of a launch table, with ``_LAUNCH``;
* **statistics partial kernels** ``(tab, blocks, partials, <operand witnesses>, S, W, BLOCK,
  ALIGNED)``: the first launch of a statistics pass (``reduce.reduce_into``), over the table
  and blocks of the op kernel it serves: per block, a few float32 sums into ``partials``;
* **row kernels**, any other: one program per row of a launch table when they take ``tab``
  without ``blocks`` (a statistics pass's finish, ``(tab, partials, stats, S, W, BLOCK,
  RBLOCK)``: per row, its blocks' partials into ``stats``), else one program per ``BLOCK``
  rows of their own table (``keys._derive_keys(rows, keys, n, op_id, BLOCK)``: a key per row,
  the capturable mode's). The statistics passes and ``_derive_keys`` are launched with
  Triton's default options (4 warps, FMA contraction on: :func:`launch_options`).

**Signatures** follow from the parameter names (the naming convention of the backend):

* ``tab`` ``*i64``, ``blocks`` ``*i32``, ``keys`` ``*i64``, ``stats`` ``*fp32``,
  ``counts`` ``*i64``, ``partials`` ``*fp32``, ``rows`` ``*i64`` (:data:`FIXED_PARAMS`);
* a capital letter and digits (``W0``, ``G0``, ``P0``, ``S0``, ``C0``) is an operand witness: a
  pointer to the variant's element dtype, except the names in :data:`WITNESS_DTYPES` (``C0``,
  the int64 activation counts);
* any other runtime parameter is an ``fp32`` scalar (Python floats), except those in
  :data:`INT_SCALARS` (``_derive_keys``' ``n`` and ``op_id``: ``i32``);
* constexprs: ``S`` (the witnesses the launcher passes; for a statistics pass the slots of the
  table it reduces over, :data:`TABLE_SLOTS`), ``W`` (the table row width ``Plan`` computes:
  S + 4 + 3*NDIM; NDIM 0 for the statistics passes, which do not map layouts: another NDIM
  only changes the row stride, an immediate), ``BLOCK`` (``launch.BLOCK_SIZE``, or the kernel
  module's ``_BLOCK``: ``keys.py``'s 128) and ``RBLOCK`` (the module's ``_RBLOCK``: the
  partials a finish adds per step) are derived; ``NDIM`` and
  ``MODE`` take :data:`CONSTEXPR_VALUES`; every other constexpr is a boolean switch
  (``ALIGNED``, ``INDEX32``, ``VOLUME``, ``FUZZY``, ``CRYSTALLIZE``, ``NOISY``, and any flag
  added later; ``ALIGNED``, ``NDIM`` and ``INDEX32`` are set by ``launch.launch`` for every
  kernel, the others by the op);
* ``keys``, ``stats``, ``counts`` and ``P0`` are passed as None (a constexpr) where the
  launcher passes None for the variant's switches (:data:`NONE_WHEN`, read off the op functions
  of ``kernels/triton/*.py``; ``tests/test_gpu_static.py`` checks it against the launches those
  functions really make), and switch combinations no launcher makes are not compiled
  (:data:`NEVER_LAUNCHED`: ``bio_step_`` with every stage off launches nothing).

Variants are the product of dtype (fp32, fp16, bf16: the witnesses' element type; a kernel
without a witness has one variant, dtype ``-``) and every constexpr's values; each is compiled
with its launch options (op kernels: ``_LAUNCH``, ``num_warps`` and ``enable_fp_fusion``; the
others Triton's defaults) and 16-byte divisibility on every pointer argument (what the JIT
specialises for torch allocations).

**Measured per variant** (``triton.compile`` of an ``ASTSource`` for ``GPUTarget("cuda", cap,
32)``; ptxas, cuobjdump and nvdisasm from the triton wheel, ``triton/backends/nvidia/bin``):

* registers, stack frame, spill stores/loads: ptxas' own ``-v`` log (a fresh triton cache, so
  ptxas always runs);
* shared memory: the compiled kernel's metadata (bytes Triton allocates);
* 128-bit accesses: ``LDG.E.128``/``STG.E.128`` in the SASS of the full-tile body, and
  ``ld.global.v4``/``st.global.v4`` in the PTX of the whole kernel;
* ``masked_mem_hot_path``: predicated global loads/stores on the hot path (a check of the
  analysis: an op kernel's full-tile body has none; the test asserts 0), and
  ``masked_ldg_hot_path`` the loads alone (0 for every full-tile body, the statistics partial
  kernels' included);
* ``local_mem_hot_path``: local-memory instructions (``LDL``/``STL``: spills, or the stack
  array of a slow path) on the hot path defined next;
* SASS instructions in the hot path per element, defined as follows. The SASS
  (``cuobjdump -sass``) is split into basic blocks. A block is *cold* if it lies on a cycle
  (the Payne-Hanek loops of precise sin/cos for huge arguments), if it calls a subroutine
  ``nvdisasm`` names a ``slowpath`` (correctly rounded division's, taken only for extreme
  operands). A ``CALL`` on one side of a branch (its immediate dominator reaches its immediate
  post-dominator without it) counts its call site only, and the longest path picks the side:
  for LLVM's bypass of 64-bit division by a 32-bit one when both operands fit (every tensor
  below 2^32 elements) that is the inline 32-bit fast path, for a runtime branch the side doing
  the work. Any other ``CALL`` (64-bit division and remainder the compiler did not guard) is
  hot, and the callee's own hot path is counted at each call (``calls_hot_path`` counts the
  calls on the path). The kernel's first
  conditional forward branch (``draws.for_block``) splits the full-tile body -- a full block of
  a row whose operands are aligned and whose draws run grouped, four elements per Philox call:
  every block but the last of a contiguous unsharded tensor -- from the masked body that
  every other block runs (tail blocks, misaligned rows of an ``ALIGNED=False`` launch,
  scattered draws: permuted rows of an ``NDIM > 0`` launch, shards starting mid-group); the
  full one is the side with fewer predicated global memory instructions
  (``masked_mem_hot_path`` checks it). The hot path is the longest path from the entry through
  the full-tile body to ``EXIT`` over non-cold blocks (NOPs not counted): what a thread
  executes on a full tile when no value takes a slow path, runtime branches taking their
  longer side (``_temporal_kernel``: the noisy update; ``_init_kernel``: the longest mode).
  Per element = that count / elements per thread (``BLOCK / (32 * num_warps)``, 8 here): one
  thread's instructions amortised over the elements it handles, the prologue included. These
  are issued (per-thread) instructions, not cycles: MUFU (ex2, lg2, rcp, sin/cos) issue at a
  quarter of the FP32 rate, and latency is not modelled. The statistics partial kernels count
  the same way, per element of the tensor they reduce (their full-tile body: unmasked loads;
  its stores are predicated by design: one lane writes a block's sums, rejuvenation writes only
  the elements its cleaning changed).
* Row kernels (``unit`` "row") have no full-tile split: the hot path runs from the entry over
  the whole body, and a loop (the finish kernels' loop over the partials) counts its body once
  (the back edges of a depth-first search from the entry removed, not made cold): a row of up
  to ``RBLOCK`` blocks. ``sass_hot_per_row`` = that count x threads per program / rows per
  program (1 for a finish, ``BLOCK`` for ``_derive_keys``): thread-instructions per table row
  (a layer of the launch; for ``_derive_keys``, one key).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime
import importlib
import io
import itertools
import json
import os
import pkgutil
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "results" / "gpu_static"

#: Launch-convention parameters and their types.
FIXED_PARAMS = {
    "tab": "*i64",
    "blocks": "*i32",
    "keys": "*i64",
    "stats": "*fp32",
    "counts": "*i64",
    "partials": "*fp32",  # a statistics pass's per-block sums (``reduce.py``)
    "rows": "*i64",  # ``keys._derive_keys``' table: counter address, seed, counter offset
}
#: Operand witnesses whose dtype is not the variant's element dtype.
WITNESS_DTYPES = {"C0": "*i64"}  # activation counts (int64 buffer); Dale signs share w's dtype
#: Runtime scalars that are not fp32: ``_derive_keys``' row count and op id (Python ints below
#: 2**31, which Triton passes as i32).
INT_SCALARS: Dict[str, str] = {"n": "i32", "op_id": "i32"}
#: NDIM: 0 (contiguous launch) .. 5 (a Conv3d weight dense in a permuted order).
NDIM_VALUES = tuple(range(6))
#: Values of constexprs that are not boolean switches (others: False, True). ``MODE``: the
#: initial distribution of ``rates_init_`` (baseline, uniform, normal, lognormal).
CONSTEXPR_VALUES: Dict[str, tuple] = {"NDIM": NDIM_VALUES, "MODE": (0, 1, 2, 3)}
#: Derived constexprs (computed per variant, not switched).
DERIVED = ("S", "W", "BLOCK", "RBLOCK")
#: The table slots ``S`` of the statistics passes (``reduce.py``), which reduce over the launch
#: table of the kernel they serve, not a table of their own operands: crystallization's over
#: the step's ``w, g, p`` (``crystallize_stats``), rejuvenation's over its ``w``
#: (``rejuvenation_stats``). Other kernels: ``S`` is the number of witnesses they are passed.
TABLE_SLOTS = {
    "_crystal_partials": 3,
    "_crystal_finish": 3,
    "_rejuvenation_partials": 1,
    "_rejuvenation_finish": 1,
}
#: Per kernel, the parameters its launcher passes as None, as a function of the variant's
#: switches (``kernels/triton/step.py``: ``bio_step_``; ``rates.py``: ``rates_init_``,
#: ``temporal_update_``). Parameters not named here are always passed.
NONE_WHEN: Dict[str, Dict[str, Callable[[dict], bool]]] = {
    "_step_kernel": {
        "keys": lambda c: not c["VOLUME"],
        "stats": lambda c: not c["CRYSTALLIZE"],
        "P0": lambda c: not (c["FUZZY"] or c["CRYSTALLIZE"]),
    },
    "_init_kernel": {"keys": lambda c: c["MODE"] == 0},
    "_temporal_kernel": {"keys": lambda c: not c["NOISY"]},
}
#: Per kernel, the switch combinations no launcher makes (not compiled).
NEVER_LAUNCHED: Dict[str, Callable[[dict], bool]] = {
    "_step_kernel": lambda c: not (c["VOLUME"] or c["FUZZY"] or c["CRYSTALLIZE"]),
}
DTYPES = {"fp32": 4, "fp16": 2, "bf16": 2}  # name -> bytes per element
NO_DTYPE = "-"  # the one variant of a kernel without an operand witness (no element dtype)
TARGETS = (90, 80)

_WITNESS = re.compile(r"^[A-Z][0-9]+$")


# ---------------------------------------------------------------------------------------------
# Discovery and variants
# ---------------------------------------------------------------------------------------------


def kernel_modules() -> list:
    """The Triton backend's modules: the package ``bio_transformations.kernels.triton`` and
    every submodule of it."""
    pkg = importlib.import_module("bio_transformations.kernels.triton")
    mods = [pkg]
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        mods.append(importlib.import_module(info.name))
    return mods


def _names_used(fn) -> set:
    """Every name a JIT function's source refers to, called or passed on
    (``for_block(_step_body, ...)``) or through a module (``launch.exp``)."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(fn.src)):
        if isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.Attribute):
            names.add(node.attr)
    return names


def kind(fn) -> str:
    """How a kernel is launched, from its first parameters:

    * ``"op"``: ``(tab, blocks, <witness>, ...)``, an op kernel ``launch.fire`` starts over a
      launch table, one program per ``BLOCK``-element block;
    * ``"partials"``: ``(tab, blocks, partials, <witness>, ...)``, a statistics pass's first
      launch (``reduce.reduce_into``) over the same table and blocks: per block, a few sums;
    * ``"rows"``: any other kernel, one program per ``BLOCK`` rows of its table, or per row of
      a launch table when it takes ``tab`` without ``blocks`` (a statistics pass's finish).
    """
    p = [x.name for x in fn.params]
    if p[:2] == ["tab", "blocks"] and len(p) > 2:
        return "partials" if p[2] == "partials" else "op"
    return "rows"


def discover() -> Tuple[Dict[str, object], dict]:
    """``({kernel name: JITFunction}, launch settings)`` from the backend's modules: every JIT
    function defined there that no other one refers to (a launch entry point, not a device
    helper) and that takes parameters (``launch._probe``, the interpreter probe, takes none)."""
    import triton

    package = "bio_transformations.kernels.triton"
    jitted: Dict[str, object] = {}
    home: Dict[str, object] = {}
    settings: dict = {"constants": {}}
    for mod in kernel_modules():
        for obj in vars(mod).values():
            if (
                isinstance(obj, triton.runtime.JITFunction)
                and getattr(obj.fn, "__module__", "").startswith(package)
                and obj.fn.__module__ == mod.__name__
            ):
                jitted.setdefault(obj.__name__, obj)
                home.setdefault(obj.__name__, mod)
        if "BLOCK_SIZE" in vars(mod):
            settings.setdefault("BLOCK_SIZE", int(mod.BLOCK_SIZE))
        if "_LAUNCH" in vars(mod):
            settings.setdefault("options", dict(mod._LAUNCH))
    used = set().union(*(_names_used(fn) for fn in jitted.values())) if jitted else set()
    kernels = {n: fn for n, fn in jitted.items() if n not in used and fn.params}
    if "BLOCK_SIZE" in settings:
        for name in kernels:
            # BLOCK: launch.BLOCK_SIZE, or the kernel module's own ``_BLOCK`` (keys.py);
            # RBLOCK: the module's ``_RBLOCK`` (reduce.py: partials a finish adds per step)
            mod = vars(home[name])
            consts = {"BLOCK": int(mod.get("_BLOCK", settings["BLOCK_SIZE"]))}
            if "_RBLOCK" in mod:
                consts["RBLOCK"] = int(mod["_RBLOCK"])
            settings["constants"][name] = consts
    if not kernels:
        if any(type(o).__name__ == "InterpretedFunction" for m in kernel_modules() for o in
               vars(m).values()):  # fmt: skip
            raise RuntimeError("the kernels were decorated under TRITON_INTERPRET=1: unset it")
        raise RuntimeError("no Triton kernel found in the backend")
    if "BLOCK_SIZE" not in settings or "options" not in settings:
        raise RuntimeError("the backend defines no BLOCK_SIZE or _LAUNCH (launch options)")
    return dict(sorted(kernels.items())), settings


def source_hash() -> str:
    """A fingerprint of the kernels' source (every module of the backend) and the triton
    version: a checkpoint row of other kernels is never resumed."""
    import hashlib

    import triton

    h = hashlib.sha256(triton.__version__.encode())
    for mod in sorted(kernel_modules(), key=lambda m: m.__name__):
        h.update(mod.__name__.encode() + b"\0" + Path(mod.__file__).read_bytes())
    return h.hexdigest()[:16]


def _switches(fn) -> Dict[str, tuple]:
    """Each switched constexpr of ``fn`` and its values."""
    out = {}
    for p in fn.params:
        if p.is_constexpr and p.name not in DERIVED:
            out[p.name] = CONSTEXPR_VALUES.get(p.name, (False, True))
    return out


def _has_witness(fn) -> bool:
    """Whether ``fn`` takes an operand witness (then it has a variant per element dtype)."""
    return any(not p.is_constexpr and _WITNESS.match(p.name) for p in fn.params)


def absent(kernel: str, constexprs: dict) -> List[str]:
    """The parameters the launcher of ``kernel`` passes as None for these switches."""
    return sorted(p for p, when in NONE_WHEN.get(kernel, {}).items() if when(constexprs))


def launched(kernel: str, constexprs: dict) -> bool:
    """Whether a launcher makes this switch combination."""
    never = NEVER_LAUNCHED.get(kernel)
    return never is None or not never(constexprs)


def launch_options(fn, settings: dict) -> dict:
    """The options ``fn`` is launched with: ``launch.fire`` passes ``_LAUNCH`` to the op
    kernels; the statistics passes and ``_derive_keys`` are launched with Triton's defaults."""
    return dict(settings["options"]) if kind(fn) == "op" else {}


def signature(fn, dtype: str, constexprs: dict, constants: dict) -> Tuple[dict, dict, dict]:
    """``(signature, constexprs with the derived ones and the None parameters, attrs)`` for one
    variant of ``fn``; ``constants``: its ``BLOCK`` (and ``RBLOCK``), ``discover``'s
    ``settings["constants"][name]``."""
    sig, consts, attrs = {}, dict(constexprs), {}
    none = set(absent(fn.__name__, constexprs))
    witnesses = [p.name for p in fn.params if not p.is_constexpr and _WITNESS.match(p.name)]
    present = [w for w in witnesses if w not in none]  # S: the columns the launcher fills
    slots = TABLE_SLOTS.get(fn.__name__, len(present))
    for i, p in enumerate(fn.params):
        name = p.name
        if p.is_constexpr:
            sig[name] = "constexpr"
            if name == "S":
                consts[name] = slots
            elif name == "W":
                consts[name] = slots + 4 + 3 * int(constexprs.get("NDIM", 0))
            elif name in ("BLOCK", "RBLOCK"):
                consts[name] = constants[name]
            elif name not in consts:
                raise KeyError(f"{fn.__name__}: no value for constexpr {name}")
            continue
        if name in none:
            sig[name] = "constexpr"
            consts[name] = None
            continue
        if name in FIXED_PARAMS:
            sig[name] = FIXED_PARAMS[name]
        elif name in witnesses:
            sig[name] = WITNESS_DTYPES.get(name, "*" + dtype)
        else:
            sig[name] = INT_SCALARS.get(name, "fp32")
        if sig[name].startswith("*"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def variants(kernels: dict, subset: str = "full") -> List[dict]:
    """Every (kernel, dtype, constexpr values) a launcher can make, to compile.
    ``subset='test'`` keeps, per kernel, fp32 aligned NDIM 0 with every other switch on (and
    the last value of a valued one, ``MODE`` 3: lognormal, the longest), for the kernel with
    the most switches (the fused step) also bf16 aligned NDIM 0 and fp32 unaligned at the
    largest NDIM, and for the statistics passes' partial kernels also bf16 aligned (16-bit
    loads) and fp32 unaligned (the per-row alignment branch), and for every op kernel the other
    side of its switches: fp16, aligned, NDIM 1, every other switch at its first value (off,
    64-bit index math, ``MODE`` 0; the first such combination a launcher makes). A kernel
    without an operand witness has one dtype, :data:`NO_DTYPE`."""
    out = []
    widest = max(kernels, key=lambda k: len(_switches(kernels[k])))
    for name, fn in kernels.items():
        sw = _switches(fn)
        dtypes = list(DTYPES) if _has_witness(fn) else [NO_DTYPE]
        if subset == "test":
            flags = {k: v[-1] for k, v in sw.items() if k not in ("ALIGNED", "NDIM")}
            picks = [(dtypes[0], True, 0)]
            if name == widest:
                picks += [("bf16", True, 0), ("fp32", False, max(NDIM_VALUES))]
            elif kind(fn) == "partials":
                picks += [("bf16", True, 0), ("fp32", False, 0)]
            combos = []
            for dtype, aligned, ndim in picks:
                combo = dict(flags)
                if "ALIGNED" in sw:
                    combo["ALIGNED"] = aligned
                if "NDIM" in sw:
                    combo["NDIM"] = ndim
                combos.append((dtype, combo))
            if "NDIM" in sw:  # the other side of every switch: fp16, NDIM 1, switches off
                combos.append(("fp16", _first_launched(name, sw, ALIGNED=True, NDIM=1)))
            for dtype, combo in combos:
                out.append(
                    {"kernel": name, "dtype": dtype, "constexprs": combo,
                     "none": absent(name, combo)}
                )  # fmt: skip
            continue
        keys = list(sw)
        for dtype in dtypes:
            for values in itertools.product(*(sw[k] for k in keys)):
                combo = dict(zip(keys, values))
                if launched(name, combo):
                    out.append(
                        {"kernel": name, "dtype": dtype, "constexprs": combo,
                         "none": absent(name, combo)}
                    )  # fmt: skip
    return out


def _first_launched(name: str, sw: Dict[str, tuple], **fixed) -> dict:
    """The first switch combination (each switch's first value first: off, 64-bit indices,
    ``MODE`` 0) a launcher makes, with ``fixed`` values."""
    keys = [k for k in sw if k not in fixed]
    for values in itertools.product(*(sw[k] for k in keys)):
        combo = {k: fixed.get(k) for k in sw}
        combo.update(zip(keys, values))
        if launched(name, combo):
            return combo
    raise ValueError(f"{name}: no launched combination with {fixed}")


def variant_key(v: dict) -> str:
    c = ",".join(f"{k}={int(x) if isinstance(x, bool) else x}" for k, x in v["constexprs"].items())
    return f"{v['target']}/{v['kernel']}/{v['dtype']}/{c}"


# ---------------------------------------------------------------------------------------------
# Tools from the triton wheel
# ---------------------------------------------------------------------------------------------


def nvidia_tool(name: str) -> str:
    """``name`` from the triton wheel (``triton/backends/nvidia/bin``), else from PATH."""
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(
            f"{name} is neither in the triton wheel ({path.parent}) nor on PATH"
        )
    return found


# ---------------------------------------------------------------------------------------------
# SASS analysis
# ---------------------------------------------------------------------------------------------

_SASS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_GLOBAL_MEM = ("LDG", "STG", "ATOMG", "RED")


class Instr:
    __slots__ = ("addr", "pred", "op", "args")

    def __init__(self, addr, pred, op, args):
        self.addr, self.pred, self.op, self.args = addr, pred, op, args

    @property
    def conditional(self) -> bool:
        return self.pred is not None and self.pred not in ("@PT", "@UPT")

    def target(self) -> Optional[int]:
        m = re.search(r"0x([0-9a-f]+)", self.args)
        return int(m.group(1), 16) if m else None

    @property
    def base(self) -> str:
        return self.op.split(".")[0]


def parse_sass(text: str) -> List[Instr]:
    out = []
    for m in _SASS.finditer(text):
        pred = m.group(2).strip() if m.group(2) else None
        out.append(Instr(int(m.group(1), 16), pred, m.group(3), m.group(4).strip()))
    if not out:
        raise ValueError("no SASS instructions found in the cuobjdump output")
    return out


def _sccs(nodes, succ) -> List[list]:
    """Tarjan's strongly connected components (iterative)."""
    index, low, on, stack, comps, counter = {}, {}, set(), [], [], [0]
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(succ[root]))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(succ[w])))
                    advanced = True
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                comps.append(comp)
    return comps


_CALLEE = re.compile(r"/\*([0-9a-f]{4,})\*/[^;]*\bCALL\.[A-Z.]*\s+`\(\$?([^)`]+)\)")


def callee_names(nvdisasm_text: str) -> Dict[int, str]:
    """``{address of a CALL: callee name}`` from ``nvdisasm -c`` output, which names the
    subroutines (``$__internal_0_$__cuda_sm3x_div_rn_noftz_f32_slowpath``, ``..._div_s64``)."""
    return {int(m.group(1), 16): m.group(2) for m in _CALLEE.finditer(nvdisasm_text)}


_EXIT = -1  # the virtual exit of the post-dominator computation


def _idoms(entry, nodes, succ) -> Dict[int, int]:
    """Immediate dominators over ``nodes`` (Cooper, Harvey and Kennedy's iteration)."""
    order, seen, stack = [], {entry}, [(entry, iter(succ[entry]))]
    while stack:  # reverse postorder
        v, it = stack[-1]
        for w in it:
            if w in nodes and w not in seen:
                seen.add(w)
                stack.append((w, iter(succ[w])))
                break
        else:
            stack.pop()
            order.append(v)
    order.reverse()
    index = {v: k for k, v in enumerate(order)}
    preds: Dict[int, list] = {v: [] for v in order}
    for v in order:
        for w in succ[v]:
            if w in index:
                preds[w].append(v)
    idom = {entry: entry}

    def meet(a, b):
        while a != b:
            while index[a] > index[b]:
                a = idom[a]
            while index[b] > index[a]:
                b = idom[b]
        return a

    changed = True
    while changed:
        changed = False
        for v in order[1:]:
            done = [p for p in preds[v] if p in idom]
            if not done:
                continue
            new = done[0]
            for p in done[1:]:
                new = meet(p, new)
            if idom.get(v) != new:
                idom[v], changed = new, True
    return idom


def _back_edges(starts: list, succ: dict) -> set:
    """The edges a depth-first search from the entry (then from every block not yet seen:
    subroutines) meets as back edges: removing them leaves each loop body once."""
    state: Dict[int, int] = {}  # 1: on the stack, 2: done
    back = set()
    for root in starts:
        if root in state:
            continue
        state[root] = 1
        work = [(root, iter(succ[root]))]
        while work:
            v, it = work[-1]
            for w in it:
                if state.get(w) == 1:
                    back.add((v, w))
                elif w not in state:
                    state[w] = 1
                    work.append((w, iter(succ[w])))
                    break
            else:
                state[v] = 2
                work.pop()
    return back


def analyse_sass(
    text: str,
    callees: Optional[Dict[int, str]] = None,
    split: bool = True,
    loops: str = "cold",
) -> dict:
    """Hot-path instruction count and 128-bit accesses of one kernel's SASS (see the module
    docstring for the definition). ``callees`` (from :func:`callee_names`) names each CALL's
    subroutine: calls to a ``slowpath`` are cold; other calls are cold when guarded by a fast
    path (their dominator reaches their post-dominator without them), hot otherwise.
    ``split=False``: the kernel has no full-tile/masked split (a row kernel), its whole body
    is the region. ``loops="once"``: a loop's body counts once (the back edges of a search
    from the entry removed) instead of being cold: a row kernel's loop over the partials,
    which runs once for a row of up to ``RBLOCK`` blocks."""
    if loops not in ("cold", "once"):
        raise ValueError(f"loops: 'cold' or 'once', not {loops!r}")
    instrs = parse_sass(text)
    while instrs and (
        instrs[-1].base == "NOP"
        or (instrs[-1].base == "BRA" and not instrs[-1].conditional
            and instrs[-1].target() == instrs[-1].addr)
    ):  # fmt: skip
        instrs.pop()  # the trailing self-branch and padding
    addrs = [i.addr for i in instrs]
    addr_set = set(addrs)
    leaders = {addrs[0]}
    for k, i in enumerate(instrs):
        if i.base in ("BRX", "JMX"):
            raise ValueError("indirect branch in the SASS: the hot-path analysis cannot follow it")
        if i.base in ("BRA", "EXIT", "RET", "JMP"):  # a CALL returns: it ends no block
            if k + 1 < len(instrs):
                leaders.add(instrs[k + 1].addr)
            if i.base in ("BRA", "JMP", "CALL") and i.target() in addr_set:
                leaders.add(i.target())
    starts = sorted(leaders)
    pos = {a: k for k, a in enumerate(addrs)}
    blocks: Dict[int, List[Instr]] = {}
    for j, s in enumerate(starts):
        stop = pos[starts[j + 1]] if j + 1 < len(starts) else len(instrs)
        blocks[s] = instrs[pos[s] : stop]
    succ: Dict[int, list] = {}
    calls: Dict[int, list] = {}  # block -> subroutine entries it calls
    exits = set()  # blocks ending in EXIT or RET
    for j, s in enumerate(starts):
        last = blocks[s][-1]
        nxt = starts[j + 1] if j + 1 < len(starts) else None
        out = []
        if last.base in ("BRA", "JMP"):
            if last.target() in blocks:
                out.append(last.target())
            if last.conditional and nxt is not None:
                out.append(nxt)
        elif last.base in ("EXIT", "RET"):
            exits.add(s)
            if last.conditional and nxt is not None:
                out.append(nxt)
        elif nxt is not None:
            out.append(nxt)
        succ[s] = out
        calls[s] = [i.target() for i in blocks[s] if i.base == "CALL" and i.target() in blocks]
    looped = set()  # blocks on a cycle: the loops of slow paths (Payne-Hanek reduction, ...)
    if loops == "once":
        back = _back_edges(starts, succ)
        succ = {b: [t for t in out if (b, t) not in back] for b, out in succ.items()}
    for comp in _sccs(starts, succ):
        if len(comp) > 1 or comp[0] in succ[comp[0]]:
            looped.update(comp)

    def reach(entry, allowed) -> set:
        seen, todo = set(), [entry]
        while todo:
            b = todo.pop()
            if b in seen or not allowed(b):
                continue
            seen.add(b)
            todo.extend(succ[b])
        return seen

    main = reach(starts[0], lambda b: True)
    in_main = main_addrs(blocks, main)
    # The split between the full-tile and the masked tail-tile bodies.
    split = next(
        (i for i in instrs if i.addr in in_main and i.base == "BRA"
         and i.conditional and (i.target() or 0) > i.addr),
        None,
    ) if split else None  # fmt: skip
    end = max(addrs) + 1
    if split is None:
        region, prologue_end = (addrs[0], end), addrs[0]
    else:
        a, b = (split.addr + 1, split.target()), (split.target(), end)

        def predicated_mem(lo, hi):
            return sum(
                1
                for blk in main
                for i in blocks[blk]
                if lo <= i.addr < hi and i.base in ("LDG", "STG") and i.conditional
            )

        region = a if predicated_mem(*a) <= predicated_mem(*b) else b
        prologue_end = split.addr + 1

    def cost_from(entry, allowed_extra) -> Tuple[Optional[int], list]:
        """Longest path (instructions, subroutine calls included) from ``entry`` to an EXIT/RET
        over blocks that are not looped, not a bypassable call, and ``allowed_extra``."""
        base_ok = lambda blk: blk not in looped and allowed_extra(blk)  # noqa: E731
        region_blocks = reach(entry, base_ok)
        ends = exits & region_blocks
        cold = set()
        call_blocks = [blk for blk in region_blocks if calls[blk] and blk != entry]
        if call_blocks:
            idom = _idoms(entry, region_blocks, succ)
            rsucc = {blk: [] for blk in region_blocks}  # the reversed graph, a virtual exit
            for blk in region_blocks:
                for t in succ[blk]:
                    if t in region_blocks:
                        rsucc[t].append(blk)
            rsucc[_EXIT] = sorted(ends)
            ipdom = _idoms(_EXIT, set(region_blocks) | {_EXIT}, rsucc)
        guarded = set()
        for blk in call_blocks:
            names = [(callees or {}).get(i.addr, "") for i in blocks[blk] if i.base == "CALL"]
            if any("slowpath" in n for n in names):
                cold.add(blk)  # named a slow path by nvdisasm
                continue
            # A call its dominator can bypass on the way to its post-dominator sits on one side
            # of a branch: LLVM's 32-bit fast path around 64-bit division (the call is the slow
            # side), or a runtime branch (the call is part of the work). Its callee is not
            # counted and the longest path picks the side: the fast path is longer than the
            # call site, the work side longer than the other.
            d, pd = idom.get(blk), ipdom.get(blk)
            if d is None or pd is None:
                continue
            seen = reach(d, lambda x, blk=blk: x != blk and base_ok(x))
            if (pd in seen) if pd != _EXIT else bool(seen & ends):
                guarded.add(blk)
        memo: Dict[int, Optional[int]] = {}
        nxt: Dict[int, Optional[int]] = {}

        def weight(blk) -> int:
            w = sum(1 for i in blocks[blk] if i.base != "NOP")
            if blk in guarded:
                return w
            for t in calls[blk]:
                callee = callee_cost(t)
                w += callee if callee is not None else 0
            return w

        def longest(blk) -> Optional[int]:
            if blk in memo:
                return memo[blk]
            memo[blk] = None  # guards against a cycle that escaped the SCC pass
            best, choice = (0 if blk in exits else None), None
            for t in succ[blk]:
                if t in region_blocks and t not in cold:
                    sub = longest(t)
                    if sub is not None and (best is None or sub > best):
                        best, choice = sub, t
            memo[blk] = None if best is None else best + weight(blk)
            nxt[blk] = choice
            return memo[blk]

        total = longest(entry) if entry in region_blocks else None
        path, blk = [], entry if total is not None else None
        while blk is not None:
            path.append(blk)
            blk = nxt.get(blk)
        return total, path

    callee_memo: Dict[int, Optional[int]] = {}

    def callee_cost(target) -> Optional[int]:
        if target not in callee_memo:
            callee_memo[target] = None  # recursion guard
            callee_memo[target] = cost_from(target, lambda blk: True)[0]
        return callee_memo[target]

    def allowed(blk):
        return blk in main and (blk < prologue_end or region[0] <= blk < region[1])

    sys.setrecursionlimit(max(10000, 4 * len(starts)))
    hot, path = cost_from(starts[0], allowed)
    full = [i for blk in main for i in blocks[blk] if region[0] <= i.addr < region[1]]
    return {
        "sass_instructions": sum(1 for blk in main for i in blocks[blk] if i.base != "NOP"),
        "sass_hot_path": hot,
        "calls_hot_path": sum(len(calls[blk]) for blk in path),
        # masked (predicated) loads/stores on the hot path: 0 unless the split was misread
        "masked_mem_hot_path": sum(
            1 for blk in path for i in blocks[blk] if i.base in ("LDG", "STG") and i.conditional
        ),
        "masked_ldg_hot_path": sum(
            1 for blk in path for i in blocks[blk] if i.base == "LDG" and i.conditional
        ),
        "local_mem_hot_path": sum(
            1 for blk in path for i in blocks[blk] if i.base in ("LDL", "STL")
        ),
        "ldg128_full_tile": sum(1 for i in full if i.base == "LDG" and ".128" in i.op),
        "stg128_full_tile": sum(1 for i in full if i.base == "STG" and ".128" in i.op),
        "ldg_full_tile": sum(1 for i in full if i.base == "LDG"),
        "stg_full_tile": sum(1 for i in full if i.base == "STG"),
    }


def main_addrs(blocks: Dict[int, List[Instr]], main: set) -> set:
    return {i.addr for blk in main for i in blocks[blk]}


# ---------------------------------------------------------------------------------------------
# Compiling one variant
# ---------------------------------------------------------------------------------------------

_PTXAS = {
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "registers": re.compile(r"Used (\d+) registers"),
}
_worker_state: dict = {}


def _init_worker() -> None:
    # The interpreter replaces JITFunctions with InterpretedFunctions, which cannot be compiled.
    os.environ.pop("TRITON_INTERPRET", None)
    from triton import knobs

    # A private, empty cache: every compile runs ptxas, whose -v log gives registers and spills.
    _worker_state["cache"] = tempfile.mkdtemp(prefix="gpu_static_cache_")
    atexit.register(shutil.rmtree, _worker_state["cache"], ignore_errors=True)
    knobs.cache.dir = _worker_state["cache"]
    knobs.nvidia.dump_ptxas_log = True
    _worker_state["kernels"], _worker_state["settings"] = discover()
    _worker_state["source"] = source_hash()


def compile_variant(v: dict) -> dict:
    """Compile one variant for its target and measure it; never raises (errors are recorded)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if "kernels" not in _worker_state:
        _init_worker()
    fn = _worker_state["kernels"][v["kernel"]]
    settings = _worker_state["settings"]
    out = dict(v, source=_worker_state["source"])
    t0 = time.perf_counter()
    try:
        constants = settings["constants"][v["kernel"]]
        sig, consts, attrs = signature(fn, v["dtype"], v["constexprs"], constants)
        options = launch_options(fn, settings)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            k = triton.compile(
                ASTSource(fn, sig, consts, attrs),
                target=GPUTarget("cuda", v["target"], 32),
                options=options,
            )
        text = log.getvalue()
        for field, rx in _PTXAS.items():
            m = rx.search(text)
            out[field] = int(m.group(1)) if m else None
        out["shared"] = int(k.metadata.shared)
        ptx = k.asm["ptx"]
        out["ptx_ld_v4"] = len(re.findall(r"ld\.global(?:\.\w+)*\.v4\.b32", ptx))
        out["ptx_st_v4"] = len(re.findall(r"st\.global(?:\.\w+)*\.v4\.b32", ptx))
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
            f.write(k.asm["cubin"])
        try:
            sass = subprocess.run(
                [nvidia_tool("cuobjdump"), "-sass", f.name],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            names = subprocess.run(
                [nvidia_tool("nvdisasm"), "-c", f.name], check=True, capture_output=True, text=True
            ).stdout
        finally:
            os.unlink(f.name)
        kernel_kind = kind(fn)
        rows = kernel_kind == "rows"
        out.update(
            analyse_sass(
                sass, callee_names(names), split=not rows, loops="once" if rows else "cold"
            )
        )
        threads = 32 * options.get("num_warps", 4)  # Triton's default: 4 warps
        hot = out["sass_hot_path"]
        if rows:
            # one program per table row (tab without blocks), else per BLOCK rows
            per_program = 1 if "tab" in fn.arg_names else constants["BLOCK"]
            out["unit"] = "row"
            out["rows_per_program"] = per_program
            out["sass_hot_per_row"] = None if hot is None else round(hot * threads / per_program, 2)
        else:
            per_thread = constants["BLOCK"] // threads
            out["unit"] = "element"
            out["elements_per_thread"] = per_thread
            out["sass_hot_per_element"] = None if hot is None else round(hot / per_thread, 2)
        out["ok"] = True
    except Exception as e:  # recorded: the report says which variant failed and why
        out["ok"] = False
        out["error"] = f"{type(e).__name__}: {e}"[:2000]
    out["compile_s"] = round(time.perf_counter() - t0, 2)
    return out


def run(
    variant_list: List[dict],
    targets: Iterable[int],
    jobs: int,
    checkpoint: Optional[Path] = None,
    progress: bool = True,
) -> List[dict]:
    """Compile every variant for every target. With ``checkpoint`` (a JSON-lines file), each
    result is appended as it completes and variants already there are not compiled again, so
    an interrupted full run resumes where it stopped."""
    todo = [dict(v, target=t) for t in targets for v in variant_list]
    done: Dict[str, dict] = {}
    if checkpoint is not None and checkpoint.exists():
        wanted = {variant_key(v) for v in todo}
        source, stale = source_hash(), 0
        for line in checkpoint.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if r.get("source") != source:  # compiled from other kernels (or triton)
                stale += 1
            elif variant_key(r) in wanted:
                done[variant_key(r)] = r
        if (done or stale) and progress:
            print(
                f"  resuming: {len(done)} variants already in {checkpoint}"
                + (f" ({stale} rows of other kernel sources ignored)" if stale else ""),
                flush=True,
            )
    rest = [v for v in todo if variant_key(v) not in done]
    t0 = time.perf_counter()
    if jobs <= 1:
        _init_worker()
        it = map(compile_variant, rest)
        pool = None
    else:
        import multiprocessing as mp

        pool = ProcessPoolExecutor(
            jobs, mp_context=mp.get_context("spawn"), initializer=_init_worker
        )
        it = pool.map(compile_variant, rest, chunksize=2)
    sink = open(checkpoint, "a") if checkpoint is not None else None
    try:
        for n, r in enumerate(it, 1):
            done[variant_key(r)] = r
            if sink is not None:
                sink.write(json.dumps(r) + "\n")
                sink.flush()
            if progress and (n % 25 == 0 or n == len(rest) or not r["ok"]):
                bad = "" if r["ok"] else f"  FAILED {variant_key(r)}: {r['error'][:200]}"
                print(
                    f"  {n}/{len(rest)} compiled ({time.perf_counter() - t0:.0f} s){bad}",
                    flush=True,
                )
    finally:
        if sink is not None:
            sink.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return [done[variant_key(v)] for v in todo]


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------

#: H200 SXM public figures (NVIDIA H200 datasheet: 4.8 TB/s HBM3e; GH100 SXM: 132 SMs, 1.98 GHz
#: boost, 4 warp schedulers per SM issuing one warp instruction per clock each).
H200 = {"hbm_bytes_per_s": 4.8e12, "sms": 132, "boost_hz": 1.98e9, "issue_per_sm_clk": 4}
#: Per-thread instruction issue rate of the whole chip (instructions per second).
H200_THREAD_INSTR_PER_S = H200["sms"] * H200["issue_per_sm_clk"] * H200["boost_hz"] * 32
ANALYSIS_ELEMENTS = 1 << 26

#: op -> (kernel, switches, bytes the kernel moves per element in units of the element size,
#: what the kernel reads/writes). Statistics passes before the kernel are not included here.
ANALYSIS_OPS = [
    ("fuzzy_scale_", "_fuzzy_kernel", {}, 3, "r g,p; w g"),
    ("volume_scale_", "_step_kernel", {"VOLUME": True}, 3, "r w,g; w g"),
    ("crystallize_", "_step_kernel", {"CRYSTALLIZE": True}, 4, "r w,g,p; w p"),
    (
        "bio_step_ (V+F+C)",
        "_step_kernel",
        {"VOLUME": True, "FUZZY": True, "CRYSTALLIZE": True},
        5,
        "r w,g,p; w g,p",
    ),
    ("rejuvenate_", "_rejuvenate_kernel", {}, 2, "r w; w w"),
    ("rejuvenate_legacy_", "_legacy_kernel", {}, 2, "r w; w w"),
    ("rates_init_", "_init_kernel", {"MODE": 3}, 1, "w p"),  # lognormal: the longest draw
    ("temporal_update_", "_temporal_kernel", {"NOISY": True}, 2, "r p; w p"),
    ("weight_adaptive_", "_adaptive_kernel", {}, 2, "r w; w p"),
    ("activity_update_", "_activity_kernel", {}, 1, "w p (counts per row)"),
    ("dale_enforce_", "_dale_kernel", {}, 2, "r w; w w (sign per row)"),
]


#: The statistics passes (``reduce.py``): (pass, partial kernel, finish kernel, bytes per
#: element in units of the element size, traffic, the ops of :data:`ANALYSIS_OPS` they run
#: before). Crystallization's reads w and g; rejuvenation's reads w and writes back only the
#: elements its cleaning changes (NaN, or beyond [-1, 1]: none in a healthy model).
STATS_PASSES = [
    ("crystallization statistics", "_crystal_partials", "_crystal_finish", 2, "r w,g",
     ("crystallize_", "bio_step_ (V+F+C)")),
    ("rejuvenation statistics", "_rejuvenation_partials", "_rejuvenation_finish", 1,
     "r w; w changed only", ("rejuvenate_",)),
]  # fmt: skip


def _find(results, target, kernel, dtype, **constexprs) -> Optional[dict]:
    for r in results:
        if r["target"] != target or r["kernel"] != kernel or r["dtype"] != dtype or not r["ok"]:
            continue
        c = r["constexprs"]
        # a switch the variant lacks matches: before the refactor MODE and NOISY were runtime
        # branches, whose longest side the hot path took
        if all(c.get(k, v) == v for k, v in constexprs.items()):
            # switches not named must be off (bools) for the op's own variant
            named = set(constexprs)
            if all(not x for k, x in c.items() if k not in named and isinstance(x, bool)):
                return r
    return None


def analysis_rows(before: List[dict], after: Optional[List[dict]] = None) -> List[dict]:
    """Per op and dtype (sm_90, aligned, NDIM 0): hot-path instructions per element of the
    ``before`` report (and of ``after`` when given) against the H200 bandwidth floor."""
    rows = []

    def pick(results, kernel, dtype, flags, ndim):
        # INDEX32: what every launch of tensors below 2**31 elements compiles (a report from
        # before the switch matches it: a switch a variant lacks matches)
        return _find(
            results, 90, kernel, dtype, **dict(flags, ALIGNED=True, NDIM=ndim, INDEX32=True)
        )

    for op, kernel, flags, units, traffic in ANALYSIS_OPS:
        for dtype in ("fp32", "bf16"):
            nbytes = units * DTYPES[dtype]
            floor_us = nbytes * ANALYSIS_ELEMENTS / H200["hbm_bytes_per_s"] * 1e6
            row = {
                "op": op,
                "dtype": dtype,
                "traffic": traffic,
                "bytes_per_element": nbytes,
                "floor_us": round(floor_us, 1),
                "instr_budget": round(
                    nbytes * H200_THREAD_INSTR_PER_S / H200["hbm_bytes_per_s"], 1
                ),
            }
            found = False
            for label, results in (("before", before), ("after", after)):
                r = pick(results, kernel, dtype, flags, 0) if results else None
                r4 = pick(results, kernel, dtype, flags, 4) if results else None
                found = found or r is not None
                per = r and r.get("sass_hot_per_element")
                t = per * ANALYSIS_ELEMENTS / H200_THREAD_INSTR_PER_S * 1e6 if per else None
                row[label] = per
                row[label + "_us"] = None if t is None else round(t, 1)
                row[label + "_pct"] = None if t is None else round(100 * min(1.0, floor_us / t))
                row[label + "_ndim4"] = r4 and r4.get("sass_hot_per_element")
                row[label + "_regs"] = (r and r.get("registers"), r4 and r4.get("registers"))
            if found:
                rows.append(row)
    return rows


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return str(x)


def _issue_us(per_element: Optional[float]) -> Optional[float]:
    """Instruction time of ``ANALYSIS_ELEMENTS`` elements at the H200's issue rate, µs."""
    if per_element is None:
        return None
    return per_element * ANALYSIS_ELEMENTS / H200_THREAD_INSTR_PER_S * 1e6


def stats_markdown(results: List[dict]) -> str:
    """Per statistics pass and dtype (sm_90, aligned): its partial kernel's instructions per
    element against the H200 floor of the bytes it moves, its finish kernel's per row, and
    what the pass adds to the op kernel it runs before (each at max(floor, instruction
    time)). Empty when ``results`` hold no statistics pass."""
    lines = [
        f"sm_90, ALIGNED, {ANALYSIS_ELEMENTS:,} elements, the floor and instruction time as in "
        "the op table (4.8 TB/s; 33.5e12 thread-instructions/s). 'pass µs' = max(floor, "
        "instruction time) of the partial kernel; the finish kernel's thread-instructions per "
        "row (one program per row, 128 threads, its loop over the partials once: a row of up "
        "to RBLOCK x BLOCK = 1,048,576 elements) are negligible next to it for any row above "
        "a few thousand elements, and its latency and the two launches are not modelled. "
        "'op µs' = max(floor, instruction time) of the op kernel (AFTER, INDEX32, NDIM 0); "
        "'+ %' = pass µs / op µs.",
        "",
        "| pass | dtype | traffic | B/elem | floor µs | budget instr/elem | partials instr/elem "
        "| pass µs | % bw | finish instr/row | regs partials / finish | before op | op µs | + % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ops = {op: (kernel, flags, units) for op, kernel, flags, units, _ in ANALYSIS_OPS}
    found = False
    for name, partial, finish, units, traffic, served in STATS_PASSES:
        for dtype in ("fp32", "bf16"):
            r = _find(results, 90, partial, dtype, ALIGNED=True)
            f = _find(results, 90, finish, NO_DTYPE)
            if r is None:
                continue
            found = True
            nbytes = units * DTYPES[dtype]
            floor_us = nbytes * ANALYSIS_ELEMENTS / H200["hbm_bytes_per_s"] * 1e6
            per = r.get("sass_hot_per_element")
            t = _issue_us(per)
            pass_us = max(floor_us, t or 0.0)
            for op in served:
                kernel, flags, op_units = ops[op]
                k = _find(results, 90, kernel, dtype,
                          **dict(flags, ALIGNED=True, NDIM=0, INDEX32=True))  # fmt: skip
                op_floor = op_units * DTYPES[dtype] * ANALYSIS_ELEMENTS / H200["hbm_bytes_per_s"]
                op_us = None
                if k is not None:
                    op_us = max(op_floor * 1e6, _issue_us(k.get("sass_hot_per_element")) or 0.0)
                cells = (
                    name, dtype, traffic, nbytes, round(floor_us, 1),
                    round(nbytes * H200_THREAD_INSTR_PER_S / H200["hbm_bytes_per_s"], 1), per,
                    round(pass_us, 1), None if t is None else round(100 * min(1.0, floor_us / t)),
                    f and f.get("sass_hot_per_row"),
                    f"{_fmt(r.get('registers'))} / {_fmt(f and f.get('registers'))}", op,
                    None if op_us is None else round(op_us, 1),
                    None if op_us is None else round(100 * pass_us / op_us),
                )  # fmt: skip
                lines.append("| " + " | ".join(_fmt(x) for x in cells) + " |")
    return "\n".join(lines) + "\n" if found else ""


def analysis_markdown(rows: List[dict]) -> str:
    lines = [
        f"sm_90, ALIGNED, NDIM 0, {ANALYSIS_ELEMENTS:,} elements. Floor: kernel bytes / "
        f"{H200['hbm_bytes_per_s'] / 1e12:.1f} TB/s. Instruction time: hot-path instructions per "
        f"element x elements / {H200_THREAD_INSTR_PER_S / 1e12:.1f}e12 thread-instructions/s "
        f"({H200['sms']} SMs x {H200['issue_per_sm_clk']} issues/clk x "
        f"{H200['boost_hz'] / 1e9:.2f} GHz x 32 lanes). Budget: instructions per element that fit "
        "in the floor. '% bw' = floor / max(floor, instruction time): the best fraction of the "
        "bandwidth floor the kernel can reach (an upper bound: latency and MUFU rate ignored). "
        "NDIM 4 and registers: before -> after.",
        "",
        "| op | dtype | traffic | B/elem | floor µs | budget instr/elem | before instr/elem | µs "
        "| % bw | after instr/elem | µs | % bw | NDIM 4 instr/elem | regs NDIM 0 / 4 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def both(r, key):
        a, b = r["before" + key], r["after" + key]
        return _fmt(a) if b is None else f"{_fmt(a)} -> {_fmt(b)}"

    def regs(pair):
        return f"{_fmt(pair[0])} / {_fmt(pair[1])}"

    for r in rows:
        reg = regs(r["before_regs"])
        if r["after"] is not None:
            reg += " -> " + regs(r["after_regs"])
        cells = (
            r["op"], r["dtype"], r["traffic"], r["bytes_per_element"], r["floor_us"],
            r["instr_budget"], r["before"], r["before_us"], r["before_pct"], r["after"],
            r["after_us"], r["after_pct"], both(r, "_ndim4"), reg,
        )  # fmt: skip
        lines.append("| " + " | ".join(_fmt(x) for x in cells) + " |")
    return "\n".join(lines) + "\n"


def counts_markdown(before: List[dict], after: List[dict], target: int) -> str:
    """Per op and dtype on ``target`` (aligned, INDEX32 where compiled): hot-path instructions
    per element and registers, NDIM 0 and 4, before -> after (no bandwidth floor: the H200
    figures are sm_90's)."""
    lines = [
        f"sm_{target}, ALIGNED, hot-path SASS instructions per element (before -> after).",
        "",
        "| op | dtype | NDIM 0 instr/elem | NDIM 4 instr/elem | regs NDIM 0 | regs NDIM 4 |",
        "|---|---|---|---|---|---|",
    ]

    def pick(results, kernel, dtype, flags, ndim):
        return _find(
            results, target, kernel, dtype, **dict(flags, ALIGNED=True, NDIM=ndim, INDEX32=True)
        )

    def pair(a, b, key):
        x = a and a.get(key)
        y = b and b.get(key)
        return f"{_fmt(x)} -> {_fmt(y)}"

    for op, kernel, flags, _, _ in ANALYSIS_OPS:
        for dtype in ("fp32", "bf16"):
            b0, b4 = (pick(before, kernel, dtype, flags, d) for d in (0, 4))
            a0, a4 = (pick(after, kernel, dtype, flags, d) for d in (0, 4))
            if not (b0 or a0):
                continue
            cells = (
                op, dtype, pair(b0, a0, "sass_hot_per_element"),
                pair(b4, a4, "sass_hot_per_element"), pair(b0, a0, "registers"),
                pair(b4, a4, "registers"),
            )  # fmt: skip
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _hot(r: dict) -> str:
    """Hot-path instructions per element, or per row ('/row') for a row kernel."""
    if r.get("unit") == "row":
        return _fmt(r.get("sass_hot_per_row")) + "/row"
    return _fmt(r.get("sass_hot_per_element"))


def _flags_label(c: dict) -> str:
    on = [k for k, v in c.items() if isinstance(v, bool) and v and k != "ALIGNED"]
    return "+".join(on) if on else "-"


def _subset_arg(report: dict) -> str:
    if report["subset"] in ("full", "test"):
        return "`" if report["subset"] == "full" else " --subset test`"
    return "`, which resumes the partial run from its checkpoint"


def report_markdown(report: dict) -> str:
    res = report["results"]
    failed = [r for r in res if not r["ok"]]
    added = _added(report)
    timed = report.get("timed_variants", len(res) - added)
    lines = [
        "# Static GPU report of the Triton kernels",
        "",
        f"Date {report['date']}, triton {report['triton']}, torch {report['torch']}, targets "
        f"{', '.join('sm_%d' % t for t in report['targets'])}, launch options "
        f"{report['launch_options']}, BLOCK {report['block_size']}, "
        f"{report['elements_per_thread']} elements per thread. Subset: {report['subset']}.",
        f"{len(res)} variants compiled, {len(failed)} failed"
        + (f", in {report['seconds']} s " if report["seconds"] is not None else " ")
        + (f"for the first {timed} " if added else "")
        + f"(`python benchmarks/gpu_static.py{_subset_arg(report)}).",
        "",
        "Definitions: see the docstring of `benchmarks/gpu_static.py` and `analysis.md`. "
        "'hot/elem' = SASS instructions on the full-tile hot path per element; 'ld128/st128' = "
        "128-bit global loads/stores in the full-tile body (SASS); 'spill' = spill stores + "
        "loads in bytes (ptxas).",
        "",
    ]
    if any(r.get("unit") == "row" for r in res):
        lines[-1:-1] = [
            "Cells marked '/row' (the statistics passes' finish kernels and `_derive_keys`) count "
            "thread-instructions per table row instead: the hot path (a loop over the partials "
            "once) x threads per program / rows per program. The statistics passes and "
            "`_derive_keys` are launched with Triton's default options (4 warps, FMA "
            "contraction on); the launch options above are the op kernels'.",
        ]
    for add in report.get("additions", []):
        lines[-1:-1] = [
            f"Added {add['date']}: {add['variants']} variants of {', '.join(add['kernels'])} "
            f"({', '.join('sm_%d' % t for t in add['targets'])}) in {add['seconds']} s, from the "
            f"kernels of commit {add['commit']} (`{add.get('command', 'gpu_static.py --add')}`).",
        ]
    for r in failed:
        lines.append(f"- FAILED `{variant_key(r)}`: {r['error'][:300]}")
    spills = [r for r in res if r["ok"] and (r["spill_stores"] or r["spill_loads"])]
    lines.append(f"Variants that spill: {len(spills)}" + (":" if spills else "."))
    for r in spills[:40]:
        lines.append(
            f"- `{variant_key(r)}`: {r['spill_stores']} B stores, {r['spill_loads']} B loads"
        )
    unvec = [
        r
        for r in res
        if r["ok"]
        and r["constexprs"].get("ALIGNED")
        and not (r["ldg128_full_tile"] or r["stg128_full_tile"])
    ]
    lines.append(
        f"Aligned variants without a 128-bit access: {len(unvec)}" + (":" if unvec else ".")
    )
    for r in unvec[:40]:
        lines.append(f"- `{variant_key(r)}`")
    ndims = sorted({r["constexprs"].get("NDIM", 0) for r in res})
    lo, hi = ndims[0], ndims[-1]
    for target in report["targets"]:
        lines += [
            "",
            f"## sm_{target}",
            "",
            f"Per kernel, switches and dtype: aligned NDIM {lo} | aligned NDIM {hi} | unaligned "
            f"NDIM {lo}. Each cell: regs, spill B, shared B, ld128/st128, hot/elem.",
            "",
            f"| kernel | switches | dtype | aligned NDIM {lo} | aligned NDIM {hi} | "
            f"unaligned NDIM {lo} |",
            "|---|---|---|---|---|---|",
        ]
        groups: Dict[tuple, dict] = {}
        for r in res:
            if r["target"] != target:
                continue
            c = r["constexprs"]
            flags = {k: v for k, v in c.items() if k not in ("ALIGNED", "NDIM")}
            key = (r["kernel"], _flags_label(flags), r["dtype"])
            groups.setdefault(key, {})[(bool(c.get("ALIGNED", True)), c.get("NDIM", 0))] = r

        def cell(r):
            if r is None:
                return "-"
            if not r["ok"]:
                return "FAILED"
            spill = (r["spill_stores"] or 0) + (r["spill_loads"] or 0)
            return (
                f"{r['registers']}, {spill}, {r['shared']}, {r['ldg128_full_tile']}/"
                f"{r['stg128_full_tile']}, {_hot(r)}"
            )

        for (kernel, flags, dtype), g in groups.items():
            lines.append(
                f"| {kernel} | {flags} | {dtype} | {cell(g.get((True, lo)))} | "
                f"{cell(g.get((True, hi)))} | {cell(g.get((False, lo)))} |"
            )
    return "\n".join(lines) + "\n"


def compare_markdown(old: dict, new: dict) -> str:
    """The variants whose measurements changed between two reports."""
    a = {variant_key(r): r for r in old["results"]}
    b = {variant_key(r): r for r in new["results"]}
    fields = ("ok", "registers", "spill_stores", "spill_loads", "shared", "ldg128_full_tile",
              "stg128_full_tile", "sass_hot_per_element", "sass_hot_per_row")  # fmt: skip
    both = sorted(set(a) & set(b))
    changed = [k for k in both if any(a[k].get(f) != b[k].get(f) for f in fields)]
    lines = [
        "# Static report comparison",
        "",
        f"before: {old['date']} (triton {old['triton']}); after: {new['date']} "
        f"(triton {new['triton']})",
        "",
        f"Variants only before: {len(set(a) - set(b))}; only after: {len(set(b) - set(a))}; "
        f"in both: {len(both)}, of which {len(changed)} changed (listed).",
        "",
        "| variant | ok | regs | spill B | shared B | ld128/st128 | hot/elem |",
        "|---|---|---|---|---|---|---|",
    ]

    def pair(x, y):
        return _fmt(x) if x == y else f"{_fmt(x)} -> {_fmt(y)}"

    def spill(r):
        return (r.get("spill_stores") or 0) + (r.get("spill_loads") or 0)

    def vec(r):
        return f"{_fmt(r.get('ldg128_full_tile'))}/{_fmt(r.get('stg128_full_tile'))}"

    for k in changed:
        x, y = a[k], b[k]
        lines.append(
            f"| {k} | {pair(x['ok'], y['ok'])} | {pair(x.get('registers'), y.get('registers'))} "
            f"| {pair(spill(x), spill(y))} | {pair(x.get('shared'), y.get('shared'))} "
            f"| {pair(vec(x), vec(y))} "
            f"| {pair(_hot(x), _hot(y))} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    os.environ.pop("TRITON_INTERPRET", None)  # before triton decorates the kernels
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--subset", choices=("full", "test"), default="full")
    ap.add_argument("--targets", default=None, help="comma list of capabilities (default 90,80)")
    ap.add_argument("--ndim", default=None, help="comma list: only these NDIM values")
    ap.add_argument("--kernels", default=None, help="comma list: only these kernels")
    ap.add_argument("--dtypes", default=None, help="comma list: only these dtypes (fp32, ...)")
    ap.add_argument(
        "--where", default=None,
        help="comma list of SWITCH=VALUE (e.g. INDEX32=1,ALIGNED=1): only variants with these",
    )  # fmt: skip
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument(
        "--compare", default=None,
        help="an earlier report.json (or a comma list of reports, taken together)",
    )  # fmt: skip
    ap.add_argument("--list", action="store_true", help="only list the variants")
    ap.add_argument(
        "--add", action="store_true",
        help="merge the compiled variants into the report.json already in --out (same variants "
        "replaced, the others kept as recorded) instead of writing a report of them alone",
    )  # fmt: skip
    ap.add_argument(
        "--from-json", type=Path, default=None,
        help="re-render the markdown of a recorded report.json instead of compiling",
    )  # fmt: skip
    args = ap.parse_args(argv)

    if args.from_json and args.from_json.suffix == ".jsonl":
        report = report_from_checkpoint(args.from_json)
    elif args.from_json:
        report = json.loads(args.from_json.read_text())
    else:
        checkpoint = args.out / f"partial-{args.subset}.jsonl"
        fresh_checkpoint = not checkpoint.exists()
        report = build_report(args)
        if report is None:
            return 0
        if args.add:
            report = merge_reports(json.loads((args.out / "report.json").read_text()), report)
        (args.out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        filtered = args.ndim or args.kernels or args.targets or args.dtypes or args.where
        if not filtered or (args.add and fresh_checkpoint):
            checkpoint.unlink(missing_ok=True)  # everything it holds is in report.json
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text(report_markdown(report))
    if args.compare:  # one report, or a comma list whose results are taken together
        olds = [json.loads(Path(p).read_text()) for p in str(args.compare).split(",")]
        before = dict(olds[0], results=[r for o in olds for r in o["results"]])
        (args.out / "compare.md").write_text(compare_markdown(before, report))
        rows = analysis_rows(before["results"], report["results"])
        for target in sorted({r["target"] for r in report["results"]} - {90}):
            (args.out / f"analysis_table_sm{target}.md").write_text(
                counts_markdown(before["results"], report["results"], target)
            )
    else:
        rows = analysis_rows(report["results"])
    (args.out / "analysis_table.md").write_text(analysis_markdown(rows))
    stats = stats_markdown(report["results"])
    if stats:
        (args.out / "analysis_table_stats.md").write_text(stats)
    failed = [r for r in report["results"] if not r["ok"]]
    print(
        f"gpu_static: {len(report['results']) - len(failed)} ok, {len(failed)} failed -> {args.out}"
    )
    return 1 if failed else 0


def _commit() -> str:
    """The short commit of the checkout, ``+changes`` when its kernels differ from it."""

    def git(*a):
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "kernels", "bio_transformations")
    return head + ("+changes" if dirty else "")


def merge_reports(old: dict, new: dict) -> dict:
    """``old`` with ``new``'s variants added (a variant in both: ``new``'s), its metadata kept
    and the addition listed under ``additions``."""
    added = {variant_key(r) for r in new["results"]}
    results = [r for r in old["results"] if variant_key(r) not in added] + new["results"]
    kernels = sorted(set(old["kernels"]) | {r["kernel"] for r in new["results"]})
    addition = {
        "date": new["date"], "kernels": sorted({r["kernel"] for r in new["results"]}),
        "targets": new["targets"], "variants": len(new["results"]),
        "seconds": new["seconds"], "commit": _commit(),
        "command": " ".join(["python benchmarks/gpu_static.py", *sys.argv[1:]]),
    }  # fmt: skip
    # the variants of the first, timed recording (replaced variants stay counted there)
    timed = old.get("timed_variants", len(old["results"]) - _added(old))
    return dict(old, kernels=kernels, results=results, timed_variants=timed,
                additions=old.get("additions", []) + [addition])  # fmt: skip


def _added(report: dict) -> int:
    return sum(a["variants"] for a in report.get("additions", []))


def report_from_checkpoint(path: Path) -> dict:
    """A report of the variants an interrupted run has finished (``partial-full.jsonl``),
    marked partial, with how many of the full set it holds."""
    import torch
    import triton

    kernels, settings = discover()
    full = {variant_key(dict(v, target=t)) for t in TARGETS for v in variants(kernels)}
    source = source_hash()
    rows = {}
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if r.get("source") == source:  # rows of other kernel sources are not these kernels'
            rows[variant_key(r)] = r
    results = [r for k, r in sorted(rows.items()) if k in full]
    return {
        "date": datetime.datetime.fromtimestamp(path.stat().st_mtime).isoformat(timespec="seconds"),
        "triton": triton.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "targets": sorted({r["target"] for r in results}, reverse=True),
        "subset": f"partial: {len(results)} of the {len(full)} variants of the full set",
        "block_size": settings["BLOCK_SIZE"],
        "launch_options": settings["options"],
        "elements_per_thread": settings["BLOCK_SIZE"]
        // (32 * settings["options"].get("num_warps", 4)),
        "kernels": list(kernels),
        "seconds": None,
        "results": results,
    }


def build_report(args) -> Optional[dict]:
    """Compile the variants ``args`` select; None after ``--list``."""
    import torch
    import triton

    kernels, settings = discover()
    vs = variants(kernels, args.subset)
    if args.ndim:  # filters: the checkpoint of the full set still collects their results
        ndims = {int(x) for x in args.ndim.split(",")}
        vs = [v for v in vs if v["constexprs"].get("NDIM", 0) in ndims]
    if args.kernels:
        vs = [v for v in vs if v["kernel"] in args.kernels.split(",")]
    if getattr(args, "dtypes", None):
        vs = [v for v in vs if v["dtype"] in args.dtypes.split(",")]
    if getattr(args, "where", None):
        for cond in args.where.split(","):
            name, value = cond.split("=")
            vs = [v for v in vs if name not in v["constexprs"]
                  or int(v["constexprs"][name]) == int(value)]  # fmt: skip
    if args.targets:
        targets = [int(t) for t in args.targets.split(",")]
    else:
        targets = [90] if args.subset == "test" else list(TARGETS)
    if args.list:
        for v in vs:
            print(variant_key(dict(v, target="*")))
        print(f"{len(vs)} variants per target, {len(kernels)} kernels: {', '.join(kernels)}")
        return None
    print(f"gpu_static: {len(vs)} variants x {len(targets)} targets, {args.jobs} jobs", flush=True)
    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    checkpoint = args.out / f"partial-{args.subset}.jsonl"
    results = run(vs, targets, args.jobs, checkpoint)
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "triton": triton.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "targets": targets,
        "subset": args.subset,
        "block_size": settings["BLOCK_SIZE"],
        "launch_options": settings["options"],
        "elements_per_thread": settings["BLOCK_SIZE"]
        // (32 * settings["options"].get("num_warps", 4)),
        "kernels": list(kernels),
        "seconds": round(time.perf_counter() - t0, 1),
        "results": results,
    }


if __name__ == "__main__":
    sys.exit(main())
