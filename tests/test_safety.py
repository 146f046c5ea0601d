"""Safe by default: no silent no-ops, unused layers keep their rates, the right
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


# ---------------------------------------------------------------------------------------------
# Item 3: attention modules
# ---------------------------------------------------------------------------------------------


def test_multihead_attention_weights_are_skipped_with_a_warning():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.out = nn.Linear(8, 3)

        def forward(self, x):
            return self.out(self.attn(x, x, x)[0].mean(1))

    with pytest.warns(UserWarning, match="in_proj_weight and out_proj"):
        model = BioConverter(weight_splitting_Gamma=2)(Attn())
    assert not hasattr(model.attn.out_proj, "bio_mod") and hasattr(model.out, "bio_mod")
    reasons = {name: reason for name, _, reason in model._bio_plan.skipped}
    assert reasons == {"attn": "attention", "attn.out_proj": "in attention"}
    model(torch.randn(2, 4, 8))
    assert _marked(model) == ["out"]


def test_transformer_encoder_layer_hooks_run_and_linear2_is_not_the_head():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True, dropout=0.0)
    with pytest.warns(UserWarning):
        model = BioConverter(weight_splitting_Gamma=2)(layer)
    seen = []
    from torch._subclasses.fake_tensor import FakeTensor

    def keep_real(module, inputs, output):  # the dry run shows hooks fake tensors, once
        if not isinstance(output, FakeTensor):
            seen.append(output)

    model.linear2.register_forward_hook(keep_real)
    with pytest.warns(UserWarning, match="no output layer"):
        model(torch.randn(2, 3, 8))
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 8))  # hooks keep the fast path off: linear2's hook runs
    assert len(seen) == 2
    assert torch.equal(seen[1][..., 0], seen[1][..., 1])  # split
    assert not getattr(model.linear2, "last_module_token", False)


# ---------------------------------------------------------------------------------------------
# Item 4: no silent no-ops
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [nn.ReLU(), nn.Sequential(nn.LayerNorm(4), nn.Tanh())])
def test_nothing_converted_warns(model):
    with pytest.warns(UserWarning, match="no layer of .* was converted"):
        BioConverter()(model)


@pytest.mark.parametrize("distribution", ["activity", "temporal"])
def test_static_dynamic_distribution_warns(distribution):
    with pytest.warns(UserWarning, match="fuzzy_lr_dynamic=True"):
        BioConverter(fuzzy_lr_distribution=distribution)(nn.Linear(3, 2))
    with _no_warning():
        BioConverter(fuzzy_lr_distribution=distribution, fuzzy_lr_dynamic=True)(nn.Linear(3, 2))


def test_dale_warns_that_it_rewrites_weights():
    with pytest.warns(UserWarning, match="pretrained weights are changed"):
        BioConverter(apply_dales_principle=True)(NetOut())


@pytest.mark.parametrize(
    "text, value",
    [("1", True), ("true", True), ("Yes", True), ("on", True), ("0", False), ("false", False)]
    + [("no", False), ("OFF", False), (" off ", False)],
)
def test_boolean_settings_accept_the_usual_words(text, value):
    from bio_transformations.kernels.settings import Settings

    assert Settings.from_environ({"BIO_CPU_FUSED": text}).cpu_fused is value


@pytest.mark.parametrize("text", ["2", "enable", "disabled", "y", "tru"])
def test_boolean_settings_reject_anything_else(text):
    from bio_transformations.kernels.settings import Settings

    with pytest.raises(ValueError, match="BIO_CPU_FUSED must be a boolean"):
        Settings.from_environ({"BIO_CPU_FUSED": text})


# ---------------------------------------------------------------------------------------------
# Item 8: unconvert, plain checkpoints
# ---------------------------------------------------------------------------------------------


def test_unconvert_leaves_a_plain_model():
    from bio_transformations import plain_state_dict, unconvert

    torch.manual_seed(0)
    plain_keys = set(NetOut().state_dict())
    model = BioConverter(weight_splitting_Gamma=2)(NetOut())
    x = torch.randn(3, 6)
    model(x)
    assert unconvert(model) is model
    assert set(model.state_dict()) == plain_keys
    assert not any(hasattr(model, name) for name in ("crystallize", "bio_step", "_bio_layers"))
    for module in model.modules():
        assert not hasattr(module, "bio_mod") and not module._forward_hooks
        assert not getattr(module, "last_module_token", False)
    out = model.net(x)  # no splitting any more
    assert not torch.equal(out[:, 0], out[:, 1])
    fresh = NetOut()
    fresh.load_state_dict(model.state_dict())  # strict
    converted = BioConverter()(NetOut())
    NetOut().load_state_dict(plain_state_dict(converted.state_dict()))


def test_converted_model_loads_a_plain_checkpoint_with_one_info_line(caplog):
    pretrained = NetOut()
    model = BioConverter(fuzzy_learning_rate_factor_nu=0.3)(NetOut())
    rates = model.out.bio_mod.fuzzy_learning_rate_parameters.clone()
    seed = model.out.bio_mod.layer_seed
    with caplog.at_level("INFO", logger="bio_transformations"):
        result = model.load_state_dict(pretrained.state_dict())  # strict=True
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(model.out.weight, pretrained.out.weight)
    assert torch.equal(model.out.bio_mod.fuzzy_learning_rate_parameters, rates)
    assert model.out.bio_mod.layer_seed == seed
    lines = [r for r in caplog.records if "without bio state" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelname == "INFO"
    assert "3 converted layer(s)" in lines[0].getMessage()
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


# ---------------------------------------------------------------------------------------------
# Item 7: packaging and the triton version check
# ---------------------------------------------------------------------------------------------


def test_triton_is_not_a_hard_requirement():
    from importlib.metadata import requires

    requirements = requires("bio-transformations")  # the installed metadata
    hard = [r for r in requirements if "extra ==" not in r]
    assert hard and not [r for r in hard if r.startswith("triton")]
    assert [r for r in requirements if r.startswith("triton>=3.6") and 'extra == "triton"' in r]


@pytest.mark.parametrize(
    "text, parsed",
    [
        ("3.6.0", (3, 6, 0)),
        ("3.8.0+git1a2b", (3, 8, 0)),
        ("3.10", (3, 10)),
        ("3.6.0rc1", (3, 6, 0)),
    ],
)
def test_version_parsing(text, parsed):
    assert kernels._version_tuple(text) == parsed


def test_old_triton_falls_back_to_torch_with_one_info_line(monkeypatch, caplog):
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(triton, "__version__", "3.0.0")
    monkeypatch.setattr(kernels, "_triton_module", None)
    monkeypatch.setattr(kernels, "_triton_import_error", None)
    with caplog.at_level("INFO", logger="bio_transformations"):
        assert not kernels.triton_available()
        assert not kernels.triton_available()  # remembered: said once
        assert kernels.backend_for("cuda") == "torch"
    lines = [r for r in caplog.records if "older than 3.6" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelname == "INFO"
    with kernels.use_backend("triton"), pytest.raises(kernels.BackendError, match="older than"):
        kernels.backend_for("cuda")
