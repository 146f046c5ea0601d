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
