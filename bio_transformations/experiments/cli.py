"""Command line of the experiment: ``python -m bio_transformations.experiments`` (``make run``).

It tests the paper's three claims with statistics:

1. **Learning** on MNIST-1D (default; or digits, MNIST, CIFAR-10): every variant over several
   seeds for each setup (network + optimiser): final test accuracy, epochs to 90% of the
   baseline's final accuracy, train-test gap, Welch's t-test against the baseline, wall-clock
   cost.
2. **Resilience** on the 8x8 digits: gradient-inversion attacks on every variant's shared
   update, at initialisation and after training (see :mod:`.inversion` for the threat model).

Outputs: tables on stdout, ``results.json``, ``results.md`` and four PNGs in the output folder.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

import torch

from bio_transformations import BackendError, __version__, backend_for, get_backend, set_backend
from bio_transformations.kernels import BACKENDS

from .data import DATASETS, DataError, Dataset, check_data_dir, load_dataset, load_digits_split
from .inversion import AttackConfig, InversionSpec, invert_variant
from .models import DEFAULT_VARIANTS, MODELS, VARIANTS
from .report import (
    baseline_checks,
    format_table,
    inversion_table,
    learning_table,
    plot_accuracy_bars,
    plot_inversion_bars,
    plot_learning_curves,
    plot_reconstructions,
    summarize_inversion,
    summarize_learning,
    write_json,
)
from .training import OPTIMIZERS, RunSpec, parallel_map, run_spec

__all__ = ["DEFAULTS", "QUICK", "build_parser", "main"]

PROG = "bio-transformations-experiment"
DEVICES = ("cpu", "cuda", "auto")
OUTPUT_FILES = (
    "results.json",
    "results.md",
    "learning_curves.png",
    "accuracy.png",
    "inversion.png",
    "reconstructions.png",
)

#: Defaults of a full run (sized for about 6 minutes on two CPU cores) and of ``--quick``.
DEFAULTS: dict[str, Any] = {
    "setups": ("fcnet:sgd", "fcnet:tuned", "cnn:tuned"),
    "variants": DEFAULT_VARIANTS,
    "epochs": 25,
    "seeds": 5,
    "inversion_targets": 8,
    "inversion_iterations": 160,
    "inversion_restarts": 2,
    "inversion_epochs": 10,
}
QUICK: dict[str, Any] = {
    "setups": ("fcnet:tuned",),
    "variants": ("baseline", "fuzzy", "all"),
    "epochs": 2,
    "seeds": 2,
    "inversion_targets": 4,
    "inversion_iterations": 20,
    "inversion_restarts": 1,
    "inversion_epochs": 1,
}


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (plus exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer (1, 2, 3, ...), got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer (1, 2, 3, ...), got {value}")
    return value


def _names(text: str, valid: Sequence[str], what: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    choices = ", ".join(valid)
    if not names:
        raise argparse.ArgumentTypeError(f"no {what} given; valid choices: {choices}")
    unknown = [t for t in names if t not in valid]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown {what} {', '.join(map(repr, unknown))}; valid choices: {choices}"
        )
    return list(dict.fromkeys(names))


def _variant_list(text: str) -> list[str]:
    """argparse type: a comma-separated list of known variant names (duplicates dropped)."""
    return _names(text, list(VARIANTS), "variant")


def _setup_list(text: str) -> list[str]:
    """argparse type: comma-separated ``model:optimizer`` pairs."""
    valid = [f"{m}:{o}" for m in MODELS for o in OPTIMIZERS]
    return _names(text, valid, "setup")


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (exposed for docs and tests)."""
    p = _Parser(
        prog=PROG,
        description=(
            "Test the paper's claims (learning speed, accuracy, resilience to gradient "
            "inversion): train a plain baseline and bio variants over several seeds, attack "
            "their shared gradients, and write tables, results.json, results.md and PNGs."
        ),
        epilog=f"variants: {', '.join(VARIANTS)} (default: {','.join(DEFAULT_VARIANTS)})",
    )
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        default="mnist1d",
        help="data of the learning study (default mnist1d; mnist and cifar10 need --data-dir)",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="mnist: the four IDX files (train-images-idx3-ubyte, ..., optionally .gz); "
        "cifar10: the python batches (data_batch_1..5, test_batch); either directly or in "
        "torchvision's layout below this folder",
    )
    p.add_argument(
        "--download",
        action="store_true",
        help="fetch mnist/cifar10 into --data-dir with torchvision first (needs torchvision "
        "and a network)",
    )
    p.add_argument(
        "--setups",
        type=_setup_list,
        default=None,
        help=f"comma-separated model:optimizer pairs (default {','.join(DEFAULTS['setups'])}); "
        f"models {', '.join(MODELS)}; optimizers {', '.join(OPTIMIZERS)}",
    )
    p.add_argument(
        "--variants",
        type=_variant_list,
        default=None,
        help=f"comma-separated list (default {','.join(DEFAULT_VARIANTS)})",
    )
    p.add_argument(
        "--epochs", type=_positive_int, default=None, help=f"default {DEFAULTS['epochs']}"
    )
    p.add_argument(
        "--seeds",
        type=_positive_int,
        default=None,
        help=f"seeds 0..N-1 (default {DEFAULTS['seeds']})",
    )
    p.add_argument("--no-learning", action="store_true", help="skip the learning study")
    p.add_argument("--no-inversion", action="store_true", help="skip the inversion study")
    p.add_argument(
        "--inversion-targets",
        type=_positive_int,
        default=None,
        help=f"test digits attacked (multiple of 4; default {DEFAULTS['inversion_targets']})",
    )
    p.add_argument(
        "--inversion-iterations",
        type=_positive_int,
        default=None,
        help=f"gradient-matching iterations (default {DEFAULTS['inversion_iterations']})",
    )
    p.add_argument(
        "--inversion-restarts",
        type=_positive_int,
        default=None,
        help=f"gradient-matching restarts (default {DEFAULTS['inversion_restarts']})",
    )
    p.add_argument(
        "--inversion-epochs",
        type=_positive_int,
        default=None,
        help="training epochs before the 'trained' attacks "
        f"(default {DEFAULTS['inversion_epochs']})",
    )
    p.add_argument(
        "--backend", choices=BACKENDS, default="auto", help="kernel backend (default auto)"
    )
    p.add_argument("--device", choices=DEVICES, default="cpu", help="cpu (default), cuda, or auto")
    p.add_argument(
        "--jobs",
        type=_positive_int,
        default=2,
        help="worker processes, one thread each (default 2; timings are per process)",
    )
    p.add_argument("--out", default=None, help="output directory (default: runs/<timestamp>)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke test (under a minute): "
        + ", ".join(
            f"{k}={v if not isinstance(v, tuple) else ','.join(v)}" for k, v in QUICK.items()
        )
        + " (explicit options still win)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def _out_dir(arg: str | None) -> Path:
    """The output directory: as given, or a fresh ``runs/<timestamp>`` (never reused)."""
    if arg is not None:
        return Path(arg)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path("runs") / stamp
    k = 1
    while path.exists():
        path = Path("runs") / f"{stamp}-{k}"
        k += 1
    return path


def _download(dataset: str, root: str) -> None:
    """Fetch MNIST or CIFAR-10 into ``root`` with torchvision (optional dependency)."""
    try:
        import torchvision.datasets as tvd
    except ImportError as exc:
        raise DataError(
            f"--download needs torchvision ({exc}); or put the files in --data-dir yourself"
        ) from None
    cls = tvd.MNIST if dataset == "mnist" else tvd.CIFAR10
    try:
        for train in (True, False):
            cls(root, train=train, download=True)
    except Exception as exc:  # network errors come in many types
        raise DataError(f"download of {dataset} failed: {exc}") from None


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="run", file=sys.stderr, disable=not enabled,
                dynamic_ncols=True)  # fmt: skip


def _learning(args: Any, opts: dict[str, Any], data: Dataset, device: torch.device) -> dict:
    specs = [
        RunSpec(*setup.split(":"), variant, seed, opts["epochs"])
        for setup in opts["setups"]
        for variant in opts["variants"]
        for seed in range(opts["seeds"])
    ]
    with _progress(len(specs), "learning", not args.no_progress) as bar:
        records = parallel_map(
            run_spec, specs, data, device=device, backend=get_backend(), jobs=args.jobs,
            on_done=lambda spec: bar.update(1),
        )  # fmt: skip
    runs: dict[str, dict[str, list]] = {}
    for spec, rec in zip(specs, records):
        runs.setdefault(f"{spec.model}:{spec.optimizer}", {}).setdefault(spec.variant, []).append(
            rec
        )
    summaries = {setup: summarize_learning(r) for setup, r in runs.items()}
    return {"runs": runs, "summary": summaries}


def _inversion(args: Any, opts: dict[str, Any], device: torch.device) -> dict:
    digits = load_digits_split()
    attack = AttackConfig(
        iterations=opts["inversion_iterations"], restarts=opts["inversion_restarts"]
    )
    targets = opts["inversion_targets"]
    specs = [
        InversionSpec(
            variant=v,
            targets=targets,
            batch_sizes=(1, 4),
            train_epochs=opts["inversion_epochs"],
            attack=attack,
        )
        for v in opts["variants"]
    ]
    with _progress(len(specs), "inversion", not args.no_progress) as bar:
        results = parallel_map(
            invert_variant, specs, digits, device=device, backend=get_backend(), jobs=args.jobs,
            on_done=lambda spec: bar.update(1),
        )  # fmt: skip
    rows = summarize_inversion([r for res in results for r in res["records"]])
    x = digits.x_test[:targets]
    mean_image_mse = float(((x - digits.x_train.mean(0)) ** 2).mean())
    return {
        "spec": asdict(replace(specs[0], variant="*")),
        "dataset": digits.describe(),
        "mean_image_mse": mean_image_mse,
        "test_acc_after_training": {r["variant"]: r["test_acc_after_training"] for r in results},
        "seconds_per_variant": {r["variant"]: r["seconds"] for r in results},
        "cpu_seconds_per_variant": {r["variant"]: r["cpu_seconds"] for r in results},
        "attacks": rows,
        "baseline_checks": baseline_checks(rows, mean_image_mse),
        "_images": {r["variant"]: r["images"] for r in results},
        "_originals": x,
    }


def _markdown(config: dict, learning: dict | None, inversion: dict | None) -> tuple[str, str]:
    """``(results.md text, the tables for stdout)``."""
    parts: list[str] = []
    if learning is not None:
        d = config["dataset"]
        parts.append(
            f"## Learning: {d['name']} ({d['train_size']} train / {d['test_size']} test), "
            f"{config['seeds']} seeds x {config['epochs']} epochs"
        )
        for setup, summary in learning["summary"].items():
            model, opt = setup.split(":")
            parts += ["", f"### {model}, {OPTIMIZERS[opt].description}", ""]
            parts.append(format_table(*learning_table(summary)))
    if inversion is not None:
        spec = inversion["spec"]
        a = spec["attack"]
        parts += [
            "",
            f"## Gradient inversion: {spec['model']} on {inversion['dataset']['name']}, "
            f"{spec['targets']} test digits, GIA {a['iterations']} iterations x "
            f"{a['restarts']} restarts; mean-image guess MSE {inversion['mean_image_mse']:.4f}",
        ]
        for state in ("init", "trained"):
            label = (
                "at initialisation"
                if state == "init"
                else (f"after {spec['train_epochs']} epochs of training")
            )
            parts += ["", f"### {label}", ""]
            parts.append(format_table(*inversion_table(inversion["attacks"], state)))
            verdicts = [
                f"{'GIA' if c['attack'] == 'gradient_matching' else 'analytic'} batch "
                f"{c['batch']} "
                + ("reconstructs it" if c["reconstructs_baseline"] else "does NOT (that column "
                   "compares nothing)")
                for c in inversion["baseline_checks"]
                if c["state"] == state
            ]  # fmt: skip
            parts += ["", "Baseline check (MSE under 1/4 of the mean-image guess's): "
                      + "; ".join(verdicts) + "."]  # fmt: skip
    tables = "\n".join(parts)
    notes = [
        "# bio-transformations experiment results",
        "",
        f"Command: `{' '.join(config['command'])}`; device {config['device']}, backend "
        f"{config['backend_active']}, {config['jobs']} worker process(es) x 1 thread, torch "
        f"{config['torch_version']}, wall time {config['total_wall_seconds']:.0f} s "
        f"(learning {config['learning_wall_seconds']:.0f} s, inversion "
        f"{config['inversion_wall_seconds']:.0f} s; CPU time summed over workers: learning "
        f"{config['learning_cpu_seconds'] or 0:.0f} s, inversion "
        f"{config['inversion_cpu_seconds'] or 0:.0f} s).",
        "",
        tables,
        "",
        "Learning: test accuracy after the last epoch, mean ± sample std over seeds (every "
        "seed counts). Δ pp: difference of means to the baseline; p: Welch's t-test of the "
        "final accuracies against the baseline's. Epochs to: mean first epoch at which test "
        "accuracy reached 90% of the baseline's final mean (seeds that never did are counted "
        "apart). Gap: final train minus test accuracy. CPU s / run: CPU time of one run "
        "(single-threaded worker; training plus per-epoch evaluation), cost: that over the "
        "baseline's. Wall times (in results.json) depend on the machine's load.",
        "",
        "Inversion: reconstruction MSE per attacked digit (pixels in [0, 1]), mean ± std over "
        "targets, its ratio to the baseline under the same attack (x base), and mean PSNR. "
        "Blind: the attacker knows the architecture, weights and labels, not the private "
        "rates or layer seeds; informed: it also knows them (so it knows the per-weight "
        "factors of the shared gradient). Rows exist only where the two differ.",
        "",
    ]
    return "\n".join(notes), tables


def _figures(out: Path, config: dict, learning: dict | None, inversion: dict | None) -> None:
    import numpy as np

    if learning is not None:
        title = f"{config['dataset']['name']}: {config['seeds']} seeds, {config['epochs']} epochs"
        plot_learning_curves(out / "learning_curves.png", learning["runs"], title)
        plot_accuracy_bars(out / "accuracy.png", learning["summary"])
    if inversion is not None:
        plot_inversion_bars(
            out / "inversion.png", inversion["attacks"], inversion["mean_image_mse"]
        )
        # One row per variant and attacker: the digits at initialisation, then after training.
        grids = {}
        for variant, images in inversion["_images"].items():
            for attacker in ("blind", "informed"):
                pair = [images.get((s, "gradient_matching", attacker)) for s in ("init", "trained")]
                if all(img is not None for img in pair):
                    grids[f"{variant} {attacker}"] = np.concatenate([img[:, 0] for img in pair])
        originals = np.asarray(inversion["_originals"][:, 0])
        t = originals.shape[0]
        plot_reconstructions(
            out / "reconstructions.png",
            np.concatenate([originals, originals]),
            grids,
            f"gradient-matching reconstructions (batch 1): left {t} at initialisation, "
            f"right {t} after {inversion['spec']['train_epochs']} epochs of training",
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bio_transformations.experiments``.

    Returns:
        0 on success. Bad arguments or data exit with status 2 and a one-line message on
        stderr (``SystemExit(2)``, as argparse does).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    base = QUICK if args.quick else DEFAULTS
    explicit = {
        "setups": args.setups,
        "variants": args.variants,
        "epochs": args.epochs,
        "seeds": args.seeds,
        "inversion_targets": args.inversion_targets,
        "inversion_iterations": args.inversion_iterations,
        "inversion_restarts": args.inversion_restarts,
        "inversion_epochs": args.inversion_epochs,
    }
    opts = {k: (v if v is not None else base[k]) for k, v in explicit.items()}
    if opts["inversion_targets"] % 4:
        parser.error(
            f"argument --inversion-targets: expected a multiple of 4 (batches of 1 and 4), "
            f"got {opts['inversion_targets']}"
        )
    if args.no_learning and args.no_inversion:
        parser.error("argument --no-inversion: nothing left to run with --no-learning too")

    # Check everything that can fail cheaply before the first epoch trains.
    try:
        import matplotlib  # noqa: F401
        import mnist1d  # noqa: F401
        import scipy  # noqa: F401
        import sklearn  # noqa: F401
        import tqdm  # noqa: F401
    except ImportError as exc:
        parser.exit(
            2,
            f"{PROG}: error: missing optional dependency {exc.name!r}; "
            "install with: pip install 'bio-transformations[experiment]'\n",
        )
    if args.dataset in ("mnist", "cifar10") and not args.no_learning:
        if args.data_dir is None:
            parser.error(f"argument --data-dir: --dataset {args.dataset} needs a data folder")
        try:
            if args.download:
                _download(args.dataset, args.data_dir)
            check_data_dir(args.dataset, args.data_dir)
        except DataError as exc:
            parser.error(f"argument --data-dir: {exc}")
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda is not available here; valid choices: cpu, auto")
    else:
        device = torch.device(args.device)

    threads_before = torch.get_num_threads()
    backend_before = get_backend()
    try:
        set_backend(args.backend)
        try:
            # Fails loudly where an explicit request cannot run; now rather than mid-run.
            backend_active = backend_for(device)
        except BackendError as exc:
            parser.error(f"argument --backend: {args.backend!r} cannot run on {device}: {exc}")
        data = None
        if not args.no_learning:
            try:
                data = load_dataset(args.dataset, args.data_dir)
            except DataError as exc:
                parser.error(f"argument --data-dir: {exc}")
        torch.set_num_threads(1)
        out = _out_dir(args.out)
        out.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "command": [PROG, *(sys.argv[1:] if argv is None else list(argv))],
            **{k: list(v) if isinstance(v, tuple) else v for k, v in opts.items()},
            "optimizers": {k: asdict(v) for k, v in OPTIMIZERS.items()},
            "variant_definitions": {v: asdict(VARIANTS[v]) for v in opts["variants"]},
            "bio_config": "package defaults except the fields each variant names",
            "dataset": None if data is None else data.describe(),
            "device": str(device),
            "backend_requested": args.backend,
            "backend_active": backend_active,
            "jobs": args.jobs,
            "torch_threads_per_process": 1,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "platform": platform.platform(),
            "package_version": __version__,
            "quick": bool(args.quick),
        }
        what = []
        if data is not None:
            what.append(
                f"learning on {data.name}: {len(opts['setups'])} setups x "
                f"{len(opts['variants'])} variants x {opts['seeds']} seeds x "
                f"{opts['epochs']} epochs"
            )
        if not args.no_inversion:
            what.append(f"inversion on digits: {len(opts['variants'])} variants")
        print(f"{PROG}: {'; '.join(what)}; device {device}, backend {backend_active}, "
              f"{args.jobs} job(s)", file=sys.stderr)  # fmt: skip
        t_start = time.perf_counter()
        learning = None if data is None else _learning(args, opts, data, device)
        t_mid = time.perf_counter()
        inversion = None if args.no_inversion else _inversion(args, opts, device)
        t_end = time.perf_counter()
        config.update(
            total_wall_seconds=t_end - t_start,
            learning_wall_seconds=t_mid - t_start,
            inversion_wall_seconds=t_end - t_mid,
            # Summed over the worker processes: divided by --jobs, the wall time of a machine
            # with that many free cores.
            learning_cpu_seconds=None
            if learning is None
            else sum(
                r["run_cpu_seconds"]
                for runs in learning["runs"].values()
                for recs in runs.values()
                for r in recs
            ),
            inversion_cpu_seconds=None
            if inversion is None
            else sum(inversion["cpu_seconds_per_variant"].values()),
        )
        markdown, tables = _markdown(config, learning, inversion)
        payload: dict[str, Any] = {"config": config}
        if learning is not None:
            payload["learning"] = learning
        if inversion is not None:
            payload["inversion"] = {k: v for k, v in inversion.items() if not k.startswith("_")}
        write_json(out / "results.json", payload)
        (out / "results.md").write_text(markdown)
        _figures(out, config, learning, inversion)
    finally:
        torch.set_num_threads(threads_before)
        set_backend(backend_before)

    print(tables)
    print(f"\nresults written to {out.resolve()} ({', '.join(OUTPUT_FILES)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
