"""The torch reference's other paths against the same formulas as ``test_reference_formulas``:
sharded statistics and draws, blocked statistics, and the chunked and packed CPU step.

* **Sharded layers** (FSDP2 hands each rank the rows of a layer): a shard group is simulated
  in one process (``shard_world``: one thread per rank, collectives through shared slots).
  The statistics of the shards, reduced over the group, must be the statistics of the whole
  layer (numpy in float64); an op run on every shard with its span must give the rows of the
  op run on the whole layer. Shards are uneven (``torch.chunk``'s layout), some are empty, and
  layers of one and two elements sit where a wrong count or degree of freedom shows.
* **Blocked statistics and the one-pass CPU step**: the chunk sizes (``STATS_CHUNK``,
  ``CPU_CHUNK``, ``PACK_BELOW``) are patched small, so multi-block sums, multi-chunk layers and
  packs of small layers are reached with small tensors, and the results are compared with the
  documented formulas written out in the tests.
"""

from __future__ import annotations

import math

import pytest
import test_reference_formulas as ref
import torch
from shard_world import dim0_bounds, dim0_shards, dim0_spans, gather_dim0, run_world

from bio_transformations.kernels import StepParams
from bio_transformations.kernels import rng as rng_helpers
from bio_transformations.kernels import stats as stat_helpers
from bio_transformations.kernels import torch_backend as tb
from bio_transformations.kernels.shards import Slab, Span

CPU = torch.device("cpu")
DAMPENING = ref.DAMPENING


@pytest.fixture(params=["torch", "philox"])
def rng(request, bio_settings):
    """Both random-number modes of the torch backend (``BIO_RNG``)."""
    bio_settings(rng=request.param)
    return request.param


@pytest.fixture
def small_chunks(monkeypatch):
    """Statistics in blocks of 64, CPU chunks of 96 elements, packs of layers below 200."""
    monkeypatch.setattr(stat_helpers, "STATS_CHUNK", 64)
    monkeypatch.setattr(tb, "CPU_CHUNK", 96)
    monkeypatch.setattr(tb, "PACK_BELOW", 200)


def layer_weights(dtype, seed=0):
    """Layers of several shapes: odd rows (uneven shards), one row (empty shards on the other
    ranks), one and two elements (count and degrees of freedom), empty; none degenerate."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(37, 29), (5, 3, 2), (1, 40), (1,), (2,), (0, 4), (300,)]
    out = []
    for shape in shapes:
        w = torch.randn(shape, generator=gen) * 0.2 + 0.05
        if w.numel() > 20:
            w.view(-1)[::17] = 0.0
        out.append(w.to(dtype))
    out[3].fill_(-0.375)
    out[4].copy_(torch.tensor([0.125, -0.5]))
    return out


def shard_lists(tensors, world):
    """Per rank, its rows of every tensor."""
    per_tensor = [dim0_shards(t, world) for t in tensors]
    return [[shards[r] for shards in per_tensor] for r in range(world)]


def compute(dtype):
    return ref.compute(dtype)


# ---------------------------------------------------------------------------------------------
# Sharded statistics: the group's statistics are the whole layer's
# ---------------------------------------------------------------------------------------------

WORLDS = [1, 2, 3]
STAT_DTYPES = [torch.float32, torch.float64, torch.float16]


@pytest.mark.parametrize("dtype", STAT_DTYPES, ids=str)
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("blocks", ["default", "small"])
def test_sharded_abs_means_and_gates(world, dtype, blocks, request):
    if blocks == "small":
        request.getfixturevalue("small_chunks")
    ws = layer_weights(dtype)
    gs = [torch.zeros_like(w) for w in ws]
    gs[0].view(-1)[-1] = 1e-3  # non-zero only in the last rows: every rank's gate opens
    gs[1].view(-1)[0] = float("nan")  # NaN counts as non-zero
    gs[2].view(-1)[7] = -2.0
    gs[6].copy_(torch.linspace(-1, 1, 300).to(dtype))  # many non-zero elements
    # gs[3], gs[4], gs[5]: all zero (or empty): the gate stays shut
    want_means = [ref.mean_abs64(w) for w in ws]
    want_gates = [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    ranks_w, ranks_g = shard_lists(ws, world), shard_lists(gs, world)

    def per_rank(r):
        return (
            stat_helpers.abs_means(ranks_w[r]),
            stat_helpers.grads_nonzero(ranks_g[r]),
            stat_helpers.crystallize_stats(ranks_w[r], ranks_g[r]),
            stat_helpers.crystallize_stats(ranks_w[r], None),
            stat_helpers.crystallize_stats(None, ranks_g[r]),
            stat_helpers.crystallize_stats(None, None),
        )

    results = run_world(world, per_rank)
    rtol = 1e-12 if dtype == torch.float64 else 1e-6
    for means, gates, both, only_w, only_g, neither in results:
        assert neither == ([], [])
        assert only_w[1] == [] and only_g[0] == []
        for got_means in (means, both[0], only_w[0]):
            assert len(got_means) == len(ws)
            for m, want in zip(got_means, want_means):
                assert m.dim() == 0 and m.dtype == compute(dtype)
                assert float(m) == pytest.approx(want, rel=rtol, abs=0.0)
        for got_gates in (gates, both[1], only_g[1]):
            assert [float(g) for g in got_gates] == want_gates
            assert all(g.dtype == compute(dtype) and g.dim() == 0 for g in got_gates)
    # every rank holds the same numbers, and the unsharded helpers agree with them
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(other[0], results[0][0]))
    alone = stat_helpers.abs_means(ws)
    for a, b in zip(alone, results[0][0]):
        assert float(a) == pytest.approx(float(b), rel=rtol)
    alone_gates = stat_helpers.grads_nonzero(gs)
    assert [float(g) for g in alone_gates] == want_gates
    assert all(g.dtype == compute(dtype) and g.dim() == 0 for g in alone_gates)


@pytest.mark.parametrize("dtype", STAT_DTYPES, ids=str)
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("blocks", ["default", "small"])
def test_sharded_rejuvenation_stats(world, dtype, blocks, request):
    if blocks == "small":
        request.getfixturevalue("small_chunks")
    ws = [w.clamp(-1, 1) for w in layer_weights(dtype, seed=1)]
    ranks = shard_lists(ws, world)
    results = run_world(world, lambda r: stat_helpers.rejuvenation_stats_many(ranks[r]))
    assert run_world(world, lambda r: stat_helpers.rejuvenation_stats_many([])) == [[]] * world
    rtol = 1e-10 if dtype == torch.float64 else 2e-5
    for got in results:
        assert len(got) == len(ws)
        for w, stats in zip(ws, got):
            # an empty layer has the statistics of an all-zero one (clamped, never NaN)
            want = ref.lognormal_fit64(w) if w.numel() else EMPTY_FIT
            for name, value, exp in zip(("std", "mu", "sigma"), stats, want):
                assert value.dim() == 0 and value.dtype == compute(dtype), name
                assert float(value) == pytest.approx(exp, rel=rtol), (name, w.shape)
    for other in results[1:]:  # bit-identical on every rank
        for a, b in zip(other, results[0]):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
    alone = stat_helpers.rejuvenation_stats_many(ws)
    for a, b in zip(alone, results[0]):
        for x, y in zip(a, b):
            assert float(x) == pytest.approx(float(y), rel=rtol)


#: The fit of an empty (or all-zero) weight: std and mean|w| clamped to 1e-12, no spread.
EMPTY_FIT = (1e-12, math.log(1e-12), 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_rejuvenation_stats_of_empty_and_zero_weights(dtype):
    for w in (torch.empty(0, dtype=dtype), torch.zeros(3, 4, dtype=dtype)):
        for value, want in zip(stat_helpers.rejuvenation_stats(w), EMPTY_FIT):
            assert value.dtype == dtype and float(value) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("dtype", STAT_DTYPES, ids=str)
@pytest.mark.parametrize("world", WORLDS)
def test_sharded_legacy_stats(world, dtype):
    ws = layer_weights(dtype, seed=2)
    ws[0].view(-1)[-3] = -0.875  # the largest |w| of layer 0 in its last rows
    dre = 3.0
    ranks = shard_lists(ws, world)
    results = run_world(world, lambda r: stat_helpers.legacy_stats_many(ranks[r], dre))
    assert run_world(world, lambda r: stat_helpers.legacy_stats_many([], dre)) == [[]] * world
    for got in results:
        assert len(got) == len(ws)
        for w, (max_aw, scale) in zip(ws, got):
            want = float(w.double().abs().max()) if w.numel() else 0.0
            assert max_aw.dtype == scale.dtype == compute(dtype)
            assert float(max_aw) == want
            assert float(scale) == pytest.approx(want / dre, rel=1e-6)
    assert float(results[0][0][0]) == 0.875
    alone = stat_helpers.legacy_stats_many(ws, dre)
    assert alone[5] is None  # the unsharded helper skips an empty weight
    for w, a, b in zip(ws, alone, results[0]):
        if w.numel():
            assert float(a[0]) == float(b[0]) and float(a[1]) == float(b[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("counts", ["spread", "idle", "one"])
def test_sharded_activity_stats(world, dtype, counts):
    c = {
        "spread": torch.arange(11) ** 3,
        "idle": torch.zeros(7, dtype=torch.int64),
        "one": torch.tensor([5]),
    }[counts]
    ranks = dim0_shards(c, world)
    results = run_world(world, lambda r: stat_helpers.activity_stats(ranks[r], dtype))
    want = float(c.double().mean())
    for mean_c, denominator in results:
        assert mean_c.dtype == denominator.dtype == dtype
        assert float(mean_c) == pytest.approx(want, rel=1e-12 if dtype == torch.float64 else 1e-7)
        assert float(denominator) == pytest.approx(max(want, 1e-30), rel=1e-6)
    alone = stat_helpers.activity_stats(c, dtype)
    assert float(alone[0]) == pytest.approx(want, rel=1e-7)
    assert float(alone[1]) == pytest.approx(max(want, 1e-30), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Blocked statistics (one pass over cache-sized blocks on the CPU) against numpy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("n", [64, 65, 200, 256])
def test_blocked_statistics(small_chunks, dtype, n):
    """Exactly one block, one block and one element, a ragged last block, whole blocks."""
    gen = torch.Generator().manual_seed(n)
    w = (torch.randn(n, generator=gen) * 0.3 + 0.1).clamp(-1, 1).to(dtype)
    rtol = 1e-12 if dtype == torch.float64 else 2e-6
    assert float(stat_helpers.abs_means([w])[0]) == pytest.approx(ref.mean_abs64(w), rel=rtol)
    got = stat_helpers.rejuvenation_stats(w)
    for value, want in zip(got, ref.lognormal_fit64(w)):
        assert value.dtype == dtype
        assert float(value) == pytest.approx(want, rel=1e-10 if dtype == torch.float64 else 2e-5)
    # a strided view of the same numbers (not blocked): the same statistics
    strided = torch.stack([w, w], 1)[:, 0]
    assert not strided.is_contiguous()
    assert float(stat_helpers.abs_means([strided])[0]) == pytest.approx(ref.mean_abs64(w), rel=rtol)
    for a, b in zip(stat_helpers.rejuvenation_stats(strided), got):
        assert float(a) == pytest.approx(float(b), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Draws of a shard: the elements of the whole layer's draw at the shard's global indices
# ---------------------------------------------------------------------------------------------

GLOBAL = (6, 5, 4)


@pytest.mark.parametrize(
    "span",
    [Span(0, 2, 6), Span(0, 5, 6), Span(1, 2, 5), Span(2, 1, 4), Span(1, 0, 5)],
    ids=["rows", "last-row", "dim1", "dim2", "dim1-first"],
)
def test_draws_of_a_shard_follow_the_global_index(rng, span):
    local_shape = list(GLOBAL)
    local_shape[span.dim] = {0: 1 if span.start == 5 else 3, 1: 2, 2: 3}[span.dim]
    where = Slab(tuple(local_shape), span)
    n = math.prod(local_shape)
    total = math.prod(GLOBAL)

    def local_part(whole):
        cut = whole.view(GLOBAL).narrow(span.dim, span.start, local_shape[span.dim])
        return cut.reshape(-1)

    key = 77
    assert torch.equal(
        rng_helpers.uniform(key, n, CPU, where), local_part(rng_helpers.uniform(key, total, CPU))
    )
    assert torch.equal(
        rng_helpers.normal(key, n, CPU, where), local_part(rng_helpers.normal(key, total, CPU))
    )
    for a, b in zip(
        rng_helpers.uniform4(key, n, CPU, where), rng_helpers.uniform4(key, total, CPU)
    ):
        assert torch.equal(a, local_part(b))
    assert len(rng_helpers.uniform4(key, n, CPU, where)) == 4
    out = torch.empty(local_shape)
    got = rng_helpers.normal_into(key, out, where)
    assert got is out and out.shape == tuple(local_shape)
    assert torch.equal(out.reshape(-1), local_part(rng_helpers.normal(key, total, CPU)))


@pytest.mark.parametrize("shape", [(0,), (1,), (7, 9), (3, 4, 5)])
def test_draws_are_keyed_sized_and_independent(rng, shape):
    n = math.prod(shape)
    out = torch.empty(shape)
    got = rng_helpers.normal_into(5, out)
    assert got is out and out.shape == shape and out.dtype == torch.float32
    assert torch.equal(out.reshape(-1), rng_helpers.normal(5, n, CPU))
    for draw in (rng_helpers.uniform, rng_helpers.normal):
        a = draw(5, n, CPU)
        assert a.shape == (n,) and a.dtype == torch.float32 and a.device == CPU
        assert torch.equal(a, draw(5, n, CPU))
    rows = rng_helpers.uniform4(5, n, CPU)
    assert len(rows) == 4 and all(r.shape == (n,) and r.dtype == torch.float32 for r in rows)
    if n > 10:
        assert not torch.equal(rng_helpers.uniform(5, n, CPU), rng_helpers.uniform(6, n, CPU))
        assert not torch.equal(rng_helpers.normal(5, n, CPU), rng_helpers.normal(6, n, CPU))
        for i in range(4):
            for j in range(i):
                assert not torch.equal(rows[i], rows[j])
        u = torch.cat([rng_helpers.uniform(k, n, CPU) for k in range(40)])
        assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
        assert abs(float(u.mean()) - 0.5) < 0.05
        z = torch.cat([rng_helpers.normal(k, n, CPU) for k in range(40)])
        assert abs(float(z.mean())) < 0.1 and abs(float(z.std()) - 1.0) < 0.1


# ---------------------------------------------------------------------------------------------
# The one-pass CPU step on every path (packs, single and multiple chunks), by formula
# ---------------------------------------------------------------------------------------------

# With the small_chunks sizes: three layers in one pack, a pack of one, a one-chunk layer
# between PACK_BELOW and CPU_CHUNK... and layers of 3 and 6 chunks with a ragged last one.
STEP_SHAPES = [(7,), (5, 6), (50,), (12, 12), (13, 20), (576,), (1, 95), (20, 10)]
ZERO_GRAD = (1, 7)  # these layers' gradients are all zero (one packed, one not): rates kept
STRIDED = 4  # the layer made non-contiguous in the layout variants


def step_inputs(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for shape in STEP_SHAPES:
        w = torch.randn(shape, generator=gen) * 0.6  # |w|/(|w|+1) spans 0..0.7
        w.view(-1)[::11] = 0.0
        g = torch.randn(shape, generator=gen) * 0.5
        p = 1.0 + 0.4 * (torch.rand(shape, generator=gen) - 0.5)
        out.append([w.to(dtype), g.to(dtype), p.to(dtype)])
    for i in ZERO_GRAD:
        out[i][1].zero_()
    return out


def strided(t):
    """The same values in a transposed (non-contiguous) layout."""
    return t.t().contiguous().t() if t.dim() == 2 else t


LAYOUTS = {"contiguous": (), "w": (0,), "g": (1,), "p": (2,), "gp": (1, 2)}


FLAGS = [(1, 1, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "".join(map(str, f)))
@pytest.mark.parametrize("layout", ["contiguous", "w", "g", "p", "gp"])
def test_bio_step_formula_on_every_cpu_path(small_chunks, rng, dtype, flags, layout):
    """Every stage combination on packs, single and multiple chunks, with one layer's
    weight, gradient or rates in a strided layout (that layer takes the general path)."""
    volume, fuzzy, crystallize = map(bool, flags)
    lr, stab, var, thresh = 0.1, 1.5, 0.3, 0.3
    params = StepParams(volume, fuzzy, crystallize, lr, stab, var, thresh, DAMPENING)
    data = step_inputs(dtype)
    for j in LAYOUTS[layout]:
        data[STRIDED][j] = strided(data[STRIDED][j])
        assert not data[STRIDED][j].is_contiguous()
    keys = [40 + i for i in range(len(data))]
    expected, dampened, kept = [], 0, 0
    for (w, g, p), key in zip(data, keys):
        ge = ref.volume64(w, g, ref.normals(key, w), lr, stab, var) if volume else g.clone()
        if fuzzy:
            ge = ge * p
        pe, near = p.clone(), torch.zeros(p.shape, dtype=torch.bool)
        if crystallize and g.any():
            mask, near = ref.crystal_mask64(w, ge, thresh)
            pe = torch.where(mask, p * DAMPENING, p)
            dampened, kept = dampened + int(mask.sum()), kept + int((~mask).sum())
        expected.append((ge, pe, near))
    tb.bio_step_(*[list(t) for t in zip(*data)], keys, params)
    for (_, g, p), (ge, pe, near) in zip(data, expected):
        ref.assert_same(g, ge)
        ref.assert_same(torch.where(near, pe, p), pe)
    if crystallize:  # both branches of the mask are populated, the gate shut on two layers
        assert dampened > 100 and kept > 100
        for i in ZERO_GRAD:
            assert torch.equal(data[i][2], step_inputs(dtype)[i][2])


@pytest.mark.parametrize("n", [199, 200, 201, 96, 97, 192, 193])
def test_bio_step_formula_at_the_size_boundaries(small_chunks, rng, n):
    """One layer alone, just below, at and above PACK_BELOW (200) and CPU_CHUNK (96)."""
    params = StepParams(True, True, True, 0.1, 1.5, 0.3, 0.3, DAMPENING)
    gen = torch.Generator().manual_seed(n)
    w, g = torch.randn(n, generator=gen) * 0.6, torch.randn(n, generator=gen) * 0.5
    p = 1.0 + 0.4 * (torch.rand(n, generator=gen) - 0.5)
    ge = ref.volume64(w, g, ref.normals(8, w), 0.1, 1.5, 0.3) * p
    mask, near = ref.crystal_mask64(w, ge, 0.3)
    pe = torch.where(mask, p * DAMPENING, p)
    tb.bio_step_([w], [g], [p], [8], params)
    ref.assert_same(g, ge)
    ref.assert_same(torch.where(near, pe, p), pe)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_crystallize_ties_and_gate_on_the_general_path(dtype):
    """Half types and strided layouts take the general path: a gradient exactly at mean|w|
    keeps its rate (``>`` is strict), and an all-zero gradient keeps every rate."""
    w = torch.tensor([[0.5, -0.25], [0.25, 1.0]], dtype=dtype)  # mean|w| = 0.5 exactly
    g = torch.tensor([[0.5, 0.5], [-0.5, 0.5]], dtype=dtype)
    zero_w, zero_g = torch.full((2, 2), 0.5, dtype=dtype), torch.zeros(2, 2, dtype=dtype)
    ps = [torch.ones(2, 2, dtype=dtype), torch.ones(2, 2, dtype=dtype)]
    ws, gs = [w, zero_w], [g, zero_g]
    if dtype == torch.float32:
        ws, gs = [strided(t) for t in ws], [strided(t) for t in gs]
    tb.crystallize_(ws, gs, ps, 1e-3, DAMPENING)
    assert torch.equal(ps[0], torch.ones(2, 2, dtype=dtype))
    assert torch.equal(ps[1], torch.ones(2, 2, dtype=dtype))
    g[0, 0] = 0.5625  # above the mean: dampened
    tb.crystallize_(ws[:1], [strided(g) if dtype == torch.float32 else g], ps[:1], 1e-3, 0.75)
    assert ps[0].flatten().tolist() == [0.75, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("op", ["volume", "crystallize"])
def test_separate_ops_take_the_one_pass_path(small_chunks, rng, op):
    """``volume_scale_`` and ``crystallize_`` alone: the same formulas on packs and chunks."""
    data = step_inputs(torch.float32, seed=1)
    w, g, p = [list(t) for t in zip(*data)]
    keys = [60 + i for i in range(len(data))]
    if op == "volume":
        want = [ref.volume64(a, b, ref.normals(k, a), 0.2, 2.5, 0.4) for a, b, k in zip(w, g, keys)]
        tb.volume_scale_(w, g, keys, 0.2, 2.5, 0.4)
        for got, exp in zip(g, want):
            ref.assert_same(got, exp)
        return
    want = []
    for a, b, c in zip(w, g, p):
        mask, near = ref.crystal_mask64(a, b, 0.05)
        want.append((torch.where(mask, c * DAMPENING, c) if b.any() else c.clone(), near))
    tb.crystallize_(w, g, p, 0.05, DAMPENING)
    for got, (exp, near) in zip(p, want):
        ref.assert_same(torch.where(near, exp, got), exp)


# ---------------------------------------------------------------------------------------------
# Ops on the shards of sharded layers: the rows of the op on the whole layer
# ---------------------------------------------------------------------------------------------


def run_sharded(world, whole, op, local=lambda t: t):
    """``op(tensors, spans)`` on each rank's rows of ``whole`` (a list of lists of tensors, one
    list per argument, each shard passed through ``local``); returns the tensors gathered back,
    and what each rank returned."""
    per_rank = [[[local(s) for s in dim0_shards(t, world)] for t in arg] for arg in whole]
    spans = [dim0_spans(t, world) for t in whole[0]]

    def body(r):
        args = [[shards[r] for shards in arg] for arg in per_rank]
        return op(args, [s[r] for s in spans])

    returned = run_world(world, body)
    gathered = [[gather_dim0(shards) for shards in arg] for arg in per_rank]
    return gathered, returned


def shard_layers(dtype, seed=0):
    """Weights, grads, rates and activity counts of layers with uneven and empty shards."""
    gen = torch.Generator().manual_seed(seed)
    # (12, 50): every local shard has at least PACK_BELOW (200) weights, the chunked path
    shapes = [(9, 13), (1, 30), (5,), (7, 2, 3), (4, 50), (12, 50)]
    out = []
    for shape in shapes:
        w = torch.randn(shape, generator=gen) * 0.3
        w.view(-1)[::13] = 0.0
        g = torch.randn(shape, generator=gen) * 0.2
        p = 1.0 + 0.4 * (torch.rand(shape, generator=gen) - 0.5)
        c = torch.randint(0, 40, (shape[0],), generator=gen)
        out.append((w.to(dtype), g.to(dtype), p.to(dtype), c))
    return [list(t) for t in zip(*out)]


def clones(ts):
    return [t.clone() for t in ts]


SHARD_OPS = ["step", "volume", "crystallize", "temporal", "adaptive", "activity"]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("op", SHARD_OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_sharded_ops_equal_the_whole_layer(small_chunks, rng, world, op, dtype):
    ws, gs, ps, cs = shard_layers(dtype)
    keys = [90 + i for i in range(len(ws))]
    step = StepParams(True, True, True, 0.1, 1.5, 0.3, 0.3, DAMPENING)

    def apply(args, spans):
        w, g, p, c = args
        if op == "step":
            tb.bio_step_(w, g, p, keys, step, spans)
        elif op == "volume":
            tb.volume_scale_(w, g, keys, 0.1, 1.5, 0.3, spans)
        elif op == "crystallize":
            tb.crystallize_(w, g, p, 0.3, DAMPENING)
        elif op == "temporal":
            tb.temporal_update_(p, keys, 0.9, 0.05, 0.8, 1.2, spans)
        elif op == "adaptive":
            tb.weight_adaptive_(p, w, keys, 0.2, 0.8, 1.2, spans)
        else:
            tb.activity_update_(p, c, keys, 0.2, 0.8, 1.2, spans)

    whole = [clones(ws), clones(gs), clones(ps), clones(cs)]
    apply(whole, None)
    (w2, g2, p2, _), _ = run_sharded(world, [ws, gs, ps, cs], apply)
    changed = False
    for a, b, before in zip(g2 + p2, whole[1] + whole[2], gs + ps):
        if op == "adaptive":  # mean|w| summed by shard: its last bit may differ
            torch.testing.assert_close(a, b, rtol=torch.finfo(dtype).eps, atol=0)
        else:
            ref.assert_same(a, b)
        changed |= not torch.equal(a, before)
    assert changed
    for a, b in zip(w2, ws):
        assert torch.equal(a, b)  # weights are read only


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("legacy", [False, True], ids=["rejuvenate", "legacy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_sharded_rejuvenation_equals_the_whole_layer(rng, world, legacy, dtype, layout):
    """Both draw paths (``BIO_RNG=torch``: the sparse path, which draws the replaced values
    after the group has counted them; ``philox``: the dense path), and the legacy rule; local
    shards contiguous or transposed in memory; weights near +-1, where new values clamp."""
    gen = torch.Generator().manual_seed(3)
    ws = [torch.randn(shape, generator=gen) * 0.05 for shape in [(40, 25), (1, 60), (7,)]]
    ws[0][3, 4] = float("nan")
    ws[0][5, 6] = 4.0
    ws[2][:] = torch.tensor([0.0, 0.3, -0.01, 0.02, -0.4, 0.0, 0.05])
    near_one = torch.where(torch.rand(120, 8, generator=gen) < 0.5, 0.95, -0.95)
    near_one[::10] = 0.0  # replaced for sure; the fitted log-normal exceeds 1 at times
    ws = [w.to(dtype) for w in ws + [near_one]]
    keys = [11, 12, 13, 14]
    op = tb.rejuvenate_legacy_ if legacy else tb.rejuvenate_
    whole = clones(ws)
    counts = op(whole, keys, 2.0)
    local = strided if layout == "strided" else (lambda t: t)
    (pieces,), returned = run_sharded(
        world, [ws], lambda a, spans: op(a[0], keys, 2.0, spans), local
    )
    # rejuvenate_ cleans (NaN -> 0, clamp to [-1, 1]); the legacy rule only zeroes NaN
    before = [torch.nan_to_num(w, nan=0.0) if legacy else ref.cleaned(w).to(dtype) for w in ws]
    replaced = [x != y for x, y in zip(whole, before)]
    rtol = 2e-6 if dtype == torch.float32 else 1e-12
    for got, want, mask in zip(pieces, whole, replaced):
        assert got.dtype == dtype
        assert torch.equal(got[~mask], want[~mask])  # kept weights: cleaned only
        torch.testing.assert_close(got[mask], want[mask], rtol=rtol, atol=0)
    if not legacy:  # new values clamped to exactly +-1, both signs
        assert (whole[3] == 1.0).sum() > 3 and (whole[3] == -1.0).sum() > 3
    total = torch.stack([r for r in returned]).sum(0)
    assert total.dtype == torch.int64 and total.tolist() == counts.tolist()
    assert all(int(c) > 0 for c in counts)
    for r, (start, rows) in enumerate(dim0_bounds(40, world)):
        assert int(returned[r][0]) == int(replaced[0][start : start + rows].sum())


def test_sharded_sparse_rejuvenation_needs_row_shards_and_the_group(bio_settings):
    bio_settings(rng="torch")
    w = torch.randn(4, 6) * 0.1
    with pytest.raises(
        RuntimeError, match="^sharded rejuvenation needs the shard group's reduction installed$"
    ):
        tb.rejuvenate_([w.clone()], [1], 2.0, [Span(0, 0, 8)])
    with pytest.raises(
        NotImplementedError, match="^sharded rejuvenation needs shards along weight dim 0$"
    ):  # a shard along dim 1: its elements are not one range of the layer's flat index
        run_world(1, lambda r: tb.rejuvenate_([w.clone()], [1], 2.0, [Span(1, 6, 12)]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_sparse_rejuvenation_follows_the_documented_torch_stream(bio_settings, dtype, layout):
    """``BIO_RNG=torch`` on the CPU (the sparse path): a generator seeded with the key draws
    ``n`` uniforms ``u`` (weight ``i`` is replaced where ``u_i < exp(-dre*|w_i|/std)``), then,
    for the ``k`` replaced weights in index order, ``k`` normals ``z`` and ``k`` uniforms
    ``s``: the new value is ``+-exp(mu + sigma*z)``, positive where ``s < 0.5``, clamped to
    [-1, 1]. The expected values are built here from those draws and numpy's fit."""
    bio_settings(rng="torch")
    gen = torch.Generator().manual_seed(12)
    # magnitudes near 1 (the fitted log-normal exceeds 1 at times: new values clamp) and
    # zeros (replaced for sure)
    w = torch.where(torch.rand(60, 50, generator=gen) < 0.5, 0.93, -0.93)
    w += 0.04 * torch.randn(60, 50, generator=gen)
    w.view(-1)[::10] = 0.0
    w[1, 1] = float("nan")
    w = w.to(dtype)
    before = ref.cleaned(w)
    std, mu, sigma = ref.lognormal_fit64(before.to(dtype))
    key, dre, n = 31, 2.0, w.numel()
    stream = torch.Generator().manual_seed(key)
    u = torch.rand(n, generator=stream).double()
    prob = torch.exp(-dre * before.reshape(-1).abs() / std)
    assert not ((u - prob).abs() < 1e-6).any()  # no decision within rounding of the fit
    idx = torch.nonzero(u < prob).squeeze(1)
    k = idx.numel()
    z = torch.randn(k, generator=stream).double()
    sign = torch.where(torch.rand(k, generator=stream) < 0.5, 1.0, -1.0).double()
    expected = before.reshape(-1).clone()
    expected[idx] = (sign * torch.exp(mu + sigma * z)).clamp(-1.0, 1.0)
    expected = expected.view(w.shape)
    assert (expected.abs() == 1.0).sum() > 5 and 0.1 < k / n < 0.9
    target = strided(w.clone()) if layout == "strided" else w.clone()
    count = tb.rejuvenate_([target], [key], dre)
    assert count.tolist() == [k]
    got = target.double().reshape(-1)
    kept = torch.ones(n, dtype=torch.bool)
    kept[idx] = False
    assert torch.equal(got[kept], expected.reshape(-1)[kept])
    # new values: the fit of float64 weights in float64, of float32 ones in float32
    torch.testing.assert_close(got[idx], expected.reshape(-1)[idx], rtol=1e-6, atol=0)


def _torch_stream_rows(key: int, n: int) -> torch.Tensor:
    """``BIO_RNG=torch``'s four uniform rows of a draw of ``n`` elements, in float64."""
    return torch.rand(4, n, generator=torch.Generator().manual_seed(key)).double()


def _first_box_muller(u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """``sqrt(-2 ln max(u1, 1e-7)) * cos(2 pi u2)`` in float64."""
    return torch.sqrt(-2.0 * torch.log(u1.clamp_min(1e-7))) * torch.cos(2.0 * math.pi * u2)


def test_torch_stream_rejuvenation_and_legacy_draws(bio_settings):
    """``BIO_RNG=torch`` draws of the dense rejuvenation paths (what a CUDA tensor on the torch
    backend takes): rows ``(u, s, u1, u2)`` of the key's generator give ``u``, the sign
    ``s < 0.5`` and ``z`` = the first Box-Muller normal of ``(u1, u2)``; the original rule takes
    ``z`` of rows 0 and 1 and the uniform of row 2."""
    bio_settings(rng="torch")
    key, n = 77, 3000
    rows = _torch_stream_rows(key, n)
    u, positive, z = rng_helpers.rejuvenation_draws(key, n, CPU)
    assert u.dtype == z.dtype == torch.float32 and positive.dtype == torch.bool
    assert torch.equal(u.double(), rows[0])
    assert torch.equal(positive, rows[1] < 0.5)
    torch.testing.assert_close(
        z.double(), _first_box_muller(rows[2], rows[3]), rtol=2e-6, atol=2e-6
    )
    z_old, u_old = rng_helpers.legacy_draws(key, n, CPU)
    torch.testing.assert_close(
        z_old.double(), _first_box_muller(rows[0], rows[1]), rtol=2e-6, atol=2e-6
    )
    assert torch.equal(u_old.double(), rows[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_dense_rejuvenation_follows_the_documented_torch_stream(bio_settings, dtype):
    """The dense path (CUDA tensors on the torch backend; called directly here on the CPU):
    weight ``i`` is replaced where ``u_i < exp(-dre*|w_i|/std)`` by ``+-exp(mu + sigma*z_i)``,
    positive where ``s_i < 0.5``, clamped to [-1, 1]; draws of every element, not only the
    replaced ones. Expected values from the key's generator rows and numpy's fit."""
    bio_settings(rng="torch")
    gen = torch.Generator().manual_seed(5)
    w = (torch.randn(40, 30, generator=gen) * 0.3).to(dtype)
    w.view(-1)[::9] = 0.0
    std, mu, sigma = ref.lognormal_fit64(w)
    key, dre, n = 19, 1.5, w.numel()
    rows = _torch_stream_rows(key, n)
    prob = torch.exp(-dre * w.reshape(-1).double().abs() / std)
    assert not ((rows[0] - prob).abs() < 1e-6).any()  # no decision within rounding
    replace = rows[0] < prob
    sign = torch.where(rows[1] < 0.5, 1.0, -1.0).double()
    new = (sign * torch.exp(mu + sigma * _first_box_muller(rows[2], rows[3]))).clamp(-1.0, 1.0)
    expected = torch.where(replace, new, w.reshape(-1).double())
    stats = tuple(torch.tensor(v, dtype=dtype) for v in (std, mu, sigma))
    got = w.clone()
    count = tb._rejuvenate_dense(got, key, dre, stats)
    assert int(count) == int(replace.sum()) and 0.1 < float(replace.double().mean()) < 0.9
    got = got.reshape(-1).double()
    assert torch.equal(got[~replace], expected[~replace])
    torch.testing.assert_close(got[replace], expected[replace], rtol=2e-5, atol=0)


# ---------------------------------------------------------------------------------------------
# torch.set_default_dtype(torch.float64) changes no draw and no result
# ---------------------------------------------------------------------------------------------


def every_op_once(data):
    """The draws and the stochastic ops on fixed inputs: what a default dtype must not change."""
    out = [rng_helpers.uniform(3, 50, CPU), rng_helpers.normal(3, 50, CPU)]
    out += list(rng_helpers.uniform4(3, 50, CPU))
    out.append(rng_helpers.normal_into(3, torch.empty(5, 10, dtype=torch.float32)))
    w, g, p = [[t.clone() for t in ts] for ts in zip(*data)]
    keys = list(range(len(w)))
    tb.bio_step_(w, g, p, keys, StepParams(True, True, True, 0.1, 1.5, 0.3, 0.3, DAMPENING))
    tb.temporal_update_(p, keys, 0.9, 0.05, 0.5, 2.0)
    tb.rejuvenate_(w[:4], keys[:4], 2.0)
    tb.rejuvenate_legacy_(w[4:], keys[4:], 2.0)
    layer = [data[5][0].clone().view(24, 24)]  # rejuvenated on two shards (rows)
    (sharded,), _ = run_sharded(2, [layer], lambda a, spans: tb.rejuvenate_(a[0], [5], 2.0, spans))
    w.append(sharded[0])
    rates = [torch.empty(30, dtype=w[0].dtype) for _ in tb.RATE_DISTRIBUTIONS]
    for r, name in zip(rates, tb.RATE_DISTRIBUTIONS):
        tb.rates_init_([r], [9], name, 0.2, 0.5, 2.0)
    return out + w + g + p + rates


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_results_do_not_depend_on_the_default_dtype(small_chunks, rng, dtype):
    data = step_inputs(dtype, seed=4)  # packs and a chunked layer at the small sizes
    want = every_op_once(data)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = every_op_once(data)
    finally:
        torch.set_default_dtype(previous)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.equal(a, b)
