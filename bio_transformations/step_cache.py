"""The host-light model-level ``bio_step()``: a per-model cache of everything the call
decides on the host, checked in a few list operations per call.

``functional.bio_step`` decides per call which layers take part (frozen layers, missing
gradients), groups them by device, dtype and config values, gathers their tensors and plans
the launches: a few microseconds of Python per layer. For a model whose layers, configs and
tensors stay put from one step to the next (the normal case) those decisions do not change,
so :func:`bio_step` makes them once and keeps, per model and per argument set, a
:class:`CachedStep`. A call then

* checks, for every converted layer, that nothing the decisions depend on changed: the list
  of converted layers, the settings (:func:`kernels.settings.token`), the address of every
  layer's current rates buffer (``model.to(...)`` and assignment replace buffers, ``.data =``
  moves one), every ``requires_grad`` flag and whether each layer has a gradient, the seeds
  and step counters (when volume scaling draws), no parameter, module or layer config set
  anywhere since (``nn.Module``'s global registration hooks and ``BioModule.__setattr__``
  count them; configs are immutable named tuples), and not inside ``torch.compile``;
* gathers the gradients (``p.grad`` per layer, the only per-call input);
* runs each group: on the Triton backend a prepared step
  (:class:`~bio_transformations.kernels.triton.prepared.PreparedStep`, 3 launches at most:
  the statistics pass and the step; it re-checks the tensors' addresses itself), elsewhere
  the same op call ``functional.bio_step`` would make.

When any check fails the call goes through ``functional.bio_step`` (same results, same
errors) and the cache is rebuilt. The cache lives beside the model (a ``WeakKeyDictionary``,
not in the model, so ``deepcopy``/``pickle`` never see it).

How the host time is measured: ``benchmarks/host_step.py`` (and ``tests/test_host_light.py``)
run this path on CPU tensors with the Triton backend in its interpreter and every Triton
kernel's launch replaced by a counter, so what is timed is exactly the Python this path
runs per call (checks, gathering, argument packing, the launcher call) and nothing the GPU
or the interpreter would do. Triton's own launcher (argument binding, ~10-20 µs a launch
on triton 3.x) is not in that figure.
"""

from __future__ import annotations

import itertools
import operator
import weakref
from typing import Any, List, Optional

import torch
import torch.nn as nn

from . import functional, ops, sharding
from .kernels import backend_for, settings
from .kernels.contract import StepParams

__all__ = ["CachedStep", "bio_step", "clear", "decisions_changed", "sync_steps"]

_grad = operator.attrgetter("grad")
_requires_grad = operator.attrgetter("requires_grad")
_seed = operator.attrgetter("layer_seed")
_step = operator.attrgetter("_rng_step")
_data_ptr = torch.Tensor.data_ptr
_RATES = "fuzzy_learning_rate_parameters"
_rates_of = operator.itemgetter(_RATES)
_NONES = itertools.repeat(None)

# Bumped whenever any module registers a parameter or a submodule (``layer.weight = ...``,
# ``layer.bio_mod = ...``) and when a layer's config is set: a cached step built before is
# rebuilt.
_generation = [0]


def decisions_changed(*_args: Any) -> None:
    """Make every cached step rebuild before its next call (a registration hook, and what
    ``BioModule`` calls when its ``config`` is set)."""
    _generation[0] += 1


_hooks = []


def _install_hooks() -> None:
    if not _hooks:
        from torch.nn.modules import module as module_mod

        _hooks.append(module_mod.register_module_parameter_registration_hook(decisions_changed))
        _hooks.append(module_mod.register_module_module_registration_hook(decisions_changed))


_caches: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def clear(model: Optional[nn.Module] = None) -> None:
    """Forget the cached steps of ``model`` (all models when None)."""
    if model is None:
        _caches.clear()
    else:
        _caches.pop(model, None)


def _args(volume=False, fuzzy=True, crystallize=True, frozen="skip", skip_missing_grads=False):
    return volume, fuzzy, crystallize, frozen, skip_missing_grads


class _Group:
    __slots__ = (
        "weights", "rates", "steps", "seeds", "params", "prepared", "index", "everyone",
        "device_keys",
    )  # fmt: skip

    def __init__(self, group, params: StepParams, index: List[int]):
        self.weights = functional._weights(group)
        self.rates = functional._rates(group)
        self.steps, self.seeds = functional._streams(group)
        self.params = params
        self.index = index  # positions in the cached layer list
        self.everyone = False  # set when the group is every cached layer, in order
        self.prepared = None
        # capturable mode on the Triton backend: keys derived on the device, every call
        self.device_keys = (
            ops.capturable_keys(self.steps, self.seeds, self.weights[0]) if params.volume else None
        )


class CachedStep:
    """One argument set's decisions for one model (see the module docstring)."""

    def __init__(self, entries: list, recorded: list, args: tuple):
        volume, fuzzy, crystallize, frozen, skip_missing_grads = args
        self.recorded, self.n_recorded = recorded, len(recorded)
        self.token = settings.token()
        self.generation = _generation[0]
        self.volume = volume
        self.layers = [layer for _, layer, _ in entries]
        self.all_weights = [layer.weight for layer in self.layers]
        self.bios = [bio for *_, bio in entries]
        # The rates buffers, read straight from each module's buffer dict: ``model.to(...)``,
        # ``.double()`` and plain assignment replace a buffer without any registration hook,
        # ``.data = ...`` moves one. Their addresses tell both (the cache holds the old
        # tensors, so a new one cannot reuse an old address).
        self.buffer_dicts = [bio._buffers for bio in self.bios]
        self.rates = list(map(_rates_of, self.buffer_dicts))
        self.rate_ptrs = list(map(_data_ptr, self.rates))
        self.requires = list(map(_requires_grad, self.all_weights))
        self.all_require = all(self.requires)
        self.has_grad = [g is not None for g in map(_grad, self.all_weights)]
        self.every_grad = all(self.has_grad)
        self.seeds = list(map(_seed, self.bios))
        self.steps = list(map(_step, self.bios))
        if any(sharding.is_sharded(w) for w in self.all_weights):
            raise _NotCacheable("sharded layers")
        selected = functional._with_grads(entries, frozen, skip_missing_grads)
        if any(layer.weight.grad is None for _, layer, _ in selected):
            raise _NotCacheable("a missing gradient (functional.bio_step raises its error)")
        position = {id(layer): i for i, layer in enumerate(self.layers)}
        fields = (*functional._VOLUME_FIELDS, *functional._CRYSTAL_FIELDS)
        self.groups = []
        for group in functional._groups(selected, *fields).values():
            params = StepParams.from_config(
                group[0][2].config, volume=volume, fuzzy=fuzzy, crystallize=crystallize
            )
            self.groups.append(_Group(group, params, [position[id(e[1])] for e in group]))
        for g in self.groups:
            g.everyone = g.index == list(range(len(self.layers)))
            g.prepared = _prepare(g, [self.all_weights[i].grad for i in g.index])

    def valid(self, recorded: list) -> bool:
        """Whether every decision still holds (cheap: a few list operations)."""
        return (
            recorded is self.recorded
            and len(recorded) == self.n_recorded
            and _generation[0] == self.generation
            and _same(settings.token(), self.token)
            and _rate_addresses(self.buffer_dicts) == self.rate_ptrs
            and (
                all(map(_requires_grad, self.all_weights))
                if self.all_require
                else list(map(_requires_grad, self.all_weights)) == self.requires
            )
            and (
                not self.volume
                or (
                    list(map(_seed, self.bios)) == self.seeds
                    and _all_is(map(_step, self.bios), self.steps)
                )
            )
        )

    def run(self) -> bool:
        """One ``bio_step``; False (nothing done) when a decision no longer holds. Every group
        is checked before any runs, so a False never leaves a step half done."""
        grads = list(map(_grad, self.all_weights))
        if not self.every_grad and [g is not None for g in grads] != self.has_grad:
            return False
        per_group = []
        for g in self.groups:
            mine = grads if g.everyone else [grads[i] for i in g.index]
            # A prepared step's address check also fails on a missing gradient, so the
            # None check runs only off the fast path.
            if g.prepared is None or not g.prepared.matches(mine):
                if not all(map(operator.is_not, mine, _NONES)):
                    return False
                if g.prepared is not None:  # the gradients moved: plan again
                    g.prepared = _prepare(g, mine)
            per_group.append(mine)
        for g, mine in zip(self.groups, per_group):
            if g.prepared is None:
                with torch.no_grad():  # (the prepared path runs no autograd-visible op)
                    ops.bio_step_(g.weights, mine, g.rates, g.steps, g.seeds, g.params)
                continue
            keys = g.device_keys
            if keys is None and g.params.volume:
                keys = ops.draw_keys(g.steps, g.seeds, "volume")
            g.prepared.launch(mine, keys)
        return True


def bio_step(model: nn.Module, layers_of, *args: Any, **kwargs: Any) -> None:
    """``functional.bio_step(layers_of(model), *args, **kwargs)``, through the model's cached
    decisions when they still hold (see the module docstring)."""
    recorded = model.__dict__.get("_bio_layers")
    if recorded is None or torch.compiler.is_compiling():
        return functional.bio_step(layers_of(model), *args, **kwargs)
    key = (args, tuple(kwargs.items())) if kwargs else args
    cache = _caches.get(model)
    cached = None if cache is None else cache.get(key)
    if cached is not None and cached.valid(recorded) and cached.run():
        return None
    try:
        args_ = _args(*args, **kwargs)
    except TypeError:  # functional.bio_step raises the error for these arguments
        return functional.bio_step(layers_of(model), *args, **kwargs)
    _install_hooks()
    try:
        cached = CachedStep(layers_of(model), recorded, args_)
    except _NotCacheable:
        cached = None
    if cached is None or not any(args_[:3]):
        return functional.bio_step(layers_of(model), *args, **kwargs)
    if cache is None:
        cache = _caches[model] = {}
    cache[key] = cached
    if not cached.run():
        functional.bio_step(layers_of(model), *args, **kwargs)
    return None


class _NotCacheable(Exception):
    pass


def _same(a: tuple, b: tuple) -> bool:
    return a[0] is b[0] and a[1] is b[1]


def _all_is(values, expected: list) -> bool:
    return all(map(operator.is_, values, expected))


def _rate_addresses(buffer_dicts: list) -> Optional[list]:
    """``data_ptr()`` of each layer's current rates buffer; None when one is missing."""
    try:
        return list(map(_data_ptr, map(_rates_of, buffer_dicts)))
    except (KeyError, TypeError):
        return None


def _prepare(g: _Group, grads: list):
    """The Triton backend's prepared step for this group, or None (another backend, or a
    layout that needs staging each call)."""
    if backend_for(g.weights[0].device, g.weights[0].dtype) != "triton":
        return None
    from .kernels.triton.prepared import PreparedStep, Unpreparable

    try:
        return PreparedStep(g.weights, grads, g.rates, g.params)
    except Unpreparable:
        return None


def sync_steps(model: nn.Module) -> None:
    """Copy the ``capturable`` mode's device step counters of ``model``'s layers back to their
    CPU counters (``kernels.triton.keys.sync_steps``; a device read). Call it before saving a
    checkpoint or drawing eagerly again after capturable (or graph-replayed) steps."""
    from .kernels import triton_available
    from .model_methods import bio_layers

    if not triton_available():
        return
    from .kernels.triton.keys import sync_steps as sync

    sync([bio._rng_step for *_, bio in bio_layers(model)])
