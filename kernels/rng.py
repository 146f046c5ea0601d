"""Random draws of the torch backend, keyed by one integer per layer and op.

``Settings.rng`` chooses the source: ``philox`` draws element ``i`` as the Triton kernels do,
from output word ``i % 4`` of the Philox call at counter ``i // 4`` (the element mapping of
:mod:`~bio_transformations.kernels.philox`: four elements per call, both Box-Muller outputs
used; bit-identical uniforms), ``torch`` (default) uses a ``torch.Generator`` seeded with the
key (faster on CPU). The generators are
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
    "legacy_draws",
    "normal",
    "normal_into",
    "philox_mode",
    "rejuvenation_draws",
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


def _where(n: int, device: torch.device, slab: Optional[Slab]):
    """Global element indices of the ``n`` drawn elements: ``range(n)``, the slab's range when
    its elements are one contiguous run of the layer, else a tensor of its global indices."""
    if slab is None:
        return range(n)
    start = slab.flat_start
    if start is not None:
        return range(start, start + n)
    return slab.counters(device)


def uniform(key: int, n: int, device: torch.device, slab: Optional[Slab] = None) -> Tensor:
    """``n`` float32 uniforms on [0, 1); :func:`philox.element_uniforms` in philox mode."""
    if philox_mode():
        return philox.element_uniforms(key, _where(n, device, slab), device)
    if slab is not None:
        return slab.take(uniform(key, slab.global_numel, device))
    return torch.rand(n, generator=generator(key, device), device=device, dtype=torch.float32)


def normal(key: int, n: int, device: torch.device, slab: Optional[Slab] = None) -> Tensor:
    """``n`` float32 standard normals; :func:`philox.element_normals` in philox mode."""
    if philox_mode():
        return philox.element_normals(key, _where(n, device, slab), device)
    if slab is not None:
        return slab.take(normal(key, slab.global_numel, device))
    return torch.randn(n, generator=generator(key, device), device=device, dtype=torch.float32)


def normal_into(key: int, out: Tensor, slab: Optional[Slab] = None) -> Tensor:
    """:func:`normal` of ``out.numel()`` values written into ``out`` (a contiguous float32
    tensor): the same numbers, without a fresh allocation per draw on the torch stream."""
    if philox_mode():
        index = _where(out.numel(), out.device, slab)
        return out.copy_(philox.element_normals(key, index, out.device).view(out.shape))
    if slab is not None:  # the whole layer drawn, the local elements kept
        return out.copy_(normal(key, out.numel(), out.device, slab).view(out.shape))
    return torch.randn(out.shape, generator=generator(key, out.device), out=out)


def uniform4(key: int, n: int, device: torch.device, slab: Optional[Slab] = None) -> tuple:
    """Four independent rows of ``n`` uniforms (``torch`` mode's rejuvenation draws); in philox
    mode ``tl.rand4x`` at counters ``0..n-1`` (the kernels draw with :func:`rejuvenation_draws`
    and :func:`legacy_draws` instead)."""
    if philox_mode():
        index = _where(n, device, slab)
        if isinstance(index, range):
            index = torch.arange(index.start, index.stop, dtype=torch.int64, device=device)
        return philox.rand4x(key, index)
    if slab is not None:
        return tuple(slab.take(u) for u in uniform4(key, slab.global_numel, device))
    gen = generator(key, device)
    return tuple(torch.rand(4, n, generator=gen, device=device, dtype=torch.float32).unbind(0))


def rejuvenation_draws(
    key: int, n: int, device: torch.device, slab: Optional[Slab] = None
) -> tuple:
    """Per element ``(u, positive, z)``: the uniform deciding a replacement, whether the new
    weight is positive (bool) and the normal of its log-magnitude.

    philox mode: ``u`` and ``positive`` come from the element's word ``w`` of the call at
    counter ``(i // 4, 0)`` (``u = U(w)``; ``positive``: bit 31 of ``w`` clear, independent of
    ``U(w)``, which folds that bit away), ``z`` from the call at ``(i // 4, 1)``
    (:func:`philox.element_normals`, stream 1): two Philox calls per four elements. torch
    mode: four uniform rows ``u, u_sign, u1, u2`` with ``positive = u_sign < 0.5`` and ``z``
    the first Box-Muller normal of ``(u1, u2)``."""
    if philox_mode():
        index = _where(n, device, slab)
        words = philox.element_words(key, index, device)
        u = philox.uint32_to_uniform(words)
        return u, words < (1 << 31), philox.element_normals(key, index, device, stream=1)
    u, u_sign, u1, u2 = uniform4(key, n, device, slab)
    return u, u_sign < 0.5, box_muller(u1, u2)


def legacy_draws(key: int, n: int, device: torch.device, slab: Optional[Slab] = None) -> tuple:
    """Per element ``(z, u)``: the normal of the replacement threshold and the uniform of the
    new value. philox mode: :func:`philox.element_normals` (stream 0) and
    :func:`philox.element_uniforms` (stream 1); torch mode: the first Box-Muller normal of two
    uniform rows, and a third row."""
    if philox_mode():
        index = _where(n, device, slab)
        z = philox.element_normals(key, index, device)
        return z, philox.element_uniforms(key, index, device, stream=1)
    u0, u1, u2, _ = uniform4(key, n, device, slab)
    return box_muller(u0, u1), u2


def box_muller(u1: Tensor, u2: Tensor) -> Tensor:
    """The first normal of Triton's ``pair_uniform_to_normal(u1, u2)``."""
    return philox.pair_uniform_to_normal(u1, u2)[0]
