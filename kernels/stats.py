"""Per-layer statistics both backends read, computed by the same torch code on the device.

The Triton kernels load these numbers through a pointer, so both backends see identical
statistics and nothing is ever read on the host. Math runs in float32 for float16/bfloat16
tensors (float64 stays float64).
"""

from __future__ import annotations

from typing import Sequence

import torch

Tensor = torch.Tensor
Tensors = Sequence[Tensor]

LOW_PRECISION = (torch.float16, torch.bfloat16)

__all__ = [
    "LOW_PRECISION",
    "abs_means",
    "activity_stats",
    "clean_weights_",
    "compute_dtype",
    "legacy_stats",
    "rejuvenation_stats",
    "rows_view",
    "upcast",
]


def compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype the math runs in: float32 for half types, the tensor's own dtype otherwise."""
    return torch.float32 if t.dtype in LOW_PRECISION else t.dtype


def upcast(t: Tensor) -> Tensor:
    """``t`` in its compute dtype (a copy only for half types)."""
    return t.float() if t.dtype in LOW_PRECISION else t


def rows_view(per_unit: Tensor, like: Tensor) -> Tensor:
    """Shape a per-output-unit vector so it broadcasts over a weight's other dims."""
    return per_unit.reshape((-1,) + (1,) * (like.dim() - 1))


def abs_means(tensors: Tensors) -> list:
    """``mean(|t|)`` of each tensor as a 0-d tensor on its device, in the compute dtype.

    One pass, no temporary: the L1 norm divided by the element count.
    """
    return [
        torch.linalg.vector_norm(t, 1, dtype=compute_dtype(t)) / max(t.numel(), 1) for t in tensors
    ]


def clean_weights_(weights: Tensors) -> None:
    """Rejuvenation's view of a weight: NaN counts as 0, values clamped to [-1, 1] (in place)."""
    for w in weights:
        w.nan_to_num_(nan=0.0).clamp_(-1.0, 1.0)


def rejuvenation_stats(w: Tensor) -> tuple:
    """``(std(w), log-normal mu, log-normal sigma)`` of a cleaned weight, all 0-d, on device.

    The log-normal is fitted to the mean ``m`` and std ``s`` of ``|w|``: ``sigma^2 =
    log(1 + s^2/m^2)``, ``mu = log(m) - sigma^2/2``; the returned sigma is halved (upstream's
    "log_std / 2"). Zero or undefined statistics are clamped so nothing becomes NaN.
    """
    wf = upcast(w).reshape(-1)
    n = wf.numel()
    tiny = 1e-12
    # Three fast one-pass sums (sum w, sum w^2, sum |w|) instead of two-pass variances; the
    # cancellation in E[x^2] - E[x]^2 is done in float64 on the 0-d results.
    s1 = torch.sum(wf).double()
    s2 = torch.dot(wf, wf).double()
    a1 = torch.linalg.vector_norm(wf, 1).double()
    dof = max(n - 1, 1)  # unbiased, as torch.std; one weight: std 0, not NaN
    std = ((s2 - s1 * s1 / n) / dof).clamp_min(0.0).sqrt()
    m = a1 / n
    s = ((s2 - a1 * a1 / n) / dof).clamp_min(0.0).sqrt()
    std = torch.nan_to_num(std, nan=0.0).clamp_min(tiny)
    m = torch.nan_to_num(m, nan=0.0).clamp_min(tiny)
    s = torch.nan_to_num(s, nan=0.0)
    sigma2 = torch.log1p((s / m) ** 2)
    mu = torch.log(m) - 0.5 * sigma2
    out = wf.dtype
    return std.to(out), mu.to(out), (0.5 * torch.sqrt(sigma2)).to(out)


def legacy_stats(w: Tensor, dre: float) -> tuple:
    """``(max|w|, max|w|/dre)`` of a weight (the legacy rule's range and threshold scale)."""
    max_aw = upcast(w).abs().amax()
    return max_aw, max_aw / dre


def activity_stats(counts: Tensor, dtype: torch.dtype = torch.float32) -> tuple:
    """``(mean(c), mean(c) clamped to >= 1e-30)`` of a layer's per-unit activity counts, in
    ``dtype`` (float32, the kernels' compute dtype, unless the rates are float64)."""
    mean_c = counts.to(dtype).mean()
    return mean_c, mean_c.clamp_min(1e-30)
