"""Hugging Face ``Trainer``: ``BioCallback`` runs the bio mechanisms around every optimizer step.

.. code-block:: python

   from bio_transformations.integrations.transformers import BioCallback

   trainer = transformers.Trainer(model, args, train_dataset=data,
                                  callbacks=[BioCallback(rejuvenate_every=100)])

At ``on_train_begin`` the callback calls :func:`bio_transformations.attach` on the Trainer's
optimizer (Accelerate's wrapper is looked through) for the converted layers inside the Trainer's
model (``model=`` narrows the search); at ``on_train_end`` it detaches. The Trainer clips
(``max_grad_norm``) before ``optimizer.step()``, and a ``GradScaler`` (``fp16=True`` on a GPU)
unscales first and skips steps with infinite gradients, so the mechanisms see the final
gradients and run only for steps that update the weights, once per
``gradient_accumulation_steps``.
"""

from __future__ import annotations

from typing import Any

from . import CallbackCore, missing_extra

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
    raise missing_extra("transformers", "transformers", exc) from exc

__all__ = ["BioCallback"]


class BioCallback(CallbackCore, TrainerCallback):
    """:func:`bio_transformations.attach` for a Hugging Face ``Trainer``, with the same options
    (keyword only): ``volume``, ``fuzzy``, ``crystallize``, ``update_rates``,
    ``rejuvenate_every``, ``enforce_dales``, ``scale``, and ``model`` (the module to search for
    converted layers; default the Trainer's model). The Trainer's default optimizer is AdamW,
    so ``scale="auto"`` scales its updates (:func:`~bio_transformations.attachment.scale_mode`).

    The rejuvenation cadence counts optimizer steps in each layer's saved state (a tensor, so
    the Trainer's safetensors checkpoints keep it): ``resume_from_checkpoint`` keeps it.
    """

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        model, optimizer = kwargs.get("model"), kwargs.get("optimizer")
        if model is None or optimizer is None:
            raise RuntimeError(
                "BioCallback: the Trainer passed no model or optimizer to on_train_begin"
            )
        self.attach_to(model, [optimizer])

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.detach()
