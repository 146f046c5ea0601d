"""The hot per-element ops of the bio mechanisms, and the one dispatcher that picks their backend.

Modules:

* :mod:`.contract`: the op names and formulas, and ``StepParams`` (the fused step's scalars);
* :mod:`.settings`: ``BIO_BACKEND``, ``BIO_RNG``, ``BIO_CPU_FUSED`` as one settings object;
* :mod:`.stats`, :mod:`.rng`, :mod:`.philox`: per-layer statistics and random draws shared by
  the backends;
* :mod:`.torch_backend`: the pure-PyTorch reference and CPU fallback;
* :mod:`.cpu_fused`: the opt-in compiled CPU loop (``BIO_CPU_FUSED=1``);
* :mod:`.triton`: the Triton kernels (imported only when Triton is installed and works).

Every backend module defines every op of :data:`OPS` with the same arguments.
:func:`backend_for` decides, from the device AND the dtype of the tensors, which backend runs
them, and what it reports is what runs: ``auto`` (default) runs Triton on float32/float16/
bfloat16 CUDA tensors when Triton imports, the compiled CPU loop on float32/float64 CPU tensors
when ``BIO_CPU_FUSED`` is on, and torch otherwise; an explicit ``triton`` fails loudly where it
cannot run (float64 still runs on torch: Triton has no float64 kernels).
"""

from __future__ import annotations

import contextlib
import logging
import re
from types import ModuleType
from typing import Iterator, Optional

import torch

from . import cpu_fused, settings, torch_backend
from .contract import OPS, StepParams
from .settings import BACKENDS, Settings

__all__ = [
    "BACKENDS",
    "MIN_TRITON",
    "OPS",
    "BackendError",
    "Settings",
    "StepParams",
    "backend_for",
    "backend_module",
    "get_backend",
    "set_backend",
    "settings",
    "triton_available",
    "use_backend",
]

logger = logging.getLogger("bio_transformations")


class BackendError(RuntimeError):
    """The requested backend cannot run here (the message says how to fix it)."""


def get_backend() -> str:
    """The requested backend name: ``BIO_BACKEND`` (default ``auto``) unless set in code."""
    return settings.current().backend


def set_backend(name: str) -> None:
    """Request a backend for all later ops, process-wide: ``"auto"``, ``"triton"``, ``"torch"``."""
    settings.configure(backend=name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager: run the ops inside the block on backend ``name`` (this thread only)."""
    with settings.override(backend=name):
        yield


_triton_module: Optional[ModuleType] = None
_triton_import_error: Optional[BaseException] = None


#: The oldest triton the kernels run on: they pass tuples and jit functions as arguments.
MIN_TRITON = (3, 6)


def _version_tuple(text: str) -> tuple:
    """``"3.6.0+git1234"`` -> ``(3, 6, 0)``: the leading numeric parts of a version string."""
    parts = []
    for piece in text.split("+")[0].split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits.group()))
        if digits.end() < len(piece):  # "0rc1": a pre-release of this number
            break
    return tuple(parts)


def _check_triton_version() -> None:
    """Raise ImportError when the installed triton is older than :data:`MIN_TRITON`."""
    import triton

    version = getattr(triton, "__version__", "0")
    if _version_tuple(version) < MIN_TRITON:
        raise ImportError(
            f"triton {version} is older than {'.'.join(map(str, MIN_TRITON))}, the oldest the "
            "Triton kernels run on"
        )


def _load_triton() -> Optional[ModuleType]:
    """Import the Triton backend once; remember why it failed if it did."""
    global _triton_module, _triton_import_error
    if _triton_module is None and _triton_import_error is None:
        try:
            _check_triton_version()
        except ImportError as exc:
            _triton_import_error = exc
            if "older than" in str(exc):  # installed but too old: say it once
                logger.info("%s; the torch backend runs every op", exc)
            else:
                logger.debug("Triton backend unavailable: %r", exc)
            return None
        try:
            from . import triton as triton_backend

            _triton_module = triton_backend
        except Exception as exc:  # ImportError, or triton present but broken
            _triton_import_error = exc
            logger.debug("Triton backend unavailable: %r", exc)
    return _triton_module


def triton_available() -> bool:
    """Whether the Triton backend imports (Triton installed and working)."""
    return _load_triton() is not None


def _interpreting() -> bool:
    """Whether the Triton kernels run in Triton's CPU interpreter. Triton decides that when it
    decorates them (at import), so ask the imported backend."""
    module = _load_triton()
    return bool(module is not None and module.INTERPRETED)


_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CPU_FUSED_DTYPES = (torch.float32, torch.float64)


def _triton_can_run(device: torch.device) -> bool:
    """Triton runs CUDA tensors compiled, or CPU tensors in the interpreter (not both)."""
    return _interpreting() == (device.type == "cpu") and device.type in ("cuda", "cpu")


def backend_for(device: torch.device | str, dtype: Optional[torch.dtype] = None) -> str:
    """The backend that runs ops on tensors of ``device`` and ``dtype``: ``"torch"``,
    ``"triton"`` or ``"cpu_fused"`` (``dtype=None``: float32).

    Raises:
        BackendError: ``triton`` was requested explicitly but cannot run on this device.
    """
    device = torch.device(device)
    dtype = torch.float32 if dtype is None else dtype
    current = settings.current()
    if current.backend == "triton":
        _require_triton(device)
        return "triton" if dtype in _TRITON_DTYPES else "torch"
    if current.backend == "auto" and device.type == "cuda" and dtype in _TRITON_DTYPES:
        if triton_available() and _triton_can_run(device):
            return "triton"
    if (
        current.cpu_fused
        and device.type == "cpu"
        and dtype in _CPU_FUSED_DTYPES
        and cpu_fused.usable()
    ):
        return "cpu_fused"
    return "torch"


def _require_triton(device: torch.device) -> None:
    """Fail loudly, naming the fixes, where an explicit Triton request cannot run."""
    if not triton_available():
        raise BackendError(
            "BIO_BACKEND=triton was requested but Triton cannot be imported "
            f"({_triton_import_error!r}). Install triton (pip install 'triton>=3.6', or the "
            "package's [triton] extra), "
            "or use BIO_BACKEND=torch (or auto)."
        )
    if not _triton_can_run(device):
        if _interpreting():
            raise BackendError(
                f"BIO_BACKEND=triton runs in Triton's interpreter (TRITON_INTERPRET=1), which "
                f"handles CPU tensors only, not {device.type} tensors. Unset TRITON_INTERPRET "
                "before importing triton, or use BIO_BACKEND=torch."
            )
        raise BackendError(
            f"BIO_BACKEND=triton cannot run on {device.type} tensors. Move the model to a CUDA "
            "device, or set TRITON_INTERPRET=1 before importing triton to run the kernels in "
            "Triton's interpreter on the CPU (slow; for tests), or use BIO_BACKEND=torch."
        )


def backend_module(device: torch.device | str, dtype: Optional[torch.dtype] = None) -> ModuleType:
    """The backend module that runs ops on tensors of ``device`` and ``dtype``."""
    name = backend_for(device, dtype)
    if name == "triton":
        return _load_triton()
    return cpu_fused if name == "cpu_fused" else torch_backend
