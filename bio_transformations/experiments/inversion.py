"""Gradient-inversion attacks on the update a client shares, and what they recover.

Threat model (docs/experiment.rst states it in full): an honest-but-curious server receives
the update a client applies for one batch of private inputs: the gradient after the variant's
mechanisms scaled it (:func:`~.training.scale_gradients`: volume, fuzzy, crystallization), and
with weight splitting the split model's gradient. It knows the architecture (splitting
included), the current weights and the labels, but not the private per-synapse rates or the
layer seeds (the **blind** attacker). The **informed** attacker also knows them, so it knows
the per-weight factors by which the shared gradient differs from the plain one.

Two attacks, both written here in torch:

* :func:`gradient_matching_attack`: Geiping et al. 2020, "Inverting Gradients": optimise dummy
  inputs so that their gradient has maximal cosine similarity with the shared one, plus a
  total-variation prior, with Adam, a fixed iteration budget, step decay at 3/8, 5/8 and 7/8 of
  it, a box constraint to the data range and several restarts (the best match is kept).
* :func:`analytic_attack`: a first fully connected layer with bias gives, for one input,
  ``dL/dW[i, :] = dL/db[i] * x``; the least-squares solution over all rows recovers ``x``
  exactly from a plain network.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from .models import Variant
from .training import scale_gradients

__all__ = [
    "AttackConfig",
    "analytic_attack",
    "InversionSpec",
    "gradient_matching_attack",
    "invert_variant",
    "match_and_score",
    "psnr",
    "shared_update",
    "stretch_to_range",
    "summarize_errors",
    "total_variation",
]

Grads = dict[str, torch.Tensor]


@dataclass(frozen=True)
class AttackConfig:
    """The gradient-matching attack's budget and prior."""

    iterations: int = 240
    restarts: int = 2
    lr: float = 0.1
    tv_weight: float = 1e-2
    seed: int = 0


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def shared_update(
    model: nn.Module, variant: Variant, x: torch.Tensor, y: torch.Tensor
) -> tuple[Grads, Grads]:
    """The update a client with ``model`` shares for batch ``(x, y)``, and its per-weight
    factors relative to the plain gradient (what the informed attacker knows).

    Works on copies (the model, its rates and random-stream counters are left as they were).
    The factors come from running the same mechanisms, from the same state, on a gradient of
    ones; the shared update is checked to equal ``plain gradient * factors``, which is what the
    informed attacker's model assumes.

    Returns:
        ``(shared, factors)``, each ``parameter name -> tensor``.
    """
    runs = []
    for ones in (False, True):
        client = copy.deepcopy(model)
        client.train()
        client.zero_grad(set_to_none=True)
        F.cross_entropy(client(x), y).backward()
        params = _trainable(client)
        plain = {n: p.grad.detach().clone() for n, p in params.items()}
        if ones:
            for p in params.values():
                p.grad = torch.ones_like(p)
        scale_gradients(client, variant)
        runs.append((plain, {n: p.grad.detach().clone() for n, p in params.items()}))
    (plain, shared), (_, factors) = runs
    for name in shared:
        expected = plain[name] * factors[name]
        if not torch.allclose(shared[name], expected, rtol=1e-5, atol=1e-12):
            raise RuntimeError(
                f"the shared gradient of {name} is not the plain one times per-weight factors; "
                "the informed attacker's model does not hold for this variant"
            )
    return shared, factors


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring entries along every spatial axis of
    ``x`` (shape ``(B, C, *spatial)``)."""
    return sum(x.diff(dim=d).abs().mean() for d in range(2, x.dim()))


def _cosine_loss(g: Grads, target: Grads) -> torch.Tensor:
    dot = sum((g[n] * target[n]).sum() for n in target)
    ng = torch.sqrt(sum(g[n].pow(2).sum() for n in target))
    nt = torch.sqrt(sum(target[n].pow(2).sum() for n in target))
    return 1 - dot / (ng * nt + 1e-12)


def gradient_matching_attack(
    model: nn.Module,
    targets: list[Grads],
    labels: torch.Tensor,
    sample_shape: tuple[int, ...],
    config: AttackConfig,
    factors: list[Grads] | None = None,
    bounds: tuple[float, float] = (0.0, 1.0),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstruct ``K`` batches at once from their shared gradients (Geiping et al. 2020).

    Args:
        model: The attacked model (its current weights; splitting hooks included).
        targets: ``K`` shared updates (``parameter name -> tensor``), one per attacked batch.
        labels: ``(K, B)`` labels of the attacked batches (known to the attacker).
        sample_shape: Shape of one input, e.g. ``(1, 8, 8)``.
        config: Iterations, restarts, Adam step size, TV weight, seed of the initial guesses.
        factors: The informed attacker's per-weight factors (one dict per batch), or None.
        bounds: The data range (box constraint).

    Returns:
        ``(reconstructions (K, B, *sample_shape), matching loss (K,))`` of the best restart.
    """
    attacked = copy.deepcopy(model).eval()
    params = {n: p.detach() for n, p in _trainable(attacked).items()}
    names = list(params)
    k, b = labels.shape
    r = config.restarts
    # Every restart of every batch is one vmapped group: (K*R, B, ...).
    stacked = {n: torch.stack([t[n] for t in targets]).repeat_interleave(r, 0) for n in names}
    stacked_factors = (
        None
        if factors is None
        else {n: torch.stack([f[n] for f in factors]).repeat_interleave(r, 0) for n in names}
    )
    ys = labels.repeat_interleave(r, 0)

    def loss_fn(p: Grads, x: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(attacked, p, (x,)), yb)

    param_grad = grad(loss_fn)

    def objective(x: torch.Tensor, yb: torch.Tensor, target: Grads, fac: Grads | None):
        g = param_grad(params, x, yb)
        if fac is not None:
            g = {n: g[n] * fac[n] for n in names}
        return _cosine_loss(g, target) + config.tv_weight * total_variation(x)

    if stacked_factors is None:
        batched = vmap(lambda x, yb, t: objective(x, yb, t, None))
        extra: tuple = ()
    else:
        batched = vmap(objective)
        extra = (stacked_factors,)
    gen = torch.Generator().manual_seed(config.seed)
    lo, hi = bounds
    x = lo + (hi - lo) * torch.rand((k * r, b, *sample_shape), generator=gen)
    x.requires_grad_(True)
    opt = torch.optim.Adam([x], lr=config.lr)
    n = config.iterations
    milestones = [int(n * 3 / 8), int(n * 5 / 8), int(n * 7 / 8)]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    for _ in range(n):
        opt.zero_grad(set_to_none=True)
        batched(x, ys, stacked, *extra).sum().backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            x.clamp_(lo, hi)
    with torch.no_grad():
        final = batched(x, ys, stacked, *extra).detach().view(k, r)
        best = final.argmin(dim=1)
        recon = x.detach().view(k, r, b, *sample_shape)[torch.arange(k), best]
    return recon, final[torch.arange(k), best]


def analytic_attack(
    shared: Grads, factors: Grads | None = None, layer: str = "fc1"
) -> torch.Tensor:
    """One input from the gradient of a first fully connected layer with bias.

    ``dL/dW = dL/db x^T`` for one input, so ``x = (dL/db . dL/dW) / |dL/db|^2`` (least squares
    over all rows; exact on a plain network, and it stays exact under weight splitting, which
    acts after the layer). The informed attacker divides out the known factors first.

    Returns:
        The estimate of the flattened input, shape ``(in_features,)``.
    """
    g_w = shared[f"{layer}.weight"]
    g_b = shared[f"{layer}.bias"]
    if factors is not None:
        g_w = g_w / factors[f"{layer}.weight"]
        g_b = g_b / factors[f"{layer}.bias"]
    return (g_b @ g_w) / (g_b @ g_b).clamp_min(1e-30)


def stretch_to_range(x: torch.Tensor, bounds: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Map ``x`` affinely onto the data range (the attacker knows it; this undoes any global
    scale of the shared gradient, e.g. volume scaling's ~0.1)."""
    lo, hi = bounds
    span = (x.max() - x.min()).clamp_min(1e-12)
    return lo + (hi - lo) * (x - x.min()) / span


def psnr(mse: float, peak: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of a mean squared error (``inf`` for 0)."""
    return math.inf if mse <= 0 else 10.0 * math.log10(peak**2 / mse)


def match_and_score(recon: torch.Tensor, truth: torch.Tensor) -> tuple[list[float], torch.Tensor]:
    """Per-target MSE after pairing each true input of a batch with one reconstruction
    (Hungarian assignment on MSE: a batch's gradient does not say which input was which).

    Args:
        recon, truth: ``(B, *sample_shape)``.

    Returns:
        ``(MSE per true input, reconstructions reordered to match truth)``.
    """
    from scipy.optimize import linear_sum_assignment

    b = truth.shape[0]
    cost = ((truth.reshape(b, 1, -1) - recon.reshape(1, b, -1)) ** 2).mean(-1)
    rows, cols = linear_sum_assignment(cost.numpy())
    order = torch.as_tensor(cols[np.argsort(rows)])
    return [float(cost[i, order[i]]) for i in range(b)], recon[order]


def summarize_errors(mses: list[float]) -> dict[str, Any]:
    """Mean and sample std of MSE and PSNR over targets."""
    arr = np.asarray(mses, dtype=float)
    ps = np.asarray([psnr(m) for m in mses], dtype=float)

    def std(a: np.ndarray) -> float:
        return float(np.std(a, ddof=1)) if a.size > 1 else 0.0

    finite = ps[np.isfinite(ps)]
    return {
        "mse": [float(m) for m in arr],
        "mse_mean": float(arr.mean()),
        "mse_std": std(arr),
        "psnr_mean": float(finite.mean()) if finite.size == ps.size else math.inf,
        "psnr_std": std(finite) if finite.size == ps.size else 0.0,
    }


@dataclass(frozen=True)
class InversionSpec:
    """The inversion study of one variant: attacks at initialisation and after training."""

    variant: str
    model: str = "fcnet"
    targets: int = 8
    batch_sizes: tuple[int, ...] = (1, 4)
    train_epochs: int = 10
    optimizer: str = "tuned"
    attack: AttackConfig = AttackConfig()
    seed: int = 0


def invert_variant(spec: InversionSpec, data: Any, device: torch.device) -> dict[str, Any]:
    """Attack ``spec.variant``'s shared updates for the first ``spec.targets`` test inputs of
    ``data`` (batches of each size in ``spec.batch_sizes``), at initialisation and after
    ``spec.train_epochs`` epochs of training; blind and, when the mechanisms scale the gradient
    by private factors, informed attackers.

    Returns:
        ``{"records": [one per attack, batch, state, attacker], "train_acc_after", "seconds",
        "images": {(state, attack, attacker): (T, *sample_shape) reconstructions of batch 1}}``.
    """
    import time

    from .models import VARIANTS, build_model
    from .training import OPTIMIZERS, evaluate, train_one

    t0, c0 = time.perf_counter(), time.process_time()
    variant = VARIANTS[spec.variant]
    model = build_model(spec.model, data.sample_shape, data.num_classes, variant, spec.seed)
    x_all, y_all = data.x_test[: spec.targets], data.y_test[: spec.targets]
    attackers = ("blind", "informed") if variant.scales_gradient else ("blind",)
    has_fc_first = isinstance(getattr(model, "fc1", None), nn.Linear) and model.fc1.bias is not None
    records: list[dict[str, Any]] = []
    images: dict[tuple[str, str, str], np.ndarray] = {}
    test_acc = None
    for state in ("init", "trained"):
        if state == "trained":
            train_one(model, variant, data, model_name=spec.model,
                      optimizer=OPTIMIZERS[spec.optimizer],
                      epochs=spec.train_epochs, seed=spec.seed, device=device)  # fmt: skip
            test_acc = evaluate(model, data.x_test, data.y_test)[1]
        model.cpu()
        for b in spec.batch_sizes:
            k = spec.targets // b
            xs = x_all[: k * b].view(k, b, *data.sample_shape)
            ys = y_all[: k * b].view(k, b)
            updates = [shared_update(model, variant, xs[i], ys[i]) for i in range(k)]
            for attacker in attackers:
                known = [f for _, f in updates] if attacker == "informed" else None
                runs = []
                if b == 1 and has_fc_first:
                    est = torch.stack(
                        [
                            stretch_to_range(
                                analytic_attack(u[0], None if known is None else known[i])
                            ).view(1, *data.sample_shape)
                            for i, u in enumerate(updates)
                        ]
                    )
                    runs.append(("analytic", est, None))
                recon, match = gradient_matching_attack(
                    model, [u[0] for u in updates], ys, data.sample_shape, spec.attack, known
                )
                runs.append(("gradient_matching", recon, match))
                for attack, est, match_loss in runs:
                    mses, ordered = [], []
                    for i in range(k):
                        m, o = match_and_score(est[i], xs[i])
                        mses += m
                        ordered.append(o)
                    rec = {
                        "variant": spec.variant,
                        "attack": attack,
                        "batch": b,
                        "state": state,
                        "attacker": attacker,
                        **summarize_errors(mses),
                    }
                    if match_loss is not None:
                        rec["matching_loss_mean"] = float(match_loss.mean())
                    records.append(rec)
                    if b == 1:
                        images[(state, attack, attacker)] = torch.cat(ordered).numpy()
    return {
        "variant": spec.variant,
        "records": records,
        "test_acc_after_training": test_acc,
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
        "images": images,
    }
