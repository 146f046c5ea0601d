"""Measure the fraction of synapses ``crystallize()`` selects in real training.

    python benchmarks/mask_fraction.py                 # FCNet on MNIST-1D, 5 epochs, 3 seeds
    python benchmarks/mask_fraction.py --model cnn --epochs 3

Trains the experiment's network (``bio_transformations.experiments``: the FCNet 40-1000-10 or
the CNN, on MNIST-1D generated locally by ``mnist1d``) with plain SGD (lr 0.1, batch 100) and
the gradient mechanisms in the documented order before every optimizer step: volume-dependent
scaling, fuzzy scaling, then crystallization. Just before ``crystallize()`` runs, it evaluates
the crystallization mask ``(|g|/|w| < crystal_thresh) | (|g| > mean|w|)`` of every converted
layer (``mean|w|`` per layer) on the gradient crystallize sees, and counts the selected weights.
Prints the fraction over all weights and steps, per epoch, per branch and per layer, and (with
``--json``) writes them to a file. ``bench_cases.CRYSTALLIZE_MASK_FRACTION`` holds the figure
this printed; the benchmark inputs are built to select that fraction.

Needs the ``experiment`` extra (``mnist1d``).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List

import torch
import torch.nn.functional as F


def _mask_counts(model: torch.nn.Module) -> Dict[str, List[int]]:
    """Per converted layer: [selected, ratio branch, big-gradient branch, weights]."""
    from bio_transformations.model_methods import bio_layers

    counts = {}
    for name, layer, bio_mod in bio_layers(model):
        cfg = bio_mod.config
        w = layer.weight.detach()
        g = layer.weight.grad
        aw, ag = w.abs(), g.abs()
        ratio_branch = ag / aw < cfg.crystal_thresh  # |w| = 0: inf or nan, never below
        big_branch = ag > aw.mean()
        mask = ratio_branch | big_branch
        counts[name] = [
            int(mask.sum()),
            int(ratio_branch.sum()),
            int(big_branch.sum()),
            w.numel(),
        ]
    return counts


def measure(model_name: str, epochs: int, seed: int) -> dict:
    from bio_transformations.experiments.data import load_mnist1d
    from bio_transformations.experiments.models import Variant, build_model

    data = load_mnist1d()
    torch.manual_seed(seed)
    variant = Variant(volume=True, fuzzy=True, crystal=True)  # the bio_step mechanisms
    model = build_model(model_name, data.sample_shape, data.num_classes, variant, seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(seed)
    n, bs = data.x_train.shape[0], 100
    per_epoch, totals, per_layer = [], [0, 0, 0, 0], {}
    for _epoch in range(epochs):
        model.train()
        epoch = [0, 0, 0, 0]
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, bs):
            idx = perm[i : i + bs]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                model.volume_dependent_lr()
                model.fuzzy_learning_rates()
                for name, c in _mask_counts(model).items():
                    layer_total = per_layer.setdefault(name, [0, 0, 0, 0])
                    for k in range(4):
                        layer_total[k] += c[k]
                        epoch[k] += c[k]
                model.crystallize()
            opt.step()
        per_epoch.append(epoch[0] / epoch[3])
        totals = [a + b for a, b in zip(totals, epoch)]
    return {
        "model": model_name,
        "seed": seed,
        "epochs": epochs,
        "fraction": totals[0] / totals[3],
        "ratio_branch": totals[1] / totals[3],
        "big_gradient_branch": totals[2] / totals[3],
        "per_epoch": per_epoch,
        "per_layer": {k: v[0] / v[3] for k, v in per_layer.items()},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["fcnet", "cnn"], default="fcnet")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = [measure(args.model, args.epochs, seed) for seed in range(args.seeds)]
    for run in runs:
        epochs = ", ".join(f"{f:.4f}" for f in run["per_epoch"])
        layers = ", ".join(f"{k} {v:.4f}" for k, v in run["per_layer"].items())
        print(
            f"seed {run['seed']}: {run['fraction']:.4f} selected (ratio branch "
            f"{run['ratio_branch']:.4f}, |g| > mean|w| {run['big_gradient_branch']:.4f}); "
            f"per epoch {epochs}; per layer {layers}"
        )
    fractions = [r["fraction"] for r in runs]
    summary = {
        "model": args.model,
        "data": "mnist1d",
        "epochs": args.epochs,
        "seeds": args.seeds,
        "mechanisms": "volume_dependent_lr, fuzzy_learning_rates, crystallize (in that order)",
        "optimizer": "SGD lr 0.1, batch 100",
        "fraction": sum(fractions) / len(fractions),
        "fraction_min": min(fractions),
        "fraction_max": max(fractions),
        "runs": runs,
    }
    print(
        f"crystallize mask fraction ({args.model}, MNIST-1D, {args.epochs} epochs, "
        f"{args.seeds} seeds): mean {summary['fraction']:.4f}, "
        f"min {summary['fraction_min']:.4f}, max {summary['fraction_max']:.4f}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
