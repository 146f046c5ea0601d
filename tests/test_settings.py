"""The settings object: read from the environment once, overridable per thread."""

import threading

import pytest

from bio_transformations import kernels
from bio_transformations.kernels import settings


def test_override_changes_only_the_named_fields():
    with settings.override(rng="philox"):
        kernels.set_backend("torch")  # process-wide, inside an override of another field
        assert settings.current().backend == "torch"
        assert settings.current().rng == "philox"
        with settings.override(cpu_fused=True):  # nested overrides merge
            assert settings.current() == settings.Settings("torch", "philox", True)
        assert settings.current().cpu_fused is False
    assert settings.current().rng == "torch"
    assert settings.current().backend == "torch"


def test_override_validates_before_entering():
    with pytest.raises(ValueError, match="valid values are: torch, philox"):
        with settings.override(rng="bogus"):
            pass
    assert settings.current().rng == "torch"


def test_override_does_not_leak_into_other_threads():
    seen = {}
    inside, done = threading.Event(), threading.Event()

    def other():
        inside.wait(10)
        seen["other"] = settings.current().rng
        done.set()

    thread = threading.Thread(target=other)
    thread.start()
    with settings.override(rng="philox"):
        inside.set()
        done.wait(10)
        seen["here"] = settings.current().rng
    thread.join(10)
    assert seen == {"other": "torch", "here": "philox"}


def test_environment_is_read_once(monkeypatch):
    monkeypatch.setenv("BIO_RNG", "philox")
    monkeypatch.setattr(settings, "_global", None)  # as a fresh process
    assert settings.current().rng == "philox"
    monkeypatch.setenv("BIO_RNG", "torch")
    assert settings.current().rng == "philox"  # later changes to os.environ are ignored
    settings.configure()  # ... until the environment is re-read explicitly
    assert settings.current().rng == "torch"
