"""One implementation of every mechanism, over a group of converted layers.

Each function takes ``entries``, a list of ``(name, layer, bio_mod)`` for the layers to act on,
and calls ONE op (:mod:`bio_transformations.ops`) per group of layers that share device, dtype
and the config values the op reads, lists in, in place (like ``torch.optim``'s functional
``adam()``). The model-level methods call these with every converted layer; a ``BioModule``
method calls them with its own layer alone. The only difference between the two is how missing
inputs are treated, chosen by the caller:

* ``frozen``: ``"skip"`` leaves layers whose weight does not require grad alone (model level),
  ``"raise"`` raises upstream's ``RuntimeError("Weights do not require gradients")`` (a single
  layer's ``crystallize``), ``"keep"`` does not look (a single layer's other methods: a frozen
  layer then fails for its missing gradient, as upstream);
* ``skip_missing_grads``: skip layers whose gradient is None instead of raising
  ``RuntimeError("No gradients found for the weights ...")``.

Sharded layers (FSDP2, :mod:`bio_transformations.sharding`) form groups of their own, one per
device mesh. The ops get every tensor through :func:`_local` (the local shard of a DTensor),
the shards' places in their layers (``spans``, so random draws follow the global index), and
run inside ``kernels.stats.reduced_over`` so per-layer statistics are reduced over the shard
group, one all-reduce per op and group.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from . import ops, sharding
from .bio_config import Distribution
from .kernels import stats
from .kernels.contract import StepParams
from .kernels.shards import flatten_spans
from .layers import out_units, unit_major

__all__ = [
    "METHOD_NAMES",
    "add_weight_splitting_step",
    "bio_step",
    "crystallize",
    "enforce_dales_principle",
    "fuzzy_learning_rates",
    "rejuvenate_weights",
    "rejuvenate_weights_old",
    "scale_updates",
    "update_fuzzy_learning_rates",
    "volume_dependent_lr",
]

#: Every method a converted model gains (and ``BioModule.exposed_functions``), in one place.
METHOD_NAMES = (
    "rejuvenate_weights",
    "crystallize",
    "fuzzy_learning_rates",
    "volume_dependent_lr",
    "update_fuzzy_learning_rates",
    "rejuvenate_weights_old",
    "enforce_dales_principle",
    "add_weight_splitting_step",
    "bio_step",
    "bio_summary",
)

Entry = Tuple[str, nn.Module, Any]  # (name, layer, BioModule)

logger = logging.getLogger("bio_transformations")

DALE_DISABLED = "Can not enforce dales principle without apply_dales_principle set True."
SIGN_MISSING = "sign attribute not found. Make sure dalian_network_initialization has been applied."
FROZEN = "Weights do not require gradients"
NO_GRAD = "No gradients found for the weights"


def _grad_of(name: str, layer: nn.Module) -> torch.Tensor:
    g = layer.weight.grad
    if g is None:
        raise RuntimeError(
            f"{NO_GRAD} of layer {name!r} ({type(layer).__name__}); call loss.backward() first, "
            "freeze the layer (requires_grad=False), or pass skip_missing_grads=True to skip "
            "layers without gradients"
        )
    return g


def _with_grads(entries: Sequence[Entry], frozen: str, skip_missing_grads: bool) -> List[Entry]:
    """The entries a gradient mechanism acts on (see the module docstring)."""
    out = []
    for entry in entries:
        weight = entry[1].weight
        if not weight.requires_grad and frozen != "keep":
            if frozen == "raise":
                raise RuntimeError(FROZEN)
            continue
        if weight.grad is None and skip_missing_grads:
            continue
        out.append(entry)
    return out


def _groups(entries: Sequence[Entry], *fields: str) -> Dict[Any, List[Entry]]:
    """Group layers by (device, dtype, device mesh of a sharded weight, the named config
    values). A sharded layer whose rates are not sharded yet gets them sharded here."""
    groups: Dict[Any, List[Entry]] = defaultdict(list)
    for entry in entries:
        w = entry[1].weight
        cfg = entry[2].config
        mesh = None
        if sharding.is_sharded(w):
            sharding.shard_layer_rates(entry[1], entry[2])
            mesh = w.device_mesh
        key = (w.device, w.dtype, mesh) + tuple(getattr(cfg, f) for f in fields)
        groups[key].append(entry)
    return groups


def _local(t: torch.Tensor) -> torch.Tensor:
    """What an op sees of ``t``: its local shard when it is a DTensor (a view: the op writes
    through it), ``t`` itself otherwise. Every tensor an op gets goes through here."""
    return sharding.local(t)


def _weights(group: List[Entry]) -> list:
    return [_local(layer.weight) for _, layer, _ in group]


def _grads(group: List[Entry]) -> list:
    return [_local(_grad_of(name, layer)) for name, layer, _ in group]


def _rates(group: List[Entry]) -> list:
    return [_local(bio.fuzzy_learning_rate_parameters) for *_, bio in group]


def _spans(group: List[Entry]) -> Optional[list]:
    """Where each layer's local shard lies (``kernels.shards``, flat, as the ops take it);
    None for an unsharded group. Weight, gradient and rates share one span."""
    weight = group[0][1].weight
    if not sharding.is_sharded(weight):
        return None
    return flatten_spans([sharding.span_of(layer.weight) for _, layer, _ in group])


def _reduced(group: List[Entry]):
    """The block in which the group's statistics are reduced over its shard group (nothing
    for an unsharded group, which keeps compiled code free of context variables)."""
    reduction = sharding.reduction_for(group[0][1].weight)
    return contextlib.nullcontext() if reduction is None else stats.reduced_over(reduction)


def _streams(group: List[Entry]) -> Tuple[list, list]:
    """Each layer's step counter and seed, which the stochastic ops turn into keys."""
    return [bio._rng_step for *_, bio in group], [bio.layer_seed for *_, bio in group]


_VOLUME_FIELDS = ("base_lr", "stability_factor", "lr_variability")
_CRYSTAL_FIELDS = ("crystal_thresh", "dampening_factor")


@torch.no_grad()
def fuzzy_learning_rates(
    entries: Sequence[Entry], frozen: str = "skip", skip_missing_grads: bool = False
) -> None:
    """``g *= p``."""
    for group in _groups(_with_grads(entries, frozen, skip_missing_grads)).values():
        ops.fuzzy_scale_(_grads(group), _rates(group))


@torch.no_grad()
def crystallize(
    entries: Sequence[Entry], frozen: str = "skip", skip_missing_grads: bool = False
) -> None:
    """``mask = (|g|/|w| < crystal_thresh) | (|g| > mean|w|)``, ``p[mask] *= dampening``."""
    selected = _with_grads(entries, frozen, skip_missing_grads)
    for group in _groups(selected, *_CRYSTAL_FIELDS).values():
        cfg = group[0][2].config
        with _reduced(group):
            ops.crystallize_(
                _weights(group), _grads(group), _rates(group), cfg.crystal_thresh,
                cfg.dampening_factor,
            )  # fmt: skip


@torch.no_grad()
def volume_dependent_lr(
    entries: Sequence[Entry], frozen: str = "skip", skip_missing_grads: bool = False
) -> None:
    """``g *= |N(m, lr_variability*m)|``, ``m = base_lr*exp(-stability_factor*|w|/(|w|+1))``."""
    selected = _with_grads(entries, frozen, skip_missing_grads)
    for group in _groups(selected, *_VOLUME_FIELDS).values():
        cfg = group[0][2].config
        ops.volume_scale_(
            _weights(group), _grads(group), *_streams(group),
            cfg.base_lr, cfg.stability_factor, cfg.lr_variability, _spans(group),
        )  # fmt: skip


@torch.no_grad()
def bio_step(
    entries: Sequence[Entry],
    volume: bool = False,
    fuzzy: bool = True,
    crystallize: bool = True,
    frozen: str = "skip",
    skip_missing_grads: bool = False,
) -> None:
    """Volume scaling (only when asked, like ``attach()``), fuzzy scaling and crystallization
    fused in one pass per layer group; equal to ``volume_dependent_lr``,
    ``fuzzy_learning_rates``, ``crystallize`` in that order."""
    if not (volume or fuzzy or crystallize):
        return
    selected = _with_grads(entries, frozen, skip_missing_grads)
    for group in _groups(selected, *_VOLUME_FIELDS, *_CRYSTAL_FIELDS).values():
        params = StepParams.from_config(
            group[0][2].config, volume=volume, fuzzy=fuzzy, crystallize=crystallize
        )
        with _reduced(group):
            ops.bio_step_(
                _weights(group), _grads(group), _rates(group), *_streams(group), params,
                _spans(group),
            )  # fmt: skip


@torch.no_grad()
def scale_updates(
    entries: Sequence[Entry],
    before: Sequence[torch.Tensor],
    volume: bool = False,
    fuzzy: bool = True,
    crystallize: bool = True,
) -> None:
    """The rates and the volume factor applied to the optimizer's *update* instead of the
    gradient (for adaptive optimizers, which cancel a constant factor on the gradient):
    ``w = before + (w - before) * v * p``, then crystallization decided from the true gradient
    and ``before`` (the weights the gradient was computed at). ``before[i]`` is a copy of the
    weight of ``entries[i]`` taken before the step (read, not changed). Each entry needs a
    gradient."""
    if not entries:
        return
    index = {id(layer): i for i, (_, layer, _) in enumerate(entries)}
    for group in _groups(entries, *_VOLUME_FIELDS, *_CRYSTAL_FIELDS).values():
        cfg = group[0][2].config
        # A sharded layer's copy is a DTensor like its weight: its local shard lines up.
        olds = [_local(before[index[id(layer)]]) for _, layer, _ in group]
        weights = _weights(group)
        deltas = [w.sub_(old) for w, old in zip(weights, olds)]  # the weights hold the update
        if volume:
            ops.volume_scale_(
                olds, deltas, *_streams(group),
                cfg.base_lr, cfg.stability_factor, cfg.lr_variability, _spans(group),
            )  # fmt: skip
        if fuzzy:
            ops.fuzzy_scale_(deltas, _rates(group))
        for w, old in zip(weights, olds):
            w.add_(old)
        if crystallize:
            with _reduced(group):
                ops.crystallize_(
                    olds, _grads(group), _rates(group), cfg.crystal_thresh, cfg.dampening_factor
                )


def _rejuvenate(entries: Sequence[Entry], op: Callable) -> None:
    for group in _groups(entries, "rejuvenation_parameter_dre").values():
        dre = group[0][2].config.rejuvenation_parameter_dre
        with _reduced(group):
            counts = op(_weights(group), *_streams(group), dre, _spans(group))
        reduction = sharding.reduction_for(group[0][1].weight)
        if reduction is not None:  # whole-layer counts on every rank (no host sync)
            counts = reduction.sum_(counts.clone())
        log_replaced(counts, group)


@torch.no_grad()
def rejuvenate_weights(entries: Sequence[Entry]) -> None:
    """Replace weak weights at random (``torch_backend.rejuvenate_``)."""
    _rejuvenate(entries, ops.rejuvenate_)


@torch.no_grad()
def rejuvenate_weights_old(entries: Sequence[Entry]) -> None:
    """The original published rejuvenation rule (``torch_backend.rejuvenate_legacy_``)."""
    _rejuvenate(entries, ops.rejuvenate_legacy_)


@torch.no_grad()
def update_fuzzy_learning_rates(entries: Sequence[Entry]) -> None:
    """Advance the TEMPORAL and WEIGHT_ADAPTIVE rate strategies by one update (ACTIVITY is
    tracked in each layer's forward pass)."""
    temporal = [
        e
        for e in entries
        if e[2].config.fuzzy_lr_distribution is Distribution.TEMPORAL
        and e[2].config.fuzzy_lr_dynamic
    ]
    fields = ("fuzzy_lr_update_freq", "fuzzy_lr_decay", "fuzzy_learning_rate_factor_nu")
    for group in _groups(temporal, *fields, "fuzzy_lr_min", "fuzzy_lr_max").values():
        c = group[0][2].config
        ops.temporal_step_(
            _rates(group), [bio._update_count_t for *_, bio in group], *_streams(group),
            c.fuzzy_lr_update_freq, c.fuzzy_lr_decay, c.fuzzy_learning_rate_factor_nu,
            c.fuzzy_lr_min, c.fuzzy_lr_max, _spans(group),
        )  # fmt: skip
    adaptive = [
        e for e in entries if e[2].config.fuzzy_lr_distribution is Distribution.WEIGHT_ADAPTIVE
    ]
    fields = ("fuzzy_lr_update_freq", "fuzzy_lr_dynamic", "fuzzy_learning_rate_factor_nu")
    for group in _groups(adaptive, *fields, "fuzzy_lr_min", "fuzzy_lr_max").values():
        c = group[0][2].config
        with _reduced(group):
            ops.weight_adaptive_step_(
                _rates(group), _weights(group), [bio._update_count_t for *_, bio in group],
                [bio._rates_filled_t for *_, bio in group], *_streams(group),
                c.fuzzy_lr_update_freq, c.fuzzy_lr_dynamic, c.fuzzy_learning_rate_factor_nu,
                c.fuzzy_lr_min, c.fuzzy_lr_max, _spans(group),
            )  # fmt: skip


def check_dales(entries: Sequence[Entry]) -> List[Entry]:
    """The entries Dale's principle is enforced on (all but the marked last layer), after
    checking every layer has it enabled and its signs."""
    for _, _, bio in entries:
        if not bio.config.apply_dales_principle:
            raise AttributeError(DALE_DISABLED)
    active = [e for e in entries if not e[2].is_last_module]
    for _, _, bio in active:
        if getattr(bio, "sign", None) is None:
            raise AttributeError(SIGN_MISSING)
    return active


@torch.no_grad()
def enforce_dales_principle(entries: Sequence[Entry]) -> None:
    """``w = relu(w * sign) * sign`` on every layer but the marked last one."""
    for group in _groups(check_dales(entries)).values():
        # Rows: units. A shard along the units holds the matching signs (shard_layer_rates);
        # a transposed layer's shard keeps every unit's sign.
        weights = [unit_major(_local(layer.weight), layer) for _, layer, _ in group]
        ops.dale_enforce_(weights, [_local(bio.sign) for *_, bio in group])


def add_weight_splitting_step(
    entries: Sequence[Entry], Gamma: Optional[int] = None, activation: Optional[Callable] = None
) -> None:
    """Apply weight splitting (config values unless given); calling it again replaces the
    splitting instead of stacking a second one. Every layer is checked before any changes, so
    a bad ``Gamma`` leaves the model as it was."""
    new_configs = []
    for name, layer, bio in entries:
        try:
            new_configs.append(bio.splitting_config(Gamma, activation))
        except ValueError as exc:
            raise ValueError(f"{exc} Layer {name!r} has {out_units(layer)} outputs.") from None
    for (_, _, bio), cfg in zip(entries, new_configs):
        bio.config = cfg


def log_replaced(counts: torch.Tensor, entries: Sequence[Entry]) -> None:
    """Log the replaced-weight counts, only when the logger is on (reading them syncs) and not
    inside ``torch.compile`` (which cannot trace logging)."""
    if torch.compiler.is_compiling():
        return
    if not logger.isEnabledFor(logging.INFO):
        return
    for n, (_, layer, _) in zip(counts.tolist(), entries):
        total = layer.weight.numel()
        logger.info("rejuvenation replaced %d of %d weights in %s", n, total, type(layer).__name__)
