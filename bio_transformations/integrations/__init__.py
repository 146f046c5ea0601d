"""Callbacks for training frameworks that own the training loop.

* :mod:`bio_transformations.integrations.lightning`: ``BioCallback`` for Lightning
  (``pip install "bio-transformations[lightning]"``);
* :mod:`bio_transformations.integrations.transformers`: ``BioCallback`` for the Hugging Face
  ``Trainer`` (``pip install "bio-transformations[transformers]"``).

Both are :func:`bio_transformations.attach` on the optimizers the trainer built, attached when
training starts and removed when it ends. Neither framework is imported until its module is.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch.nn as nn

from ..attachment import BioAttachment, attach_all

__all__ = ["CallbackCore", "missing_extra"]


def missing_extra(package: str, extra: str, exc: ImportError) -> ImportError:
    """The ImportError an integration module raises when its framework is not installed."""
    return ImportError(
        f"bio_transformations.integrations.{extra} needs the {package!r} package: install it "
        f'with `pip install "bio-transformations[{extra}]"` (or `pip install {package}`); '
        f"importing it failed with: {exc}"
    )


class CallbackCore:
    """What both callbacks share: the :func:`~bio_transformations.attach` options, attaching to
    a trainer's optimizers and detaching again."""

    def __init__(
        self,
        *,
        model: Optional[nn.Module] = None,
        volume: bool = False,
        fuzzy: bool = True,
        crystallize: bool = True,
        update_rates: bool = True,
        rejuvenate_every: int = 0,
        enforce_dales: Optional[bool] = None,
        scale: str = "auto",
    ):
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
        self.model = model
        self.options: Dict[str, Any] = dict(
            volume=volume, fuzzy=fuzzy, crystallize=crystallize, update_rates=update_rates,
            rejuvenate_every=rejuvenate_every, enforce_dales=enforce_dales, scale=scale,
        )  # fmt: skip
        self.handles: List[BioAttachment] = []

    def attach_to(self, trainer_model: nn.Module, optimizers: List[Any]) -> None:
        """Attach to every optimizer that updates a converted layer of ``model`` (the
        constructor's, else the trainer's)."""
        self.detach()
        target = self.model if self.model is not None else trainer_model
        self.handles = attach_all(target, optimizers, **self.options)

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
