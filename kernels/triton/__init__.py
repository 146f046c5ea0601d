"""Triton kernels: the fused GPU backend, with the ops, arguments and results of
``torch_backend``, one module per op family:

* :mod:`.launch`: device helpers, the launch table and the one launch per layer group;
* :mod:`.draws`: the random draws (the counter -> element map) and ``for_block``, the per-block
  choice of body (full/masked, aligned row, grouped/scattered draws);
* :mod:`.step`: ``fuzzy_scale_``, ``crystallize_``, ``volume_scale_``, ``bio_step_``;
* :mod:`.rejuvenate`: ``rejuvenate_``, ``rejuvenate_legacy_``;
* :mod:`.rates`: ``rates_init_``, ``temporal_update_``, ``weight_adaptive_``, ``activity_update_``;
* :mod:`.dale`: ``dale_enforce_``.

The dispatcher (:func:`bio_transformations.kernels.backend_for`) sends only float32, float16
and bfloat16 tensors here (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``);
everything else runs on the torch backend. Random numbers: element ``i`` of a tensor (its flat
row-major index, for every layout) reads word ``i % 4`` of the Philox call at counter
``i // 4`` (:mod:`.draws`), the draws each ``torch_backend`` docstring names, so
``torch_backend`` with ``BIO_RNG=philox`` draws the same numbers. CUDA graphs: every op can
be captured after one warm-up call with the same tensors (which caches the tables; a table
built during capture raises ``launch.CaptureError``); a replay reuses the keys of the
captured call, i.e. replays the same random draws, unless the ``capturable`` setting derives
volume scaling's keys on the device (:mod:`.keys`). Host side: :mod:`.reduce` (per-layer
statistics of a launch in two launches), :mod:`.prepared` (the fused step planned once for
the model-level ``bio_step``).
"""

from ..contract import OPS

# The ops, re-exported under the contract's names (__all__ is built from OPS).
from .dale import dale_enforce_  # noqa: F401
from .launch import BLOCK_SIZE, INTERPRETED, KERNEL_DTYPES
from .rates import activity_update_, rates_init_, temporal_update_, weight_adaptive_  # noqa: F401
from .rejuvenate import rejuvenate_, rejuvenate_legacy_  # noqa: F401
from .step import bio_step_, crystallize_, fuzzy_scale_, volume_scale_  # noqa: F401

__all__ = ["BLOCK_SIZE", "INTERPRETED", "KERNEL_DTYPES", *OPS]  # every op of the contract
