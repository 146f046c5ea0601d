"""Taking the mechanisms off a converted model again, and loading plain checkpoints.

:func:`unconvert` is the counterpart of ``BioConverter(...)(model)``, like
``torch.nn.utils.prune.remove``: it works in place and leaves plain layers (no ``bio_mod``, no
forward hook, no model-level methods), so ``model.state_dict()`` has the keys of the model
before conversion. The weights stay as trained.

A converted model loads a plain (for example pretrained) state dict: layers whose ``bio_mod``
keys are all absent keep their rates, signs and seeds, and one INFO line says so
(:func:`install_plain_load_report`, which the converter installs).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, TypeVar

import torch.nn as nn

from . import head as heads
from .bio_module import BioModule, bio_forward_hook
from .model_methods import MODEL_METHODS

__all__ = ["plain_state_dict", "unconvert"]

logger = logging.getLogger("bio_transformations")
M = TypeVar("M", bound=nn.Module)

_HOOK_FLAG = "_bio_hook_installed"
_MODEL_ATTRS = ("_bio_layers", "_bio_plan")
#: Prefixes of the converted layers that loaded a plain state dict, reported once per load.
_plain_loads: List[str] = []
_REPORT_FLAG = "_bio_plain_load_report"


def unconvert(model: M) -> M:
    """Remove the bio mechanisms from ``model`` in place and return it.

    Every ``bio_mod`` is deleted, the converter's forward hooks and output-layer marks are
    removed, and the model-level methods (``model.crystallize`` and the rest) are gone. The
    weights are kept as they are (including what Dale's principle or rejuvenation did to
    them). A model made by a converted *class* keeps the class's methods, which then act on
    no layer.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"unconvert expects an nn.Module, got {type(model).__name__}")
    for module in model.modules():
        if isinstance(module, BioModule):
            continue
        module._modules.pop("bio_mod", None)
        for key, hook in list(module._forward_hooks.items()):
            if hook is bio_forward_hook:
                del module._forward_hooks[key]
        module.__dict__.pop(_HOOK_FLAG, None)
        heads.unmark(module)
        pending = module.__dict__.pop(heads.PENDING, None)
        if pending is not None:
            module._forward_pre_hooks.pop(pending, None)
            module._forward_pre_hooks_with_kwargs.pop(pending, None)
        report = module.__dict__.pop(_REPORT_FLAG, None)
        if report is not None:
            module._load_state_dict_post_hooks.pop(report, None)
        for name in MODEL_METHODS:
            module.__dict__.pop(name, None)
        for name in _MODEL_ATTRS:
            module.__dict__.pop(name, None)
    return model


def plain_state_dict(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """``state_dict`` of a converted model without its ``bio_mod`` entries: what the model
    before conversion (or after :func:`unconvert`) loads with ``strict=True``."""
    return {k: v for k, v in state_dict.items() if ".bio_mod." not in f".{k}"}


# ---- loading a plain state dict into a converted model ------------------------------------


def note_plain_load(prefix: str) -> None:
    """Called by ``BioModule`` when a state dict has none of its keys."""
    _plain_loads.append(prefix)


def _report_plain_load(module: nn.Module, incompatible_keys: Any) -> None:
    if not _plain_loads:
        return
    layers = sorted({p.rsplit("bio_mod.", 1)[0].rstrip(".") or "(root)" for p in _plain_loads})
    _plain_loads.clear()
    logger.info(
        "loaded a state dict without bio state (a plain or pretrained checkpoint) into %s: "
        "%d converted layer(s) keep their rates, signs and seeds (%s)",
        type(module).__name__,
        len(layers),
        ", ".join(layers[:8]) + (", ..." if len(layers) > 8 else ""),
    )


def install_plain_load_report(model: nn.Module) -> None:
    """One INFO line per ``model.load_state_dict`` call that loads plain weights."""
    if model.__dict__.get(_REPORT_FLAG) is None:
        handle = model.register_load_state_dict_post_hook(_report_plain_load)
        object.__setattr__(model, _REPORT_FLAG, handle.id)
