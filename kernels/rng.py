"""Random draws of the torch backend, keyed by one integer per layer and op.

``Settings.rng`` chooses the source: ``philox`` draws element ``i`` from Philox at counter ``i``
(:mod:`~bio_transformations.kernels.philox`, bit-identical to Triton's ``tl.rand``), ``torch``
(default) uses a ``torch.Generator`` seeded with the key (faster on CPU). The generators are
kept per thread and device, so threads never reseed each other's generator mid-draw.
"""

from __future__ import annotations

import threading

import torch

from . import philox, settings

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


def uniform(key: int, n: int, device: torch.device) -> Tensor:
    """``n`` float32 uniforms on [0, 1); Philox output ``r0`` (``tl.rand``) in philox mode."""
    if philox_mode():
        return philox.rand(key, _counters(n, device))
    return torch.rand(n, generator=generator(key, device), device=device)


def normal(key: int, n: int, device: torch.device) -> Tensor:
    """``n`` float32 standard normals; ``tl.randn`` (from ``r0, r1``) in philox mode."""
    if philox_mode():
        return philox.randn(key, _counters(n, device))
    return torch.randn(n, generator=generator(key, device), device=device)


def normal_into(key: int, out: Tensor) -> Tensor:
    """:func:`normal` of ``out.numel()`` values written into ``out`` (a contiguous float32
    tensor): the same numbers, without a fresh allocation per draw on the torch stream."""
    if philox_mode():
        return out.copy_(philox.randn(key, _counters(out.numel(), out.device)).view(out.shape))
    return torch.randn(out.shape, generator=generator(key, out.device), out=out)


def uniform4(key: int, n: int, device: torch.device) -> tuple:
    """Four independent rows of ``n`` uniforms; ``tl.rand4x`` (``r0..r3``) in philox mode."""
    if philox_mode():
        return philox.rand4x(key, _counters(n, device))
    return tuple(torch.rand(4, n, generator=generator(key, device), device=device).unbind(0))


def box_muller(u1: Tensor, u2: Tensor) -> Tensor:
    """The first normal of Triton's ``pair_uniform_to_normal(u1, u2)``."""
    return philox.pair_uniform_to_normal(u1, u2)[0]
