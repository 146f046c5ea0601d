"""BioConverter: instances, classes, re-conversion, tokens, splitting, model-level methods."""

import copy
import pickle

import pytest
import torch
import torch.nn as nn

from bio_transformations import BioConfig, BioConverter, BioModule, Distribution
from bio_transformations.bio_module import split_output
from bio_transformations.model_methods import MODEL_METHODS

MODEL_LEVEL = [
    "rejuvenate_weights",
    "crystallize",
    "fuzzy_learning_rates",
    "volume_dependent_lr",
    "update_fuzzy_learning_rates",
    "rejuvenate_weights_old",
    "enforce_dales_principle",
    "add_weight_splitting_step",
]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 4 * 4, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        x = torch.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def test_instance_conversion_in_place_and_methods():
    model = Net()
    params_before = [id(p) for p in model.parameters()]
    out = BioConverter()(model)
    assert out is model
    for layer in (model.conv, model.fc1, model.fc2):
        assert isinstance(layer.bio_mod, BioModule)
        assert layer.bio_mod.get_parent() is layer
    for name in MODEL_LEVEL + ["bio_step"]:
        assert callable(getattr(model, name))
    assert set(MODEL_LEVEL) <= set(BioModule.exposed_functions)
    # Fix: rates are buffers, so the optimiser sees exactly the original parameters.
    assert [id(p) for p in model.parameters()] == params_before
    keys = model.state_dict().keys()
    assert "fc1.bio_mod.fuzzy_learning_rate_parameters" in keys


@pytest.mark.parametrize(
    "layer",
    [nn.Linear(5, 4), nn.Conv1d(2, 4, 3), nn.Conv2d(2, 4, 3), nn.Conv3d(2, 4, 3)],
    ids=["linear", "conv1d", "conv2d", "conv3d"],
)
def test_all_layer_kinds_are_converted(layer):
    model = nn.Sequential(layer)
    BioConverter()(model)
    assert isinstance(layer.bio_mod, BioModule)
    assert layer.bio_mod.fuzzy_learning_rate_parameters.shape == layer.weight.shape


def test_class_conversion_and_decorator():
    converter = BioConverter(fuzzy_learning_rate_factor_nu=0.3)

    class A(Net):
        pass

    A2 = converter(A)
    assert A2 is A
    a = A()
    assert a.fc1.bio_mod.config.fuzzy_learning_rate_factor_nu == 0.3
    assert hasattr(A, "crystallize")

    @BioConverter(dampening_factor=0.5)
    class B(Net):
        pass

    b = B()
    assert b.conv.bio_mod.config.dampening_factor == 0.5
    x = torch.randn(2, 1, 4, 4)
    b(x).sum().backward()
    b.fuzzy_learning_rates()
    b.crystallize()


def test_type_errors():
    with pytest.raises(
        TypeError, match="Unsupported type for module_class_or_instance: <class 'int'>"
    ):
        BioConverter().convert(3)
    with pytest.raises(TypeError, match="module_class must be a class; instead got: <class 'str'>"):
        BioConverter()._convert_class("x")


def test_reconversion_replaces_bio_mod_and_does_not_stack_hooks():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    BioConverter(fuzzy_lr_distribution=Distribution.BASELINE)(model)
    first = model[0].bio_mod
    BioConverter(fuzzy_lr_distribution=Distribution.UNIFORM, weight_splitting_Gamma=2)(model)
    assert model[0].bio_mod is not first
    assert model[0].bio_mod.config.weight_splitting_Gamma == 2
    assert len(model[0]._forward_hooks) == 1


def test_last_module_token():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    BioConverter.set_last_module_token_for_model(model)
    assert getattr(model[2], "last_module_token", False) is True
    assert not hasattr(model[0], "last_module_token")
    single = nn.Sequential(nn.Linear(3, 4))
    BioConverter.set_last_module_token_for_model(single)
    assert not hasattr(single[0], "last_module_token")
    layer = nn.Linear(2, 2)
    assert BioConverter.set_last_module_token_for_module(layer) is layer
    assert layer.last_module_token is True


def test_layer_adaptive_indices_are_set_before_rates_are_drawn():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(200, 200) for _ in range(4)])
    BioConverter(
        fuzzy_lr_distribution=Distribution.LAYER_ADAPTIVE, fuzzy_learning_rate_factor_nu=0.4
    )(model)
    spreads = []
    for i, layer in enumerate(model):
        cfg = layer.bio_mod.config
        assert (cfg.fuzzy_lr_layer_index, cfg.fuzzy_lr_total_layers) == (i, 4)
        p = layer.bio_mod.fuzzy_learning_rate_parameters
        # uniform with half-width nu*(1 - 0.5*i/4): the max deviation from 1 shows it
        half_width = 0.4 * (1 - 0.5 * i / 4)
        assert (p - 1).abs().max() <= half_width + 1e-6
        spreads.append((p - 1).abs().max().item())
    # Fix: upstream drew every layer with the full nu (plain uniform).
    assert spreads[3] < 0.4 * 0.9


def test_weight_splitting_linear_matches_formula():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    reference = copy.deepcopy(model)
    BioConverter(weight_splitting_Gamma=2, weight_splitting_activation_function=nn.Tanh())(model)
    x = torch.randn(5, 6)
    y = torch.tanh(reference[0](x))
    split = torch.repeat_interleave(y.view(-1, 8 // 2, 2).sum(2), 2, 1)
    expected = reference[2](torch.relu(split))  # the last layer is not split
    torch.testing.assert_close(model(x), expected)


def test_weight_splitting_conv_keeps_spatial_dims():
    y = torch.arange(2 * 4 * 3 * 3, dtype=torch.float32).view(2, 4, 3, 3)
    out = split_output(y, 2, nn.Identity(), 1)
    expected = torch.repeat_interleave(y.view(2, 2, 2, 3, 3).sum(2), 2, 1)
    torch.testing.assert_close(out, expected)


def test_weight_splitting_checks_the_grouped_dimension():
    # Fix: upstream checked in_features (6 here, divisible by 3) but grouped the 4 outputs.
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"weight_splitting_Gamma \(G\) must evenly divide"):
        BioConverter(weight_splitting_Gamma=3)(model)
    assert not hasattr(model[0], "bio_mod")  # nothing half-converted
    # The marked last layer (3 outputs) is neither split nor checked.
    ok = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3))
    BioConverter(weight_splitting_Gamma=2)(ok)
    assert ok(torch.randn(2, 5)).shape == (2, 3)


def test_add_weight_splitting_step_replaces_instead_of_stacking():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    BioConverter()(model)
    x = torch.randn(3, 4)
    plain = model(x)
    model.add_weight_splitting_step(2)
    once = model(x)
    model.add_weight_splitting_step(2)
    assert torch.equal(model(x), once)
    assert not torch.equal(once, plain)
    model.add_weight_splitting_step(4, nn.ReLU())
    y = torch.relu(model[0].__class__.forward(model[0], x))
    expected = model[1].__class__.forward(
        model[1], torch.repeat_interleave(y.view(-1, 2, 4).sum(2), 4, 1)
    )
    torch.testing.assert_close(model(x), expected)
    with pytest.raises(ValueError, match="must evenly divide"):
        model.add_weight_splitting_step(3)
    assert model[0].bio_mod.config.weight_splitting_Gamma == 4  # unchanged after the error


def test_activity_tracked_only_in_training():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    BioConverter(fuzzy_lr_distribution=Distribution.ACTIVITY, fuzzy_lr_dynamic=True)(model)
    counts = model[0].bio_mod.activation_count
    assert counts.shape == (6,)
    model.eval()
    model(torch.randn(5, 4))
    assert counts.sum() == 0  # Fix: upstream also counted during evaluation
    model.train()
    x = torch.randn(5, 4)
    expected = (model[0].__class__.forward(model[0], x).abs() > 0.01).sum(0)
    model(x)
    assert torch.equal(counts, expected)
    assert not torch.equal(
        model[0].bio_mod.fuzzy_learning_rate_parameters, torch.ones_like(model[0].weight)
    )


def test_model_level_methods_call_one_op_per_group(monkeypatch):
    from bio_transformations.kernels import torch_backend

    calls = []
    original = torch_backend.crystallize_
    monkeypatch.setattr(
        torch_backend,
        "crystallize_",
        lambda w, *a, **k: (calls.append(len(w)), original(w, *a, **k)),
    )
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(6)])
    BioConverter()(model)
    model(torch.randn(2, 8)).sum().backward()
    model.crystallize()
    assert calls == [6]


def test_model_level_missing_grad_names_the_layer_and_frozen_layers_are_skipped():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3))
    BioConverter()(model)
    with pytest.raises(RuntimeError, match=r"No gradients found for the weights of layer '0'"):
        model.fuzzy_learning_rates()
    model[0].weight.requires_grad_(False)
    model(torch.randn(2, 3)).sum().backward()
    model.fuzzy_learning_rates()
    model.crystallize()
    with pytest.raises(RuntimeError, match="Weights do not require gradients"):
        model[0].bio_mod.crystallize()


def test_converted_models_deepcopy_and_pickle():
    model = Net()
    BioConverter(weight_splitting_Gamma=2)(model)
    x = torch.randn(2, 1, 4, 4)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone.fc1.bio_mod.get_parent() is clone.fc1
        torch.testing.assert_close(clone(x), model(x))
        clone(x).sum().backward()
        clone.fuzzy_learning_rates()
        assert model.fc1.weight.grad is None  # the copy's methods act on the copy


def test_from_dict_and_update_config():
    conv = BioConverter.from_dict({"dampening_factor": 0.3, "fuzzy_lr_distribution": "normal"})
    assert conv.get_config().dampening_factor == 0.3
    assert conv.get_config().fuzzy_lr_distribution is Distribution.NORMAL
    conv.update_config(crystal_thresh=1e-3)
    assert conv.get_config().crystal_thresh == 1e-3
    assert BioConverter(config=BioConfig(base_lr=0.2)).get_config().base_lr == 0.2
    assert set(MODEL_METHODS) >= set(MODEL_LEVEL)


@pytest.mark.parametrize("dist", [Distribution.TEMPORAL, Distribution.WEIGHT_ADAPTIVE])
def test_model_level_rate_updates_group_layers_and_match_per_layer(dist, monkeypatch):
    from bio_transformations.kernels import torch_backend

    def build():
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(6, 6) for _ in range(5)])
        return BioConverter(
            fuzzy_lr_distribution=dist, fuzzy_lr_dynamic=True, fuzzy_lr_update_freq=1
        )(model)

    grouped, per_layer = build(), build()
    op = "temporal_update_" if dist is Distribution.TEMPORAL else "weight_adaptive_"
    calls = []
    original = getattr(torch_backend, op)
    monkeypatch.setattr(torch_backend, op, lambda p, *a: (calls.append(len(p)), original(p, *a)))
    for _ in range(10):  # update 10 adds the temporal noise too
        grouped.update_fuzzy_learning_rates()
        for layer in per_layer:
            layer.bio_mod.update_fuzzy_learning_rates()
    assert calls[:1] == [5] and calls.count(5) == 10 and calls.count(1) == 50
    for a, b in zip(grouped, per_layer):
        assert torch.equal(
            a.bio_mod.fuzzy_learning_rate_parameters, b.bio_mod.fuzzy_learning_rate_parameters
        )
