"""Safe by default (issue 18): no silent no-ops, unused layers keep their rates, the right
output layer, attention layers, unconverting and pretrained weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from bio_transformations import BioConverter, kernels
from bio_transformations.kernels import StepParams, cpu_fused

# ---------------------------------------------------------------------------------------------
# Item 5: a layer whose gradient is all zero this step is not crystallized
# ---------------------------------------------------------------------------------------------


class TwoHeads(nn.Module):
    """A trunk and two heads, of which a step uses one (the other's gradient stays zero)."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(6, 8)
        self.a = nn.Linear(8, 3)
        self.b = nn.Linear(8, 3)

    def forward(self, x, use="a"):
        return getattr(self, use)(torch.relu(self.trunk(x)))


@pytest.mark.parametrize("method", ["crystallize", "bio_step"])
def test_unused_layer_keeps_its_rates_step_after_step(method):
    torch.manual_seed(0)
    model = BioConverter(fuzzy_learning_rate_factor_nu=0.2, dampening_factor=0.6)(TwoHeads())
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(4, 6)
    (model(x, use="a") + model(x, use="b")).sum().backward()  # every layer gets a gradient
    unused_before = model.b.bio_mod.fuzzy_learning_rate_parameters.clone()
    used_before = model.a.bio_mod.fuzzy_learning_rate_parameters.clone()
    for _ in range(5):
        opt.zero_grad(set_to_none=False)  # b's gradient is zeros, not None
        model(torch.randn(16, 6), use="a").pow(2).sum().backward()
        assert not model.b.weight.grad.any()
        getattr(model, method)()
        opt.step()
    torch.testing.assert_close(
        model.b.bio_mod.fuzzy_learning_rate_parameters, unused_before, rtol=0, atol=0
    )
    assert not torch.equal(model.a.bio_mod.fuzzy_learning_rate_parameters, used_before)


def test_zero_gradient_rule_on_the_fused_cpu_loop():
    """The opt-in compiled CPU loop reads the same gate (stats.grads_nonzero)."""
    saved = dict(cpu_fused._state)
    try:
        results = []
        for fused in (False, True):
            g0 = torch.Generator().manual_seed(3)
            w = [torch.randn(300, generator=g0) * 0.1 for _ in range(2)]
            g = [torch.zeros(300), torch.randn(300, generator=g0) * 0.01]
            p = [torch.ones(300), torch.ones(300)]
            with kernels.settings.override(cpu_fused=fused):
                backend = kernels.backend_module("cpu", torch.float32)
                params = StepParams(False, True, True, 0.1, 2.0, 0.2, 0.05, 0.6)
                backend.bio_step_(w, g, p, [1, 2], params)
            assert torch.equal(p[0], torch.ones(300)) and not torch.equal(p[1], torch.ones(300))
            results.append(p)
        assert not cpu_fused._state["broken"]
        for a, b in zip(*results):
            torch.testing.assert_close(b, a, rtol=0, atol=0)
    finally:
        cpu_fused._state.update(saved)


# ---------------------------------------------------------------------------------------------
# Item 2: the output layer, found from the forward pass
# ---------------------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.bn(self.conv1(x)))))


class ResNetStyle(nn.Module):
    """Stem, residual blocks, pooled classifier: the head is nested nowhere near the stem."""

    def __init__(self, classes=4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.blocks = nn.Sequential(Block(8), Block(8))
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class NetOut(nn.Module):
    """``self.net = Sequential(...)`` plus ``self.out``: upstream's rule never marks ``out``."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return torch.log_softmax(self.out(self.net(x)), dim=-1)


class HeadFirst(nn.Module):
    """The head is registered before the trunk: module order alone gets it wrong."""

    def __init__(self):
        super().__init__()
        self.classifier = nn.Linear(16, 4)
        self.trunk = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16))

    def forward(self, x):
        return self.classifier(torch.relu(self.trunk(x)))


def _logits(model):
    x = torch.randn(5, 3, 6, 6) if isinstance(model, ResNetStyle) else torch.randn(5, 6)
    return model(x)


def _marked(model):
    return sorted(n for n, m in model.named_modules() if getattr(m, "last_module_token", False))


def _assert_head_free(model, head):
    # Dale's principle leaves the head alone: its rows keep mixed signs
    w = getattr(model, head).weight
    assert ((w > 0).any(1) & (w < 0).any(1)).all()
    model.enforce_dales_principle()
    assert ((w > 0).any(1) & (w < 0).any(1)).all()
    # every other layer is constrained: one sign per output unit
    for name, layer in model._bio_layers:
        if name != head:
            rows = layer.weight.reshape(layer.weight.shape[0], -1)
            assert ((rows >= 0).all(1) | (rows <= 0).all(1)).all(), name


@pytest.mark.parametrize("cls, head", [(ResNetStyle, "fc"), (NetOut, "out")])
def test_head_found_by_forward_order_gives_distinct_logits(cls, head):
    torch.manual_seed(0)
    model = BioConverter(weight_splitting_Gamma=2, apply_dales_principle=True)(cls())
    out = _logits(model)
    assert _marked(model) == [head]
    assert not torch.allclose(out[:, 0], out[:, 1])  # not summed in pairs
    _assert_head_free(model, head)
    assert model.bio_summary().rows[-1]["note"] == "output layer"


def test_head_registered_first_is_found_at_the_first_forward_pass():
    """Module order guesses ``trunk.2``; the dry run moves the mark to ``classifier``. Dale
    had rewritten the classifier at conversion, which is said; naming the head avoids it."""
    torch.manual_seed(0)
    model = BioConverter(weight_splitting_Gamma=2, apply_dales_principle=True)(HeadFirst())
    assert _marked(model) == ["trunk.2"]
    with pytest.warns(UserWarning, match="head='classifier'"):
        out = _logits(model)
    assert _marked(model) == ["classifier"]
    assert not torch.allclose(out[:, 0], out[:, 1])
    # trunk.2 is an ordinary layer again: split, and Dale applied with its drawn signs
    rows = model.trunk[2].weight
    assert ((rows >= 0).all(1) | (rows <= 0).all(1)).all()
    model = BioConverter(weight_splitting_Gamma=2, apply_dales_principle=True, head="classifier")(
        HeadFirst()
    )
    out = _logits(model)
    assert not torch.allclose(out[:, 0], out[:, 1])
    _assert_head_free(model, "classifier")


def test_head_named_or_predicate_or_none():
    model = BioConverter(weight_splitting_Gamma=2, head="out")(NetOut())
    assert _marked(model) == ["out"]
    model = BioConverter(head=lambda name, m: name == "net.2")(NetOut())
    assert _marked(model) == ["net.2"]
    with pytest.warns(None) if False else _no_warning():
        model = BioConverter(weight_splitting_Gamma=2, head=None)(NetOut())
        out = _logits(model)
    assert _marked(model) == []
    assert torch.equal(out[:, 0], out[:, 1])  # asked for: the output is split too
    with pytest.raises(ValueError, match="no module named 'nope'"):
        BioConverter(head="nope")(NetOut())
    with pytest.raises(TypeError, match="head must be"):
        BioConverter(head=3)


def test_user_mark_is_kept():
    model = NetOut()
    BioConverter.set_last_module_token_for_module(model.net[2])
    BioConverter()(model)
    _logits(model)
    assert _marked(model) == ["net.2"]


def test_exclude_leaves_modules_plain():
    model = BioConverter(exclude="net")(NetOut())
    assert not hasattr(model.net[0], "bio_mod") and hasattr(model.out, "bio_mod")
    assert ("net.0", "Linear", "excluded") in model._bio_plan.skipped
    model = BioConverter(exclude=lambda name, m: name == "out")(NetOut())
    assert hasattr(model.net[0], "bio_mod") and not hasattr(model.out, "bio_mod")
    with pytest.raises(ValueError, match="exclude: no module named"):
        BioConverter(exclude=["net", "missing"])(NetOut())


def test_no_head_warns_for_a_bare_transformer_block():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
    with pytest.warns(UserWarning, match="MultiheadAttention"):
        model = BioConverter(weight_splitting_Gamma=2)(layer)
    with pytest.warns(UserWarning, match="no output layer"):
        model(torch.randn(2, 3, 8))
    assert _marked(model) == []  # linear2 feeds a residual sum: it is not the output layer
    assert model.linear2.bio_mod.config.weight_splitting_Gamma == 2


def test_head_search_does_not_touch_state_or_rng():
    torch.manual_seed(0)
    model = BioConverter(weight_splitting_Gamma=2)(ResNetStyle())
    buffers = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    x = torch.randn(2, 3, 6, 6)
    state = torch.get_rng_state()
    from bio_transformations.head import find_output_layer

    found = find_output_layer(model, (x,), {})
    assert found.output_module == "fc"
    assert found.ran[0] == "stem.0" and found.ran[-1] == "fc"
    assert torch.equal(torch.get_rng_state(), state)
    for k, v in buffers.items():
        assert torch.equal(model.state_dict()[k], v), k


import contextlib  # noqa: E402
import warnings  # noqa: E402


@contextlib.contextmanager
def _no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield
