"""Shared fixtures: every test gets its own cache folder and, on request, a fresh local store."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from fracstore import Store

# Timing on a shared 2-core machine varies several-fold: no deadlines, bounded example counts.
settings.register_profile(
    "ci", deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow], database=None
)
settings.register_profile("dev", deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point FRACSTORE_CACHE_DIR (and XDG folders) at a fresh folder so no test sees the user's cache or another
    test's replay state."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("FRACSTORE_CACHE_DIR", str(cache))
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache / "xdg-cache"))
    monkeypatch.setenv("XDG_DATA_HOME", str(cache / "xdg-data"))
    return cache


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    """Where the test's local store lives."""
    return tmp_path / "store"


@pytest.fixture
def store(store_path: Path) -> Iterator[Store]:
    """A fresh local store."""
    yield Store.open(store_path)
