"""bio_transformations: biologically inspired learning mechanisms for PyTorch networks.

The same API as the published ``pytorch_bio_transformations`` package (``BioConverter``,
``BioModule``, ``BioConfig``), with the per-element work in fused Triton kernels on GPUs and
pure-PyTorch kernels elsewhere (``BIO_BACKEND=auto|triton|torch``).
"""

try:
    from . import kernels
except ImportError as exc:  # a source checkout: kernels/ is mapped into the package on install
    raise ImportError(
        "bio_transformations.kernels is not importable: the kernels/ folder of the repository is "
        "installed as bio_transformations.kernels. Install the package first, e.g. "
        "`pip install -e .` in the repository (or `make install`)."
    ) from exc
from .attachment import BioAttachment, attach
from .bio_config import DEFAULT_BIO_CONFIG, BioConfig, BioConfigError, Distribution
from .bio_converter import BioConverter, sync_layer_seeds
from .bio_module import BioModule
from .kernels import BackendError, backend_for, get_backend, set_backend, use_backend
from .sharding import shard_rates
from .unconvert import plain_state_dict, unconvert

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_BIO_CONFIG",
    "BackendError",
    "BioAttachment",
    "BioConfig",
    "BioConfigError",
    "BioConverter",
    "BioModule",
    "Distribution",
    "__version__",
    "attach",
    "backend_for",
    "get_backend",
    "kernels",
    "plain_state_dict",
    "set_backend",
    "shard_rates",
    "sync_layer_seeds",
    "unconvert",
    "use_backend",
]
