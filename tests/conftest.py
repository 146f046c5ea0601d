"""Shared test setup.

Triton decides at import whether its kernels run compiled or in its CPU interpreter, so the
choice is made here, before any test module can import it: on machines without CUDA the
Triton-backend tests run in the interpreter (``TRITON_INTERPRET=1``, on CPU tensors); with CUDA
(and the variable unset) they run compiled on the GPU. The torch backend ignores the variable.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import contextlib  # noqa: E402

import pytest  # noqa: E402

from bio_transformations.kernels import settings  # noqa: E402


@pytest.fixture
def bio_settings():
    """``bio_settings(rng="philox", ...)``: kernel settings for the rest of this test only."""
    with contextlib.ExitStack() as stack:
        yield lambda **changes: stack.enter_context(settings.override(**changes))


@pytest.fixture(autouse=True)
def _fresh_process_settings():
    """Each test starts from the environment's settings; ``set_backend`` calls don't leak."""
    settings.configure()
    yield
    settings.configure()
