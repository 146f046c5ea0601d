"""The methods a converted model gains: each applies the :mod:`~bio_transformations.functional`
implementation of the same name to every converted layer.

Frozen layers (``weight.requires_grad`` False) are skipped by the gradient methods; a missing
gradient is an error naming the layer unless ``skip_missing_grads=True`` is passed.

The converter records the converted layers once (``model._bio_layers``, a list of
``(name, layer)`` in module order), so a call does not walk the module tree.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn as nn

from . import functional, step_cache
from .bio_module import BioModule
from .functional import METHOD_NAMES, Entry
from .summary import BioSummary, summarize

__all__ = ["MODEL_METHODS", "ModelMethod", "bio_layers"]


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


def _model_level(name: str) -> Callable:
    """The model-level method ``name``: the functional implementation over every layer."""
    impl = getattr(functional, name)

    def method(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return impl(bio_layers(self), *args, **kwargs)

    method.__name__ = method.__qualname__ = name
    method.__doc__ = impl.__doc__
    return method


def update_fuzzy_learning_rates(self: nn.Module, x: Optional[torch.Tensor] = None) -> None:
    """Advance the dynamic rate strategies of every converted layer by one update.

    ``x`` is accepted for compatibility and not used: activity is tracked in each layer's
    forward pass while training, with that layer's own input (upstream passed one ``x`` to
    every layer, which fails for any layer after the first).
    """
    functional.update_fuzzy_learning_rates(bio_layers(self))


def bio_summary(self: nn.Module) -> BioSummary:
    """A table of the converted layers (layer, type, shape, rates, distribution, splitting,
    Dale, notes) that prints as text; ``.rows`` has the same as a list of dicts and
    ``.skipped`` the modules the conversion left alone. Reads the rates on the host."""
    return summarize(bio_layers(self), self.__dict__.get("_bio_plan"))


def bio_step(self: nn.Module, *args: Any, **kwargs: Any) -> None:
    return step_cache.bio_step(self, bio_layers, *args, **kwargs)


bio_step.__doc__ = (functional.bio_step.__doc__ or "") + (
    "\n\n    Host-light: the host-side decisions are cached per model and checked each call "
    "(:mod:`bio_transformations.step_cache`)."
)

#: Model-level methods that are not the functional implementation over every layer.
_SPECIAL: Dict[str, Callable] = {
    "bio_step": bio_step,
    "update_fuzzy_learning_rates": update_fuzzy_learning_rates,
    "bio_summary": bio_summary,
}

#: name -> function of every method a converted model gains.
MODEL_METHODS: Dict[str, Callable] = {
    name: _SPECIAL[name] if name in _SPECIAL else _model_level(name) for name in METHOD_NAMES
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
