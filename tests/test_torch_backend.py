"""The torch backend's ops on lists: formulas, dtypes, odd shapes, no host syncs, global RNG."""

import pytest
import torch
import torch.nn as nn

from bio_transformations import BioConverter, Distribution
from bio_transformations.kernels import StepParams
from bio_transformations.kernels import torch_backend as tb

STEP = StepParams(True, True, True, 0.1, 2.0, 0.2, 1e-3, 0.6)

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [(0,), (1,), (1023,), (33, 31), (4, 3, 5, 5)]


def tensors(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.1).to(dtype)
    grad = (torch.randn(shape, generator=g) * 0.01).to(dtype)
    p = (1 + 0.2 * (torch.rand(shape, generator=g) - 0.5)).to(dtype)
    return w, grad, p


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_crystallize_and_fuzzy_reference(shape, dtype):
    w, g, p = tensors(shape, dtype)
    p_ref = p.float().clone()
    g_ref = g.float() * p.float()
    tb.fuzzy_scale_([g], [p])
    torch.testing.assert_close(g.float(), g_ref.to(dtype).float(), rtol=0, atol=0)
    mask = (g.float().abs() / w.float().abs() < 0.05) | (g.float().abs() > w.float().abs().mean())
    tb.crystallize_([w], [g], [p], 0.05, 0.5)
    expected = torch.where(mask, p_ref * 0.5, p_ref).to(dtype)
    assert torch.equal(p, expected)
    assert p.dtype == dtype


def test_ops_on_lists_and_non_contiguous_views():
    base_w, base_g, base_p = tensors((20, 30), torch.float32)
    w, g, p = base_w.t(), base_g.t(), base_p.t()  # non-contiguous
    w2, g2, p2 = tensors((7,), torch.float32, seed=1)
    ref_w, ref_g, ref_p = w.contiguous(), g.contiguous(), p.contiguous()
    tb.bio_step_([w, w2], [g, g2], [p, p2], [11, 12], STEP)
    tb.bio_step_([ref_w], [ref_g], [ref_p], [11], STEP)
    assert torch.equal(g, ref_g) and torch.equal(p, ref_p)
    assert not w.is_contiguous()


def test_channels_last_weights():
    conv = nn.Conv2d(3, 8, 3).to(memory_format=torch.channels_last)
    model = nn.Sequential(conv, nn.Flatten(), nn.Linear(8 * 4 * 4, 2))
    BioConverter()(model)
    assert conv.bio_mod.fuzzy_learning_rate_parameters.is_contiguous(
        memory_format=torch.channels_last
    )
    model(torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last)).sum().backward()
    model.bio_step(volume=True)
    model.rejuvenate_weights()
    assert torch.isfinite(conv.weight).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_op_keeps_dtype_and_finiteness(dtype):
    w, g, p = tensors((50, 40), dtype)
    counts = torch.randint(0, 10, (50,))
    sign = torch.where(torch.rand(50) < 0.5, 1.0, -1.0)
    tb.volume_scale_([w], [g], [1], 0.1, 2.0, 0.2)
    tb.rejuvenate_([w], [2], 8.0)
    tb.rejuvenate_legacy_([w], [3], 8.0)
    for dist in tb.RATE_DISTRIBUTIONS:
        tb.rates_init_([p], [4], dist, 0.16, 0.5, 2.0)
        assert ((p >= 0.5) & (p <= 2.0)).all(), dist
    tb.temporal_update_([p], [5], 0.9, 0.016, 0.5, 2.0)
    tb.weight_adaptive_([p], [w], [6], 0.16, 0.5, 2.0)
    tb.activity_update_([p], [counts], [7], 0.16, 0.5, 2.0)
    tb.dale_enforce_([w], [sign])
    for t in (w, g, p):
        assert t.dtype == dtype and torch.isfinite(t).all()
    assert ((w * sign[:, None]) >= 0).all()


def test_empty_tensors_and_empty_lists():
    e = torch.empty(0)
    tb.fuzzy_scale_([], [])
    tb.crystallize_([e], [e.clone()], [e.clone()], 1e-3, 0.5)
    tb.volume_scale_([e], [e.clone()], [1], 0.1, 2.0, 0.2)
    assert tb.rejuvenate_([e], [1], 8.0).tolist() == [0]
    assert tb.rejuvenate_([], [], 8.0).numel() == 0
    tb.rates_init_([e], [1], "uniform", 0.1, 0.5, 2.0)


def test_constant_and_zero_layers_stay_finite():
    for fill in (0.0, 0.3):
        w = torch.full((30, 30), fill)
        g = torch.full((30, 30), 0.01)
        p = torch.ones(30, 30)
        tb.crystallize_([w], [g], [p], 4.5e-5, 0.6)
        tb.volume_scale_([w], [g], [1], 0.1, 2.0, 0.2)
        tb.weight_adaptive_([p], [w], [2], 0.16, 0.5, 2.0)
        tb.rejuvenate_([w], [3], 8.0)
        tb.activity_update_([p], [torch.zeros(30, dtype=torch.int64)], [4], 0.16, 0.5, 2.0)
        for t in (w, g, p):
            assert torch.isfinite(t).all(), fill


def test_nan_gradients_never_reach_the_rates():
    w, g, p = tensors((10, 10), torch.float32)
    g[0, 0] = float("nan")
    g[1, 1] = float("inf")
    tb.crystallize_([w], [g], [p], 4.5e-5, 0.6)
    assert torch.isfinite(p).all()


def test_philox_mode_gives_the_same_distributions(bio_settings):
    bio_settings(rng="philox")
    w, g, p = tensors((64, 64), torch.float32)
    tb.bio_step_([w], [g], [p], [9], STEP)
    assert tb.rejuvenate_([w], [9], 8.0).item() > 0
    with pytest.raises(ValueError, match="valid values are: torch, philox"):
        bio_settings(rng="bogus")


def _model(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    )
    return BioConverter(
        fuzzy_lr_distribution=Distribution.TEMPORAL,
        fuzzy_lr_dynamic=True,
        fuzzy_lr_update_freq=1,
        apply_dales_principle=True,
    )(model)


def _step(model):
    model(torch.randn(8, 16)).pow(2).mean().backward()
    model.volume_dependent_lr()
    model.fuzzy_learning_rates()
    model.crystallize()
    model.bio_step(volume=True)
    model.update_fuzzy_learning_rates()
    model.rejuvenate_weights()
    model.rejuvenate_weights_old()
    model.enforce_dales_principle()


def test_model_ops_leave_the_global_rng_alone():
    model = _model()
    model(torch.randn(8, 16)).sum().backward()
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    model.volume_dependent_lr()
    model.update_fuzzy_learning_rates()
    model.rejuvenate_weights()
    model.rejuvenate_weights_old()
    assert torch.equal(torch.rand(5), expected)


def test_model_ops_do_not_sync(monkeypatch):
    model = _model()
    model(torch.randn(8, 16)).sum().backward()

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync in a model-level op")

    for name in ("item", "tolist", "cpu", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    model.volume_dependent_lr()
    model.fuzzy_learning_rates()
    model.crystallize()
    model.bio_step(volume=True)
    model.update_fuzzy_learning_rates()
    model.enforce_dales_principle()


def test_resume_from_state_dict_is_bit_identical():
    torch.manual_seed(0)
    a = _model()
    opt_a = torch.optim.SGD(a.parameters(), lr=0.05)
    data = [torch.randn(8, 16) for _ in range(4)]

    def train(model, opt, batches):
        for x in batches:
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            model.bio_step(volume=True)
            model.update_fuzzy_learning_rates()
            opt.step()
            model.rejuvenate_weights()

    train(a, opt_a, data[:2])
    checkpoint = {"model": a.state_dict(), "opt": opt_a.state_dict()}
    checkpoint = {
        k: {kk: (vv.clone() if torch.is_tensor(vv) else vv) for kk, vv in v.items()}
        for k, v in checkpoint.items()
    }
    train(a, opt_a, data[2:])

    b = _model(seed=1)  # other weights and layer seeds until the checkpoint is loaded
    assert b[0].bio_mod.layer_seed != a[0].bio_mod.layer_seed
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05)
    b.load_state_dict(checkpoint["model"])
    opt_b.load_state_dict(checkpoint["opt"])
    train(b, opt_b, data[2:])
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        if torch.is_tensor(va):
            assert torch.equal(va, vb), k
        else:
            assert va == vb, k


@pytest.mark.parametrize("rng", ["torch", "philox"])
def test_float64_rejuvenation_values_are_computed_in_float64(bio_settings, rng):
    """The draws are float32 by definition, but ``exp(mu + sigma*z)`` of a float64 layer runs
    in float64: float32 arithmetic would leave every new value float32-representable."""
    bio_settings(rng=rng)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4000, generator=gen, dtype=torch.float64) * 0.05
    before = w.clone()
    count = int(tb.rejuvenate_([w], [1234], 0.5)[0])
    changed = w != before
    assert count > 100 and int(changed.sum()) == count
    new = w[changed]
    assert bool((new.float().double() != new).any())
