"""Tests of the experiment (``python -m bio_transformations.experiments``).

Kept fast: one ``--quick`` run shared by the output checks, small attacks, tiny data files
written here in the MNIST IDX and CIFAR-10 pickle formats (no network).
"""

from __future__ import annotations

import ast
import copy
import gzip
import json
import math
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
pytest.importorskip("scipy")
pytest.importorskip("mnist1d")

from bio_transformations.experiments import cli  # noqa: E402
from bio_transformations.experiments.data import (  # noqa: E402
    CIFAR10_FILES,
    IDX_FILES,
    DataError,
    load_cifar10_dir,
    load_digits_split,
    load_mnist_dir,
    read_cifar10_batch,
    read_idx,
)
from bio_transformations.experiments.inversion import (  # noqa: E402
    AttackConfig,
    analytic_attack,
    gradient_matching_attack,
    match_and_score,
    shared_update,
)
from bio_transformations.experiments.models import VARIANTS, build_model  # noqa: E402
from bio_transformations.experiments.report import (  # noqa: E402
    summarize_inversion,
    summarize_learning,
)
from bio_transformations.experiments.training import scale_gradients  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _all_numbers(obj: object) -> list[float]:
    """Every int/float inside a JSON structure (bools excluded)."""
    if isinstance(obj, bool):
        return []
    if isinstance(obj, (int, float)):
        return [float(obj)]
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _all_numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _all_numbers(v)]
    return []


# ---------------------------------------------------------------------------------------------
# One quick run, checked from several sides
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("quick") / "run"
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(["--quick", "--out", str(out), "--no-progress", "--jobs", "1"])
    assert rc == 0
    return out, buf.getvalue()


def test_quick_outputs(quick_run: tuple[Path, str]) -> None:
    out, stdout = quick_run
    for name in cli.OUTPUT_FILES:
        assert (out / name).is_file(), name
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert str(out.resolve()) in stdout and "Gradient inversion" in stdout
    payload = json.loads((out / "results.json").read_text())
    assert set(payload) == {"config", "learning", "inversion"}
    numbers = _all_numbers(payload)
    assert numbers and all(math.isfinite(x) for x in numbers)
    variants = list(cli.QUICK["variants"])
    summary = payload["learning"]["summary"]["fcnet:tuned"]
    assert list(summary) == variants
    for v in variants:
        s = summary[v]
        assert 0.0 <= s["final_test_acc_mean"] <= 1.0
        assert len(s["final_test_acc"]) == cli.QUICK["seeds"]
        assert s["run_seconds_mean"] > 0 and s["run_cpu_seconds_mean"] > 0
        assert (s["p_welch_vs_baseline"] is None) == (v == "baseline")
    md = (out / "results.md").read_text()
    for v in variants:
        assert f"| {v} " in md and f"| {v} " in stdout


def test_quick_inversion_rows(quick_run: tuple[Path, str]) -> None:
    out, _ = quick_run
    inv = json.loads((out / "results.json").read_text())["inversion"]
    rows = {(r["variant"], r["attack"], r["batch"], r["state"], r["attacker"]): r
            for r in inv["attacks"]}  # fmt: skip
    for state in ("init", "trained"):
        # The analytic attack recovers the plain baseline's input exactly.
        assert rows[("baseline", "analytic", 1, state, "blind")]["mse_mean"] < 1e-8
        # Fuzzy rates scale the gradient by private factors: an informed row exists, the
        # baseline (no private factors) has only the blind one.
        assert ("fuzzy", "gradient_matching", 4, state, "informed") in rows
        assert ("baseline", "gradient_matching", 4, state, "informed") not in rows
    checks = {(c["attack"], c["state"]): c for c in inv["baseline_checks"]}
    assert checks[("analytic", "init")]["reconstructs_baseline"] is True
    n_targets = cli.QUICK["inversion_targets"]
    assert all(len(r["mse"]) == n_targets for r in inv["attacks"])


# ---------------------------------------------------------------------------------------------
# The threat model and the attacks
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_digits_split()


def _model(digits, variant: str):
    return build_model("fcnet", digits.sample_shape, 10, VARIANTS[variant], 0)


def test_shared_update_is_plain_gradient_times_private_factors(digits) -> None:
    model = _model(digits, "all")
    rates = model.fc1.bio_mod.fuzzy_learning_rate_parameters.clone()
    step = int(model.fc1.bio_mod._rng_step)
    x, y = digits.x_test[:2], digits.y_test[:2]
    shared, factors = shared_update(model, VARIANTS["all"], x, y)
    # The client's model is left as it was.
    assert torch.equal(model.fc1.bio_mod.fuzzy_learning_rate_parameters, rates)
    assert int(model.fc1.bio_mod._rng_step) == step
    assert torch.equal(factors["fc1.bias"], torch.ones_like(factors["fc1.bias"]))
    # Fuzzy alone: the factors of the weights are exactly the private rates.
    fuzzy = _model(digits, "fuzzy")
    _, f = shared_update(fuzzy, VARIANTS["fuzzy"], x, y)
    assert torch.equal(f["fc1.weight"], fuzzy.fc1.bio_mod.fuzzy_learning_rate_parameters)
    # The shared update is what the training loop's own calls produce.
    client = copy.deepcopy(model)
    F.cross_entropy(client(x), y).backward()
    scale_gradients(client, VARIANTS["all"])
    for name, p in client.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, shared[name], rtol=0, atol=0)


def test_analytic_attack_exact_on_plain_and_informed(digits) -> None:
    x, y = digits.x_test[3:4], digits.y_test[3:4]
    plain, _ = shared_update(_model(digits, "baseline"), VARIANTS["baseline"], x, y)
    assert torch.allclose(analytic_attack(plain), x.flatten(), atol=1e-5)
    split, _ = shared_update(_model(digits, "split2"), VARIANTS["split2"], x, y)
    assert torch.allclose(analytic_attack(split), x.flatten(), atol=1e-5)
    shared, factors = shared_update(_model(digits, "fuzzy"), VARIANTS["fuzzy"], x, y)
    assert torch.allclose(analytic_attack(shared, factors), x.flatten(), atol=1e-5)
    assert not torch.allclose(analytic_attack(shared), x.flatten(), atol=1e-3)


def test_gradient_matching_reconstructs_from_plain_baseline(digits) -> None:
    """The attack works on the plain network (so a higher error for a variant means
    something): far below the error of guessing the mean image."""
    x, y = digits.x_test[:1], digits.y_test[:1]
    model = _model(digits, "baseline")
    shared, _ = shared_update(model, VARIANTS["baseline"], x, y)
    recon, loss = gradient_matching_attack(
        model, [shared], y.view(1, 1), digits.sample_shape, AttackConfig(iterations=80, restarts=1)
    )
    mse = match_and_score(recon[0], x)[0][0]
    guess = float(((x - digits.x_train.mean(0)) ** 2).mean())
    assert mse < 0.1 * guess, (mse, guess)
    assert float(loss[0]) < 0.05


def test_match_and_score_pairs_each_input_once() -> None:
    truth = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])
    recon = torch.stack([torch.full((1, 2, 2), 0.9), torch.full((1, 2, 2), 0.1)])
    mses, ordered = match_and_score(recon, truth)
    assert mses == pytest.approx([0.01, 0.01])
    assert torch.equal(ordered[0], recon[1])


# ---------------------------------------------------------------------------------------------
# Data files (written here in the standard formats; no network)
# ---------------------------------------------------------------------------------------------


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 IDX file (gzip-compressed when the name ends in .gz)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def _fake_mnist(folder: Path, n_train: int = 40, n_test: int = 20, size: int = 8) -> Path:
    """A tiny MNIST-style folder: random images, labels 0..9; images gzipped, labels not."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        _write_idx(folder / (IDX_FILES[f"{split}_images"] + ".gz"), images)
        _write_idx(folder / IDX_FILES[f"{split}_labels"], labels)
    return folder


def _fake_cifar(folder: Path, per_batch: int = 6) -> Path:
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    for name in CIFAR10_FILES:
        batch = {
            b"data": rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8),
            b"labels": [int(i % 10) for i in range(per_batch)],
            b"batch_label": name.encode(),
        }
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh)
    return folder


def test_mnist_idx_folder_loads(tmp_path: Path) -> None:
    data = load_mnist_dir(_fake_mnist(tmp_path / "mnist", n_train=30, n_test=12, size=5))
    assert tuple(data.x_train.shape) == (30, 1, 5, 5)
    assert tuple(data.x_test.shape) == (12, 1, 5, 5)
    assert data.y_train.tolist() == [i % 10 for i in range(30)]
    assert float(data.x_train.min()) >= 0.0 and float(data.x_train.max()) <= 1.0
    # torchvision's layout: <root>/MNIST/raw
    _fake_mnist(tmp_path / "tv" / "MNIST" / "raw")
    assert load_mnist_dir(tmp_path / "tv").x_train.shape[0] == 40


def test_idx_dotted_names_and_bad_magic(tmp_path: Path) -> None:
    folder = _fake_mnist(tmp_path / "a")
    for f in list(folder.iterdir()):
        f.rename(folder / f.name.replace("-idx", ".idx"))
    assert load_mnist_dir(folder).x_train.shape[0] == 40
    bad = tmp_path / "bad.idx"
    bad.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="bad magic"):
        read_idx(bad)
    truncated = tmp_path / "short.idx"
    truncated.write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"\x00" * 3)
    with pytest.raises(DataError, match="data bytes"):
        read_idx(truncated)


def test_cifar10_batches_load(tmp_path: Path) -> None:
    data = load_cifar10_dir(_fake_cifar(tmp_path / "cifar-10-batches-py"))
    assert tuple(data.x_train.shape) == (30, 3, 32, 32)
    assert tuple(data.x_test.shape) == (6, 3, 32, 32)
    assert data.y_test.tolist() == list(range(6))
    assert float(data.x_train.max()) <= 1.0
    assert load_cifar10_dir(tmp_path).x_train.shape[0] == 30  # torchvision's layout


def test_cifar10_reader_refuses_foreign_objects(tmp_path: Path) -> None:
    evil = tmp_path / "data_batch_1"
    evil.write_bytes(pickle.dumps({b"data": Path("x"), b"labels": []}))
    with pytest.raises(DataError, match="not allowed"):
        read_cifar10_batch(evil)


def test_quick_on_fake_mnist_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = _fake_mnist(tmp_path / "mnist")
    out = tmp_path / "run"
    argv = ["--quick", "--dataset", "mnist", "--data-dir", str(data_dir), "--out", str(out)]
    argv += ["--no-progress", "--no-inversion", "--variants", "baseline,split2", "--seeds", "1"]
    argv += ["--setups", "cnn:sgd", "--jobs", "1"]
    assert cli.main(argv) == 0
    capsys.readouterr()
    payload = json.loads((out / "results.json").read_text())
    assert payload["config"]["dataset"]["train_size"] == 40
    assert list(payload["learning"]["summary"]["cnn:sgd"]) == ["baseline", "split2"]


# ---------------------------------------------------------------------------------------------
# Command line errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--variants", "fuzzy,bogus"], ["'bogus'", *VARIANTS]),
        (["--variants", ","], list(VARIANTS)),
        (["--setups", "resnet:sgd"], ["'resnet:sgd'", "fcnet:sgd", "cnn:tuned"]),
        (["--backend", "cuda9"], ["'auto'", "'torch'", "'triton'"]),
        (["--dataset", "imagenet"], ["'mnist1d'", "'cifar10'"]),
        (["--epochs", "0"], ["--epochs", "positive integer"]),
        (["--epochs", "many"], ["--epochs", "positive integer"]),
        (["--seeds", "-1"], ["--seeds", "positive integer"]),
        (["--inversion-targets", "6"], ["--inversion-targets", "multiple of 4"]),
        (["--dataset", "mnist"], ["--data-dir", "needs a data folder"]),
    ],
)
def test_argument_errors(
    argv: list[str], expected: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert "\n" not in err, "the error must be one line"
    for text in expected:
        assert text in err


def test_data_dir_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    partial = _fake_mnist(tmp_path / "partial")
    (partial / IDX_FILES["test_labels"]).unlink()
    cases = [
        ("mnist", tmp_path / "missing", "does not exist", list(IDX_FILES.values())),
        ("mnist", empty, "is empty", list(IDX_FILES.values())),
        ("mnist", partial, "lacks t10k-labels-idx1-ubyte", list(IDX_FILES.values())),
        ("cifar10", partial, "lacks data_batch_1", list(CIFAR10_FILES)),
    ]
    for dataset, folder, reason, expected in cases:
        with pytest.raises(SystemExit) as exc:
            cli.main(
                ["--dataset", dataset, "--data-dir", str(folder), "--out", str(tmp_path / "o")]
            )
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "--data-dir" in err and reason in err
        for name in expected:
            assert name in err
    assert not (tmp_path / "o").exists(), "no output before the data is known to be good"


def test_module_entry_point_exit_code(tmp_path) -> None:
    """``python -m bio_transformations.experiments`` exits 2 with a one-line message."""
    proc = subprocess.run(
        [sys.executable, "-m", "bio_transformations.experiments", "--variants", "nope"],
        cwd=tmp_path,  # not the checkout: its folder would shadow a non-editable install
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    err = proc.stderr.strip()
    assert "\n" not in err and "'nope'" in err and "crystal" in err


# ---------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------


def _rec(seed: int, acc: list[float], train: float = 1.0) -> dict:
    n = len(acc)
    return {
        "seed": seed,
        "test_acc": acc,
        "train_acc": [train] * n,
        "test_loss": [1.0] * n,
        "train_loss": [1.0] * n,
        "epoch_seconds": [0.5] * n,
        "run_seconds": 0.5 * n,
        "run_cpu_seconds": 0.4 * n,
    }


def test_learning_summary_threshold_gap_and_welch() -> None:
    runs = {
        "baseline": [_rec(0, [0.5, 0.9, 1.0]), _rec(1, [0.95, 1.0, 0.98])],
        "slow": [_rec(0, [0.1, 0.2, 0.3], 0.5), _rec(1, [0.1, 0.5, 0.95], 0.95)],
    }
    s = summarize_learning(runs)
    assert s["baseline"]["threshold_acc"] == pytest.approx(0.9 * 0.99)
    assert s["baseline"]["epochs_to_threshold"] == [2, 1]
    assert s["slow"]["epochs_to_threshold"] == [None, 3]
    assert s["slow"]["seeds_reaching_threshold"] == 1
    assert s["slow"]["delta_acc_vs_baseline"] == pytest.approx(0.625 - 0.99)
    assert s["slow"]["train_test_gap"] == pytest.approx([0.2, 0.0])
    from scipy.stats import ttest_ind

    expected = ttest_ind([0.3, 0.95], [1.0, 0.98], equal_var=False).pvalue
    assert s["slow"]["p_welch_vs_baseline"] == pytest.approx(expected)
    assert s["baseline"]["p_welch_vs_baseline"] is None
    assert summarize_learning({"slow": runs["slow"]})["slow"]["epochs_to_threshold"] is None


def test_inversion_ratio_uses_matching_baseline_row() -> None:
    def row(variant: str, attacker: str, mses: list[float]) -> dict:
        return {"variant": variant, "attack": "gradient_matching", "batch": 1, "state": "init",
                "attacker": attacker, "mse": mses, "mse_mean": float(np.mean(mses))}  # fmt: skip

    rows = summarize_inversion(
        [
            row("baseline", "blind", [0.01, 0.03]),
            row("fuzzy", "blind", [0.04, 0.04]),
            row("fuzzy", "informed", [0.02, 0.02]),
        ]  # fmt: skip
    )
    assert rows[1]["mse_ratio_vs_baseline"] == pytest.approx(2.0)
    assert rows[2]["mse_ratio_vs_baseline"] == pytest.approx(1.0)
    assert rows[0]["p_welch_vs_baseline"] is None


def test_experiment_dependencies_only_in_the_subpackage() -> None:
    """numpy, scipy, scikit-learn, matplotlib, tqdm and mnist1d are imported only inside
    bio_transformations/experiments (the library runs without the extra)."""
    extra = {"numpy", "scipy", "sklearn", "matplotlib", "tqdm", "mnist1d", "torchvision"}
    offenders = []
    for path in list((ROOT / "bio_transformations").rglob("*.py")) + list(
        (ROOT / "kernels").rglob("*.py")
    ):
        if "experiments" in path.relative_to(ROOT).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path}: {n}" for n in names if n.split(".")[0] in extra]
    assert offenders == []


def test_option_variants_dale_and_activity_train(digits) -> None:
    """The optional variants run through the same training step: Dale keeps every hidden
    weight's sign, activity-dependent rates stay a per-weight factor of the shared update."""
    from bio_transformations.experiments.data import Dataset
    from bio_transformations.experiments.training import OPTIMIZERS, train_one

    small = Dataset("small", digits.x_train[:200], digits.y_train[:200], digits.x_test[:50],
                    digits.y_test[:50], 10)  # fmt: skip
    for name in ("dale", "activity"):
        model = _model(digits, name)
        rec = train_one(model, VARIANTS[name], small, model_name="fcnet",
                        optimizer=OPTIMIZERS["sgd"], epochs=1, seed=0,
                        device=torch.device("cpu"))  # fmt: skip
        assert math.isfinite(rec["train_loss"][0])
        if name == "dale":
            sign = model.fc1.bio_mod.sign.view(-1, 1)
            assert bool((model.fc1.weight * sign >= 0).all())
        else:
            shared, factors = shared_update(model, VARIANTS[name], digits.x_test[:1],
                                            digits.y_test[:1])  # fmt: skip
            assert not torch.equal(factors["fc1.weight"], torch.ones_like(factors["fc1.weight"]))
