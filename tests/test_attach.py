"""``attach()``: bit-identical to the hand-written loop (plain SGD, GradScaler, accumulation,
closures, partial optimizers), nothing after ``remove()``, and the cadence across checkpoints."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from bio_loops import (
    assert_same_state,
    batches,
    bio_after_step,
    bio_before_step,
    make_net,
    twin,
)

from bio_transformations import BioConverter, attach, functional
from bio_transformations.kernels import StepParams
from bio_transformations.model_methods import bio_layers


def sgd(model, lr=0.05, **kw):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, **kw)


def hand_loop(model, data, *, volume=False, rejuvenate_every=0, dales=True, clip=None):
    opt = sgd(model)
    for step, (x, y) in enumerate(data, 1):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        if clip:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        bio_before_step(model, volume)
        opt.step()
        bio_after_step(model, step, rejuvenate_every, dales)
    return opt


def attached_loop(model, data, *, clip=None, **options):
    opt = sgd(model)
    with attach(model, opt, **options):
        for x, y in data:
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            if clip:
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
    return opt


@pytest.mark.parametrize("volume", [False, True])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_equals_the_hand_written_loop_with_sgd(volume, clip):
    ref = make_net()
    got = twin(ref)
    data = batches(6)
    hand_loop(ref, data, volume=volume, rejuvenate_every=2, clip=clip)
    attached_loop(got, data, volume=volume, rejuvenate_every=2, clip=clip)
    assert_same_state(ref, got)
    assert got[0].bio_mod.optimizer_steps == 6
    # the mechanisms did something: the rates moved away from their initial draw
    initial = make_net()[0].bio_mod.fuzzy_learning_rate_parameters
    assert not torch.equal(got[0].bio_mod.fuzzy_learning_rate_parameters, initial)


def test_options_turn_mechanisms_off():
    ref, got = make_net(), make_net()
    data = batches(3)
    opt = sgd(ref)
    for x, y in data:
        opt.zero_grad()
        F.mse_loss(ref(x), y).backward()
        ref.fuzzy_learning_rates()  # only fuzzy scaling: no crystallize, no updates, no Dale
        opt.step()
    attached_loop(
        got, data, crystallize=False, update_rates=False, enforce_dales=False, rejuvenate_every=0
    )
    assert_same_state(ref, got)


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_grad_scaler_equals_the_hand_written_loop_and_the_unscaled_run(autocast, clip):
    ref, got, unscaled = make_net(), make_net(), make_net()
    data = batches(5)

    def forward_loss(model, x, y):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        return F.mse_loss(out.float(), y)

    opt = sgd(ref)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    for step, (x, y) in enumerate(data, 1):
        opt.zero_grad()
        scaler.scale(forward_loss(ref, x, y)).backward()
        scaler.unscale_(opt)
        if clip:
            nn.utils.clip_grad_norm_(ref.parameters(), clip)
        bio_before_step(ref)
        scaler.step(opt)
        scaler.update()
        bio_after_step(ref, step, 2, True)

    for model, scaled in ((got, True), (unscaled, False)):
        opt = sgd(model)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, enabled=scaled)
        with attach(model, opt, rejuvenate_every=2):
            for x, y in data:
                opt.zero_grad()
                scaler.scale(forward_loss(model, x, y)).backward()
                if clip:
                    scaler.unscale_(opt)
                    nn.utils.clip_grad_norm_(model.parameters(), clip)
                scaler.step(opt)  # unscales first when not done yet; the hooks run after
                scaler.update()
    assert_same_state(ref, got)
    assert_same_state(got, unscaled, optimizer_steps=True)  # scaling by 2**16 and back: exact


def _set_inf_grad(model):
    model[2].weight.grad[0, 0] = float("inf")


@pytest.mark.parametrize("fused", [False, True])
def test_a_step_the_scaler_skips_runs_nothing(fused):
    model = make_net()
    opt = sgd(model, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    handle = attach(model, opt, rejuvenate_every=1)
    x, y = batches(1)[0]
    scaler.scale(F.mse_loss(model(x), y)).backward()
    _set_inf_grad(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scaler.unscale_(opt)  # a fused optimizer would otherwise get scaled gradients: see below
    scaler.step(opt)
    scaler.update()
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key  # weights, rates, counters untouched
    # the next finite step runs everything
    opt.zero_grad()
    scaler.scale(F.mse_loss(model(x), y)).backward()
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    assert model[0].bio_mod.optimizer_steps == 1
    handle.remove()


def test_fused_optimizer_with_scaled_gradients_is_an_error():
    model = make_net()
    opt = sgd(model, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    x, y = batches(1)[0]
    with attach(model, opt):
        scaler.scale(F.mse_loss(model(x), y)).backward()
        with pytest.raises(RuntimeError, match="unscale_"):
            scaler.step(opt)


def test_accumulation_runs_once_per_step():
    ref, got = make_net(), make_net()
    data = batches(8)
    opt = sgd(ref)
    for step in range(1, 5):
        opt.zero_grad()
        for x, y in data[2 * step - 2 : 2 * step]:
            (F.mse_loss(ref(x), y) / 2).backward()
        bio_before_step(ref)
        opt.step()
        bio_after_step(ref, step, 3, True)
    opt = sgd(got)
    with attach(got, opt, rejuvenate_every=3):
        for i, (x, y) in enumerate(data):
            if i % 2 == 0:
                opt.zero_grad()
            (F.mse_loss(got(x), y) / 2).backward()
            if i % 2 == 1:
                opt.step()
    assert_same_state(ref, got)
    assert got[0].bio_mod.optimizer_steps == 4


def test_closure_steps_run_the_mechanisms_after_the_closure():
    ref, got = make_net(), make_net()
    data = batches(4)
    hand_loop(ref, data, rejuvenate_every=2)
    opt = sgd(got)
    calls = []
    with attach(got, opt, rejuvenate_every=2):
        for x, y in data:

            def closure(x=x, y=y):
                opt.zero_grad()
                loss = F.mse_loss(got(x), y)
                loss.backward()
                calls.append(got[0].weight.grad.clone())
                return loss

            opt.step(closure)
    assert_same_state(ref, got)
    assert len(calls) == 4


def test_after_remove_nothing_runs():
    ref, got = make_net(), make_net()
    data = batches(4)
    opt = sgd(ref)
    for x, y in data:
        opt.zero_grad()
        F.mse_loss(ref(x), y).backward()
        opt.step()
    opt = sgd(got)
    handle = attach(got, opt, volume=True, rejuvenate_every=1)
    handle.remove()
    for x, y in data:
        opt.zero_grad()
        F.mse_loss(got(x), y).backward()
        opt.step()
    assert_same_state(ref, got)
    assert not handle.attached
    handle.remove()  # twice is fine


def test_partial_optimizers_touch_their_own_layers_once():
    ref, got = make_net(), make_net()
    data = batches(4)
    # hand loop: the model-level methods, then both optimizers (per-layer streams are
    # independent, so one call over all layers equals two calls over the halves)
    groups = lambda m: ([m[0].weight, m[0].bias], [p for i in (2, 4) for p in m[i].parameters()])  # noqa: E731
    opts = [torch.optim.SGD(g, lr=0.05) for g in groups(ref)]
    for step, (x, y) in enumerate(data, 1):
        for o in opts:
            o.zero_grad()
        F.mse_loss(ref(x), y).backward()
        bio_before_step(ref)
        for o in opts:
            o.step()
        bio_after_step(ref, step, 2, True)
    opts = [torch.optim.SGD(g, lr=0.05) for g in groups(got)]
    handles = [attach(got, o, rejuvenate_every=2) for o in opts]
    assert [len(h.entries) for h in handles] == [1, 2]
    for x, y in data:
        for o in opts:
            o.zero_grad()
        F.mse_loss(got(x), y).backward()
        for o in opts:
            o.step()
    assert_same_state(ref, got)
    with pytest.raises(ValueError, match="already attached"):
        attach(got, sgd(got))  # a layer would get the mechanisms twice per step
    for h in handles:
        h.remove()
    attach(got, sgd(got)).remove()  # free again once removed


def test_an_optimizer_over_one_layer_leaves_the_others_alone():
    model = make_net()
    rates = [model[i].bio_mod.fuzzy_learning_rate_parameters.clone() for i in (0, 2, 4)]
    opt = torch.optim.SGD(model[2].parameters(), lr=0.05)
    x, y = batches(1)[0]
    with attach(model, opt):
        F.mse_loss(model(x), y).backward()
        opt.step()
    after = [model[i].bio_mod.fuzzy_learning_rate_parameters for i in (0, 2, 4)]
    assert torch.equal(rates[0], after[0]) and torch.equal(rates[2], after[2])
    assert not torch.equal(rates[1], after[1])
    assert model[0].bio_mod.optimizer_steps == 0 and model[2].bio_mod.optimizer_steps == 1


def test_layers_without_gradients_are_skipped():
    model = make_net()
    opt = sgd(model)
    with attach(model, opt):
        model[4](torch.randn(2, 8)).sum().backward()  # only the head gets a gradient
        opt.step()
    assert model[0].weight.grad is None


def test_bad_arguments():
    model = make_net()
    with pytest.raises(ValueError, match="updates none"):
        attach(model, torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1))
    with pytest.raises(ValueError, match="rejuvenate_every"):
        attach(model, sgd(model), rejuvenate_every=-1)
    with pytest.raises(TypeError, match="optimizer"):
        attach(model, object())
    plain = BioConverter()(nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Linear(3, 2)))
    with pytest.raises(AttributeError, match="dales principle"):
        attach(plain, sgd(plain), enforce_dales=True)
    attach(plain, sgd(plain)).remove()  # None: as configured (off here), no error


def test_a_checkpoint_keeps_the_cadence_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    data = batches(6)
    ref = make_net()
    attached_loop(ref, data, rejuvenate_every=4)

    first = make_net()
    opt = sgd(first)
    with attach(first, opt, rejuvenate_every=4):
        for x, y in data[:3]:
            opt.zero_grad()
            F.mse_loss(first(x), y).backward()
            opt.step()
    path = tmp_path / "model.safetensors"
    save_file(first.state_dict(), str(path))  # every value a tensor
    opt_state = opt.state_dict()

    resumed = make_net(seed=5)  # other weights, rates and layer seeds: all come from the file
    resumed.load_state_dict(load_file(str(path)))
    assert resumed[0].bio_mod.optimizer_steps == 3
    opt = sgd(resumed)
    opt.load_state_dict(opt_state)
    with attach(resumed, opt, rejuvenate_every=4):
        for x, y in data[3:]:
            opt.zero_grad()
            F.mse_loss(resumed(x), y).backward()
            opt.step()
    assert_same_state(ref, resumed, optimizer_steps=True)


def test_old_dict_checkpoints_load_with_a_warning(caplog):
    model = make_net()
    model[0].bio_mod.rng_step = 17
    state = model.state_dict()
    old = dict(state)
    for key in [k for k in state if k.endswith("_extra_state")]:
        t = state[key].tolist()
        old[key] = {  # the format version 1 wrote
            "version": 1, "layer_seed": t[1] & (2**64 - 1), "rng_step": t[2],
            "update_count": t[3], "rates_filled": bool(t[4]), "activity_calls": t[5],
        }  # fmt: skip
    target = make_net(seed=9)
    with caplog.at_level(logging.WARNING, logger="bio_transformations"):
        target.load_state_dict(old)
    assert "no optimizer step count" in caplog.text
    assert target[0].bio_mod.rng_step == 17
    assert target[0].bio_mod.layer_seed == model[0].bio_mod.layer_seed


def test_seeds_with_the_top_bit_set_round_trip():
    model = make_net()
    model[0].bio_mod.layer_seed = 2**64 - 3
    state = model.state_dict()
    assert state["0.bio_mod._extra_state"].dtype == torch.int64
    target = make_net(seed=2)
    target.load_state_dict(state)
    assert target[0].bio_mod.layer_seed == 2**64 - 3


def _separate(entries, volume):
    if volume:
        functional.volume_dependent_lr(entries)
    functional.fuzzy_learning_rates(entries)
    functional.crystallize(entries)


@pytest.mark.parametrize("cpu_fused", [False, True])
@pytest.mark.parametrize("volume", [False, True])
def test_the_fused_step_attach_uses_equals_the_separate_calls(cpu_fused, volume, bio_settings):
    bio_settings(cpu_fused=cpu_fused)
    a = make_net()
    x, y = batches(1)[0]
    F.mse_loss(a(x), y).backward()
    b = twin(a)
    for pa, pb in zip(a.parameters(), b.parameters()):
        pb.grad = pa.grad.clone()
    functional.bio_step(bio_layers(a), volume=volume)
    _separate(bio_layers(b), volume)
    assert_same_state(a, b)
    for la, lb in zip(a, b):
        if hasattr(la, "weight"):
            assert torch.equal(la.weight.grad, lb.weight.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_the_triton_fused_step_equals_its_separate_kernels(dtype):
    pytest.importorskip("triton")
    from bio_transformations.kernels import triton as tr

    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: Triton's interpreter
    params = StepParams(True, True, True, 0.1, 2.0, 0.2, 4.5e-5, 0.6)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 33, generator=g).to(device, dtype)
    grad = (torch.randn(64, 33, generator=g) * 0.05).to(device, dtype)
    p = (1 + 0.2 * torch.rand(64, 33, generator=g)).to(device, dtype)
    g1, p1, g2, p2 = grad.clone(), p.clone(), grad.clone(), p.clone()
    tr.bio_step_([w], [g1], [p1], [7], params)
    tr.volume_scale_([w], [g2], [7], params.base_lr, params.stability_factor, params.lr_variability)
    tr.fuzzy_scale_([g2], [p2])
    tr.crystallize_([w], [g2], [p2], params.crystal_thresh, params.dampening)
    assert torch.equal(g1, g2) and torch.equal(p1, p2)
