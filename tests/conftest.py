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
