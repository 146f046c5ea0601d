"""Lightning: ``BioCallback`` runs the bio mechanisms around every optimizer step.

.. code-block:: python

   from bio_transformations.integrations.lightning import BioCallback

   trainer = lightning.Trainer(callbacks=[BioCallback(rejuvenate_every=100)])

The callback finds the converted layers inside the ``LightningModule`` (``model=`` narrows the
search) and calls :func:`bio_transformations.attach` on each optimizer of the trainer when
training starts. Lightning's automatic optimization runs forward, backward, the unscaling of a
``GradScaler``, ``on_before_optimizer_step`` and gradient clipping inside the closure it passes
to ``optimizer.step``; ``attach()`` wraps that closure, so the mechanisms run after all of it and
before the parameter update. With ``precision="16-mixed"`` the scaler calls ``optimizer.step()``
only for finite gradients, so a skipped step runs nothing. ``accumulate_grad_batches`` calls the
optimizer once per accumulated step, and so runs the mechanisms once.
(``on_before_optimizer_step`` itself would be too early: Lightning clips after it.)
"""

from __future__ import annotations

from typing import Any

from . import CallbackCore, missing_extra

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
    raise missing_extra("lightning", "lightning", exc) from exc

__all__ = ["BioCallback"]


class BioCallback(CallbackCore, pl.Callback):
    """:func:`bio_transformations.attach` for a Lightning ``Trainer``, with the same options
    (keyword only): ``volume``, ``fuzzy``, ``crystallize``, ``update_rates``,
    ``rejuvenate_every``, ``enforce_dales``, ``scale``, and ``model`` (the module to search for
    converted layers; default the ``LightningModule``).

    The rejuvenation cadence counts optimizer steps in each layer's saved state, so resuming
    from a Trainer checkpoint keeps it.
    """

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.attach_to(pl_module, list(trainer.optimizers))

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.detach()

    def on_exception(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException
    ) -> None:
        self.detach()

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: Any) -> None:
        self.detach()
