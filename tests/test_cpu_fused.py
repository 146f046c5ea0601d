"""BIO_CPU_FUSED=1: the opt-in fused CPU loop (torch.compile) matches the eager ops."""

import pytest
import torch

from bio_transformations import kernels
from bio_transformations.kernels import StepParams, cpu_fused

STEP = StepParams(True, True, True, 0.1, 2.0, 0.2, 1e-3, 0.6)


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(n, generator=g) * 2 - 1) / 45
    return w, torch.randn(n, generator=g) * 0.01, 1 + 0.1 * torch.rand(n, generator=g)


def run(fused, op):
    with kernels.settings.override(cpu_fused=fused):
        backend = kernels.backend_module("cpu", torch.float32)
        assert (backend is cpu_fused) == (fused and cpu_fused.usable())
        (w, g, p), (w2, g2, p2) = data(5000, 0), data(77, 1)
        if op == "bio_step":
            backend.bio_step_([w, w2], [g, g2], [p, p2], [3, 4], STEP)
        elif op == "crystallize":
            backend.crystallize_([w, w2], [g, g2], [p, p2], 1e-3, 0.6)
        else:
            backend.volume_scale_([w, w2], [g, g2], [3, 4], 0.1, 2.0, 0.2)
    return g, p, g2, p2


@pytest.fixture
def fused_state():
    saved = dict(cpu_fused._state)
    yield cpu_fused._state
    cpu_fused._state.update(saved)


@pytest.mark.parametrize("op", ["bio_step", "crystallize", "volume"])
def test_fused_loop_matches_eager(op, monkeypatch, fused_state):
    eager = run(False, op)
    fused = run(True, op)
    assert not fused_state["broken"], "the fused loop fell back to eager"
    for a, b in zip(eager, fused):
        # same formulas in the same order; exp may differ by an ulp after fusion
        torch.testing.assert_close(b, a, rtol=2e-7, atol=0)


def test_compile_failure_falls_back_with_a_warning(monkeypatch, fused_state):
    def broken(*args):
        raise RuntimeError("no C++ compiler")

    eager = run(False, "bio_step")
    fused_state["compiled"] = broken
    with kernels.settings.override(cpu_fused=True):
        assert kernels.backend_for("cpu") == "cpu_fused"
        with pytest.warns(RuntimeWarning, match="eager ops from now on"):
            (w, g, p), (w2, g2, p2) = data(5000, 0), data(77, 1)
            cpu_fused.bio_step_([w, w2], [g, g2], [p, p2], [3, 4], STEP)
        fallback = g, p, g2, p2
        assert fused_state["broken"]
        assert kernels.backend_for("cpu") == "torch"  # it reports what runs now
    for a, b in zip(eager, fallback):
        assert torch.equal(a, b)
