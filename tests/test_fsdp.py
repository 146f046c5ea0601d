"""Sharded training with FSDP2 (``fully_shard``): 2 gloo processes on CPU.

One spawn runs every check (the process group costs seconds to start): each rank trains a
sharded copy and an unsharded reference of the same converted model on the same batches, six
steps through every mechanism, in each ``BIO_RNG`` mode and on the Triton backend (Triton's
interpreter, Philox), for three configurations (TEMPORAL with Dale and weight splitting,
WEIGHT_ADAPTIVE, ACTIVITY); ``attach()`` with SGD and with AdamW (the update-scaling mode);
the zero-gradient gate of crystallization decided over the shard group; then a
``torch.distributed.checkpoint`` save and load on 2 ranks.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from bio_transformations import BioConverter, Distribution, attach, shard_rates
from bio_transformations.kernels import settings
from bio_transformations.kernels.shards import Slab, Span

fsdp = pytest.importorskip("torch.distributed.fsdp")
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="no torch.distributed")

WORLD = 2
STEPS = 6


class TransposedLinear(nn.Module):
    """A GPT-2 style ``Conv1D``: weight ``(in, out)``, ``nf`` output features."""

    def __init__(self, nx: int, nf: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


CONFIGS = {
    # Dale and splitting need even widths; the others use odd ones: uneven shards, and an
    # output layer of one row whose shard on rank 1 is empty.
    "temporal": (
        (6, 4, 3),
        dict(
            fuzzy_lr_distribution=Distribution.TEMPORAL,
            fuzzy_lr_dynamic=True,
            fuzzy_lr_update_freq=1,
            apply_dales_principle=True,
            weight_splitting_Gamma=2,
        ),
    ),
    "adaptive": (
        (5, 3, 1),
        dict(
            fuzzy_lr_distribution=Distribution.WEIGHT_ADAPTIVE,
            fuzzy_lr_dynamic=True,
            fuzzy_lr_update_freq=2,
        ),
    ),
    "activity": (
        (5, 3, 1),
        dict(fuzzy_lr_distribution=Distribution.ACTIVITY, fuzzy_lr_dynamic=True),
    ),
}


def make_model(config: str) -> nn.Module:
    (h1, h2, out), cfg = CONFIGS[config]
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.Flatten(),
        nn.Linear(64, h1),
        nn.ReLU(),
        TransposedLinear(h1, h2),
        nn.ReLU(),
        nn.Linear(h2, out),
    )
    return BioConverter(**cfg)(model)


def train(model: nn.Module, steps: int, seed: int, dale: bool) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 1, 6, 6, generator=gen)  # the same batches on every rank
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        model.volume_dependent_lr()
        model.fuzzy_learning_rates()
        model.crystallize()
        model.bio_step()
        model.update_fuzzy_learning_rates()
        opt.step()
        if dale:
            model.enforce_dales_principle()
        model.rejuvenate_weights()
        model.rejuvenate_weights_old()


def shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in (model[0], model[2], model[4], model[6]):
        fully_shard(layer)
    fully_shard(model)
    return model


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def compare(sharded: nn.Module, reference: nn.Module) -> dict:
    """Worst relative weight error and the fraction of differing rates, gathered."""
    out = {"weight_rel": 0.0, "rates_diff": 0, "rates_total": 0, "other": []}
    ref_state = reference.state_dict()
    for key, value in sharded.state_dict().items():
        if not torch.is_tensor(value):
            if value != ref_state[key]:
                out["other"].append(key)
            continue
        a, b = full(value).double(), ref_state[key].double()
        if key.endswith("fuzzy_learning_rate_parameters"):
            out["rates_diff"] += int(((a - b).abs() > 1e-6 * b.abs().clamp_min(1)).sum())
            out["rates_total"] += b.numel()
        elif key.endswith("weight") or key.endswith("bias"):
            rel = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) if b.numel() else 0
            out["weight_rel"] = max(out["weight_rel"], rel)
        elif not torch.equal(a, b):  # Dale signs, activity counts
            out["other"].append(key)
    return out


def memory(model: nn.Module) -> list:
    """Per converted layer: (local rate elements, local weight elements, global elements,
    whether the state dict holds the rates as a DTensor with the weight's placements)."""
    from torch.distributed.tensor import DTensor

    state = model.state_dict()
    rows = []
    for index in (0, 2, 4, 6):
        layer = model[index]
        rates = state[f"{index}.bio_mod.fuzzy_learning_rate_parameters"]
        same = isinstance(rates, DTensor) and rates.placements == layer.weight.placements
        chunk = -(-rates.shape[0] // WORLD) * (rates.numel() // max(rates.shape[0], 1))
        rows.append(
            (rates.to_local().numel(), layer.weight.to_local().numel(), rates.numel(), chunk, same)
        )
    return rows


def equivalence(config: str, mode: str) -> dict:
    dale = CONFIGS[config][1].get("apply_dales_principle", False)
    reference = make_model(config)
    sharded = shard(copy.deepcopy(reference))
    assert shard_rates(sharded) == 4
    changes = {"rng": "philox", "backend": "triton"} if mode == "triton" else {"rng": mode}
    with settings.override(**changes):
        train(sharded, STEPS, seed=1, dale=dale)
    with settings.override(rng="philox" if mode == "triton" else mode):
        train(reference, STEPS, seed=1, dale=dale)
    result = compare(sharded, reference)
    result["memory"] = memory(sharded)
    # The summary gathers a sharded layer's rates: the same table as one process's.
    result["summary_same"] = str(sharded.bio_summary()) == str(reference.bio_summary())
    return result


def train_attached(model: nn.Module, optimizer: str, steps: int, seed: int) -> None:
    """Training through ``attach()``: every mechanism around each step (SGD: on the
    gradient; AdamW: on the update, ``functional.scale_updates``)."""
    params = list(model.parameters())
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=0.05)
    else:
        opt = torch.optim.AdamW(params, lr=0.01)
    gen = torch.Generator().manual_seed(seed)
    with attach(model, opt, volume=True, rejuvenate_every=2):
        for _ in range(steps):
            x = torch.randn(8, 1, 6, 6, generator=gen)  # the same batches on every rank
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()


def attached(optimizer: str, mode: str) -> dict:
    """``attach()`` on an FSDP2-sharded model against the same on one process."""
    reference = make_model("temporal")
    sharded = shard(copy.deepcopy(reference))
    shard_rates(sharded)
    with settings.override(rng=mode):
        train_attached(sharded, optimizer, STEPS, seed=4)
        train_attached(reference, optimizer, STEPS, seed=4)
    return compare(sharded, reference)


def zero_gradient_gate() -> dict:
    """Crystallization's gate ``stats.grads_nonzero`` on local shards: rank 0's rows of the
    gradient are all zero, rank 1's are not, so the layer's gradient is not all zero and
    rank 0's rates crystallize as on one process (where |g| = 0 < t*|w|). Through every path
    of the torch backend: the one-pass CPU step, the general path (float16 shards are not on
    the one-pass path) and the compiled CPU path's delegation."""
    from bio_transformations import kernels
    from bio_transformations.kernels import cpu_fused, stats
    from bio_transformations.kernels.contract import StepParams
    from bio_transformations.sharding import GroupReduction

    class Mesh:  # the parts of a DeviceMesh GroupReduction reads
        def get_group(self):
            return dist.group.WORLD

        def get_local_rank(self):
            return dist.get_rank()

        def size(self):
            return dist.get_world_size()

    reduction = GroupReduction(Mesh())
    rank = dist.get_rank()
    rows = ((0, 4), (4, 7))[rank]
    out = {}
    for path, dtype in (("one-pass", torch.float32), ("general", torch.float16)):
        for op_name in ("crystallize", "bio_step", "fused"):
            torch.manual_seed(5)
            w = torch.randn(7, 5).to(dtype)
            g = torch.randn(7, 5).to(dtype)
            g[:4] = 0  # rank 0's shard of the gradient is all zero
            p = torch.ones(7, 5, dtype=dtype)
            config = make_model("adaptive")[2].bio_mod.config
            params = StepParams.from_config(config, volume=False, fuzzy=True, crystallize=True)
            whole = [t.clone() for t in (w, g, p)]
            local = [t[rows[0] : rows[1]].clone() for t in (w, g, p)]
            for (a, b, c), reduce in ((whole, False), (local, True)):
                with stats.reduced_over(reduction if reduce else None):
                    if op_name == "crystallize":
                        kernels.torch_backend.crystallize_(
                            [a], [b], [c], params.crystal_thresh, params.dampening
                        )
                    elif op_name == "bio_step":
                        kernels.torch_backend.bio_step_([a], [b], [c], None, params)
                    elif dtype == torch.float32:  # the compiled path takes float32/float64
                        cpu_fused.bio_step_([a], [b], [c], None, params)
                    else:
                        kernels.torch_backend.bio_step_([a], [b], [c], None, params)
            want = whole[2][rows[0] : rows[1]]
            out[f"{path}/{op_name}"] = bool(
                torch.equal(local[2], want) and not torch.equal(want, p[rows[0] : rows[1]])
            )
    return out


def checkpoint(path: str) -> bool:
    """Train 3 steps, save with DCP, load into a freshly converted sharded model (other seeds),
    train both 3 more steps: every local shard must match bit for bit."""
    import torch.distributed.checkpoint as dcp

    first = shard(make_model("temporal"))
    shard_rates(first)
    train(first, 3, seed=2, dale=True)
    dcp.save(first.state_dict(), checkpoint_id=path)
    torch.manual_seed(123)
    second = make_model("temporal")
    for m in second.modules():  # a different stream: the checkpoint must restore it
        if hasattr(m, "layer_seed"):
            m.layer_seed += 1
    second = shard(second)
    shard_rates(second)
    state = second.state_dict()
    dcp.load(state, checkpoint_id=path)
    second.load_state_dict(state)
    train(first, 3, seed=3, dale=True)
    train(second, 3, seed=3, dale=True)
    a, b = first.state_dict(), second.state_dict()
    return all(
        torch.equal(v.to_local() if hasattr(v, "to_local") else v, b[k].to_local())
        if hasattr(v, "to_local")
        else (torch.equal(v, b[k]) if torch.is_tensor(v) else v == b[k])
        for k, v in a.items()
    )


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    result: dict = {}
    torch.set_num_threads(1)  # two ranks on a small CPU: no oversubscription
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=WORLD,
            timeout=datetime.timedelta(seconds=60),
        )
        import time

        times = result["seconds"] = {}
        for config in CONFIGS:
            for mode in ("torch", "philox"):
                t0 = time.perf_counter()
                result[f"{config}/{mode}"] = equivalence(config, mode)
                times[f"{config}/{mode}"] = time.perf_counter() - t0
        for case in ("temporal/triton",):
            t0 = time.perf_counter()
            result[case] = equivalence(*case.split("/"))
            times[case] = time.perf_counter() - t0
        for optimizer in ("sgd", "adamw"):
            for mode in ("torch", "philox"):
                t0 = time.perf_counter()
                result[f"attach-{optimizer}/{mode}"] = attached(optimizer, mode)
                times[f"attach-{optimizer}/{mode}"] = time.perf_counter() - t0
        result["gate"] = zero_gradient_gate()
        t0 = time.perf_counter()
        result["checkpoint"] = checkpoint(os.path.join(out_dir, "dcp"))
        times["checkpoint"] = time.perf_counter() - t0
        dist.barrier()
    except Exception:
        result["error"] = traceback.format_exc()
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    ctx = mp.start_processes(
        _worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = 240
    import time

    start = time.monotonic()
    while not ctx.join(timeout=5):
        if time.monotonic() - start > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"FSDP workers did not finish within {deadline} s")
    out = []
    for rank in range(WORLD):
        data = json.loads((tmp / f"rank{rank}.json").read_text())
        assert "error" not in data, f"rank {rank}:\n{data['error']}"
        out.append(data)
    return out


CASES = [f"{c}/{m}" for c in CONFIGS for m in ("torch", "philox")] + ["temporal/triton"]


@pytest.mark.parametrize("case", CASES)
def test_sharded_run_equals_one_process(results, case):
    for rank, data in enumerate(results):
        r = data[case]
        assert r["weight_rel"] <= 1e-5, (rank, r)
        assert r["rates_diff"] <= 0.001 * r["rates_total"], (rank, r)
        assert not r["other"], (rank, r)
        assert r["summary_same"], (rank, r)


@pytest.mark.parametrize(
    "case", [f"attach-{o}/{m}" for o in ("sgd", "adamw") for m in ("torch", "philox")]
)
def test_attach_on_a_sharded_model_equals_one_process(results, case):
    for rank, data in enumerate(results):
        r = data[case]
        assert r["weight_rel"] <= 1e-5, (rank, r)
        assert r["rates_diff"] <= 0.001 * r["rates_total"], (rank, r)
        assert not r["other"], (rank, r)


def test_zero_gradient_gate_is_decided_over_the_shard_group(results):
    """A layer whose local gradient shard is all zero on one rank is not all zero."""
    for rank, data in enumerate(results):
        assert data["gate"] and all(data["gate"].values()), (rank, data["gate"])


@pytest.mark.parametrize("case", ["temporal/torch", "adaptive/philox", "activity/torch"])
def test_each_rank_holds_its_share_of_the_rates(results, case):
    totals: dict = {}
    for data in results:
        for index, row in enumerate(data[case]["memory"]):
            local_rates, local_weight, total, chunk, same = row
            assert local_rates == local_weight, (index, data[case]["memory"])
            assert same, "rates are not a DTensor with the weight's placements"
            assert local_rates <= chunk  # 1/N of the rows, rounded up to whole rows
            totals[index] = totals.get(index, 0) + local_rates
            totals.setdefault(("total", index), total)
    for index in range(4):
        assert totals[index] == totals[("total", index)]  # the shards partition the layer


def test_dcp_save_and_load_on_two_ranks_resumes_identically(results):
    assert all(data["checkpoint"] for data in results)


def test_slab_global_index_and_take():
    whole = torch.arange(4 * 3 * 5).reshape(4, 3, 5)
    for span, local in [
        (Span(0, 2, 4), whole[2:4]),
        (Span(1, 1, 3), whole[:, 1:3]),
        (Span(2, 3, 5), whole[:, :, 3:5]),
    ]:
        s = Slab(tuple(local.shape), span)
        assert torch.equal(s.counters(torch.device("cpu")), local.reshape(-1))
        assert torch.equal(s.take(whole.reshape(-1)), local.reshape(-1))
    assert Slab((2, 3, 5), Span(0, 2, 4)).flat_start == 30
    assert Slab((4, 2, 5), Span(1, 1, 3)).flat_start is None


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_local_shards_draw_what_the_whole_layer_draws(bio_settings, backend):
    """The stochastic ops without statistics, on the two row shards of a layer (and activity
    on the strided unit-major shards of a transposed one, whose counts stay whole), equal the
    op on the whole layer."""
    from bio_transformations import kernels

    if backend == "triton":
        trb = pytest.importorskip("bio_transformations.kernels.triton")
        if not trb.INTERPRETED:
            pytest.skip("the Triton check runs in the interpreter on CPU tensors")
    bio_settings(rng="philox")
    op = kernels.torch_backend if backend == "torch" else kernels.triton
    torch.manual_seed(0)
    w, g, p = torch.randn(7, 5), torch.randn(7, 5), torch.rand(7, 5) + 0.5
    counts = torch.arange(7)
    wants = {
        "volume": lambda w, g, p, s: op.volume_scale_([w], [g], [11], 0.1, 2.0, 0.2, **s),
        "temporal": lambda w, g, p, s: op.temporal_update_([p], [12], 0.9, 0.05, 0.5, 2, **s),
    }
    for name, run in wants.items():
        whole = [t.clone() for t in (w, g, p)]
        run(*whole, {})
        parts = [t.clone() for t in (w, g, p)]
        for start, stop in ((0, 4), (4, 7)):
            local = [t[start:stop] for t in parts]
            run(*local, {"spans": [Span(0, start, 7)]})
        for a, b in zip(whole, parts):
            assert torch.equal(a, b), name
    # A transposed layer's unit-major rates, sharded along the layer's rows: strided pieces.
    pt = torch.rand(5, 7) + 0.5  # stored (in=5, out=7); unit-major view (7, 5)
    whole = pt.clone()
    op.activity_update_([whole.t()], [counts], [14], 0.3, 0.2, 3)
    parts = pt.clone()
    for start, stop in ((0, 3), (3, 5)):
        piece = parts[start:stop].t()  # (7, local rows)
        op.activity_update_([piece], [counts], [14], 0.3, 0.2, 3, spans=[Span(1, start, 5)])
    assert torch.equal(whole, parts)
