"""Which layers are converted: transposed linear layers (transformers' ``Conv1D``), the tied
weight policy, the conversion log line and ``bio_summary()``."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from bio_transformations import BioConverter, BioModule, Distribution
from bio_transformations.kernels import torch_backend
from bio_transformations.layers import (
    is_convertible,
    is_transposed_linear,
    out_dim,
    out_units,
    plan_conversion,
    unit_major,
)
from bio_transformations.model_methods import MODEL_METHODS, bio_layers
from bio_transformations.summary import BioSummary

LOGGER = "bio_transformations"


class DuckConv1D(nn.Module):
    """A transposed linear layer that is not transformers' class: found by duck typing."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


class Conv1DLookalike(nn.Module):
    """Named like transformers' layer but without its signature: not converted."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 6))


Conv1DLookalike.__name__ = "Conv1D"


# ---------------------------------------------------------------------------------------------
# Transposed linear layers
# ---------------------------------------------------------------------------------------------


def test_layout_table():
    for layer, dim, units in (
        (nn.Linear(3, 5), 0, 5),
        (nn.Conv2d(2, 7, 3), 0, 7),
        (Conv1D(5, 3), 1, 5),
        (DuckConv1D(6, 2), 1, 6),
    ):
        assert is_convertible(layer)
        assert out_dim(layer) == dim and out_units(layer) == units
        assert unit_major(layer.weight, layer).shape[0] == units
    assert not is_transposed_linear(nn.Linear(3, 3))
    lookalike = Conv1DLookalike()
    assert not is_convertible(lookalike) and not is_transposed_linear(lookalike)
    assert not is_convertible(nn.Embedding(4, 3)) and not is_convertible(nn.LayerNorm(3))


def _pair(dtype=torch.float64):
    """A Conv1D model and the equal nn.Linear model (weight transposed), same conversion."""
    torch.manual_seed(0)
    conv = nn.Sequential(Conv1D(8, 6), nn.ReLU(), Conv1D(4, 8), nn.ReLU(), nn.Linear(4, 2))
    lin = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        for c, l in ((conv[0], lin[0]), (conv[2], lin[2])):
            l.weight.copy_(c.weight.t())
            l.bias.copy_(c.bias)
        lin[4].load_state_dict(conv[4].state_dict())
    models = []
    for model in (conv, lin):
        torch.manual_seed(1)  # the same layer seeds for both conversions
        models.append(
            BioConverter(
                fuzzy_lr_distribution=Distribution.ACTIVITY,
                fuzzy_lr_dynamic=True,
                apply_dales_principle=True,
                weight_splitting_Gamma=2,
                crystal_thresh=0.05,
            )(model.to(dtype))
        )
    return models


def test_transposed_layer_behaves_as_linear_with_transposed_weight():
    """Dale's signs, weight splitting, activity counts, row-wise rate redraws, crystallization
    and fuzzy scaling act on output units, which are weight dim 1 of a Conv1D."""
    conv, lin = _pair()
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (conv, lin)]
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        x = torch.randn(16, 6, generator=gen, dtype=torch.float64)
        outs = []
        for model, opt in zip((conv, lin), opts):
            opt.zero_grad()
            out = model(x)
            out.pow(2).sum().backward()
            model.fuzzy_learning_rates()
            model.crystallize()
            opt.step()
            model.enforce_dales_principle()
            outs.append(out)
        torch.testing.assert_close(outs[0], outs[1])
    for c, l in ((conv[0], lin[0]), (conv[2], lin[2])):
        cb, lb = c.bio_mod, l.bio_mod
        assert cb.sign.shape == (1, c.nf) and torch.equal(cb.sign.t(), lb.sign)
        assert torch.equal(cb.activation_count, lb.activation_count)
        torch.testing.assert_close(c.weight.t(), l.weight)
        torch.testing.assert_close(
            cb.fuzzy_learning_rate_parameters.t(), lb.fuzzy_learning_rate_parameters
        )
        # Dale: every output unit (a column of the Conv1D weight) keeps its sign.
        assert bool((c.weight * cb.sign >= 0).all())
        assert cb.activation_count.sum() > 0
        assert not torch.equal(cb.fuzzy_learning_rate_parameters, torch.ones_like(c.weight))


def test_splitting_checks_output_units_of_transposed_layer():
    with pytest.raises(ValueError, match="has 6 outputs"):
        BioConverter(weight_splitting_Gamma=4)(nn.Sequential(Conv1D(6, 8), nn.Linear(6, 2)))
    model = nn.Sequential(Conv1D(8, 6), nn.Linear(8, 2))
    BioConverter(weight_splitting_Gamma=4)(model)
    y = model[0](torch.randn(3, 6))
    torch.testing.assert_close(y[:, 0], y[:, 3])  # groups of 4 along the output features


def test_duck_typed_transposed_layer_is_converted():
    model = nn.Sequential(DuckConv1D(4, 3), nn.ReLU(), nn.Linear(4, 2))
    BioConverter(apply_dales_principle=True)(model)
    assert isinstance(model[0].bio_mod, BioModule)
    assert model[0].bio_mod.sign.shape == (1, 4)  # broadcasts against the (in, out) weight
    assert bool((model[0].weight * model[0].bio_mod.sign >= 0).all())


# ---------------------------------------------------------------------------------------------
# Tied weights
# ---------------------------------------------------------------------------------------------


class TinyLM(nn.Module):
    """Token embedding, one hidden layer, and an output head tied to the embedding."""

    def __init__(self, vocab=10, dim=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.hidden = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens):
        return self.head(torch.relu(self.hidden(self.emb(tokens))))


def test_head_tied_to_embedding_is_skipped_by_default(caplog):
    model = TinyLM()
    with caplog.at_level(logging.INFO, logger=LOGGER):
        BioConverter()(model)
    assert not hasattr(model.head, "bio_mod")
    assert [name for name, *_ in bio_layers(model)] == ["hidden"]
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert lines == [
        "converted 1 layers (Linear 1); skipped: Embedding x1 (embedding), head (tied to emb)"
    ]
    emb_before = model.emb.weight.detach().clone()
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    model.bio_step(crystallize=False)
    model.rejuvenate_weights()
    assert torch.equal(model.emb.weight, emb_before)  # the mechanisms leave the embedding alone


def test_head_tied_to_embedding_included_on_request():
    model = BioConverter(include_tied=True)(TinyLM())
    assert isinstance(model.head.bio_mod, BioModule)
    assert [name for name, *_ in bio_layers(model)] == ["hidden", "head"]
    assert model.bio_summary().rows[1]["note"] == "output layer; tied to emb"
    # Converting again with the default policy takes the head's mechanisms away again.
    BioConverter()(model)
    assert "bio_mod" not in model.head._modules
    assert [name for name, *_ in bio_layers(model)] == ["hidden"]
    model(torch.tensor([[1, 2]])).sum().backward()  # the head's hook stays, doing nothing


class Siamese(nn.Module):
    """Two Linear layers holding one weight parameter (and a third, independent one)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(torch.relu(self.b(torch.relu(self.a(x)))))


def _recording(monkeypatch):
    """Record the tensor-list arguments of every torch_backend op call."""
    calls = []
    for op in ("fuzzy_scale_", "crystallize_", "volume_scale_", "bio_step_", "rejuvenate_",
               "rejuvenate_legacy_", "dale_enforce_", "temporal_update_"):  # fmt: skip
        original = getattr(torch_backend, op)

        def spy(*args, _original=original, _op=op, **kwargs):
            calls.append((_op, [a for a in args if isinstance(a, (list, tuple))]))
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch_backend, op, spy)
    return calls


def test_shared_weight_gets_each_mechanism_once(monkeypatch):
    torch.manual_seed(0)
    model = Siamese()
    BioConverter(
        apply_dales_principle=True,
        weight_splitting_Gamma=2,
        fuzzy_lr_distribution=Distribution.TEMPORAL,
        fuzzy_lr_dynamic=True,
        fuzzy_lr_update_freq=1,
    )(model)
    assert model.b.bio_mod is model.a.bio_mod  # one BioModule: rates, signs, counters
    assert [name for name, *_ in bio_layers(model)] == ["a", "out"]
    y = model.b(torch.randn(3, 6))
    torch.testing.assert_close(y[:, 0], y[:, 1])  # the sharing layer's output is split too
    calls = _recording(monkeypatch)
    model(torch.randn(4, 6)).sum().backward()
    g = model.a.weight.grad.clone()
    model.fuzzy_learning_rates()
    torch.testing.assert_close(
        model.a.weight.grad, g * model.a.bio_mod.fuzzy_learning_rate_parameters
    )  # scaled once, not twice
    model.crystallize()
    model.volume_dependent_lr()
    model.bio_step(volume=True)
    model.update_fuzzy_learning_rates()
    model.rejuvenate_weights()
    model.rejuvenate_weights_old()
    model.enforce_dales_principle()
    assert {op for op, _ in calls} >= {"fuzzy_scale_", "rejuvenate_", "dale_enforce_"}
    for op, lists in calls:
        for tensors in lists:
            tensors = [t for t in tensors if torch.is_tensor(t)]
            ptrs = [t.data_ptr() for t in tensors if t.numel()]
            assert len(ptrs) == len(set(ptrs)), f"{op} saw one tensor twice"
    # rates, sign and extra state under a, b (the shared module, like the shared weight) and out
    state = model.state_dict()
    assert len(state) == len(Siamese().state_dict()) + 3 * 3
    fresh = BioConverter(apply_dales_principle=True)(Siamese())
    fresh.load_state_dict(state)
    assert fresh.b.bio_mod is fresh.a.bio_mod
    assert torch.equal(fresh.a.bio_mod.sign, model.a.bio_mod.sign)


def test_methods_list_each_weight_once_even_across_conversions(monkeypatch):
    """Two parts converted separately, tied to each other: a model-level method called on the
    parent (whose layers the converter did not record) still acts on the weight once."""
    parent = nn.ModuleDict({"enc": nn.Linear(4, 4), "dec": nn.Linear(4, 4)})
    parent["dec"].weight = parent["enc"].weight
    BioConverter()(parent["enc"])
    BioConverter()(parent["dec"])
    assert parent["dec"].bio_mod is not parent["enc"].bio_mod
    assert [name for name, *_ in bio_layers(parent)] == ["enc"]
    calls = _recording(monkeypatch)
    MODEL_METHODS["rejuvenate_weights"](parent)
    assert [len(lists[0]) for op, lists in calls if op == "rejuvenate_"] == [1]


# ---------------------------------------------------------------------------------------------
# The conversion summary
# ---------------------------------------------------------------------------------------------


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.fc1 = nn.Linear(4 * 4 * 4, 8)
        self.proj = Conv1D(8, 8)
        self.fc2 = nn.Linear(8, 3)


def test_conversion_logs_one_line(caplog):
    with caplog.at_level(logging.INFO, logger=LOGGER):
        BioConverter()(Mixed())
    lines = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert lines == [
        "converted 4 layers (Conv2d 1, Linear 2, Conv1D 1); "
        "skipped: Embedding x1 (embedding), BatchNorm2d x1 (normalisation)"
    ]


def test_bio_summary_table_and_rows():
    model = BioConverter(apply_dales_principle=True, weight_splitting_Gamma=2)(Mixed())
    summary = model.bio_summary()
    assert isinstance(summary, BioSummary) and len(summary) == 4
    rows = summary.rows
    assert [r["layer"] for r in rows] == ["conv", "fc1", "proj", "fc2"]
    assert rows[2] == {
        "layer": "proj",
        "type": "Conv1D",
        "shape": (8, 8),
        "rates_mean": pytest.approx(model.proj.bio_mod.fuzzy_learning_rate_parameters.mean()),
        "rates_min": pytest.approx(model.proj.bio_mod.fuzzy_learning_rate_parameters.min()),
        "rates_max": pytest.approx(model.proj.bio_mod.fuzzy_learning_rate_parameters.max()),
        "distribution": "uniform",
        "splitting": 2,
        "dale": True,
        "note": "weight (in, out)",
    }
    assert rows[3]["splitting"] == 1 and rows[3]["dale"] is False
    assert rows[3]["note"] == "output layer"
    text = str(summary)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["layer", "type", "shape"]
    assert set(lines[1]) == {"-", " "}
    assert lines[4].split()[:3] == ["proj", "Conv1D", "8x8"]
    assert lines[-1] == ("not converted: Embedding x1 (embedding), BatchNorm2d x1 (normalisation)")
    assert repr(summary) == text
    one = model.fc1.bio_mod.bio_summary()
    assert len(one) == 1 and one.rows[0]["shape"] == (8, 64)


def test_nothing_converted_warns():
    with pytest.warns(UserWarning, match="no layer of Sequential was converted"):
        BioConverter()(nn.Sequential(nn.ReLU(), nn.LayerNorm(3)))
    with pytest.warns(UserWarning, match="no layer of ReLU was converted"):
        model = BioConverter()(nn.ReLU())
    assert "(no converted layers)" in str(model.bio_summary())


def test_bio_summary_is_a_model_method_and_exposed():
    assert "bio_summary" in MODEL_METHODS
    assert set(BioModule.exposed_functions) == set(MODEL_METHODS)


def test_plan_of_a_gpt2_style_block():
    """The plan alone, on transformers' own layer type."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(16, 8)
            self.ln = nn.LayerNorm(8)
            self.c_attn = Conv1D(24, 8)
            self.c_proj = Conv1D(8, 8)
            self.lm_head = nn.Linear(8, 16, bias=False)
            self.lm_head.weight = self.wte.weight

    plan = plan_conversion(Block())
    assert [n for n, _ in plan.convert] == ["c_attn", "c_proj"]
    assert plan.skipped == [
        ("wte", "Embedding", "embedding"),
        ("ln", "LayerNorm", "normalisation"),
        ("lm_head", "Linear", "tied to wte"),
    ]
    assert [n for n, _ in plan_conversion(Block(), include_tied=True).convert][-1] == "lm_head"


def test_compiled_forward_of_transposed_layers_matches_eager():
    """The layout decisions trace: torch.compile(fullgraph=True) of a converted Conv1D model
    with weight splitting and activity tracking, without recompiling, equals eager mode."""
    import copy

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = BioConverter(
        weight_splitting_Gamma=2,
        fuzzy_lr_distribution=Distribution.ACTIVITY,
        fuzzy_lr_dynamic=True,
    )(nn.Sequential(Conv1D(8, 8), nn.ReLU(), Conv1D(2, 8)))
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(5, 8)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(3):
            torch.testing.assert_close(compiled(x), eager(x))
    for a, b in zip(model.state_dict().values(), eager.state_dict().values()):
        if torch.is_tensor(a):
            assert torch.equal(a, b)
    assert model[0].bio_mod.activation_count.sum() > 0
