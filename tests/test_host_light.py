"""The host-light model-level ``bio_step()`` (issue 15): launch count, host time, and that the
cached path (``bio_transformations.step_cache``) computes what ``functional.bio_step`` does and
notices every change it must.

Host time is measured on CPU tensors with the Triton backend in its interpreter and every
Triton kernel's launch replaced by a counter (``benchmarks/host_step.py``'s
``stub_launches``): what is timed is the Python
the call runs on the host, nothing the kernels would do. The minimum over many calls is taken
(the machine is shared and noisy; the minimum is the least disturbed call)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from bio_transformations import BioConverter, functional, step_cache
from bio_transformations.kernels import use_backend
from bio_transformations.model_methods import bio_layers

trb = pytest.importorskip("bio_transformations.kernels.triton")
if not trb.INTERPRETED and not torch.cuda.is_available():
    pytest.skip("Triton can run neither compiled nor interpreted here", allow_module_level=True)
DEVICE = torch.device("cpu" if trb.INTERPRETED else "cuda")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from host_step import stub_launches  # noqa: E402  (the benchmark's method, not a copy)

#: The issue's targets for the model-level bio_step() on a 100-layer model.
MAX_LAUNCHES = 3
TARGET_HOST_US = 50.0
#: What the test asserts: the target with room for a shared 2-core machine under load (the
#: uncached path takes ~1000 µs for the same call, so this still fails on any regression to
#: per-layer planning). benchmarks/host_step.py reports the figure itself.
ASSERT_HOST_US = 3 * TARGET_HOST_US


class OpRecorder(TorchDispatchMode):
    """Records the name of every aten op dispatched while it is active (``.ops``)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _model(layers=100, width=16, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])
    model = BioConverter()(model).to(DEVICE)
    for w in _weights(model):
        w.grad = torch.randn_like(w)
    return model


def _weights(model):
    return [layer.weight for _, layer, _ in bio_layers(model)]


def _rates(model):
    return [bio.fuzzy_learning_rate_parameters for *_, bio in bio_layers(model)]


def host_time_us(fn, calls=2000) -> float:
    """Minimum wall time of one call, in µs."""
    best = float("inf")
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e6


def test_bio_step_of_100_layers_is_3_launches_and_host_light():
    model = _model()
    with use_backend("triton"), stub_launches() as counts:
        model.bio_step()  # builds the cache
        counts.clear()
        model.bio_step()
        assert sum(counts.values()) <= MAX_LAUNCHES, dict(counts)
        assert dict(counts) == {"_crystal_partials": 1, "_crystal_finish": 1, "_step_kernel": 1}
        us = host_time_us(model.bio_step)
        slow = host_time_us(lambda: functional.bio_step(bio_layers(model)), calls=50)
    print(f"host time per bio_step() of 100 layers: {us:.1f} µs cached, {slow:.1f} µs uncached")
    assert us <= ASSERT_HOST_US, f"{us:.1f} µs per call"
    assert us < slow / 5


def test_no_torch_ops_per_call():
    """Steady state: nothing but the three Triton launches reaches the device (no statistics
    ops, no torch.stack, no key tensor)."""
    model = _model(layers=10)
    with use_backend("triton"), stub_launches():
        model.bio_step()
        model.bio_step(volume=True)
        with OpRecorder() as mode:
            model.bio_step()
        assert mode.ops == []
        with OpRecorder() as mode:
            model.bio_step(volume=True)
    # Volume scaling reads and advances each layer's CPU step counter (host scalars), makes
    # the keys a host tensor (lift_fresh) and sends them in one copy into the plan's buffer.
    counters = {"aten._local_scalar_dense.default", "aten.fill_.Scalar", "aten.lift_fresh.default"}
    assert [op for op in mode.ops if op not in counters] == ["aten.copy_.default"], mode.ops


def _run_both(change, volume=False, backend="triton", layers=6, width=40, seed=1):
    """The cached model-level call and ``functional.bio_step`` on twin models, with the same
    ``change`` applied before the second and third steps; returns both models' tensors."""
    out = []
    for cached in (True, False):
        model = _model(layers=layers, width=width, seed=seed)
        with use_backend(backend):
            for step in range(3):
                if step:
                    change(model, step)
                if cached:
                    model.bio_step(volume=volume)
                else:
                    functional.bio_step(bio_layers(model), volume=volume)
        grads = [w.grad for w in _weights(model)]
        out.append([t.detach().clone() for t in grads + _rates(model)])
    return out


def _new_grads(model, step):
    for w in _weights(model):  # autograd's zero_grad(set_to_none=True) then backward
        w.grad = torch.randn_like(w) * step


def _freeze_one(model, step):
    _new_grads(model, step)
    _weights(model)[2].requires_grad_(step != 1)


def _drop_a_grad(model, step):
    _new_grads(model, step)
    _weights(model)[3].grad = None


def _new_config(model, step):
    _new_grads(model, step)
    bio = bio_layers(model)[1][2]
    bio.config = bio.config._replace(dampening_factor=0.3)


def _replace_rates(model, step):
    _new_grads(model, step)
    bio = bio_layers(model)[4][2]
    bio.fuzzy_learning_rate_parameters.data = bio.fuzzy_learning_rate_parameters.data * 1.0


def _move_weight(model, step):
    """``.data = ...`` on a weight: same Parameter, new memory (no hook sees it); the
    gradients stay where they were, so only the weight's address tells."""
    w = _weights(model)[1]
    w.data = w.data.clone() * 0.5


def _transposed_grad(model, step):
    _new_grads(model, step)
    w = _weights(model)[0]
    w.grad = torch.randn_like(w).t().contiguous().t()


@pytest.mark.parametrize(
    "change",
    [_new_grads, _freeze_one, _new_config, _replace_rates, _move_weight, _transposed_grad],
    ids=lambda f: f.__name__,
)
@pytest.mark.parametrize("volume", [False, True], ids=["default", "volume"])
def test_cached_path_equals_functional(change, volume, bio_settings):
    bio_settings(rng="philox")
    cached, reference = _run_both(change, volume)
    for a, b in zip(cached, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_missing_grad_raises_like_functional():
    model = _model(layers=4)
    with use_backend("triton"):
        model.bio_step()
        _weights(model)[1].grad = None
        with pytest.raises(RuntimeError, match="No gradients found"):
            model.bio_step()
        model.bio_step(skip_missing_grads=True)


def _cpp_style_check(tensors, ptrs, index):
    """What CUDA builds of torch check addresses with (``torch._C.
    _tensors_data_ptrs_at_indices_equal``): a pybind cast, so a None raises RuntimeError."""
    for i in index:
        if tensors[i] is None:
            raise RuntimeError("Unable to cast Python instance of type NoneType to C++ type")
        if tensors[i].data_ptr() != ptrs[i]:
            return False
    return True


def test_missing_grad_raises_like_functional_with_the_cpp_address_check(monkeypatch):
    from bio_transformations.kernels.triton import prepared

    monkeypatch.setattr(prepared, "addresses_equal", _cpp_style_check)
    test_missing_grad_raises_like_functional()


def test_cache_is_not_copied_with_the_model():
    import copy

    model = _model(layers=3)
    with use_backend("triton"):
        model.bio_step()
    assert model in step_cache._caches
    twin = copy.deepcopy(model)
    assert twin not in step_cache._caches
    _new_grads(twin, 1)
    with use_backend("triton"):
        twin.bio_step()  # its own cache, its own tensors
    assert twin in step_cache._caches


def _misaligned(t):
    """``t``'s values in a view one element into a larger buffer (not 16-byte aligned: a
    DDP bucket view)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    return view


def _layers_of_sizes(dtype, nan=False, misaligned=False):
    gen = torch.Generator().manual_seed(3)
    shapes = [(1,), (1023,), (1025,), (40, 70), (3, 5, 3, 3)]
    ws = [(torch.randn(s, generator=gen) * 0.4).to(DEVICE, dtype) for s in shapes]
    if misaligned:  # the launch is unaligned; the other rows keep the vectorised body
        ws[3] = _misaligned(ws[3])
    for w in ws:
        w.view(-1)[::13] *= 5.0  # beyond [-1, 1]
        if nan and w.numel() > 5:
            w.view(-1)[4] = float("nan")
    return ws


@pytest.mark.parametrize("misaligned", [False, True], ids=["aligned", "misaligned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_statistics_pass_matches_stats(dtype, misaligned):
    """The reduction kernels give kernels.stats' numbers (to float32 rounding): mean|w| and
    the gradient gate for crystallization; cleaning plus (std, mu, sigma) for rejuvenation.
    Also in a launch with a misaligned tensor (alignment is decided per row)."""
    from bio_transformations.kernels import stats
    from bio_transformations.kernels.triton import launch, reduce

    ws = _layers_of_sizes(dtype, misaligned=misaligned)
    gs = [torch.randn_like(w) for w in ws]
    gs[2].zero_()
    if misaligned:
        gs[1] = _misaligned(gs[1])
    group = launch.groups([ws, gs], [])[0]
    assert group.plan.aligned is not misaligned
    got = reduce.crystallize_stats(group)["stats"].view(-1, 2)
    means, nonzero = stats.crystallize_stats(ws, gs)
    torch.testing.assert_close(got[:, 0], torch.stack(means).float(), rtol=2e-6, atol=0)
    assert got[:, 1].tolist() == torch.stack(nonzero).float().tolist() == [1, 1, 0, 1, 1]

    ws = _layers_of_sizes(dtype, nan=True, misaligned=misaligned)
    ref = [w.clone() for w in ws]
    stats.clean_weights_(ref)
    group = launch.groups([ws], [], written=(0,))[0]
    assert group.plan.aligned is not misaligned
    got = reduce.rejuvenation_stats(group)["stats"].view(-1, 3)
    for w, r in zip(ws, ref):  # cleaned in place, bit for bit
        torch.testing.assert_close(w, r, rtol=0, atol=0)
    want = torch.stack([torch.stack(stats.rejuvenation_stats(r)) for r in ref]).float()
    torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-6)


def test_rejuvenation_is_one_statistics_pass():
    """rejuvenate_ on 5 layers: the counts' zero fill, then 3 launches (statistics pass with
    cleaning, its finish, the kernel): no per-layer statistics ops, no stack."""
    ws = _layers_of_sizes(torch.float32, nan=True)
    with stub_launches() as counts:
        trb.rejuvenate_(ws, list(range(len(ws))), 8.0)
        counts.clear()
        with OpRecorder() as mode:
            trb.rejuvenate_(ws, list(range(len(ws))), 8.0)
    assert dict(counts) == {
        "_rejuvenation_partials": 1, "_rejuvenation_finish": 1, "_rejuvenate_kernel": 1,
    }  # fmt: skip
    # the counts tensor, and the keys: a host tensor (lift_fresh) copied into the plan's buffer
    assert mode.ops == ["aten.zeros.default", "aten.lift_fresh.default", "aten.copy_.default"]


def test_cached_path_with_several_groups_and_layouts(bio_settings):
    """A conv net in channels_last with one bfloat16 layer and a frozen one: several launch
    groups (by dtype), permuted layouts, a skipped layer; the cached call equals the
    functional one over three steps with fresh gradients each step."""
    bio_settings(rng="philox")

    def build():
        torch.manual_seed(2)
        model = nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8, 6),
            nn.Linear(6, 5), nn.Linear(5, 4),
        )  # fmt: skip
        model = BioConverter()(model).to(DEVICE)
        model[0].to(memory_format=torch.channels_last)
        model[4].to(torch.bfloat16)
        model[5].weight.requires_grad_(False)
        return model

    out = []
    for cached in (True, False):
        model = build()
        gen = torch.Generator().manual_seed(5)
        with use_backend("triton"):
            for _ in range(3):
                for w in _weights(model):
                    w.grad = torch.randn(w.shape, generator=gen).to(DEVICE, w.dtype)
                    if w.dim() == 4 and w is model[0].weight:
                        w.grad = w.grad.contiguous(memory_format=torch.channels_last)
                if cached:
                    model.bio_step(volume=True)
                else:
                    functional.bio_step(bio_layers(model), volume=True)
        out.append([t.detach().clone() for t in [w.grad for w in _weights(model)] + _rates(model)])
        if cached:  # two launch groups (float32, bfloat16), both prepared, the frozen one out
            (step,) = step_cache._caches[model].values()
            assert len(step.groups) == 2 and all(g.prepared for g in step.groups)
            assert sum(len(g.index) for g in step.groups) == 4
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _to_float64(model, step):
    """``model.double()``: weights keep their Parameter objects, buffers (the rates) are new."""
    model.double()
    for w in _weights(model):
        w.grad = torch.randn_like(w) * step


def _assign_new_rates(model, step):
    """Plain assignment of a new rates tensor (no registration hook sees it)."""
    _new_grads(model, step)
    bio = bio_layers(model)[2][2]
    bio.fuzzy_learning_rate_parameters = bio.fuzzy_learning_rate_parameters.clone() * 0.5


@pytest.mark.parametrize("change", [_to_float64, _assign_new_rates], ids=lambda f: f.__name__)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cached_path_follows_replaced_rates_buffers(change, backend, bio_settings):
    """The cache must act on the rates the model holds now, on every backend: ``model.double()``
    and assignment replace buffers without a registration hook."""
    bio_settings(rng="philox")
    out = _run_both(change, True, backend, layers=4, width=24, seed=2)
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
