"""The torch reference backend against its documented formulas, independently of any other
backend (these run wherever torch runs: no Triton, no C++ compiler).

How the expected values are built:

* **Draws**: the op's random numbers are recomputed here by calling the documented RNG helper
  (``uniform`` / ``normal`` / ``rejuvenation_draws`` / ``legacy_draws``, or the Philox element
  functions they follow) with the same key; the formula is
  then written out in the test, in the order its docstring states. Pure arithmetic is
  therefore compared bit for bit.
* **Statistics** (``mean|w|``, the rejuvenation log-normal) come from numpy in float64; the
  helpers that compute them are tested on their own against the same numpy formulas.
* **Parameters are non-degenerate**: dampening 0.6 (not 0.5, where ``d == 1 - d``), non-zero
  weights, several stability factors, and both branches of every mask populated.
* **Half precision**: float16/bfloat16 results must equal the float32 computation rounded once.
* **Distributions** (noise mean, spread and sign; rejuvenation's replaced fraction, log-normal
  and signs; volume's folded normal) are checked with binomial bounds and KS tests that do not
  use the RNG helpers at all, on both rejuvenation paths: the sparse CPU path
  (``BIO_RNG=torch``, the default) and the dense path (``BIO_RNG=philox``, as on CUDA).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats as sps

# The RNG and statistics helpers, and the bio step's parameter record: imported here only.
from bio_transformations.kernels import StepParams, philox
from bio_transformations.kernels import rng as rng_helpers
from bio_transformations.kernels import stats as stat_helpers
from bio_transformations.kernels import torch_backend as tb

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
HALF = [torch.float16, torch.bfloat16]
DAMPENING = 0.6
CPU = torch.device("cpu")
#: KS p-value below which a sample is taken to not follow the documented law (fixed seeds, so
#: a pass is deterministic; the bound only says how surprising a failure would be).
P_MIN = 1e-4


@pytest.fixture(params=["torch", "philox"])
def rng(request, bio_settings):
    """Both random-number modes of the torch backend (``BIO_RNG``)."""
    bio_settings(rng=request.param)
    assert rng_helpers.philox_mode() == (request.param == "philox")
    return request.param


def compute(dtype):
    return torch.float32 if dtype in HALF else dtype


def inputs(shape, dtype, seed=0):
    """Weights (a few exactly-zero, none degenerate), grads and rates of one shape."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen) * 0.1
    w.view(-1)[::211] = 0.0
    g = torch.randn(shape, generator=gen) * 0.05
    p = 1.0 + 0.4 * (torch.rand(shape, generator=gen) - 0.5)
    return w.to(dtype), g.to(dtype), p.to(dtype)


def mean_abs64(t):
    return float(np.abs(t.double().numpy()).mean()) if t.numel() else 0.0


def assert_same(got, expected):
    assert got.dtype == expected.dtype and got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)


def uniforms(key, like):
    return rng_helpers.uniform(key, like.numel(), CPU).view(like.shape)


def normals(key, like):
    return rng_helpers.normal(key, like.numel(), CPU).view(like.shape)


# ---------------------------------------------------------------------------------------------
# The statistics helpers, on their own, against numpy in float64
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_abs_means_is_the_mean_of_abs(dtype):
    ts = [inputs((37, 29), dtype, seed=s)[0] for s in range(3)] + [torch.empty(0, dtype=dtype)]
    ts[1] = ts[1] * 7.0 - 0.3
    got = stat_helpers.abs_means(ts)
    for t, m in zip(ts, got):
        assert m.dim() == 0 and m.dtype == compute(dtype)
        rtol = 1e-12 if dtype == torch.float64 else 1e-6
        assert float(m) == pytest.approx(mean_abs64(t), rel=rtol, abs=0.0)


def lognormal_fit64(w):
    """std(w), and the halved-sigma log-normal fitted to |w|: the documented formulas."""
    x = w.double().numpy().reshape(-1)
    a = np.abs(x)
    std = x.std(ddof=1) if x.size > 1 else 0.0
    m, s = a.mean(), (a.std(ddof=1) if x.size > 1 else 0.0)
    m = max(m, 1e-12)
    sigma2 = math.log1p((s / m) ** 2)
    return max(std, 1e-12), math.log(m) - sigma2 / 2, math.sqrt(sigma2) / 2


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("scale", [0.02, 0.5])
def test_rejuvenation_stats_match_the_lognormal_fit(dtype, scale):
    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(5000, generator=gen) * scale + 0.3 * scale).clamp(-1, 1).to(dtype)
    std, mu, sigma = stat_helpers.rejuvenation_stats(w)
    want = lognormal_fit64(w)
    rtol = 1e-10 if dtype == torch.float64 else 2e-5
    for name, got, exp in zip(("std", "mu", "sigma"), (std, mu, sigma), want):
        assert got.dim() == 0 and got.dtype == compute(dtype), name
        assert float(got) == pytest.approx(exp, rel=rtol), name


def test_rejuvenation_stats_degenerate_inputs_stay_finite():
    one = torch.tensor([0.25])
    std, mu, sigma = stat_helpers.rejuvenation_stats(one)
    assert float(std) == pytest.approx(1e-12) and float(sigma) == 0.0
    assert float(mu) == pytest.approx(math.log(0.25))
    zeros = stat_helpers.rejuvenation_stats(torch.zeros(10))
    assert all(math.isfinite(float(v)) for v in zeros)
    assert float(zeros[1]) == pytest.approx(math.log(1e-12))


def test_clean_weights_zeroes_nan_and_clamps():
    w = torch.tensor([float("nan"), 2.0, -3.0, 0.5, float("inf"), -float("inf")])
    stat_helpers.clean_weights_([w])
    assert w.tolist() == [0.0, 1.0, -1.0, 0.5, 1.0, -1.0]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_compute_dtype(dtype):
    assert stat_helpers.compute_dtype(torch.empty(1, dtype=dtype)) == compute(dtype)


# ---------------------------------------------------------------------------------------------
# Pure arithmetic: fuzzy, crystallize, Dale
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_fuzzy_scale(dtype):
    w, g, p = inputs((40, 30), dtype)
    expected = (g.to(compute(dtype)) * p.to(compute(dtype))).to(dtype)
    tb.fuzzy_scale_([g], [p])
    assert_same(g, expected)


def crystal_mask64(w, g, thresh):
    """``(|g|/|w| < t) | (|g| > mean|w|)`` in float64, and where an element sits within 1e-6
    (relative) of either threshold, where float32 may decide either way."""
    aw, ag = w.double().abs(), g.double().abs()
    ratio = ag / aw  # inf where w == 0: never below t
    mean = mean_abs64(w)
    mask = (ratio < thresh) | (ag > mean)
    near = ((ratio - thresh).abs() <= 1e-6 * thresh) | ((ag - mean).abs() <= 1e-6 * mean)
    return mask, near


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("thresh", [0.05, 0.3])
def test_crystallize(dtype, thresh):
    w, g, p = inputs((60, 50), dtype)
    mask, near = crystal_mask64(w, g, thresh)
    assert int(near.sum()) <= 2  # the fixed inputs decide (almost) every element clearly
    by_ratio = (g.double().abs() / w.double().abs()) < thresh
    assert by_ratio.sum() > 20 and (mask & ~by_ratio).sum() > 20 and (~mask).sum() > 1000
    pc = p.to(compute(dtype))
    expected = torch.where(mask, pc * DAMPENING, pc).to(dtype)
    either = torch.where(mask, pc, pc * DAMPENING).to(dtype)  # the other decision, near t
    tb.crystallize_([w], [g], [p], thresh, DAMPENING)
    assert_same(torch.where(near & (p == either), expected, p), expected)


def test_dale_enforce():
    w, _, _ = inputs((12, 7), torch.float32)
    sign = torch.tensor([1.0, -1.0] * 6)
    expected = torch.where(w * sign[:, None] > 0, w, torch.zeros_like(w))
    tb.dale_enforce_([w], [sign])
    assert_same(w, expected)


# ---------------------------------------------------------------------------------------------
# Volume scaling: non-zero weights, several stability factors
# ---------------------------------------------------------------------------------------------


def volume64(w, g, z, lr, stab, var):
    """The documented factor, realised with the standard normal ``z`` as ``m*|1 + var*z|``
    (``|N(m, var*m)|`` since ``m > 0``), in the compute dtype and the documented order."""
    ct = compute(w.dtype)
    aw = w.to(ct).abs()
    m = lr * torch.exp(-stab * (aw / (aw + 1.0)))
    return (g.to(ct) * (torch.abs(1.0 + var * z.to(ct)) * m)).to(w.dtype)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("stab", [0.0, 1.0, 2.5])
def test_volume_scale(dtype, stab, rng):
    w, g, _ = inputs((50, 40), dtype)
    w = w * 6.0  # |w|/(|w|+1) spans ~0..0.7: the normalisation matters
    z = normals(21, w)
    expected = volume64(w, g, z, 0.1, stab, 0.3)
    tb.volume_scale_([w], [g], [21], 0.1, stab, 0.3)
    assert_same(g, expected)


@pytest.mark.parametrize("weight", [0.3, -2.0])
@pytest.mark.parametrize("stab", [0.5, 3.0])
def test_volume_factor_follows_the_folded_normal(weight, stab):
    """Independent of the RNG helpers: ``g = 1`` becomes a draw of ``|N(m, var*m)|`` with
    ``m = lr*exp(-s*|w|/(|w|+1))``."""
    n, lr, var = 20000, 0.1, 0.4
    w = torch.full((n,), weight)
    g = torch.ones(n)
    tb.volume_scale_([w], [g], [5], lr, stab, var)
    m = lr * math.exp(-stab * abs(weight) / (abs(weight) + 1))
    law = sps.foldnorm(c=1 / var, scale=var * m)
    assert sps.kstest(g.double().numpy(), law.cdf).pvalue > P_MIN


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_bio_step_is_volume_then_fuzzy_then_crystallize(dtype, rng):
    w, g, p = inputs((50, 40), dtype)
    g = g * 20.0  # after the ~0.1 volume factor, both crystallization branches are populated
    z = normals(33, w)
    g_expected = volume64(w, g, z, 0.1, 2.0, 0.3)
    ct = compute(dtype)
    g_expected = (g_expected.to(ct) * p.to(ct)).to(dtype)
    mask, near = crystal_mask64(w, g_expected, 0.3)
    assert int(near.sum()) == 0 and mask.sum() > 20 and (~mask).sum() > 20
    p_expected = torch.where(mask, p.to(ct) * DAMPENING, p.to(ct)).to(dtype)
    tb.bio_step_([w], [g], [p], [33], StepParams(True, True, True, 0.1, 2.0, 0.3, 0.3, DAMPENING))
    assert_same(g, g_expected)
    assert_same(p, p_expected)


# ---------------------------------------------------------------------------------------------
# Rate updates: temporal, weight-adaptive, activity, initialisation
# ---------------------------------------------------------------------------------------------


def assert_uniform_noise(noise):
    """``noise`` (normalised to the documented ``2U - 1``) is uniform on [-1, 1]: mean 0,
    spread 1/sqrt(3), both signs equally often, and a KS test on the whole law."""
    x = noise.double().numpy().reshape(-1)
    n = x.size
    assert abs(x.mean()) < 5 / math.sqrt(3 * n), "noise is not centred"
    assert x.std() == pytest.approx(1 / math.sqrt(3), rel=0.05), "noise has the wrong spread"
    assert abs((x > 0).mean() - 0.5) < 2.5 / math.sqrt(n), "noise signs are unbalanced"
    assert sps.kstest(x, sps.uniform(loc=-1, scale=2).cdf).pvalue > P_MIN


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_temporal_update(dtype, rng):
    _, _, p = inputs((40, 30), dtype)
    u = uniforms(17, p)
    pc = p.to(compute(dtype))
    expected = (1.0 + (pc - 1.0) * 0.9 + 0.05 * (2.0 * u.to(pc.dtype) - 1.0)).clamp(0.8, 1.2)
    tb.temporal_update_([p], [17], 0.9, 0.05, 0.8, 1.2)
    assert_same(p, expected.to(dtype))


def test_temporal_update_without_noise_is_the_decay_alone():
    _, _, p = inputs((10, 10), torch.float32)
    expected = (1.0 + (p - 1.0) * 0.9).clamp(0.5, 2.0)
    tb.temporal_update_([p], None, 0.9, 0.0, 0.5, 2.0)  # no keys: nothing may be drawn
    assert_same(p, expected)


def test_temporal_noise_distribution(rng):
    p = torch.ones(20000)
    tb.temporal_update_([p], [8], 0.5, 0.02, 0.0, 2.0)
    assert_uniform_noise((p - 1.0) / 0.02)


def adaptive_scale(w):
    den = mean_abs64(w) + 1e-8
    return (2.0 - w.double().abs() / den).clamp(0.5, 1.5)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_weight_adaptive(dtype, rng):
    w, _, p = inputs((40, 30), dtype)
    w.view(-1)[:50] *= 20.0  # some |w| far above the mean: the 0.5 clamp is used
    scale = adaptive_scale(w)
    assert (scale == 0.5).any() and (scale == 1.5).any() and ((scale > 0.5) & (scale < 1.5)).any()
    ct = compute(dtype)
    den = torch.tensor(mean_abs64(w), dtype=ct) + 1e-8
    scale_ct = (2.0 - w.to(ct).abs() / den).clamp(0.5, 1.5)
    u = uniforms(19, p).to(ct)
    expected = (1.0 + (2.0 * u - 1.0) * 0.2 * scale_ct).clamp(0.5, 2.0)
    tb.weight_adaptive_([p], [w], [19], 0.2, 0.5, 2.0)
    # mean|w| is a reduction: its last bit may differ from numpy's float64 mean.
    tol = {torch.float64: 1e-12, torch.float32: 2e-6}.get(dtype, 0.0)
    if tol:
        torch.testing.assert_close(p, expected.to(dtype), rtol=tol, atol=0)
    else:  # rounded once to half precision: equal, the float32 ulp cannot show through
        assert (p != expected.to(dtype)).sum() <= 2


def test_weight_adaptive_noise_distribution(rng):
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(20000, generator=gen) * 0.1
    p = torch.ones(20000)
    tb.weight_adaptive_([p], [w], [9], 0.2, 0.0, 2.0)
    assert_uniform_noise((p.double() - 1.0) / (0.2 * adaptive_scale(w)))


def activity_factor(c, dtype=torch.float32):
    cf = c.to(dtype)
    mean = cf.sum() / cf.numel()
    ratio = cf / mean if mean > 0 else torch.ones_like(cf)
    return 2.0 - torch.clamp(1.0 + (ratio - 1.0) * 0.1, 0.8, 1.2)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("counts", ["spread", "idle"])
def test_activity_update(dtype, counts, rng):
    _, _, p = inputs((40, 30), dtype)
    if counts == "spread":  # ratios 0 to ~3.9: the clamp at 1.2 (f = 0.8) and the linear part
        c = torch.arange(40) ** 3
    else:  # no unit active yet: ratio 1, factor 1
        c = torch.zeros(40, dtype=torch.int64)
    ct = compute(dtype)
    f = activity_factor(c, ct)
    if counts == "spread":
        # (the clamp at 0.8 needs a negative ratio: counts cannot reach it)
        assert (f < 0.8 + 1e-6).any() and ((f > 0.81) & (f < 1.0)).any() and (f > 1.0).any()
    u = uniforms(23, p).to(ct)
    expected = (1.0 + (2.0 * u - 1.0) * 0.2 * f.to(ct)[:, None]).clamp(0.5, 2.0)
    tb.activity_update_([p], [c], [23], 0.2, 0.5, 2.0)
    assert_same(p, expected.to(dtype))


def test_activity_noise_distribution(rng):
    c = torch.arange(200) % 17
    p = torch.ones(200, 100)
    tb.activity_update_([p], [c], [10], 0.2, 0.0, 2.0)
    assert_uniform_noise((p.double() - 1.0) / (0.2 * activity_factor(c).double()[:, None]))


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("distribution", ["uniform", "normal", "lognormal", "baseline"])
def test_rates_init(dtype, distribution, rng):
    p = torch.empty(40, 30, dtype=dtype)
    nu, ct = 0.3, compute(dtype)
    if distribution == "uniform":
        value = 1.0 + (2.0 * uniforms(29, p).to(ct) - 1.0) * nu
    elif distribution == "normal":
        value = 1.0 + nu * normals(29, p).to(ct)
    elif distribution == "lognormal":
        value = torch.exp(-0.5 * nu * nu + nu * normals(29, p).to(ct))
    else:
        value = torch.ones(p.shape)
    expected = value.to(ct).clamp(0.6, 1.5).to(dtype)
    tb.rates_init_([p], [29], distribution, nu, 0.6, 1.5)
    assert_same(p, expected)


# ---------------------------------------------------------------------------------------------
# Rejuvenation: the sparse CPU path (BIO_RNG=torch) and the dense path (BIO_RNG=philox)
# ---------------------------------------------------------------------------------------------

DRE = 2.0


def rejuvenation_inputs(n=20000, dtype=torch.float32):
    """Weights with a few NaNs and values beyond [-1, 1] (cleaned by the op first)."""
    gen = torch.Generator().manual_seed(6)
    w = torch.randn(n, generator=gen) * 0.05
    w[::1000] = float("nan")
    w[7::1000] = 3.0
    return w.to(dtype)


def cleaned(w):
    return torch.nan_to_num(w.double(), nan=0.0).clamp(-1.0, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_rejuvenation_law(rng, dtype):
    """Replaced fraction, log-normal magnitudes and balanced signs, from numpy formulas only."""
    w = rejuvenation_inputs(dtype=dtype)
    before = cleaned(w)
    std, mu, sigma = lognormal_fit64(before.to(dtype))
    prob = torch.exp(-DRE * before.abs() / std)
    count = int(tb.rejuvenate_([w], [41], DRE)[0])
    replaced = w.double() != before
    # Every replacement shows, but for a rare float16 redraw equal to the old value.
    assert 0 <= count - int(replaced.sum()) <= (3 if dtype == torch.float16 else 0)
    expected, spread = float(prob.sum()), float((prob * (1 - prob)).sum()) ** 0.5
    assert abs(count - expected) < 5 * spread, (count, expected, spread)
    new = w.double()[replaced]
    assert sps.kstest(new.abs().log().numpy(), sps.norm(mu, sigma).cdf).pvalue > P_MIN
    positive = int((new > 0).sum())
    assert abs(positive - count / 2) < 2.5 * math.sqrt(count)
    assert torch.equal(w.double()[~replaced], before[~replaced])  # kept weights: cleaned only


def test_rejuvenation_dense_path_exact(bio_settings):
    """The dense path with the documented Philox draws (``rng.rejuvenation_draws``): the
    element's stream-0 word ``w`` decides (``U(w)``) and signs (bit 31 clear: positive), the
    magnitude is ``exp(mu + sigma*n)`` with ``n = N(i)`` of stream 1, clamped to [-1, 1]."""
    bio_settings(rng="philox")
    w = rejuvenation_inputs(4000)
    w[::13] *= 25.0  # magnitudes past 1 after the clamp too
    before = cleaned(w)
    std, mu, sigma = lognormal_fit64(before.float())
    words = philox.element_words(43, range(w.numel()), CPU)
    u_replace = philox.uint32_to_uniform(words)
    n = philox.element_normals(43, range(w.numel()), CPU, stream=1).double()
    prob = torch.exp(-DRE * before.abs() / std)
    decide = u_replace.double() < prob
    near = (u_replace.double() - prob).abs() <= 1e-5
    magnitude = torch.exp(mu + sigma * n)
    new = torch.where(words < 2**31, magnitude, -magnitude).clamp(-1.0, 1.0)
    count = int(tb.rejuvenate_([w], [43], DRE)[0])
    replaced = w.double() != before
    assert not (replaced ^ decide)[~near].any()
    assert int(replaced.sum()) == count and count > 1000
    torch.testing.assert_close(w.double()[replaced], new[replaced], rtol=2e-5, atol=0)


def test_rejuvenation_counts_per_tensor(rng):
    ws = [rejuvenation_inputs(3000), torch.empty(0), rejuvenation_inputs(500)]
    before = [cleaned(w) for w in ws]
    counts = tb.rejuvenate_(ws, [1, 2, 3], DRE)
    assert counts.dtype == torch.int64 and counts.shape == (3,)
    assert counts.tolist() == [int((w.double() != b).sum()) for w, b in zip(ws, before)]


def test_rejuvenate_legacy_exact(bio_settings):
    """Threshold ``|N(0, max|w|/dre)|`` from ``N(i)`` (stream 0); replaced weights become
    ``(2*U(i) - 1)*max|w|`` with ``U`` of stream 1."""
    bio_settings(rng="philox")
    w, _, _ = inputs((50, 40), torch.float32)
    w[0, 0] = float("nan")  # counts as 0
    w_clean = torch.nan_to_num(w, nan=0.0)
    max_aw = w_clean.abs().amax()
    z = philox.element_normals(47, range(w.numel()), CPU).view(w.shape)
    u2 = philox.element_uniforms(47, range(w.numel()), CPU, stream=1).view(w.shape)
    threshold = torch.abs(z * (max_aw / 4.0))
    replace = w_clean.abs() < threshold
    expected = torch.where(replace, (2.0 * u2 - 1.0) * max_aw, w_clean)
    count = int(tb.rejuvenate_legacy_([w], [47], 4.0)[0])
    assert_same(w, expected)
    assert count == int(replace.sum()) > 50


# ---------------------------------------------------------------------------------------------
# Edges the formulas above do not reach (found by mutation testing, docs/testing.rst): bounds
# that clamp, ties, single-element and empty tensors in lists, layouts, documented samplers
# ---------------------------------------------------------------------------------------------


def test_rate_updates_clamp_to_both_bounds(rng):
    lo, hi = 0.97, 1.03  # inside the noise range: both bounds are hit
    _, _, p = inputs((40, 30), torch.float32)
    w = inputs((40, 30), torch.float32, seed=1)[0]
    c = torch.arange(40)
    ops = {
        "temporal": lambda q: tb.temporal_update_([q], [3], 0.9, 0.2, lo, hi),
        "adaptive": lambda q: tb.weight_adaptive_([q], [w], [3], 0.2, lo, hi),
        "activity": lambda q: tb.activity_update_([q], [c], [3], 0.2, lo, hi),
        "uniform": lambda q: tb.rates_init_([q], [3], "uniform", 0.2, lo, hi),
    }
    for name, op in ops.items():
        q = p.clone()
        op(q)
        assert float(q.min()) == pytest.approx(lo) and float(q.max()) == pytest.approx(hi), name
        assert ((q > lo) & (q < hi)).any(), name
    for lo_, hi_, want in ((1.2, 2.0, 1.2), (0.5, 0.8, 0.8)):
        q = p.clone()
        tb.rates_init_([q], [3], "baseline", 0.2, lo_, hi_)
        assert torch.equal(q, torch.full_like(q, want))


def test_ops_on_lists_with_empty_and_single_element_tensors(rng):
    """Each tensor of a list gets what it would get alone, after an empty one, and a single
    element counts (no skipping after an empty tensor, none of a one-element tensor)."""
    shapes = [(0,), (1,), (6, 5)]
    keys = [11, 12, 13]

    def run(op, ps, ks):
        ws = [torch.full(s, 0.3) for s in (p.shape for p in ps)]
        cs = [torch.arange(p.shape[0]) if p.dim() else torch.zeros(0) for p in ps]
        if op == "temporal":
            tb.temporal_update_(ps, ks, 0.9, 0.05, 0.5, 2.0)
        elif op == "adaptive":
            tb.weight_adaptive_(ps, ws, ks, 0.2, 0.5, 2.0)
        elif op == "activity":
            tb.activity_update_(ps, cs, ks, 0.2, 0.5, 2.0)
        else:
            tb.rates_init_(ps, ks, op, 0.2, 0.5, 2.0)

    for op in ("temporal", "adaptive", "activity", "uniform", "normal", "gamma", "beta"):
        together = [torch.full(s, 1.1) for s in shapes]
        run(op, together, keys)
        for s, key, got in zip(shapes[1:], keys[1:], together[1:]):
            alone = [torch.full(s, 1.1)]
            run(op, alone, [key])
            assert torch.equal(got, alone[0]), op
            assert not torch.equal(got, torch.full(s, 1.1)), op  # it was updated
    for op in (tb.rejuvenate_, tb.rejuvenate_legacy_):
        ws = [torch.empty(0), torch.tensor([0.0]), torch.linspace(-0.5, 0.5, 30)]
        counts = op(ws, keys, 4.0)
        assert counts.dtype == torch.int64 and counts.shape == (3,)
        assert counts[0] == 0 and counts[2] > 0
        none = op([], [], 4.0)
        assert none.dtype == torch.int64 and none.shape == (0,)
    # a lone zero weight: probability exp(0) = 1, always replaced
    assert tb.rejuvenate_([torch.tensor([0.0])], [5], 4.0).tolist() == [1]


def test_temporal_update_with_noise_needs_keys():
    with pytest.raises(AssertionError, match="^temporal_update_ needs keys when noise is drawn$"):
        tb.temporal_update_([torch.ones(3)], None, 0.9, 0.1, 0.5, 2.0)


def test_unknown_rate_distribution_names_the_valid_ones():
    with pytest.raises(
        ValueError, match="valid: baseline, uniform, normal, lognormal, gamma, beta"
    ):
        tb.rates_init_([torch.ones(3)], [1], "cauchy", 0.1, 0.5, 2.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("distribution", ["gamma", "beta"])
def test_gamma_and_beta_use_torch_samplers_seeded_by_the_key(distribution, dtype):
    """Documented: torch's global samplers seeded with ``key`` (global state left alone); the
    clamp runs in the rates' dtype (0.8 is not a float32 number)."""
    nu, key = 0.3, 2**40 + 7
    p = torch.empty(500, dtype=dtype)
    tb.rates_init_([p], [key], distribution, nu, 0.8, 1.2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(key)
        conc = torch.full((500,), 1.0 / nu)
        if distribution == "gamma":
            want = torch._standard_gamma(conc) * nu
        else:
            want = 1.0 + (2.0 * torch.distributions.Beta(conc, conc).sample() - 1.0) * nu
    want = want.to(dtype).clamp(0.8, 1.2)
    assert (want == 0.8).any() and (want == 1.2).any()
    assert torch.equal(p, want)
    other = torch.empty(500, dtype=dtype)
    tb.rates_init_([other], [key + 1], distribution, nu, 0.8, 1.2)
    assert not torch.equal(p, other)


def test_crystallize_ties_are_not_dampened():
    """``|g| > mean|w|`` is strict: a gradient exactly at the mean keeps its rate."""
    w = torch.tensor([0.5, -0.25, 0.25, 1.0])  # mean|w| = 0.5 exactly
    g = torch.tensor([0.5, 0.5, -0.5, 0.5])
    p = torch.ones(4)
    tb.crystallize_([w], [g], [p], 1e-3, DAMPENING)
    assert torch.equal(p, torch.ones(4))


def test_small_tensor_statistics():
    assert float(stat_helpers.abs_means([torch.tensor([-0.75])])[0]) == 0.75
    two = torch.tensor([0.1, -0.3])
    std, mu, sigma = stat_helpers.rejuvenation_stats(two)
    want = lognormal_fit64(two)
    for got, exp in zip((std, mu, sigma), want):
        assert float(got) == pytest.approx(exp, rel=1e-5)


@pytest.mark.parametrize("counts", [[0, 0, 1, 0, 2], [0, 1, 0, 0, 0]])
def test_activity_mean_below_one(counts, rng):
    """Fewer than one activation per unit on average: the ratio still uses the mean."""
    c = torch.tensor(counts)
    p = torch.ones(5, 4, dtype=torch.float64)
    tb.activity_update_([p], [c], [2], 0.2, 0.0, 2.0)
    u = uniforms(2, p).double()
    f = activity_factor(c, torch.float64)
    assert_same(p, (1.0 + (2.0 * u - 1.0) * 0.2 * f[:, None]).clamp(0.0, 2.0))


def test_activity_mean_not_representable_in_float32():
    c = torch.arange(40) ** 3
    c[0] += 1  # mean 15210.025: float64 rates get the float64 mean
    p = torch.ones(40, 3, dtype=torch.float64)
    tb.activity_update_([p], [c], [2], 0.2, 0.0, 2.0)
    u = uniforms(2, p).double()
    f = activity_factor(c, torch.float64)
    assert_same(p, (1.0 + (2.0 * u - 1.0) * 0.2 * f[:, None]).clamp(0.0, 2.0))


def test_rejuvenated_values_are_clamped_to_unit_range(rng):
    """Weights near +-1: the fitted log-normal often exceeds 1, and the new values are clamped
    to exactly +-1, with both signs."""
    gen = torch.Generator().manual_seed(8)
    w = torch.where(torch.rand(4000, generator=gen) < 0.5, 0.95, -0.95)
    w += 0.05 * torch.rand(4000, generator=gen)
    w[::3] = 0.0  # and some zeros, which are replaced for sure
    before = w.clone()
    tb.rejuvenate_([w], [9], 0.5)
    new = w[w != before]
    assert new.numel() > 1000 and (new.abs() <= 1.0).all()
    assert (new == 1.0).sum() > 10 and (new == -1.0).sum() > 10


def test_sparse_rejuvenation_of_a_non_contiguous_weight():
    """A transposed weight is rejuvenated as its contiguous copy would be (written back)."""
    w = rejuvenation_inputs(1200).view(40, 30)
    t = w.clone().t()
    assert not t.is_contiguous()
    contiguous = t.contiguous()
    tb.rejuvenate_([t], [4], DRE)
    tb.rejuvenate_([contiguous], [4], DRE)
    assert torch.equal(t, contiguous)
    assert not torch.equal(t, cleaned(w).float().t())


def test_box_muller_is_the_cosine_branch():
    """``box_muller(u1, u2) = sqrt(-2 log max(u1, 1e-7)) * cos(2 pi u2)`` (Triton's first)."""
    gen = torch.Generator().manual_seed(1)
    u1, u2 = torch.rand(2, 1000, generator=gen)
    u1[0] = 0.0  # clamped below at 1e-7
    r = np.sqrt(-2.0 * np.log(np.maximum(u1.double().numpy(), 1e-7)))
    want = r * np.cos(2 * np.pi * u2.double().numpy())
    got = rng_helpers.box_muller(u1, u2).double().numpy()
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_torch_generators_are_kept_per_thread_and_device():
    import threading

    first = rng_helpers.generator(1, CPU)
    assert rng_helpers.generator(2, CPU) is first  # one per thread and device, reseeded
    assert first.initial_seed() == 2
    other = []
    thread = threading.Thread(target=lambda: other.append(rng_helpers.generator(3, CPU)))
    thread.start()
    thread.join()
    assert other[0] is not first and other[0].device == CPU
