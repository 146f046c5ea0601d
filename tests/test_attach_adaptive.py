"""attach() under adaptive optimizers: the rates (and the volume factor) scale the parameter
update, crystallization decides from the true gradient, SGD is unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from bio_loops import assert_same_state, batches, make_net, twin

from bio_transformations import attach, ops
from bio_transformations.attachment import scale_mode
from bio_transformations.kernels import torch_backend as tb

LAYERS = (0, 2, 4)


def one_step(model, make_opt, **options):
    """One step of ``make_opt(model)`` under attach(); returns (w0, w1, rates0)."""
    x, y = batches(1)[0]
    opt = make_opt(model)
    w0 = [model[i].weight.detach().clone() for i in LAYERS]
    p0 = [model[i].bio_mod.fuzzy_learning_rate_parameters.clone() for i in LAYERS]
    with attach(model, opt, **options):
        F.mse_loss(model(x), y).backward()
        opt.step()
    return w0, [model[i].weight.detach().clone() for i in LAYERS], p0


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)


@pytest.mark.parametrize("crystallize", [False, True])
def test_adamw_update_ratio_equals_the_rates(crystallize):
    plain = make_net(fuzzy_learning_rate_factor_nu=0.5, apply_dales_principle=False)
    bio = twin(plain)
    x, y = batches(1)[0]
    opt = adamw(plain)
    F.mse_loss(plain(x), y).backward()
    opt.step()
    w0, w1, p0 = one_step(bio, adamw, crystallize=crystallize, update_rates=False)
    for i, layer in enumerate(LAYERS):
        bio_update, plain_update = w1[i] - w0[i], plain[layer].weight.detach() - w0[i]
        moved = plain_update != 0  # units behind a dead ReLU get no gradient and no update
        assert moved.float().mean() > 0.5
        assert torch.equal(bio_update[~moved], plain_update[~moved])
        assert p0[i].std() > 0.1  # rates far from 1: the test can fail
        ratio = bio_update[moved] / plain_update[moved]
        torch.testing.assert_close(ratio, p0[i][moved], rtol=1e-4, atol=0)


def test_the_same_rates_on_the_gradient_would_vanish_under_adamw():
    """Why "update" is the default for AdamW: scaling the gradient changes the update ~nothing."""
    plain = make_net(fuzzy_learning_rate_factor_nu=0.5, apply_dales_principle=False)
    bio = twin(plain)
    x, y = batches(1)[0]
    opt = adamw(plain)
    F.mse_loss(plain(x), y).backward()
    opt.step()
    w0, w1, p0 = one_step(bio, adamw, scale="grad", crystallize=False, update_rates=False)
    plain_update = plain[0].weight.detach() - w0[0]
    moved = plain_update != 0
    ratio = (w1[0] - w0[0])[moved] / plain_update[moved]
    assert (ratio - 1).abs().max() < 1e-2 < (p0[0] - 1).abs().max()


def test_update_mode_with_volume_scales_by_the_volume_factor_too():
    plain = make_net(apply_dales_principle=False)
    bio = twin(plain)
    # the volume factors of this step: the same op on a tensor of ones, from the same stream
    bios = [bio[i].bio_mod for i in LAYERS]
    steps = [b._rng_step.clone() for b in bios]
    ones = [torch.ones_like(bio[i].weight) for i in LAYERS]
    c = bios[0].config
    weights = [bio[i].weight.detach().clone() for i in LAYERS]
    ops.volume_scale_(
        weights, ones, steps, [b.layer_seed for b in bios],
        c.base_lr, c.stability_factor, c.lr_variability,
    )  # fmt: skip
    x, y = batches(1)[0]
    opt = adamw(plain)
    F.mse_loss(plain(x), y).backward()
    opt.step()
    w0, w1, p0 = one_step(bio, adamw, volume=True, crystallize=False, update_rates=False)
    for i, layer in enumerate(LAYERS):
        plain_update = plain[layer].weight.detach() - w0[i]
        moved = plain_update != 0
        ratio = (w1[i] - w0[i])[moved] / plain_update[moved]
        torch.testing.assert_close(ratio, (p0[i] * ones[i])[moved], rtol=1e-4, atol=0)


def test_crystallization_decides_from_the_true_gradient():
    model = make_net(apply_dales_principle=False)
    ref = twin(model)
    x, y = batches(1)[0]
    F.mse_loss(ref(x), y).backward()
    c = ref[0].bio_mod.config
    expected = ref[0].bio_mod.fuzzy_learning_rate_parameters.clone()
    tb.crystallize_(
        [ref[0].weight.detach()], [ref[0].weight.grad], [expected],
        c.crystal_thresh, c.dampening_factor,
    )  # fmt: skip
    one_step(model, adamw, crystallize=True, update_rates=False)
    assert torch.equal(model[0].bio_mod.fuzzy_learning_rate_parameters, expected)


def test_sgd_stays_on_the_gradient_and_bit_identical():
    a, b = make_net(), make_net()
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)  # noqa: E731
    one_step(a, sgd, rejuvenate_every=1)
    one_step(b, sgd, rejuvenate_every=1, scale="grad")
    assert_same_state(a, b, optimizer_steps=True)


def test_scale_mode_detection_and_override():
    p = [torch.nn.Parameter(torch.ones(2))]
    for cls in (torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adagrad):
        assert scale_mode(cls(p, lr=0.1)) == "update"
    assert scale_mode(torch.optim.SGD(p, lr=0.1)) == "grad"
    assert scale_mode(torch.optim.SGD(p, lr=0.1), "update") == "update"
    assert scale_mode(torch.optim.AdamW(p, lr=0.1), "grad") == "grad"

    class Lion(torch.optim.SGD):  # another library's sign-based optimizer, by name
        pass

    assert scale_mode(Lion(p, lr=0.1)) == "update"
    with pytest.raises(ValueError, match="scale"):
        scale_mode(torch.optim.SGD(p, lr=0.1), "weights")


def test_a_skipped_scaler_step_leaves_update_mode_untouched():
    model = make_net()
    opt = adamw(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = batches(1)[0]
    with attach(model, opt, rejuvenate_every=1) as handle:
        scaler.scale(F.mse_loss(model(x), y)).backward()
        model[2].weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        assert handle._before is None
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_update_mode_under_a_closure_and_accumulation_matches_the_plain_step_order():
    """The closure path (Lightning) snapshots after the closure: same result as without."""
    a, b = make_net(), make_net()
    data = batches(4)
    for model, use_closure in ((a, False), (b, True)):
        opt = adamw(model)
        with attach(model, opt, rejuvenate_every=2):
            for x, y in data:

                def closure(model=model, opt=opt, x=x, y=y):
                    opt.zero_grad()
                    loss = F.mse_loss(model(x), y)
                    loss.backward()
                    return loss

                if use_closure:
                    opt.step(closure)
                else:
                    closure()
                    opt.step()
    assert_same_state(a, b, optimizer_steps=True)


def test_bio_step_defaults_equal_attach_volume_off():
    a = make_net(apply_dales_principle=False)
    x, y = batches(1)[0]
    F.mse_loss(a(x), y).backward()
    b = twin(a)
    for pa, pb in zip(a.parameters(), b.parameters()):
        pb.grad = pa.grad.clone()
    a.bio_step()  # the model-level method; BioModule.bio_step has the same default
    b.fuzzy_learning_rates()
    b.crystallize()
    assert_same_state(a, b)  # rng_step included: no volume draw happened
    for la, lb in zip(a, b):
        if hasattr(la, "weight"):
            assert torch.equal(la.weight.grad, lb.weight.grad)
    import inspect

    from bio_transformations import BioModule, functional

    for fn in (functional.bio_step, BioModule.bio_step, attach):
        assert inspect.signature(fn).parameters["volume"].default is False
