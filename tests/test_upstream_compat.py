"""Drop-in compatibility: code written against the published package runs unchanged.

Each test is written the way users of ``pytorch_bio_transformations`` 0.0.5 write their code
and tests (including the ``match=`` texts)."""

import copy
import pickle

import pytest
import torch
import torch.nn as nn

from bio_transformations import BioConverter, BioModule
from bio_transformations.bio_config import BioConfig, Distribution


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 6)
        self.conv = nn.Conv2d(2, 4, 3)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


# -- 1. Dale's sign broadcasts against the weight -------------------------------------------


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.Linear(5, 5), (5, 1)),
        (nn.Conv1d(2, 4, 3), (4, 1, 1)),
        (nn.Conv2d(2, 4, 3), (4, 1, 1, 1)),
        (nn.Conv3d(2, 4, 3), (4, 1, 1, 1, 1)),
    ],
)
def test_sign_broadcasts_against_the_weight(layer, shape):
    torch.manual_seed(0)
    bio = BioModule(lambda: layer, BioConfig(apply_dales_principle=True))
    assert bio.sign.shape == shape
    # Upstream users' idiom: one sign per output unit, applied along the output axis.
    signed = bio.sign * layer.weight
    assert signed.shape == layer.weight.shape
    assert (signed >= 0).all()
    # A square Linear: the product must follow rows (output units), not columns.
    if isinstance(layer, nn.Linear):
        rows = layer.weight.detach() * bio.sign.view(-1)[:, None]
        assert torch.equal(signed.detach(), rows)


def test_old_one_dimensional_and_upstream_signs_still_load():
    torch.manual_seed(0)
    model = BioConverter(apply_dales_principle=True)(Net())
    state = model.state_dict()
    for key, old in (
        ("fc1.bio_mod.sign", state["fc1.bio_mod.sign"].view(-1)),  # ours, earlier
        (
            "conv.bio_mod.sign",
            state["conv.bio_mod.sign"].view(4, 1, 1, 1).expand(4, 2, 1, 1).clone(),
        ),
    ):  # fmt: skip  upstream: per (out, in)
        fresh = BioConverter(apply_dales_principle=True)(Net())
        legacy = dict(state)
        legacy[key] = old
        fresh.load_state_dict(legacy)
        assert torch.equal(fresh.state_dict()[key], state[key])


# -- 2. The missing-sign error ----------------------------------------------------------------


def test_enforce_without_sign_raises_upstreams_error():
    bio = BioModule(lambda: nn.Linear(3, 3), BioConfig(apply_dales_principle=True))
    del bio.sign
    with pytest.raises(
        AttributeError,
        match="sign attribute not found. Make sure dalian_network_initialization has been applied.",
    ):
        bio.enforce_dales_principle()


# -- 3. Validation accepts exactly upstream's ranges ------------------------------------------


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_dampening_factor_bounds_are_exclusive(value):
    with pytest.raises(AssertionError, match="dampening_factor must be between 0 and 1"):
        BioModule(lambda: nn.Linear(2, 2), BioConfig(dampening_factor=value))


@pytest.mark.parametrize("value", [0.0, 1.0])
def test_base_lr_bounds_are_exclusive(value):
    with pytest.raises(AssertionError, match="base_lr must be between 0 and 1"):
        BioModule(lambda: nn.Linear(2, 2), BioConfig(base_lr=value))


def test_values_inside_the_ranges_are_accepted():
    BioModule(lambda: nn.Linear(2, 2), BioConfig(dampening_factor=0.999, base_lr=1e-6))


# -- 4. Private helpers that upstream users call ----------------------------------------------


def test_count_learnable_layers_and_set_layer_indices():
    converter = BioConverter(fuzzy_lr_distribution=Distribution.LAYER_ADAPTIVE)
    model = Net()
    assert converter._count_learnable_layers(model) == 3
    converter(model)
    for module in (model.fc1, model.conv, model.fc2):
        module.bio_mod.config = module.bio_mod.config._replace(
            fuzzy_lr_layer_index=-1, fuzzy_lr_total_layers=-1
        )
    converter._set_layer_indices(model)
    indices = [m.bio_mod.config.fuzzy_lr_layer_index for m in (model.fc1, model.conv, model.fc2)]
    assert indices == [0, 1, 2]
    assert model.fc2.bio_mod.config.fuzzy_lr_total_layers == 3


def test_set_layer_indices_leaves_other_distributions_alone():
    converter = BioConverter()
    model = converter(Net())
    model.fc1.bio_mod.config = model.fc1.bio_mod.config._replace(fuzzy_lr_layer_index=-1)
    converter._set_layer_indices(model)
    assert model.fc1.bio_mod.config.fuzzy_lr_layer_index == -1


def test_initialize_fuzzy_learning_rate_parameters_redraws():
    bio = BioModule(lambda: nn.Linear(20, 20))
    before = bio.fuzzy_learning_rate_parameters.clone()
    bio._initialize_fuzzy_learning_rate_parameters()
    after = bio.fuzzy_learning_rate_parameters
    assert not torch.equal(before, after)
    nu = bio.config.fuzzy_learning_rate_factor_nu
    assert ((after >= 1 - nu) & (after <= 1 + nu)).all()


def test_weight_adaptive_fill_and_flag():
    layer = nn.Linear(30, 30)
    bio = BioModule(lambda: layer, BioConfig(fuzzy_lr_distribution=Distribution.WEIGHT_ADAPTIVE))
    assert bio.weight_adaptive_initialized is False
    assert (bio.fuzzy_learning_rate_parameters == 1).all()
    bio.update_fuzzy_learning_rates()
    assert bio.weight_adaptive_initialized is True
    filled = bio.fuzzy_learning_rate_parameters.clone()
    assert not (filled == 1).all()
    bio.update_fuzzy_learning_rates()  # not dynamic: no refill
    assert torch.equal(filled, bio.fuzzy_learning_rate_parameters)
    bio.weight_adaptive_initialized = False  # forces the fill on the next update
    bio.update_fuzzy_learning_rates()
    assert bio.weight_adaptive_initialized is True
    assert not torch.equal(filled, bio.fuzzy_learning_rate_parameters)
    refilled = bio.fuzzy_learning_rate_parameters.clone()
    bio._update_weight_adaptive_rates()  # the fill itself, directly
    assert not torch.equal(refilled, bio.fuzzy_learning_rate_parameters)
    scale = (2 - layer.weight.abs() / (layer.weight.abs().mean() + 1e-8)).clamp(0.5, 1.5)
    spread = (bio.fuzzy_learning_rate_parameters - 1).abs()
    assert (spread <= bio.config.fuzzy_learning_rate_factor_nu * scale + 1e-6).all()


# -- 5. parent is evaluated on every access ---------------------------------------------------


def test_parent_callable_is_called_on_every_access():
    layer = nn.Linear(4, 4)
    bio = BioModule(lambda: layer)
    replacement = nn.Linear(4, 4)
    layer = replacement  # the lambda closes over the variable, as upstream's does
    assert bio.get_parent() is replacement
    replacement.weight.grad = torch.ones_like(replacement.weight)
    bio.fuzzy_learning_rates()
    assert torch.equal(replacement.weight.grad, bio.fuzzy_learning_rate_parameters)


def test_converted_models_still_pickle_deepcopy_and_save(tmp_path):
    model = BioConverter(apply_dales_principle=True)(Net())
    for clone in (
        copy.deepcopy(model),
        pickle.loads(pickle.dumps(model)),
        torch.load(_saved(model, tmp_path), weights_only=False),
    ):
        assert clone.fc1.bio_mod.get_parent() is clone.fc1
        assert clone.fc1.bio_mod.get_parent() is not model.fc1


def _saved(model, tmp_path):
    path = tmp_path / "model.pt"
    torch.save(model, path)
    return path


# -- 6. Activity updates on custom layers -----------------------------------------------------


class WeightOnly(nn.Module):
    """A custom layer with a weight and no forward of its own."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 3))


def test_activity_update_on_a_layer_without_forward_does_not_crash():
    layer = WeightOnly()
    bio = BioModule(
        lambda: layer,
        BioConfig(fuzzy_lr_distribution=Distribution.ACTIVITY, fuzzy_lr_dynamic=True),
    )
    assert bio.activation_count.shape == (5,)  # units: the weight's first dimension
    bio.update_fuzzy_learning_rates(torch.randn(2, 3))
    assert (bio.activation_count == 0).all()
