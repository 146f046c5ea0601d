"""Pure-PyTorch kernels: the CPU fallback and the reference every other backend must match.

Each op of the contract (:mod:`~bio_transformations.kernels.contract`) takes lists of tensors
(one entry per layer, one device and dtype per call) and works in place. Math runs in float32
for float16/bfloat16 tensors (float64 stays float64) and the result is rounded back once, as
the Triton kernels do. No op reads a tensor value on the host, except the CPU-only sparse path
of :func:`rejuvenate_`, which never runs on CUDA tensors.

Random numbers come from :mod:`~bio_transformations.kernels.rng`: the Triton kernels' Philox
element mapping with ``BIO_RNG=philox`` (bit-identical to the Triton backend), torch's samplers
otherwise. Each op's docstring says which draw it uses: ``U(i)``
(:func:`~bio_transformations.kernels.philox.element_uniforms`) or ``N(i)``
(:func:`~bio_transformations.kernels.philox.element_normals`) of element ``i``'s global
index, four elements per Philox call.

This module is longer than the others on purpose: it is the reference of every op, so each
formula is found here in one search, with the one-pass CPU step beside the ops it fuses.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from . import rng
from .contract import OPS, StepParams
from .rng import legacy_draws, normal, normal_into, rejuvenation_draws, uniform
from .shards import Slab, Span, slab
from .stats import (
    LOW_PRECISION,
    abs_means,
    activity_stats,
    clean_weights_,
    compute_dtype,
    crystallize_stats,
    current_reduction,
    legacy_stats_many,
    rejuvenation_stats_many,
    rows_view,
    upcast,
)

Tensor = torch.Tensor
Tensors = Sequence[Tensor]
Spans = Sequence[Optional[Span]]

__all__ = list(OPS)  # every op of the contract, in its order


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
# CPU: layers below this many weights are packed into one flat working buffer per group (up to
# CPU_CHUNK elements a pack), so the per-op dispatch overhead is paid per pack, not per layer.
PACK_BELOW = 1 << 16
_FAST_DTYPES = (torch.float32, torch.float64)


def _chunks(*tensors: Tensor):
    """Matching flat chunks of same-shaped tensors: CPU and contiguous, else one whole piece."""
    if tensors[0].device.type != "cpu" or not all(t.is_contiguous() for t in tensors):
        yield tensors
        return
    flat = [t.view(-1) for t in tensors]
    for start in range(0, flat[0].numel(), CPU_CHUNK):
        yield tuple(f[start : start + CPU_CHUNK] for f in flat)


# ---- the one-pass CPU step: every stage on a cache-sized chunk before the next chunk -------


def _fast_cpu(*tensors: Optional[Tensor]) -> bool:
    """Whether the one-pass CPU path runs these: CPU, float32/float64, contiguous."""
    return all(
        t is None or (t.device.type == "cpu" and t.dtype in _FAST_DTYPES and t.is_contiguous())
        for t in tensors
    )


def _volume_chunk(wc: Tensor, gc: Tensor, zc: Tensor, p: StepParams, a: Tensor, b: Tensor):
    """``g *= |1 + var*z| * base_lr*exp(-s*|w|/(|w|+1))``, the eager formula's exact order,
    in the scratch buffers ``a`` and ``b``; ``zc`` (float32 draws) is consumed."""
    m = torch.abs(wc, out=a)
    m.div_(torch.add(m, 1.0, out=b)).mul_(-p.stability_factor).exp_().mul_(p.base_lr)
    factor = zc if zc.dtype == m.dtype else b.copy_(zc)  # float64 weights: math in float64
    factor.mul_(p.lr_variability).add_(1.0).abs_().mul_(m)
    gc.mul_(factor)


def _crystallize_chunk(wc: Tensor, gc: Tensor, pc: Tensor, mean: Tensor, damp: Tensor, t, a, b):
    """``p *= damp`` where ``|g| < t*|w|`` or ``|g| > mean|w|``. ``damp`` is the layer's
    :func:`_dampening` (1 for a layer whose gradient is all zero, so that rule costs no pass).
    The masks are 0/1 floats: comparisons written into a float tensor, and ``lerp``, are
    vectorized on the CPU where bool masks and ``where`` are 3-5x slower. ``lerp(p, p*damp, m)``
    is exactly ``p`` for ``m = 0`` and exactly ``p*damp`` for ``m = 1``; NaN compares false as
    in the bool form."""
    torch.abs(gc, out=a)
    torch.abs(wc, out=b).mul_(t)  # |g|/|w| < t as |g| < t*|w|: no division
    torch.lt(a, b, out=b)
    torch.gt(a, mean, out=a)
    torch.maximum(a, b, out=a)
    torch.lerp(pc, torch.mul(pc, damp, out=b), a, out=pc)


def _dampening(gates: Sequence[Tensor], dampening: float) -> List[Tensor]:
    """Per layer the factor a selected rate is multiplied by: ``dampening``, or 1 where the
    layer's gradient is all zero (``gate`` 0, :func:`stats.grads_nonzero`), so ``p*1 = p`` keeps
    its rates exactly. 0-d tensors in the gates' dtype (float32 ``d`` for float32 rates, as a
    Python float multiplies them), from one stack and one ``where`` for the whole group."""
    if not gates:
        return []
    g = torch.stack(list(gates))
    d = torch.full((), dampening, dtype=g.dtype, device=g.device)
    return list(torch.where(g > 0, d, 1.0).unbind(0))


def _stages(wc, gc, pc, zc, mean, damp, p: StepParams, scratch: Tensor) -> None:
    """Every stage of ``p`` on one chunk (or pack), in place, before moving on."""
    n = gc.numel()
    a, b = scratch[0, :n], scratch[1, :n]
    if p.volume:
        _volume_chunk(wc, gc, zc, p, a, b)
    if p.fuzzy:
        gc.mul_(pc)
    if p.crystallize:
        _crystallize_chunk(wc, gc, pc, mean, damp, p.crystal_thresh, a, b)


def _packs(sizes: Sequence[int]) -> List[List[int]]:
    """Consecutive indices of small layers grouped into packs of at most CPU_CHUNK elements."""
    packs: List[List[int]] = []
    total = CPU_CHUNK
    for i, n in enumerate(sizes):
        if total + n > CPU_CHUNK:
            packs.append([])
            total = 0
        packs[-1].append(i)
        total += n
    return packs


def _cpu_step_(
    ws: list, gs: list, ps: Optional[list], keys, p: StepParams, means, damps, slabs
) -> None:
    """The step on CPU float32/float64 contiguous tensors (one dtype): per large layer one
    pass over cache-sized chunks running every stage; small layers packed into flat buffers.

    The random draws are each layer's own stream (one ``normal`` per layer, as the separate
    op draws it; ``slabs``: where a local shard lies, so its draws follow the global index);
    ``means`` (``mean|w|``, computed before the step: ``w`` is not changed by it) and ``damps``
    (:func:`_dampening` of ``stats.grads_nonzero`` of the gradients before the step: 1 keeps
    the rates of a layer whose gradient is all zero) come from :func:`_run_step`;
    crystallization sees the gradient after volume and fuzzy scaling.
    """
    dtype = ws[0].dtype
    small = [i for i, w in enumerate(ws) if w.numel() < PACK_BELOW]
    packs = _packs([ws[i].numel() for i in small])
    widest = [sum(ws[small[j]].numel() for j in pack) for pack in packs]
    widest += [min(w.numel(), CPU_CHUNK) for w in ws if w.numel() >= PACK_BELOW]
    scratch = torch.empty(2, max(widest), dtype=dtype)
    for i, (w, g) in enumerate(zip(ws, gs)):
        n = w.numel()
        if n < PACK_BELOW:
            continue
        # rates are read only by fuzzy scaling and crystallization (any layout without them)
        pf = ps[i].view(-1) if ps is not None and (p.fuzzy or p.crystallize) else None
        z = normal(keys[i], n, w.device, slabs[i]) if p.volume else None
        for start in range(0, n, CPU_CHUNK):
            piece = slice(start, start + CPU_CHUNK)
            _stages(
                w.view(-1)[piece], g.view(-1)[piece], pf[piece] if pf is not None else None,
                z[piece] if z is not None else None, means[i], damps[i], p, scratch,
            )  # fmt: skip
    for pack in packs:
        _pack_step_([small[j] for j in pack], ws, gs, ps, keys, means, damps, slabs, p, scratch)


def _pack_step_(idx, ws, gs, ps, keys, means, damps, slabs, p: StepParams, scratch: Tensor) -> None:
    """The stages on a pack of small layers: gather into flat buffers, run, scatter back."""
    sizes = [ws[i].numel() for i in idx]
    wf = torch.cat([ws[i].view(-1) for i in idx]) if (p.volume or p.crystallize) else None
    gf = torch.cat([gs[i].view(-1) for i in idx])
    pf = torch.cat([ps[i].view(-1) for i in idx]) if (p.fuzzy or p.crystallize) else None
    zf = None
    if p.volume:
        zf = torch.empty(wf.numel(), dtype=torch.float32)
        for i, zc in zip(idx, zf.split(sizes)):
            normal_into(keys[i], zc, slabs[i])  # each layer's own stream, as the op draws it
    mf = df = None
    if p.crystallize:  # each weight compared with its own layer's mean|w|
        mf = torch.empty_like(wf)
        fills = [means[i].expand(n) for i, n in zip(idx, sizes)]
        torch._foreach_copy_(list(mf.split(sizes)), fills)
        # ... and dampened by its own layer's factor (1 where the gradient is all zero).
        df = torch.empty_like(wf)
        torch._foreach_copy_(
            list(df.split(sizes)), [damps[i].expand(n) for i, n in zip(idx, sizes)]
        )
    _stages(wf, gf, pf, zf, mf, df, p, scratch)
    if p.volume or p.fuzzy:
        torch._foreach_copy_([gs[i].view(-1) for i in idx], list(gf.split(sizes)))
    if p.crystallize:
        torch._foreach_copy_([ps[i].view(-1) for i in idx], list(pf.split(sizes)))


def _run_step(weights, grads, rates, keys, p: StepParams, eager_one, spans=None) -> None:
    """Split a group: non-empty CPU float32/float64 contiguous layers take the one-pass path,
    the rest ``eager_one(i, mean, gate)`` (half types, strided layouts, CUDA tensors under
    torch). ``spans``: where each local shard lies in its sharded layer (None: unsharded)."""
    weights, grads = list(weights), list(grads)
    # mean|w| and whether each layer's gradient has a non-zero element, before any stage scales
    # it; for the whole list (empty local shards too), so a sharded group reduces them in one
    # all-reduce.
    if p.crystallize:
        means, gates = crystallize_stats(weights, grads)
    else:
        means = gates = [None] * len(grads)
    fast, other = [], []
    for i, (w, g) in enumerate(zip(weights, grads)):
        if w.numel() == 0:
            continue
        r = rates[i] if rates is not None and (p.fuzzy or p.crystallize) else None
        (fast if _fast_cpu(w, g, r) else other).append(i)
    if fast:
        damps = [None] * len(fast)
        if p.crystallize:  # per layer d, or 1 where the gradient is all zero: no gate pass
            damps = _dampening([gates[i] for i in fast], p.dampening)
        _cpu_step_(
            [weights[i] for i in fast], [grads[i] for i in fast],
            [rates[i] for i in fast] if rates is not None else None,
            [keys[i] for i in fast] if keys is not None else None, p,
            [means[i] for i in fast], damps,
            [slab(weights[i], spans, i) for i in fast],
        )  # fmt: skip
    for i in other:
        eager_one(i, means[i], gates[i])


# ---- the general path (any device, dtype and layout) ---------------------------------------


def _crystallize_one(
    w: Tensor,
    g: Tensor,
    p: Tensor,
    thresh: float,
    damp: float,
    gate: Tensor,
    mean_aw: Optional[Tensor] = None,
) -> None:
    # mean|w| from the shared helper (the Triton backend's device reduction gives it to
    # float32 rounding); a sharded group passes the group's mean, computed for the whole list
    # in _run_step.
    if mean_aw is None:
        mean_aw = abs_means([w])[0]
    for wc, gc, pc in _chunks(w, g, p):
        ag = upcast(gc).abs()
        # |g|/|w| < t written as |g| < t*|w|: no division, same answer for w == 0 and NaN.
        mask = torch.lt(ag, upcast(wc).abs().mul_(thresh))
        # stats.grads_nonzero: a layer whose gradient is all zero crystallizes nothing.
        mask.logical_or_(ag > mean_aw).logical_and_(gate > 0)
        # p * where(mask, d, 1) equals where(mask, p*d, p), with one temporary fewer; d in the
        # compute dtype (a bare float would make it float32 for float64 rates).
        pc.mul_(torch.where(mask, torch.full((), damp, dtype=ag.dtype, device=ag.device), 1.0))


def crystallize_(
    weights: Tensors, grads: Tensors, rates: Tensors, crystal_thresh: float, dampening: float
) -> None:
    """``mask = (|g|/|w| < crystal_thresh) | (|g| > mean|w|)``; ``p[mask] *= dampening``.

    A layer whose gradient is all zero (unused this step) keeps its rates
    (``stats.grads_nonzero``)."""
    params = StepParams.crystallize_only(crystal_thresh, dampening)
    _run_step(
        weights, grads, rates, None, params,
        lambda i, mean, gate: _crystallize_one(
            weights[i], grads[i], rates[i], crystal_thresh, dampening, gate, mean
        ),
    )  # fmt: skip


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

    Philox: ``z = N(i)``. ``spans`` (every stochastic op takes it): per tensor
    None, or where the local shard lies in its layer (:mod:`~bio_transformations.kernels.shards`).
    """
    params = StepParams.volume_only(base_lr, stability_factor, lr_variability)
    _run_step(
        weights, grads, None, keys, params,
        lambda i, mean, gate: _volume_one(
            weights[i], grads[i], keys[i], base_lr, stability_factor, lr_variability,
            slab(weights[i], spans, i),
        ),
        spans,
    )  # fmt: skip


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
    ``keys`` is read only for volume scaling, ``rates`` only for the other two stages.

    On the CPU (float32/float64, contiguous) it is one pass per layer over cache-sized chunks
    that runs every stage before moving on, with small layers packed into flat buffers
    (:func:`_cpu_step_`); the separate ops are that same pass with one stage on.
    """
    p = params
    if not p.any:
        return

    def one_layer(i: int, mean: Optional[Tensor], gate: Optional[Tensor]) -> None:
        w, g = weights[i], grads[i]
        if p.volume:
            where = slab(w, spans, i)
            _volume_one(w, g, keys[i], p.base_lr, p.stability_factor, p.lr_variability, where)
        if p.fuzzy:
            fuzzy_scale_([g], [rates[i]])
        if p.crystallize:
            _crystallize_one(w, g, rates[i], p.crystal_thresh, p.dampening, gate, mean)

    _run_step(weights, grads, rates, keys, p, one_layer, spans)


def _rejuvenate_dense(
    w: Tensor, key: int, dre: float, stats: tuple, where: Optional[Slab] = None
) -> Tensor:
    std, mu, sigma = stats
    wf = upcast(w)
    draws = rejuvenation_draws(key, w.numel(), w.device, where)
    u_replace, positive, z = (d.view(w.shape) for d in draws)
    replace = torch.lt(u_replace, wf.abs().mul_(-dre).div_(std).exp_())
    magnitude = torch.exp(mu + sigma * z.to(wf.dtype))  # float64 weights: float64 math
    new = torch.where(positive, magnitude, -magnitude).clamp(-1.0, 1.0)
    w.copy_(torch.where(replace, new.to(wf.dtype), wf))
    return replace.sum()


def _rejuvenate_sparse(w: Tensor, key: int, dre: float, stats: tuple) -> Tensor:
    """CPU path: draw replacement values only for the weights actually replaced."""
    std, mu, sigma = stats
    gen = rng.generator(key, w.device)
    flat = w.view(-1) if w.is_contiguous() else w.reshape(-1)
    wf = upcast(flat)
    u = torch.rand(flat.numel(), generator=gen, device=w.device, dtype=torch.float32)
    prob = wf.abs().mul_(-dre).div_(std).exp_()  # exp(-dre*|w|/std), in one temporary
    idx = torch.nonzero(torch.lt(u, prob)).squeeze(1)  # CPU: reading the count is no sync
    k = idx.numel()
    normals = torch.randn(k, generator=gen, device=w.device, dtype=torch.float32)
    magnitude = torch.exp(mu + sigma * normals.to(wf.dtype))  # float64 weights: float64 math
    signs = torch.rand(k, generator=gen, device=w.device, dtype=torch.float32)
    sign = torch.where(signs < 0.5, 1.0, -1.0)
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
        u = torch.rand(where.global_numel, generator=gen, device=w.device, dtype=torch.float32)
        u = where.take(u)
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
        f32 = dict(generator=gen, device=w.device, dtype=torch.float32)
        normals = torch.randn(k_all, **f32)[prefix : prefix + k]
        signs = torch.rand(k_all, **f32)[prefix : prefix + k]
        magnitude = torch.exp(mu + sigma * normals.to(upcast(w).dtype))
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
    ``sigma`` halved), clamped to [-1, 1]. Philox (:func:`rng.rejuvenation_draws`): the
    element's word of stream 0 decides (``U``) and gives the sign (bit 31 clear: positive),
    ``n = N(i)`` of stream 1. Returns the number of replaced
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

    Philox (:func:`rng.legacy_draws`): the threshold's normal is ``N(i)`` (stream 0), the new
    value uses ``U(i)`` of stream 1. Returns the number of replaced weights per tensor (int64,
    on the device).
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
        draws = legacy_draws(key, w.numel(), w.device, slab(w, spans, i))
        z, u = (d.view(w.shape) for d in draws)
        threshold = torch.abs(z * scale)
        replace = wf.abs() < threshold
        w.copy_(torch.where(replace, (2.0 * u - 1.0) * max_aw, wf))
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

    baseline: 1. uniform: ``1 + (2U-1)*nu`` (Philox ``U(i)``). normal: ``1 + N(0, nu)``.
    lognormal: ``exp(N(-nu^2/2, nu))`` (mean 1; both normal forms use ``N(i)``).
    gamma: ``Gamma(1/nu, rate=1/nu)`` (mean 1). beta: ``1 + (2*Beta(1/nu, 1/nu) - 1)*nu``.
    Gamma and beta use torch's samplers in every mode (one-time draws).
    """
    if distribution not in RATE_DISTRIBUTIONS:
        raise ValueError(
            f"unknown rate distribution {distribution!r}; valid: {', '.join(RATE_DISTRIBUTIONS)}"
        )
    for p, key in zip(rates, keys):
        n, dev, ct = p.numel(), p.device, compute_dtype(p)
        if distribution == "baseline" or n == 0:
            p.fill_(1.0).clamp_(lo, hi)
            continue
        if distribution == "uniform":
            value = 1.0 + (2.0 * uniform(key, n, dev).to(ct) - 1.0) * nu
        elif distribution == "normal":
            value = 1.0 + nu * normal(key, n, dev).to(ct)
        elif distribution == "lognormal":
            value = torch.exp(-0.5 * nu * nu + nu * normal(key, n, dev).to(ct))
        elif distribution == "gamma":
            shape = torch.full((n,), 1.0 / nu, device=dev, dtype=torch.float32)
            value = _torch_sampled(key, p, torch._standard_gamma, shape) * nu
        else:  # beta
            shape = torch.full((n,), 1.0 / nu, device=dev, dtype=torch.float32)
            beta = _torch_sampled(key, p, _beta_sample, shape)
            value = 1.0 + (2.0 * beta - 1.0) * nu
        p.copy_(value.to(ct).clamp(lo, hi).view(p.shape))


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

    Philox: ``U = U(i)``.
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
                value.add_(uc.to(value.dtype).mul_(2.0).sub_(1.0).mul_(noise))
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

    Philox: ``U = U(i)``.
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
    ``U = U(i)``.
    """
    for i, (p, c, key) in enumerate(zip(rates, counts, keys)):
        cf = c.to(compute_dtype(p))  # float64 rates: float64 math
        # Before the skip: a sharded layer's mean is collective, every rank takes part.
        mean_c, denominator = activity_stats(c, cf.dtype)
        if p.numel() == 0:
            continue
        ratio = torch.where(mean_c > 0, cf / denominator, torch.ones_like(cf))
        factor = 2.0 - torch.clamp(1.0 + (ratio - 1.0) * 0.1, 0.8, 1.2)
        u = uniform(key, p.numel(), p.device, slab(p, spans, i)).view(p.shape).to(cf.dtype)
        p.copy_((1.0 + (2.0 * u - 1.0) * nu * rows_view(factor, p)).clamp(lo, hi))


def dale_enforce_(weights: Tensors, signs: Tensors) -> None:
    """``w = relu(w * sign) * sign`` with one sign (+1 or -1) per output unit (weight row)."""
    for w, s in zip(weights, signs):
        if w.numel():
            sv = rows_view(s, w).to(w.dtype)
            w.copy_(torch.relu(w * sv) * sv)
