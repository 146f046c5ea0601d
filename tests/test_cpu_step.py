"""The torch backend's one-pass CPU step: chunks, packs of small layers, and the general path
give bit-identical results, and the fused step equals the separate ops."""

import pytest
import torch

from bio_transformations.kernels import StepParams, stats
from bio_transformations.kernels import torch_backend as tb
from bio_transformations.kernels.stats import grads_nonzero

STEP = StepParams(True, True, True, 0.1, 2.0, 0.2, 1e-3, 0.6)
# sizes: packed small layers (several packs at the patched sizes), single-chunk and
# multi-chunk layers with a ragged last chunk
SIZES = [(7,), (33, 31), (40, 40), (500,), (64, 64), (3000,), (123, 77)]


def layers(dtype, seed=0, special=True):
    out = []
    g = torch.Generator().manual_seed(seed)
    for shape in SIZES:
        w = (torch.randn(shape, generator=g) * 0.05).to(dtype)
        grad = (torch.randn(shape, generator=g) * 0.01).to(dtype)
        p = (1 + 0.2 * (torch.rand(shape, generator=g) - 0.5)).to(dtype)
        if special and w.numel() > 8:  # zero weights, NaN/inf gradients, exact ties
            w.view(-1)[:3] = 0.0
            grad.view(-1)[3] = float("nan")
            grad.view(-1)[4] = float("inf")
            grad.view(-1)[5] = 0.0
        out.append((w, grad, p))
    return out


@pytest.fixture
def small_blocks(monkeypatch):
    """Chunks of 1000 and packs of layers below 2000 weights: every path at test sizes."""
    monkeypatch.setattr(tb, "CPU_CHUNK", 1000)
    monkeypatch.setattr(tb, "PACK_BELOW", 2000)


def split(data):
    return [list(t) for t in zip(*data)]


def clone(data):
    return [tuple(t.clone() for t in layer) for layer in data]


def general_path(data, params, keys):
    """The per-layer general path (what non-contiguous and half tensors take)."""
    for (w, g, p), key in zip(data, keys):
        gate = grads_nonzero([g])[0]  # before any stage scales the gradient
        if params.volume:
            tb._volume_one(w, g, key, params.base_lr, params.stability_factor,
                           params.lr_variability)  # fmt: skip
        if params.fuzzy:
            g.mul_(p)
        if params.crystallize:
            tb._crystallize_one(w, g, p, params.crystal_thresh, params.dampening, gate)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("blocks", ["default", "small"])
def test_one_pass_equals_general_path(dtype, blocks, request):
    if blocks == "small":
        request.getfixturevalue("small_blocks")
    keys = list(range(10, 10 + len(SIZES)))
    data, ref = layers(dtype), clone(layers(dtype))
    w, g, p = split(data)
    tb.bio_step_(w, g, p, keys, STEP)
    general_path(ref, STEP, keys)
    for (_, g1, p1), (_, g2, p2) in zip(data, ref):
        assert torch.equal(g1.nan_to_num(), g2.nan_to_num()) and torch.equal(p1, p2)
        assert torch.equal(g1.isnan(), g2.isnan())


@pytest.mark.parametrize("flags", [(1, 1, 1), (1, 0, 1), (0, 1, 1), (1, 1, 0), (0, 0, 1)])
def test_fused_equals_separate_ops(small_blocks, flags):
    volume, fuzzy, crystallize = map(bool, flags)
    params = StepParams(volume, fuzzy, crystallize, 0.1, 2.0, 0.2, 1e-3, 0.6)
    keys = list(range(3, 3 + len(SIZES)))
    data, ref = layers(torch.float32), clone(layers(torch.float32))
    tb.bio_step_(*split(data)[:3], keys, params)
    w, g, p = split(ref)
    if volume:
        tb.volume_scale_(w, g, keys, 0.1, 2.0, 0.2)
    if fuzzy:
        tb.fuzzy_scale_(g, p)
    if crystallize:
        tb.crystallize_(w, g, p, 1e-3, 0.6)
    for (_, g1, p1), (_, g2, p2) in zip(data, ref):
        assert torch.equal(g1.nan_to_num(), g2.nan_to_num()) and torch.equal(p1, p2)


def test_a_layer_draws_the_same_alone_or_in_a_pack(small_blocks):
    keys = list(range(20, 20 + len(SIZES)))
    data = layers(torch.float32, special=False)
    alone = clone(data)
    tb.volume_scale_(*split(data)[:2], keys, 0.1, 2.0, 0.2)
    for (w, g, _), key in zip(alone, keys):
        tb.volume_scale_([w], [g], [key], 0.1, 2.0, 0.2)
    for (_, g1, _), (_, g2, _) in zip(data, alone):
        assert torch.equal(g1, g2)


def test_mixed_layouts_in_one_group(small_blocks):
    data = layers(torch.float32, special=False)
    ref = clone(data)
    w, g, p = split(data)
    g[2], p[2] = g[2].t().contiguous().t(), p[2].t().contiguous().t()  # strided layout
    keys = list(range(len(SIZES)))
    tb.bio_step_(w, g, p, keys, STEP)
    general_path(ref, STEP, keys)
    for a, (_, g2, p2) in zip(zip(g, p), ref):
        assert torch.equal(a[0], g2) and torch.equal(a[1], p2)


def test_blocked_statistics_are_the_reference_values():
    w = torch.randn(3 * stats.STATS_CHUNK + 5, dtype=torch.float64)
    torch.testing.assert_close(stats.abs_means([w])[0], w.abs().mean(), rtol=1e-12, atol=0)
    std, mu, sigma = stats.rejuvenation_stats(w.clamp(-1, 1))
    torch.testing.assert_close(std, w.clamp(-1, 1).std(), rtol=1e-9, atol=0)
    assert torch.isfinite(mu) and torch.isfinite(sigma)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_grads_nonzero_is_the_count_of_nonzero_elements(dtype):
    """The gate (min or max not zero) against its definition, the L0 count, at every position a
    vectorized reduction treats differently (head, body, tail)."""
    tiny = torch.finfo(dtype).tiny * 0.5  # subnormal: not zero, squares to zero
    cases = [
        torch.zeros(0, dtype=dtype),
        torch.zeros(3, 5, dtype=dtype),
        -torch.zeros(70, dtype=dtype),
    ]
    for n in (1, 17, 1000):
        for pos in {0, n // 2, n - 1}:
            for value in (float("nan"), float("inf"), -float("inf"), tiny, -tiny, -3.0):
                g = torch.zeros(n, dtype=dtype)
                g[pos] = value
                cases.append(g)
    got = stats.grads_nonzero(cases)
    for g, gate in zip(cases, got):
        want = (g != 0).any()  # the definition: some element is not zero (NaN != 0)
        assert gate.dtype == stats.compute_dtype(g) and gate.shape == ()
        assert float(gate) == float(want), (g, gate)


@pytest.mark.parametrize("blocks", ["default", "small"])
def test_an_all_zero_gradient_keeps_its_rates_on_every_path(blocks, request):
    """Chunked and packed layers whose gradient is all zero (+0 or -0) keep their rates exactly;
    one NaN in an otherwise zero gradient opens the gate; the others crystallize as usual."""
    if blocks == "small":
        request.getfixturevalue("small_blocks")
    data = layers(torch.float32, special=False)
    data[0][1].zero_()  # packed
    data[5][1].zero_().neg_()  # chunked at the small sizes, -0.0
    data[3][1].zero_()
    data[3][1][7] = float("nan")
    rates_before = [p.clone() for _, _, p in data]
    ref = clone(data)
    w, g, p = split(data)
    params = StepParams.crystallize_only(1e-3, 0.6)
    tb.bio_step_(w, g, p, None, params)
    general_path(ref, params, [None] * len(SIZES))
    for i, ((_, _, p1), (_, _, p2)) in enumerate(zip(data, ref)):
        assert torch.equal(p1, p2), i
        assert torch.equal(p1, rates_before[i]) == (i in (0, 5)), i


def test_grads_nonzero_of_a_mixed_list():
    """One call over layers of different dtypes and sizes: each gate in its own compute dtype."""
    grads = [
        torch.zeros(5, dtype=torch.float16),
        torch.tensor([0.0, -1e-3], dtype=torch.bfloat16),
        torch.zeros(0, dtype=torch.float64),
        torch.tensor([0.0, float("nan")], dtype=torch.float64),
        torch.zeros(4, 4),
    ]
    got = stats.grads_nonzero(grads)
    assert [float(x) for x in got] == [0.0, 1.0, 0.0, 1.0, 0.0]
    assert [x.dtype for x in got] == [torch.float32, torch.float32, torch.float64, torch.float64,
                                      torch.float32]  # fmt: skip
