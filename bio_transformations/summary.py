"""What a conversion did: the one-line log of ``BioConverter`` and ``bio_model.bio_summary()``."""

from __future__ import annotations

from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .layers import ConversionPlan, is_transposed_linear

__all__ = ["BioSummary", "conversion_line", "skipped_text", "summarize"]

#: The columns of :class:`BioSummary`, in order.
COLUMNS = ("layer", "type", "shape", "rates", "distribution", "splitting", "dale", "note")


def conversion_line(plan: ConversionPlan) -> str:
    """One line saying what was converted and what was skipped, e.g. ``converted 10 layers
    (Conv1D 8, Linear 2); skipped: Embedding x2 (embedding), lm_head (tied to wte)``."""
    converted = [layer for _, layer in plan.convert] + [layer for _, layer, _ in plan.shared]
    kinds = Counter(type(layer).__name__ for layer in converted)
    line = f"converted {len(converted)} layers"
    if kinds:
        line += " (" + ", ".join(f"{k} {n}" for k, n in kinds.items()) + ")"
    if plan.shared:
        line += "; sharing a weight: " + ", ".join(f"{n} (with {o})" for n, _, o in plan.shared)
    if plan.tied:
        tied = ", ".join(f"{n} (to {h})" for n, h in plan.tied.items())
        line += f"; included though tied: {tied}"
    if plan.skipped:
        line += "; skipped: " + skipped_text(plan.skipped)
    return line


def skipped_text(skipped: Sequence[Tuple[str, str, str]]) -> str:
    """``(name, type, reason)`` entries as text: unsupported modules counted per type, tied
    layers by name (``Embedding x2 (embedding), lm_head (tied to wte)``)."""
    grouped = Counter((kind, reason) for _, kind, reason in skipped if "tied" not in reason)
    parts = [f"{kind} x{n} ({reason})" for (kind, reason), n in grouped.items()]
    parts += [f"{name} ({reason})" for name, _, reason in skipped if "tied" in reason]
    return ", ".join(parts)


class BioSummary:
    """A table of the converted layers: one row per ``BioModule``.

    Attributes:
        rows: one dict per converted layer with the keys ``layer``, ``type``, ``shape`` (the
            weight's, as stored), ``rates_mean``, ``rates_min``, ``rates_max`` (the fuzzy
            learning rates now), ``distribution``, ``splitting`` (the Gamma applied to the
            layer's output; 1 for none), ``dale`` (whether Dale's principle constrains it) and
            ``note`` (output layer, transposed weight, shared or tied weights).
        skipped: ``(name, type, reason)`` of the modules with parameters the conversion left
            alone (empty when unknown, e.g. for a single ``BioModule``).

    ``str()`` formats it as an aligned text table.
    """

    def __init__(self, rows: List[Dict[str, Any]], skipped: Sequence[Tuple[str, str, str]] = ()):
        self.rows = rows
        self.skipped = list(skipped)

    def __len__(self) -> int:
        return len(self.rows)

    def _cells(self, row: Dict[str, Any]) -> List[str]:
        rates = f"{row['rates_mean']:.3f} [{row['rates_min']:.3f}, {row['rates_max']:.3f}]"
        return [
            row["layer"],
            row["type"],
            "x".join(str(s) for s in row["shape"]),
            rates,
            row["distribution"],
            str(row["splitting"]) if row["splitting"] > 1 else "-",
            "yes" if row["dale"] else "no",
            row["note"],
        ]

    def __str__(self) -> str:
        header = list(COLUMNS)
        header[3] = "rates mean [min, max]"
        table = [header] + [self._cells(r) for r in self.rows]
        widths = [max(len(line[i]) for line in table) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in table]
        lines.insert(1, "  ".join("-" * w for w in widths))
        if self.skipped:
            lines.append("not converted: " + skipped_text(self.skipped))
        if not self.rows:
            lines.append("(no converted layers)")
        return "\n".join(lines)

    __repr__ = __str__


def summarize(
    entries: Sequence[Tuple[str, nn.Module, nn.Module]],
    plan: Optional[ConversionPlan] = None,
) -> BioSummary:
    """The :class:`BioSummary` of ``(name, layer, bio_mod)`` entries; ``plan`` adds the shared
    and tied weights and the skipped modules of the conversion that made them."""
    # One host read for every layer's rate statistics (a summary, never in a training step).
    stats = [_rate_stats(_whole(bio.fuzzy_learning_rate_parameters)) for _, _, bio in entries]
    stats = torch.stack(stats).tolist() if stats else []
    shared: Dict[str, List[str]] = {}
    tied: Dict[str, str] = {}
    if plan is not None:
        for name, _, owner in plan.shared:
            shared.setdefault(owner, []).append(name)
        tied = dict(plan.tied)
    rows = []
    for (name, layer, bio), (mean, lo, hi) in zip(entries, stats):
        cfg = bio.config
        last = bool(getattr(layer, "last_module_token", False))
        notes = []
        if last:
            notes.append("output layer")
        if is_transposed_linear(layer):
            notes.append("weight (in, out)")
        if name in shared:
            notes.append("shared with " + ", ".join(shared[name]))
        if name in tied:
            notes.append(f"tied to {tied[name]}")
        rows.append(
            {
                "layer": name,
                "type": _type_name(layer),
                "shape": tuple(layer.weight.shape),
                "rates_mean": mean,
                "rates_min": lo,
                "rates_max": hi,
                "distribution": cfg.fuzzy_lr_distribution.value,
                "splitting": 1 if last else cfg.weight_splitting_Gamma,
                "dale": bool(cfg.apply_dales_principle and not last),
                "note": "; ".join(notes),
            }
        )
    return BioSummary(rows, plan.skipped if plan is not None else ())


def _type_name(layer: nn.Module) -> str:
    """The layer's class name; for a layer wrapped by FSDP2's ``fully_shard`` (class
    ``FSDP<Name>``, a subclass of ``FSDPModule`` and the original class), the original's."""
    cls = type(layer)
    if any(base.__name__ == "FSDPModule" for base in cls.__mro__) and len(cls.__bases__) > 1:
        cls = cls.__bases__[-1]
    return cls.__name__


def _whole(p: torch.Tensor) -> torch.Tensor:
    """The whole rates of a layer: a sharded layer's (FSDP2) are gathered, a collective, so
    every rank of the shard group must ask for the summary."""
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def _rate_stats(p: torch.Tensor) -> torch.Tensor:
    """``[mean, min, max]`` of rates ``p`` as a CPU float tensor (NaN for an empty layer)."""
    if not p.numel():
        return torch.full((3,), float("nan"))
    pf = p.float()
    return torch.stack([pf.mean(), pf.amin(), pf.amax()]).cpu()
