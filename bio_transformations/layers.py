"""Which layers the converter converts, and where their output units lie.

Everything that depends on a layer's weight layout is decided here, in one place:

* ``nn.Linear`` and ``nn.Conv1d/2d/3d`` store their weight as ``(out, in, ...)``: output units
  are weight dim 0.
* **Transposed linear layers** store it as ``(in, out)``: output units are weight dim 1. The
  best-known one is ``transformers.pytorch_utils.Conv1D`` (GPT-2, GPT, and models built on
  their pattern): ``y = x @ weight + bias`` with ``weight`` of shape ``(nx, nf)``. They are
  recognised without importing ``transformers``, by duck typing: an integer attribute ``nf``
  (the output features) and a 2-D ``weight`` whose dim 1 has ``nf`` entries.

The per-output-unit mechanisms (Dale's signs, weight splitting, activity counts) read the
weight through :func:`unit_major`, a view with output units along dim 0 (``w.t()`` for a
transposed layer), so the backends' row-wise kernels run unchanged; both backends index
transposed views in place. The element-wise mechanisms (fuzzy rates, crystallization, volume
scaling, rejuvenation, rate initialisation) do not depend on the layout and see the tensors as
stored.
"""

from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Set, Tuple, Union

import torch
import torch.nn as nn

__all__ = [
    "CONVERTIBLE_LAYERS",
    "ConversionPlan",
    "Selector",
    "in_attention",
    "select_modules",
    "is_convertible",
    "is_transposed_linear",
    "out_dim",
    "out_units",
    "output_channel_dim",
    "per_unit_shape",
    "plan_conversion",
    "unit_major",
]

#: Layer types with the weight stored ``(out, in, ...)`` that the converter converts.
CONVERTIBLE_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

#: Module types never converted, with the reason the conversion summary gives.
_NORMALISATION = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
)
_EMBEDDING = (nn.Embedding, nn.EmbeddingBag)


def is_transposed_linear(layer: nn.Module) -> bool:
    """Whether ``layer`` is a linear layer with its weight stored ``(in, out)``, like
    ``transformers.pytorch_utils.Conv1D``: an int ``nf`` and a 2-D ``weight`` of ``nf`` columns."""
    if isinstance(layer, CONVERTIBLE_LAYERS):
        return False
    nf = getattr(layer, "nf", None)
    weight = layer._parameters.get("weight")
    return (
        isinstance(nf, int)
        and not isinstance(nf, bool)
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and weight.shape[1] == nf
    )


def is_convertible(layer: nn.Module) -> bool:
    """Whether the converter attaches a ``BioModule`` to ``layer``."""
    return isinstance(layer, CONVERTIBLE_LAYERS) or is_transposed_linear(layer)


def out_dim(layer: nn.Module) -> int:
    """The weight dim that indexes output units: 1 for transposed linear layers, else 0."""
    return 1 if is_transposed_linear(layer) else 0


def out_units(layer: nn.Module) -> int:
    """The number of output units (out_features / out_channels / ``nf``)."""
    return layer.weight.shape[out_dim(layer)]


def per_unit_shape(layer: nn.Module) -> Tuple[int, ...]:
    """The shape of a per-output-unit tensor (Dale's signs) that broadcasts against the weight:
    ``(out, 1)`` for Linear, ``(out, 1, 1[, 1[, 1]])`` for Conv1d/2d/3d, ``(1, out)`` for a
    transposed linear layer."""
    shape = [1] * layer.weight.dim()
    shape[out_dim(layer)] = out_units(layer)
    return tuple(shape)


def unit_major(t: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    """A view of ``t`` (the weight, its gradient or rates) with output units along dim 0."""
    return t.t() if out_dim(layer) == 1 else t


def output_channel_dim(layer: nn.Module, output: torch.Tensor) -> int:
    """The dim of ``layer``'s output that indexes its output units: last for linear layers
    (plain or transposed), 1 for convolutions (``(N, C, ...)``)."""
    if isinstance(layer, nn.Linear) or is_transposed_linear(layer):
        return max(output.dim() - 1, 0)
    return 1


#: Modules whose forward reads their sub-layers' weights directly, without calling those
#: layers: a converted sub-layer's forward hook (weight splitting, activity tracking) would
#: never run, so its layers are skipped, with a warning.
ATTENTION = (nn.MultiheadAttention,)

#: Which modules a converter option names: a module name, several names, or a predicate
#: ``(name, module) -> bool``.
Selector = Union[str, Sequence[str], Callable[[str, nn.Module], bool]]


def select_modules(model: nn.Module, selector: Optional[Selector], option: str) -> Set[str]:
    """The names of the modules of ``model`` that ``selector`` picks, with their descendants.

    Raises:
        ValueError: a name that is not a module of ``model`` (the message lists some that are).
        TypeError: ``selector`` is neither names nor a callable.
    """
    if selector is None:
        return set()
    modules = dict(model.named_modules())
    if callable(selector):
        roots = [name for name, module in modules.items() if selector(name, module)]
    elif isinstance(selector, str) or (
        isinstance(selector, Sequence) and all(isinstance(n, str) for n in selector)
    ):
        roots = [selector] if isinstance(selector, str) else list(selector)
        unknown = [n for n in roots if n not in modules]
        if unknown:
            known = ", ".join(repr(n) for n in list(modules)[1:12])
            raise ValueError(
                f"{option}: no module named {', '.join(map(repr, unknown))} in "
                f"{type(model).__name__}; module names are as in named_modules(), e.g. {known}"
            )
    else:
        raise TypeError(
            f"{option} must be a module name, a list of names or a callable (name, module) -> "
            f"bool, got {type(selector).__name__}"
        )
    return {name for name in modules for root in roots if _within(name, root)}


def _within(name: str, root: str) -> bool:
    return root == "" or name == root or name.startswith(root + ".")


def in_attention(model: nn.Module) -> Dict[str, str]:
    """``{name: attention module name}`` for every module inside an attention module
    (:data:`ATTENTION`), such as ``nn.MultiheadAttention``'s ``out_proj``."""
    inside: Dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, ATTENTION):
            for sub, _ in module.named_modules(prefix=name):
                if sub != name:
                    inside.setdefault(sub, name)
    return inside


def _skip_reason(module: nn.Module) -> str:
    if isinstance(module, ATTENTION):
        return "attention"
    if isinstance(module, _EMBEDDING):
        return "embedding"
    if isinstance(module, _NORMALISATION) or type(module).__name__.endswith("Norm"):
        return "normalisation"
    return "unsupported"


class ConversionPlan(NamedTuple):
    """What a conversion does to a model (built by :func:`plan_conversion`).

    Attributes:
        convert: ``(name, layer)`` of each layer that gets its own ``BioModule``, module order.
        shared: ``(name, layer, owner name)`` of convertible layers whose weight is the very
            parameter of an earlier converted layer (``owner``): they share its ``BioModule``,
            so the mechanisms run once per step on that weight.
        tied: ``{name: holder name}`` for converted layers whose weight is also held by a
            module that is not converted (converted only with ``include_tied=True``).
        skipped: ``(name, type name, reason)`` of the modules holding parameters that are not
            converted; reason is ``embedding``, ``normalisation``, ``attention``,
            ``in attention``, ``excluded``, ``unsupported`` or ``tied to <holder>``.
        attention: names of the attention modules (``nn.MultiheadAttention``) whose weights
            stay plain: their forward uses ``in_proj_weight`` and ``out_proj.weight`` directly.
    """

    convert: List[Tuple[str, nn.Module]]
    shared: List[Tuple[str, nn.Module, str]]
    tied: Dict[str, str]
    skipped: List[Tuple[str, str, str]]
    attention: List[str] = []


def _weight_key(layer: nn.Module) -> int:
    return id(layer.weight)


def plan_conversion(
    model: nn.Module, include_tied: bool = False, exclude: Optional[Selector] = None
) -> ConversionPlan:
    """Decide which layers of ``model`` are converted.

    ``exclude`` (module names or a predicate ``(name, module) -> bool``) leaves the named
    modules and everything inside them plain; they are listed as skipped (``excluded``).
    Layers inside ``nn.MultiheadAttention`` are never converted (``in attention``): its
    forward reads ``out_proj.weight`` without calling ``out_proj``, so the layer's hook
    could not run.

    Tied weights: a parameter held by several convertible layers is converted once (the first
    holder in module order; the others share its ``BioModule``). A layer whose weight is also
    held by a module that is not converted (an ``nn.Embedding``, as with a language model's
    output head tied to its token embedding, or any other module) is skipped unless
    ``include_tied`` is True: the mechanisms would otherwise rewrite the embedding too.
    """
    excluded = select_modules(model, exclude, "exclude")
    attention_parts = in_attention(model)
    modules = list(model.named_modules())
    holders: Dict[int, List[str]] = {}  # id(parameter) -> names of non-convertible holders
    for name, module in modules:
        if is_convertible(module) and name not in excluded and name not in attention_parts:
            continue
        for param in module._parameters.values():
            if param is not None:
                holders.setdefault(id(param), []).append(name or type(module).__name__)
    convert: List[Tuple[str, nn.Module]] = []
    shared: List[Tuple[str, nn.Module, str]] = []
    tied: Dict[str, str] = {}
    skipped: List[Tuple[str, str, str]] = []
    owners: Dict[int, Tuple[str, nn.Module]] = {}
    attention = [name for name, module in modules if isinstance(module, ATTENTION)]
    for name, module in modules:
        has_params = any(p is not None for p in module._parameters.values())
        if name in excluded:
            if has_params:
                skipped.append((name, type(module).__name__, "excluded"))
            continue
        if name in attention_parts:
            if has_params:
                skipped.append((name, type(module).__name__, "in attention"))
            continue
        if not is_convertible(module):
            if any(p is not None for p in module._parameters.values()):
                skipped.append((name, type(module).__name__, _skip_reason(module)))
            continue
        key = _weight_key(module)
        owner = owners.get(key)
        if owner is not None:
            if type(owner[1]) is type(module):
                shared.append((name, module, owner[0]))
            else:  # the same tensor read in another layout: one BioModule cannot serve both
                skipped.append((name, type(module).__name__, f"tied to {owner[0]}"))
            continue
        holder: Optional[str] = next(iter(holders.get(key, [])), None)
        if holder is not None and not include_tied:
            skipped.append((name, type(module).__name__, f"tied to {holder}"))
            continue
        if holder is not None:
            tied[name] = holder
        owners[key] = (name, module)
        convert.append((name, module))
    return ConversionPlan(convert, shared, tied, skipped, attention)
