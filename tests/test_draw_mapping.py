"""The counter -> element mapping of the random draws (docs: "Randomness"), on both sides.

Element ``i`` reads word ``i % 4`` of the Philox call at counter ``(i // 4, stream)``; normals
use both Box-Muller outputs of each word pair. The torch side
(:mod:`~bio_transformations.kernels.philox`, the torch backend in ``BIO_RNG=philox``) and the
Triton kernels (``kernels/triton/draws.py``; the interpreter without CUDA) must draw the same
numbers for every element whatever path a block takes: grouped (a contiguous row starting at a
multiple of 4) or scattered (a permuted row, a shard starting mid-group), 32-bit or 64-bit
index math, aligned or not.
"""

from __future__ import annotations

import pytest
import torch

from bio_transformations import kernels
from bio_transformations.kernels import StepParams, philox
from bio_transformations.kernels import torch_backend as tb
from bio_transformations.kernels.shards import Span

trb = pytest.importorskip("bio_transformations.kernels.triton")
from bio_transformations.kernels.triton import draws, launch  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() and not trb.INTERPRETED else "cpu")
if DEVICE.type == "cpu" and not trb.INTERPRETED:
    pytest.skip("no CUDA and TRITON_INTERPRET is off: Triton cannot run", allow_module_level=True)
with kernels.use_backend("triton"):
    trb = kernels.backend_module(DEVICE)  # the Triton backend's ops
MAX_NORMAL_ULP = 16  # numpy (interpreter) or the GPU's fast forms vs torch's log/cos/sin


@pytest.fixture(autouse=True)
def _philox(bio_settings):
    bio_settings(rng="philox")


def _key(op: int) -> int:
    return philox.stream_key(99, 7, op)


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    ia = a.float().view(torch.int32).to(torch.int64)
    ib = b.float().view(torch.int32).to(torch.int64)
    ia = torch.where(ia < 0, -(2**31) - ia, ia)
    ib = torch.where(ib < 0, -(2**31) - ib, ib)
    return int((ia - ib).abs().max()) if ia.numel() else 0


# ---------------------------------------------------------------------------------------------
# The torch side: the mapping itself
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("start, n", [(0, 1), (0, 7), (3, 10), (5, 1030), (2**33 + 2, 9)])
def test_element_words_are_the_lanes_of_one_call_per_group(start, n):
    key = _key(1)
    index = torch.arange(start, start + n, dtype=torch.int64)
    words = torch.stack(philox.randint4x(key, index // 4), dim=-1)  # every element's group
    want = words.gather(-1, (index % 4)[:, None]).squeeze(-1)
    assert torch.equal(philox.element_words(key, range(start, start + n)), want)
    assert torch.equal(philox.element_words(key, index), want)  # tensor index: same words
    u = philox.element_uniforms(key, range(start, start + n))
    assert torch.equal(u, philox.uint32_to_uniform(want))


def test_streams_are_the_third_counter_word():
    key, index = _key(2), torch.arange(64)
    s0 = philox.element_words(key, index)
    s1 = philox.element_words(key, index, stream=1)
    assert not torch.equal(s0, s1)
    assert torch.equal(s0, philox.element_words(key, index, stream=0))


def test_both_box_muller_outputs_are_used():
    """Lanes 0, 1 of a group are the cos and sin outputs of words (w0, w1); lanes 2, 3 those of
    (w2, w3): four normals per Philox call."""
    key, n = _key(3), 4 * 300
    z = philox.element_normals(key, range(n)).view(-1, 4)
    w = torch.stack(philox.randint4x(key, torch.arange(n // 4)), dim=-1)
    c01, s01 = philox.box_muller_pair(w[:, 0], w[:, 1])
    c23, s23 = philox.box_muller_pair(w[:, 2], w[:, 3])
    assert torch.equal(z, torch.stack([c01, s01, c23, s23], dim=-1))
    r = torch.sqrt(-2.0 * torch.log(philox.uint32_to_uniform(w[:, 0]).clamp_min(1e-7)))
    torch.testing.assert_close(z[:, 0].hypot(z[:, 1]), r, rtol=1e-5, atol=1e-6)
    # the angle: int32(w1) * pi * 2**-31, in [-pi, pi]
    theta = philox.signed_angle(w[:, 1])
    assert float(theta.abs().max()) <= torch.pi + 1e-6
    torch.testing.assert_close(torch.atan2(z[:, 1], z[:, 0]), theta, rtol=0, atol=2e-5)


def test_normals_are_standard():
    z = philox.element_normals(_key(4), range(200_000)).double()
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1.0) < 0.01
    lanes = z.view(-1, 4)
    for j in range(4):  # every lane is a standard normal, and lanes are uncorrelated
        assert abs(float(lanes[:, j].std()) - 1.0) < 0.02
    corr = torch.corrcoef(lanes.T)
    assert float((corr - torch.eye(4, dtype=corr.dtype)).abs().max()) < 0.02


def test_rejuvenation_sign_is_independent_of_its_uniform():
    from bio_transformations.kernels import rng

    u, positive, z = rng.rejuvenation_draws(_key(5), 100_000, torch.device("cpu"))
    assert abs(float(positive.double().mean()) - 0.5) < 0.01
    # the sign bit is folded out of U: same spread of U on both sides
    assert abs(float(u[positive].mean()) - float(u[~positive].mean())) < 0.01
    assert abs(float(z.double().std()) - 1.0) < 0.02


def test_shard_draws_equal_the_whole_layer():
    from bio_transformations.kernels import rng
    from bio_transformations.kernels.shards import Slab

    whole = rng.normal(_key(6), 7 * 9, torch.device("cpu"))
    for start, rows in [(0, 3), (3, 4), (1, 5)]:  # rows of 9: starts at 9, 27, ... mid-group
        slab = Slab((rows, 9), Span(0, start, 7))
        part = rng.normal(_key(6), rows * 9, torch.device("cpu"), slab)
        assert torch.equal(part, whole[start * 9 : (start + rows) * 9])


# ---------------------------------------------------------------------------------------------
# The Triton kernels against it
# ---------------------------------------------------------------------------------------------

#: Odd sizes: tails of 1..3 elements past a group, a block +- 1, one group.
SIZES = [(1,), (3,), (5,), (4,), (1023,), (1025,), (7, 13)]


def _rates(shapes, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [(1.0 + 0.2 * (torch.rand(s, generator=gen) - 0.5)).to(DEVICE, dtype) for s in shapes]


def _temporal(backend, ps, spans=None, first=0):
    keys = [_key(10 + first + i) for i in range(len(ps))]
    backend.temporal_update_(ps, keys, 0.9, 0.016, 0.5, 2.0, spans)
    return ps


def _volume(backend, ws, gs, spans=None):
    keys = [_key(20 + i) for i in range(len(ws))]
    backend.bio_step_(ws, gs, None, keys, StepParams.volume_only(0.1, 2.0, 0.2), spans)
    return gs


def _grads(shapes, seed=1):
    gen = torch.Generator().manual_seed(seed)
    ws = [(torch.randn(s, generator=gen) * 0.1).to(DEVICE) for s in shapes]
    gs = [(torch.randn(s, generator=gen) * 0.05).to(DEVICE) for s in shapes]
    return ws, gs


def test_uniforms_bit_for_bit_at_tails():
    ref = _temporal(tb, _rates(SIZES))
    got = _temporal(trb, _rates(SIZES))
    for a, b in zip(ref, got):
        assert torch.equal(a, b)


def test_normals_at_tails_use_both_outputs():
    ref = _volume(tb, *_grads(SIZES))
    got = _volume(trb, *_grads(SIZES))
    for a, b in zip(ref, got):
        assert _ulps(a, b) <= MAX_NORMAL_ULP


@pytest.mark.parametrize("start", [1, 2, 3, 4])
def test_shards_starting_mid_group_draw_the_global_index(start):
    """A shard whose first global index is not a multiple of 4 takes the scattered path; it
    must draw what the whole layer draws there (rows of 5: start * 5 is mid-group)."""
    shape = (300, 5)  # > one block, so grouped and scattered blocks both run
    spans = [Span(0, start, 300 + start + 2)]
    ref = _temporal(tb, _rates([shape]), spans)
    got = _temporal(trb, _rates([shape]), spans)
    assert torch.equal(ref[0], got[0])
    ref = _volume(tb, *_grads([shape]), spans)
    got = _volume(trb, *_grads([shape]), spans)
    assert _ulps(ref[0], got[0]) <= MAX_NORMAL_ULP


def test_32_and_64_bit_index_variants_agree(monkeypatch):
    shapes = [(1030,), (33, 31), (6, 4, 3, 3)]

    def run(index32: bool):
        monkeypatch.setattr(launch, "INDEX32_LIMIT", launch.INDEX32_LIMIT if index32 else -1)
        launch._plans.clear()
        seen = []
        plan = launch._plan
        monkeypatch.setattr(
            launch, "_plan", lambda *a: seen.append(plan(*a)) or seen[-1], raising=True
        )
        ps = _rates(shapes)
        ps[2] = ps[2].contiguous(memory_format=torch.channels_last)
        _temporal(trb, ps)
        gs = _volume(trb, *_grads(shapes))
        monkeypatch.undo()
        launch._plans.clear()
        assert seen and all(p.index32 == index32 for p in seen)
        return ps + gs

    for a, b in zip(run(True), run(False)):
        assert torch.equal(a, b)


def test_channels_last_and_contiguous_layers_in_one_launch():
    """One permuted layer no longer changes what the contiguous layers of its launch compute
    (they keep the grouped path); both agree with the torch backend."""
    shapes = [(8, 4, 3, 3), (40, 30), (1025,)]

    def rates():
        ps = _rates(shapes)
        ps[0] = ps[0].contiguous(memory_format=torch.channels_last)
        return ps

    ref, got = _temporal(tb, rates()), _temporal(trb, rates())
    for a, b in zip(ref, got):
        assert torch.equal(a, b)
    alone = _temporal(trb, _rates(shapes)[1:], first=1)  # the contiguous layers on their own
    for a, b in zip(alone, got[1:]):
        assert torch.equal(a, b)

    def grads():
        ws, gs = _grads(shapes)
        ws[0] = ws[0].contiguous(memory_format=torch.channels_last)
        gs[0] = gs[0].contiguous(memory_format=torch.channels_last)
        return ws, gs

    ref, got = _volume(tb, *grads()), _volume(trb, *grads())
    for a, b in zip(ref, got):
        assert _ulps(a, b) <= MAX_NORMAL_ULP


def test_misaligned_view_mixed_with_aligned_tensors():
    """A view one element into its storage (not 16-byte aligned) in a launch with aligned
    tensors: every layer still agrees with the torch backend."""
    shapes = [(1030,), (40, 30)]

    def rates():
        ps = _rates(shapes)
        storage = torch.empty(1031, device=DEVICE)
        view = storage[1:]
        view.copy_(ps[0])
        ps[0] = view
        return ps

    ps = rates()
    assert ps[0].data_ptr() % 16 != 0 and ps[1].data_ptr() % 16 == 0
    ref, got = _temporal(tb, rates()), _temporal(trb, ps)
    for a, b in zip(ref, got):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# The device helpers on their own: 64-bit counters near the 32-bit carry
# ---------------------------------------------------------------------------------------------

_helpers = {}


def _helper_kernels():
    """Jitted wrappers of the draw helpers (built once: triton is imported lazily)."""
    if _helpers:
        return _helpers
    import triton
    import triton.language as tl

    @triton.jit
    def words(key, first, out, BLOCK: tl.constexpr, GROUPED: tl.constexpr, RUN: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        idx = draws.draw_index(out, offs, first, 0, 0, GROUPED)
        w = draws.words_of(key, idx, 0, first, BLOCK, 1, GROUPED, RUN)
        tl.store(out + offs, w.to(tl.int32, bitcast=True))

    @triton.jit
    def normals(key, first, out, BLOCK: tl.constexpr, GROUPED: tl.constexpr, RUN: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        idx = draws.draw_index(out, offs, first, 0, 0, GROUPED)
        tl.store(out + offs, draws.normals(key, idx, 0, first, BLOCK, 0, GROUPED, RUN))

    _helpers.update(words=words, normals=normals)
    return _helpers


@pytest.mark.parametrize("first", [0, 2**32 - 8, 2**34 - 4 * 100, 2**40 + 4 * 7])
@pytest.mark.parametrize(
    "grouped, run", [(True, 4), (True, 8), (False, 4)], ids=["grouped", "grouped8", "scattered"]
)
def test_device_draws_carry_into_the_high_counter_word(first, grouped, run):
    """Every draw path at global indices whose counters cross 2**32 (the grouped path carries
    the low counter word into the high one in 32-bit halves; ``run`` 8 is the grouped layout of
    16-bit dtypes, 8 consecutive elements per thread): the torch map's words and normals."""
    k = _helper_kernels()
    key, block = _key(30), 1024
    out = torch.empty(block, dtype=torch.int32, device=DEVICE)
    k["words"][(1,)](key, first, out, BLOCK=block, GROUPED=grouped, RUN=run)
    want = philox.element_words(key, range(first, first + block), DEVICE, stream=1)
    assert torch.equal(out.to(torch.int64) & 0xFFFFFFFF, want)
    z = torch.empty(block, dtype=torch.float32, device=DEVICE)
    k["normals"][(1,)](key, first, z, BLOCK=block, GROUPED=grouped, RUN=run)
    _assert_normals_close(z, philox.element_normals(key, range(first, first + block), DEVICE))


def _assert_normals_close(z: torch.Tensor, ref: torch.Tensor) -> None:
    """Raw normals of a grouped range (first index a multiple of 4) against the torch map.
    Interpreter: numpy's precise cos/sin, within ``MAX_NORMAL_ULP``. Compiled: ``cos.approx``
    and ``sin.approx`` have an ABSOLUTE error below 2**-21, so a normal near 0 can be many ulp
    off while ``r*cos(theta)`` is off by at most about ``r * 2**-21``: the bound is 4x that
    (plus a few ulp of the radius) relative to its pair's radius."""
    if trb.INTERPRETED:
        assert _ulps(z, ref) <= MAX_NORMAL_ULP
        return
    radius = ref.view(-1, 2).float().pow(2).sum(1).sqrt().repeat_interleave(2)
    err = (z.float() - ref.float()).abs()
    assert bool((err <= radius * 2.0**-19).all()), float((err / radius).max())


@pytest.mark.parametrize("index32", [True, False], ids=["index32", "index64"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_activity_rows_of_every_length_agree(dtype, index32, monkeypatch):
    """The activity redraw's full blocks take the factors of a thread's run of elements (4,
    or 8 for 16-bit rates) from at most two rows (rows at least that long) and shorter rows
    run the per-element body: both equal the torch backend bit for bit, with row ends at every
    position within a run."""
    if not index32:
        monkeypatch.setattr(launch, "INDEX32_LIMIT", -1)
    launch._plans.clear()
    row_lens = [1, 2, 3, 4, 5, 7, 8, 9, 50]
    gen = torch.Generator().manual_seed(3)
    rates = [_rates([(2100 // n + 1, n)], seed=n, dtype=dtype)[0] for n in row_lens]
    counts = [torch.randint(0, 40, (p.shape[0],), generator=gen).to(DEVICE) for p in rates]
    keys = [_key(40 + i) for i in range(len(rates))]
    got = [p.clone() for p in rates]
    tb.activity_update_(rates, counts, keys, 0.16, 0.5, 2.0)
    trb.activity_update_(got, counts, keys, 0.16, 0.5, 2.0)
    for n, a, b in zip(row_lens, rates, got):
        assert torch.equal(a, b), n
    launch._plans.clear()
