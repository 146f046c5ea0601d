"""The output layer (head) of a converted model: found by a dry run of the forward pass.

The output layer gets neither weight splitting (which would sum its logits in pairs) nor
Dale's principle. It is found by following the forward pass, not by module order:

1. At conversion the converter provisionally marks the last converted layer in module order
   (the right answer for most models) and installs a one-shot forward pre-hook.
2. At the first forward pass, before any computation, the hook runs the forward once more as a
   **dry run** on fake tensors (``torch._subclasses.FakeTensorMode``: shapes only, no
   arithmetic, parameters and buffers swapped for fakes so nothing real is written) and
   records, for every module holding parameters, the autograd node of its output.
3. From the model's output it walks back through the autograd graph while the path has a
   single non-parameter input (activations, reshapes, softmax, dropout and normalisation
   layers pass through; a residual sum does not). The first module it meets is the output
   layer. If it is a converted layer it is marked (``last_module_token = True``); if it is a
   module the conversion left alone (a head tied to an embedding), nothing needs marking;
   if the path ends in a sum of several branches (a bare transformer block), there is no
   output layer and a warning says so.

``BioConverter(head=...)`` names the head instead (module names or a predicate), and
``head=None`` says there is none; both skip the dry run.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Any, Dict, Iterator, List, NamedTuple, Optional

import torch
import torch.nn as nn

from .layers import _NORMALISATION, is_convertible

__all__ = ["HeadSearch", "dry_run_active", "find_output_layer"]

logger = logging.getLogger("bio_transformations")

#: Non-zero while a dry run is in progress: the bio forward hooks do nothing then (a plain
#: global, which torch.compile reads as a guarded constant).
_dry_runs = {"depth": 0}

#: Attribute set on layers whose ``last_module_token`` the converter set itself (so a later
#: conversion or the first-forward search may move it; a user's own mark is kept).
AUTO_FLAG = "_bio_auto_head"
#: Model attribute: the forward pre-hook's id while the search is pending.
PENDING = "_bio_head_pending"


def dry_run_active() -> bool:
    """Whether a head-search dry run is running (the bio forward hook stands aside)."""
    return _dry_runs["depth"] > 0


@contextlib.contextmanager
def _dry_run() -> Iterator[None]:
    _dry_runs["depth"] += 1
    try:
        yield
    finally:
        _dry_runs["depth"] -= 1


class HeadSearch(NamedTuple):
    """What a dry run found.

    Attributes:
        output_module: name of the module that produces the model's output (through
            single-input operations), or None when the output mixes several branches.
        ran: names of the modules holding parameters whose forward ran, in forward order.
    """

    output_module: Optional[str]
    ran: List[str]


def _first_tensor(value: Any) -> Optional[torch.Tensor]:
    """The first tensor of an output (a tensor, a tuple/list, a dict or a ModelOutput)."""
    if torch.is_tensor(value):
        return value
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _producers(model: nn.Module) -> Dict[str, nn.Module]:
    """The modules whose outputs the walk can stop at: those holding parameters themselves,
    except normalisation layers (per-channel scales the walk passes through) and the root."""
    out = {}
    for name, module in model.named_modules():
        if not name or isinstance(module, _NORMALISATION):
            continue
        if type(module).__name__.endswith("Norm") and not is_convertible(module):
            continue
        if any(p is not None for p in module._parameters.values()):
            out[name] = module
    return out


def _walk(output: torch.Tensor, by_node: Dict[Any, str], by_id: Dict[int, str]) -> Optional[str]:
    """Walk from ``output`` back while each node has one non-parameter input."""
    if id(output) in by_id:
        return by_id[id(output)]
    node = output.grad_fn
    seen = set()
    while node is not None and node not in seen:
        seen.add(node)
        if node in by_node:
            return by_node[node]
        inputs = [
            n
            for n, _ in node.next_functions
            if n is not None and type(n).__name__ != "AccumulateGrad"
        ]
        if len(inputs) != 1:
            return None
        node = inputs[0]
    return None


@contextlib.contextmanager
def _fakes(model: nn.Module, mode: Any) -> Iterator[None]:
    """Swap every parameter and buffer for a fake one (the same fake for a tied tensor), so
    a dry run writes nothing real; restore them after. Each module once, however many paths
    lead to it."""
    swapped = []
    try:
        for module in model.modules():
            for table in (module._parameters, module._buffers):
                for key, value in list(table.items()):
                    if value is not None:
                        swapped.append((table, key, value))
                        table[key] = mode.from_tensor(value)  # memoized: ties stay tied
        yield
    finally:
        for table, key, value in reversed(swapped):
            table[key] = value


def find_output_layer(model: nn.Module, args: tuple, kwargs: dict) -> HeadSearch:
    """Run ``model(*args, **kwargs)`` as a dry run on fake tensors and find the module that
    produces its output (see the module docstring). Nothing real is computed or written.

    Raises whatever the forward pass raises on fake tensors (a data-dependent branch, for
    example); the caller falls back to the provisional head.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    producers = _producers(model)
    by_node: Dict[Any, str] = {}
    by_id: Dict[int, str] = {}
    ran: List[str] = []
    keep: List[torch.Tensor] = []  # keeps recorded outputs (and their nodes) alive

    def record(name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            t = _first_tensor(output)
            ran.append(name)
            if t is not None:
                keep.append(t)
                by_id[id(t)] = name
                if t.grad_fn is not None:
                    by_node[t.grad_fn] = name

        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in producers.items()]
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        with _dry_run(), torch.enable_grad(), mode, _fakes(model, mode):
            fake_args, fake_kwargs = torch.utils._pytree.tree_map_only(
                torch.Tensor, mode.from_tensor, (args, kwargs)
            )
            output = model(*fake_args, **fake_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    out = _first_tensor(output)
    if out is None:
        return HeadSearch(None, ran)
    return HeadSearch(_walk(out, by_node, by_id), ran)


# ---- marks --------------------------------------------------------------------------------


def mark(layer: nn.Module) -> None:
    """Mark ``layer`` as the output layer, remembering that the converter set the mark."""
    layer.last_module_token = True
    object.__setattr__(layer, AUTO_FLAG, True)


def unmark(layer: nn.Module) -> None:
    """Take a mark the converter set away again (a user's own mark is left alone)."""
    if layer.__dict__.get(AUTO_FLAG):
        layer.__dict__.pop("last_module_token", None)
        object.__delattr__(layer, AUTO_FLAG)


def user_marked(model: nn.Module) -> List[str]:
    """Names of the layers a user marked with ``last_module_token`` (not the converter)."""
    return [
        name
        for name, module in model.named_modules()
        if getattr(module, "last_module_token", False) and not module.__dict__.get(AUTO_FLAG)
    ]


def warn_no_head(model: nn.Module, why: str) -> None:
    warnings.warn(
        f"BioConverter: no output layer of {type(model).__name__} could be determined ({why}); "
        "every converted layer gets weight splitting and Dale's principle. Pass "
        "head='<module name>' to name the output layer, or head=None if there is none.",
        UserWarning,
        stacklevel=4,
    )
