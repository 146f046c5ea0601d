"""BioModule methods: reference formulas, error texts and the upstream fixes."""

import logging

import pytest
import torch
import torch.nn as nn

from bio_transformations import BioConfig, BioConverter, BioModule, Distribution


def make(layer=None, **cfg):
    layer = layer if layer is not None else nn.Linear(40, 30)
    return layer, BioModule(lambda: layer, BioConfig(**cfg))


def with_grad(layer, scale=1.0):
    layer.weight.grad = torch.randn_like(layer.weight) * scale
    return layer.weight.grad.clone()


def test_buffers_not_parameters():
    layer, bio = make(apply_dales_principle=True)
    assert list(bio.parameters()) == []
    assert set(dict(bio.named_buffers())) == {"fuzzy_learning_rate_parameters", "sign"}
    assert not bio.fuzzy_learning_rate_parameters.requires_grad


def test_no_grad_errors():
    layer, bio = make()
    for method in ("fuzzy_learning_rates", "crystallize", "volume_dependent_lr", "bio_step"):
        with pytest.raises(RuntimeError, match="No gradients found for the weights"):
            getattr(bio, method)()
    layer.weight.requires_grad_(False)
    with pytest.raises(RuntimeError, match="Weights do not require gradients"):
        bio.crystallize()


def test_fuzzy_learning_rates_formula():
    layer, bio = make()
    g = with_grad(layer)
    bio.fuzzy_learning_rates()
    assert torch.equal(layer.weight.grad, g * bio.fuzzy_learning_rate_parameters)


def test_crystallize_formula():
    torch.manual_seed(1)
    layer, bio = make(crystal_thresh=1e-2, dampening_factor=0.5)
    g = with_grad(layer, scale=0.05)
    g[0, :5] = 1e-9  # tiny relative gradient
    g[1, :5] = 10.0  # larger than mean|w|
    layer.weight.grad.copy_(g)
    w = layer.weight.detach()
    p0 = bio.fuzzy_learning_rate_parameters.clone()
    bio.crystallize()
    mask = (g.abs() / w.abs() < 1e-2) | (g.abs() > w.abs().mean())
    expected = torch.where(mask, p0 * 0.5, p0)
    assert torch.equal(bio.fuzzy_learning_rate_parameters, expected)
    assert mask[0, :5].all() and mask[1, :5].all() and not mask.all()


def test_volume_dependent_lr_formula_and_fresh_draws():
    torch.manual_seed(2)
    layer, bio = make(base_lr=0.1, stability_factor=2.0, lr_variability=0.2)
    g = torch.ones_like(layer.weight)
    layer.weight.grad = g.clone()
    bio.volume_dependent_lr()
    first = layer.weight.grad.clone()
    w = layer.weight.detach().abs()
    m = 0.1 * torch.exp(-2.0 * w / (w + 1))
    factor = first / m  # = |1 + 0.2 z| with z standard normal
    assert (first > 0).all()
    z_abs = (factor - 1) / 0.2
    assert 0.5 < z_abs.std() < 1.5 and abs(z_abs.mean()) < 0.2
    layer.weight.grad = g.clone()
    bio.volume_dependent_lr()
    assert not torch.equal(layer.weight.grad, first)  # a fresh draw each call


def test_bio_step_equals_separate_calls():
    torch.manual_seed(3)
    layer, bio = make()
    state = {k: v.clone() for k, v in bio.state_dict().items() if torch.is_tensor(v)}
    extra = bio.get_extra_state()
    g = with_grad(layer, 0.05)
    bio.volume_dependent_lr()
    bio.fuzzy_learning_rates()
    bio.crystallize()
    g_sep, p_sep = layer.weight.grad.clone(), bio.fuzzy_learning_rate_parameters.clone()
    bio.load_state_dict({**state, "_extra_state": extra})
    layer.weight.grad = g.clone()
    bio.bio_step(volume=True)
    assert torch.equal(layer.weight.grad, g_sep)
    assert torch.equal(bio.fuzzy_learning_rate_parameters, p_sep)


def test_rejuvenation_fit_to_abs_and_random_sign():
    torch.manual_seed(4)
    layer, bio = make(nn.Linear(200, 200), rejuvenation_parameter_dre=1.0)
    with torch.no_grad():
        layer.weight.normal_(0.0, 0.05)
    before = layer.weight.detach().clone()
    bio.rejuvenate_weights()
    after = layer.weight.detach()
    changed = after != before
    new = after[changed]
    assert changed.sum() > 100
    # Fix: upstream's signed-mean fit made every new weight ~1e-7 and positive.
    assert 0.35 < (new > 0).float().mean() < 0.65
    assert new.abs().median() > 1e-3
    ratio = new.abs().mean() / before.abs().mean()
    assert 0.5 < ratio < 2.0
    # Weak weights are replaced more often than strong ones.
    weak = before.abs() < before.abs().median()
    assert changed[weak].float().mean() > changed[~weak].float().mean()


def test_rejuvenation_repairs_nan_and_clamps():
    layer, bio = make()
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
        layer.weight[0, 1] = 5.0
        layer.weight[0, 2] = -float("inf")
    bio.rejuvenate_weights()
    w = layer.weight.detach()
    assert torch.isfinite(w).all() and w.abs().max() <= 1.0


def test_rejuvenation_logs_only_when_enabled(caplog):
    layer, bio = make()
    with caplog.at_level(logging.INFO, logger="bio_transformations"):
        bio.rejuvenate_weights()
    assert any("rejuvenation replaced" in r.message for r in caplog.records)


def test_legacy_rejuvenation_original_rule():
    torch.manual_seed(5)
    layer, bio = make(nn.Linear(100, 100), rejuvenation_parameter_dre=2.0)
    before = layer.weight.detach().clone()
    bio.rejuvenate_weights_old()
    after = layer.weight.detach()
    assert torch.isfinite(after).all()  # Fix: upstream took log of a negative mean -> NaN
    changed = after != before
    assert changed.any()
    max_w = before.abs().max()
    assert after[changed].abs().max() <= max_w
    # Only weights below the |N(0, max/dre)| threshold can be replaced: large ones stay.
    assert not changed[before.abs() > 5 * max_w / 2.0].any()


def test_gamma_mean_is_one():
    torch.manual_seed(6)
    layer, bio = make(nn.Linear(300, 300), fuzzy_lr_distribution=Distribution.GAMMA)
    p = bio.fuzzy_learning_rate_parameters
    # Fix: upstream added 1 (mean 2, then clamped at 2.0).
    assert abs(p.mean().item() - 1.0) < 0.05
    assert (p < 2.0).float().mean() > 0.9


def test_weight_adaptive_filled_when_dynamic_and_refreshed():
    torch.manual_seed(7)
    layer, bio = make(
        fuzzy_lr_distribution=Distribution.WEIGHT_ADAPTIVE,
        fuzzy_lr_dynamic=True,
        fuzzy_lr_update_freq=3,
    )
    p = bio.fuzzy_learning_rate_parameters
    assert torch.equal(p, torch.ones_like(p))
    bio.update_fuzzy_learning_rates()
    first = p.clone()
    assert not torch.equal(first, torch.ones_like(p))  # Fix: upstream never filled them
    w = layer.weight.detach().abs()
    scale = torch.clamp(2 - w / (w.mean() + 1e-8), 0.5, 1.5)
    assert ((first - 1).abs() <= 0.16 * scale + 1e-6).all()
    bio.update_fuzzy_learning_rates()
    assert torch.equal(p, first)
    bio.update_fuzzy_learning_rates()  # third update: refresh
    assert not torch.equal(p, first)


def test_temporal_decay_and_noise():
    layer, bio = make(
        fuzzy_lr_distribution=Distribution.TEMPORAL, fuzzy_lr_dynamic=True, fuzzy_lr_update_freq=2
    )
    p = bio.fuzzy_learning_rate_parameters
    p0 = p.clone()
    bio.update_fuzzy_learning_rates()
    assert torch.equal(p, p0)
    bio.update_fuzzy_learning_rates()
    torch.testing.assert_close(p, (1 + (p0 - 1) * 0.9995).clamp(0.5, 2.0))
    for _ in range(18):
        bio.update_fuzzy_learning_rates()
    # at update 20 = 10*freq the noise 0.1*(2U-1)*nu was added too
    decayed = 1 + (p0 - 1) * 0.9995**10
    noise = p - decayed
    assert noise.abs().max() <= 0.1 * 0.16 + 1e-6 and noise.abs().max() > 0.001


def test_activity_update_with_input_is_vectorised():
    torch.manual_seed(8)
    layer, bio = make(
        nn.Linear(5, 7), fuzzy_lr_distribution=Distribution.ACTIVITY, fuzzy_lr_dynamic=True
    )
    x = torch.randn(9, 5)
    bio.update_fuzzy_learning_rates(x)
    counts = bio.activation_count
    assert torch.equal(counts, (layer(x).abs() > 0.01).sum(0))
    p = bio.fuzzy_learning_rate_parameters
    c = counts.float()
    factor = 2 - torch.clamp(1 + (c / c.mean() - 1) * 0.1, 0.8, 1.2)
    assert ((p - 1).abs() <= 0.16 * factor[:, None] + 1e-6).all()
    assert (p != 1).all()  # the first call redraws every row


def test_dale_initialisation_and_enforcement():
    torch.manual_seed(9)
    conv = nn.Conv2d(3, 8, 3)
    layer, bio = make(conv, apply_dales_principle=True)
    sign = bio.sign
    # Fix: one sign per output channel, not per (out, in) pair; shaped to broadcast as upstream's
    assert sign.shape == (8, 1, 1, 1)
    w = layer.weight.detach()
    assert ((w * sign) >= 0).all()
    with torch.no_grad():
        layer.weight.neg_()
    bio.enforce_dales_principle()
    assert (layer.weight == 0).all()
    with pytest.raises(AttributeError, match="Can not enforce dales principle without"):
        make()[1].enforce_dales_principle()
    with pytest.raises(AttributeError, match="Can not use dalians network initialization on"):
        BioModule.dalian_network_initialization(BioModule(lambda: nn.Embedding(3, 3)))


def test_dale_skips_the_last_layer():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    BioConverter(apply_dales_principle=True)(model)
    with torch.no_grad():
        model[1].weight.neg_()
        before = model[1].weight.clone()
    model.enforce_dales_principle()
    assert torch.equal(model[1].weight, before)


def test_l1_reg_matches_upstream_value():
    layer, bio = make()
    assert torch.isclose(bio.l1_reg(), bio.fuzzy_learning_rate_parameters.abs().sum())


def test_state_dict_round_trip_continues_the_same_stream():
    torch.manual_seed(10)
    layer, bio = make()
    with_grad(layer)
    bio.volume_dependent_lr()
    saved = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in bio.state_dict().items()}
    layer.weight.grad = torch.ones_like(layer.weight)
    bio.volume_dependent_lr()
    expected = layer.weight.grad.clone()
    _, other = make(layer)
    other.load_state_dict(saved)
    layer.weight.grad = torch.ones_like(layer.weight)
    other.volume_dependent_lr()
    assert torch.equal(layer.weight.grad, expected)
    assert other.layer_seed == bio.layer_seed
