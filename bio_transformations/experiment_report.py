"""Summaries and output files for :mod:`bio_transformations.experiment`.

Turns the per-seed, per-epoch curves of every variant into a summary (final accuracy mean and
spread, epochs to a fixed accuracy threshold, time per epoch and time in bio ops), a markdown
table, a PNG of the curves and a JSON file with every number.

Everything is reported as measured: the final epoch of every seed counts (no best-epoch or
best-seed picking), and a variant that never reaches the threshold says so.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = [
    "SEP",
    "format_table",
    "sanitize",
    "summarize",
    "write_json",
    "write_markdown",
    "write_plot",
]

# Separator used in "mean ± std" cells.
SEP = " ± "

# Fraction of the final baseline accuracy used for the "epochs to threshold" column.
THRESHOLD_FRACTION = 0.9


def _std(values: Sequence[float]) -> float:
    """Sample standard deviation (ddof=1); 0 for a single value, so one seed shows ± 0."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _first_epoch_at_least(curve: Sequence[float], threshold: float) -> int | None:
    """1-based index of the first epoch whose value reaches ``threshold`` or ``None``."""
    for epoch, value in enumerate(curve, start=1):
        if value >= threshold:
            return epoch
    return None


def summarize(
    runs: dict[str, list[dict[str, Any]]], baseline: str = "baseline"
) -> dict[str, dict[str, Any]]:
    """Summarize every variant's runs.

    Args:
        runs: ``variant -> [per-seed record]``; each record holds the lists ``test_acc``,
            ``test_loss``, ``train_loss``, ``epoch_seconds`` and ``bio_seconds`` (one entry per
            epoch).
        baseline: Name of the reference variant for the threshold and the deltas; if it is
            not among ``runs`` those columns are ``None``.

    Returns:
        ``variant -> summary dict`` (JSON-friendly; missing values are ``None``).
    """
    threshold = None
    base_mean = None
    if baseline in runs:
        base_mean = float(np.mean([r["test_acc"][-1] for r in runs[baseline]]))
        threshold = THRESHOLD_FRACTION * base_mean
    summary: dict[str, dict[str, Any]] = {}
    for variant, records in runs.items():
        final_acc = [float(r["test_acc"][-1]) for r in records]
        final_loss = [float(r["test_loss"][-1]) for r in records]
        epoch_s = [float(np.mean(r["epoch_seconds"])) for r in records]
        bio_total = [float(np.sum(r["bio_seconds"])) for r in records]
        train_total = [float(np.sum(r["epoch_seconds"])) for r in records]
        reached: list[int | None] = (
            [_first_epoch_at_least(r["test_acc"], threshold) for r in records]
            if threshold is not None
            else []
        )
        hits = [e for e in reached if e is not None]
        acc_mean = float(np.mean(final_acc))
        summary[variant] = {
            "seeds": [r["seed"] for r in records],
            "final_test_acc": final_acc,
            "final_test_acc_mean": acc_mean,
            "final_test_acc_std": _std(final_acc),
            "final_test_loss_mean": float(np.mean(final_loss)),
            "final_test_loss_std": _std(final_loss),
            "delta_acc_vs_baseline": None if base_mean is None else acc_mean - base_mean,
            "threshold_acc": threshold,
            "epochs_to_threshold": reached if threshold is not None else None,
            "epochs_to_threshold_mean": float(np.mean(hits)) if hits else None,
            "seeds_reaching_threshold": len(hits) if threshold is not None else None,
            "seconds_per_epoch_mean": float(np.mean(epoch_s)),
            "bio_seconds_per_run_mean": float(np.mean(bio_total)),
            "bio_fraction_of_train_time": float(
                np.sum(bio_total) / max(np.sum(train_total), 1e-12)
            ),
        }
    return summary


def _fmt_epochs(s: dict[str, Any]) -> str:
    """Cell for the epochs-to-threshold column (says how many seeds got there)."""
    if s["epochs_to_threshold"] is None:
        return "n/a (no baseline)"
    n = len(s["seeds"])
    if s["seeds_reaching_threshold"] == 0:
        return f"never (0/{n})"
    cell = f"{s['epochs_to_threshold_mean']:.1f}"
    if s["seeds_reaching_threshold"] < n:
        cell += f" ({s['seeds_reaching_threshold']}/{n} seeds)"
    return cell


def table_rows(summary: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the results table (strings, ready to print)."""
    threshold = next(iter(summary.values()))["threshold_acc"] if summary else None
    thr = f" ≥ {100 * threshold:.1f}%" if threshold is not None else ""
    header = [
        "variant",
        "test acc % (mean ± std)",
        "Δ vs baseline (pp)",
        f"epochs to{thr} (90% of baseline)",
        "s / epoch",
        "bio ops s / run",
        "bio share of train time",
    ]
    rows = []
    for variant, s in summary.items():
        delta = s["delta_acc_vs_baseline"]
        rows.append(
            [
                variant,
                f"{100 * s['final_test_acc_mean']:.2f}{SEP}{100 * s['final_test_acc_std']:.2f}",
                "n/a" if delta is None else f"{100 * delta:+.2f}",
                _fmt_epochs(s),
                f"{s['seconds_per_epoch_mean']:.3f}",
                f"{s['bio_seconds_per_run_mean']:.3f}",
                f"{100 * s['bio_fraction_of_train_time']:.1f}%",
            ]
        )
    return header, rows


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    """The results as a column-aligned markdown table (readable in a terminal and in markdown)."""
    header, rows = table_rows(summary)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        # Left-align the name, right-align the numbers.
        parts = [
            cells[i].ljust(widths[i]) if i == 0 else cells[i].rjust(widths[i])
            for i in range(len(cells))
        ]
        return "| " + " | ".join(parts) + " |"

    rule = (
        "|"
        + "|".join(
            ("-" * (w + 2)) if i == 0 else ("-" * (w + 1) + ":") for i, w in enumerate(widths)
        )
        + "|"
    )
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def sanitize(obj: Any) -> Any:
    """Make ``obj`` strict-JSON safe: non-finite floats become ``None``, tuples lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [sanitize(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return sanitize(obj.item())
    return obj


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented strict JSON (NaN/inf stored as null)."""
    path.write_text(json.dumps(sanitize(payload), indent=2, allow_nan=False) + "\n")


def write_markdown(path: Path, table: str, config: dict[str, Any]) -> None:
    """Write ``results.md``: the table plus the settings needed to read it."""
    threads = config.get("torch_threads")
    lines = [
        "# bio-transformations experiment results",
        "",
        f"Data: {config['dataset']['name']} "
        f"({config['dataset']['train_size']} train / {config['dataset']['test_size']} test), "
        f"model: {config['model']} ({config['num_parameters']} parameters), "
        f"epochs: {config['epochs']}, seeds: {config['seeds']}, "
        f"optimizer: {config['optimizer']}, batch size {config['batch_size']}, "
        f"device: {config['device']}, backend: {config['backend_active']}, "
        f"torch threads: {threads}.",
        "",
        table,
        "",
        "Accuracy is the test accuracy after the last epoch, mean ± sample std over seeds "
        "(every seed counts; no best-epoch picking). The epochs column is the mean first epoch "
        "at which test accuracy reached 90% of the baseline's final mean accuracy. "
        "`s / epoch` is training time per epoch (evaluation excluded; for converted models it "
        "includes the per-layer forward hooks); `bio ops s / run` is the time spent inside the "
        "explicit bio calls (volume_dependent_lr, fuzzy_learning_rates, crystallize, "
        "rejuvenate_weights) over a whole run. Timings depend on the machine and its load.",
        "",
    ]
    path.write_text("\n".join(lines))


def write_plot(path: Path, runs: dict[str, list[dict[str, Any]]], title: str) -> None:
    """Plot test accuracy, test loss and train loss per epoch (mean line, min-max band)."""
    # Imported lazily and forced to the Agg backend: no display is needed or wanted.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [("test_acc", "test accuracy (%)", 100.0), ("test_loss", "test loss", 1.0)]
    panels.append(("train_loss", "train loss", 1.0))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2))
    for variant, records in runs.items():
        for ax, (key, _label, scale) in zip(axes, panels):
            curves = scale * np.array([r[key] for r in records], dtype=float)
            epochs = np.arange(1, curves.shape[1] + 1)
            mean = curves.mean(axis=0)
            # A marker keeps one-epoch runs visible (a line needs two points).
            (line,) = ax.plot(epochs, mean, marker="o", markersize=3, label=variant)
            if curves.shape[0] > 1:
                ax.fill_between(
                    epochs,
                    curves.min(axis=0),
                    curves.max(axis=0),
                    color=line.get_color(),
                    alpha=0.15,
                )
    for ax, (_key, label, _scale) in zip(axes, panels):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"{title}\n(line: mean over seeds; band: min-max over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
