"""Summaries, statistics, tables, JSON and figures of :mod:`bio_transformations.experiments`.

Everything is reported as measured: the final epoch of every seed counts (no best-epoch or
best-seed picking), a variant that never reaches the speed threshold says so, and each
comparison with the baseline carries Welch's t-test p-value.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = [
    "SEP",
    "format_table",
    "baseline_checks",
    "inversion_table",
    "learning_table",
    "sanitize",
    "summarize_inversion",
    "summarize_learning",
    "welch_p",
    "write_json",
]

# Separator used in "mean ± std" cells.
SEP = " ± "

# A reconstruction error below this (pixels in [0, 1]) is exact up to float rounding.
EXACT_MSE = 1e-8

# Fraction of the final baseline accuracy used for the "epochs to threshold" column.
THRESHOLD_FRACTION = 0.9


def _std(values: Sequence[float]) -> float:
    """Sample standard deviation (ddof=1); 0 for a single value, so one seed shows ± 0."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def welch_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Two-sided Welch's t-test p-value of ``a`` against ``b`` (None when undefined: fewer
    than two values a side, or both sides without spread)."""
    from scipy.stats import ttest_ind

    if len(a) < 2 or len(b) < 2:
        return None
    if _std(a) == 0.0 and _std(b) == 0.0:
        return None if np.mean(a) == np.mean(b) else 0.0
    with warnings.catch_warnings():
        # scipy warns about precision when one side has (almost) no spread; the p-value stands.
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(ttest_ind(a, b, equal_var=False).pvalue)
    return p if math.isfinite(p) else None


def _first_epoch_at_least(curve: Sequence[float], threshold: float) -> int | None:
    """1-based index of the first epoch whose value reaches ``threshold`` or ``None``."""
    for epoch, value in enumerate(curve, start=1):
        if value >= threshold:
            return epoch
    return None


def summarize_learning(
    runs: dict[str, list[dict[str, Any]]], baseline: str = "baseline"
) -> dict[str, dict[str, Any]]:
    """Summarize every variant's runs of one setup (model + optimiser).

    Args:
        runs: ``variant -> [per-seed record]``; each record holds the per-epoch lists
            ``test_acc``, ``train_acc``, ``test_loss``, ``train_loss`` and ``epoch_seconds``, and
            ``run_seconds`` and ``run_cpu_seconds``.
        baseline: The reference variant for the threshold, deltas, p-values and cost ratio; if
            it is not among ``runs`` those entries are ``None``.

    Returns:
        ``variant -> summary dict`` (JSON-friendly; missing values are ``None``).
    """
    base = runs.get(baseline)
    base_acc = [float(r["test_acc"][-1]) for r in base] if base else None
    threshold = THRESHOLD_FRACTION * float(np.mean(base_acc)) if base_acc else None
    base_cpu = float(np.mean([r["run_cpu_seconds"] for r in base])) if base else None
    summary: dict[str, dict[str, Any]] = {}
    for variant, records in runs.items():
        acc = [float(r["test_acc"][-1]) for r in records]
        gap = [float(r["train_acc"][-1] - r["test_acc"][-1]) for r in records]
        seconds = [float(r["run_seconds"]) for r in records]
        cpu = [float(r["run_cpu_seconds"]) for r in records]
        reached = (
            [_first_epoch_at_least(r["test_acc"], threshold) for r in records]
            if threshold is not None
            else None
        )
        hits = [e for e in (reached or []) if e is not None]
        acc_mean = float(np.mean(acc))
        summary[variant] = {
            "seeds": [r["seed"] for r in records],
            "final_test_acc": acc,
            "final_test_acc_mean": acc_mean,
            "final_test_acc_std": _std(acc),
            "final_train_acc_mean": float(np.mean([r["train_acc"][-1] for r in records])),
            "train_test_gap": gap,
            "train_test_gap_mean": float(np.mean(gap)),
            "train_test_gap_std": _std(gap),
            "delta_acc_vs_baseline": None if base_acc is None else acc_mean - np.mean(base_acc),
            "p_welch_vs_baseline": (
                None if base_acc is None or variant == baseline else welch_p(acc, base_acc)
            ),
            "threshold_acc": threshold,
            "epochs_to_threshold": reached,
            "epochs_to_threshold_mean": float(np.mean(hits)) if hits else None,
            "seeds_reaching_threshold": None if reached is None else len(hits),
            "run_seconds_mean": float(np.mean(seconds)),
            "run_cpu_seconds_mean": float(np.mean(cpu)),
            "cost_vs_baseline": None if not base_cpu else float(np.mean(cpu)) / base_cpu,
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


def _fmt_p(p: float | None) -> str:
    if p is None:
        return "-"
    return f"{p:.2g}" if p >= 1e-4 else "<1e-4"


def learning_table(summary: dict[str, dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one setup's learning table."""
    threshold = next(iter(summary.values()))["threshold_acc"] if summary else None
    thr = f" ≥ {100 * threshold:.1f}%" if threshold is not None else ""
    header = [
        "variant",
        "test acc %",
        "Δ pp",
        "p (Welch)",
        f"epochs to{thr}",
        "train−test gap pp",
        "CPU s / run",
        "cost",
    ]
    rows = []
    for variant, s in summary.items():
        delta = s["delta_acc_vs_baseline"]
        cost = s["cost_vs_baseline"]
        rows.append(
            [
                variant,
                f"{100 * s['final_test_acc_mean']:.2f}{SEP}{100 * s['final_test_acc_std']:.2f}",
                "n/a" if delta is None else f"{100 * delta:+.2f}",
                _fmt_p(s["p_welch_vs_baseline"]),
                _fmt_epochs(s),
                f"{100 * s['train_test_gap_mean']:.1f}{SEP}{100 * s['train_test_gap_std']:.1f}",
                f"{s['run_cpu_seconds_mean']:.2f}",
                "n/a" if cost is None else f"{cost:.2f}x",
            ]
        )
    return header, rows


def summarize_inversion(
    records: list[dict[str, Any]], baseline: str = "baseline"
) -> list[dict[str, Any]]:
    """Add to each attack record the ratio of its mean MSE to the baseline's under the same
    attack, batch size, state and attacker (the blind baseline when the baseline has no
    informed row, as their updates are the same) and Welch's p-value of the MSEs."""
    index = {(r["variant"], r["attack"], r["batch"], r["state"], r["attacker"]): r for r in records}
    out = []
    for r in records:
        key = (baseline, r["attack"], r["batch"], r["state"])
        base = index.get(key + (r["attacker"],)) or index.get(key + ("blind",))
        row = dict(r)
        # Against an exact baseline reconstruction (rounding-level error) a ratio means nothing.
        row["mse_ratio_vs_baseline"] = (
            None
            if base is None or base["mse_mean"] < EXACT_MSE
            else r["mse_mean"] / base["mse_mean"]
        )
        row["p_welch_vs_baseline"] = (
            None if base is None or base is r else welch_p(r["mse"], base["mse"])
        )
        out.append(row)
    return out


def _fmt_mse(x: float) -> str:
    return f"{x:.4f}" if x >= 1e-3 else f"{x:.1e}"


def baseline_checks(
    rows: list[dict[str, Any]], mean_image_mse: float, baseline: str = "baseline"
) -> list[dict[str, Any]]:
    """Whether each attack reconstructs the plain baseline (mean MSE under a quarter of the
    mean-image guess's): where it does not, a higher error for a variant means nothing."""
    checks = []
    for r in rows:
        if r["variant"] == baseline and r["attacker"] == "blind":
            checks.append(
                {
                    "attack": r["attack"],
                    "batch": r["batch"],
                    "state": r["state"],
                    "baseline_mse_mean": r["mse_mean"],
                    "mean_image_mse": mean_image_mse,
                    "reconstructs_baseline": r["mse_mean"] < 0.25 * mean_image_mse,
                }
            )
    return checks


def inversion_table(rows: list[dict[str, Any]], state: str) -> tuple[list[str], list[list[str]]]:
    """One row per (variant, attacker), one column per attack, for one model state."""
    columns = []
    for r in rows:
        col = (r["attack"], r["batch"])
        if r["state"] == state and col not in columns:
            columns.append(col)
    header = ["variant", "attacker"] + [
        f"{'GIA' if a == 'gradient_matching' else 'analytic'} batch {b}: MSE (x base), PSNR dB"
        for a, b in columns
    ]
    keys: list[tuple[str, str]] = []
    cells: dict[tuple[str, str, str, int], dict[str, Any]] = {}
    for r in rows:
        if r["state"] != state:
            continue
        k = (r["variant"], r["attacker"])
        if k not in keys:
            keys.append(k)
        cells[k + (r["attack"], r["batch"])] = r
    out = []
    for k in keys:
        line = [k[0], k[1]]
        for a, b in columns:
            r = cells.get(k + (a, b))
            if r is None:
                line.append("-")
                continue
            ratio = r["mse_ratio_vs_baseline"]
            ratio_txt = "" if ratio is None else f" (x{ratio:.2f})"
            if r["mse_mean"] < EXACT_MSE:
                line.append(f"exact (< {EXACT_MSE:g})")
                continue
            line.append(
                f"{_fmt_mse(r['mse_mean'])}{SEP}{_fmt_mse(r['mse_std'])}{ratio_txt}, "
                f"{r['psnr_mean']:.1f}"
            )
        out.append(line)
    return header, out


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """A column-aligned markdown table (readable in a terminal and in markdown)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        # Left-align the names, right-align the numbers.
        parts = [
            cells[i].ljust(widths[i])
            if i < 2 and not cells[i][:1].isdigit()
            else cells[i].rjust(widths[i])
            for i in range(len(cells))
        ]
        return "| " + " | ".join(parts) + " |"

    rule = "|" + "|".join("-" * (w + 1) + ":" if i else "-" * (w + 2) for i, w in enumerate(widths))
    return "\n".join([line(header), rule + "|", *(line(r) for r in rows)])


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


# ------------------------------------------------------------------------------------------
# Figures (matplotlib imported lazily, Agg backend: no display needed)
# ------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_learning_curves(
    path: Path, setups: dict[str, dict[str, list[dict[str, Any]]]], title: str
) -> None:
    """Test accuracy per epoch for every setup (mean line, min-max band over seeds), plus the
    train accuracy dashed, so the train-test gap shows."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(setups), figsize=(5.4 * len(setups), 4.4), squeeze=False)
    for ax, (setup, runs) in zip(axes[0], setups.items()):
        for variant, records in runs.items():
            test = 100 * np.array([r["test_acc"] for r in records], dtype=float)
            train = 100 * np.array([r["train_acc"] for r in records], dtype=float)
            epochs = np.arange(1, test.shape[1] + 1)
            (line,) = ax.plot(epochs, test.mean(0), marker="o", markersize=2, label=variant)
            ax.plot(epochs, train.mean(0), ls="--", lw=0.8, color=line.get_color())
            if test.shape[0] > 1:
                ax.fill_between(
                    epochs, test.min(0), test.max(0), color=line.get_color(), alpha=0.12
                )
        ax.set_title(setup, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("accuracy % (solid: test, dashed: train)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(loc="lower right", fontsize=7)
    fig.suptitle(f"{title}\n(line: mean over seeds; band: min-max of test accuracy)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy_bars(path: Path, summaries: dict[str, dict[str, dict[str, Any]]]) -> None:
    """Final test accuracy per variant and setup: bars at the mean, error bars one std."""
    plt = _pyplot()
    setups = list(summaries)
    variants = list(dict.fromkeys(v for s in summaries.values() for v in s))
    width = 0.8 / max(len(setups), 1)
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(variants) + 2), 4.2))
    x = np.arange(len(variants))
    for j, setup in enumerate(setups):
        s = summaries[setup]
        means = [100 * s[v]["final_test_acc_mean"] if v in s else np.nan for v in variants]
        stds = [100 * s[v]["final_test_acc_std"] if v in s else 0.0 for v in variants]
        ax.bar(x + (j - (len(setups) - 1) / 2) * width, means, width, yerr=stds, capsize=3,
               label=setup)  # fmt: skip
    ax.set_xticks(x, variants)
    ax.set_ylabel("final test accuracy % (mean ± std over seeds)")
    lo = min(
        100 * s[v]["final_test_acc_mean"] - 100 * s[v]["final_test_acc_std"]
        for s in summaries.values()
        for v in s
    )
    ax.set_ylim(max(0.0, lo - 10), None)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_inversion_bars(path: Path, rows: list[dict[str, Any]], mean_image_mse: float) -> None:
    """Reconstruction MSE (mean ± std over targets) per variant, one panel per attack and
    model state, blind and informed attackers side by side; the dotted line is the MSE of
    guessing the mean training image (no information)."""
    plt = _pyplot()
    panels = list(dict.fromkeys((r["attack"], r["batch"], r["state"]) for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.0 * cols, 3.6 * nrows), squeeze=False)
    for ax, (attack, batch, state) in zip(axes.flat, panels):
        x = np.arange(len(variants))
        for j, attacker in enumerate(("blind", "informed")):
            sel = {
                r["variant"]: r
                for r in rows
                if (r["attack"], r["batch"], r["state"], r["attacker"])
                == (attack, batch, state, attacker)
            }
            means = [sel[v]["mse_mean"] if v in sel else np.nan for v in variants]
            stds = [sel[v]["mse_std"] if v in sel else 0.0 for v in variants]
            ax.bar(x + (j - 0.5) * 0.4, means, 0.4, yerr=stds, capsize=2, label=attacker)
        ax.axhline(mean_image_mse, ls=":", color="k", lw=1, label="mean-image guess")
        name = "GIA" if attack == "gradient_matching" else "analytic"
        ax.set_title(f"{name}, batch {batch}, {state}", fontsize=9)
        ax.set_xticks(x, variants, rotation=30, fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("reconstruction MSE")
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("gradient inversion: higher error = more resilient", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_reconstructions(
    path: Path, originals: np.ndarray, grids: dict[str, np.ndarray], title: str
) -> None:
    """Originals in the first row, then one row of reconstructions per labelled entry.

    Args:
        originals: ``(T, H, W)`` images.
        grids: ``row label -> (T, H, W)`` reconstructions in the same order.
    """
    plt = _pyplot()
    rows = [("original", originals), *grids.items()]
    t = originals.shape[0]
    fig, axes = plt.subplots(len(rows), t, figsize=(0.9 * t + 1.8, 0.95 * len(rows)), squeeze=False)
    for i, (label, images) in enumerate(rows):
        for j in range(t):
            ax = axes[i][j]
            ax.imshow(images[j], cmap="gray_r", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
