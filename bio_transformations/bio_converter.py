"""``BioConverter``: attaches a ``BioModule`` to every ``Linear``/``Conv`` layer of a model
(and to transposed linear layers such as ``transformers``' ``Conv1D``; see
``bio_transformations.layers``)."""

from __future__ import annotations

import functools
import logging
import warnings
from typing import Any, Dict, List, Optional, Tuple, Type, TypeVar, Union

import torch
import torch.distributed as dist
import torch.nn as nn

from . import head as heads
from . import sharding
from .bio_config import (
    DEFAULT_BIO_CONFIG,
    BioConfig,
    BioConfigError,
    Distribution,
    validate_config,
)
from .bio_module import BioModule, bio_forward_hook, check_splitting
from .compat import ConverterCompat
from .kernels import philox
from .layers import Selector, is_convertible, out_units, plan_conversion, select_modules
from .model_methods import MODEL_METHODS, ModelMethod
from .summary import conversion_line
from .unconvert import install_plain_load_report

__all__ = ["BioConverter", "agreed_seed", "sync_layer_seeds"]

M = TypeVar("M", bound=nn.Module)
_HOOK_FLAG = "_bio_hook_installed"
logger = logging.getLogger("bio_transformations")


def agreed_seed(seed: int, src: int = 0) -> int:
    """``seed`` from rank ``src`` when ``torch.distributed`` is initialised, else ``seed``.

    Data-parallel replicas that convert alike then draw alike, even if each rank seeded torch
    differently. Costs one tiny broadcast at conversion time, never during training.
    """
    if dist.is_available() and dist.is_initialized():
        use_cuda = dist.get_backend() == "nccl" and torch.cuda.is_available()
        device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else "cpu"
        t = torch.tensor([seed], dtype=torch.int64, device=device)
        dist.broadcast(t, src=src)
        return int(t.item())
    return seed


def sync_layer_seeds(model: nn.Module, src: int = 0) -> None:
    """Give every converted layer of ``model`` the layer seeds of rank ``src``.

    Needed only when a model was converted before ``torch.distributed`` was initialised (the
    converter agrees on seeds itself otherwise). Rates drawn at conversion are not redrawn:
    ``DistributedDataParallel`` broadcasts them from rank 0 like any buffer.
    """
    bios = [layer._modules["bio_mod"] for _, layer in getattr(model, "_bio_layers", [])]
    base = agreed_seed(bios[0].layer_seed if bios else 0, src)
    for index, bio in enumerate(bios):
        bio.layer_seed = philox.stream_key(base, index, 0)


class BioConverter(ConverterCompat):
    """Converts models so their layers learn with the bio mechanisms.

    Args:
        config: base configuration (default :data:`DEFAULT_BIO_CONFIG`).
        include_tied: also convert layers whose weight is tied to a module that is not
            converted, such as a language model's output head tied to its token embedding
            (default False: such layers are skipped, with an INFO log). Keyword only.
        exclude: modules to leave plain, with everything inside them: a module name (as in
            ``named_modules()``), a list of names, or a predicate ``(name, module) -> bool``.
            Keyword only.
        head: the output layer(s), which get neither weight splitting nor Dale's principle:
            ``"auto"`` (default) finds it from the forward pass at the first call
            (:mod:`bio_transformations.head`), names or a predicate as for ``exclude`` name
            it (every converted layer inside a named module is an output layer), ``None``
            says there is none. Keyword only.
        **kwargs: fields of :class:`BioConfig` overriding ``config``.

    Each conversion logs one INFO line on the ``bio_transformations`` logger saying what was
    converted and what was skipped, and warns when nothing was converted, when the model has
    attention modules whose weights stay plain, when Dale's principle rewrites the weights,
    and when the mechanisms chosen would do nothing (``ACTIVITY`` or ``TEMPORAL`` rates
    without ``fuzzy_lr_dynamic=True``).

    Raises:
        BioConfigError: a config value is invalid (already here, not at the first layer).
        BioConfigError: also for an unknown config field (a ``ValueError``, as upstream's
            ``config._replace`` raised).
    """

    def __init__(
        self,
        config: BioConfig = DEFAULT_BIO_CONFIG,
        *,
        include_tied: bool = False,
        exclude: Optional[Selector] = None,
        head: Union[str, Selector, None] = "auto",
        **kwargs: Any,
    ):
        self.config = self._make_config(config, kwargs)
        self.include_tied = bool(include_tied)
        self.exclude = _check_selector(exclude, "exclude")
        self.head = head if head == "auto" else _check_selector(head, "head")

    @staticmethod
    def _make_config(config: BioConfig, overrides: Dict[str, Any]) -> BioConfig:
        if not isinstance(config, BioConfig):
            raise TypeError(f"config must be a BioConfig, got {type(config).__name__}")
        unknown = sorted(set(overrides) - set(BioConfig._fields))
        if unknown:
            raise BioConfigError(
                f"unknown BioConfig field(s): {', '.join(unknown)}; "
                f"valid fields are: {', '.join(BioConfig._fields)}"
            )
        return validate_config(config._replace(**overrides))

    @classmethod
    def from_dict(cls, config_dict: Dict[str, Any]) -> "BioConverter":
        """A converter from a dict of :class:`BioConfig` fields."""
        return cls(DEFAULT_BIO_CONFIG, **dict(config_dict))

    def get_config(self) -> BioConfig:
        """The converter's current configuration."""
        return self.config

    def update_config(self, **kwargs: Any) -> None:
        """Change config fields for later conversions."""
        self.config = self._make_config(self.config, kwargs)

    def convert(self, module_class_or_instance: Union[M, Type[M]]) -> Union[M, Type[M]]:
        """Convert an ``nn.Module`` instance in place (returned), or wrap an ``nn.Module``
        subclass so every instance is converted when built (the class is returned)."""
        x = module_class_or_instance
        if isinstance(x, nn.Module):
            return self._convert_instance(x)
        if isinstance(x, type) and issubclass(x, nn.Module):
            return self._convert_class(x)
        raise TypeError(f"Unsupported type for module_class_or_instance: {type(x)}")

    __call__ = convert

    def _convert_class(self, module_class: Type[M]) -> Type[M]:
        if not isinstance(module_class, type):
            raise TypeError(f"module_class must be a class; instead got: {type(module_class)}")
        original_init = module_class.__init__
        converter = self

        @functools.wraps(original_init)
        def __init__(model: nn.Module, *args: Any, **kwargs: Any) -> None:
            original_init(model, *args, **kwargs)
            converter._convert_instance(model, attach_methods=False)

        module_class.__init__ = __init__  # type: ignore[method-assign]
        for name, func in MODEL_METHODS.items():
            setattr(module_class, name, func)
        return module_class

    def _convert_instance(self, model: M, attach_methods: bool = True) -> M:
        plan = plan_conversion(model, include_tied=self.include_tied, exclude=self.exclude)
        layers = plan.convert
        total = len(layers)
        search = self._mark_head(model, layers + [(n, m) for n, m, _ in plan.shared])
        # Validate splitting on every layer before changing any.
        for name, layer in layers:
            if not getattr(layer, "last_module_token", False):
                try:
                    check_splitting(layer, self.config.weight_splitting_Gamma)
                except ValueError as exc:
                    raise ValueError(
                        f"{exc} Layer {name or type(layer).__name__!r} has "
                        f"{out_units(layer)} outputs."
                    ) from None
        # One draw from torch's default generator (agreed across data-parallel ranks) keys
        # every layer's stream, so the rates drawn below already agree between replicas.
        base_seed = agreed_seed(philox.new_layer_seed())
        for index, (_, layer) in enumerate(layers):
            cfg = self.config._replace(fuzzy_lr_layer_index=index, fuzzy_lr_total_layers=total)
            seed = philox.stream_key(base_seed, index, 0)
            bio = BioModule(functools.partial(_identity, layer), cfg, layer_seed=seed)
            _attach(layer, bio)
        # A layer holding the very weight of a converted one shares its BioModule: its forward
        # pass gets splitting and activity tracking, the weight gets each mechanism once.
        for _, layer, owner_name in plan.shared:
            _attach(layer, dict(layers)[owner_name]._modules["bio_mod"])
        # A tied layer converted by an earlier conversion loses its BioModule (the hook stays
        # and does nothing without one).
        modules = dict(model.named_modules())
        for name, _, _ in plan.skipped:
            if is_convertible(modules[name]):
                modules[name]._modules.pop("bio_mod", None)
        object.__setattr__(model, "_bio_layers", layers)
        object.__setattr__(model, "_bio_plan", plan)
        _install_head_search(model, search)
        install_plain_load_report(model)
        logger.info("%s", conversion_line(plan))
        self._warn_no_ops(model, plan)
        if attach_methods:
            for name in MODEL_METHODS:
                object.__setattr__(model, name, ModelMethod(model, name))
        return model

    def _mark_head(self, model: nn.Module, converted: List[Tuple[str, nn.Module]]) -> bool:
        """Mark the output layer(s) as ``head`` says; True when the first forward pass must
        still find it (``head="auto"``: the last converted layer is marked until then)."""
        for _, module in model.named_modules():
            heads.unmark(module)  # marks of an earlier conversion
        if self.head is None:
            return False
        if self.head != "auto":
            names = select_modules(model, self.head, "head")
            chosen = [layer for name, layer in converted if name in names]
            if not chosen:
                raise ValueError(
                    f"head={self.head!r} names no converted layer of {type(model).__name__}"
                )
            for layer in chosen:
                heads.mark(layer)
            return False
        if heads.user_marked(model):  # marked by hand (set_last_module_token_for_module)
            return False
        if not converted:
            return False
        order = {name: i for i, (name, _) in enumerate(model.named_modules())}
        heads.mark(max(converted, key=lambda entry: order[entry[0]])[1])  # until the search
        return True

    def _warn_no_ops(self, model: nn.Module, plan: Any) -> None:
        """One warning for each configuration or model on which a mechanism does nothing."""
        cfg = self.config
        name = type(model).__name__
        if not plan.convert:
            warnings.warn(
                f"BioConverter: no layer of {name} was converted (converted are nn.Linear, "
                "nn.Conv1d/2d/3d and transposed linear layers such as transformers' Conv1D); "
                f"{conversion_line(plan)}",
                UserWarning,
                stacklevel=4,
            )
        if plan.attention:
            warnings.warn(
                f"BioConverter: the weights of {', '.join(plan.attention)} "
                "(nn.MultiheadAttention: in_proj_weight and out_proj) are not converted: its "
                "forward uses them directly, so a converted out_proj's hook would never run. "
                "The rest of the model is converted.",
                UserWarning,
                stacklevel=4,
            )
        if not cfg.fuzzy_lr_dynamic and cfg.fuzzy_lr_distribution in (
            Distribution.ACTIVITY,
            Distribution.TEMPORAL,
        ):
            effect = (
                "rates stay at 1"
                if cfg.fuzzy_lr_distribution is Distribution.ACTIVITY
                else "the rates are drawn once and never change (like UNIFORM)"
            )
            warnings.warn(
                f"BioConverter: fuzzy_lr_distribution={cfg.fuzzy_lr_distribution.name} does "
                f"nothing dynamic without fuzzy_lr_dynamic=True: {effect}",
                UserWarning,
                stacklevel=4,
            )
        dale = [
            n
            for n, layer in plan.convert
            if cfg.apply_dales_principle and not getattr(layer, "last_module_token", False)
        ]
        if dale:
            warnings.warn(
                "BioConverter: apply_dales_principle=True rewrites the weights of every "
                "converted layer but the output layer to |w| * sign (one sign per output unit): "
                "pretrained weights are changed. Load pretrained weights after converting, or "
                "convert without Dale.",
                UserWarning,
                stacklevel=4,
            )

    @staticmethod
    def set_last_module_token_for_model(model: nn.Module) -> nn.Module:
        """Mark the last convertible layer among ``model.children()`` (when there is more than
        one) with ``last_module_token = True``: it gets no weight splitting and no Dale.

        The published package's rule, kept for code that calls it; the converter itself finds
        the output layer from the forward pass (``BioConverter(head=...)``)."""
        candidates = [m for m in model.children() if is_convertible(m)]
        if len(candidates) > 1:
            BioConverter.set_last_module_token_for_module(candidates[-1])
        return model

    @staticmethod
    def set_last_module_token_for_module(module: nn.Module) -> nn.Module:
        """Mark one layer as the last one; returns it."""
        module.last_module_token = True
        return module


def _identity(layer: nn.Module) -> nn.Module:
    return layer


def _check_selector(selector: Any, option: str) -> Any:
    """``selector`` if it is None, a name, a list of names or a callable; else TypeError."""
    if selector is None or callable(selector) or isinstance(selector, str):
        return selector
    if isinstance(selector, (list, tuple)) and all(isinstance(n, str) for n in selector):
        return tuple(selector)
    also = ", 'auto'" if option == "head" else ""
    raise TypeError(
        f"{option} must be a module name, a list of names or a callable (name, module) -> bool"
        f"{also} or None, got {selector!r}"
    )


# ---- the output layer, found at the first forward pass ------------------------------------


def _install_head_search(model: nn.Module, pending: bool) -> None:
    """Install (or drop) the one-shot forward pre-hook that finds the output layer."""
    old = model.__dict__.get(heads.PENDING)
    if old is not None:
        model._forward_pre_hooks.pop(old, None)
        model._forward_pre_hooks_with_kwargs.pop(old, None)
        object.__setattr__(model, heads.PENDING, None)
    if pending:
        handle = model.register_forward_pre_hook(_find_head_pre_hook, with_kwargs=True)
        object.__setattr__(model, heads.PENDING, handle.id)


def _find_head_pre_hook(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """At the first eager forward pass: find the output layer by a dry run, then remove itself.

    Inside ``torch.compile`` it does nothing (a dry run cannot be traced): a model compiled
    before any eager call keeps the module-order guess until an eager call."""
    if torch.compiler.is_compiling():
        return None
    if sharding.fsdp_wrapped(model):
        # FSDP2's hooks would all-gather into fake tensors and leave its state corrupt.
        _install_head_search(model, False)
        logger.info(
            "output layer of %s: no dry run on an FSDP2-sharded model; the last converted layer "
            "in module order stays marked (pass head=... to BioConverter to name it, or run "
            "one forward pass before fully_shard)",
            type(model).__name__,
        )
        return None
    _search_head(model, args, kwargs)
    return None


def _search_head(model: nn.Module, args: tuple, kwargs: dict) -> None:
    _install_head_search(model, False)
    converted = [(n, m) for n, m in model.__dict__.get("_bio_layers", [])]
    plan = model.__dict__.get("_bio_plan")
    if plan is not None:
        converted += [(n, m) for n, m, _ in plan.shared]
    provisional = [n for n, m in converted if m.__dict__.get(heads.AUTO_FLAG)]
    try:
        search = heads.find_output_layer(model, args, kwargs)
    except Exception as exc:  # a forward that fake tensors cannot run: keep the guess
        heads.warn_no_head(
            model,
            f"the dry run of the forward pass on fake tensors failed with {exc!r}; "
            f"{', '.join(provisional) or 'no layer'} stays marked as the output layer",
        )
        return
    layers = dict(converted)
    found = search.output_module
    new = [found] if found in layers else []
    for name in provisional:
        if name not in new:
            _release_head(name, layers[name])
    for name in new:
        if not getattr(layers[name], "last_module_token", False):
            _adopt_head(name, layers[name])
    if found is None:
        heads.warn_no_head(model, "its output is not one layer's output but a sum of branches")
    logger.info(
        "output layer of %s: %s",
        type(model).__name__,
        "none" if found is None else found + ("" if new else " (not converted)"),
    )
    ran = set(search.ran)
    idle = [n for n, m in converted if n not in ran and _uses_hook(m)]
    if idle:
        warnings.warn(
            f"BioConverter: converted layers {', '.join(idle)} did not run in the forward pass; "
            "weight splitting and activity tracking act only when a layer's own forward runs",
            UserWarning,
            stacklevel=2,
        )


def _uses_hook(layer: nn.Module) -> bool:
    bio = layer._modules.get("bio_mod")
    if not isinstance(bio, BioModule):
        return False
    cfg = bio.config
    activity = cfg.fuzzy_lr_dynamic and cfg.fuzzy_lr_distribution is Distribution.ACTIVITY
    return activity or (cfg.weight_splitting_Gamma > 1 and not bio.is_last_module)


def _release_head(name: str, layer: nn.Module) -> None:
    """The provisional output layer is not the output layer: split and constrain it."""
    heads.unmark(layer)
    bio = layer._modules.get("bio_mod")
    if not isinstance(bio, BioModule):
        return
    try:
        check_splitting(layer, bio.config.weight_splitting_Gamma)
    except ValueError as exc:
        raise ValueError(
            f"{exc} Layer {name!r} has {out_units(layer)} outputs (it is not the model's "
            "output layer, so it is split; pass head=... to BioConverter to name the output "
            "layer if this is wrong)."
        ) from None
    if bio.config.apply_dales_principle and getattr(bio, "sign", None) is not None:
        bio.apply_dale_signs()


def _adopt_head(name: str, layer: nn.Module) -> None:
    heads.mark(layer)
    bio = layer._modules.get("bio_mod")
    if isinstance(bio, BioModule) and bio.config.apply_dales_principle:
        warnings.warn(
            f"BioConverter: the output layer {name} was found at the first forward pass, after "
            "Dale's principle had rewritten its weights at conversion; pass "
            f"head={name!r} to BioConverter to keep them",
            UserWarning,
            stacklevel=3,
        )


def _attach(layer: nn.Module, bio: BioModule) -> None:
    """Set ``layer.bio_mod`` (replacing an earlier one on re-conversion) and install the forward
    hook once."""
    layer.bio_mod = bio
    if not getattr(layer, _HOOK_FLAG, False):
        layer.register_forward_hook(bio_forward_hook)
        object.__setattr__(layer, _HOOK_FLAG, True)
