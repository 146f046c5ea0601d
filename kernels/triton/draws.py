"""Random draws of the Triton kernels: the element mapping of
:mod:`~bio_transformations.kernels.philox`, four elements per Philox call.

Element ``i`` (its row-major index in its layer, shard offset included) reads output word
``i % 4`` of the Philox4x32-10 call at counter ``(lo(i // 4), hi(i // 4), stream, 0)``:

* a uniform is ``U(w)`` (Triton's ``uint_to_uniform_float``), bit for bit as in torch;
* a normal is one output of Box-Muller on a pair of words: lanes 0 and 1 are
  ``r cos(theta)`` and ``r sin(theta)`` of ``(w0, w1)``, lanes 2 and 3 those of ``(w2, w3)``,
  with ``r = sqrt(-2 ln max(U(a), 1e-7))`` and ``theta = float32(int32(b)) * float32(pi*2**-31)``
  in [-pi, pi];
* rejuvenation takes a second call per group (``stream`` 1) for its normals, and the sign from
  bit 31 of its stream-0 word (independent of ``U`` of that word, which folds the bit away).

**Two paths, one result.** A block of a contiguous row whose first global index is a multiple
of 4 (every block of an unsharded contiguous tensor) runs *grouped*: one Philox call per four
elements (``BLOCK // 4`` counters), all four words and both Box-Muller outputs used, the
results interleaved into element order (``tl.join`` + ``tl.reshape``): for 32-bit operands
a thread holds the four lanes of groups ``k`` and ``k + BLOCK/8``, for 16-bit ones those of
groups ``2k`` and ``2k + 1`` (``RUN`` 8, :func:`draw_run`), the layout of their 128-bit
accesses, so no conversion through shared memory. Any other block (a
permuted row of an ``NDIM > 0`` launch, a shard starting mid-group) runs *scattered*: one call
per element at its own counter, its lane selected. The choice is one uniform branch per block;
both paths do the same float32 operations on the same words, so they give the same bits.

**Fast forms.** The angle's ``cos``/``sin`` use the hardware approximations (``cos.approx``,
``sin.approx``: absolute error below 2**-21 on [-pi, pi], which is why the angle is signed) and
the magnitude and threshold exponentials of rejuvenation ``ex2.approx`` (a few ulp): those
values are random draws, compared with the torch backend within ulp budgets or as decisions
that may flip only at their threshold. ``ln`` of the radius stays precise (the fast ``lg2`` has
an absolute error that dominates ``r`` near ``U = 1``). Correctly rounded forms stay where the
reference's rounding is compared bit for bit: the volume factor ``|w|/(|w|+1)`` and its
``exp``, crystallization, the rate formulas around the uniforms. Under ``TRITON_INTERPRET=1``
every form is numpy's.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.random import philox as _philox
from triton.language.random import uint_to_uniform_float

from .. import philox as _host
from .launch import DIMS, MEM_STRIDE, fast_cos, fast_sin, logical

#: float32(pi * 2**-31): a word read as int32 times this is an angle in [-pi, pi].
ANGLE_SCALE = tl.constexpr(_host._ANGLE_SCALE)
U1_FLOOR = tl.constexpr(_host._U1_FLOOR)


@triton.jit
def uniform(w):
    """``U(w)``: Triton's uint32 -> [0, 1) map."""
    return uint_to_uniform_float(w)


@triton.jit
def box_muller(a, b):
    """The two normals of words ``(a, b)``: ``r cos(theta)``, ``r sin(theta)``."""
    r = tl.sqrt(-2.0 * tl.log(tl.maximum(uniform(a), U1_FLOOR)))
    theta = b.to(tl.int32, bitcast=True).to(tl.float32) * ANGLE_SCALE
    return r * fast_cos(theta), r * fast_sin(theta)


@triton.jit
def _mulhilo(a: tl.constexpr, b):
    """``(hi, lo)`` of the 64-bit product of the constant ``a`` and uint32 ``b``: one widening
    multiply (``mul.wide.u32``) instead of ``mul.hi`` and ``mul.lo``; the same bits."""
    p = b.to(tl.uint64) * a
    return (p >> 32).to(tl.uint32), p.to(tl.uint32)


@triton.jit
def _philox4x32(k0, k1, c0, c1, c2, c3):
    """Philox4x32-10, the rounds of ``triton.language.random.philox_impl``."""
    for _ in tl.static_range(10):
        hi_b, lo_b = _mulhilo(0xCD9E8D57, c2)
        hi_a, lo_a = _mulhilo(0xD2511F53, c0)
        c0 = hi_b ^ c1 ^ k0
        c2 = hi_a ^ c3 ^ k1
        c1 = lo_b
        c3 = lo_a
        k0 = tl.add(k0, 0x9E3779B9, sanitize_overflow=False)
        k1 = tl.add(k1, 0xBB67AE85, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def _call(key, lo, hi, STREAM: tl.constexpr, WIDE: tl.constexpr = True):
    """Philox4x32-10 at counter ``(lo, hi, STREAM, 0)`` (uint32 tensors of one shape).
    ``WIDE``: each round's two products by widening multiplies (one ``IMAD.WIDE.U32`` each
    instead of ``IMAD.HI`` + ``IMAD``: up to 20 instructions fewer per call, measured 4 to 5
    per element where one call serves four); the scattered path keeps triton's
    ``mul.hi``/``mul.lo`` (its eight calls per thread in flight spill with 64-bit products)."""
    zero = lo * 0
    if WIDE:
        key = key.to(tl.uint64)
        k0 = (key & 0xFFFFFFFF).to(tl.uint32)
        k1 = ((key >> 32) & 0xFFFFFFFF).to(tl.uint32)
        words = _philox4x32(k0, k1, lo, hi, zero + STREAM, zero)
    else:
        words = _philox(key, lo, hi, zero + STREAM, zero)
    return words


@triton.jit
def _interleave(a, b, c, d, BLOCK: tl.constexpr):
    """``[a0, b0, c0, d0, a1, b1, ...]``: group ``k``'s four values at elements 4k .. 4k+3."""
    return tl.reshape(tl.join(tl.join(a, c), tl.join(b, d)), [BLOCK])


@triton.jit
def _interleave8(a, b, c, d, e, f, g, h, BLOCK: tl.constexpr):
    """``[a0, b0, c0, d0, e0, f0, g0, h0, a1, ...]``: the four lanes of even group ``2k``
    (``a .. d``) then of odd group ``2k + 1`` (``e .. h``) at elements ``8k .. 8k + 7``. Every
    ``join`` adds an in-thread dimension, so a thread holds 8 consecutive elements: the layout
    of a 128-bit access to a 16-bit dtype (no conversion through shared memory)."""
    ac = tl.join(tl.join(a, e), tl.join(c, g))
    bd = tl.join(tl.join(b, f), tl.join(d, h))
    return tl.reshape(tl.join(ac, bd), [BLOCK])


@triton.constexpr_function
def draw_run(dtype):
    """Consecutive elements a thread's grouped draws cover: 8 for a 16-bit ``dtype`` (what one
    128-bit access holds), else 4."""
    return 8 if dtype.primitive_bitwidth == 16 else 4


@triton.jit
def _group_words(key, first, BLOCK: tl.constexpr, STREAM: tl.constexpr, PARITY: tl.constexpr = 0,
                 STEP: tl.constexpr = 1):  # fmt: skip
    """The four words of groups ``PARITY, PARITY + STEP, ...`` (``BLOCK // (4 * STEP)`` of
    them) from global index ``first`` (a multiple of 4); the 64-bit counter is carried in
    32-bit halves."""
    g = first.to(tl.int64) >> 2
    lo0 = g.to(tl.uint32)
    hi0 = (g >> 32).to(tl.uint32)
    lo = lo0 + (tl.arange(0, BLOCK // (4 * STEP)) * STEP + PARITY).to(tl.uint32)
    hi = hi0 + (lo < lo0).to(tl.uint32)  # carry into the high word
    return _call(key, lo, hi, STREAM)


@triton.jit
def run_lanes(FN: tl.constexpr, args, first, BLOCK: tl.constexpr, RUN: tl.constexpr):
    """Per-run values in element order, in the layout of the grouped draws: a thread's
    ``RUN`` consecutive elements (as there: 8 for 16-bit operands, else 4) are one run, and
    ``FN(args, start, RUN)`` gets every run's first memory offset (``first + RUN * k``) and
    returns its ``RUN`` values, interleaved like the draws' words (so a value computed once
    per run, a row's count say, needs no layout conversion either)."""
    lane0 = first + tl.arange(0, BLOCK // RUN) * RUN
    if RUN == 8:
        a, b, c, d, e, f, g, h = FN(args, lane0, RUN)
        out = _interleave8(a, b, c, d, e, f, g, h, BLOCK)
    else:
        a, b, c, d = FN(args, lane0, RUN)
        out = _interleave(a, b, c, d, BLOCK)
    return out


@triton.jit
def _element_words(key, idx, STREAM: tl.constexpr):
    """Per element (global indices ``idx``) the four words of its group, and its lane."""
    g = idx.to(tl.int64) >> 2
    w0, w1, w2, w3 = _call(key, g.to(tl.uint32), (g >> 32).to(tl.uint32), STREAM, False)
    return w0, w1, w2, w3, (idx & 3).to(tl.int32)


@triton.jit
def _pick(w0, w1, w2, w3, lane):
    return tl.where(lane < 2, tl.where(lane == 0, w0, w1), tl.where(lane == 2, w2, w3))


@triton.jit
def grouped(row, start, base, S: tl.constexpr, NDIM: tl.constexpr):
    """Whether this block draws grouped: a contiguous row (``NDIM`` 0, or an identity first
    dim in the table) whose block starts at a global index that is a multiple of 4."""
    ok = ((start + base) & 3) == 0
    if NDIM > 0:
        ok = ok & (tl.load(row + S + DIMS + MEM_STRIDE) == 1)
    return ok


@triton.jit
def row_aligned(row, N: tl.constexpr, ALIGNED: tl.constexpr):
    """Whether this row's ``N`` elementwise operands are all 16-byte aligned: None (known at
    compile time) when the whole launch is (``ALIGNED``), else one check per block, so one
    misaligned tensor (a view into a DDP bucket, ...) no longer costs the others their
    128-bit accesses."""
    if ALIGNED:
        ok = None
    else:
        bits = tl.load(row)
        for col in tl.static_range(1, N):
            bits = bits | tl.load(row + col)
        ok = (bits & 15) == 0
    return ok


@triton.jit
def for_block(BODY: tl.constexpr, fast_ptrs, ptrs, values, row, offs, n, full, grouped,
              aligned, FLAGS: tl.constexpr):  # fmt: skip
    """``BODY(ptrs, values, row, offs, n, FLAGS, MASKED, GROUPED)`` on this block.

    The common case -- a full block, drawing grouped (``grouped`` None: the kernel draws
    nothing), of a row whose operands are aligned (``aligned`` None: all are) -- runs unmasked
    on ``fast_ptrs`` (alignment-hinted: vectorised). Every other block runs masked on ``ptrs``:
    a tail block, a misaligned row (scalar accesses either way), a scattered draw (a Philox
    call per element: vectorising its loads would not show). Each case is a whole body (loads,
    draws, stores), so no tensor leaves a runtime branch (no layout conversion between the
    draw paths), and the first branch splits the common body from the rest (the split
    ``benchmarks/gpu_static.py`` measures)."""
    fast = full
    if grouped is not None:
        fast = fast & grouped
    if aligned is not None:
        fast = fast & aligned
    if fast:
        BODY(fast_ptrs, values, row, offs, n, FLAGS, False, True)
    elif grouped is None:
        BODY(ptrs, values, row, offs, n, FLAGS, True, True)
    elif grouped:
        BODY(ptrs, values, row, offs, n, FLAGS, True, True)
    else:
        BODY(ptrs, values, row, offs, n, FLAGS, True, False)


@triton.jit
def _grouped(GROUP: tl.constexpr, key, first, BLOCK: tl.constexpr, STREAM: tl.constexpr,
             RUN: tl.constexpr):  # fmt: skip
    """``GROUP``'s four lanes per Philox call (words or normals) in element order: a run of 8
    (16-bit operands) takes groups 2k and 2k+1 per thread, a run of 4 group k."""
    if RUN == 8:
        a0, a1, a2, a3 = GROUP(key, first, BLOCK, STREAM, 0, 2)
        b0, b1, b2, b3 = GROUP(key, first, BLOCK, STREAM, 1, 2)
        out = _interleave8(a0, a1, a2, a3, b0, b1, b2, b3, BLOCK)
    else:
        a0, a1, a2, a3 = GROUP(key, first, BLOCK, STREAM, 0, 1)
        out = _interleave(a0, a1, a2, a3, BLOCK)
    return out


@triton.jit
def _group_normals(key, first, BLOCK: tl.constexpr, STREAM: tl.constexpr, PARITY: tl.constexpr,
                   STEP: tl.constexpr):  # fmt: skip
    w0, w1, w2, w3 = _group_words(key, first, BLOCK, STREAM, PARITY, STEP)
    n0, n1 = box_muller(w0, w1)
    n2, n3 = box_muller(w2, w3)
    return n0, n1, n2, n3


@triton.jit
def _scattered_words(key, idx, STREAM: tl.constexpr):
    w0, w1, w2, w3, lane = _element_words(key, idx, STREAM)
    return _pick(w0, w1, w2, w3, lane)


@triton.jit
def _scattered_normals(key, idx, STREAM: tl.constexpr):
    w0, w1, w2, w3, lane = _element_words(key, idx, STREAM)
    low = lane < 2
    c, s = box_muller(tl.where(low, w0, w2), tl.where(low, w1, w3))
    return tl.where((lane & 1) == 0, c, s)


@triton.jit
def draw_index(row, offs, base, S: tl.constexpr, NDIM: tl.constexpr, GROUPED: tl.constexpr):
    """The global element indices a scattered body draws at (the permuted-index math, once per
    body however many draws it makes); 0 for a grouped body, which needs none."""
    if GROUPED:
        idx = 0
    else:
        idx = logical(row, offs, S, NDIM) + base
    return idx


@triton.jit
def words_of(key, idx, start, base, BLOCK: tl.constexpr, STREAM: tl.constexpr,
             GROUPED: tl.constexpr, RUN: tl.constexpr = 4):  # fmt: skip
    """Each element's word (uint32) of the call at ``(i // 4, STREAM)``. Grouped: from the
    block's first memory offset ``start`` and the tensor's first global index ``base`` (its
    shard's); scattered: at the global indices ``idx`` (:func:`draw_index`)."""
    if GROUPED:
        word = _grouped(_group_words, key, start + base, BLOCK, STREAM, RUN)
    else:
        word = _scattered_words(key, idx, STREAM)
    return word


@triton.jit
def uniforms(key, idx, start, base, BLOCK: tl.constexpr, STREAM: tl.constexpr,
             GROUPED: tl.constexpr, RUN: tl.constexpr = 4):  # fmt: skip
    """Each element's uniform ``U(i)`` (:func:`philox.element_uniforms`)."""
    return uniform(words_of(key, idx, start, base, BLOCK, STREAM, GROUPED, RUN))


@triton.jit
def normals(key, idx, start, base, BLOCK: tl.constexpr, STREAM: tl.constexpr,
            GROUPED: tl.constexpr, RUN: tl.constexpr = 4):  # fmt: skip
    """Each element's normal ``N(i)`` (:func:`philox.element_normals`): both Box-Muller
    outputs of each pair used."""
    if GROUPED:
        z = _grouped(_group_normals, key, start + base, BLOCK, STREAM, RUN)
    else:
        z = _scattered_normals(key, idx, STREAM)
    return z
