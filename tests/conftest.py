"""Shared fixtures: every test gets its own cache folder and, on request, a fresh store somewhere.

Local:
    ``store_path`` / ``store``: a fresh local store under the test's ``tmp_path``.

Object storage on loopback (real servers started by the tests, DESIGN.md section 10; see ``tests/servers.py``):
    ``s3_location``: a fresh, empty bucket on a session-wide moto S3 server (reset before each test), as a
        :class:`~tests.servers.StoreLocation`: ``Store.open(loc.url, storage_options=loc.storage_options)``.
        ``loc.url`` is ``s3://<bucket>/store``, ``loc.storage_options`` holds only endpoint_url, key and secret.
    ``s3_server``: that server (:class:`~tests.servers.MotoS3Server`). ``with s3_server.stopped(): ...`` takes it
        down for the block (clients get "connection refused") and brings it back on the same port with its data.
    ``gcs_location`` / ``gcs_emulator``: the same for GCS, on an in-memory gcp-storage-emulator that enforces
        ``ifGenerationMatch`` (the bare emulator ignores it; ``gcs_emulator.enforce_preconditions = False`` shows
        that). ``loc.url`` is ``gs://<bucket>/store``.

Every backend:
    ``any_store_location``: parametrized over ``local``, ``memory``, ``s3`` and ``gcs`` (the last two marked ``s3``
        / ``gcs``, so ``-m "not gcs"`` skips them); yields a :class:`~tests.servers.StoreLocation`. A test that
        takes it runs the same flow on every backend::

            def test_roundtrip(any_store_location):
                store = Store.open(any_store_location.url, storage_options=any_store_location.storage_options)

    Servers start only when a test needs them (a local-only run starts none).

fsspec caches filesystem instances by their options, and gcsfs/s3fs instances also cache listings; the location
fixtures clear those caches before and after each test, so no test sees another's listings or a client whose
connections died with a stopped server.
"""

from __future__ import annotations

import os

# gcsfs looks for zonal/HNS buckets over gRPC on every operation unless this is off; the emulator never answers,
# so each call would wait 60 s. gcsfs reads it at import time, so it must be set before anything imports gcsfs.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from fracstore import Store
from tests.servers import (
    AWS_ACCESS_KEY_ID,
    AWS_REGION,
    AWS_SECRET_ACCESS_KEY,
    GcsEmulator,
    MotoS3Server,
    StoreLocation,
)

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


# -- object storage on loopback -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def aws_environment() -> Iterator[None]:
    """Dummy AWS credentials and region for the session (restored afterwards); a developer's own AWS profile or
    config files must never reach the tests, nor real credentials a test endpoint."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ACCESS_KEY_ID", AWS_ACCESS_KEY_ID)
        patch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET_ACCESS_KEY)
        patch.setenv("AWS_DEFAULT_REGION", AWS_REGION)
        patch.setenv("AWS_CONFIG_FILE", os.devnull)
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        for name in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL"):
            patch.delenv(name, raising=False)
        yield


@pytest.fixture(scope="session")
def _moto_session(aws_environment: None) -> Iterator[MotoS3Server]:
    server = MotoS3Server()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def s3_server(_moto_session: MotoS3Server) -> Iterator[MotoS3Server]:
    """The session's moto server, running; a test that stopped it gets it restarted at teardown."""
    _moto_session.start()
    yield _moto_session
    _moto_session.start()


def _clear_instance_caches(*class_paths: tuple[str, str]) -> None:
    import importlib

    for module, name in class_paths:
        getattr(importlib.import_module(module), name).clear_instance_cache()


@pytest.fixture
def s3_location(s3_server: MotoS3Server) -> Iterator[StoreLocation]:
    """A fresh, empty bucket on moto: ``s3://<bucket>/store``."""
    s3_server.reset()
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(bucket)
    _clear_instance_caches(("s3fs", "S3FileSystem"))
    yield s3_server.location(bucket)
    _clear_instance_caches(("s3fs", "S3FileSystem"))


@pytest.fixture(scope="session")
def _gcs_session() -> Iterator[GcsEmulator]:
    emulator = GcsEmulator()
    emulator.start()
    yield emulator
    emulator.stop()


@pytest.fixture
def gcs_emulator(_gcs_session: GcsEmulator) -> Iterator[GcsEmulator]:
    """The session's GCS emulator, running, wiped, with preconditions enforced (restored at teardown)."""
    _gcs_session.start()
    _gcs_session.wipe()
    _gcs_session.enforce_preconditions = True
    yield _gcs_session
    _gcs_session.start()
    _gcs_session.enforce_preconditions = True


@pytest.fixture
def gcs_location(gcs_emulator: GcsEmulator) -> Iterator[StoreLocation]:
    """A fresh, empty bucket on the GCS emulator: ``gs://<bucket>/store``."""
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    gcs_emulator.create_bucket(bucket)
    _clear_instance_caches(("gcsfs", "GCSFileSystem"))
    yield gcs_emulator.location(bucket)
    _clear_instance_caches(("gcsfs", "GCSFileSystem"))


@pytest.fixture
def memory_location() -> Iterator[StoreLocation]:
    """A fresh root in fsspec's process-wide memory filesystem, removed afterwards."""
    import fsspec

    root = f"fracstore-{uuid.uuid4().hex}"
    yield StoreLocation("memory", f"memory://{root}")
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{root}"):
        fs.rm(f"/{root}", recursive=True)


@pytest.fixture(
    params=["local", "memory", pytest.param("s3", marks=pytest.mark.s3), pytest.param("gcs", marks=pytest.mark.gcs)]
)
def any_store_location(request: pytest.FixtureRequest, tmp_path: Path) -> StoreLocation:
    """A fresh store location on each backend in turn (see the module docstring)."""
    if request.param == "local":
        return StoreLocation("local", str(tmp_path / "store"))
    fixture = {"memory": "memory_location", "s3": "s3_location", "gcs": "gcs_location"}[request.param]
    location: StoreLocation = request.getfixturevalue(fixture)
    return location
