"""A small, honest experiment: do the bio mechanisms help on real handwritten digits?

Run it with ``python -m bio_transformations.experiment`` (or the console script
``bio-transformations-experiment``). By default it trains a small CNN on scikit-learn's bundled
8x8 digits (1,797 real images, no download) with a plain baseline and five bio variants over
three seeds each, all with the same initial weights per seed, the same optimiser (SGD with
momentum) and the same learning-rate schedule, then prints a results table and writes
``results.json``, ``results.md`` and ``curves.png`` into the output directory.

Variants (the training-loop order follows the package documentation)::

    baseline       plain model, no conversion
    fuzzy          fuzzy_learning_rates() every step
    fuzzy+crystal  ... plus crystallize() every step
    fuzzy+rejuv    ... plus rejuvenate_weights() once per epoch
    split2         weight splitting with Gamma = 2 (no other mechanism)
    all            volume_dependent_lr + fuzzy + crystallize + rejuvenation + split2

SGD rather than Adam on purpose: Adam divides every gradient entry by its own running RMS, so
a constant per-weight factor (the fuzzy learning rate) cancels out and the mechanism could not
show any effect at all.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .experiment_data import DataError, Dataset, check_idx_dir, load_digits_split, load_idx_dir
from .experiment_report import (
    format_table,
    summarize,
    write_json,
    write_markdown,
    write_plot,
)

__all__ = [
    "BACKENDS",
    "MODELS",
    "VARIANTS",
    "CNN",
    "MLP",
    "Variant",
    "build_model",
    "build_parser",
    "main",
    "run_experiment",
    "train_one",
]

PROG = "bio-transformations-experiment"
BACKENDS = ("auto", "torch", "triton")
MODELS = ("mlp", "cnn")
DEVICES = ("cpu", "cuda", "auto")


@dataclass(frozen=True)
class Variant:
    """Which bio mechanisms one run uses.

    Attributes:
        convert: Convert the model with a ``BioConverter`` at all (False: plain baseline).
        fuzzy: Call ``fuzzy_learning_rates()`` after every backward pass.
        crystal: Call ``crystallize()`` after the fuzzy step.
        rejuv: Call ``rejuvenate_weights()`` once at the end of every epoch.
        vdlr: Call ``volume_dependent_lr()`` right after the backward pass.
        split: Weight-splitting Gamma (0: none).
    """

    convert: bool = True
    fuzzy: bool = False
    crystal: bool = False
    rejuv: bool = False
    vdlr: bool = False
    split: int = 0


VARIANTS: dict[str, Variant] = {
    "baseline": Variant(convert=False),
    "fuzzy": Variant(fuzzy=True),
    "fuzzy+crystal": Variant(fuzzy=True, crystal=True),
    "fuzzy+rejuv": Variant(fuzzy=True, rejuv=True),
    "split2": Variant(split=2),
    "all": Variant(fuzzy=True, crystal=True, rejuv=True, vdlr=True, split=2),
}

# Defaults, chosen so the whole default run (6 variants x 3 seeds) takes 2-4 minutes on two
# CPU cores; --quick is for smoke tests and covers every mechanism via "all".
DEFAULT_EPOCHS = 20
DEFAULT_SEEDS = 3
DEFAULT_BATCH = 32
DEFAULT_LR = 0.05
DEFAULT_MOMENTUM = 0.9
QUICK_VARIANTS = ("baseline", "fuzzy", "all")


# --------------------------------------------------------------------------------------------
# Models. Layers are direct children (not an nn.Sequential) so that
# BioConverter.set_last_module_token_for_model can find and mark the output layer, which is then
# neither weight-split nor subject to Dale's principle.
# --------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """Two hidden ReLU layers; every hidden width is even so Gamma=2 splitting divides it."""

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (128, 64)):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class CNN(nn.Module):
    """Two 3x3 conv layers, one max-pool, then two linear layers.

    Sized for 8x8 digits (8x8 -> pool -> 4x4); the adaptive pool makes it accept other image
    sizes (28x28 MNIST -> 14x14 -> 4x4) without changing the classifier.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc1 = nn.Linear(2 * width * 4 * 4, 64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2) if min(x.shape[-2:]) >= 8 else x
        x = F.adaptive_avg_pool2d(x, (4, 4)).flatten(1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


def build_model(name: str, data: Dataset, variant: Variant, seed: int) -> nn.Module:
    """Build (and, for bio variants, convert) a model with seed-determined initial weights.

    The weights are drawn right after seeding, before any conversion, so every variant of one
    seed starts from exactly the same weights; conversion draws the fuzzy rates afterwards.
    """
    torch.manual_seed(seed)
    c, h, w = data.image_shape
    model: nn.Module
    if name == "mlp":
        model = MLP(c * h * w, data.num_classes)
    elif name == "cnn":
        model = CNN(c, data.num_classes)
    else:  # guarded by the CLI; kept for direct callers
        raise ValueError(f"unknown model {name!r}; valid choices: {', '.join(MODELS)}")
    if not variant.convert:
        return model
    from .bio_converter import BioConverter

    # Mark the output layer before conversion so it is neither split nor checked for
    # divisibility (10 classes need not be divisible by Gamma).
    BioConverter.set_last_module_token_for_model(model)
    converter = BioConverter(weight_splitting_Gamma=variant.split)
    return converter(model)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _sync_fn(device: torch.device) -> Callable[[], None]:
    """A function that waits for queued device work (so wall-clock timings are honest)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _timed(fn: Callable[[], None], total: list, sync: Callable[[], None]) -> Callable[[], None]:
    """``fn`` adding its wall-clock time (device work included) to ``total[0]``."""

    def run() -> None:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        total[0] += time.perf_counter() - t0

    return run


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(x, y)``, in eval mode, chunked."""
    model.eval()
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for i in range(0, x.shape[0], batch):
        out = model(x[i : i + batch])
        loss_sum += F.cross_entropy(out, y[i : i + batch], reduction="sum")
        correct += (out.argmax(1) == y[i : i + batch]).sum()
    n = x.shape[0]
    return float(loss_sum) / n, float(correct) / n


def train_one(
    model: nn.Module,
    variant: Variant,
    data: Dataset,
    *,
    seed: int,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    device: torch.device,
    progress: Any = None,
) -> dict[str, Any]:
    """Train ``model`` with the mechanisms of ``variant`` and return its per-epoch curves.

    Args:
        model: The (converted, for bio variants) model; moved to ``device``.
        variant: Which bio calls to make.
        data: Train and test tensors (moved to ``device`` once, batches are sliced from them).
        seed: Seeds the shuffling (the model was already built from the same seed).
        epochs, batch_size, lr, momentum: The shared schedule: SGD with momentum, cosine decay.
        device: Where to train.
        progress: Optional tqdm bar, advanced once per epoch.

    Returns:
        ``{"seed", "train_loss", "test_loss", "test_acc", "epoch_seconds", "bio_seconds"}``,
        each curve one float per epoch.
    """
    model.to(device)
    x_tr, y_tr = data.x_train.to(device), data.y_train.to(device)
    x_te, y_te = data.x_test.to(device), data.y_test.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    # A private generator: the shuffling order must not depend on how many random numbers
    # the bio mechanisms drew, or variants of one seed would see different batches.
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    sync = _sync_fn(device)
    step_bio = variant.vdlr or variant.fuzzy or variant.crystal
    n = x_tr.shape[0]
    rec: dict[str, Any] = {
        "seed": seed,
        "train_loss": [],
        "test_loss": [],
        "test_acc": [],
        "epoch_seconds": [],
        "bio_seconds": [],
    }
    # The mechanisms run through attach(): around every optimizer step, in the documented
    # order (volume scaling, fuzzy rates, crystallisation; rejuvenation after the last step of
    # each epoch). The timer wraps exactly the work the hooks do.
    steps_per_epoch = -(-n // batch_size)
    handle = None
    bio_time = [0.0]
    if step_bio or variant.rejuv:
        from .attachment import attach

        handle = attach(
            model, opt, volume=variant.vdlr, fuzzy=variant.fuzzy, crystallize=variant.crystal,
            rejuvenate_every=steps_per_epoch if variant.rejuv else 0,
        )  # fmt: skip
        handle.before_step = _timed(handle.before_step, bio_time, sync)
        handle.after_step = _timed(handle.after_step, bio_time, sync)
    for _epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen).to(device)
        loss_sum = torch.zeros((), device=device)
        bio_time[0] = 0.0
        sync()
        t_epoch = time.perf_counter()
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            out = model(x_tr[idx])
            loss = F.cross_entropy(out, y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += loss.detach() * idx.shape[0]
        bio_s = bio_time[0]
        sched.step()
        sync()
        rec["epoch_seconds"].append(time.perf_counter() - t_epoch)
        rec["bio_seconds"].append(bio_s)
        rec["train_loss"].append(float(loss_sum) / n)
        test_loss, test_acc = evaluate(model, x_te, y_te)
        rec["test_loss"].append(test_loss)
        rec["test_acc"].append(test_acc)
        if progress is not None:
            progress.set_postfix(acc=f"{100 * test_acc:.1f}%", loss=f"{test_loss:.3f}")
            progress.update(1)
    if handle is not None:
        handle.remove()
    return rec


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


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


def _positive_float(text: str) -> float:
    """argparse type: a finite float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _variant_list(text: str) -> list[str]:
    """argparse type: a comma-separated list of known variant names (duplicates dropped)."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    valid = ", ".join(VARIANTS)
    if not names:
        raise argparse.ArgumentTypeError(f"no variant given; valid choices: {valid}")
    unknown = [t for t in names if t not in VARIANTS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown variant {', '.join(map(repr, unknown))}; valid choices: {valid}"
        )
    return list(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser (exposed for docs and tests)."""
    p = _Parser(
        prog=PROG,
        description=(
            "Train a plain baseline and bio variants (fuzzy learning rates, crystallisation, "
            "rejuvenation, weight splitting) on real handwritten digits over several seeds; "
            "print a results table and write results.json, results.md and curves.png."
        ),
        epilog=f"variants: {', '.join(VARIANTS)}",
    )
    p.add_argument("--model", choices=MODELS, default="cnn", help="network (default: cnn)")
    p.add_argument(
        "--variants",
        type=_variant_list,
        default=None,
        help=f"comma-separated list (default: all of {','.join(VARIANTS)})",
    )
    p.add_argument("--epochs", type=_positive_int, default=None, help=f"default {DEFAULT_EPOCHS}")
    p.add_argument(
        "--seeds",
        type=_positive_int,
        default=None,
        help=f"number of seeds, 0..N-1 (default {DEFAULT_SEEDS})",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="bio_transformations kernel backend (default: auto)",
    )
    p.add_argument(
        "--device",
        choices=DEVICES,
        default="cpu",
        help="cpu (default), cuda, or auto (cuda when available)",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="folder with MNIST-style IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte,"
        " t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, optionally .gz) instead of the "
        "bundled 8x8 digits; nothing is downloaded",
    )
    p.add_argument("--out", default=None, help="output directory (default: runs/<timestamp>)")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: 1 epoch, 1 seed, variants {','.join(QUICK_VARIANTS)} "
        "(explicit --epochs/--seeds/--variants still win)",
    )
    p.add_argument(
        "--batch-size", type=_positive_int, default=DEFAULT_BATCH, help=f"default {DEFAULT_BATCH}"
    )
    p.add_argument("--lr", type=_positive_float, default=DEFAULT_LR, help="SGD learning rate")
    p.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        help="torch CPU threads (default 1: these tiny models gain nothing from more, and "
        "multi-threaded torch slows down badly on a busy machine)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def _apply_backend(name: str, device: torch.device) -> str:
    """Select the package's kernel backend and return the one that will run on ``device``.

    Uses ``bio_transformations.set_backend`` (and ``backend_for`` to resolve ``auto``) when the
    package has them, and the ``BIO_BACKEND`` environment variable otherwise.

    Raises:
        ValueError: If the package refuses the backend (e.g. triton without a GPU).
    """
    import bio_transformations as bt

    setter = getattr(bt, "set_backend", None)
    resolver = getattr(bt, "backend_for", None)
    if setter is None:
        os.environ["BIO_BACKEND"] = name
        return name
    try:
        setter(name)
        # backend_for fails loudly where an explicit request cannot run; do it now rather
        # than in the middle of the first training step.
        return str(resolver(device)) if resolver is not None else name
    except (ValueError, RuntimeError, ImportError) as exc:
        raise ValueError(f"backend {name!r} cannot run on {device}: {exc}") from exc


def _restore_backend(previous: str | None, env_before: str | None) -> None:
    """Put the global backend and BIO_BACKEND back (main() may run inside a larger process)."""
    import bio_transformations as bt

    setter = getattr(bt, "set_backend", None)
    if setter is not None and previous is not None:
        try:
            setter(previous)
        except Exception:
            pass
    if env_before is None:
        os.environ.pop("BIO_BACKEND", None)
    else:
        os.environ["BIO_BACKEND"] = env_before


def _current_backend() -> str | None:
    import bio_transformations as bt

    getter = getattr(bt, "get_backend", None)
    try:
        return None if getter is None else str(getter())
    except Exception:
        return None


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


def run_experiment(
    *,
    data: Dataset,
    model_name: str,
    variants: Sequence[str],
    epochs: int,
    seeds: int,
    batch_size: int,
    lr: float,
    momentum: float,
    device: torch.device,
    show_progress: bool = True,
) -> dict[str, list[dict[str, Any]]]:
    """Train every variant over every seed; return ``variant -> [per-seed curves]``."""
    from tqdm.auto import tqdm

    runs: dict[str, list[dict[str, Any]]] = {}
    for variant_name in variants:
        variant = VARIANTS[variant_name]
        runs[variant_name] = []
        for seed in range(seeds):
            model = build_model(model_name, data, variant, seed)
            with tqdm(
                total=epochs,
                desc=f"{variant_name:<13} seed {seed}",
                unit="ep",
                file=sys.stderr,
                disable=not show_progress,
                leave=True,
                dynamic_ncols=True,
            ) as bar:
                rec = train_one(
                    model,
                    variant,
                    data,
                    seed=seed,
                    epochs=epochs,
                    batch_size=batch_size,
                    lr=lr,
                    momentum=momentum,
                    device=device,
                    progress=bar,
                )
            runs[variant_name].append(rec)
    return runs


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m bio_transformations.experiment``.

    Returns:
        0 on success. Bad arguments or data exit with status 2 and a one-line message on
        stderr (``SystemExit(2)``, as argparse does).
    """
    parser = build_parser()
    args = parser.parse_args(argv)

    epochs = args.epochs or (1 if args.quick else DEFAULT_EPOCHS)
    seeds = args.seeds or (1 if args.quick else DEFAULT_SEEDS)
    variants = args.variants or list(QUICK_VARIANTS if args.quick else VARIANTS)

    # Check everything that can fail cheaply before the first epoch trains.
    try:
        import matplotlib  # noqa: F401
        import sklearn  # noqa: F401
        import tqdm  # noqa: F401
    except ImportError as exc:
        parser.exit(
            2,
            f"{PROG}: error: missing optional dependency {exc.name!r}; "
            "install with: pip install 'bio-transformations[experiment]'\n",
        )
    if args.data_dir is not None:
        try:
            check_idx_dir(args.data_dir)
        except DataError as exc:
            parser.error(f"argument --data-dir: {exc}")
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif args.device == "cuda" and not torch.cuda.is_available():
        parser.error("argument --device: cuda is not available here; valid choices: cpu, auto")
    else:
        device = torch.device(args.device)

    threads = args.threads or 1
    threads_before = torch.get_num_threads()
    backend_before = _current_backend()
    env_before = os.environ.get("BIO_BACKEND")
    try:
        try:
            backend_active = _apply_backend(args.backend, device)
        except ValueError as exc:
            parser.error(f"argument --backend: {exc} (valid choices: {', '.join(BACKENDS)})")
        try:
            data = load_idx_dir(args.data_dir) if args.data_dir else load_digits_split()
        except DataError as exc:
            parser.error(f"argument --data-dir: {exc}")
        torch.set_num_threads(threads)

        out = _out_dir(args.out)
        out.mkdir(parents=True, exist_ok=True)
        n_params = sum(
            p.numel() for p in build_model(args.model, data, VARIANTS["baseline"], 0).parameters()
        )
        config: dict[str, Any] = {
            "command": [PROG, *(sys.argv[1:] if argv is None else list(argv))],
            "model": args.model,
            "num_parameters": n_params,
            "variants": {v: asdict(VARIANTS[v]) for v in variants},
            "epochs": epochs,
            "seeds": seeds,
            "batch_size": args.batch_size,
            "optimizer": f"SGD(lr={args.lr}, momentum={DEFAULT_MOMENTUM}) + cosine decay",
            "lr": args.lr,
            "momentum": DEFAULT_MOMENTUM,
            "schedule": "CosineAnnealingLR(T_max=epochs), stepped per epoch",
            "bio_config": "package defaults (BioConverter(weight_splitting_Gamma=G))",
            "dataset": data.describe(),
            "device": str(device),
            "backend_requested": args.backend,
            "backend_active": backend_active,
            "torch_threads": threads,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "platform": platform.platform(),
            "package_version": _package_version(),
            "quick": bool(args.quick),
        }
        print(
            f"{PROG}: {args.model} on {data.name} ({config['dataset']['train_size']} train / "
            f"{config['dataset']['test_size']} test), {len(variants)} variants x {seeds} seeds x "
            f"{epochs} epochs, device {device}, backend {backend_active}, {threads} threads",
            file=sys.stderr,
        )
        t0 = time.perf_counter()
        runs = run_experiment(
            data=data,
            model_name=args.model,
            variants=variants,
            epochs=epochs,
            seeds=seeds,
            batch_size=args.batch_size,
            lr=args.lr,
            momentum=DEFAULT_MOMENTUM,
            device=device,
            show_progress=not args.no_progress,
        )
        config["total_wall_seconds"] = time.perf_counter() - t0

        summary = summarize(runs)
        table = format_table(summary)
        write_json(out / "results.json", {"config": config, "runs": runs, "summary": summary})
        write_markdown(out / "results.md", table, config)
        write_plot(
            out / "curves.png",
            runs,
            f"{args.model} on {data.name}: {seeds} seed(s), {epochs} epoch(s)",
        )
    finally:
        torch.set_num_threads(threads_before)
        _restore_backend(backend_before, env_before)

    print(table)
    print(f"\nresults written to {out.resolve()} (results.json, results.md, curves.png)")
    return 0


def _package_version() -> str:
    import bio_transformations as bt

    return str(getattr(bt, "__version__", "unknown"))


if __name__ == "__main__":
    sys.exit(main())
