"""BioConfig, Distribution and config validation (API.md: BioConfig, its Fix)."""

import subprocess
import sys

import pytest
import torch.nn as nn

import bio_transformations
from bio_transformations import BioConfig, BioConverter, BioModule
from bio_transformations.bio_config import (
    DEFAULT_BIO_CONFIG,
    BioConfigError,
    Distribution,
    validate_config,
)

EXPECTED_FIELDS = [
    ("fuzzy_learning_rate_factor_nu", 0.16),
    ("dampening_factor", 0.6),
    ("crystal_thresh", 4.5e-05),
    ("rejuvenation_parameter_dre", 8.0),
    ("weight_splitting_Gamma", 0),
    ("apply_dales_principle", False),
    ("base_lr", 0.1),
    ("stability_factor", 2.0),
    ("lr_variability", 0.2),
    ("fuzzy_lr_distribution", Distribution.UNIFORM),
    ("fuzzy_lr_min", 0.5),
    ("fuzzy_lr_max", 2.0),
    ("fuzzy_lr_dynamic", False),
    ("fuzzy_lr_decay", 0.9995),
    ("fuzzy_lr_update_freq", 100),
    ("fuzzy_lr_layer_index", -1),
    ("fuzzy_lr_total_layers", -1),
]


def test_imports_of_the_published_package_work():
    from bio_transformations.bio_config import BioConfig as A  # noqa: F401
    from bio_transformations.bio_converter import BioConverter as B  # noqa: F401
    from bio_transformations.bio_module import BioModule as C  # noqa: F401

    assert isinstance(bio_transformations.__version__, str)


def test_fields_order_and_defaults():
    assert BioConfig._fields[0] == "weight_splitting_activation_function"
    assert isinstance(DEFAULT_BIO_CONFIG.weight_splitting_activation_function, nn.Identity)
    assert [(f, getattr(DEFAULT_BIO_CONFIG, f)) for f in BioConfig._fields[1:]] == EXPECTED_FIELDS
    assert DEFAULT_BIO_CONFIG == BioConfig()
    assert BioConfig()._replace(base_lr=0.5).base_lr == 0.5


def test_distribution_values():
    assert [d.value for d in Distribution] == [
        "baseline",
        "uniform",
        "normal",
        "lognormal",
        "gamma",
        "beta",
        "layer_adaptive",
        "weight_adaptive",
        "temporal",
        "activity",
    ]
    assert Distribution("gamma") is Distribution.GAMMA
    assert Distribution.NORMAL == "normal"  # a str Enum


UPSTREAM_CHECKS = [
    ({"fuzzy_learning_rate_factor_nu": 0}, "fuzzy_learning_rate_factor_nu must be positive"),
    ({"dampening_factor": 1.5}, "dampening_factor must be between 0 and 1"),
    ({"dampening_factor": -0.1}, "dampening_factor must be between 0 and 1"),
    ({"crystal_thresh": 0}, "crystal_thresh must be positive"),
    ({"rejuvenation_parameter_dre": -1.0}, "rejuvenation_parameter_dre must be positive"),
    ({"weight_splitting_Gamma": -1}, "weight_splitting_Gamma cannot be negative"),
    (
        {"weight_splitting_activation_function": 3},
        "weight_splitting_activation_function must be Callable",
    ),
    ({"base_lr": 1.5}, "base_lr must be between 0 and 1"),
    ({"stability_factor": 0}, "stability_factor must be positive"),
    ({"lr_variability": 0}, "lr_variability must be positive"),
]

NEW_CHECKS = [
    ({"fuzzy_lr_min": 2.5, "fuzzy_lr_max": 2.0}, "fuzzy_lr_min must be <= fuzzy_lr_max"),
    ({"fuzzy_lr_update_freq": 0}, "fuzzy_lr_update_freq must be a positive int"),
    ({"fuzzy_lr_decay": 0.0}, "fuzzy_lr_decay must be in"),
    ({"fuzzy_lr_decay": 1.5}, "fuzzy_lr_decay must be in"),
    ({"fuzzy_lr_distribution": "zipf"}, "fuzzy_lr_distribution must be one of"),
]


@pytest.mark.parametrize("kwargs,message", UPSTREAM_CHECKS + NEW_CHECKS)
def test_bad_values_fail_at_converter_time(kwargs, message):
    # Fix: upstream only asserted when the first layer was converted.
    with pytest.raises(AssertionError, match=message):
        BioConverter(**kwargs)
    with pytest.raises(ValueError, match=message):
        BioConverter(config=BioConfig(**kwargs))
    with pytest.raises(BioConfigError, match=message):
        BioModule(lambda: nn.Linear(2, 2), BioConfig(**kwargs))


def test_update_config_and_from_dict_validate():
    converter = BioConverter()
    with pytest.raises(BioConfigError, match="base_lr must be between 0 and 1"):
        converter.update_config(base_lr=2.0)
    assert converter.get_config().base_lr == 0.1  # unchanged after the failed update
    with pytest.raises(BioConfigError, match="crystal_thresh must be positive"):
        BioConverter.from_dict({"crystal_thresh": -1.0})
    with pytest.raises(ValueError, match="unknown BioConfig field.*not_a_field"):
        BioConverter(not_a_field=1)


def test_distribution_given_as_string_is_coerced():
    c = validate_config(BioConfig(fuzzy_lr_distribution="lognormal"))
    assert c.fuzzy_lr_distribution is Distribution.LOGNORMAL


def test_parent_checks():
    with pytest.raises(AssertionError, match="parent must be a Callable returning"):
        BioModule(nn.Linear(2, 2)(__import__("torch").zeros(2)))
    with pytest.raises(AssertionError, match="parent output must be an instance of nn.Module"):
        BioModule(lambda: 3)


def test_validation_survives_python_O(tmp_path):
    code = (
        "from bio_transformations import BioConverter\n"
        "try:\n    BioConverter(base_lr=5.0)\nexcept ValueError as e:\n    print('raised', e)\n"
    )
    # cwd outside the checkout: `python -c` puts cwd first on sys.path, where the repository's
    # bio_transformations/ (without its kernels/) would shadow an installed (non-editable) copy
    out = subprocess.run(
        [sys.executable, "-O", "-c", code], cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "raised base_lr must be between 0 and 1 (got 5.0)" in out.stdout
