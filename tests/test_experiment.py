"""Tests of the experiment entry point (``python -m bio_transformations.experiment``).

Kept fast (a few seconds): the smoke runs use ``--quick`` (one epoch, one seed) on the bundled
8x8 digits or on a tiny IDX folder written here.
"""

from __future__ import annotations

import gzip
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from bio_transformations import experiment  # noqa: E402
from bio_transformations.experiment_data import (  # noqa: E402
    IDX_FILES,
    DataError,
    load_idx_dir,
    read_idx,
)
from bio_transformations.experiment_report import summarize  # noqa: E402

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


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 IDX file (gzip-compressed when the name ends in .gz)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


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


def _check_outputs(out: Path, variants: list[str], epochs: int) -> dict:
    """The three files exist, the PNG is a PNG, every JSON number is finite."""
    for name in ("results.json", "results.md", "curves.png"):
        assert (out / name).is_file(), name
    assert (out / "curves.png").read_bytes()[:8] == PNG_MAGIC
    payload = json.loads((out / "results.json").read_text())
    assert set(payload) == {"config", "runs", "summary"}
    assert list(payload["runs"]) == variants
    for records in payload["runs"].values():
        for rec in records:
            for key in ("train_loss", "test_loss", "test_acc", "epoch_seconds", "bio_seconds"):
                assert len(rec[key]) == epochs
    numbers = _all_numbers(payload["runs"]) + _all_numbers(payload["summary"])
    assert numbers and all(math.isfinite(x) for x in numbers)
    for s in payload["summary"].values():
        assert 0.0 <= s["final_test_acc_mean"] <= 1.0
    md = (out / "results.md").read_text()
    for v in variants:
        assert f"| {v} " in md
    return payload


def test_quick_smoke(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    rc = experiment.main(["--quick", "--out", str(out), "--no-progress"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "test acc" in stdout and str(out.resolve()) in stdout
    variants = list(experiment.QUICK_VARIANTS)
    for v in variants:
        assert f"| {v} " in stdout
    payload = _check_outputs(out, variants, epochs=1)
    assert payload["config"]["epochs"] == 1 and payload["config"]["seeds"] == 1
    # Bio variants spent measurable time in bio calls; the baseline makes none.
    assert payload["summary"]["baseline"]["bio_seconds_per_run_mean"] == 0.0
    assert payload["summary"]["all"]["bio_seconds_per_run_mean"] > 0.0


def test_quick_on_fake_idx_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data_dir = _fake_mnist(tmp_path / "mnist")
    out = tmp_path / "run"
    argv = ["--quick", "--data-dir", str(data_dir), "--out", str(out), "--no-progress"]
    argv += ["--variants", "baseline,split2", "--model", "cnn", "--epochs", "2"]
    assert experiment.main(argv) == 0
    capsys.readouterr()
    payload = _check_outputs(out, ["baseline", "split2"], epochs=2)
    assert payload["config"]["dataset"]["train_size"] == 40


def test_fake_idx_folder_loads(tmp_path: Path) -> None:
    data = load_idx_dir(_fake_mnist(tmp_path / "mnist", n_train=30, n_test=12, size=5))
    assert tuple(data.x_train.shape) == (30, 1, 5, 5)
    assert tuple(data.x_test.shape) == (12, 1, 5, 5)
    assert data.y_train.tolist() == [i % 10 for i in range(30)]
    assert float(data.x_train.min()) >= 0.0 and float(data.x_train.max()) <= 1.0
    assert data.num_classes == 10


def test_idx_dotted_names_and_bad_magic(tmp_path: Path) -> None:
    # Some mirrors name the files "train-images.idx3-ubyte"; accept that spelling too.
    folder = _fake_mnist(tmp_path / "a")
    for f in list(folder.iterdir()):
        f.rename(folder / f.name.replace("-idx", ".idx"))
    assert load_idx_dir(folder).x_train.shape[0] == 40
    bad = tmp_path / "bad.idx"
    bad.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(DataError, match="bad magic"):
        read_idx(bad)
    truncated = tmp_path / "short.idx"
    truncated.write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"\x00" * 3)
    with pytest.raises(DataError, match="data bytes"):
        read_idx(truncated)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--variants", "fuzzy,bogus"], ["'bogus'", *experiment.VARIANTS]),
        (["--variants", ","], list(experiment.VARIANTS)),
        (["--backend", "cuda9"], ["'auto'", "'torch'", "'triton'"]),
        (["--model", "resnet"], ["'mlp'", "'cnn'"]),
        (["--epochs", "0"], ["--epochs", "positive integer"]),
        (["--epochs", "-2"], ["--epochs", "positive integer"]),
        (["--epochs", "many"], ["--epochs", "positive integer"]),
        (["--seeds", "0"], ["--seeds", "positive integer"]),
        (["--seeds", "-1"], ["--seeds", "positive integer"]),
    ],
)
def test_argument_errors(
    argv: list[str], expected: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        experiment.main(argv)
    assert exc.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert "\n" not in err, "the error must be one line"
    for text in expected:
        assert text in err


def test_data_dir_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    names = list(IDX_FILES.values())
    empty = tmp_path / "empty"
    empty.mkdir()
    partial = _fake_mnist(tmp_path / "partial")
    (partial / (IDX_FILES["test_labels"])).unlink()
    cases = [
        (tmp_path / "missing", "does not exist", names),
        (empty, "is empty", names),
        (partial, "lacks t10k-labels-idx1-ubyte", names),
    ]
    for folder, reason, expected in cases:
        with pytest.raises(SystemExit) as exc:
            experiment.main(["--data-dir", str(folder), "--out", str(tmp_path / "o")])
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "--data-dir" in err and reason in err
        for name in expected:
            assert name in err
    assert not (tmp_path / "o").exists(), "no output before the data is known to be good"


def test_module_entry_point_exit_code(tmp_path) -> None:
    """``python -m bio_transformations.experiment`` exits 2 with a one-line message."""
    proc = subprocess.run(
        [sys.executable, "-m", "bio_transformations.experiment", "--variants", "nope"],
        cwd=tmp_path,  # not the checkout: its folder would shadow a non-editable install
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    err = proc.stderr.strip()
    assert "\n" not in err and "'nope'" in err and "fuzzy+crystal" in err


def test_summary_threshold_and_never() -> None:
    def rec(seed: int, acc: list[float]) -> dict:
        n = len(acc)
        return {
            "seed": seed,
            "test_acc": acc,
            "test_loss": [1.0] * n,
            "train_loss": [1.0] * n,
            "epoch_seconds": [0.5] * n,
            "bio_seconds": [0.1] * n,
        }

    runs = {
        "baseline": [rec(0, [0.5, 0.9, 1.0]), rec(1, [0.95, 1.0, 1.0])],
        "slow": [rec(0, [0.1, 0.2, 0.3]), rec(1, [0.1, 0.5, 0.95])],
    }
    s = summarize(runs)
    assert s["baseline"]["threshold_acc"] == pytest.approx(0.9)
    assert s["baseline"]["epochs_to_threshold"] == [2, 1]
    assert s["baseline"]["epochs_to_threshold_mean"] == pytest.approx(1.5)
    assert s["slow"]["epochs_to_threshold"] == [None, 3]
    assert s["slow"]["seeds_reaching_threshold"] == 1
    assert s["slow"]["delta_acc_vs_baseline"] == pytest.approx(0.625 - 1.0)
    assert s["slow"]["bio_fraction_of_train_time"] == pytest.approx(0.2)
    no_base = summarize({"slow": runs["slow"]})
    assert no_base["slow"]["epochs_to_threshold"] is None
