"""Pure-PyTorch kernels: the CPU fallback and the reference every other backend must match.

Each op of the contract (:mod:`~bio_transformations.kernels.contract`) takes lists of tensors
(one entry per layer, one device and dtype per call) and works in place. Math runs in float32
for float16/bfloat16 tensors (float64 stays float64) and the result is rounded back once, as
the Triton kernels do. No op reads a tensor value on the host, except the CPU-only sparse path
of :func:`rejuvenate_`, which never runs on CUDA tensors.

Random numbers come from :mod:`~bio_transformations.kernels.rng`: Triton's Philox stream with
``BIO_RNG=philox`` (bit-identical to the Triton backend), torch's samplers otherwise. Each op's
docstring says which of the four Philox outputs ``r0..r3``
(:func:`~bio_transformations.kernels.philox.randint4x`) it uses.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import rng
from .contract import StepParams
from .rng import box_muller, normal, uniform, uniform4
from .shards import Slab, Span, slab
from .stats import (
    LOW_PRECISION,
    abs_means,
    activity_stats,
    clean_weights_,
    current_reduction,
    legacy_stats_many,
    rejuvenation_stats_many,
    rows_view,
    upcast,
)

Tensor = torch.Tensor
Tensors = Sequence[Tensor]
Spans = Sequence[Optional[Span]]

__all__ = [
    "fuzzy_scale_",
    "crystallize_",
    "volume_scale_",
    "bio_step_",
    "rejuvenate_",
    "rejuvenate_legacy_",
    "rates_init_",
    "temporal_update_",
    "weight_adaptive_",
    "activity_update_",
    "dale_enforce_",
]


# ---- the ops, in the contract's order ----------------------------------------------------


def fuzzy_scale_(grads: Tensors, rates: Tensors) -> None:
    """``g *= p`` for every (grad, rates) pair."""
    grads, rates = list(grads), list(rates)
    if not grads:
        return
    if grads[0].dtype in LOW_PRECISION:
        for g, p in zip(grads, rates):
            g.copy_(g.float() * p.float())
    else:
        torch._foreach_mul_(grads, rates)


# CPU: elementwise chains run over chunks of this many elements, so their temporaries are
# reused from the allocator and stay in cache instead of page-faulting in fresh each call.
CPU_CHUNK = 1 << 19


def _chunks(*tensors: Tensor):
    """Matching flat chunks of same-shaped tensors: CPU and contiguous, else one whole piece."""
    if tensors[0].device.type != "cpu" or not all(t.is_contiguous() for t in tensors):
        yield tensors
        return
    flat = [t.view(-1) for t in tensors]
    for start in range(0, flat[0].numel(), CPU_CHUNK):
        yield tuple(f[start : start + CPU_CHUNK] for f in flat)


def _crystallize_one(
    w: Tensor, g: Tensor, p: Tensor, thresh: float, damp: float, mean_aw: Tensor
) -> None:
    for wc, gc, pc in _chunks(w, g, p):
        ag = upcast(gc).abs()
        # |g|/|w| < t written as |g| < t*|w|: no division, same answer for w == 0 and NaN.
        mask = torch.lt(ag, upcast(wc).abs().mul_(thresh))
        mask.logical_or_(ag > mean_aw)
        # p * where(mask, d, 1) equals where(mask, p*d, p), with one temporary fewer.
        pc.mul_(torch.where(mask, damp, 1.0))


def crystallize_(
    weights: Tensors, grads: Tensors, rates: Tensors, crystal_thresh: float, dampening: float
) -> None:
    """``mask = (|g|/|w| < crystal_thresh) | (|g| > mean|w|)``; ``p[mask] *= dampening``."""
    weights = list(weights)
    # The shared helper (the Triton backend reads the same numbers), for the whole list at once:
    # a sharded group reduces the means of all its layers in one all-reduce.
    means = abs_means(weights)
    for w, g, p, mean_aw in zip(weights, grads, rates, means):
        if w.numel():
            _crystallize_one(w, g, p, crystal_thresh, dampening, mean_aw)


def _volume_one(
    w: Tensor,
    g: Tensor,
    key: int,
    base_lr: float,
    stability: float,
    variability: float,
    where: Optional[Slab] = None,
) -> None:
    # One draw for the whole tensor, so the stream does not depend on the chunking.
    z = normal(key, w.numel(), w.device, where).view(w.shape)
    for wc, gc, zc in _chunks(w, g, z):
        # m = base_lr * exp(-stability * |w|/(|w|+1)), built in place in one temporary.
        m = upcast(wc).abs()
        m.div_(m + 1.0).mul_(-stability).exp_().mul_(base_lr)
        # |N(m, variability*m)| = m * |1 + variability*z| because m > 0.
        factor = zc.to(m.dtype).mul_(variability).add_(1.0).abs_().mul_(m)
        if gc.dtype in LOW_PRECISION:
            gc.copy_(gc.float() * factor)
        else:
            gc.mul_(factor)


def volume_scale_(
    weights: Tensors,
    grads: Tensors,
    keys: Sequence[int],
    base_lr: float,
    stability_factor: float,
    lr_variability: float,
    spans: Optional[Spans] = None,
) -> None:
    """``v = |w|/(|w|+1)``, ``m = base_lr*exp(-stability_factor*v)``,
    ``g *= |N(m, lr_variability*m)|``.

    Philox: ``z = tl.randn(key, i)``. ``spans`` (every stochastic op takes it): per tensor
    None, or where the local shard lies in its layer (:mod:`~bio_transformations.kernels.shards`).
    """
    for i, (w, g, key) in enumerate(zip(weights, grads, keys)):
        if w.numel():
            where = slab(w, spans, i)
            _volume_one(w, g, key, base_lr, stability_factor, lr_variability, where)


def bio_step_(
    weights: Tensors,
    grads: Tensors,
    rates: Optional[Tensors],
    keys: Optional[Sequence[int]],
    params: StepParams,
    spans: Optional[Spans] = None,
) -> None:
    """Volume scaling, fuzzy scaling and crystallization in that order (each as ``params``
    says); by definition equal to the separate ops called in that order with the same key.
    ``keys`` is read only for volume scaling, ``rates`` only for the other two stages."""
    p = params
    if p.volume:
        volume_scale_(weights, grads, keys, p.base_lr, p.stability_factor, p.lr_variability, spans)
    if p.fuzzy:
        fuzzy_scale_(grads, rates)
    if p.crystallize:
        crystallize_(weights, grads, rates, p.crystal_thresh, p.dampening)


def _rejuvenate_dense(
    w: Tensor, key: int, dre: float, stats: tuple, where: Optional[Slab] = None
) -> Tensor:
    std, mu, sigma = stats
    wf = upcast(w)
    draws = uniform4(key, w.numel(), w.device, where)
    u_replace, u_sign, u1, u2 = (u.view(w.shape) for u in draws)
    replace = torch.lt(u_replace, wf.abs().mul_(-dre).div_(std).exp_())
    magnitude = torch.exp(mu + sigma * box_muller(u1, u2))
    new = torch.where(u_sign < 0.5, magnitude, -magnitude).clamp(-1.0, 1.0)
    w.copy_(torch.where(replace, new.to(wf.dtype), wf))
    return replace.sum()


def _rejuvenate_sparse(w: Tensor, key: int, dre: float, stats: tuple) -> Tensor:
    """CPU path: draw replacement values only for the weights actually replaced."""
    std, mu, sigma = stats
    gen = rng.generator(key, w.device)
    flat = w.view(-1) if w.is_contiguous() else w.reshape(-1)
    wf = upcast(flat)
    u = torch.rand(flat.numel(), generator=gen, device=w.device)
    prob = wf.abs().mul_(-dre).div_(std).exp_()  # exp(-dre*|w|/std), in one temporary
    idx = torch.nonzero(torch.lt(u, prob)).squeeze(1)  # CPU: reading the count is no sync
    k = idx.numel()
    magnitude = torch.exp(mu + sigma * torch.randn(k, generator=gen, device=w.device))
    sign = torch.where(torch.rand(k, generator=gen, device=w.device) < 0.5, 1.0, -1.0)
    flat.index_copy_(0, idx, (sign * magnitude).clamp_(-1.0, 1.0).to(flat.dtype))
    if not w.is_contiguous():  # flat was a copy: write it back
        w.copy_(flat.view(w.shape))
    return torch.tensor(k, dtype=torch.int64)


def _rejuvenate_sparse_sharded(
    weights: list, keys: Sequence[int], dre: float, stats: list, spans: Spans
) -> list:
    """:func:`_rejuvenate_sparse` on the local shards (along dim 0) of sharded layers, drawing
    what one process drawing the whole layer would: every rank draws the layer's uniforms and
    keeps its own; the k replaced weights of the layer then take normals and signs
    ``prefix .. prefix + k_local`` of the layer's stream, where ``prefix`` counts the weights
    replaced on the ranks before this one (one all-gather of the counts for the whole group;
    CPU only, so reading them is no device sync)."""
    red = current_reduction()
    if red is None:
        raise RuntimeError("sharded rejuvenation needs the shard group's reduction installed")
    picks, gens = [], []
    for i, (w, key) in enumerate(zip(weights, keys)):
        where = slab(w, spans, i)
        if where is None or where.flat_start is None:
            raise NotImplementedError("sharded rejuvenation needs shards along weight dim 0")
        gen = torch.Generator(device=w.device).manual_seed(int(key))
        u = where.take(torch.rand(where.global_numel, generator=gen, device=w.device))
        std = stats[i][0]
        prob = upcast(w).reshape(-1).abs().mul_(-dre).div_(std).exp_()
        picks.append(torch.nonzero(torch.lt(u, prob)).squeeze(1))
        gens.append(gen)
    local = torch.tensor([idx.numel() for idx in picks], dtype=torch.int64)
    every = red.gather(local).tolist()  # (world, layers), in rank order = shard order
    counts = []
    for i, (w, idx, gen) in enumerate(zip(weights, picks, gens)):
        k, k_all = idx.numel(), sum(row[i] for row in every)
        prefix = sum(row[i] for row in every[: red.rank])
        _, mu, sigma = stats[i]
        normals = torch.randn(k_all, generator=gen, device=w.device)[prefix : prefix + k]
        signs = torch.rand(k_all, generator=gen, device=w.device)[prefix : prefix + k]
        magnitude = torch.exp(mu + sigma * normals)
        value = (torch.where(signs < 0.5, 1.0, -1.0) * magnitude).clamp_(-1.0, 1.0)
        flat = w.view(-1) if w.is_contiguous() else w.reshape(-1)
        flat.index_copy_(0, idx, value.to(flat.dtype))
        if not w.is_contiguous():
            w.copy_(flat.view(w.shape))
        counts.append(torch.tensor(k, dtype=torch.int64))
    return counts


def rejuvenate_(
    weights: Tensors, keys: Sequence[int], dre: float, spans: Optional[Spans] = None
) -> Tensor:
    """Replace weights at random, most likely where ``|w|`` is small relative to ``std(w)``.

    NaN counts as 0 and ``w`` is clamped to [-1, 1]; weight ``i`` is replaced with probability
    ``exp(-dre*|w_i|/std(w))`` by ``sign * exp(mu + sigma*n)`` (log-normal fitted to ``|w|``,
    ``sigma`` halved), clamped to [-1, 1]. Philox: ``r0`` decides, ``r1 < 0.5`` is a positive
    sign, ``n`` is the first Box-Muller normal of ``(r2, r3)``. Returns the number of replaced
    weights per tensor (int64, on the device; reading it syncs, so callers only read it when
    asked to).
    """
    weights = list(weights)
    clean_weights_(weights)
    stats = rejuvenation_stats_many(weights)  # a sharded group: one all-reduce for all layers
    sparse = bool(weights) and weights[0].device.type == "cpu" and not rng.philox_mode()
    if sparse and spans is not None:
        return torch.stack(_rejuvenate_sparse_sharded(weights, keys, dre, stats, spans))
    counts = []
    for i, (w, key) in enumerate(zip(weights, keys)):
        if w.numel() == 0:
            counts.append(torch.zeros((), dtype=torch.int64, device=w.device))
        elif sparse:
            counts.append(_rejuvenate_sparse(w, key, dre, stats[i]))
        else:
            counts.append(_rejuvenate_dense(w, key, dre, stats[i], slab(w, spans, i)))
    if not counts:
        return torch.zeros(0, dtype=torch.int64)
    return torch.stack(counts)


def rejuvenate_legacy_(
    weights: Tensors, keys: Sequence[int], dre: float, spans: Optional[Spans] = None
) -> Tensor:
    """The original published rule: threshold ``|N(0, max|w|/dre)|`` per weight; weights with
    ``|w|`` below it are redrawn from ``U(-max|w|, max|w|)``. NaN counts as 0.

    Philox: the threshold's normal is the first Box-Muller normal of ``(r0, r1)``, the new value
    uses ``r2``. Returns the number of replaced weights per tensor (int64, on device).
    """
    weights = list(weights)
    for w in weights:
        w.nan_to_num_(nan=0.0)
    stats = legacy_stats_many(weights, dre)  # a sharded group: one all-reduce (max)
    counts = []
    for i, (w, key) in enumerate(zip(weights, keys)):
        if w.numel() == 0:
            counts.append(torch.zeros((), dtype=torch.int64, device=w.device))
            continue
        wf = upcast(w)
        max_aw, scale = stats[i]
        draws = uniform4(key, w.numel(), w.device, slab(w, spans, i))
        u0, u1, u2, _ = (u.view(w.shape) for u in draws)
        threshold = torch.abs(box_muller(u0, u1) * scale)
        replace = wf.abs() < threshold
        w.copy_(torch.where(replace, (2.0 * u2 - 1.0) * max_aw, wf))
        counts.append(replace.sum())
    if not counts:
        return torch.zeros(0, dtype=torch.int64)
    return torch.stack(counts)


RATE_DISTRIBUTIONS = ("baseline", "uniform", "normal", "lognormal", "gamma", "beta")


def _torch_sampled(key: int, p: Tensor, sample, *args) -> Tensor:
    """Draw with torch's global samplers (gamma/beta), seeded by ``key``, leaving the user's
    global RNG state exactly as it was."""
    devices = [p.device] if p.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(key) & 0x7FFF_FFFF_FFFF_FFFF)
        return sample(*args)


def _beta_sample(concentration: Tensor) -> Tensor:
    return torch.distributions.Beta(concentration, concentration).sample()


def rates_init_(
    rates: Tensors, keys: Sequence[int], distribution: str, nu: float, lo: float, hi: float
) -> None:
    """Draw the initial fuzzy learning rates, then clamp them to ``[lo, hi]``.

    baseline: 1. uniform: ``1 + (2U-1)*nu`` (Philox ``tl.rand``). normal: ``1 + N(0, nu)``.
    lognormal: ``exp(N(-nu^2/2, nu))`` (mean 1; both normal forms use ``tl.randn``).
    gamma: ``Gamma(1/nu, rate=1/nu)`` (mean 1). beta: ``1 + (2*Beta(1/nu, 1/nu) - 1)*nu``.
    Gamma and beta use torch's samplers in every mode (one-time draws).
    """
    if distribution not in RATE_DISTRIBUTIONS:
        raise ValueError(
            f"unknown rate distribution {distribution!r}; valid: {', '.join(RATE_DISTRIBUTIONS)}"
        )
    for p, key in zip(rates, keys):
        n, dev = p.numel(), p.device
        if distribution == "baseline" or n == 0:
            p.fill_(1.0).clamp_(lo, hi)
            continue
        if distribution == "uniform":
            value = 1.0 + (2.0 * uniform(key, n, dev) - 1.0) * nu
        elif distribution == "normal":
            value = 1.0 + nu * normal(key, n, dev)
        elif distribution == "lognormal":
            value = torch.exp(-0.5 * nu * nu + nu * normal(key, n, dev))
        elif distribution == "gamma":
            shape = torch.full((n,), 1.0 / nu, device=dev)
            value = _torch_sampled(key, p, torch._standard_gamma, shape) * nu
        else:  # beta
            shape = torch.full((n,), 1.0 / nu, device=dev)
            beta = _torch_sampled(key, p, _beta_sample, shape)
            value = 1.0 + (2.0 * beta - 1.0) * nu
        p.copy_(value.clamp(lo, hi).view(p.shape))


def temporal_update_(
    rates: Tensors,
    keys: Optional[Sequence[int]],
    decay: float,
    noise: float,
    lo: float,
    hi: float,
    spans: Optional[Spans] = None,
) -> None:
    """``p = clamp(1 + (p-1)*decay + noise*(2U-1), lo, hi)``; no draw when ``noise == 0``.

    Philox: ``U = tl.rand(key, i)``.
    """
    for i, p in enumerate(rates):
        if p.numel() == 0:
            continue
        u = None
        if noise != 0.0:
            assert keys is not None, "temporal_update_ needs keys when noise is drawn"
            u = uniform(keys[i], p.numel(), p.device, slab(p, spans, i)).view(p.shape)
        # (rates chunk, uniforms chunk or None without noise)
        pieces = _chunks(p, u) if u is not None else ((pc, None) for (pc,) in _chunks(p))
        for pc, uc in pieces:
            value = upcast(pc) - 1.0  # 1 + (p-1)*decay [+ noise*(2U-1)], in place
            value.mul_(decay).add_(1.0)
            if uc is not None:
                value.add_(uc.mul_(2.0).sub_(1.0).mul_(noise))
            pc.copy_(value.clamp_(lo, hi))


def weight_adaptive_(
    rates: Tensors,
    weights: Tensors,
    keys: Sequence[int],
    nu: float,
    lo: float,
    hi: float,
    spans: Optional[Spans] = None,
) -> None:
    """``p = clamp(1 + (2U-1)*nu*clamp(2 - |w|/(mean|w| + 1e-8), 0.5, 1.5), lo, hi)``.

    Philox: ``U = tl.rand(key, i)``.
    """
    weights = list(weights)
    means = abs_means(weights)  # for the whole list: one all-reduce for a sharded group
    for i, (p, w, key) in enumerate(zip(rates, weights, keys)):
        if p.numel() == 0:
            continue
        denominator = means[i] + 1e-8
        u = uniform(key, p.numel(), p.device, slab(p, spans, i)).view(p.shape)
        for pc, wc, uc in _chunks(p, w, u):
            # clamp(2 - |w|/denominator, 0.5, 1.5), in place
            scale = upcast(wc).abs().div_(denominator).neg_().add_(2.0).clamp_(0.5, 1.5)
            value = uc.to(scale.dtype).mul_(2.0).sub_(1.0).mul_(nu).mul_(scale)
            pc.copy_(value.add_(1.0).clamp_(lo, hi))


def activity_update_(
    rates: Tensors,
    counts: Tensors,
    keys: Sequence[int],
    nu: float,
    lo: float,
    hi: float,
    spans: Optional[Spans] = None,
) -> None:
    """Redraw the rates from the activity of their output units (rows).

    ``ratio_i = c_i / mean(c)`` (1 when no unit was active yet), ``f_i = 2 - clamp(1 +
    (ratio_i - 1)*0.1, 0.8, 1.2)``, row ``i`` becomes ``clamp(1 + (2U-1)*nu*f_i, lo, hi)``.
    Whether an update redraws at all is decided on the host (``BioModule``). Philox:
    ``U = tl.rand(key, i)``.
    """
    for i, (p, c, key) in enumerate(zip(rates, counts, keys)):
        mean_c, denominator = activity_stats(c)  # before the skip: a sharded mean is collective
        if p.numel() == 0:
            continue
        cf = c.to(torch.float32)
        ratio = torch.where(mean_c > 0, cf / denominator, torch.ones_like(cf))
        factor = 2.0 - torch.clamp(1.0 + (ratio - 1.0) * 0.1, 0.8, 1.2)
        u = uniform(key, p.numel(), p.device, slab(p, spans, i)).view(p.shape)
        p.copy_((1.0 + (2.0 * u - 1.0) * nu * rows_view(factor, p)).clamp(lo, hi))


def dale_enforce_(weights: Tensors, signs: Tensors) -> None:
    """``w = relu(w * sign) * sign`` with one sign (+1 or -1) per output unit (weight row)."""
    for w, s in zip(weights, signs):
        if w.numel():
            sv = rows_view(s, w).to(w.dtype)
            w.copy_(torch.relu(w * sv) * sv)
