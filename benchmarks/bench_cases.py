"""What the benchmarks measure: sizes, ops, config, data, models and the timing protocol.

Shared by the pytest-benchmark side (which imports this project's ``bio_transformations``) and by
``upstream_runner.py`` (which runs in a separate process where ``bio_transformations`` is the
published 0.0.5 package), so this module imports nothing but torch: both processes build the same
data and time it the same way.

Timing protocol, identical for every contender: before each round the tensors the op writes are
restored from pristine copies (not timed), then one call is timed with ``time.perf_counter``
(CUDA is synchronised inside the timed region). The contenders of one group are timed in
interleaved repeats (see :class:`Plan`). Without the restore, repeated calls would drive
gradients and rates into subnormal numbers (volume scaling multiplies by ~0.1 per call,
crystallization by 0.6) and time something no training loop does.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

# ---------------------------------------------------------------------------------------------
# Sizes, ops and their memory traffic
# ---------------------------------------------------------------------------------------------

#: label -> number of weights of the one layer an op-level benchmark works on (square weight).
SIZES: Dict[str, int] = {
    "64K": 1 << 16,
    "1M": 1 << 20,
    "4M": 1 << 22,
    "16M": 1 << 24,
    "64M": 1 << 26,
}
CPU_SIZES: Tuple[str, ...] = ("64K", "1M", "4M")
GPU_SIZES: Tuple[str, ...] = ("64K", "1M", "4M", "16M", "64M")


@dataclass(frozen=True)
class OpSpec:
    """One benchmarked op. ``passes`` is the memory traffic the op must cause, in full passes over
    a float32 weight-sized tensor: each input read once, each output written once, plus one read
    of ``w`` where the op needs a per-layer statistic of it first (mean|w|, std(w)). The copy
    contender moves the same bytes: ``dst.copy_(src)`` with ``passes * numel / 2`` elements."""

    name: str
    title: str
    passes: int
    writes: Tuple[str, ...]


#: The BioModule method each op benchmark calls (the same name in ours and in upstream 0.0.5,
#: except bio_step, which upstream lacks: its runner calls the three methods in order).
OP_METHODS: Dict[str, str] = {
    "fuzzy": "fuzzy_learning_rates",
    "crystallize": "crystallize",
    "volume": "volume_dependent_lr",
    "rejuvenate": "rejuvenate_weights",
    "dale": "enforce_dales_principle",
    "temporal": "update_fuzzy_learning_rates",
    "weight_adaptive": "update_fuzzy_learning_rates",
    "bio_step": "bio_step",
}


OPS: Dict[str, OpSpec] = {
    s.name: s
    for s in (
        OpSpec("fuzzy", "fuzzy scaling (g *= p)", 3, ("g",)),
        OpSpec("crystallize", "crystallize", 5, ("p",)),
        OpSpec("volume", "volume-dependent lr", 3, ("g",)),
        OpSpec("rejuvenate", "rejuvenation (not upstream's rule)", 3, ("w",)),
        OpSpec("temporal", "rate update: temporal (decay + noise)", 2, ("p",)),
        OpSpec("weight_adaptive", "rate update: weight-adaptive", 3, ("p",)),
        OpSpec("dale", "Dale enforcement", 2, ("w",)),
        OpSpec("bio_step", "fused bio step (volume + fuzzy + crystallize)", 6, ("g", "p")),
    )
}

#: Model-level ops: ``step`` is volume + fuzzy + crystallize over every layer.
MODEL_OPS: Dict[str, OpSpec] = {
    "step": OpSpec("step", "model step (volume + fuzzy + crystallize)", 6, ("g", "p")),
    "rejuvenate": OpSpec("rejuvenate", "model rejuvenation (not upstream's rule)", 3, ("w",)),
}
MODELS: Tuple[str, ...] = ("mlp64", "resnet")
MODEL_TITLES = {
    "mlp64": "64-layer MLP of 128x128 Linear layers",
    "resnet": "small ResNet-like conv net (15 Conv2d + 1 Linear)",
    "fcnet": "the paper's FCNet 784-1000-1000-10, batch 100",
    "digits_cnn": "the digits CNN of `make run` (8x8 images, batch 32)",
}
#: The training-step view: the bio step of these models as a multiple of their plain
#: forward+backward (contender ``plain``), timed side by side.
TRAIN_MODELS: Tuple[str, ...] = ("fcnet", "digits_cnn", "mlp64")
#: (input shape without the batch, number of classes, batch size) of each training-step model.
TRAIN_BATCHES: Dict[str, Tuple[Tuple[int, ...], int, int]] = {
    "fcnet": ((784,), 10, 100),
    "digits_cnn": ((1, 8, 8), 10, 32),
    "mlp64": ((128,), 128, 100),
}

# ---------------------------------------------------------------------------------------------
# Config: the published defaults, plus what the rate-update ops need to do work on every call
# ---------------------------------------------------------------------------------------------

NU = 0.16
DAMPENING = 0.6
CRYSTAL_THRESH = 4.5e-05
DRE = 8.0
BASE_LR = 0.1
STABILITY = 2.0
VARIABILITY = 0.2
RATE_MIN = 0.5
RATE_MAX = 2.0
DECAY = 0.9995
UPDATE_FREQ = 1  # with the counter set to 10*freq - 1, every timed update decays and adds noise


def config_overrides(op: str) -> Dict[str, object]:
    """``BioConfig`` fields (beyond the defaults) for ``op``; distributions as their string value
    (both packages' ``Distribution`` is a ``str`` Enum with the same values)."""
    if op == "temporal":
        return {
            "fuzzy_lr_distribution": "temporal",
            "fuzzy_lr_dynamic": True,
            "fuzzy_lr_update_freq": UPDATE_FREQ,
        }
    if op == "weight_adaptive":
        return {"fuzzy_lr_distribution": "weight_adaptive"}
    if op == "dale":
        return {"apply_dales_principle": True}
    return {}


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def torch_device(device: str) -> torch.device:
    """Benchmark device label (``cpu`` / ``gpu``) to a torch device."""
    return torch.device("cuda" if device == "gpu" else "cpu")


def square_shape(numel: int) -> Tuple[int, int]:
    side = int(math.isqrt(numel))
    assert side * side == numel, numel
    return side, side


def _generator(dev: torch.device, seed: int) -> torch.Generator:
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    return gen


def random_like_weights(shape: Sequence[int], dev: torch.device, seed: int) -> Tuple:
    """``(w, g, p)``: weights ~ N(0, 0.02), gradients ~ N(0, 1e-3), rates uniform in 1 +- nu."""
    gen = _generator(dev, seed)
    w = torch.randn(tuple(shape), generator=gen, device=dev).mul_(0.02)
    g = torch.randn(tuple(shape), generator=gen, device=dev).mul_(1e-3)
    p = torch.rand(tuple(shape), generator=gen, device=dev).mul_(2.0 * NU).add_(1.0 - NU)
    return w, g, p


#: The fraction of weights ``crystallize()`` selects in real training, printed by
#: ``python benchmarks/mask_fraction.py`` (FCNet 40-1000-10 on MNIST-1D, SGD lr 0.1, batch 100,
#: volume + fuzzy + crystallize before each step, 5 epochs, seeds 0-2: 0.396, rising from 0.08
#: in the first epoch to 0.60 in the fifth, almost all from the ``|g|/|w| < crystal_thresh``
#: branch; the experiment's CNN: 0.48). Every benchmark gradient is built to select it.
CRYSTALLIZE_MASK_FRACTION = 0.40


def select_for_crystallize_(w: torch.Tensor, g: torch.Tensor, fraction: float, seed: int) -> None:
    """Make about ``fraction`` of ``g`` satisfy crystallize's mask, as in training (the
    ``|g|/|w| < crystal_thresh`` branch): at uniformly random positions ``g = w*thresh*u`` with
    ``u`` uniform in [0, 1). Uniform positions give no contender a branch-prediction gift."""
    gen = _generator(w.device, seed)
    chosen = torch.rand(w.shape, generator=gen, device=w.device) < fraction
    u = torch.rand(w.shape, generator=gen, device=w.device)
    g.copy_(torch.where(chosen, w * (CRYSTAL_THRESH * u), g))


def crystallize_mask_fraction(w: torch.Tensor, g: torch.Tensor) -> float:
    """The fraction of weights crystallize's mask ``(|g|/|w| < thresh) | (|g| > mean|w|)``
    selects on ``(w, g)``."""
    aw, ag = w.abs(), g.abs()
    return float(((ag / aw < CRYSTAL_THRESH) | (ag > aw.mean())).float().mean())


def rejuvenation_probability(w: torch.Tensor) -> float:
    """The expected fraction of weights rejuvenation replaces on ``w``: the mean of
    ``exp(-dre*|w|/std(w))`` over the clamped weights (the same law in upstream's rule and
    ours)."""
    wc = torch.nan_to_num(w, nan=0.0).clamp(-1.0, 1.0)
    return float(torch.exp(-DRE * wc.abs() / wc.std().clamp_min(1e-12)).mean())


_data_cache: Dict[Tuple[str, str], Tuple] = {}


def layer_data(size: str, device: str) -> Tuple:
    """Pristine ``(w, g, p)`` for a square layer of ``SIZES[size]`` weights, ``g`` selecting
    :data:`CRYSTALLIZE_MASK_FRACTION` for crystallize (cached; only one size is kept at a time so
    64M-weight GPU cases do not pile up)."""
    key = (size, device)
    if key not in _data_cache:
        _data_cache.clear()
        w, g, p = random_like_weights(square_shape(SIZES[size]), torch_device(device), seed=1234)
        select_for_crystallize_(w, g, CRYSTALLIZE_MASK_FRACTION, seed=4321)
        _data_cache[key] = (w, g, p)
    return _data_cache[key]


def make_linear(w: torch.Tensor, g: torch.Tensor) -> nn.Linear:
    """A bias-free ``nn.Linear`` holding a copy of ``w`` with ``.grad`` a copy of ``g``."""
    with torch.device("meta"):
        layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
    layer.weight = nn.Parameter(w.clone())
    layer.weight.grad = g.clone()
    return layer


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNetLike(nn.Module):
    """A CIFAR-sized ResNet-like net: stem, three stages of two basic blocks, linear head."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32))
        self.layer1 = nn.Sequential(BasicBlock(32, 32), BasicBlock(32, 32))
        self.layer2 = nn.Sequential(BasicBlock(32, 64, 2), BasicBlock(64, 64))
        self.layer3 = nn.Sequential(BasicBlock(64, 128, 2), BasicBlock(128, 128))
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class DigitsCNN(nn.Module):
    """A small CNN for 8x8 digits (the earlier main job's), written out here because the
    upstream process cannot import this project's package."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width * 4 * 4, 64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = nn.functional.max_pool2d(x, 2) if min(x.shape[-2:]) >= 8 else x
        x = nn.functional.adaptive_avg_pool2d(x, (4, 4)).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def build_model(name: str, device: str) -> nn.Module:
    """The plain (unconverted) model ``name``, seeded so both processes build the same one."""
    torch.manual_seed(0)
    if name == "fcnet":
        model: nn.Module = nn.Sequential(
            nn.Flatten(), nn.Linear(784, 1000), nn.ReLU(), nn.Linear(1000, 1000), nn.ReLU(),
            nn.Linear(1000, 10),
        )  # fmt: skip
    elif name == "digits_cnn":
        model = DigitsCNN()
    elif name == "mlp64":
        layers: List[nn.Module] = []
        for i in range(64):
            layers.append(nn.Linear(128, 128))
            if i < 63:
                layers.append(nn.ReLU())
        model = nn.Sequential(*layers)
    elif name == "resnet":
        model = ResNetLike()
    else:
        raise ValueError(f"unknown model {name!r}")
    return model.to(torch_device(device))


def learnable_layers(model: nn.Module) -> List[nn.Module]:
    """The Linear/Conv2d layers of ``model`` in module order (the layers both packages convert)."""
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def model_data(model: nn.Module) -> List[Tuple]:
    """Pristine ``(w, g, p)`` per learnable layer (``g`` selecting the trained mask fraction);
    sets each weight's ``.grad`` to a copy of g."""
    out = []
    for i, layer in enumerate(learnable_layers(model)):
        w = layer.weight.detach().clone()
        _, g, p = random_like_weights(w.shape, w.device, seed=100 + i)
        select_for_crystallize_(w, g, CRYSTALLIZE_MASK_FRACTION, seed=200 + i)
        layer.weight.grad = g.clone()
        out.append((w, g, p))
    return out


def train_batch(name: str, device: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """A seeded input batch and labels for the training-step view of model ``name``."""
    shape, classes, batch = TRAIN_BATCHES[name]
    gen = _generator(torch.device("cpu"), 99)
    x = torch.randn((batch, *shape), generator=gen)
    y = torch.randint(0, classes, (batch,), generator=gen)
    dev = torch_device(device)
    return x.to(dev), y.to(dev)


def plain_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """The plain training step the bio step is compared with: zero the gradients, forward,
    cross-entropy loss, backward (the optimizer update is not counted)."""

    def step() -> None:
        with torch.enable_grad():
            model.zero_grad(set_to_none=False)
            nn.functional.cross_entropy(model(x), y).backward()

    return step


def model_numel(name: str) -> int:
    return sum(m.weight.numel() for m in learnable_layers(build_model(name, "cpu")))


# ---------------------------------------------------------------------------------------------
# Plain-torch formulas: the peer a user could build with torch.compile (one tensor per call)
# ---------------------------------------------------------------------------------------------


def fuzzy_formula(w, g, p):
    g.mul_(p)


def crystallize_formula(w, g, p):
    aw, ag = w.abs(), g.abs()
    mask = (ag / aw < CRYSTAL_THRESH) | (ag > aw.mean())
    p.copy_(torch.where(mask, p * DAMPENING, p))


def volume_formula(w, g, p):
    aw = w.abs()
    m = BASE_LR * torch.exp(-STABILITY * (aw / (aw + 1.0)))
    g.mul_(torch.abs(m + VARIABILITY * m * torch.randn_like(m)))


def bio_step_formula(w, g, p):
    volume_formula(w, g, p)
    fuzzy_formula(w, g, p)
    crystallize_formula(w, g, p)


def rejuvenate_formula(w, g, p):
    wc = torch.nan_to_num(w, nan=0.0).clamp(-1.0, 1.0)
    std = wc.std().clamp_min(1e-12)
    aw = wc.abs()
    m = aw.mean().clamp_min(1e-12)
    sigma2 = torch.log1p((aw.std() / m) ** 2)
    mu = torch.log(m) - 0.5 * sigma2
    replace = torch.rand_like(wc) < torch.exp(-DRE * aw / std)
    magnitude = torch.exp(mu + 0.5 * torch.sqrt(sigma2) * torch.randn_like(wc))
    new = torch.where(torch.rand_like(wc) < 0.5, magnitude, -magnitude).clamp(-1.0, 1.0)
    w.copy_(torch.where(replace, new, wc))


def temporal_formula(w, g, p):
    noise = 0.1 * NU * (2.0 * torch.rand_like(p) - 1.0)
    p.copy_((1.0 + (p - 1.0) * DECAY + noise).clamp(RATE_MIN, RATE_MAX))


def weight_adaptive_formula(w, g, p):
    aw = w.abs()
    scale = torch.clamp(2.0 - aw / (aw.mean() + 1e-8), 0.5, 1.5)
    p.copy_((1.0 + (2.0 * torch.rand_like(p) - 1.0) * NU * scale).clamp(RATE_MIN, RATE_MAX))


def dale_formula(w, sign):
    w.copy_(torch.relu(w * sign) * sign)


FORMULAS: Dict[str, Callable] = {
    "fuzzy": fuzzy_formula,
    "crystallize": crystallize_formula,
    "volume": volume_formula,
    "bio_step": bio_step_formula,
    "rejuvenate": rejuvenate_formula,
    "temporal": temporal_formula,
    "weight_adaptive": weight_adaptive_formula,
    "dale": dale_formula,
}
MODEL_FORMULAS: Dict[str, Callable] = {"step": bio_step_formula, "rejuvenate": rejuvenate_formula}

# ---------------------------------------------------------------------------------------------
# The timing protocol
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How long to time one contender. A group is timed in ``repeats`` interleaved repeats: each
    repeat runs every contender of the group in turn (the order rotating from repeat to repeat),
    each for ``rounds(seconds per call)`` rounds, so a burst of load from other processes falls
    on all of them alike and shows up as spread between repeats."""

    budget_s: float = 0.3  # per contender and repeat
    min_rounds: int = 5  # per repeat
    max_rounds: int = 60  # per repeat
    warmup: int = 2
    repeats: int = 5

    def __post_init__(self) -> None:
        if self.repeats < 3:
            raise ValueError(f"a plan needs at least 3 repeats, not {self.repeats}")

    def rounds(self, seconds_per_call: float) -> int:
        """Rounds per repeat."""
        wanted = math.ceil(self.budget_s / max(seconds_per_call, 1e-7))
        return max(self.min_rounds, min(self.max_rounds, wanted))


FULL_PLAN = Plan()
QUICK_PLAN = Plan(budget_s=0.06, min_rounds=3, max_rounds=20, warmup=1, repeats=3)


def synchronizer(device: str) -> Callable[[], None]:
    if device == "gpu":
        return torch.cuda.synchronize
    return lambda: None


def probe(call: Callable, restore: Callable, sync: Callable, plan: Plan) -> int:
    """Warm up (compiles, caches, allocator), time one call and return the rounds per repeat."""
    for _ in range(plan.warmup):
        restore()
        sync()
        call()
        sync()
    restore()
    sync()
    start = time.perf_counter()
    call()
    sync()
    return plan.rounds(time.perf_counter() - start)


def time_rounds(call: Callable, restore: Callable, sync: Callable, rounds: int) -> List[float]:
    """``rounds`` timed calls, each after an untimed restore; seconds per call."""
    samples = []
    for _ in range(rounds):
        restore()
        sync()
        start = time.perf_counter()
        call()
        sync()
        samples.append(time.perf_counter() - start)
    return samples


def restorer(pairs: Sequence[Tuple[Callable[[], torch.Tensor], torch.Tensor]]) -> Callable:
    """A restore function: for each (getter of the live tensor, pristine copy), copy back.

    Getters, not tensors, because upstream replaces ``weight.data`` and ``rates.data`` with new
    tensors in some ops; the restore always writes into whatever is live now.
    """

    def restore() -> None:
        with torch.no_grad():
            for get, pristine in pairs:
                get().copy_(pristine)

    return restore
