"""``attach()``: run the bio mechanisms around every optimizer step that actually runs.

``attach(model, optimizer)`` registers a step pre-hook and a step post-hook on the optimizer
(``torch.optim.Optimizer.register_step_pre_hook`` / ``register_step_post_hook``). They act on the
converted layers whose weights this optimizer updates, through
:mod:`bio_transformations.functional`:

* before the step: volume scaling, fuzzy scaling and crystallization (one fused
  ``functional.bio_step``, equal to the three calls in that order), then
  ``update_fuzzy_learning_rates``;
* after the step: Dale's principle where the config applies it, then rejuvenation every
  ``rejuvenate_every`` optimizer steps.

That is ``scale="grad"`` (SGD and other non-adaptive optimizers). With adaptive optimizers
(Adam, AdamW, RMSprop, Adagrad, ...), which cancel a per-element factor on the gradient,
``scale="update"``: the pre-hook keeps a copy of the weights and the post-hook scales the update
by the rates (and the volume factor), crystallizes from the true gradient and updates the rates
(``functional.scale_updates``), before Dale and rejuvenation.

Why optimizer hooks give "the step that actually runs":

* ``torch.amp.GradScaler.step(optimizer)`` unscales the gradients first (unless ``unscale_`` was
  called already) and calls ``optimizer.step()`` only when they are finite; a skipped step never
  reaches the hooks, and the hooks see unscaled (and, when the user clipped after ``unscale_``,
  clipped) gradients.
* Under gradient accumulation ``optimizer.step()`` runs once per accumulated step; so do the hooks.
* When ``optimizer.step(closure)`` computes the gradients inside the closure (Lightning's automatic
  optimization, LBFGS-style optimizers), a pre-hook runs before they exist. The pre-hook then
  wraps the closure instead: the bio work runs right after the closure returns (after
  Lightning's unscaling, ``on_before_optimizer_step`` and gradient clipping, which all run inside
  the closure), before the parameter update. Only the first call of the closure in a step counts.

The step count that drives the rejuvenation cadence is each layer's
:attr:`~bio_transformations.bio_module.BioModule.optimizer_steps`, saved in the model's state
dict, so a resumed run keeps the cadence.
"""

from __future__ import annotations

import functools
import re
import weakref
from typing import Any, Callable, List, Optional, Sequence

import torch
import torch.nn as nn

from . import functional
from .bio_module import BioModule
from .functional import Entry
from .model_methods import bio_layers

__all__ = ["BioAttachment", "attach", "attach_all", "scale_mode", "torch_optimizer"]

# BioModule -> the live attachment acting on its layer: each layer's mechanisms run once a step.
_CLAIMS: "weakref.WeakKeyDictionary[BioModule, BioAttachment]" = weakref.WeakKeyDictionary()


def torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` inside a wrapper (Accelerate's ``AcceleratedOptimizer``
    keeps it as ``.optimizer``, Lightning's ``LightningOptimizer`` as ``._optimizer``)."""
    seen = 0
    while seen < 8:  # wrappers of wrappers, without looping for ever on a cycle
        inner = getattr(optimizer, "optimizer", None)
        if inner is None:
            inner = getattr(optimizer, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            break
        optimizer, seen = inner, seen + 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"attach() needs a torch.optim.Optimizer (or a wrapper holding one as .optimizer), "
            f"got {type(optimizer).__name__}"
        )
    return optimizer


# Optimizers that divide each element's step by a running statistic of its own gradient (or
# take its sign): a constant per-element factor on the gradient cancels in their update.
_ADAPTIVE = (
    torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam,
    torch.optim.RAdam, torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.Adadelta,
    torch.optim.SparseAdam, torch.optim.Rprop,
)  # fmt: skip
# The same families in other libraries, by class name (bitsandbytes, timm, apex, ...).
_ADAPTIVE_NAME = re.compile(
    r"adam|adagrad|adadelta|adafactor|rmsprop|rprop|lamb|lars|lion|sophia|shampoo|prodigy|came",
    re.IGNORECASE,
)


def scale_mode(optimizer: Any, scale: str = "auto") -> str:
    """Where :func:`attach` applies the rates for ``optimizer``: ``"update"`` for adaptive
    optimizers (Adam, AdamW, Adamax, NAdam, RAdam, RMSprop, Adagrad, Adadelta, SparseAdam,
    Rprop, and classes whose name says adam, adagrad, adadelta, adafactor, rmsprop, rprop,
    lamb, lars, lion, sophia, shampoo, prodigy or came), ``"grad"`` otherwise (SGD and the
    rest); ``scale="update"`` or ``"grad"`` overrides the detection."""
    if scale not in ("auto", "update", "grad"):
        raise ValueError(f"scale must be 'auto', 'update' or 'grad', got {scale!r}")
    if scale != "auto":
        return scale
    opt = torch_optimizer(optimizer)
    if isinstance(opt, _ADAPTIVE) or _ADAPTIVE_NAME.search(type(opt).__name__):
        return "update"
    return "grad"


def _owned_layers(model: nn.Module, optimizer: torch.optim.Optimizer) -> List[Entry]:
    """The converted layers of ``model`` whose weight ``optimizer`` updates, in module order."""
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return [e for e in bio_layers(model) if id(e[1].weight) in owned]


def _closure_of(args: tuple, kwargs: dict) -> Optional[Callable]:
    """The closure passed to ``optimizer.step``; ``args[0]`` is the optimizer itself."""
    if "closure" in kwargs:
        return kwargs["closure"]
    return args[1] if len(args) > 1 else None


class BioAttachment:
    """The handle :func:`attach` returns: ``remove()`` detaches (also on leaving a ``with``
    block); ``entries`` are the ``(name, layer, bio_mod)`` it acts on."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any,
        *,
        volume: bool = False,
        fuzzy: bool = True,
        crystallize: bool = True,
        update_rates: bool = True,
        rejuvenate_every: int = 0,
        enforce_dales: Optional[bool] = None,
        scale: str = "auto",
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"attach() needs an nn.Module, got {type(model).__name__}")
        if isinstance(rejuvenate_every, bool) or not isinstance(rejuvenate_every, int):
            raise TypeError(f"rejuvenate_every must be an int, got {rejuvenate_every!r}")
        if rejuvenate_every < 0:
            raise ValueError(f"rejuvenate_every must be >= 0 (0: never), got {rejuvenate_every}")
        if enforce_dales not in (None, True, False):
            raise TypeError(f"enforce_dales must be None, True or False, got {enforce_dales!r}")
        self.optimizer = torch_optimizer(optimizer)
        self.scale = scale_mode(self.optimizer, scale)
        self._before: Optional[tuple] = None  # update mode: (entries, weights before the step)
        self.volume, self.fuzzy, self.crystallize = bool(volume), bool(fuzzy), bool(crystallize)
        self.update_rates = bool(update_rates)
        self.rejuvenate_every = rejuvenate_every
        self.entries: List[Entry] = _owned_layers(model, self.optimizer)
        if not self.entries:
            converted = len(bio_layers(model))
            raise ValueError(
                f"attach(): the optimizer updates none of the {converted} converted layers of "
                f"{type(model).__name__}"
                + ("" if converted else " (convert the model with BioConverter first)")
            )
        self._dale_entries = self._dale_layers(enforce_dales)
        for name, _, bio in self.entries:
            other = _CLAIMS.get(bio)
            if other is not None and other.attached:
                raise ValueError(
                    f"attach(): layer {name!r} is already attached through another attach() "
                    "handle (another optimizer, or this one twice); each layer's mechanisms run "
                    "once per step: remove() the other handle first"
                )
        self.attached = True
        self._stepping = False  # set by the pre-hook when the parameters will be updated
        for _, _, bio in self.entries:
            _CLAIMS[bio] = self
        # Hooks hold the handle weakly: a handle nobody keeps still runs (like a torch hook),
        # but the optimizer does not keep the model alive through it.
        ref = weakref.ref(self)
        self._hooks = [
            self.optimizer.register_step_pre_hook(functools.partial(_pre_hook, ref)),
            self.optimizer.register_step_post_hook(functools.partial(_post_hook, ref)),
        ]

    def _dale_layers(self, enforce_dales: Optional[bool]) -> List[Entry]:
        if enforce_dales is False:
            return []
        if enforce_dales is None:  # as configured: the layers with Dale's principle on
            selected = [e for e in self.entries if e[2].config.apply_dales_principle]
        else:
            selected = self.entries
        # Checked now, not at the first step: missing signs or Dale turned off raise here.
        return functional.check_dales(selected) if selected else []

    # -- the two hook points ---------------------------------------------------------------

    @torch.no_grad()
    def before_step(self) -> None:
        """What runs before the parameter update (the gradients are final here)."""
        scaling = self.volume or self.fuzzy or self.crystallize
        if self.scale == "update":
            # Keep the weights the gradient was computed at: the update is scaled after the
            # step (one copy of each weight with a gradient, held during the step).
            if scaling:
                entries = functional._with_grads(self.entries, "skip", True)
                self._before = (entries, [e[1].weight.detach().clone() for e in entries])
            return
        if scaling:
            functional.bio_step(
                self.entries, self.volume, self.fuzzy, self.crystallize,
                frozen="skip", skip_missing_grads=True,
            )  # fmt: skip
        if self.update_rates:
            functional.update_fuzzy_learning_rates(self.entries)

    @torch.no_grad()
    def after_step(self) -> None:
        """What runs after the parameter update: in update mode the scaling of the update and
        the rate updates, then Dale, the step count, rejuvenation."""
        if self.scale == "update":
            if self._before is not None:
                entries, before = self._before
                self._before = None
                functional.scale_updates(entries, before, self.volume, self.fuzzy, self.crystallize)
            if self.update_rates:
                functional.update_fuzzy_learning_rates(self.entries)
        if self._dale_entries:
            functional.enforce_dales_principle(self._dale_entries)
        due = []
        for entry in self.entries:
            steps = entry[2]._optimizer_steps_t  # a CPU scalar: reading it is no device sync
            steps.add_(1)
            if self.rejuvenate_every and int(steps) % self.rejuvenate_every == 0:
                due.append(entry)
        if due:
            functional.rejuvenate_weights(due)

    # -- handle ----------------------------------------------------------------------------

    def remove(self) -> None:
        """Detach: the optimizer steps without the mechanisms from now on."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self.attached:
            for _, _, bio in self.entries:
                if _CLAIMS.get(bio) is self:
                    del _CLAIMS[bio]
        self.attached = False

    def __enter__(self) -> "BioAttachment":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        names = ", ".join(name for name, _, _ in self.entries)
        state = "attached" if self.attached else "removed"
        return (
            f"<BioAttachment {state}: {type(self.optimizer).__name__} on [{names}], "
            f"scaling the {'update' if self.scale == 'update' else 'gradient'}>"
        )


def _check_amp_state(optimizer: torch.optim.Optimizer) -> bool:
    """Whether the step will update the parameters, for optimizers that handle a GradScaler's
    scale themselves (``fused=True``): GradScaler calls their ``step`` even for infinite
    gradients and sets ``grad_scale``/``found_inf`` on them (reading ``found_inf`` syncs once)."""
    if getattr(optimizer, "grad_scale", None) is not None:
        raise RuntimeError(
            "attach(): the gradients are still scaled by a GradScaler (an optimizer that unscales "
            "inside its step, e.g. fused=True): call scaler.unscale_(optimizer) before "
            "scaler.step(optimizer)"
        )
    found_inf = getattr(optimizer, "found_inf", None)
    return found_inf is None or not bool(found_inf)


def _pre_hook(ref: "weakref.ref[BioAttachment]", optimizer, args: tuple, kwargs: dict) -> Any:
    handle = ref()
    if handle is None or not handle.attached:
        return None
    closure = _closure_of(args, kwargs)
    if closure is None:
        handle._stepping = _check_amp_state(optimizer)
        if handle._stepping:
            handle.before_step()
        return None
    handle._stepping = True
    pending = [True]

    def closure_then_bio() -> Any:
        out = closure()  # forward and backward (and, in Lightning, unscaling and clipping)
        if pending[0]:
            pending[0] = False
            handle.before_step()
        return out

    if "closure" in kwargs:
        return args, {**kwargs, "closure": closure_then_bio}
    return (args[0], closure_then_bio, *args[2:]), kwargs


def _post_hook(ref: "weakref.ref[BioAttachment]", optimizer, args: tuple, kwargs: dict) -> None:
    handle = ref()
    if handle is None or not handle.attached or not getattr(handle, "_stepping", False):
        return
    handle._stepping = False
    handle.after_step()


def attach(
    model: nn.Module,
    optimizer: Any,
    *,
    volume: bool = False,
    fuzzy: bool = True,
    crystallize: bool = True,
    update_rates: bool = True,
    rejuvenate_every: int = 0,
    enforce_dales: Optional[bool] = None,
    scale: str = "auto",
) -> BioAttachment:
    """Run the bio mechanisms around every step of ``optimizer`` that actually runs.

    Args:
        model: a converted model, or any module holding converted layers (a LightningModule,
            a wrapper); the mechanisms act on the converted layers whose weight ``optimizer``
            updates.
        optimizer: a ``torch.optim.Optimizer``, or a wrapper holding one (Accelerate's
            prepared optimizer).
        volume: volume-dependent scaling of the gradient (off by default: it cuts the effective
            learning rate to about ``base_lr * exp(-stability_factor*|w|/(|w|+1))``, ~0.1x).
        fuzzy: scale each gradient by its per-synapse rate.
        crystallize: dampen the rates of settled or overshooting synapses.
        update_rates: advance the dynamic rate strategies (``update_fuzzy_learning_rates``).
        rejuvenate_every: rejuvenate the weights after every ``n``-th optimizer step (0: never);
            counted per layer in its saved state, so the cadence survives a checkpoint.
        enforce_dales: Dale's principle after each step; ``None`` (default) on the layers whose
            config applies it, ``True`` on every attached layer (error if one has no signs),
            ``False`` never.
        scale: where the rates and the volume factor apply. ``"grad"``: to the gradient,
            before the step (SGD and other non-adaptive optimizers). ``"update"``: to the
            parameter update, after the step, ``w = w0 + (w - w0) * v * p`` (adaptive
            optimizers such as Adam, AdamW, RMSprop, Adagrad, which divide each element's step
            by its own gradient statistics and so cancel a per-element factor on the gradient);
            crystallization then decides from the true gradient. ``"auto"`` (default) picks by
            the optimizer's family (:func:`scale_mode`).

    Before the step (after ``GradScaler`` unscaling and any clipping, never for a step the
    scaler skips, once per accumulated step): volume scaling, fuzzy scaling, crystallization,
    then ``update_fuzzy_learning_rates``. After the step: Dale, then rejuvenation. Layers
    without a gradient this step are skipped by the gradient mechanisms.

    Returns:
        a :class:`BioAttachment`; ``handle.remove()`` (or leaving ``with attach(...):``)
        detaches it.

    Raises:
        ValueError: the optimizer updates no converted layer, or a layer is already attached
            through another handle (mechanisms would run twice).
    """
    return BioAttachment(
        model, optimizer, volume=volume, fuzzy=fuzzy, crystallize=crystallize,
        update_rates=update_rates, rejuvenate_every=rejuvenate_every,
        enforce_dales=enforce_dales, scale=scale,
    )  # fmt: skip


def attach_all(model: nn.Module, optimizers: Sequence[Any], **options: Any) -> List[BioAttachment]:
    """:func:`attach` for each optimizer that updates at least one converted layer of ``model``
    (the framework callbacks' helper); raises if none does."""
    handles: List[BioAttachment] = []
    try:
        for optimizer in optimizers:
            if _owned_layers(model, torch_optimizer(optimizer)):
                handles.append(attach(model, optimizer, **options))
    except Exception:
        for handle in handles:
            handle.remove()
        raise
    if not handles:
        raise ValueError(
            f"no optimizer updates any of the {len(bio_layers(model))} converted layers of "
            f"{type(model).__name__} (convert the model with BioConverter before training)"
        )
    return handles
