"""BIO_CPU_FUSED=1: the opt-in fused CPU loop (torch.compile) matches the eager ops."""

import pytest
import torch

from bio_transformations.kernels import torch_backend as tb

SCALARS = (0.1, 2.0, 0.2, 1e-3, 0.6)


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(n, generator=g) * 2 - 1) / 45
    return w, torch.randn(n, generator=g) * 0.01, 1 + 0.1 * torch.rand(n, generator=g)


def run(fused, monkeypatch, op):
    monkeypatch.setenv("BIO_CPU_FUSED", "1" if fused else "0")
    (w, g, p), (w2, g2, p2) = data(5000, 0), data(77, 1)
    if op == "bio_step":
        tb.bio_step_([w, w2], [g, g2], [p, p2], [3, 4], True, True, True, *SCALARS)
    elif op == "crystallize":
        tb.crystallize_([w, w2], [g, g2], [p, p2], 1e-3, 0.6)
    else:
        tb.volume_scale_([w, w2], [g, g2], [3, 4], 0.1, 2.0, 0.2)
    return g, p, g2, p2


@pytest.fixture
def fused_state():
    saved = dict(tb._fused_state)
    yield tb._fused_state
    tb._fused_state.update(saved)


@pytest.mark.parametrize("op", ["bio_step", "crystallize", "volume"])
def test_fused_loop_matches_eager(op, monkeypatch, fused_state):
    eager = run(False, monkeypatch, op)
    fused = run(True, monkeypatch, op)
    assert fused_state["enabled"], "the fused loop fell back to eager"
    for a, b in zip(eager, fused):
        # same formulas in the same order; exp may differ by an ulp after fusion
        torch.testing.assert_close(b, a, rtol=2e-7, atol=0)


def test_compile_failure_falls_back_with_a_warning(monkeypatch, fused_state):
    def broken(*args):
        raise RuntimeError("no C++ compiler")

    eager = run(False, monkeypatch, "bio_step")
    fused_state["compiled"] = broken
    with pytest.warns(RuntimeWarning, match="using the eager ops"):
        fallback = run(True, monkeypatch, "bio_step")
    assert not fused_state["enabled"]
    for a, b in zip(eager, fallback):
        assert torch.equal(a, b)
