"""Reliability: upstream checkpoints, missing gradients, data-parallel replicas, properties."""

import logging

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from process_group import run_ranks

from bio_transformations import BioConverter, Distribution, sync_layer_seeds
from bio_transformations.kernels import StepParams
from bio_transformations.kernels import torch_backend as tb


def small_model(**cfg):
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 6), nn.ReLU(), nn.Linear(6, 3)
    )
    return BioConverter(**cfg)(model)


def test_loads_a_checkpoint_of_the_published_package(caplog):
    torch.manual_seed(0)
    source = small_model(apply_dales_principle=True)
    state = source.state_dict()
    # The published package's layout: rates under the same key, no seed/step state, Dale signs
    # shaped (out, 1) for Linear and (out, in, 1, 1) for Conv2d.
    upstream = {k: v.clone() for k, v in state.items() if not k.endswith("_extra_state")}
    upstream["2.bio_mod.sign"] = state["2.bio_mod.sign"].view(-1, 1).clone()
    conv_sign = state["0.bio_mod.sign"].view(-1, 1, 1, 1).expand(4, 1, 1, 1).clone()
    upstream["0.bio_mod.sign"] = conv_sign
    target = small_model(apply_dales_principle=True)
    with caplog.at_level(logging.WARNING, logger="bio_transformations"):
        target.load_state_dict(upstream)
    assert "no layer seed/step state" in caplog.text
    assert torch.equal(target[2].bio_mod.sign, source[2].bio_mod.sign)
    assert torch.equal(target[0].bio_mod.sign, source[0].bio_mod.sign)
    assert torch.equal(
        target[2].bio_mod.fuzzy_learning_rate_parameters,
        source[2].bio_mod.fuzzy_learning_rate_parameters,
    )
    bad = dict(upstream)
    bad["2.bio_mod.sign"] = torch.ones(5, 1)
    with pytest.raises(RuntimeError, match="size mismatch for 2.bio_mod.sign"):
        target.load_state_dict(bad)


def test_skip_missing_grads_on_request():
    model = nn.ModuleDict({"used": nn.Linear(3, 3), "unused": nn.Linear(3, 3)})
    BioConverter()(model)
    model["used"](torch.randn(2, 3)).sum().backward()
    with pytest.raises(RuntimeError, match="'unused'.*skip_missing_grads=True"):
        model.bio_step(volume=True)
    model.bio_step(skip_missing_grads=True)
    model.fuzzy_learning_rates(skip_missing_grads=True)
    assert model["unused"].weight.grad is None


def _ddp_worker(ctx):
    torch.manual_seed(100 + ctx.rank)  # ranks seeded differently on purpose
    ctx.join()
    model = small_model(
        fuzzy_lr_distribution=Distribution.TEMPORAL,
        fuzzy_lr_dynamic=True,
        fuzzy_lr_update_freq=1,
        apply_dales_principle=True,
    )
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
    for _ in range(4):
        x = torch.randn(8, 1, 6, 6)  # different data per rank
        opt.zero_grad()
        ddp(x).pow(2).mean().backward()
        model.volume_dependent_lr()
        model.fuzzy_learning_rates()
        model.crystallize()
        model.bio_step(volume=True)
        model.update_fuzzy_learning_rates()
        opt.step()
        model.enforce_dales_principle()
        model.rejuvenate_weights()
    return {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_ddp_replicas_stay_identical():
    first, second = run_ranks(_ddp_worker)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name


def _seed_sync_worker(ctx):
    # Converted before torch.distributed is up, from differently seeded generators: the layer
    # seeds differ between ranks until sync_layer_seeds makes them agree.
    torch.manual_seed(200 + ctx.rank)
    model = small_model()
    layers = (model[0], model[2], model[4])
    before = [m.bio_mod.layer_seed for m in layers]
    ctx.join()
    sync_layer_seeds(model)
    after = [m.bio_mod.layer_seed for m in layers]
    # The same stream on both ranks from now on: the same replacement draw for the same weight.
    with torch.no_grad():
        model[2].weight.copy_(torch.linspace(-0.3, 0.3, 6 * 64).view(6, 64))
    model.rejuvenate_weights()
    return before, after, model[2].weight.detach().clone()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")
def test_sync_layer_seeds_makes_ranks_agree():
    (before0, after0, w0), (before1, after1, w1) = run_ranks(_seed_sync_worker)
    assert all(a != b for a, b in zip(before0, before1))  # they differed before the call
    assert after0 == after1  # and agree after it
    assert len(set(after0)) == 3  # each layer keeps its own stream
    assert torch.equal(w0, w1)


def test_sync_layer_seeds_without_distributed_is_a_no_op_derivation():
    model = small_model()
    seeds = [m.bio_mod.layer_seed for m in (model[0], model[2], model[4])]
    sync_layer_seeds(model)
    assert len({m.bio_mod.layer_seed for m in (model[0], model[2], model[4])}) == 3
    assert seeds  # layers keep distinct streams


finite = st.floats(-10, 10, allow_nan=False, width=32)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 9),
    scale=st.floats(1e-6, 5.0),
    nu=st.floats(0.01, 1.0),
    lo=st.floats(0.05, 1.0),
    span=st.floats(0.0, 3.0),
    dre=st.floats(0.1, 20.0),
    key=st.integers(0, 2**62),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
)
def test_ops_stay_finite_and_in_bounds(rows, cols, scale, nu, lo, span, dre, key, dtype):
    g = torch.Generator().manual_seed(key % 2**31)
    w = (torch.randn(rows, cols, generator=g) * scale).to(dtype)
    grad = (torch.randn(rows, cols, generator=g) * scale).to(dtype)
    hi = lo + span
    p = torch.ones(rows, cols, dtype=dtype)
    for dist_name in tb.RATE_DISTRIBUTIONS:
        tb.rates_init_([p], [key], dist_name, nu, lo, hi)
        assert ((p >= lo - 1e-3) & (p <= hi + 1e-3)).all(), dist_name
    tb.temporal_update_([p], [key], 0.99, 0.1 * nu, lo, hi)
    tb.weight_adaptive_([p], [w], [key], nu, lo, hi)
    tb.activity_update_([p], [torch.arange(rows)], [key], nu, lo, hi)
    assert ((p >= lo - 1e-3) & (p <= hi + 1e-3)).all()
    tb.bio_step_([w], [grad], [p], [key], StepParams(True, True, True, 0.1, 2.0, 0.2, 4.5e-5, 0.6))
    tb.rejuvenate_([w], [key], dre)
    for t in (w, grad, p):
        assert torch.isfinite(t).all()
    assert (w.abs() <= 1).all()


def test_spawn_guard():
    # Spawned ranks import their worker by name: keep the workers at module level.
    assert _ddp_worker.__module__ == _seed_sync_worker.__module__ == __name__
