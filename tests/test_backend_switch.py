"""Backend selection (docs: "Backends and kernels"): every message, ``set_backend``,
``use_backend``, ``backend_for`` and ``backend_module``, without needing a GPU."""

from __future__ import annotations

import inspect

import pytest
import torch

import bio_transformations as bt
from bio_transformations import kernels
from bio_transformations.kernels import BackendError, settings, torch_backend


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    """Each test starts from 'environment not read yet', as a fresh process does."""
    monkeypatch.delenv("BIO_BACKEND", raising=False)
    monkeypatch.setattr(settings, "_global", None)


def _no_triton(monkeypatch, error=None):
    """Pretend ``import triton`` failed (how ``_load_triton`` remembers a failure)."""
    monkeypatch.setattr(kernels, "_triton_module", None)
    monkeypatch.setattr(kernels, "_triton_import_error", error or ImportError("No module 'triton'"))


def _fake_triton(monkeypatch, interpreted: bool):
    """Pretend Triton imported, compiled (False) or under TRITON_INTERPRET=1 (True)."""
    fake = type("FakeTritonBackend", (), {"INTERPRETED": interpreted})()
    monkeypatch.setattr(kernels, "_triton_module", fake)
    monkeypatch.setattr(kernels, "_triton_import_error", None)
    return fake


# ---------------------------------------------------------------------------------------------
# Requesting a backend
# ---------------------------------------------------------------------------------------------


def test_default_is_auto():
    assert kernels.get_backend() == "auto"


@pytest.mark.parametrize(
    "value, expected", [("torch", "torch"), (" Triton ", "triton"), ("AUTO", "auto")]
)
def test_environment_is_read_once_and_normalised(monkeypatch, value, expected):
    monkeypatch.setenv("BIO_BACKEND", value)
    assert kernels.get_backend() == expected
    monkeypatch.setenv("BIO_BACKEND", "torch" if expected != "torch" else "auto")
    assert kernels.get_backend() == expected  # read once: later changes to os.environ are ignored


def test_unknown_environment_value_lists_the_valid_ones(monkeypatch):
    monkeypatch.setenv("BIO_BACKEND", "cuda")
    with pytest.raises(ValueError) as err:
        kernels.get_backend()
    assert str(err.value) == "unknown bio backend 'cuda'; valid values are: auto, triton, torch"


@pytest.mark.parametrize("name", ["cuda", "", "pytorch", "tritonn"])
def test_set_backend_rejects_unknown_names(name):
    with pytest.raises(ValueError, match="valid values are: auto, triton, torch"):
        bt.set_backend(name)
    assert kernels.get_backend() == "auto"  # a rejected name changes nothing


def test_set_backend_overrides_the_environment(monkeypatch):
    monkeypatch.setenv("BIO_BACKEND", "triton")
    bt.set_backend("torch")
    assert bt.get_backend() == "torch"
    assert bt.backend_for("cuda") == "torch"


def test_use_backend_restores_the_previous_choice_even_on_errors():
    bt.set_backend("torch")
    with bt.use_backend("auto"):
        assert bt.get_backend() == "auto"
        with bt.use_backend("triton"):
            assert bt.get_backend() == "triton"
        assert bt.get_backend() == "auto"
    assert bt.get_backend() == "torch"
    with pytest.raises(KeyError):
        with bt.use_backend("auto"):
            raise KeyError("boom")
    assert bt.get_backend() == "torch"
    with pytest.raises(ValueError):
        with bt.use_backend("gpu"):
            pass
    assert bt.get_backend() == "torch"


def test_top_level_reexports():
    assert bt.set_backend is kernels.set_backend
    assert bt.use_backend is kernels.use_backend
    assert bt.backend_for is kernels.backend_for
    assert bt.get_backend is kernels.get_backend
    assert bt.BackendError is BackendError and issubclass(BackendError, RuntimeError)
    assert kernels.BACKENDS == ("auto", "triton", "torch")


# ---------------------------------------------------------------------------------------------
# Resolving the backend for a device
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1", "meta"])
def test_torch_runs_everywhere(device, monkeypatch):
    _no_triton(monkeypatch)
    bt.set_backend("torch")
    assert bt.backend_for(device) == "torch"
    assert kernels.backend_module(device) is torch_backend


def test_auto_uses_triton_on_cuda_only(monkeypatch):
    fake = _fake_triton(monkeypatch, interpreted=False)
    assert bt.backend_for("cuda") == "triton"
    assert bt.backend_for("cuda:0") == "triton"
    assert kernels.backend_module("cuda") is fake
    assert bt.backend_for("cpu") == "torch"
    assert kernels.backend_module("cpu") is torch_backend


def test_auto_reports_what_runs_by_device_and_dtype(monkeypatch):
    """float64 has no Triton kernels, and the interpreter cannot run CUDA tensors: both run on
    torch, and backend_for says so."""
    _fake_triton(monkeypatch, interpreted=False)
    assert bt.backend_for("cuda", torch.float64) == "torch"
    assert kernels.backend_module("cuda", torch.float64) is torch_backend
    assert bt.backend_for("cuda", torch.bfloat16) == "triton"
    _fake_triton(monkeypatch, interpreted=True)
    assert bt.backend_for("cuda") == "torch"
    assert bt.backend_for("cpu") == "torch"  # auto never picks the interpreter


def test_explicit_triton_on_cuda_while_interpreting_fails_loudly(monkeypatch):
    _fake_triton(monkeypatch, interpreted=True)
    bt.set_backend("triton")
    with pytest.raises(BackendError, match="interpreter"):
        bt.backend_for("cuda")


@pytest.mark.parametrize(
    "error", [ImportError("No module named 'triton'"), RuntimeError("libcuda.so not found")]
)
def test_auto_never_fails(monkeypatch, error):
    _no_triton(monkeypatch, error)
    for device in ("cpu", "cuda"):
        assert bt.backend_for(device) == "torch"
        assert kernels.backend_module(device) is torch_backend
    assert kernels.triton_available() is False


def test_explicit_triton_without_triton_names_both_remedies(monkeypatch):
    _no_triton(monkeypatch, ImportError("No module named 'triton'"))
    bt.set_backend("triton")
    for device in ("cuda", "cpu"):
        with pytest.raises(BackendError) as err:
            bt.backend_for(device)
        message = str(err.value)
        assert "BIO_BACKEND=triton was requested but Triton cannot be imported" in message
        assert "No module named 'triton'" in message  # why it failed
        assert "pip install 'triton>=3.6'" in message  # remedy 1
        assert "BIO_BACKEND=torch" in message  # remedy 2
        with pytest.raises(BackendError):
            kernels.backend_module(device)


def test_explicit_triton_on_cpu_without_interpreter_names_both_remedies(monkeypatch):
    _fake_triton(monkeypatch, interpreted=False)
    bt.set_backend("triton")
    assert bt.backend_for("cuda") == "triton"
    with pytest.raises(BackendError) as err:
        bt.backend_for("cpu")
    message = str(err.value)
    assert message.startswith("BIO_BACKEND=triton cannot run on cpu tensors.")
    assert "Move the model to a CUDA device" in message  # remedy 1
    assert "TRITON_INTERPRET=1" in message  # remedy 2
    assert "BIO_BACKEND=torch" in message


def test_explicit_triton_on_cpu_with_interpreter(monkeypatch):
    fake = _fake_triton(monkeypatch, interpreted=True)
    with bt.use_backend("triton"):
        assert bt.backend_for("cpu") == "triton"
        assert kernels.backend_module("cpu") is fake


def test_interpreter_flag_comes_from_the_imported_backend(monkeypatch):
    """Triton fixes interpretation when it decorates the kernels; a later change of the
    environment variable must not make backend_for promise what the kernels cannot do."""
    _fake_triton(monkeypatch, interpreted=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels._interpreting() is False
    _fake_triton(monkeypatch, interpreted=True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert kernels._interpreting() is True


def test_real_triton_backend_matches_this_process():
    """In this test process (conftest.py) Triton interprets wherever CUDA is absent."""
    triton_backend = pytest.importorskip("bio_transformations.kernels.triton")
    assert kernels.triton_available()
    if not torch.cuda.is_available():
        assert triton_backend.INTERPRETED
    with bt.use_backend("triton"):
        device = "cpu" if triton_backend.INTERPRETED else "cuda"
        assert bt.backend_for(device) == "triton"
        assert kernels.backend_module(device) is triton_backend


def test_both_backends_define_every_op_with_the_same_signature():
    triton_backend = pytest.importorskip("bio_transformations.kernels.triton")
    for name in kernels.OPS:
        ours, reference = getattr(triton_backend, name), getattr(torch_backend, name)
        assert list(inspect.signature(ours).parameters) == list(
            inspect.signature(reference).parameters
        ), name


def test_cpu_fused_defines_every_op_with_the_same_signature():
    from bio_transformations.kernels import cpu_fused

    for name in kernels.OPS:
        ours, reference = getattr(cpu_fused, name), getattr(torch_backend, name)
        assert list(inspect.signature(ours).parameters) == list(
            inspect.signature(reference).parameters
        ), name
