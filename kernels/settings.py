"""Every run-time setting of the kernels in one object, read from the environment once.

===================  ===========================  ==========================================
environment          field                        values
===================  ===========================  ==========================================
``BIO_BACKEND``      :attr:`Settings.backend`     ``auto`` (default), ``triton``, ``torch``
``BIO_RNG``          :attr:`Settings.rng`         ``torch`` (default), ``philox``
``BIO_CPU_FUSED``    :attr:`Settings.cpu_fused`   a boolean: ``1/true/yes/on`` or
                                                  ``0/false/no/off`` (default off)
===================  ===========================  ==========================================

The environment is read the first time a setting is needed. In code, :func:`configure`
changes the process-wide values and :func:`override` changes the fields it names for a ``with``
block in the current thread (or asyncio task) only: it is built on :mod:`contextvars`, so an
override in one thread never leaks into another. Fields an override does not name keep
following the process-wide values (a ``configure`` inside the block still takes effect there).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
import threading
from typing import Iterator, Optional

__all__ = ["BACKENDS", "RNG_MODES", "Settings", "configure", "current", "override", "parse_bool"]

BACKENDS = ("auto", "triton", "torch")
RNG_MODES = ("torch", "philox")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def parse_bool(name: str, value: object) -> bool:
    """A boolean setting from a bool or one of ``0/1/false/true/no/yes/off/on``."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(
        f"{name} must be a boolean (one of {', '.join(_TRUE + _FALSE[:-1])}), got {value!r}"
    )


def _choice(name: str, value: object, valid: tuple) -> str:
    text = str(value).strip().lower()
    if text not in valid:
        raise ValueError(f"unknown {name} {value!r}; valid values are: {', '.join(valid)}")
    return text


@dataclasses.dataclass(frozen=True)
class Settings:
    """The kernels' settings (immutable: :func:`configure` and :func:`override` make new ones).

    Attributes:
        backend: which backend runs the ops (``BIO_BACKEND``).
        rng: the torch backend's random source (``BIO_RNG``): torch's own samplers, or Triton's
            Philox stream reproduced bit for bit.
        cpu_fused: run crystallize, volume scaling and the fused step on CPU as one loop
            compiled by ``torch.compile`` (``BIO_CPU_FUSED``).
        capturable: the Triton backend derives the volume-scaling keys on the device from
            per-layer device step counters that its kernels advance, so a CUDA graph replay
            draws fresh numbers (``BIO_CAPTURABLE``; ``kernels.triton.keys``).
    """

    backend: str = "auto"
    rng: str = "torch"
    cpu_fused: bool = False
    capturable: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "backend", _choice("bio backend", self.backend, BACKENDS))
        object.__setattr__(self, "rng", _choice("BIO_RNG", self.rng, RNG_MODES))
        object.__setattr__(self, "cpu_fused", parse_bool("BIO_CPU_FUSED", self.cpu_fused))
        object.__setattr__(self, "capturable", parse_bool("BIO_CAPTURABLE", self.capturable))

    @classmethod
    def from_environ(cls, environ: Optional[dict] = None) -> "Settings":
        """Settings from ``BIO_BACKEND``, ``BIO_RNG``, ``BIO_CPU_FUSED`` and ``BIO_CAPTURABLE``
        (defaults if unset)."""
        env = os.environ if environ is None else environ
        return cls(
            backend=env.get("BIO_BACKEND", "auto"),
            rng=env.get("BIO_RNG", "torch"),
            cpu_fused=env.get("BIO_CPU_FUSED", "0"),
            capturable=env.get("BIO_CAPTURABLE", "0"),
        )


_lock = threading.Lock()
_global: Optional[Settings] = None
# The fields overridden in this context (nested overrides merge), or None.
_local: contextvars.ContextVar[Optional[dict]] = contextvars.ContextVar(
    "bio_settings", default=None
)


def _process_wide() -> Settings:
    global _global
    if _global is None:
        with _lock:
            if _global is None:
                _global = Settings.from_environ()
    return _global


def current() -> Settings:
    """The settings in force here: the process-wide ones with this context's overrides."""
    local = _local.get()
    return _process_wide() if not local else dataclasses.replace(_process_wide(), **local)


def token() -> tuple:
    """An identity of the settings in force here, cheap to compare: equal (``is`` for both
    parts) as long as neither the process-wide settings nor this context's overrides changed.
    Lets a cache of host-side decisions (``bio_transformations.step_cache``) skip
    :func:`current` on every call."""
    return _process_wide(), _local.get()


def configure(**changes: object) -> Settings:
    """Change process-wide settings (fields of :class:`Settings`); returns the new settings.

    ``configure()`` with no argument re-reads the environment.
    """
    global _global
    with _lock:
        base = Settings.from_environ() if not changes else (_global or Settings.from_environ())
        _global = dataclasses.replace(base, **changes)
        return _global


@contextlib.contextmanager
def override(**changes: object) -> Iterator[Settings]:
    """Context manager: these settings inside the block, in this thread/task only."""
    Settings(**{**dataclasses.asdict(current()), **changes})  # validate before entering
    token = _local.set({**(_local.get() or {}), **changes})
    try:
        yield current()
    finally:
        _local.reset(token)
