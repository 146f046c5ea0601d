"""``BioModule``: the bio mechanisms attached to one ``Linear``/``Conv`` layer as ``layer.bio_mod``.

Every mechanism method calls the grouped implementation in
:mod:`bio_transformations.functional` with this layer alone, so there is one implementation of
each mechanism; the model-level methods call the same functions with every converted layer.
The module is longer than ~500 lines because it also holds the layer's checkpoint format (the
tensor extra state, and loading the published package's and earlier checkpoints).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from . import functional, ops, sharding
from .bio_config import DEFAULT_BIO_CONFIG, BioConfig, BioConfigError, Distribution, validate_config
from .compat import BioModuleCompat
from .head import dry_run_active
from .kernels import philox, rng, stats
from .kernels.shards import flatten_spans
from .layers import (
    CONVERTIBLE_LAYERS,
    is_convertible,
    out_dim,
    out_units,
    output_channel_dim,
    per_unit_shape,
    unit_major,
)
from .ops import OP_IDS  # noqa: F401  (re-exported: its old home)
from .summary import BioSummary, summarize

__all__ = [
    "BioModule",
    "CONVERTIBLE_LAYERS",
    "EXTRA_STATE_FIELDS",
    "EXTRA_STATE_VERSION",
    "split_output",
]

logger = logging.getLogger("bio_transformations")


# Which initial draw each distribution starts from (the dynamic ones start from these too).
_INITIAL_RATES = {
    Distribution.BASELINE: "baseline",
    Distribution.UNIFORM: "uniform",
    Distribution.NORMAL: "normal",
    Distribution.LOGNORMAL: "lognormal",
    Distribution.GAMMA: "gamma",
    Distribution.BETA: "beta",
    Distribution.LAYER_ADAPTIVE: "uniform",
    Distribution.WEIGHT_ADAPTIVE: "baseline",
    Distribution.TEMPORAL: "uniform",
    Distribution.ACTIVITY: "baseline",
}

#: The fields of a layer's saved extra state (``bio_mod._extra_state``), one int64 each.
EXTRA_STATE_FIELDS = (
    "version",
    "layer_seed",
    "rng_step",
    "update_count",
    "rates_filled",
    "activity_calls",
    "optimizer_steps",
)
#: The extra-state format written now (version 1 was a dict, without ``optimizer_steps``).
EXTRA_STATE_VERSION = 2
_M64 = (1 << 64) - 1


def _seed_to_int64(seed: int) -> int:
    """A 64-bit unsigned seed as the int64 with the same bits (``& 2**64-1`` reads it back)."""
    seed &= _M64
    return seed - (1 << 64) if seed >= 1 << 63 else seed


_SPLIT_ERROR = "weight_splitting_Gamma (G) must evenly divide the number of features (C)."


def check_splitting(layer: nn.Module, gamma: int) -> None:
    """Raise ``ValueError`` if ``gamma > 1`` does not divide the layer's output units."""
    if gamma > 1 and out_units(layer) % gamma != 0:
        raise ValueError(_SPLIT_ERROR)


def split_output(
    y: torch.Tensor, gamma: int, activation: Callable, channel_dim: int
) -> torch.Tensor:
    """Weight splitting: ``activation(y)``, sum groups of ``gamma`` neighbouring channels along
    ``channel_dim`` and repeat each sum ``gamma`` times."""
    y = activation(y)
    c = y.shape[channel_dim]
    if c % gamma != 0:
        raise ValueError(_SPLIT_ERROR)
    grouped = y.unflatten(channel_dim, (c // gamma, gamma)).sum(channel_dim + 1)
    return torch.repeat_interleave(grouped, gamma, dim=channel_dim)


def bio_forward_hook(
    module: nn.Module, inputs: Any, output: torch.Tensor
) -> Optional[torch.Tensor]:
    """Forward hook of a converted layer: activity tracking (training only) and weight splitting.

    It looks ``bio_mod`` up at call time, so re-conversion and ``add_weight_splitting_step``
    change the behaviour without stacking hooks.
    """
    bio = module._modules.get("bio_mod")
    if not isinstance(bio, BioModule) or dry_run_active():
        return None
    cfg = bio.config
    if (
        module.training
        and cfg.fuzzy_lr_dynamic
        and cfg.fuzzy_lr_distribution is Distribution.ACTIVITY
        and torch.is_tensor(output)
    ):
        bio._activity_step(output.detach())
    gamma = cfg.weight_splitting_Gamma
    if gamma > 1 and not getattr(module, "last_module_token", False):
        channel_dim = output_channel_dim(module, output)
        return split_output(output, gamma, cfg.weight_splitting_activation_function, channel_dim)
    return None


class BioModule(BioModuleCompat, nn.Module):
    """The bio mechanisms of one layer.

    Args:
        parent: a zero-argument callable returning the wrapped layer (``lambda: layer``).
        config: the :class:`~bio_transformations.bio_config.BioConfig` to use.
        layer_seed: this layer's random seed (keyword only; drawn from torch's default
            generator when omitted).

    Attributes:
        fuzzy_learning_rate_parameters: buffer shaped like the weight, the per-synapse rates.
        layer_seed: this layer's random seed (drawn from torch's default generator).
    """

    #: The model-level method names (one table: ``functional.METHOD_NAMES``).
    exposed_functions = functional.METHOD_NAMES

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name == "config":  # the model-level bio_step's cached decisions depend on it
            from . import step_cache

            step_cache.decisions_changed()

    def __init__(
        self,
        parent: Callable[[], nn.Module],
        config: BioConfig = DEFAULT_BIO_CONFIG,
        *,
        layer_seed: Optional[int] = None,
    ):
        super().__init__()
        if not callable(parent):
            raise BioConfigError("parent must be a Callable returning an nn.Module instance")
        layer = parent()
        if not isinstance(layer, nn.Module):
            raise BioConfigError("parent output must be an instance of nn.Module")
        weight = getattr(layer, "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"BioModule needs a layer with a weight tensor, got {type(layer)}")
        self.config = validate_config(config)
        # Called on every access, as upstream: a `lambda: layer` follows a rebinding of `layer`.
        # A plain attribute (a callable module must not become a submodule: the tree would be
        # cyclic). The converter passes `functools.partial(identity, layer)`, which deepcopy
        # and pickling follow to the copied layer.
        object.__setattr__(self, "_parent_fn", parent)
        # The converter passes seeds agreed across data-parallel ranks; alone, draw one from
        # torch's default generator so torch.manual_seed makes runs repeatable.
        self.layer_seed = philox.new_layer_seed() if layer_seed is None else int(layer_seed)
        # The step counter is a CPU int64 scalar (not a buffer: it stays on the CPU when the
        # model moves) so compiled code can pass it to the ops, which advance it.
        self._rng_step = torch.zeros((), dtype=torch.int64)
        # Dynamic-rate counters, CPU tensors like the step counter (advanced inside the ops).
        self._update_count_t = torch.zeros((), dtype=torch.int64)
        self._rates_filled_t = torch.zeros((), dtype=torch.int64)
        self._activity_calls_t = torch.zeros((), dtype=torch.int64)  # CPU, like _rng_step
        # Optimizer steps seen by attach() (its rejuvenation cadence), CPU like the others.
        self._optimizer_steps_t = torch.zeros((), dtype=torch.int64)
        rates = torch.ones_like(weight, requires_grad=False)
        self.register_buffer("fuzzy_learning_rate_parameters", rates)
        if self.config.fuzzy_lr_distribution is Distribution.ACTIVITY:
            counts = torch.zeros(out_units(layer), dtype=torch.int64, device=weight.device)
            self.register_buffer("activation_count", counts)
        self._init_rates()
        if self.config.apply_dales_principle:
            BioModule.dalian_network_initialization(self)

    # -- plumbing ------------------------------------------------------------------------------

    def get_parent(self) -> nn.Module:
        """The wrapped layer: ``parent()``, evaluated on every access."""
        return self.__dict__["_parent_fn"]()

    @property
    def rng_step(self) -> int:
        """How many random streams this layer has used; with ``layer_seed`` it keys the next
        draw. Both are saved in the state dict, so a resumed run draws the same numbers."""
        return int(self._rng_step)

    @rng_step.setter
    def rng_step(self, value: int) -> None:
        self._rng_step.fill_(int(value))

    def next_key(self, op: str) -> int:
        """The key of this layer's next random stream for ``op``; advances ``rng_step``."""
        return ops.draw_keys([self._rng_step], [self.layer_seed], op)[0]

    def _entry(self) -> functional.Entry:
        """This layer as a one-element group for :mod:`~bio_transformations.functional`."""
        layer = self.get_parent()
        return (type(layer).__name__, layer, self)

    @property
    def _update_count(self) -> int:
        return int(self._update_count_t)

    @_update_count.setter
    def _update_count(self, value: int) -> None:
        self._update_count_t.fill_(int(value))

    @property
    def _rates_filled(self) -> bool:
        return bool(self._rates_filled_t)

    @_rates_filled.setter
    def _rates_filled(self, value: bool) -> None:
        self._rates_filled_t.fill_(int(bool(value)))

    def _weight(self) -> torch.Tensor:
        return self.get_parent().weight

    def _grad(self) -> torch.Tensor:
        grad = self._weight().grad
        if grad is None:
            raise RuntimeError("No gradients found for the weights")
        return grad

    @property
    def is_last_module(self) -> bool:
        """Whether the wrapped layer carries ``last_module_token`` (no splitting, no Dale)."""
        return bool(getattr(self.get_parent(), "last_module_token", False))

    def effective_nu(self) -> float:
        """nu, scaled down with depth for ``LAYER_ADAPTIVE``: ``nu * (1 - 0.5 * index/total)``."""
        c = self.config
        nu = c.fuzzy_learning_rate_factor_nu
        if (
            c.fuzzy_lr_distribution is Distribution.LAYER_ADAPTIVE
            and c.fuzzy_lr_layer_index >= 0
            and c.fuzzy_lr_total_layers > 0
        ):
            nu = nu * (1.0 - 0.5 * c.fuzzy_lr_layer_index / c.fuzzy_lr_total_layers)
        return nu

    def get_extra_state(self) -> torch.Tensor:
        """Host-side state saved in the state dict, as one int64 tensor (so the state dict holds
        tensors only and ``safetensors`` can save it): the fields of :data:`EXTRA_STATE_FIELDS`
        in that order; the 64-bit layer seed is stored as its bit pattern."""
        values = [
            EXTRA_STATE_VERSION,
            _seed_to_int64(self.layer_seed),
            self.rng_step,
            self._update_count,
            int(self._rates_filled),
            self._activity_calls,
            self.optimizer_steps,
        ]
        return torch.tensor(values, dtype=torch.int64)

    def set_extra_state(self, state: Any) -> None:
        """Restore what :meth:`get_extra_state` saved (also the dict of format version 1)."""
        if isinstance(state, dict):
            self._set_extra_state_v1(state)
            return
        if (
            not torch.is_tensor(state)
            or state.dtype != torch.int64
            or state.dim() != 1
            or state.numel() < 1
        ):
            raise RuntimeError(f"unrecognised BioModule extra state: {state!r}")
        values = state.tolist()  # read once at load time (a device tensor syncs here only)
        if values[0] != EXTRA_STATE_VERSION or len(values) != len(EXTRA_STATE_FIELDS):
            raise RuntimeError(
                f"unrecognised BioModule extra state: version {values[0]} with {len(values)} "
                f"fields (this version reads version {EXTRA_STATE_VERSION}, "
                f"{len(EXTRA_STATE_FIELDS)} fields)"
            )
        fields = dict(zip(EXTRA_STATE_FIELDS, values))
        self.layer_seed = fields["layer_seed"] & _M64
        self.rng_step = fields["rng_step"]
        self._update_count = fields["update_count"]
        self._rates_filled = bool(fields["rates_filled"])
        self._activity_calls = fields["activity_calls"]
        self.optimizer_steps = fields["optimizer_steps"]

    def _set_extra_state_v1(self, state: dict) -> None:
        """The dict this package saved before the state dict held tensors only; it has no
        optimizer step count (``attach()`` did not exist), which starts again at 0."""
        if "layer_seed" not in state:
            raise RuntimeError(f"unrecognised BioModule extra state: {state!r}")
        self.layer_seed = int(state["layer_seed"])
        self.rng_step = int(state["rng_step"])
        self._update_count = int(state.get("update_count", 0))
        self._rates_filled = bool(state.get("rates_filled", False))
        self._activity_calls = int(state.get("activity_calls", 0))
        self.optimizer_steps = 0
        logger.warning(
            "%s: checkpoint in the old dict format has no optimizer step count; attach()'s "
            "rejuvenation cadence counts from 0 for this layer",
            type(self.get_parent()).__name__,
        )

    @property
    def optimizer_steps(self) -> int:
        """How many optimizer steps :func:`bio_transformations.attach` has seen update this
        layer; it drives the rejuvenation cadence and is saved in the state dict."""
        return int(self._optimizer_steps_t)

    @optimizer_steps.setter
    def optimizer_steps(self, value: int) -> None:
        self._optimizer_steps_t.fill_(int(value))

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list,
        unexpected_keys: list,
        error_msgs: list,
    ) -> None:
        """Also accept checkpoints of the published package (no seed/step state; Dale signs
        drawn per ``(out, in)`` pair for convolutions), this package's earlier one-dimensional
        signs (any per-unit sign is reshaped to this module's shape), and plain checkpoints (no
        key of this module at all), which leave this module's state as it is."""
        sign_key = prefix + "sign"
        own_sign = self._buffers.get("sign")
        theirs = state_dict.get(sign_key)
        if own_sign is not None and torch.is_tensor(theirs) and theirs.shape != own_sign.shape:
            state_dict[sign_key] = _loaded_sign(theirs, own_sign, sign_key)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        extra_key = prefix + "_extra_state"
        if not any(key.startswith(prefix) for key in state_dict):
            # A plain (e.g. pretrained) checkpoint: keep this layer's bio state; the model
            # logs one INFO line for the whole load (bio_transformations.unconvert).
            from .unconvert import note_plain_load

            missing_keys[:] = [k for k in missing_keys if not k.startswith(prefix)]
            note_plain_load(prefix)
            return
        if extra_key in missing_keys:
            # An upstream checkpoint: keep this layer's seed and step counters.
            missing_keys.remove(extra_key)
            logger.warning(
                "%s: checkpoint has no layer seed/step state (saved by the published package?); "
                "this layer keeps its own random stream",
                prefix.rstrip(".") or "BioModule",
            )

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"distribution={c.fuzzy_lr_distribution.value}, nu={c.fuzzy_learning_rate_factor_nu}, "
            f"splitting_Gamma={c.weight_splitting_Gamma}, dales={c.apply_dales_principle}"
        )

    @torch.no_grad()
    def _init_rates(self) -> None:
        c = self.config
        ops.rates_init_(
            [self.fuzzy_learning_rate_parameters], [self._rng_step], [self.layer_seed],
            _INITIAL_RATES[c.fuzzy_lr_distribution], self.effective_nu(),
            c.fuzzy_lr_min, c.fuzzy_lr_max,
        )  # fmt: skip

    # -- the mechanisms: each is the grouped implementation with this layer alone -----------

    @torch.no_grad()
    def fuzzy_learning_rates(self) -> None:
        """Scale the gradient by the per-synapse rates: ``g *= p``."""
        functional.fuzzy_learning_rates([self._entry()], frozen="keep")

    @torch.no_grad()
    def crystallize(self) -> None:
        """Dampen the rates of synapses whose relative gradient is tiny or whose gradient is
        large: ``mask = (|g|/|w| < crystal_thresh) | (|g| > mean|w|)``, ``p[mask] *= d``."""
        functional.crystallize([self._entry()], frozen="raise")

    @torch.no_grad()
    def volume_dependent_lr(self) -> None:
        """Scale the gradient by ``|N(m, lr_variability*m)|``, ``m = base_lr*exp(-s*|w|/(|w|+1))``:
        large (voluminous) synapses learn less, with a fresh draw each call."""
        functional.volume_dependent_lr([self._entry()], frozen="keep")

    @torch.no_grad()
    def bio_step(self, volume: bool = False, fuzzy: bool = True, crystallize: bool = True) -> None:
        """Volume scaling (off unless asked: it cuts the effective learning rate about tenfold),
        fuzzy scaling and crystallization in one fused pass; the same result as calling them
        one after another in that order."""
        functional.bio_step(
            [self._entry()], volume, fuzzy, crystallize, frozen="raise" if crystallize else "keep"
        )

    @torch.no_grad()
    def rejuvenate_weights(self) -> None:
        """Replace weights at random, most likely the weak ones, with values drawn from a
        log-normal fitted to ``|w|`` and a random sign (``kernels.torch_backend.rejuvenate_``)."""
        functional.rejuvenate_weights([self._entry()])

    @torch.no_grad()
    def rejuvenate_weights_old(self) -> None:
        """The original published rejuvenation rule (``torch_backend.rejuvenate_legacy_``)."""
        functional.rejuvenate_weights_old([self._entry()])

    @torch.no_grad()
    def update_fuzzy_learning_rates(self, x: Optional[torch.Tensor] = None) -> None:
        """Advance the dynamic rate strategies by one update.

        TEMPORAL (with ``fuzzy_lr_dynamic``): every ``fuzzy_lr_update_freq`` updates
        ``p = 1 + (p-1)*fuzzy_lr_decay``, every ``10*fuzzy_lr_update_freq`` also add
        ``0.1*(2U-1)*nu``. WEIGHT_ADAPTIVE: filled on the first update, refreshed every
        ``fuzzy_lr_update_freq`` updates when dynamic. ACTIVITY (with ``fuzzy_lr_dynamic``): with
        an input ``x``, count the active output units and redraw rows (converted layers do this
        in their forward pass while training, so ``x`` is rarely needed).
        """
        c = self.config
        if c.fuzzy_lr_distribution is Distribution.ACTIVITY:
            if c.fuzzy_lr_dynamic and x is not None:
                layer = self.get_parent()
                try:
                    # The layer's own forward, without hooks (no splitting, no second count).
                    output = type(layer).forward(layer, x)
                except NotImplementedError:  # a custom layer with a weight but no forward
                    logger.debug(
                        "%s has no forward of its own: no activity counted from x",
                        type(layer).__name__,
                    )
                    return
                self._activity_step(output)
            return
        functional.update_fuzzy_learning_rates([self._entry()])

    @torch.no_grad()
    def _activity_step(self, output: torch.Tensor) -> None:
        """Count active output units (``|y| > 0.01``) and redraw rows of the rates.

        One custom op (``ops.activity_step_``), so a compiled forward pass neither breaks its
        graph nor recompiles as the host-side counters advance."""
        layer = self.get_parent()
        c = self.config
        rates, counts = self.fuzzy_learning_rate_parameters, self.activation_count
        spans = None
        if sharding.is_sharded(rates):  # FSDP2: this rank's shard (sharding.shard_rates)
            span = sharding.span_of(rates)
            if out_dim(layer) == 1:  # the unit-major view of a transposed layer's shard
                span = span._replace(dim=1 - span.dim)
            spans = flatten_spans([span])
        # Counts split with the units: their mean over the layer is reduced over the group.
        reduction = sharding.reduction_for(counts)
        with contextlib.nullcontext() if reduction is None else stats.reduced_over(reduction):
            # Rates as (units, ...): the op redraws them row by row from each unit's count.
            ops.activity_step_(
                output, sharding.local(counts), unit_major(sharding.local(rates), layer),
                self._rng_step, self._activity_calls_t, self.layer_seed,
                output_channel_dim(layer, output), c.fuzzy_learning_rate_factor_nu,
                c.fuzzy_lr_min, c.fuzzy_lr_max, spans,
            )  # fmt: skip

    @property
    def _activity_calls(self) -> int:
        return int(self._activity_calls_t)

    @_activity_calls.setter
    def _activity_calls(self, value: int) -> None:
        self._activity_calls_t.fill_(int(value))

    def l1_reg(self) -> torch.Tensor:
        """L1 norm of the module's own tensors that upstream keeps as parameters (the rates, and
        the Dale signs when present), so the value matches the published package."""
        tensors = [self.fuzzy_learning_rate_parameters, *self.parameters()]
        if getattr(self, "sign", None) is not None:
            tensors.append(self.sign)
        return sum(t.abs().sum() for t in tensors)

    @staticmethod
    @torch.no_grad()
    def dalian_network_initialization(module: nn.Module) -> None:
        """Dale's principle at initialisation: every output unit gets one random sign, its
        weights become ``|w| * sign``, and the sign is stored as buffer ``sign``.

        The marked output layer gets its signs (so checkpoints have the same keys) but keeps
        its weights: Dale's principle does not constrain it."""
        layer = module.get_parent() if isinstance(module, BioModule) else None
        if layer is None or not is_convertible(layer):
            target = type(layer) if layer is not None else type(module)
            raise AttributeError(f"Can not use dalians network initialization on {target}")
        w = unit_major(layer.weight, layer)
        units = w.shape[0]
        u = rng.uniform(module.next_key("dale_init"), units, w.device)
        # Shaped to broadcast against the weight, as upstream's: user code `sign * weight` works.
        sign = torch.where(u < 0.5, 1.0, -1.0).to(w.dtype).reshape(per_unit_shape(layer))
        if "sign" in module._buffers:
            module.sign = sign
        else:
            module.register_buffer("sign", sign)
        if not module.is_last_module:
            module.apply_dale_signs()

    @torch.no_grad()
    def apply_dale_signs(self) -> None:
        """``w = |w| * sign`` per output unit, with this layer's stored signs."""
        layer = self.get_parent()
        w = unit_major(layer.weight, layer)  # a view: writing it writes the weight
        w.copy_(w.abs() * unit_major(self.sign, layer))

    @torch.no_grad()
    def enforce_dales_principle(self) -> None:
        """``w = relu(w * sign) * sign``: weights that changed sign are set to 0.
        Skipped on the layer marked as the last one."""
        functional.enforce_dales_principle([self._entry()])

    def splitting_config(
        self, Gamma: Optional[int] = None, activation: Optional[Callable] = None
    ) -> BioConfig:
        """This module's config with weight splitting set to ``Gamma``/``activation`` (current
        values when None), validated against the layer (the marked last layer is not checked)."""
        c = self.config
        new = c._replace(
            weight_splitting_Gamma=c.weight_splitting_Gamma if Gamma is None else Gamma,
            weight_splitting_activation_function=(
                c.weight_splitting_activation_function if activation is None else activation
            ),
        )
        new = validate_config(new)
        if not self.is_last_module:
            check_splitting(self.get_parent(), new.weight_splitting_Gamma)
        return new

    def add_weight_splitting_step(
        self, Gamma: Optional[int] = None, activation: Optional[Callable] = None
    ) -> None:
        """Apply weight splitting with ``Gamma`` and ``activation`` (config values when None),
        replacing any splitting set before. The marked last layer is never split."""
        self.config = self.splitting_config(Gamma, activation)

    def bio_summary(self) -> BioSummary:
        """This layer's row of the model's summary (``bio_model.bio_summary()``)."""
        layer = self.get_parent()
        return summarize([(type(layer).__name__, layer, self)])


def _loaded_sign(theirs: torch.Tensor, own: torch.Tensor, key: str) -> torch.Tensor:
    """A checkpoint's Dale signs in this module's shape: one sign per output unit, from a
    1-D ``(out,)`` or any ``(out, 1, ...)`` tensor, or the majority of upstream's per-pair
    ``(out, in, 1, 1)`` convolution signs."""
    units = own.numel()
    if theirs.numel() == units:
        return theirs.reshape(own.shape).to(own.dtype)
    if theirs.dim() == 0 or theirs.shape[0] != units:
        raise RuntimeError(
            f"size mismatch for {key}: checkpoint has shape {tuple(theirs.shape)}, this model "
            f"expects one sign per output unit, shape {tuple(own.shape)}"
        )
    rows = theirs.reshape(units, -1)
    majority = torch.where(rows.sum(1) >= 0, 1.0, -1.0).to(own.dtype).reshape(own.shape)
    if not bool((rows == majority.reshape(units, 1)).all()):
        logger.warning(
            "%s: the checkpoint's Dale signs differ within an output unit (upstream drew one "
            "per (out, in) pair for convolutions); using each unit's majority sign",
            key,
        )
    return majority
