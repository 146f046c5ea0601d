"""Every op on both backends: ``torch_backend`` in Philox mode against the Triton backend.

Without CUDA the Triton kernels run in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``
is set in ``conftest.py`` before triton loads); on a CUDA machine with the variable unset they
run compiled on ``cuda`` tensors. Kept small: the interpreter runs one program at a time.

What "agree" means (docs: "Backends and kernels"):

* pure arithmetic and uniform draws (fuzzy, Dale, temporal with and without noise,
  weight-adaptive, activity, baseline/uniform/gamma init): bit for bit;
* crystallization: bit for bit except where ``|g|`` lies within float32 rounding of
  ``mean|w|`` (the Triton backend sums ``|w|`` on the device in another order than torch);
* through exp/log/sqrt/cos/sin: within ``MAX_ULP`` units in the last place of the dtype;
* random decisions (rejuvenation, bio step's crystallization after the volume draw): identical
  except where the deciding quantity lies within ~1e-6 (relative) of its threshold; such
  elements are counted and must be rare.

Every comparison proves what ran: the ``launches`` fixture counts the launches of the Triton
kernels (found by scanning the Triton backend's module or modules), and each agreement test
asserts that the op launched exactly one kernel. Ops the Triton backend hands to the torch
backend (gamma/beta initial rates) are tested as *delegation tests*: they assert that
nothing launched, so they check the hand-over and never pass for an agreement they did not test.
"""

from __future__ import annotations

import collections
import importlib
import logging
import pkgutil

import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from bio_transformations import BioConverter, Distribution, kernels
from bio_transformations.kernels import StepParams, philox, stats
from bio_transformations.kernels import torch_backend as tb

trb = pytest.importorskip("bio_transformations.kernels.triton")
from bio_transformations.kernels.triton import launch  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() and not trb.INTERPRETED else "cpu")
if DEVICE.type == "cpu" and not trb.INTERPRETED:
    pytest.skip("no CUDA and TRITON_INTERPRET is off: Triton cannot run", allow_module_level=True)
with kernels.use_backend("triton"):
    trb = kernels.backend_module(DEVICE)  # the Triton backend, whatever its module layout


def _triton_modules():
    """The Triton backend's modules: each module of the ``kernels/triton/`` package."""
    found = []
    for name in ("bio_transformations.kernels.triton",):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        found.append(module)
        for info in pkgutil.walk_packages(getattr(module, "__path__", []), name + "."):
            found.append(importlib.import_module(info.name))
    return found


def _triton_kernels():
    """Every ``@triton.jit`` object defined in the backend's modules, by identity."""
    import triton.runtime.jit as jit

    found = {}
    for module in _triton_modules():
        for attr, value in vars(module).items():
            if isinstance(value, jit.KernelInterface):
                found[id(value)] = (value, f"{module.__name__}.{attr}")
    return found


_KERNELS = _triton_kernels()
assert _KERNELS, "no Triton kernels found in the Triton backend's modules"
_launches: collections.Counter = collections.Counter()


@pytest.fixture(autouse=True)
def launches(monkeypatch):
    """Count launches (``kernel[grid](...)``) of the backend's kernels, by kernel name.

    Patched on the kernel classes (``JITFunction``, or ``InterpretedFunction`` under
    ``TRITON_INTERPRET=1``), so the kernel objects themselves stay untouched and compile."""
    _launches.clear()
    for cls in {type(k) for k, _ in _KERNELS.values()}:
        original = cls.__getitem__

        def counting(self, grid, _original=original):
            known = _KERNELS.get(id(self))
            if known is not None and known[0] is self:
                _launches[known[1]] += 1
            return _original(self, grid)

        monkeypatch.setattr(cls, "__getitem__", counting)
    return _launches


def assert_launched(expected: int = 1):
    """The Triton side of the last comparison ran on Triton: ``expected`` launches of the ops'
    kernels (the statistics passes of ``kernels/triton/reduce.py``, two small launches before a
    kernel that reads per-layer statistics, are counted by ``tests/test_host_light.py``)."""
    total = sum(n for name, n in _launches.items() if ".reduce." not in name)
    assert total == expected, f"{total} Triton launches, expected {expected}: {dict(_launches)}"


def assert_delegated():
    """A delegation test: the Triton backend handed the op to torch (no kernel launched)."""
    assert not _launches, f"expected a hand-over to torch, but launched {dict(_launches)}"


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
#: Largest allowed distance in the dtype's ulps where a transcendental function is involved.
MAX_ULP = {torch.float32: 16, torch.float16: 1, torch.bfloat16: 1}
#: One call with all of these (a multi-tensor launch): empty, single, block +- 1, ~3000.
SIZES = [("c", (0,)), ("c", (1,)), ("c", (1023,)), ("c", (1025,)), ("c", (60, 50))]
#: One call with all of these: a transposed matrix, a channels_last conv weight, a view with
#: gaps (runs on a copy), and a conv weight whose grad is contiguous while w and p are not.
LAYOUTS = [("t", (30, 40)), ("cl", (6, 4, 3, 3)), ("gappy", (20, 16)), ("mixed", (5, 3, 2, 3))]
CASES = {"sizes": SIZES, "layouts": LAYOUTS}


@pytest.fixture(autouse=True)
def _philox(bio_settings):
    bio_settings(rng="philox")


# ---------------------------------------------------------------------------------------------
# Inputs: the same logical values in any layout, rebuilt for each backend
# ---------------------------------------------------------------------------------------------


def _layout(x: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "t":
        return x.t().contiguous().t()
    if kind == "cl":
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "gappy":
        base = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype, device=x.device)
        base[:, ::2] = x
        return base[:, ::2]
    return x


def _tensors(cases, dtype, seed=0, nan=False):
    """Per case a dict of w, g, p (shaped alike), s (+-1 per row) and c (counts per row);
    ``nan`` puts a NaN into each weight of more than 5 elements."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for kind, shape in cases:
        w = torch.randn(shape, generator=gen) * 0.1
        w.view(-1)[::97] *= 12.0  # a few weights beyond [-1, 1] for rejuvenation's clamp
        if nan and w.numel() > 5:
            w.view(-1)[5] = float("nan")
        g = torch.randn(shape, generator=gen) * 0.05
        p = 1.0 + 0.2 * (torch.rand(shape, generator=gen) - 0.5)
        rows = shape[0]
        s = torch.where(torch.rand(rows, generator=gen) < 0.5, 1.0, -1.0)
        c = torch.randint(0, 20, (rows,), generator=gen)
        t = {k: v.to(DEVICE, dtype) for k, v in (("w", w), ("g", g), ("p", p), ("s", s))}
        t["c"] = c.to(DEVICE)
        for k in ("w", "g", "p"):
            lay = "cl" if kind == "mixed" and k != "g" else kind
            t[k] = _layout(t[k], lay)
        out.append(t)
    return out


def _keys(n, op):
    return [philox.stream_key(1234, i, op) for i in range(n)]


def _params(volume, fuzzy, crystallize):
    return StepParams(volume, fuzzy, crystallize, 0.1, 2.0, 0.2, 0.05, 0.6)


def _both(run, case, dtype, nan=False):
    """``run(backend, tensors)`` on fresh identical inputs for each backend; its results. The
    launch counter then holds the launches of the Triton run alone."""
    cases = CASES[case]
    ref = run(tb, _tensors(cases, dtype, nan=nan))
    _launches.clear()
    return ref, run(trb, _tensors(cases, dtype, nan=nan))


# ---------------------------------------------------------------------------------------------
# Comparisons
# ---------------------------------------------------------------------------------------------


def _ordered(x: torch.Tensor) -> torch.Tensor:
    """Float bit patterns on a monotone integer line (int64), so differences count ulps."""
    bits = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}
    i = x.contiguous().view(bits[x.dtype]).to(torch.int64)
    low = -(2 ** (8 * x.element_size() - 1))
    return torch.where(i < 0, low - i, i)


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise distance in ulps of the dtype (0 where both are NaN)."""
    d = (_ordered(a) - _ordered(b)).abs()
    return torch.where(a.isnan() & b.isnan(), 0, d).view(a.shape)


def assert_bitwise(ref, got):
    for a, b in zip(ref, got):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True)


def assert_ulp(ref, got):
    worst = 0
    for a, b in zip(ref, got):
        assert a.shape == b.shape and a.dtype == b.dtype
        if a.numel():
            worst = max(worst, int(ulps(a, b).max()))
    assert worst <= MAX_ULP[ref[0].dtype], f"{worst} ulp apart"
    return worst


def assert_flips_rare(flips: torch.Tensor, near: torch.Tensor, what: str) -> int:
    """Elements whose decision differs must sit near the threshold, and be rare."""
    assert not (flips & ~near).any(), f"{what}: decisions differ away from the threshold"
    count = int(flips.sum())
    assert count <= 1 + 1e-3 * flips.numel(), f"{what}: {count} decisions differ"
    return count


# ---------------------------------------------------------------------------------------------
# Pure arithmetic and uniform draws: bit for bit
# ---------------------------------------------------------------------------------------------


def _fuzzy(B, ts):
    B.fuzzy_scale_([t["g"] for t in ts], [t["p"] for t in ts])
    return [t["g"] for t in ts]


def _crystallize(B, ts):
    B.crystallize_([t["w"] for t in ts], [t["g"] for t in ts], [t["p"] for t in ts], 0.05, 0.6)
    return [t["p"] for t in ts]


def _dale(B, ts):
    B.dale_enforce_([t["w"] for t in ts], [t["s"] for t in ts])
    return [t["w"] for t in ts]


def _temporal(B, ts):
    B.temporal_update_([t["p"] for t in ts], None, 0.9995, 0.0, 0.5, 2.0)
    return [t["p"] for t in ts]


def _temporal_noise(B, ts):
    B.temporal_update_([t["p"] for t in ts], _keys(len(ts), 5), 0.9, 0.016, 0.5, 2.0)
    return [t["p"] for t in ts]


def _adaptive(B, ts):
    B.weight_adaptive_([t["p"] for t in ts], [t["w"] for t in ts], _keys(len(ts), 6), 0.16, 0.5, 2)
    return [t["p"] for t in ts]


def _activity(B, ts):
    B.activity_update_([t["p"] for t in ts], [t["c"] for t in ts], _keys(len(ts), 7), 0.16, 0.5, 2)
    return [t["p"] for t in ts]


def _init(distribution):
    def run(B, ts):
        B.rates_init_([t["p"] for t in ts], _keys(len(ts), 4), distribution, 0.16, 0.5, 2.0)
        return [t["p"] for t in ts]

    return run


EXACT = {
    "fuzzy": _fuzzy,
    "dale": _dale,
    "temporal": _temporal,
    "temporal_noise": _temporal_noise,
    "weight_adaptive": _adaptive,
    "activity": _activity,
    "init_baseline": _init("baseline"),
    "init_uniform": _init("uniform"),
}
#: Ops the Triton backend hands to the torch backend (one-time draws with torch's samplers).
DELEGATED = {"init_gamma": _init("gamma"), "init_beta": _init("beta")}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", sorted(EXACT))
def test_bitwise_ops(op, dtype, case):
    ref, got = _both(EXACT[op], case, dtype)
    assert_launched()
    assert_bitwise(ref, got)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_crystallize(dtype, case):
    """Bit for bit, except that an element whose ``|g|`` is within float32 rounding of
    ``mean|w|`` may decide the other way: the Triton backend's ``mean|w|`` is a device reduction
    (``kernels/triton/reduce.py``) summed in another order than torch's, so it may differ in
    the last bit (compiled on a GPU; the interpreter happens to agree on these inputs)."""
    ref, got = _both(_crystallize, case, dtype)
    assert_launched()
    for t, a, b in zip(_tensors(CASES[case], dtype), ref, got):
        if not a.numel():
            continue
        ag = t["g"].float().abs()
        mean = stats.abs_means([t["w"]])[0].float()
        near = (ag - mean).abs() <= 1e-6 * mean
        assert_flips_rare(a != b, near, "crystallization at mean|w|")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", sorted(DELEGATED))
def test_delegation_ops(op, dtype):
    """Delegation test (torch on both sides): the hand-over happens and keeps the results."""
    ref, got = _both(DELEGATED[op], "sizes", dtype)
    assert_delegated()
    assert_bitwise(ref, got)


# ---------------------------------------------------------------------------------------------
# Through transcendental functions: within a few ulp
# ---------------------------------------------------------------------------------------------


def _volume(B, ts):
    w, g = [t["w"] for t in ts], [t["g"] for t in ts]
    B.volume_scale_(w, g, _keys(len(ts), 1), 0.1, 2.0, 0.2)
    return g


ULP = {"volume": _volume, "init_normal": _init("normal"), "init_lognormal": _init("lognormal")}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", sorted(ULP))
def test_ulp_ops(op, dtype, case):
    ref, got = _both(ULP[op], case, dtype)
    assert_launched()
    assert_ulp(ref, got)


# ---------------------------------------------------------------------------------------------
# Random decisions: identical except at the threshold
# ---------------------------------------------------------------------------------------------


def _rejuvenate(B, ts):
    w = [t["w"] for t in ts]
    counts = B.rejuvenate_(w, _keys(len(ts), 2), 8.0)
    return w, counts


def _rejuvenation_near(ts, dre=8.0):
    """Where the replacement draw lies within 1e-6 of its probability (cleaned inputs)."""
    near = []
    for t, key in zip(ts, _keys(len(ts), 2)):
        w = t["w"]
        stats.clean_weights_([w])
        if not w.numel():
            near.append(torch.zeros(w.shape, dtype=torch.bool, device=DEVICE))
            continue
        std = stats.rejuvenation_stats(w)[0]
        u = philox.element_uniforms(key, range(w.numel()), DEVICE).view(w.shape)
        near.append((u - torch.exp(-dre * w.float().abs() / std)).abs() <= 1e-6)
    return near


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rejuvenate(dtype, case):
    (ref_w, ref_n), (got_w, got_n) = _both(_rejuvenate, case, dtype, nan=True)
    assert_launched()
    assert got_n.dtype == torch.int64 and got_n.shape == (len(ref_w),)
    assert got_n.device == ref_w[0].device
    near = _rejuvenation_near(_tensors(CASES[case], dtype, nan=True))
    flips = 0
    for a, b, nr in zip(ref_w, got_w, near):
        assert a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride()
        flips += assert_flips_rare(ulps(a, b) > MAX_ULP[dtype], nr, "rejuvenation")
        assert torch.isfinite(b).all() and (b.abs() <= 1.0).all()
    assert int((ref_n - got_n).abs().sum()) <= flips
    assert int(got_n.sum()) > len(ref_w)  # replacements happen (NaNs always, plus small |w|)


def _legacy(B, ts):
    w = [t["w"] for t in ts]
    counts = B.rejuvenate_legacy_(w, _keys(len(ts), 3), 8.0)
    return w, counts


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rejuvenate_legacy(dtype, case):
    (ref_w, ref_n), (got_w, got_n) = _both(_legacy, case, dtype)
    assert_launched()
    flips = 0
    inputs = _tensors(CASES[case], dtype)
    for t, a, b, key in zip(inputs, ref_w, got_w, _keys(len(ref_w), 3)):
        if not a.numel():
            continue
        w = t["w"].float()
        z = philox.element_normals(key, range(w.numel()), DEVICE).view(w.shape)
        threshold = (z * (w.abs().amax() / 8.0)).abs()
        near = (w.abs() - threshold).abs() <= 1e-5 * threshold
        # (2*U - 1)*max|w| is plain arithmetic: bit for bit wherever the decision agrees
        flips += assert_flips_rare(ulps(a, b) > 0, near, "legacy rejuvenation")
    assert (ref_n - got_n).abs().sum() <= flips
    assert int(ref_n.sum()) > 0


def _step(volume, fuzzy, crystallize):
    def run(B, ts):
        w, g, p = ([t[k] for t in ts] for k in "wgp")
        keys = _keys(len(ts), 1)
        B.bio_step_(w, g, p, keys, _params(volume, fuzzy, crystallize))
        return g, p, w

    return run


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bio_step(dtype, case):
    (ref_g, ref_p, ref_w), (got_g, got_p, _) = _both(_step(True, True, True), case, dtype)
    assert_launched()
    assert_ulp(ref_g, got_g)
    rel = max(1e-5, 2 * torch.finfo(dtype).eps)  # |g| may differ by an ulp of its dtype
    for w, g, a, b in zip(ref_w, ref_g, ref_p, got_p):
        if not a.numel():
            continue
        aw, ag = w.float().abs(), g.float().abs()
        mean = stats.abs_means([w])[0]
        near = ((ag - 0.05 * aw).abs() <= rel * 0.05 * aw) | ((ag - mean).abs() <= rel * mean)
        assert_flips_rare(a != b, near, "crystallization after the volume draw")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_step_equals_separate_ops_on_triton(dtype):
    """One pass (volume + fuzzy + crystallize) gives what the three separate kernels give."""
    fused = _step(True, True, True)(trb, _tensors(SIZES + LAYOUTS, dtype))
    ts = _tensors(SIZES + LAYOUTS, dtype)
    w, g, p = ([t[k] for t in ts] for k in "wgp")
    trb.volume_scale_(w, g, _keys(len(ts), 1), 0.1, 2.0, 0.2)
    trb.fuzzy_scale_(g, p)
    trb.crystallize_(w, g, p, 0.05, 0.6)
    assert_launched(4)  # the fused kernel, then the three separate ones
    assert_bitwise(fused[0] + fused[1], g + p)


#: Ops whose float16/bfloat16 result must be the float32 computation rounded once (their
#: per-tensor statistics, if any, are the same for a half tensor and its float32 copy).
ROUNDED_ONCE = {
    "fuzzy": _fuzzy,
    "volume": _volume,
    "temporal_noise": _temporal_noise,
    "activity": _activity,
    "init_uniform": _init("uniform"),
    "init_normal": _init("normal"),
    "init_lognormal": _init("lognormal"),
    # (volume then fuzzy rounds between the two, as the separate ops do: not "once")
    "bio_step_volume": lambda B, ts: _step(True, False, False)(B, ts)[0],
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", sorted(ROUNDED_ONCE))
def test_half_precision_rounds_once_on_triton(op, dtype):
    """The Triton kernel on half tensors equals the same kernel on their (exact) float32
    copies, rounded once: catches a double rounding that a 1-ulp budget would let through."""
    half = _tensors(SIZES, dtype)
    wide = [{k: (v.float() if v.is_floating_point() else v) for k, v in t.items()} for t in half]
    got = ROUNDED_ONCE[op](trb, half)
    ref = [r.to(dtype) for r in ROUNDED_ONCE[op](trb, wide)]
    assert_launched(2)
    assert_bitwise(ref, got)


@pytest.mark.parametrize("flags", [(False, True, False), (False, False, True), (True, False, True)])
def test_bio_step_flags(flags):
    ref, got = _both(_step(*flags), "sizes", torch.float16)
    assert_launched()
    assert_bitwise(ref[2], got[2])  # w is never written
    if flags[0]:
        assert_ulp(ref[0], got[0])
    else:
        assert_bitwise(ref[0] + ref[1], got[0] + got[1])


# ---------------------------------------------------------------------------------------------
# Mechanics: one launch per call, cached tables, empty lists, float64
# ---------------------------------------------------------------------------------------------


def test_one_launch_per_call_and_cached_tables(monkeypatch):
    real_plan = launch.Plan
    built = []
    monkeypatch.setattr(launch, "Plan", lambda *a: built.append(1) or real_plan(*a))
    ts = _tensors(SIZES + LAYOUTS[:2], torch.float32)
    w, g, p = ([t[k] for t in ts] for k in "wgp")
    for _ in range(3):
        trb.bio_step_(w, g, p, _keys(len(ts), 1), _params(True, True, True))
    assert_launched(3)  # 7 tensors (one empty, two permuted), one launch per call
    assert len(built) == 1  # the second and third calls reuse the device tables


def test_empty_lists_and_empty_tensors():
    for op in (trb.fuzzy_scale_, trb.dale_enforce_):
        op([], [])
    trb.crystallize_([], [], [], 0.1, 0.5)
    trb.volume_scale_([], [], [], 0.1, 2.0, 0.2)
    trb.bio_step_([], [], [], [], _params(True, True, True))
    trb.temporal_update_([], None, 0.9, 0.0, 0.5, 2.0)
    trb.weight_adaptive_([], [], [], 0.16, 0.5, 2.0)
    trb.activity_update_([], [], [], 0.16, 0.5, 2.0)
    trb.rates_init_([], [], "uniform", 0.16, 0.5, 2.0)
    for op in (trb.rejuvenate_, trb.rejuvenate_legacy_):
        counts = op([], [], 8.0)
        assert counts.dtype == torch.int64 and counts.shape == (0,)
    empty = torch.empty(0, 3, device=DEVICE)
    assert trb.rejuvenate_([empty], [1], 8.0).tolist() == [0]


def test_float64_runs_on_the_torch_backend():
    """Triton has no float64 kernels: the dispatcher sends float64 to torch, and says so."""
    with kernels.use_backend("triton"):
        assert kernels.backend_for(DEVICE, torch.float64) == "torch"
        assert kernels.backend_module(DEVICE, torch.float64) is tb
        assert kernels.backend_for(DEVICE, torch.float32) == "triton"


# ---------------------------------------------------------------------------------------------
# A whole model through the public API, on both backends
# ---------------------------------------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc1 = nn.Linear(4 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.conv(x)).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def _model():
    torch.manual_seed(0)
    converter = BioConverter(
        fuzzy_lr_distribution=Distribution.TEMPORAL,
        fuzzy_lr_dynamic=True,
        fuzzy_lr_update_freq=1,
        apply_dales_principle=True,
        crystal_thresh=0.05,
    )
    model = converter(_Net()).to(DEVICE)
    model.conv.to(memory_format=torch.channels_last)  # a permuted layout at model level
    return model


class _TransposedNet(nn.Module):
    """GPT-2's layer type: transformers' Conv1D stores its weight (in, out), so the per-unit
    ops (Dale, activity redraws) run on transposed views."""

    def __init__(self):
        super().__init__()
        self.c_fc = Conv1D(24, 3 * 6 * 6)
        self.c_proj = Conv1D(12, 24)
        self.head = nn.Linear(12, 10)

    def forward(self, x):
        x = torch.relu(self.c_fc(x.flatten(1)))
        return self.head(torch.relu(self.c_proj(x)))


def _transposed_model():
    torch.manual_seed(0)
    converter = BioConverter(
        fuzzy_lr_distribution=Distribution.ACTIVITY,
        fuzzy_lr_dynamic=True,
        apply_dales_principle=True,
        crystal_thresh=0.05,
    )
    return converter(_TransposedNet()).to(DEVICE)


def _train(backend: str, steps: int = 3, build=_model):
    with kernels.use_backend(backend):
        model = build()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(8, 3, 6, 6, generator=gen).to(DEVICE)
        y = torch.randint(0, 10, (8,), generator=gen).to(DEVICE)
        grads = []
        for step in range(steps):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            if step % 2 == 0:
                model.volume_dependent_lr()
                model.fuzzy_learning_rates()
                model.crystallize()
            else:
                model.bio_step(volume=True)
            model.update_fuzzy_learning_rates()
            grads.append([p.grad.clone() for p in model.parameters()])
            opt.step()
            model.rejuvenate_weights()
            model.enforce_dales_principle()
        rates = [b.fuzzy_learning_rate_parameters for b in model.modules() if hasattr(b, "sign")]
        assert len(rates) == 3
        return [p.detach() for p in model.parameters()], grads, rates


def _close_or_rare(ref, got, what):
    """Agree to ~1e-5 relative everywhere but a rare element (a decision at its threshold)."""
    for a, b in zip(ref, got):
        off = ~torch.isclose(a, b, rtol=2e-5, atol=1e-7)
        assert int(off.sum()) <= 1 + 1e-3 * a.numel(), f"{what}: {int(off.sum())} elements differ"


@pytest.mark.parametrize("build", [_model, _transposed_model], ids=["conv-linear", "transposed"])
def test_whole_model_agrees(build):
    logging.getLogger("bio_transformations").setLevel(logging.WARNING)
    ref_p, ref_g, ref_r = _train("torch", build=build)
    _launches.clear()
    got_p, got_g, got_r = _train("triton", build=build)
    assert sum(_launches.values()) >= 3 * 5  # per step at least the five mechanisms' kernels
    _close_or_rare(ref_p, got_p, "weights")
    for a, b in zip(ref_g, got_g):
        _close_or_rare(a, b, "grads")
    _close_or_rare(ref_r, got_r, "rates")


def test_model_ops_never_read_device_values(monkeypatch):
    logging.getLogger("bio_transformations").setLevel(logging.WARNING)

    def refuse(*_args, **_kwargs):
        raise AssertionError("a model-level op read a tensor value on the host")

    for backend in ("torch", "triton"):
        _launches.clear()
        with kernels.use_backend(backend):
            model = _model()
            x = torch.randn(4, 3, 6, 6, device=DEVICE)
            model(x).sum().backward()
            model.bio_step(volume=True)  # warm-up: one-time host checks (e.g. philox's) happen here
            with monkeypatch.context() as m:
                for name in ("item", "tolist", "cpu"):
                    m.setattr(torch.Tensor, name, refuse)
                model.volume_dependent_lr()
                model.fuzzy_learning_rates()
                model.crystallize()
                model.bio_step(volume=True)
                model.update_fuzzy_learning_rates()
                model.rejuvenate_weights()
                model.rejuvenate_weights_old()
                model.enforce_dales_principle()
        assert (backend == "triton") == bool(_launches), dict(_launches)


# ---------------------------------------------------------------------------------------------
# The zero-gradient rule: both backends read stats.grads_nonzero
# ---------------------------------------------------------------------------------------------


def _zero_grads(ts):
    """Layer 1 gets an all-zero gradient, layer 3 an all -0.0 one; the others keep theirs."""
    ts[1]["g"].zero_()
    ts[3]["g"].fill_(-0.0)
    return ts


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flags", [(False, False, True), (True, True, True)], ids=["alone", "step"])
def test_all_zero_gradient_is_not_crystallized(dtype, flags):
    """A layer whose gradient is all zero keeps its rates, on both backends, in one launch
    with layers that are crystallized as usual."""
    results = []
    for B in (tb, trb):
        ts = _zero_grads(_tensors(SIZES + LAYOUTS, dtype))
        before = [t["p"].clone() for t in ts]
        w, g, p = ([t[k] for t in ts] for k in "wgp")
        if flags == (False, False, True):
            B.crystallize_(w, g, p, 0.05, 0.6)
        else:
            B.bio_step_(w, g, p, _keys(len(ts), 1), _params(*flags))
        assert torch.equal(p[1], before[1]) and torch.equal(p[3], before[3])
        assert not torch.equal(p[4], before[4])  # a layer with a gradient is crystallized
        results.append(p)
    if flags == (False, False, True):
        assert_bitwise(results[0], results[1])
    else:  # after the volume draw: decisions may differ at the threshold only (test_bio_step)
        for a, b in zip(*results):
            assert int((a != b).sum()) <= 1 + 1e-3 * a.numel()
