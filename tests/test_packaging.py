"""The built wheel (not only the editable install) ships the kernels package and py.typed."""

import pathlib
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_wheel_contains_kernels(tmp_path):
    # setuptools and wheel come with the test extra, so this builds on any Python (3.12 venvs
    # have no setuptools of their own).
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in (
        "bio_transformations/__init__.py",
        "bio_transformations/py.typed",
        "bio_transformations/ops.py",
        "bio_transformations/kernels/__init__.py",
        "bio_transformations/kernels/torch_backend.py",
        "bio_transformations/kernels/triton/__init__.py",
        "bio_transformations/kernels/triton/step.py",
        "bio_transformations/kernels/cpu_fused.py",
        "bio_transformations/kernels/settings.py",
        "bio_transformations/functional.py",
        "bio_transformations/kernels/philox.py",
        "bio_transformations/experiments/__main__.py",
        "bio_transformations/experiments/cli.py",
    ):
        assert expected in names, expected
    assert not any(n.startswith("kernels/") for n in names)  # no top-level 'kernels' package
