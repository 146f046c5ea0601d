"""Initial fuzzy learning rates follow their documented distributions (KS tests)."""

import math

import pytest
import torch
from scipy import stats

from bio_transformations.kernels import torch_backend as tb

N = 20000
NU = 0.16


def draw(dist, key=1234, nu=NU):
    p = torch.empty(N)
    tb.rates_init_([p], [key], dist, nu, -100.0, 100.0)  # wide clamp: test the raw law
    return p.double().numpy()


REFERENCE = {
    "uniform": stats.uniform(loc=1 - NU, scale=2 * NU).cdf,
    "normal": stats.norm(loc=1, scale=NU).cdf,
    "lognormal": stats.lognorm(s=NU, scale=math.exp(-NU * NU / 2)).cdf,
    # Gamma(concentration 1/nu, rate 1/nu): mean 1 (the fix drops upstream's "1 +")
    "gamma": stats.gamma(a=1 / NU, scale=NU).cdf,
    "beta": lambda x: stats.beta(1 / NU, 1 / NU).cdf((x - 1 + NU) / (2 * NU)),
}


@pytest.mark.parametrize("mode", ["torch", "philox"])
@pytest.mark.parametrize("dist", sorted(REFERENCE))
def test_kolmogorov_smirnov(dist, mode, bio_settings):
    bio_settings(rng=mode)
    sample = draw(dist)
    result = stats.kstest(sample, REFERENCE[dist])
    assert result.pvalue > 1e-3, (dist, mode, result)


@pytest.mark.parametrize("mode", ["torch", "philox"])
def test_volume_factor_is_folded_normal(mode, bio_settings):
    bio_settings(rng=mode)
    w = torch.zeros(N)  # v = 0, m = base_lr
    g = torch.ones(N)
    tb.volume_scale_([w], [g], [77], 0.1, 2.0, 0.2)
    ref = stats.foldnorm(c=1 / 0.2, scale=0.1 * 0.2).cdf  # |N(0.1, 0.02)|
    assert stats.kstest(g.double().numpy(), ref).pvalue > 1e-3


def test_keys_give_independent_streams():
    a, b = draw("uniform", key=1), draw("uniform", key=2)
    assert abs(stats.pearsonr(a, b)[0]) < 0.05
    assert (draw("uniform", key=1) == a).all()  # same key, same draw


def test_baseline_is_ones():
    assert (draw("baseline") == 1).all()
