"""How the Triton backend launches: device helpers every kernel uses, the launch table, and the
one launch per (op, layer group).

**Multi-tensor launches.** A call with a list of ``L`` tensors is ONE kernel launch over a flat
grid of ``BLOCK_SIZE`` blocks covering every tensor. A small int64 device table has one row per
tensor, laid out as:

==========================  ===============================================================
column                      content
==========================  ===============================================================
``0 .. S-1``                data pointers of the operands: first the elementwise ones (same
                            shape as the weight), then per-output-unit vectors (signs, counts)
``S + NUMEL``               the tensor's element count
``S + FIRST_BLOCK``         the first grid block of this tensor
``S + ROW_LEN``             elements per output unit (weight row)
``S + LIST_INDEX``          the tensor's position in the caller's list (where counts go)
``S + DIMS + 3*d + SIZE``   only for permuted layouts (``NDIM > 0``), per dim ``d`` outermost
``... + MEM_STRIDE``        first: size, stride in memory, stride in the logical row-major
``... + LOGICAL_STRIDE``    order, to map a memory position to the logical index
==========================  ===============================================================

A second array maps each block to its table row. Both depend only on the tensors' addresses
and shapes, so they are cached and steady-state calls do not rebuild them; building one never
reads device memory on the host (the H2D copy goes through pinned memory, ``non_blocking``).
Per call, only the keys travel, each with its tensor's Philox counter offset (0 unless the
tensor is the local shard of a sharded layer): one H2D copy from a pinned buffer the plan
keeps (:meth:`Plan.keys`; fill kernels while a CUDA graph is being captured; derived on the
device in the ``capturable`` mode, :mod:`.keys`). Per-layer statistics are computed on the
device, by a ``prelude`` over the same table into the plan's buffers (:mod:`.reduce`: two
launches for the group) or, for the other ops and sharded groups, by
:mod:`~bio_transformations.kernels.stats` and stacked into one tensor; the kernel reads them
through a pointer. A plan is never built during capture (:class:`CaptureError`), records the
streams that use it, and the cache evicts the least recently used one; a call in which a
written tensor shares memory with another row raises :class:`AliasError`.

**Arithmetic** runs in float32 (load, upcast, compute, round back once) in the order the torch
backend writes it, with FMA contraction off, correctly rounded division (``div_rn``) and CUDA's
own ``expf`` (libdevice), so results agree bit for bit where no transcendental function is
involved and within a few ulp otherwise.

**Layouts**: contiguous tensors and tensors dense in a permuted order (``channels_last``
convolution weights, ``.t()`` of a matrix, ...) whose operands share one layout run in place;
anything else runs on a contiguous copy that is copied back.

**Tiles**: a block that lies wholly inside its tensor runs unmasked (so Triton can vectorise);
the tail block of each tensor runs masked. ``draws.for_block`` makes that choice for every
kernel, per block: also masked (scalar) for a row whose operands are not 16-byte aligned when
the launch is not all aligned (``ALIGNED`` False), and for a block that draws scattered.

**Per row, not per launch**: ``NDIM`` and ``ALIGNED`` are one value per launch (the compiled
variant), but a contiguous row of an ``NDIM > 0`` launch (its first dim entry is
``(numel, 1, 1)``) skips the index math and draws grouped, and an aligned row of an unaligned
launch keeps its 128-bit accesses: one uniform branch per block, read from the table.
``INDEX32`` (every tensor below :data:`INDEX32_LIMIT` elements) makes the offsets and index math
32-bit.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence

import torch
import triton
import triton.language as tl

from ..philox import to_signed64

Tensor = torch.Tensor
Tensors = Sequence[Tensor]


@triton.jit
def _probe():
    pass


#: Whether the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` when triton
#: decorated them; asked of triton itself, which parses the variable its own way).
INTERPRETED: bool = type(_probe).__name__ == "InterpretedFunction"
#: Elements per program.
BLOCK_SIZE = 1024
#: Dtypes the kernels handle; the dispatcher sends everything else to the torch backend.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NUM_WARPS = 4
_LAUNCH = dict(num_warps=_NUM_WARPS, enable_fp_fusion=False)  # no FMA: round like torch does

# Launch-table columns after the S pointer columns (see the module docstring).
NUMEL = tl.constexpr(0)
FIRST_BLOCK = tl.constexpr(1)
ROW_LEN = tl.constexpr(2)
LIST_INDEX = tl.constexpr(3)
DIMS = tl.constexpr(4)
SIZE = tl.constexpr(0)
MEM_STRIDE = tl.constexpr(1)
LOGICAL_STRIDE = tl.constexpr(2)
_HEADER = 4  # NUMEL, FIRST_BLOCK, ROW_LEN, LIST_INDEX
#: Largest element count of a tensor in an ``INDEX32`` launch (its last block's offsets
#: stay below 2**31).
INDEX32_LIMIT = 2**31 - 1 - 1024

# ---------------------------------------------------------------------------------------------
# Device-side helpers
# ---------------------------------------------------------------------------------------------

if INTERPRETED:

    @triton.jit
    def exp(x):
        return tl.exp(x)  # numpy's exp; the interpreter has no libdevice

    @triton.jit
    def fast_cos(x):
        return tl.cos(x)

    @triton.jit
    def fast_sin(x):
        return tl.sin(x)

    @triton.jit
    def fast_exp(x):
        return tl.exp(x)

    @triton.jit
    def log(x):
        return tl.log(x)

    @triton.jit
    def log1p(x):
        return tl.log(1.0 + x)  # float64 here: off by < 1e-16 relative where x is not tiny

    @triton.jit
    def sqrt(x):
        return tl.sqrt(x)

    @triton.jit
    def round_to(x, dtype: tl.constexpr):
        """``x.to(dtype)``, rounding to nearest even: the interpreter truncates to bfloat16."""
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + (((bits >> 16) & 1) + 0x7FFF)
            bits = tl.where(x != x, 0x7FC0, bits >> 16)  # NaN stays a quiet NaN, as in torch
            return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(dtype)

else:
    from triton.language.extra import libdevice

    @triton.jit
    def exp(x):
        return libdevice.exp(x)  # __nv_expf, what torch's CUDA exp calls (tl.exp is ex2.approx)

    # Fast forms, for random draws only (see draws.py for where and why).
    @triton.jit
    def fast_cos(x):
        return libdevice.fast_cosf(x)  # cos.approx.f32

    @triton.jit
    def fast_sin(x):
        return libdevice.fast_sinf(x)  # sin.approx.f32

    @triton.jit
    def fast_exp(x):
        return libdevice.fast_expf(x)  # ex2.approx.f32 of x * log2(e)

    # Precise forms in the argument's dtype (float64 in the statistics fits).
    @triton.jit
    def log(x):
        return libdevice.log(x)

    @triton.jit
    def log1p(x):
        return libdevice.log1p(x)

    @triton.jit
    def sqrt(x):
        return libdevice.sqrt(x)

    @triton.jit
    def round_to(x, dtype: tl.constexpr):
        """``x.to(dtype)`` (round to nearest even, like torch)."""
        return x.to(dtype)


@triton.jit
def clamp(x, lo, hi):
    # NaN stays NaN, as with torch.clamp (hardware min/max would drop it)
    x = tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(x, hi, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def tile(tab, blocks, W: tl.constexpr, S: tl.constexpr, BLOCK: tl.constexpr,
         INDEX32: tl.constexpr):  # fmt: skip
    """This program's table index, row, element count, memory offsets, first memory offset and
    whether its block is full. ``INDEX32`` (every tensor of the launch below ``2**31 - BLOCK``
    elements): the offsets, and the index math done on them, are 32-bit."""
    pid = tl.program_id(0)
    t = tl.load(blocks + pid).to(tl.int64)
    row = tab + t * W
    n = tl.load(row + S + NUMEL)
    first_block = tl.load(row + S + FIRST_BLOCK)
    if INDEX32:
        n = n.to(tl.int32)
        start = (pid - first_block.to(tl.int32)) * BLOCK
    else:
        start = (pid - first_block) * BLOCK  # int64: no overflow on huge tensors
    offs = start + tl.arange(0, BLOCK)
    return t, row, n, offs, start, start + BLOCK <= n


@triton.jit
def stream_of(keys, t):
    """Tensor ``t``'s Philox key and the global flat index of its first element (the shard's
    start; 0 unsharded): the key table holds one ``(key, first index)`` pair per tensor."""
    return tl.load(keys + 2 * t), tl.load(keys + 2 * t + 1)


@triton.jit
def operand(row, col: tl.constexpr, like, ALIGNED: tl.constexpr):
    """Elementwise operand ``col`` of this table row as a pointer of ``like``'s type."""
    ptr = tl.load(row + col).to(like.dtype)
    if ALIGNED:
        # The host checked it; lets Triton vectorise loads/stores (the hint must sit on the
        # pointer: on the loaded integer it is ignored).
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def per_unit(row, col: tl.constexpr, like):
    """Per-output-unit operand ``col`` (signs, counts): gathered, so no alignment hint."""
    return tl.load(row + col).to(like.dtype)


@triton.jit
def logical(row, offs, S: tl.constexpr, NDIM: tl.constexpr):
    """Flat row-major index of memory position ``offs`` (the RNG counter and the row source).

    Per row, not per launch: a contiguous row of an ``NDIM > 0`` launch (its first dim entry
    is the identity ``(numel, 1, 1)``) skips the index math, one uniform branch per block."""
    if NDIM > 0:
        if tl.load(row + S + DIMS + MEM_STRIDE) == 1:
            idx = offs
        else:
            idx = offs * 0
            for d in tl.static_range(NDIM):
                dim = row + S + DIMS + 3 * d
                size = tl.load(dim + SIZE).to(offs.dtype)
                stride = tl.load(dim + MEM_STRIDE).to(offs.dtype)
                idx += (offs // stride) % size * tl.load(dim + LOGICAL_STRIDE).to(offs.dtype)
    else:
        idx = offs
    return idx


def flat_offsets(tensors: Sequence[Tensor], spans) -> Optional[list]:
    """Per tensor the Philox counter offset of its shard (0 when unsharded), or None when no
    tensor is a shard; raises ``ValueError`` for a shard that is not one contiguous range of
    its layer's flat index (the caller then uses the torch backend)."""
    if spans is None:
        return None
    from ..shards import slab

    out = []
    for i, t in enumerate(tensors):
        where = slab(t, spans, i)
        start = 0 if where is None else where.flat_start
        if start is None:
            raise ValueError("shard is not a contiguous range of its layer")
        out.append(start)
    return out


@triton.jit
def unit_of(row, idx, S: tl.constexpr):
    """Output unit (weight row) of logical index ``idx``."""
    return idx // tl.load(row + S + ROW_LEN).to(idx.dtype)


# ---------------------------------------------------------------------------------------------
# Host side: layouts, cached tables, the one launch per group
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# Host side: layouts, cached tables, the one launch per group
# ---------------------------------------------------------------------------------------------


class CaptureError(RuntimeError):
    """A launch table would be built while a CUDA graph is being captured (warm up first)."""


class AliasError(ValueError):
    """Two tensors of one call share memory that one of them writes (they would race)."""


def _int64s(values: Sequence[int]) -> Tensor:
    """``values`` (any 64-bit patterns) as a CPU int64 tensor with the same bits."""
    try:
        return torch.tensor(values, dtype=torch.int64)
    except (OverflowError, RuntimeError, ValueError):  # >= 2**63: the int64 with its bits
        return torch.tensor([to_signed64(k) for k in values], dtype=torch.int64)


def capturing(device: torch.device) -> bool:
    """Whether the current CUDA stream is capturing a graph (False off CUDA)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _dense_order(t: Tensor) -> Optional[list]:
    """``[(size, memory stride, logical stride)]`` outermost first if ``t`` is dense in some
    dim order (channels_last, a transposed matrix, ...); None otherwise."""
    logical_strides = [1] * t.dim()
    for d in range(t.dim() - 2, -1, -1):
        logical_strides[d] = logical_strides[d + 1] * t.shape[d + 1]
    dims = sorted((d for d in range(t.dim()) if t.shape[d] != 1), key=lambda d: -t.stride(d))
    expected = 1
    for d in reversed(dims):
        if t.stride(d) != expected:
            return None
        expected *= t.shape[d]
    return [(t.shape[d], t.stride(d), logical_strides[d]) for d in dims]


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
        operands = [slot[i] for slot in elems]
        order = None
        if not all(t.is_contiguous() for t in operands):
            first = operands[0]
            same = all(t.shape == first.shape and t.stride() == first.stride() for t in operands)
            order = _dense_order(first) if same else None
            if order is None:  # an odd layout: run on contiguous copies (one extra pass each)
                staged = []
                for s, t in enumerate(operands):
                    c = t.contiguous()
                    if c is not t and s in written:
                        copy_back.append((t, c))
                    staged.append(c)
                operands = staged
        for s, t in enumerate(operands):
            cols[s].append(t)
        orders.append(order)
    return cols, orders, copy_back


def _extent(t: Tensor) -> tuple:
    """``[first byte, last byte + 1)`` of the memory ``t`` can touch."""
    span = 1 + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
    start = t.data_ptr()
    return start, start + span * t.element_size()


def check_aliases(cols: List[list], rows: Sequence[list], written: Sequence[int]) -> None:
    """Raise :class:`AliasError` when a tensor one row writes shares memory with any operand of
    another row (the same tensor twice in a list, tied weights, overlapping views): the rows
    of one launch run concurrently, so they would race on the shared elements."""
    spans = []
    for s, col in enumerate((*cols, *rows)):
        for j, t in enumerate(col):
            if t.numel():
                spans.append((*_extent(t), j, s < len(cols) and s in written))
    spans.sort()
    # Sweep: each span against the open ones it overlaps; only pairs from different rows
    # where one side is written are races.
    open_spans: list = []
    for start, end, j, writes in spans:
        open_spans = [o for o in open_spans if o[1] > start]
        for _, _, k, other_writes in open_spans:
            if k != j and (writes or other_writes):
                lo, hi = sorted((j, k))
                raise AliasError(
                    f"tensors {lo} and {hi} of one call share memory that the op writes (the "
                    "same tensor twice in a list, tied weights, or overlapping views); their "
                    "rows would race on the shared elements. Pass each tensor once."
                )
        open_spans.append((start, end, j, writes))


class Plan:
    """The device tables of one launch (one row per tensor, one entry per block) and the
    buffers that launch reuses every call (statistics, keys), allocated once.

    CUDA: the tables are copied from pinned host tensors the plan keeps (never freed while
    a copy may read them); the copy's stream is recorded with an event, and a launch on any
    other stream first waits for it and marks every device tensor of the plan as used there
    (``record_stream``), so the allocator never hands their memory out while it may be read.
    A call on another stream than the plan's previous call also waits for that stream's work
    (:meth:`use`): the per-call buffers (keys, statistics) are rewritten each call.
    """

    __slots__ = (
        "table", "blocks", "nblocks", "nrows", "width", "aligned", "ndim", "captured", "device",
        "index32", "buffers", "keep", "_host", "_ready", "_streams", "_last", "_key_slots",
    )  # fmt: skip

    def __init__(self, cols, rows, orders, group, device, written=()):
        check_aliases(cols, rows, written)
        s = len(cols) + len(rows)
        self.ndim = max((len(o) for o in orders if o is not None), default=0)
        if any(o is not None for o in orders):
            self.ndim = max(self.ndim, 1)  # contiguous rows in a permuted launch use one dim
        self.width = s + _HEADER + 3 * self.ndim
        table, blocks = [], []
        aligned = True
        for j, i in enumerate(group):
            first = cols[0][j]
            n = first.numel()
            addrs = [c[j].data_ptr() for c in cols]
            aligned = aligned and all(a % 16 == 0 for a in addrs)
            row_len = max(n // max(first.shape[0], 1), 1) if first.dim() else 1
            # NUMEL, FIRST_BLOCK, ROW_LEN, LIST_INDEX
            entry = addrs + [r[j].data_ptr() for r in rows] + [n, len(blocks), row_len, i]
            order = orders[j]
            if self.ndim:
                dims = order if order is not None else [(n, 1, 1)]
                dims = list(dims) + [(1, 1, 0)] * (self.ndim - len(dims))
                entry += [v for dim in dims for v in dim]  # SIZE, MEM_STRIDE, LOGICAL_STRIDE
            table.append(entry)
            blocks += [j] * triton.cdiv(n, BLOCK_SIZE)
        self.aligned = aligned
        # 32-bit offsets and index math when no tensor comes near 2**31 elements.
        self.index32 = all(cols[0][j].numel() <= INDEX32_LIMIT for j in range(len(group)))
        self.nblocks = len(blocks)
        self.nrows = len(group)
        self.device = device
        self.captured = False  # set once a CUDA graph captured a launch reading these tables
        self.buffers: Dict[object, Tensor] = {}
        self.keep: list = []  # objects the plan's device tables point into
        self._key_slots: list = []  # pinned key buffers and the events of their last copies
        host = [
            torch.tensor(table, dtype=torch.int64).reshape(-1),
            torch.tensor(blocks, dtype=torch.int32),
        ]
        if device.type != "cuda":
            self._host, self._ready, self._streams, self._last = (), None, None, None
            self.table, self.blocks = (t.to(device) for t in host)
            return
        self._host = tuple(t.pin_memory() for t in host)  # alive as long as the plan
        self.table, self.blocks = (t.to(device, non_blocking=True) for t in self._host)
        stream = torch.cuda.current_stream(device)
        self._ready = torch.cuda.Event()
        self._ready.record(stream)
        self._streams = {stream}
        self._last = stream  # the stream of the latest call

    def _device_tensors(self) -> list:
        return [self.table, self.blocks, *self.buffers.values()]

    def use(self) -> None:
        """Make the plan safe to use on the current stream (CUDA; nothing elsewhere); called
        before a call writes any of its buffers. On a stream other than the previous call's,
        wait for that stream's work (it may still read the buffers this call rewrites); the
        first time on a stream the plan was not made on, also wait for the table copy and
        record the stream on every device tensor of the plan."""
        if self._streams is None:
            return
        stream = torch.cuda.current_stream(self.device)
        if stream == self._last or torch.cuda.is_current_stream_capturing():
            # Under capture: torch.cuda.graph synchronized before capturing (the copy is
            # done), and a captured plan is never evicted (nor freed while a graph holds it).
            return
        stream.wait_stream(self._last)
        if stream not in self._streams:
            stream.wait_event(self._ready)
            for t in self._device_tensors():
                t.record_stream(stream)
            self._streams.add(stream)
        self._last = stream

    def buffer(self, name: str, numel: int, dtype: torch.dtype) -> Tensor:
        """A device buffer of this plan, allocated on first use and reused by every call (its
        contents are whatever the last call left)."""
        buf = self.buffers.get(name)
        if buf is None:
            if capturing(self.device):
                raise CaptureError(_CAPTURE_HELP)
            buf = self.buffers[name] = torch.empty(numel, dtype=dtype, device=self.device)
            for stream in self._streams or ():
                if stream != torch.cuda.current_stream(self.device):
                    buf.record_stream(stream)
        return buf

    def keys(self, values: Sequence[int]) -> Tensor:
        """``values`` (int64 bit patterns) in a device tensor for this call.

        CPU: written into the plan's own buffer. CUDA: written into one of the plan's pinned
        host buffers whose previous copy has finished (a new one is added when none has: the
        host never waits) and copied into the plan's device buffer on the current stream.
        While a CUDA graph is captured: fill kernels into a fresh tensor, so the graph holds
        no host memory and replays draw the captured keys (see the ``capturable`` mode for
        fresh keys per replay)."""
        n = len(values)
        host = _int64s(values)
        if self.device.type != "cuda":
            buf = self.buffer("keys", n, torch.int64)
            return buf.copy_(host)
        if capturing(self.device):
            out = torch.empty(n, dtype=torch.int64, device=self.device)
            for j, k in enumerate(values):
                out[j].fill_(to_signed64(k))
            return out
        slot = next((s for s in self._key_slots if s[1].query()), None)
        if slot is None:
            slot = [torch.empty(n, dtype=torch.int64, pin_memory=True), torch.cuda.Event()]
            self._key_slots.append(slot)
        slot[0].copy_(host)
        out = self.buffer("keys", n, torch.int64)
        out.copy_(slot[0], non_blocking=True)
        slot[1].record(torch.cuda.current_stream(self.device))
        return out


_CAPTURE_HELP = (
    "a Triton launch table would be built while a CUDA graph is being captured; run the same "
    "call once eagerly (with the same tensors) before capturing, so the capture reuses the "
    "cached table"
)

#: The cached plans, least recently used first.
_plans: "OrderedDict[tuple, Plan]" = OrderedDict()
_MAX_PLANS = 512  # a plan is a few bytes per tensor and per block


def _plan(cols, rows, orders, group, written=()) -> Plan:
    """The cached tables for these exact tensors (same addresses, shapes and strides)."""
    first = cols[0]
    device = first[0].device
    key = (
        device,
        len(cols),
        len(rows),
        tuple(written),
        tuple(group),
        tuple((t.shape, t.stride()) for c in cols for t in c),
        tuple(t.data_ptr() for c in (*cols, *rows) for t in c),
        tuple(o is not None for o in orders),
    )
    plan = _plans.get(key)
    if plan is None:
        if capturing(device):
            raise CaptureError(_CAPTURE_HELP)
        plan = Plan(cols, rows, orders, group, device, written)
        evict(_MAX_PLANS - 1)
        _plans[key] = plan
    else:
        _plans.move_to_end(key)
    if capturing(device):
        plan.captured = True
    return plan


def evict(keep: int) -> None:
    """Drop least-recently-used plans until at most ``keep`` remain, never one a CUDA graph
    captured (a replay reads its tables). A dropped plan's memory is reused only after the
    work queued on it finished: its tensors were recorded on every stream that read them,
    and an object that still holds the plan (a prepared step) keeps it alive."""
    for key in [k for k, p in _plans.items() if not p.captured]:
        if len(_plans) <= keep:
            break
        del _plans[key]


def _on(device: torch.device):
    """Launch on the tensors' GPU (Triton launches on the current device)."""
    if device.type == "cuda" and device.index is not None:
        return torch.cuda.device(device)
    return contextlib.nullcontext()


class Group:
    """One launch of a call: the tensors of one dtype combination, staged, and their plan."""

    __slots__ = ("index", "cols", "rcols", "plan", "copy_back")

    def __init__(self, elems: List[list], rows: List[list], index: List[int], written):
        self.index = index
        self.cols, orders, self.copy_back = _stage(elems, index, written)
        self.rcols = [[r[i].contiguous() for i in index] for r in rows]
        self.plan = _plan(self.cols, self.rcols, orders, index, written)


def groups(elems: List[list], rows: List[list], written: Sequence[int] = ()) -> List[Group]:
    """The launches of a call over ``elems``/``rows``: one per dtype combination of the
    non-empty tensors (normally exactly one)."""
    present = [i for i, t in enumerate(elems[0]) if t.numel()]
    by_dtype: Dict[tuple, List[int]] = {}
    for i in present:
        by_dtype.setdefault(tuple(s[i].dtype for s in (*elems, *rows)), []).append(i)
    return [Group(elems, rows, index, written) for index in by_dtype.values()]


def fire(kernel, group: Group, witnesses: list, optional: dict, scalars: tuple, meta: dict):
    """Start ``kernel`` over ``group``'s plan: ``witnesses`` are one tensor per slot (the kernel
    takes each pointer's element type from them), ``optional`` the declared optional inputs."""
    plan = group.plan
    plan.use()
    kernel[(plan.nblocks,)](
        plan.table, plan.blocks, *witnesses, *scalars, **optional,
        S=len(witnesses), W=plan.width, BLOCK=BLOCK_SIZE, ALIGNED=plan.aligned, NDIM=plan.ndim,
        INDEX32=plan.index32, **meta, **_LAUNCH,
    )  # fmt: skip


def launch(
    kernel,
    elems: List[list],
    rows: Sequence[list] = (),
    written: Sequence[int] = (),
    keys: Optional[Sequence[int]] = None,
    offsets: Optional[Sequence[int]] = None,
    stats: Optional[list] = None,
    counts: Optional[Tensor] = None,
    scalars: tuple = (),
    prelude: Optional[Callable[[Group], dict]] = None,
    **meta,
) -> None:
    """Run ``kernel`` over every non-empty tensor: one launch per dtype combination (normally
    exactly one).

    Args:
        elems: lists of same-shaped operands (slot 0 defines the shape).
        rows: lists of per-output-unit vectors.
        written: the element slots the kernel writes (copied back from staged copies).
        keys: one stream key per tensor (the kernel's ``keys`` argument; None if it draws none),
            or a :class:`~.keys.DeviceKeys` (``capturable`` mode: derived on the device).
        offsets: per tensor the global flat index of its first element, added to every Philox
            counter (a local shard of a sharded layer; None: all 0). The kernel's ``keys``
            holds ``(key, offset)`` pairs: tensor ``t`` reads ``keys[2t]`` and ``keys[2t+1]``.
        stats: per tensor a list of 0-d float32 device tensors (the kernel's ``stats``).
        counts: an int64 device tensor indexed by list position (the kernel's ``counts``).
        scalars: the kernel's scalar arguments after the operand witnesses.
        prelude: called with each launch's :class:`Group` before its kernel starts; returns
            kernel arguments it computed on the device (e.g. ``stats`` from the plan's own
            reduction over the same table), which replace the ones above.

    Raises:
        AliasError: a written tensor shares memory with another tensor of the call.
        CaptureError: a new table would be built while a CUDA graph is being captured.
    """
    elems = [list(e) for e in elems]
    rows = [list(r) for r in rows]
    for group in groups(elems, rows, written):
        index = group.index
        with _on(group.plan.device):
            group.plan.use()  # before this call writes any of the plan's buffers
        optional = {}  # only what this kernel declares; an absent input is passed as None
        if "keys" in kernel.arg_names:
            if keys is None:
                optional["keys"] = None
            elif hasattr(keys, "derive"):  # capturable: keys.DeviceKeys
                with _on(group.plan.device):
                    optional["keys"] = keys.derive(group.plan, index, offsets)
            else:  # (key, counter offset) per tensor, in one small copy
                pairs = [v for i in index for v in (keys[i], offsets[i] if offsets else 0)]
                optional["keys"] = group.plan.keys(pairs)
        if "stats" in kernel.arg_names:
            optional["stats"] = (
                None if stats is None else torch.stack([v for i in index for v in stats[i]])
            )
        if "counts" in kernel.arg_names:
            optional["counts"] = counts
        with _on(group.plan.device):
            if prelude is not None:
                optional.update(prelude(group))
            witnesses = [c[0] for c in group.cols] + [r[0] for r in group.rcols]
            fire(kernel, group, witnesses, optional, scalars, meta)
        for original, copy in group.copy_back:
            original.copy_(copy)
