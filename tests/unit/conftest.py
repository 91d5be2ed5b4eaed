"""Fixtures of the profile tests (test_profiles, test_runtime_profiles, test_tiny_vae)."""

from __future__ import annotations

import pytest

from lcmq.profiles import reset_profiles


@pytest.fixture
def fresh_profiles():
    """Profiles read afresh before and after the test (lcmq.toml is cached per version)."""
    reset_profiles()
    yield
    reset_profiles()


@pytest.fixture
def config(tmp_path, monkeypatch):
    """The test's own lcmq.toml (written by the test), named by LCMQ_CONFIG."""
    path = tmp_path / "lcmq.toml"
    monkeypatch.setenv("LCMQ_CONFIG", str(path))
    return path
