"""The methods a converted model gains, each applying a ``BioModule`` method to every layer.

Frozen layers (``weight.requires_grad`` False) are skipped by the gradient methods; a missing
gradient is an error naming the layer unless ``skip_missing_grads=True`` is passed.

The converter records the converted layers once (``model._bio_layers``, a list of
``(name, layer)`` in module order). Each method groups those layers by device, dtype and the
config values its op reads, and calls ONE backend op per group, lists in, in place.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn

from . import kernels, ops
from .bio_module import OP_IDS, BioModule, _log_replaced
from .layers import out_units, unit_major
from .summary import BioSummary, summarize

__all__ = ["MODEL_METHODS", "ModelMethod", "bio_layers"]

Entry = Tuple[str, nn.Module, BioModule]


def bio_layers(model: nn.Module) -> List[Entry]:
    """``(name, layer, bio_mod)`` for every converted layer of ``model``, in module order.

    Each weight appears once: a layer whose ``bio_mod`` or weight parameter was already listed
    (tied or shared weights) is left out, so no op sees one tensor twice in a call."""
    recorded = model.__dict__.get("_bio_layers")
    if recorded is None:  # methods called on a module the converter did not record
        recorded = list(model.named_modules())
    out = []
    seen: set = set()
    for name, layer in recorded:
        bio = layer._modules.get("bio_mod")
        if isinstance(bio, BioModule):
            # By identity (traceable by torch.compile, no device read).
            keys = (id(bio), id(layer.weight))
            if keys[0] in seen or keys[1] in seen:
                continue
            seen.update(keys)
            out.append((name or type(layer).__name__, layer, bio))
    return out


def _trainable(model: nn.Module, skip_missing_grads: bool = False) -> List[Entry]:
    """Converted layers whose weight requires grad (frozen layers are skipped); with
    ``skip_missing_grads`` also those whose gradient is ``None`` (e.g. unused this step)."""
    entries = [e for e in bio_layers(model) if e[1].weight.requires_grad]
    if skip_missing_grads:
        entries = [e for e in entries if e[1].weight.grad is not None]
    return entries


def _grad_of(name: str, layer: nn.Module) -> torch.Tensor:
    g = layer.weight.grad
    if g is None:
        raise RuntimeError(
            f"No gradients found for the weights of layer {name!r} ({type(layer).__name__}); "
            "call loss.backward() first, freeze the layer (requires_grad=False), or pass "
            "skip_missing_grads=True to skip layers without gradients"
        )
    return g


def _groups(entries: Iterable[Entry], *fields: str) -> Dict[Any, List[Entry]]:
    """Group layers by (device, dtype, the named config values)."""
    groups: Dict[Any, List[Entry]] = defaultdict(list)
    for entry in entries:
        w = entry[1].weight
        cfg = entry[2].config
        groups[(w.device, w.dtype) + tuple(getattr(cfg, f) for f in fields)].append(entry)
    return groups


def _streams(entries: List[Entry]) -> Tuple[list, list]:
    """Each layer's step counter and seed, which the stochastic ops turn into keys."""
    return [b._rng_step for *_, b in entries], [b.layer_seed for *_, b in entries]


@torch.no_grad()
def fuzzy_learning_rates(self: nn.Module, skip_missing_grads: bool = False) -> None:
    """``g *= p`` on every converted, trainable layer."""
    for entries in _groups(_trainable(self, skip_missing_grads)).values():
        grads = [_grad_of(n, layer) for n, layer, _ in entries]
        ops.fuzzy_scale_(grads, [b.fuzzy_learning_rate_parameters for *_, b in entries])


@torch.no_grad()
def crystallize(self: nn.Module, skip_missing_grads: bool = False) -> None:
    """Crystallize every converted, trainable layer (``BioModule.crystallize``)."""
    for entries in _groups(
        _trainable(self, skip_missing_grads), "crystal_thresh", "dampening_factor"
    ).values():
        cfg = entries[0][2].config
        ops.crystallize_(
            [layer.weight for _, layer, _ in entries],
            [_grad_of(n, layer) for n, layer, _ in entries],
            [b.fuzzy_learning_rate_parameters for *_, b in entries],
            cfg.crystal_thresh,
            cfg.dampening_factor,
        )


_VOLUME_FIELDS = ("base_lr", "stability_factor", "lr_variability")


@torch.no_grad()
def volume_dependent_lr(self: nn.Module, skip_missing_grads: bool = False) -> None:
    """Volume-dependent gradient scaling on every converted, trainable layer."""
    for entries in _groups(_trainable(self, skip_missing_grads), *_VOLUME_FIELDS).values():
        cfg = entries[0][2].config
        grads = [_grad_of(n, layer) for n, layer, _ in entries]
        ops.volume_scale_(
            [layer.weight for _, layer, _ in entries],
            grads,
            *_streams(entries),
            OP_IDS["volume"],
            cfg.base_lr,
            cfg.stability_factor,
            cfg.lr_variability,
        )


@torch.no_grad()
def bio_step(
    self: nn.Module,
    volume: bool = True,
    fuzzy: bool = True,
    crystallize: bool = True,
    skip_missing_grads: bool = False,
) -> None:
    """Volume scaling, fuzzy scaling and crystallization fused in one pass per layer group;
    equal to ``volume_dependent_lr(); fuzzy_learning_rates(); crystallize()``."""
    fields = _VOLUME_FIELDS + ("crystal_thresh", "dampening_factor")
    for entries in _groups(_trainable(self, skip_missing_grads), *fields).values():
        cfg = entries[0][2].config
        grads = [_grad_of(n, layer) for n, layer, _ in entries]
        ops.bio_step_(
            [layer.weight for _, layer, _ in entries], grads,
            [b.fuzzy_learning_rate_parameters for *_, b in entries], *_streams(entries),
            OP_IDS["volume"], volume, fuzzy, crystallize,
            cfg.base_lr, cfg.stability_factor, cfg.lr_variability,
            cfg.crystal_thresh, cfg.dampening_factor,
        )  # fmt: skip


def _rejuvenate(self: nn.Module, op: Callable, op_name: str) -> None:
    for entries in _groups(bio_layers(self), "rejuvenation_parameter_dre").values():
        counts = op(
            [layer.weight for _, layer, _ in entries],
            *_streams(entries),
            OP_IDS[op_name],
            entries[0][2].config.rejuvenation_parameter_dre,
        )
        _log_replaced(counts, [b for *_, b in entries])


@torch.no_grad()
def rejuvenate_weights(self: nn.Module) -> None:
    """Rejuvenate the weights of every converted layer (``BioModule.rejuvenate_weights``)."""
    _rejuvenate(self, ops.rejuvenate_, "rejuvenate")


@torch.no_grad()
def rejuvenate_weights_old(self: nn.Module) -> None:
    """The legacy rejuvenation rule on every converted layer."""
    _rejuvenate(self, ops.rejuvenate_legacy_, "rejuvenate_legacy")


@torch.no_grad()
def update_fuzzy_learning_rates(self: nn.Module, x: Optional[torch.Tensor] = None) -> None:
    """Advance the dynamic rate strategies of every converted layer by one update.

    ``x`` is accepted for compatibility and not used: activity is tracked in each layer's
    forward pass while training, with that layer's own input (upstream passed one ``x`` to
    every layer, which fails for any layer after the first).
    """
    # Each layer advances its counters and says which op (if any) it needs; layers needing the
    # same op with the same scalars on one device and dtype are updated in one call.
    plans: Dict[Any, list] = defaultdict(list)
    for _, layer, bio in bio_layers(self):
        plan = bio.plan_rate_update()
        if plan is not None:
            op, args = plan
            w = layer.weight
            tensor_lists = [a for a in args if isinstance(a, list)]
            scalars = tuple(a for a in args if not isinstance(a, list) and a is not None)
            plans[(op, w.device, w.dtype, len(tensor_lists), scalars)].append(args)
    for (op, device, *_), group in plans.items():
        first = group[0]
        merged = [
            [item for args in group for item in args[i]] if isinstance(first[i], list) else first[i]
            for i in range(len(first))
        ]
        getattr(kernels.backend_module(device), op)(*merged)


@torch.no_grad()
def enforce_dales_principle(self: nn.Module) -> None:
    """``w = relu(w * sign) * sign`` on every converted layer but the marked last one."""
    entries = bio_layers(self)
    for _, _, bio in entries:
        if not bio.config.apply_dales_principle:
            raise AttributeError(
                "Can not enforce dales principle without apply_dales_principle set True."
            )
    active = [e for e in entries if not e[2].is_last_module]
    for group in _groups(active).values():
        weights = [unit_major(layer.weight, layer) for _, layer, _ in group]  # rows: units
        ops.dale_enforce_(weights, [b.sign for *_, b in group])


def add_weight_splitting_step(
    self: nn.Module, Gamma: Optional[int] = None, activation: Optional[Callable] = None
) -> None:
    """Apply weight splitting to the converted layers (config values unless given); calling it
    again replaces the splitting instead of stacking a second one."""
    entries = bio_layers(self)
    # Validate every layer before changing any, so a bad Gamma leaves the model as it was.
    new_configs = []
    for name, layer, bio in entries:
        try:
            new_configs.append(bio.splitting_config(Gamma, activation))
        except ValueError as exc:
            raise ValueError(f"{exc} Layer {name!r} has {out_units(layer)} outputs.") from None
    for (_, _, bio), cfg in zip(entries, new_configs):
        bio.config = cfg


def bio_summary(self: nn.Module) -> BioSummary:
    """A table of the converted layers (layer, type, shape, rates, distribution, splitting,
    Dale, notes) that prints as text; ``.rows`` has the same as a list of dicts and
    ``.skipped`` the modules the conversion left alone. Reads the rates on the host."""
    return summarize(bio_layers(self), self.__dict__.get("_bio_plan"))


#: name -> function of every method a converted model gains.
MODEL_METHODS: Dict[str, Callable] = {
    "rejuvenate_weights": rejuvenate_weights,
    "crystallize": crystallize,
    "fuzzy_learning_rates": fuzzy_learning_rates,
    "volume_dependent_lr": volume_dependent_lr,
    "update_fuzzy_learning_rates": update_fuzzy_learning_rates,
    "rejuvenate_weights_old": rejuvenate_weights_old,
    "enforce_dales_principle": enforce_dales_principle,
    "add_weight_splitting_step": add_weight_splitting_step,
    "bio_step": bio_step,
    "bio_summary": bio_summary,
}


class ModelMethod:
    """A model-level method stored on a converted model instance.

    Unlike a bound method in the instance ``__dict__``, it survives ``pickle``/``torch.save``
    and ``copy.deepcopy`` (the copy calls the copied model).
    """

    def __init__(self, model: nn.Module, name: str):
        self.model = model
        self.name = name
        self.__doc__ = MODEL_METHODS[name].__doc__

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return MODEL_METHODS[self.name](self.model, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<bio method {self.name} of {type(self.model).__name__}>"
