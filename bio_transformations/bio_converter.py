"""``BioConverter``: attaches a ``BioModule`` to every ``Linear``/``Conv`` layer of a model
(and to transposed linear layers such as ``transformers``' ``Conv1D``; see
``bio_transformations.layers``)."""

from __future__ import annotations

import functools
import logging
import warnings
from typing import Any, Dict, Type, TypeVar, Union

import torch
import torch.distributed as dist
import torch.nn as nn

from .bio_config import DEFAULT_BIO_CONFIG, BioConfig, BioConfigError, validate_config
from .bio_module import BioModule, bio_forward_hook, check_splitting
from .compat import ConverterCompat
from .kernels import philox
from .layers import is_convertible, out_units, plan_conversion
from .model_methods import MODEL_METHODS, ModelMethod
from .summary import conversion_line

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
        **kwargs: fields of :class:`BioConfig` overriding ``config``.

    Each conversion logs one INFO line on the ``bio_transformations`` logger saying what was
    converted and what was skipped, and warns when nothing was converted.

    Raises:
        BioConfigError: a config value is invalid (already here, not at the first layer).
        BioConfigError: also for an unknown config field (a ``ValueError``, as upstream's
            ``config._replace`` raised).
    """

    def __init__(
        self, config: BioConfig = DEFAULT_BIO_CONFIG, *, include_tied: bool = False, **kwargs: Any
    ):
        self.config = self._make_config(config, kwargs)
        self.include_tied = bool(include_tied)

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
        self.set_last_module_token_for_model(model)
        plan = plan_conversion(model, include_tied=self.include_tied)
        layers = plan.convert
        total = len(layers)
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
        logger.info("%s", conversion_line(plan))
        if not layers:
            warnings.warn(
                f"BioConverter: no layer of {type(model).__name__} was converted "
                "(converted are nn.Linear, nn.Conv1d/2d/3d and transposed linear layers such as "
                f"transformers' Conv1D); {conversion_line(plan)}",
                UserWarning,
                stacklevel=3,
            )
        if attach_methods:
            for name in MODEL_METHODS:
                object.__setattr__(model, name, ModelMethod(model, name))
        return model

    @staticmethod
    def set_last_module_token_for_model(model: nn.Module) -> nn.Module:
        """Mark the last convertible layer among ``model.children()`` (when there is more than
        one) with ``last_module_token = True``: it gets no weight splitting and no Dale."""
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


def _attach(layer: nn.Module, bio: BioModule) -> None:
    """Set ``layer.bio_mod`` (replacing an earlier one on re-conversion) and install the forward
    hook once."""
    layer.bio_mod = bio
    if not getattr(layer, _HOOK_FLAG, False):
        layer.register_forward_hook(bio_forward_hook)
        object.__setattr__(layer, _HOOK_FLAG, True)
