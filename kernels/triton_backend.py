"""Triton kernels: the fused GPU backend, with the ops, arguments and results of ``torch_backend``.

How a call runs (one launch per op and (device, dtype) group):

* **Multi-tensor launches.** A call with a list of ``L`` tensors is ONE kernel launch over a flat
  grid of ``BLOCK_SIZE`` blocks covering every tensor. A small device table has one row per
  tensor: the data pointers of its operands (int64 addresses the kernel casts back with
  ``.to(pointer type)``), ``numel``, its first block, its row length (for per-output-unit
  vectors), its index in the caller's list, and for permuted layouts the sizes and strides that
  map a memory position to the logical row-major index. A second array maps each block to its
  table row. Both depend only on the tensors' addresses and shapes, so they are cached and
  steady-state calls do not rebuild them; building one never reads device memory on the host
  (the H2D copy of a new table goes through pinned memory, ``non_blocking``). Only the per-call
  keys travel each call (one pinned H2D copy; device fills while a CUDA graph is captured).
* **Statistics** (``mean|w|``, rejuvenation's ``std/mu/sigma``, ...) are computed by the
  very same torch functions ``torch_backend`` uses (``abs_means``, ``rejuvenation_stats``,
  ``clean_weights_``), stacked on the device and read by the kernel through a pointer: the same
  numbers on both backends and never an ``.item()``.
* **Random numbers**: element ``i`` of a tensor draws ``tl.randint4x(key, i)`` with ``i`` its flat
  row-major index (for every layout), exactly the outputs ``r0..r3`` each ``torch_backend``
  docstring names, so ``torch_backend`` with ``BIO_RNG=philox`` draws the same numbers.
* **Arithmetic** runs in float32 (load, upcast, compute, round back once) in the order
  ``torch_backend`` writes it, with FMA contraction off, correctly rounded division
  (``div_rn``) and CUDA's own ``expf`` (libdevice), so results agree bit for bit where no
  transcendental function is involved and within a few ulp otherwise.
* **Layouts**: contiguous tensors and tensors dense in a permuted order (``channels_last``
  convolution weights, ``.t()`` of a matrix, ...) whose operands share one layout run in place;
  the kernel maps memory positions to logical indices. Anything else (overlapping or gappy
  views, operands with different layouts) runs on a contiguous copy that is copied back, which
  costs one extra read and write of that tensor per call.
* **Dtypes**: float32, float16 and bfloat16. float64 tensors fall back to ``torch_backend``
  (whose random stream then follows ``BIO_RNG``), as do CUDA tensors under ``TRITON_INTERPRET=1``
  (the interpreter cannot dereference device addresses in the pointer tables). Gamma and beta
  rate initialisation use ``torch_backend.rates_init_`` (torch's samplers, a one-time draw).
* **CUDA graphs**: every op can be captured after one warm-up call with the same tensors (which
  caches the tables; the cache keeps them alive while the graph may replay). A replay reuses the
  keys of the captured call, i.e. replays the same random draws.
"""

from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence

import torch
import triton
import triton.language as tl
from triton.language.random import pair_uniform_to_normal, uint_to_uniform_float

from . import torch_backend

Tensor = torch.Tensor
Tensors = Sequence[Tensor]

__all__ = [
    "BLOCK_SIZE",
    "INTERPRETED",
    "activity_update_",
    "bio_step_",
    "crystallize_",
    "dale_enforce_",
    "fuzzy_scale_",
    "rates_init_",
    "rejuvenate_",
    "rejuvenate_legacy_",
    "temporal_update_",
    "volume_scale_",
    "weight_adaptive_",
]


@triton.jit
def _probe():
    pass


#: Whether the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` when triton
#: decorated them; asked of triton itself, which parses the variable its own way).
INTERPRETED: bool = type(_probe).__name__ == "InterpretedFunction"
#: Elements per program.
BLOCK_SIZE = 1024
_NUM_WARPS = 4
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LAUNCH = dict(num_warps=_NUM_WARPS, enable_fp_fusion=False)  # no FMA: round like torch does

# ---------------------------------------------------------------------------------------------
# Device-side helpers
# ---------------------------------------------------------------------------------------------

if INTERPRETED:

    @triton.jit
    def _exp(x):
        return tl.exp(x)  # numpy's exp; the interpreter has no libdevice

else:
    from triton.language.extra import libdevice

    @triton.jit
    def _exp(x):
        return libdevice.exp(x)  # __nv_expf, what torch's CUDA exp calls (tl.exp is ex2.approx)


if INTERPRETED:

    @triton.jit
    def _round(x, dtype: tl.constexpr):
        """``x.to(dtype)``, rounding to nearest even: the interpreter truncates to bfloat16."""
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + (((bits >> 16) & 1) + 0x7FFF)
            bits = tl.where(x != x, 0x7FC0, bits >> 16)  # NaN stays a quiet NaN, as in torch
            return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(dtype)

else:

    @triton.jit
    def _round(x, dtype: tl.constexpr):
        """``x.to(dtype)`` (round to nearest even, like torch)."""
        return x.to(dtype)


@triton.jit
def _tile(tab, blocks, W: tl.constexpr, S: tl.constexpr, BLOCK: tl.constexpr):
    """This program's table row, element count, memory offsets and whether its block is full."""
    pid = tl.program_id(0)
    t = tl.load(blocks + pid).to(tl.int64)
    row = tab + t * W
    n = tl.load(row + S)
    start = (pid - tl.load(row + S + 1)) * BLOCK  # int64: no overflow on huge tensors
    offs = start + tl.arange(0, BLOCK)
    return t, row, n, offs, start + BLOCK <= n


@triton.jit
def _addr(row, col: tl.constexpr, like, ALIGNED: tl.constexpr):
    """Operand ``col`` of this table row as a pointer of ``like``'s type."""
    ptr = tl.load(row + col).to(like.dtype)
    if ALIGNED:
        # The host checked it; lets Triton vectorise loads/stores (the hint must sit on the
        # pointer: on the loaded integer it is ignored).
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _logical(row, offs, S: tl.constexpr, NDIM: tl.constexpr):
    """Flat row-major index of memory position ``offs`` (the RNG counter and the row source)."""
    if NDIM > 0:
        idx = offs * 0
        for d in tl.static_range(NDIM):
            size = tl.load(row + S + 4 + 3 * d)
            mstride = tl.load(row + S + 4 + 3 * d + 1)
            lstride = tl.load(row + S + 4 + 3 * d + 2)
            idx += (offs // mstride) % size * lstride
    else:
        idx = offs
    return idx


@triton.jit
def _row_of(row, idx, S: tl.constexpr):
    """Output unit (weight row) of logical index ``idx``."""
    return idx // tl.load(row + S + 2)


@triton.jit
def _clamp(x, lo, hi):
    # NaN stays NaN, as with torch.clamp (hardware min/max would drop it)
    x = tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(x, hi, propagate_nan=tl.PropagateNan.ALL)


# ---------------------------------------------------------------------------------------------
# Host-side machinery: layouts, cached tables, the one launch per group
# ---------------------------------------------------------------------------------------------


def _to_signed64(k: int) -> int:
    """A 64-bit key as the int64 with the same bits (Triton reads it back as uint64)."""
    k = int(k) & 0xFFFF_FFFF_FFFF_FFFF
    return k - (1 << 64) if k >= (1 << 63) else k


def _to_device(host: Tensor, device: torch.device) -> Tensor:
    """Copy a small host table to ``device`` without making the host wait for the device."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _keys_tensor(keys: Sequence[int], device: torch.device) -> Tensor:
    values = [_to_signed64(k) for k in keys]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        # No H2D copy can be captured from pageable memory: one fill kernel per key instead.
        out = torch.empty(len(values), dtype=torch.int64, device=device)
        for j, k in enumerate(values):
            out[j].fill_(k)
        return out
    return _to_device(torch.tensor(values, dtype=torch.int64), device)


def _dense_order(t: Tensor) -> Optional[list]:
    """``[(size, memory stride, logical stride)]`` outermost first if ``t`` is dense in some
    dim order (channels_last, a transposed matrix, ...); None otherwise."""
    logical = [1] * t.dim()
    for d in range(t.dim() - 2, -1, -1):
        logical[d] = logical[d + 1] * t.shape[d + 1]
    dims = sorted((d for d in range(t.dim()) if t.shape[d] != 1), key=lambda d: -t.stride(d))
    expected = 1
    for d in reversed(dims):
        if t.stride(d) != expected:
            return None
        expected *= t.shape[d]
    return [(t.shape[d], t.stride(d), logical[d]) for d in dims]


def _stage(elems: List[list], group: List[int], written: Sequence[int]):
    """Operands the kernel can index, per slot, for the tensors in ``group``.

    Returns ``(cols, orders, copy_back)``: ``orders[j]`` is None (contiguous) or the dense
    permuted order shared by all of tensor ``j``'s operands; operands that fit neither are
    replaced by contiguous copies, and ``copy_back`` lists the written ones as (original, copy).
    """
    cols: List[list] = [[] for _ in elems]
    orders: list = []
    copy_back: list = []
    for i in group:
        ops = [slot[i] for slot in elems]
        order = None
        if not all(t.is_contiguous() for t in ops):
            first = ops[0]
            same = all(t.shape == first.shape and t.stride() == first.stride() for t in ops)
            order = _dense_order(first) if same else None
            if order is None:  # an odd layout: run on contiguous copies (one extra pass each)
                staged = []
                for s, t in enumerate(ops):
                    c = t.contiguous()
                    if c is not t and s in written:
                        copy_back.append((t, c))
                    staged.append(c)
                ops = staged
        for s, t in enumerate(ops):
            cols[s].append(t)
        orders.append(order)
    return cols, orders, copy_back


class _Plan:
    """The device tables of one launch: one row per tensor, one entry per block."""

    __slots__ = ("table", "blocks", "nblocks", "width", "aligned", "ndim", "captured")

    def __init__(self, cols, rows, orders, group, device):
        s = len(cols) + len(rows)
        self.ndim = max((len(o) for o in orders if o is not None), default=0)
        if any(o is not None for o in orders):
            self.ndim = max(self.ndim, 1)  # contiguous rows in a permuted launch use one dim
        self.width = s + 4 + 3 * self.ndim
        table, blocks = [], []
        aligned = True
        for j, i in enumerate(group):
            first = cols[0][j]
            n = first.numel()
            addrs = [c[j].data_ptr() for c in cols]
            aligned = aligned and all(a % 16 == 0 for a in addrs)
            rows_per = max(n // max(first.shape[0], 1), 1) if first.dim() else 1
            entry = addrs + [r[j].data_ptr() for r in rows] + [n, len(blocks), rows_per, i]
            order = orders[j]
            if self.ndim:
                dims = order if order is not None else [(n, 1, 1)]
                dims = list(dims) + [(1, 1, 0)] * (self.ndim - len(dims))
                entry += [v for dim in dims for v in dim]
            table.append(entry)
            blocks += [j] * triton.cdiv(n, BLOCK_SIZE)
        self.aligned = aligned
        self.nblocks = len(blocks)
        self.table = _to_device(torch.tensor(table, dtype=torch.int64).reshape(-1), device)
        self.blocks = _to_device(torch.tensor(blocks, dtype=torch.int32), device)
        self.captured = False  # set once a CUDA graph captured a launch reading these tables


_plans: Dict[tuple, _Plan] = {}
_MAX_PLANS = 512  # oldest dropped first; a plan is a few bytes per tensor and per block


def _plan(cols, rows, orders, group) -> _Plan:
    """The cached tables for these exact tensors (same addresses, shapes and strides)."""
    first = cols[0]
    key = (
        first[0].device,
        len(cols),
        len(rows),
        tuple(group),
        tuple((t.shape, t.stride()) for t in first),
        tuple(t.data_ptr() for c in (*cols, *rows) for t in c),
        tuple(o is not None for o in orders),
    )
    plan = _plans.get(key)
    if plan is None:
        plan = _Plan(cols, rows, orders, group, first[0].device)
        if len(_plans) >= _MAX_PLANS:
            # Drop the oldest plan no CUDA graph may still read (captured ones stay).
            old = next((k for k, v in _plans.items() if not v.captured), None)
            if old is not None:
                del _plans[old]
        _plans[key] = plan
    if first[0].is_cuda and torch.cuda.is_current_stream_capturing():
        plan.captured = True
    return plan


def _launch(
    kernel,
    elems: List[list],
    rows: Sequence[list] = (),
    written: Sequence[int] = (),
    keys: Optional[Sequence[int]] = None,
    stats: Optional[list] = None,
    counts: Optional[Tensor] = None,
    scalars: tuple = (),
    **meta,
) -> None:
    """Run ``kernel`` over every non-empty tensor: one launch per dtype combination (normally
    exactly one). ``elems``: lists of same-shaped operands (slot 0 defines the shape); ``rows``:
    lists of per-output-unit vectors; ``written``: the element slots the kernel writes;
    ``keys``: one int per tensor; ``stats``: per tensor a list of 0-d float32 device tensors;
    ``counts``: an int64 device tensor indexed by position in the caller's list."""
    elems = [list(e) for e in elems]
    rows = [list(r) for r in rows]
    present = [i for i, t in enumerate(elems[0]) if t.numel()]
    if not present:
        return
    groups: Dict[tuple, List[int]] = {}
    for i in present:
        groups.setdefault(tuple(s[i].dtype for s in (*elems, *rows)), []).append(i)
    for group in groups.values():
        cols, orders, copy_back = _stage(elems, group, written)
        rcols = [[r[i].contiguous() for i in group] for r in rows]
        plan = _plan(cols, rcols, orders, group)
        device = cols[0][0].device
        key_t = plan.table if keys is None else _keys_tensor([keys[i] for i in group], device)
        stat_t = plan.table if stats is None else torch.stack([v for i in group for v in stats[i]])
        count_t = plan.table if counts is None else counts
        witnesses = [c[0] for c in cols] + [r[0] for r in rcols]
        with _on(device):
            kernel[(plan.nblocks,)](
                plan.table, plan.blocks, key_t, stat_t, count_t, *witnesses, *scalars,
                W=plan.width, BLOCK=BLOCK_SIZE, ALIGNED=plan.aligned, NDIM=plan.ndim,
                **meta, **_LAUNCH,
            )  # fmt: skip
        for original, copy in copy_back:
            original.copy_(copy)


def _on(device: torch.device):
    """Launch on the tensors' GPU (Triton launches on the current device)."""
    if device.type == "cuda" and device.index is not None:
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _delegate(*lists: Tensors) -> bool:
    """Whether these tensors go to ``torch_backend`` (float64; CUDA tensors when interpreting)."""
    for ts in lists:
        for t in ts:
            if t.dtype not in _KERNEL_DTYPES or (INTERPRETED and t.device.type != "cpu"):
                return True
    return False


# ---------------------------------------------------------------------------------------------
# fuzzy_scale_: g *= p
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fuzzy_body(g_ptr, p_ptr, offs, n, MASKED: tl.constexpr):
    if MASKED:
        mask = offs < n
    else:
        mask = None
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    tl.store(g_ptr + offs, _round((g * p), g_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _fuzzy_kernel(
    tab, blocks, keys, stats, counts, G0, P0,
    W: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr, NDIM: tl.constexpr,
):  # fmt: skip
    t, row, n, offs, full = _tile(tab, blocks, W, 2, BLOCK)
    g_ptr = _addr(row, 0, G0, ALIGNED)
    p_ptr = _addr(row, 1, P0, ALIGNED)
    if full:  # unmasked: lets Triton vectorise
        _fuzzy_body(g_ptr, p_ptr, offs, n, False)
    else:
        _fuzzy_body(g_ptr, p_ptr, offs, n, True)


def fuzzy_scale_(grads: Tensors, rates: Tensors) -> None:
    """``g *= p`` for every (grad, rates) pair."""
    grads, rates = list(grads), list(rates)
    if _delegate(grads, rates):
        return torch_backend.fuzzy_scale_(grads, rates)
    _launch(_fuzzy_kernel, [grads, rates], written=(0,))


# ---------------------------------------------------------------------------------------------
# crystallize_ and the fused bio_step_ (volume, fuzzy, crystallize in one pass)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _step_body(
    w_ptr, g_ptr, p_ptr, row, key, mean_aw, offs, n,
    base_lr, neg_stability, variability, thresh, damp,
    S: tl.constexpr, NDIM: tl.constexpr, VOLUME: tl.constexpr, FUZZY: tl.constexpr,
    CRYSTALLIZE: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    if MASKED:
        mask = offs < n
    else:
        mask = None
    GT: tl.constexpr = g_ptr.dtype.element_ty
    aw = tl.abs(tl.load(w_ptr + offs, mask=mask).to(tl.float32))
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    if VOLUME:
        m = base_lr * _exp(neg_stability * tl.math.div_rn(aw, aw + 1.0))
        z = tl.randn(key, _logical(row, offs, S, NDIM))
        g = _round(g * (m * tl.abs(1.0 + variability * z)), GT).to(tl.float32)  # as stored
    if FUZZY or CRYSTALLIZE:
        p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    if FUZZY:
        g = _round(g * p, GT).to(tl.float32)
    if VOLUME or FUZZY:
        tl.store(g_ptr + offs, _round(g, GT), mask=mask)
    if CRYSTALLIZE:
        ag = tl.abs(g)
        hit = (ag < thresh * aw) | (ag > mean_aw)  # |g|/|w| < t as |g| < t*|w|, like torch
        tl.store(
            p_ptr + offs, _round(tl.where(hit, p * damp, p), p_ptr.dtype.element_ty), mask=mask
        )


@triton.jit
def _step_kernel(
    tab, blocks, keys, stats, counts, W0, G0, P0,
    base_lr, neg_stability, variability, thresh, damp,
    W: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr, NDIM: tl.constexpr,
    VOLUME: tl.constexpr, FUZZY: tl.constexpr, CRYSTALLIZE: tl.constexpr,
):  # fmt: skip
    t, row, n, offs, full = _tile(tab, blocks, W, 3, BLOCK)
    w_ptr = _addr(row, 0, W0, ALIGNED)
    g_ptr = _addr(row, 1, G0, ALIGNED)
    p_ptr = _addr(row, 2, P0, ALIGNED)
    key = 0
    if VOLUME:
        key = tl.load(keys + t)
    mean_aw = 0.0
    if CRYSTALLIZE:
        mean_aw = tl.load(stats + t)  # torch_backend.abs_means, computed on the device
    if full:
        _step_body(
            w_ptr, g_ptr, p_ptr, row, key, mean_aw, offs, n,
            base_lr, neg_stability, variability, thresh, damp,
            3, NDIM, VOLUME, FUZZY, CRYSTALLIZE, False,
        )  # fmt: skip
    else:
        _step_body(
            w_ptr, g_ptr, p_ptr, row, key, mean_aw, offs, n,
            base_lr, neg_stability, variability, thresh, damp,
            3, NDIM, VOLUME, FUZZY, CRYSTALLIZE, True,
        )  # fmt: skip


def _step(weights, grads, rates, keys, volume, fuzzy, crystallize, lr, s, var, thresh, damp):
    stats = None
    if crystallize:
        stats = [[m] for m in torch_backend.abs_means(weights)]
    written = ((1,) if volume or fuzzy else ()) + ((2,) if crystallize else ())
    _launch(
        _step_kernel, [weights, grads, rates], written=written,
        keys=list(keys) if volume else None, stats=stats,
        scalars=(float(lr), -float(s), float(var), float(thresh), float(damp)),
        VOLUME=bool(volume), FUZZY=bool(fuzzy), CRYSTALLIZE=bool(crystallize),
    )  # fmt: skip


def crystallize_(
    weights: Tensors, grads: Tensors, rates: Tensors, crystal_thresh: float, dampening: float
) -> None:
    """``mask = (|g|/|w| < crystal_thresh) | (|g| > mean|w|)``; ``p[mask] *= dampening``."""
    weights, grads, rates = list(weights), list(grads), list(rates)
    if _delegate(weights, grads, rates):
        return torch_backend.crystallize_(weights, grads, rates, crystal_thresh, dampening)
    _step(weights, grads, rates, None, False, False, True, 0.0, 0.0, 0.0, crystal_thresh, dampening)


def volume_scale_(
    weights: Tensors,
    grads: Tensors,
    keys: Sequence[int],
    base_lr: float,
    stability_factor: float,
    lr_variability: float,
) -> None:
    """``g *= |N(m, lr_variability*m)|``, ``m = base_lr*exp(-stability_factor*|w|/(|w|+1))``.

    Philox: ``z = tl.randn(key, i)``.
    """
    weights, grads = list(weights), list(grads)
    if _delegate(weights, grads):
        return torch_backend.volume_scale_(
            weights, grads, keys, base_lr, stability_factor, lr_variability
        )
    # The rates slot is unused (FUZZY and CRYSTALLIZE off): the grads stand in for it.
    _step(
        weights, grads, grads, keys, True, False, False,
        base_lr, stability_factor, lr_variability, 0.0, 1.0,
    )  # fmt: skip


def bio_step_(
    weights: Tensors,
    grads: Tensors,
    rates: Tensors,
    keys: Sequence[int],
    volume: bool,
    fuzzy: bool,
    crystallize: bool,
    base_lr: float,
    stability_factor: float,
    lr_variability: float,
    crystal_thresh: float,
    dampening: float,
) -> None:
    """Volume scaling, fuzzy scaling and crystallization (each optional) in ONE pass over
    memory; equal to the separate ops called in that order with the same key (the gradient is
    rounded to its dtype between the stages, as the separate ops store it)."""
    weights, grads, rates = list(weights), list(grads), list(rates)
    if _delegate(weights, grads, rates):
        return torch_backend.bio_step_(
            weights, grads, rates, keys, volume, fuzzy, crystallize, base_lr,
            stability_factor, lr_variability, crystal_thresh, dampening,
        )  # fmt: skip
    if not (volume or fuzzy or crystallize):
        return
    _step(
        weights, grads, rates, keys, volume, fuzzy, crystallize,
        base_lr, stability_factor, lr_variability, crystal_thresh, dampening,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# rejuvenate_: Bernoulli + log-normal magnitude + random sign, replaced count on the device
# ---------------------------------------------------------------------------------------------


@triton.jit
def _rejuvenate_body(
    w_ptr, row, key, std, mu, sigma, neg_dre, counts, out_index, offs, n,
    NDIM: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    if MASKED:
        mask = offs < n
    else:
        mask = None
    w = tl.load(w_ptr + offs, mask=mask).to(tl.float32)
    r0, r1, r2, r3 = tl.randint4x(key, _logical(row, offs, 1, NDIM))
    u_replace = uint_to_uniform_float(r0)
    u_sign = uint_to_uniform_float(r1)
    u1, u2 = uint_to_uniform_float(r2), uint_to_uniform_float(r3)
    normal, _ = pair_uniform_to_normal(u1, u2)
    replace = u_replace < _exp(tl.math.div_rn(neg_dre * tl.abs(w), std))
    magnitude = _exp(mu + sigma * normal)
    new = _clamp(tl.where(u_sign < 0.5, magnitude, -magnitude), -1.0, 1.0)
    tl.store(w_ptr + offs, _round(tl.where(replace, new, w), w_ptr.dtype.element_ty), mask=mask)
    hits = replace & (offs < n)  # masked-off lanes hold junk draws: never count them
    tl.atomic_add(counts + out_index, tl.sum(hits.to(tl.int64), axis=0), sem="relaxed")


@triton.jit
def _rejuvenate_kernel(
    tab, blocks, keys, stats, counts, W0, neg_dre,
    W: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr, NDIM: tl.constexpr,
):  # fmt: skip
    t, row, n, offs, full = _tile(tab, blocks, W, 1, BLOCK)
    w_ptr = _addr(row, 0, W0, ALIGNED)
    key = tl.load(keys + t)
    std = tl.load(stats + 3 * t)  # torch_backend.rejuvenation_stats, on the device
    mu = tl.load(stats + 3 * t + 1)
    sigma = tl.load(stats + 3 * t + 2)
    out_index = tl.load(row + 4)  # position in the caller's list
    if full:
        _rejuvenate_body(
            w_ptr, row, key, std, mu, sigma, neg_dre, counts, out_index, offs, n, NDIM, False
        )
    else:
        _rejuvenate_body(
            w_ptr, row, key, std, mu, sigma, neg_dre, counts, out_index, offs, n, NDIM, True
        )


def _zero_counts(weights: list) -> Tensor:
    if not weights:
        return torch.zeros(0, dtype=torch.int64)
    return torch.zeros(len(weights), dtype=torch.int64, device=weights[0].device)


def rejuvenate_(weights: Tensors, keys: Sequence[int], dre: float) -> Tensor:
    """Replace weights at random, most likely where ``|w|`` is small relative to ``std(w)``
    (formula in ``torch_backend.rejuvenate_``). Philox: ``r0`` decides, ``r1 < 0.5`` is a
    positive sign, ``n`` is the first Box-Muller normal of ``(r2, r3)``. Returns the number of
    replaced weights per tensor (int64, on the device; counted with atomics in the kernel)."""
    weights = list(weights)
    if _delegate(weights):
        return torch_backend.rejuvenate_(weights, keys, dre)
    torch_backend.clean_weights_(weights)
    counts = _zero_counts(weights)
    stats = [list(torch_backend.rejuvenation_stats(w)) if w.numel() else [] for w in weights]
    _launch(
        _rejuvenate_kernel, [weights], written=(0,), keys=list(keys), stats=stats,
        counts=counts, scalars=(-float(dre),),
    )  # fmt: skip
    return counts


@triton.jit
def _legacy_body(
    w_ptr, row, key, max_aw, scale, counts, out_index, offs, n,
    NDIM: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    if MASKED:
        mask = offs < n
    else:
        mask = None
    w = tl.load(w_ptr + offs, mask=mask).to(tl.float32)
    r0, r1, r2, _ = tl.randint4x(key, _logical(row, offs, 1, NDIM))
    u0, u1 = uint_to_uniform_float(r0), uint_to_uniform_float(r1)
    normal, _ = pair_uniform_to_normal(u0, u1)
    replace = tl.abs(w) < tl.abs(normal * scale)
    new = (2.0 * uint_to_uniform_float(r2) - 1.0) * max_aw
    tl.store(w_ptr + offs, _round(tl.where(replace, new, w), w_ptr.dtype.element_ty), mask=mask)
    hits = replace & (offs < n)
    tl.atomic_add(counts + out_index, tl.sum(hits.to(tl.int64), axis=0), sem="relaxed")


@triton.jit
def _legacy_kernel(
    tab, blocks, keys, stats, counts, W0,
    W: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr, NDIM: tl.constexpr,
):  # fmt: skip
    t, row, n, offs, full = _tile(tab, blocks, W, 1, BLOCK)
    w_ptr = _addr(row, 0, W0, ALIGNED)
    key = tl.load(keys + t)
    max_aw = tl.load(stats + 2 * t)
    scale = tl.load(stats + 2 * t + 1)  # max|w| / dre as torch computes it
    out_index = tl.load(row + 4)
    if full:
        _legacy_body(w_ptr, row, key, max_aw, scale, counts, out_index, offs, n, NDIM, False)
    else:
        _legacy_body(w_ptr, row, key, max_aw, scale, counts, out_index, offs, n, NDIM, True)


def rejuvenate_legacy_(weights: Tensors, keys: Sequence[int], dre: float) -> Tensor:
    """The original published rule (``torch_backend.rejuvenate_legacy_``): threshold
    ``|N(0, max|w|/dre)|`` from the Box-Muller normal of ``(r0, r1)``, new value
    ``(2*r2 - 1)*max|w|``. Returns the replaced count per tensor (int64, on the device)."""
    weights = list(weights)
    if _delegate(weights):
        return torch_backend.rejuvenate_legacy_(weights, keys, dre)
    stats = []
    for w in weights:
        w.nan_to_num_(nan=0.0)
        max_aw = torch_backend._upcast(w).abs().amax() if w.numel() else None
        stats.append([max_aw, max_aw / dre] if w.numel() else [])
    counts = _zero_counts(weights)
    _launch(_legacy_kernel, [weights], written=(0,), keys=list(keys), stats=stats, counts=counts)
    return counts


# ---------------------------------------------------------------------------------------------
# Rate updates: init, temporal, weight-adaptive, activity
# ---------------------------------------------------------------------------------------------

_RATE_MODES = {"baseline": 0, "uniform": 1, "normal": 2, "lognormal": 3}


@triton.jit
def _init_body(
    p_ptr, row, key, mode, nu, shift, lo, hi, offs, n, NDIM: tl.constexpr, MASKED: tl.constexpr
):
    if MASKED:
        mask = offs < n
    else:
        mask = None
    idx = _logical(row, offs, 1, NDIM)
    # `mode` is a runtime scalar (one compiled kernel for every distribution; a uniform branch)
    if mode == 0:
        value = tl.full(offs.shape, 1.0, tl.float32)  # baseline: no clamp, as torch's fill_
    elif mode == 1:
        value = _clamp(1.0 + (2.0 * tl.rand(key, idx) - 1.0) * nu, lo, hi)
    elif mode == 2:
        value = _clamp(1.0 + nu * tl.randn(key, idx), lo, hi)
    else:
        value = _clamp(_exp(shift + nu * tl.randn(key, idx)), lo, hi)
    tl.store(p_ptr + offs, _round(value, p_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["mode"])  # one compiled kernel for all four modes
def _init_kernel(
    tab, blocks, keys, stats, counts, P0, mode, nu, shift, lo, hi,
    W: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr, NDIM: tl.constexpr,
):  # fmt: skip
    t, row, n, offs, full = _tile(tab, blocks, W, 1, BLOCK)
    p_ptr = _addr(row, 0, P0, ALIGNED)
    key = tl.load(keys + t)  # baseline gets a dummy table here and never uses it
    if full:
        _init_body(p_ptr, row, key, mode, nu, shift, lo, hi, offs, n, NDIM, False)
    else:
        _init_body(p_ptr, row, key, mode, nu, shift, lo, hi, offs, n, NDIM, True)


def rates_init_(
    rates: Tensors, keys: Sequence[int], distribution: str, nu: float, lo: float, hi: float
) -> None:
    """Initial rates, clamped to ``[lo, hi]`` (formulas in ``torch_backend.rates_init_``).

    baseline/uniform/normal/lognormal run here (``tl.rand``/``tl.randn``); gamma and beta, and
    unknown names (for the error), go to ``torch_backend.rates_init_``.
    """
    rates = list(rates)
    mode = _RATE_MODES.get(distribution)
    if mode is None or _delegate(rates):
        return torch_backend.rates_init_(rates, keys, distribution, nu, lo, hi)
    nu = float(nu)
    _launch(
        _init_kernel, [rates], written=(0,), keys=None if mode == 0 else list(keys),
        scalars=(mode, nu, -0.5 * nu * nu, float(lo), float(hi)),
    )  # fmt: skip


@triton.jit
def _temporal_body(
    p_ptr, row, key, decay, noise, lo, hi, offs, n, NDIM: tl.constexpr, MASKED: tl.constexpr
):
    if MASKED:
        mask = offs < n
    else:
        mask = None
    value = 1.0 + (tl.load(p_ptr + offs, mask=mask).to(tl.float32) - 1.0) * decay
    if noise != 0.0:  # a runtime (uniform) branch: no draw on the noise-free updates
        value = value + noise * (2.0 * tl.rand(key, _logical(row, offs, 1, NDIM)) - 1.0)
    tl.store(p_ptr + offs, _round(_clamp(value, lo, hi), p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _temporal_kernel(
    tab, blocks, keys, stats, counts, P0, decay, noise, lo, hi,
    W: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr, NDIM: tl.constexpr,
):  # fmt: skip
    t, row, n, offs, full = _tile(tab, blocks, W, 1, BLOCK)
    p_ptr = _addr(row, 0, P0, ALIGNED)
    key = tl.load(keys + t)  # without noise: a dummy table, never used
    if full:
        _temporal_body(p_ptr, row, key, decay, noise, lo, hi, offs, n, NDIM, False)
    else:
        _temporal_body(p_ptr, row, key, decay, noise, lo, hi, offs, n, NDIM, True)


def temporal_update_(
    rates: Tensors,
    keys: Optional[Sequence[int]],
    decay: float,
    noise: float,
    lo: float,
    hi: float,
) -> None:
    """``p = clamp(1 + (p-1)*decay + noise*(2U-1), lo, hi)``; no draw when ``noise == 0``.

    Philox: ``U = tl.rand(key, i)``.
    """
    rates = list(rates)
    if _delegate(rates):
        return torch_backend.temporal_update_(rates, keys, decay, noise, lo, hi)
    noisy = noise != 0.0
    assert keys is not None or not noisy, "temporal_update_ needs keys when noise is drawn"
    _launch(
        _temporal_kernel, [rates], written=(0,), keys=list(keys) if noisy else None,
        scalars=(float(decay), float(noise), float(lo), float(hi)),
    )  # fmt: skip


@triton.jit
def _adaptive_body(
    p_ptr, w_ptr, row, key, denom, nu, lo, hi, offs, n,
    NDIM: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    if MASKED:
        mask = offs < n
    else:
        mask = None
    aw = tl.abs(tl.load(w_ptr + offs, mask=mask).to(tl.float32))
    scale = _clamp(2.0 - tl.math.div_rn(aw, denom), 0.5, 1.5)
    u = tl.rand(key, _logical(row, offs, 2, NDIM))
    value = _clamp(1.0 + (2.0 * u - 1.0) * nu * scale, lo, hi)
    tl.store(p_ptr + offs, _round(value, p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adaptive_kernel(
    tab, blocks, keys, stats, counts, P0, W0, nu, lo, hi,
    W: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr, NDIM: tl.constexpr,
):  # fmt: skip
    t, row, n, offs, full = _tile(tab, blocks, W, 2, BLOCK)
    p_ptr = _addr(row, 0, P0, ALIGNED)
    w_ptr = _addr(row, 1, W0, ALIGNED)
    key = tl.load(keys + t)
    denom = tl.load(stats + t)  # mean|w| + 1e-8, from torch on the device
    if full:
        _adaptive_body(p_ptr, w_ptr, row, key, denom, nu, lo, hi, offs, n, NDIM, False)
    else:
        _adaptive_body(p_ptr, w_ptr, row, key, denom, nu, lo, hi, offs, n, NDIM, True)


def weight_adaptive_(
    rates: Tensors, weights: Tensors, keys: Sequence[int], nu: float, lo: float, hi: float
) -> None:
    """``p = clamp(1 + (2U-1)*nu*clamp(2 - |w|/(mean|w| + 1e-8), 0.5, 1.5), lo, hi)``.

    Philox: ``U = tl.rand(key, i)``.
    """
    rates, weights = list(rates), list(weights)
    if _delegate(rates, weights):
        return torch_backend.weight_adaptive_(rates, weights, keys, nu, lo, hi)
    stats = [[m + 1e-8] for m in torch_backend.abs_means(weights)]
    _launch(
        _adaptive_kernel, [rates, weights], written=(0,), keys=list(keys), stats=stats,
        scalars=(float(nu), float(lo), float(hi)),
    )  # fmt: skip


@triton.jit
def _activity_body(
    p_ptr, c_ptr, row, key, mean_c, denom, nu, lo, hi, offs, n,
    NDIM: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    if MASKED:
        mask = offs < n
    else:
        mask = None
    idx = _logical(row, offs, 2, NDIM)
    c = tl.load(c_ptr + _row_of(row, idx, 2), mask=mask).to(tl.float32)
    ratio = tl.where(mean_c > 0, tl.math.div_rn(c, denom), 1.0)
    factor = 2.0 - _clamp(1.0 + (ratio - 1.0) * 0.1, 0.8, 1.2)
    new = _clamp(1.0 + (2.0 * tl.rand(key, idx) - 1.0) * nu * factor, lo, hi)
    tl.store(p_ptr + offs, _round(new, p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _activity_kernel(
    tab, blocks, keys, stats, counts, P0, C0, nu, lo, hi,
    W: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr, NDIM: tl.constexpr,
):  # fmt: skip
    t, row, n, offs, full = _tile(tab, blocks, W, 2, BLOCK)
    p_ptr = _addr(row, 0, P0, ALIGNED)
    c_ptr = tl.load(row + 1).to(C0.dtype)  # per-unit counts: gathered, no alignment hint
    key = tl.load(keys + t)
    mean_c = tl.load(stats + 2 * t)
    denom = tl.load(stats + 2 * t + 1)  # mean(c).clamp_min(1e-30), as torch computes it
    if full:
        _activity_body(p_ptr, c_ptr, row, key, mean_c, denom, nu, lo, hi, offs, n, NDIM, False)
    else:
        _activity_body(p_ptr, c_ptr, row, key, mean_c, denom, nu, lo, hi, offs, n, NDIM, True)


def activity_update_(
    rates: Tensors, counts: Tensors, keys: Sequence[int], nu: float, lo: float, hi: float
) -> None:
    """Redraw the rates from the activity of their output units (rows); formula in
    ``torch_backend.activity_update_``. Philox: ``U = tl.rand(key, i)``."""
    rates, counts = list(rates), list(counts)
    if _delegate(rates):
        return torch_backend.activity_update_(rates, counts, keys, nu, lo, hi)
    stats = []
    for p, c in zip(rates, counts):
        mean_c = c.to(torch.float32).mean() if p.numel() else None
        stats.append([mean_c, mean_c.clamp_min(1e-30)] if p.numel() else [])
    _launch(
        _activity_kernel, [rates], rows=[counts], written=(0,), keys=list(keys), stats=stats,
        scalars=(float(nu), float(lo), float(hi)),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# dale_enforce_: w = relu(w * sign) * sign, one sign per output unit
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dale_body(w_ptr, s_ptr, row, offs, n, NDIM: tl.constexpr, MASKED: tl.constexpr):
    if MASKED:
        mask = offs < n
    else:
        mask = None
    unit = _row_of(row, _logical(row, offs, 2, NDIM), 2)
    w = tl.load(w_ptr + offs, mask=mask).to(tl.float32)
    s = tl.load(s_ptr + unit, mask=mask).to(tl.float32)
    out = tl.maximum(w * s, 0.0, propagate_nan=tl.PropagateNan.ALL) * s
    tl.store(w_ptr + offs, _round(out, w_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dale_kernel(
    tab, blocks, keys, stats, counts, W0, S0,
    W: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr, NDIM: tl.constexpr,
):  # fmt: skip
    t, row, n, offs, full = _tile(tab, blocks, W, 2, BLOCK)
    w_ptr = _addr(row, 0, W0, ALIGNED)
    s_ptr = tl.load(row + 1).to(S0.dtype)  # per-unit signs: gathered, no alignment hint
    if full:
        _dale_body(w_ptr, s_ptr, row, offs, n, NDIM, False)
    else:
        _dale_body(w_ptr, s_ptr, row, offs, n, NDIM, True)


def dale_enforce_(weights: Tensors, signs: Tensors) -> None:
    """``w = relu(w * sign) * sign`` with one sign (+1 or -1) per output unit (weight row)."""
    weights, signs = list(weights), list(signs)
    if _delegate(weights, signs):
        return torch_backend.dale_enforce_(weights, signs)
    _launch(_dale_kernel, [weights], rows=[signs], written=(0,))
