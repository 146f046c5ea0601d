"""Random draws of the torch backend, keyed by one integer per layer and op.

``Settings.rng`` chooses the source: ``philox`` draws element ``i`` from Philox at counter ``i``
(:mod:`~bio_transformations.kernels.philox`, bit-identical to Triton's ``tl.rand``), ``torch``
(default) uses a ``torch.Generator`` seeded with the key (faster on CPU). The generators are
kept per thread and device, so threads never reseed each other's generator mid-draw.

Each draw takes an optional :class:`~bio_transformations.kernels.shards.Slab` (a local shard of
a sharded layer): the draw then returns the local elements of the draw over the whole layer
(Philox: counters at the global indices; torch: the whole layer drawn, the local part taken).
Without one (``None``, the default) nothing changes.

Every draw is float32 whatever ``torch.get_default_dtype()`` is: a float64 default would draw
other numbers from the same generator.
"""

from __future__ import annotations

import threading
from typing import Optional

import torch

from . import philox, settings
from .shards import Slab

Tensor = torch.Tensor

__all__ = [
    "box_muller",
    "generator",
    "normal",
    "normal_into",
    "philox_mode",
    "uniform",
    "uniform4",
]

_per_thread = threading.local()


def philox_mode() -> bool:
    """Whether draws follow Triton's Philox stream (``BIO_RNG=philox``)."""
    return settings.current().rng == "philox"


def generator(key: int, device: torch.device) -> torch.Generator:
    """This thread's generator for ``device``, seeded with ``key``."""
    gens = getattr(_per_thread, "generators", None)
    if gens is None:
        gens = _per_thread.generators = {}
    gen = gens.get(device)
    if gen is None:
        gen = gens[device] = torch.Generator(device=device)
    gen.manual_seed(int(key))
    return gen


def _counters(n: int, device: torch.device) -> Tensor:
    return torch.arange(n, device=device, dtype=torch.int64)


def _where(n: int, device: torch.device, slab: Optional[Slab]) -> Tensor:
    """Philox counters of the ``n`` drawn elements: ``0..n-1``, or the slab's global indices."""
    if slab is None:
        return _counters(n, device)
    return slab.counters(device)


def uniform(key: int, n: int, device: torch.device, slab: Optional[Slab] = None) -> Tensor:
    """``n`` float32 uniforms on [0, 1); Philox output ``r0`` (``tl.rand``) in philox mode."""
    if philox_mode():
        return philox.rand(key, _where(n, device, slab))
    if slab is not None:
        return slab.take(uniform(key, slab.global_numel, device))
    return torch.rand(n, generator=generator(key, device), device=device, dtype=torch.float32)


def normal(key: int, n: int, device: torch.device, slab: Optional[Slab] = None) -> Tensor:
    """``n`` float32 standard normals; ``tl.randn`` (from ``r0, r1``) in philox mode."""
    if philox_mode():
        return philox.randn(key, _where(n, device, slab))
    if slab is not None:
        return slab.take(normal(key, slab.global_numel, device))
    return torch.randn(n, generator=generator(key, device), device=device, dtype=torch.float32)


def normal_into(key: int, out: Tensor, slab: Optional[Slab] = None) -> Tensor:
    """:func:`normal` of ``out.numel()`` values written into ``out`` (a contiguous float32
    tensor): the same numbers, without a fresh allocation per draw on the torch stream."""
    if philox_mode():
        counters = _where(out.numel(), out.device, slab)
        return out.copy_(philox.randn(key, counters).view(out.shape))
    if slab is not None:  # the whole layer drawn, the local elements kept
        return out.copy_(normal(key, out.numel(), out.device, slab).view(out.shape))
    return torch.randn(out.shape, generator=generator(key, out.device), out=out)


def uniform4(key: int, n: int, device: torch.device, slab: Optional[Slab] = None) -> tuple:
    """Four independent rows of ``n`` uniforms; ``tl.rand4x`` (``r0..r3``) in philox mode."""
    if philox_mode():
        return philox.rand4x(key, _where(n, device, slab))
    if slab is not None:
        return tuple(slab.take(u) for u in uniform4(key, slab.global_numel, device))
    gen = generator(key, device)
    return tuple(torch.rand(4, n, generator=gen, device=device, dtype=torch.float32).unbind(0))


def box_muller(u1: Tensor, u2: Tensor) -> Tensor:
    """The first normal of Triton's ``pair_uniform_to_normal(u1, u2)``."""
    return philox.pair_uniform_to_normal(u1, u2)[0]
