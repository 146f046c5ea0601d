"""The hot per-element ops of the bio mechanisms, and the choice of backend that runs them.

Every op works in place on lists of tensors (one entry per layer, all on one device and of one
dtype) so a model-level call is one op call per (device, dtype) group. Both backends,
``torch_backend`` (pure PyTorch: the CPU fallback and the reference) and ``triton_backend``
(fused Triton kernels), define the same ops with the same names and arguments:

========================  ======  ==========================================================
op                        writes  formula (w weight, g grad, p rates)
========================  ======  ==========================================================
``fuzzy_scale_``          g       ``g *= p``
``crystallize_``          p       ``p[|g|/|w| < t or |g| > mean|w|] *= d``
``volume_scale_``         g       ``g *= |N(m, var*m)|``, ``m = lr*exp(-s*|w|/(|w|+1))``
``bio_step_``             g, p    volume, fuzzy, crystallize in that order, one pass
``rejuvenate_``           w       replace weak weights (see ``torch_backend.rejuvenate_``)
``rejuvenate_legacy_``    w       the original published rule
``rates_init_``           p       uniform / normal / lognormal / gamma / beta
``temporal_update_``      p       ``p = 1 + (p-1)*decay + noise*(2U-1)``
``weight_adaptive_``      p       ``1 + (2U-1)*nu*clamp(2 - |w|/(mean|w| + 1e-8), .5, 1.5)``
``activity_update_``      p       row-wise redraw scaled by unit activity
``dale_enforce_``         w       ``w = relu(w*sign)*sign``
========================  ======  ==========================================================

Randomness: a stochastic op takes one integer ``key`` per tensor (made on the host by
:func:`~bio_transformations.kernels.philox.stream_key` from the layer seed, its step counter
and the op id) and draws element ``i``'s numbers from Philox at counter ``i`` (the Triton
backend, and the torch backend with ``BIO_RNG=philox``), or from a ``torch.Generator`` seeded
with ``key`` (the torch backend's default, faster on CPU). Which Philox outputs each op uses is
written in the op's docstring in ``torch_backend``, so the two backends draw the same numbers.

Backend selection: ``BIO_BACKEND=auto|triton|torch`` (read once; :func:`set_backend` and
:func:`use_backend` change it in code). ``auto`` runs Triton on CUDA tensors when Triton
imports and torch otherwise; an explicit ``triton`` fails loudly where it cannot run.
"""

from __future__ import annotations

import contextlib
import os
from types import ModuleType
from typing import Iterator, Optional

import torch

from . import torch_backend

__all__ = [
    "BACKENDS",
    "BackendError",
    "backend_for",
    "backend_module",
    "get_backend",
    "set_backend",
    "triton_available",
    "use_backend",
    "OPS",
]

BACKENDS = ("auto", "triton", "torch")
OPS = (
    "fuzzy_scale_",
    "crystallize_",
    "volume_scale_",
    "bio_step_",
    "rejuvenate_",
    "rejuvenate_legacy_",
    "rates_init_",
    "temporal_update_",
    "weight_adaptive_",
    "activity_update_",
    "dale_enforce_",
)


class BackendError(RuntimeError):
    """The requested backend cannot run here (the message says how to fix it)."""


def _parse(name: str) -> str:
    value = str(name).strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"unknown bio backend {name!r}; valid values are: {', '.join(BACKENDS)}")
    return value


_requested: Optional[str] = None  # None: not yet read from the environment
_triton_module: Optional[ModuleType] = None
_triton_import_error: Optional[BaseException] = None


def get_backend() -> str:
    """The requested backend name: ``BIO_BACKEND`` (default ``auto``) unless set in code."""
    global _requested
    if _requested is None:
        _requested = _parse(os.environ.get("BIO_BACKEND", "auto"))
    return _requested


def set_backend(name: str) -> None:
    """Request a backend for all later ops: ``"auto"``, ``"triton"`` or ``"torch"``."""
    global _requested
    _requested = _parse(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: run the ops inside the block on backend ``name``."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _load_triton() -> Optional[ModuleType]:
    """Import the Triton backend once; remember why it failed if it did."""
    global _triton_module, _triton_import_error
    if _triton_module is None and _triton_import_error is None:
        try:
            from . import triton_backend

            _triton_module = triton_backend
        except Exception as exc:  # ImportError, or triton present but broken
            _triton_import_error = exc
    return _triton_module


def triton_available() -> bool:
    """Whether the Triton backend imports (Triton installed and working)."""
    return _load_triton() is not None


def _interpreting() -> bool:
    """Whether the Triton kernels run in Triton's CPU interpreter. Triton decides that when it
    decorates them (at import), so ask the imported backend; the environment only before."""
    module = _load_triton()
    if module is not None:
        return bool(getattr(module, "INTERPRETED", False))
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def backend_for(device: torch.device | str) -> str:
    """The backend that actually runs ops on tensors of ``device``: ``"torch"`` or ``"triton"``.

    Raises:
        BackendError: ``triton`` was requested explicitly but cannot run on this device.
    """
    device = torch.device(device)
    requested = get_backend()
    if requested == "torch":
        return "torch"
    if requested == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    # Explicit request: fail loudly, naming the fixes.
    if not triton_available():
        raise BackendError(
            "BIO_BACKEND=triton was requested but Triton cannot be imported "
            f"({_triton_import_error!r}). Install triton (pip install 'triton>=3.6'), "
            "or use BIO_BACKEND=torch (or auto)."
        )
    if device.type != "cuda" and not _interpreting():
        raise BackendError(
            f"BIO_BACKEND=triton cannot run on {device.type} tensors. Move the model to a CUDA "
            "device, or set TRITON_INTERPRET=1 before importing triton to run the kernels in "
            "Triton's interpreter on the CPU (slow; for tests), or use BIO_BACKEND=torch."
        )
    return "triton"


def backend_module(device: torch.device | str) -> ModuleType:
    """The backend module (``torch_backend`` or ``triton_backend``) for ``device``."""
    if backend_for(device) == "triton":
        module = _load_triton()
        assert module is not None  # backend_for checked it
        return module
    return torch_backend
