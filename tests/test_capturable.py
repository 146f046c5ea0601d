"""Graph-safe launches (issue 15): the ``capturable`` mode's device-side keys and step
counters, capture-safe plans, the least-recently-used plan cache, and aliased tensors.

CUDA graphs themselves need a GPU (``benchmarks/gpu_check.py``'s ``cuda_graph`` and
``cuda_graph_capturable`` checks); here the Triton kernels run in the interpreter and what can
be checked without a GPU is: the keys the device derives are the host's, capturable calls draw
what eager calls draw, the counters advance on the device only, and a table built while
"capturing" is refused."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from bio_transformations import BioConverter, functional, step_cache
from bio_transformations.kernels import philox, settings, use_backend
from bio_transformations.model_methods import bio_layers

trb = pytest.importorskip("bio_transformations.kernels.triton")
if not trb.INTERPRETED and not torch.cuda.is_available():
    pytest.skip("Triton can run neither compiled nor interpreted here", allow_module_level=True)
DEVICE = torch.device("cpu" if trb.INTERPRETED else "cuda")

from bio_transformations.kernels.triton import keys as device_keys  # noqa: E402
from bio_transformations.kernels.triton import launch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from host_step import stub_launches  # noqa: E402
from test_host_light import OpRecorder, _weights  # noqa: E402
from test_host_light import _model as host_light_model  # noqa: E402


def _model(seed=0, layers=3):
    """A few 20-wide bio Linear layers with gradients (the host-light tests' model)."""
    return host_light_model(layers=layers, width=20, seed=seed)


def _steps(model):
    return [bio._rng_step for *_, bio in bio_layers(model)]


def _state(model):
    rates = [bio.fuzzy_learning_rate_parameters for *_, bio in bio_layers(model)]
    return [t.detach().clone() for t in [w.grad for w in _weights(model)] + rates]


def test_device_keys_are_the_host_keys():
    """The derive kernel computes philox.stream_key (splitmix64 on uint64) bit for bit,
    including seeds with the top bit set, and advances each counter by one."""
    rng = random.Random(0)
    seeds = [rng.getrandbits(64) for _ in range(5)] + [0, (1 << 64) - 1]
    starts = [rng.getrandbits(40) for _ in seeds]
    steps = [torch.tensor(s, dtype=torch.int64) for s in starts]
    w = [torch.zeros(3, device=DEVICE) for _ in seeds]
    plan = launch.groups([w], [])[0].plan
    keys = device_keys.DeviceKeys(steps, seeds, op_id=1).derive(plan, list(range(len(w))))
    got = keys.view(-1, 2)[:, 0].cpu().tolist()
    want = [philox.to_signed64(philox.stream_key(s, n, 1)) for s, n in zip(seeds, starts)]
    assert got == want
    counters = [int(device_keys.device_step(s, DEVICE)) for s in steps]
    assert counters == [n + 1 for n in starts]
    assert [int(s) for s in steps] == starts  # the CPU counters did not move


@pytest.mark.parametrize("path", ["model", "functional"])
def test_capturable_calls_draw_what_eager_calls_draw(path, bio_settings):
    """Two capturable steps give exactly what two eager steps give from the same counters."""
    bio_settings(rng="philox")
    results, counters = [], []
    for capturable in (False, True):
        model = _model()
        start = [int(s) for s in _steps(model)]
        with use_backend("triton"), settings.override(capturable=capturable):
            for _ in range(2):
                if path == "model":
                    model.bio_step(volume=True)
                else:
                    functional.bio_step(bio_layers(model), volume=True)
        results.append(_state(model))
        counters.append((start, [int(s) for s in _steps(model)]))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    (start, eager_end), (cap_start, cap_end) = counters
    assert eager_end == [n + 2 for n in start]
    assert cap_end == cap_start  # capturable: the CPU counters stay put...
    model_steps = _steps(model)
    on_device = [int(device_keys.device_step(s, DEVICE)) for s in model_steps]
    assert on_device == [n + 2 for n in cap_start]  # ...the device counters advanced
    step_cache.sync_steps(model)
    assert [int(s) for s in model_steps] == on_device


def test_capturable_after_sync_continues_the_eager_stream(bio_settings):
    """capturable, sync, eager: the same three draws as three eager steps."""
    bio_settings(rng="philox")
    eager, mixed = _model(), _model()
    with use_backend("triton"):
        for _ in range(3):
            eager.bio_step(volume=True)
        with settings.override(capturable=True):
            mixed.bio_step(volume=True)
            mixed.bio_step(volume=True)
        step_cache.sync_steps(mixed)
        mixed.bio_step(volume=True)
    for a, b in zip(_state(eager), _state(mixed)):
        assert torch.equal(a, b)


def test_capturable_step_is_host_free():
    """A capturable call touches no host counter and makes no host tensor: only launches."""
    model = _model()
    with use_backend("triton"), settings.override(capturable=True), stub_launches() as counts:
        model.bio_step(volume=True)
        counts.clear()
        with OpRecorder() as mode:
            model.bio_step(volume=True)
    assert mode.ops == []
    assert dict(counts) == {
        "_derive_keys": 1, "_crystal_partials": 1, "_crystal_finish": 1, "_step_kernel": 1,
    }  # fmt: skip


def test_no_table_is_built_while_capturing(monkeypatch):
    """A launch whose table is cached runs under capture (and marks its plan captured); one
    that would build a table raises CaptureError instead of pinning host memory mid-capture."""
    w = [torch.ones(1, 5, device=DEVICE), torch.ones(1, 7, device=DEVICE)]  # one unit each
    s = [torch.ones(1, device=DEVICE), -torch.ones(1, device=DEVICE)]
    trb.dale_enforce_(w, s)  # warm-up: builds the table
    monkeypatch.setattr(launch, "capturing", lambda device: True)
    trb.dale_enforce_(w, s)
    assert any(p.captured for p in launch._plans.values())
    with pytest.raises(launch.CaptureError, match="once eagerly"):
        trb.dale_enforce_([torch.ones(1, 9, device=DEVICE)], [torch.ones(1, device=DEVICE)])


def test_plan_cache_is_least_recently_used_and_keeps_captured_plans(monkeypatch):
    monkeypatch.setattr(launch, "_plans", type(launch._plans)())
    monkeypatch.setattr(launch, "_MAX_PLANS", 3)
    tensors = [torch.ones(1, 4 + i, device=DEVICE) for i in range(6)]  # one unit each
    signs = [torch.ones(1, device=DEVICE)]

    def use(i):
        trb.dale_enforce_([tensors[i]], signs)

    use(0)
    launch._plans[next(iter(launch._plans))].captured = True  # as if a graph read plan 0
    use(1)
    use(2)
    use(1)  # 1 is now more recent than 2
    use(3)  # full: evicts the least recently used plan a graph does not hold: 2
    cached = [k[6][0] for k in launch._plans]  # each key's first address
    ptrs = [t.data_ptr() for t in tensors]
    assert cached == [ptrs[0], ptrs[1], ptrs[3]]


def test_aliased_tensors_are_rejected():
    """The same tensor twice in one call (or overlapping views) would race: a clear error."""
    g = torch.ones(8, device=DEVICE)
    p = torch.ones(8, device=DEVICE)
    with pytest.raises(launch.AliasError, match="share memory"):
        trb.fuzzy_scale_([g, g], [p, p])
    base = torch.ones(16, device=DEVICE)
    with pytest.raises(launch.AliasError, match="tensors 0 and 1"):
        trb.fuzzy_scale_([base[:10], base[6:]], [p[:10].clone(), p.clone()])
    # Read-only sharing is fine: one rates tensor scaling two gradients.
    trb.fuzzy_scale_([torch.ones(8, device=DEVICE), torch.ones(8, device=DEVICE)], [p, p])


def test_tied_weights_run_once_at_model_level():
    """Tied layers (one weight in two layers) reach the op once (bio_layers dedupes them)."""
    torch.manual_seed(0)
    model = BioConverter()(nn.Sequential(nn.Linear(20, 20), nn.Linear(20, 20))).to(DEVICE)
    model[1].weight = model[0].weight
    model[0].weight.grad = torch.randn_like(model[0].weight)
    model[1].bias.grad = None
    with use_backend("triton"):
        model.bio_step()  # no AliasError
        functional.bio_step(bio_layers(model))
