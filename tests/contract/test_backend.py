"""One backend contract, run unchanged over every backend: a local folder, a ``file://`` URL, ``memory://``, S3 (moto)
and GCS (the emulator, with ``ifGenerationMatch`` enforced; tests/servers.py). The object-store cases are marked
``s3`` / ``gcs``."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fracstore.backend import Backend, redact_url
from fracstore.errors import ConfigError, FracstoreError, NotFoundError, StorageError, UnsupportedBackendError
from tests.faults import FaultyBackend
from tests.servers import GcsEmulator, MotoS3Server, StoreLocation

BACKENDS = [
    "local",
    "file-url",
    "memory",
    pytest.param("s3", marks=pytest.mark.s3),
    pytest.param("gcs", marks=pytest.mark.gcs),
]
# A refused connection on loopback is known at once. A few retries are fine (botocore's legacy policy alone may
# sleep up to 15 s in all); half a minute of backoff per call is not.
UNREACHABLE_WITHIN_S = 15.0


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "local":
        return Backend.from_url(str(tmp_path / "b"))
    if request.param == "file-url":
        return Backend.from_url(f"file://{tmp_path / 'b'}")
    fixture = {"memory": "memory_location", "s3": "s3_location", "gcs": "gcs_location"}[request.param]
    location: StoreLocation = request.getfixturevalue(fixture)
    return Backend.from_url(location.url, storage_options=location.storage_options)


def test_put_if_absent_creates_once_and_keeps_the_first(backend: Backend) -> None:
    assert backend.put_if_absent("a/b/key", b"first")
    assert not backend.put_if_absent("a/b/key", b"second")
    assert backend.read("a/b/key") == b"first"
    assert backend.size("a/b/key") == 5


def test_put_if_absent_accepts_chunks(backend: Backend) -> None:
    assert backend.put_if_absent("k", [b"ab", memoryview(b"cd"), bytearray(b"e")])
    assert backend.read("k") == b"abcde"


def test_an_empty_object_is_an_object(backend: Backend) -> None:
    assert backend.put_if_absent("empty", b"")
    assert backend.exists("empty")
    assert backend.size("empty") == 0
    assert backend.read("empty") == b""
    assert not backend.put_if_absent("empty", b"not empty any more")
    assert backend.read("empty") == b""


def test_racing_creates_have_exactly_one_winner(backend: Backend) -> None:
    barrier = threading.Barrier(8)
    wins: list[bytes] = []
    errors: list[BaseException] = []

    def race(i: int) -> None:
        payload = f"writer-{i}".encode() * 1000
        barrier.wait()
        try:
            if backend.put_if_absent("race", payload):
                wins.append(payload)
        except BaseException as exc:  # a thread's error must fail the test, not vanish with the thread
            errors.append(exc)

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors
    assert len(wins) == 1
    assert backend.read("race") == wins[0]


def test_missing_keys_raise_not_found(backend: Backend) -> None:
    with pytest.raises(NotFoundError) as info:
        backend.read("nope")
    assert isinstance(info.value, LookupError)
    assert info.value.what == "nope"
    assert info.value.store == backend.url
    with pytest.raises(NotFoundError):
        backend.read("deep/er/nope")
    with pytest.raises(NotFoundError):
        backend.read_range("nope", 0, 1)
    with pytest.raises(NotFoundError):  # noqa: SIM117 - the error may come from open_read or from entering it
        with backend.open_read("nope") as handle:
            handle.read()
    with pytest.raises(NotFoundError):
        backend.size("nope")
    assert not backend.exists("nope")
    assert backend.delete("nope") is False
    assert backend.list("nothing/") == []


def test_read_range_list_overwrite_delete(backend: Backend) -> None:
    backend.put_if_absent("d/x/1", b"0123456789")
    backend.put_if_absent("d/y", b"y")
    backend.put_if_absent("other", b"o")
    assert backend.read_range("d/x/1", 2, 5) == b"234"
    with backend.open_read("d/x/1") as handle:
        assert handle.read(3) == b"012"
    assert backend.list("d/") == ["d/x/1", "d/y"]
    backend.put_overwrite("meta", b"v1")
    backend.put_overwrite("meta", b"v2")
    assert backend.read("meta") == b"v2"
    assert backend.delete("d/y") is True
    assert backend.list("d/") == ["d/x/1"]


def test_reads_return_exactly_the_bytes_written(backend: Backend) -> None:
    data = os.urandom(300_000)
    backend.put_if_absent("blob", data)
    assert backend.size("blob") == len(data)
    assert backend.read("blob") == data
    assert backend.read_range("blob", 0, len(data)) == data
    assert backend.read_range("blob", len(data) - 8, len(data)) == data[-8:]
    assert backend.read_range("blob", 100_000, 100_001) == data[100_000:100_001]
    with backend.open_read("blob") as handle:
        streamed = b"".join(iter(lambda: handle.read(65_536), b""))
    assert streamed == data


def test_listing_is_sorted_stays_under_its_prefix_and_skips_temp_files(backend: Backend) -> None:
    for key in ("d/b", "d/a/2", "d/a/10", "d/c/.tmp-abc", "dx/sibling", "d.txt", "e/other"):
        backend.put_overwrite(key, b"x")
    assert backend.list("d/") == ["d/a/10", "d/a/2", "d/b"]  # plain string order, nested keys included
    assert backend.list("d/a/") == ["d/a/10", "d/a/2"]
    assert backend.list("e/") == ["e/other"]
    assert backend.list("d/c/") == []


def test_exists_and_delete(backend: Backend) -> None:
    backend.put_if_absent("gone/soon", b"data")
    assert backend.exists("gone/soon")
    assert backend.delete("gone/soon") is True
    assert not backend.exists("gone/soon")
    with pytest.raises(NotFoundError):
        backend.read("gone/soon")
    assert backend.delete("gone/soon") is False
    assert backend.put_if_absent("gone/soon", b"again")  # a deleted key can be created anew
    assert backend.read("gone/soon") == b"again"


def test_invalid_keys_are_refused(backend: Backend) -> None:
    for key in ("", "/abs", "a/../b", "a//b", "./a", "a/\x00"):
        with pytest.raises(StorageError):
            backend.read(key)
        with pytest.raises(StorageError):
            backend.put_if_absent(key, b"x")


def test_a_failing_chunk_source_creates_nothing(backend: Backend) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"partial"
        raise RuntimeError("producer died")

    with pytest.raises(StorageError, match="producer died") as info:
        backend.put_if_absent("x/y", chunks())
    assert isinstance(info.value.__cause__, RuntimeError)
    assert not backend.exists("x/y")
    assert backend.list("x/") == []
    assert backend.put_if_absent("x/y", b"whole")  # the failed attempt did not take the key


def test_probe_passes_on_atomic_backends(backend: Backend) -> None:
    assert backend.atomic_create
    backend.probe_atomic_create()
    assert backend.list("probe/") == []  # the probe cleans up after itself


def test_a_backend_that_silently_overwrites_is_refused(backend: Backend) -> None:
    faulty = FaultyBackend(backend)
    overwrite = faulty.overwrite_on_create()
    with pytest.raises(UnsupportedBackendError, match="silently overwrote"):
        faulty.probe_atomic_create()
    assert overwrite.fired == 2  # both of the probe's creates "succeeded"
    assert backend.list("probe/") == []


# -- local disk only ----------------------------------------------------------------------------------------------


def test_local_creates_are_read_only_and_leave_no_temp_files(tmp_path: Path) -> None:
    backend = Backend.from_url(str(tmp_path / "b"))
    backend.put_if_absent("x/y", b"data")
    path = tmp_path / "b" / "x" / "y"
    assert path.stat().st_mode & 0o777 == 0o444
    assert os.listdir(path.parent) == ["y"]


def test_a_failing_chunk_source_leaves_nothing_behind(tmp_path: Path) -> None:
    backend = Backend.from_url(str(tmp_path / "b"))

    def chunks() -> Iterator[bytes]:
        yield b"partial"
        raise RuntimeError("producer died")

    with pytest.raises(StorageError, match="producer died"):
        backend.put_if_absent("x/y", chunks())
    assert not backend.exists("x/y")
    assert os.listdir(tmp_path / "b" / "x") == []


def test_permission_errors_become_storage_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Tests run as root in CI, where chmod does not stop writes; inject the error the OS would raise instead.
    backend = Backend.from_url(str(tmp_path / "b"))

    def denied(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "link", denied)
    with pytest.raises(StorageError, match="permission denied") as info:
        backend.put_if_absent("x/z", b"data")
    assert isinstance(info.value.__cause__, PermissionError)
    assert info.value.key == "x/z"
    assert os.listdir(tmp_path / "b" / "x") == []  # the temp file is gone too


def test_a_local_read_error_is_a_storage_error_not_missing(tmp_path: Path) -> None:
    backend = Backend.from_url(str(tmp_path / "b"))
    (tmp_path / "b" / "folder").mkdir(parents=True)
    with pytest.raises(StorageError) as info:
        backend.read("folder")  # IsADirectoryError: the key is not missing, the read failed
    assert not isinstance(info.value, NotFoundError)
    assert isinstance(info.value.__cause__, OSError)


def test_protocols_without_atomic_create_are_refused_for_registry_writes(tmp_path: Path) -> None:
    import fsspec

    fs = fsspec.filesystem("dir", path=str(tmp_path), fs=fsspec.filesystem("file"))
    backend = Backend(fs, "store", url="dir::store")
    assert not backend.atomic_create
    with pytest.raises(UnsupportedBackendError, match="no atomic create"):
        backend.probe_atomic_create()


def test_urls_are_shown_without_credentials() -> None:
    assert redact_url("s3://KEY:SECRET@bucket/prefix") == "s3://bucket/prefix"
    assert redact_url("/plain/path") == "/plain/path"


# -- object stores: failures are errors, never "missing" -----------------------------------------------------------


@pytest.fixture(params=[pytest.param("s3", marks=pytest.mark.s3), pytest.param("gcs", marks=pytest.mark.gcs)])
def remote(request: pytest.FixtureRequest) -> tuple[StoreLocation, MotoS3Server | GcsEmulator]:
    if request.param == "s3":
        return request.getfixturevalue("s3_location"), request.getfixturevalue("s3_server")
    return request.getfixturevalue("gcs_location"), request.getfixturevalue("gcs_emulator")


def _within(seconds: float, call: Callable[[], Any]) -> BaseException | None:
    """Run ``call`` in a thread; its exception (None if it returned), or a test failure if it takes longer than
    ``seconds`` (the thread is left to finish on its own, so a slow retry policy costs the test only ``seconds``)."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(timeout=seconds)
    if not outcome:
        pytest.fail(f"still waiting after {time.monotonic() - started:.1f} s for an unreachable server")
    return outcome[0]


def test_an_unreachable_server_raises_storage_error_fast_and_names_the_store(
    remote: tuple[StoreLocation, MotoS3Server | GcsEmulator],
) -> None:
    # exists() is the dangerous one: fsspec's own exists() swallows every error and answers "missing".
    location, server = remote
    backend = Backend.from_url(location.url, storage_options=location.storage_options)
    backend.put_if_absent("there", b"data")
    with server.stopped():
        error = _within(UNREACHABLE_WITHIN_S, lambda: backend.exists("there"))
    assert isinstance(error, StorageError), f"exists() on a stopped server gave {error!r}"
    assert not isinstance(error, NotFoundError)  # an outage must never make data look absent
    assert not isinstance(error.__cause__, FracstoreError) and error.__cause__ is not None
    assert error.store == backend.url == location.url
    assert location.url in str(error)
    for secret in ("key", "secret"):
        value = location.storage_options.get(secret)
        if value:
            assert value not in str(error) and value not in repr(error.__dict__)


@pytest.mark.s3
def test_credentials_in_a_url_never_reach_messages(s3_location: StoreLocation) -> None:
    # fsspec would take the userinfo for part of the bucket name and echo it in its errors: such a URL is refused
    # before it reaches fsspec, with a message that says where credentials go and does not repeat them.
    bucket_and_prefix = s3_location.url.removeprefix("s3://")
    with pytest.raises(ConfigError) as info:
        Backend.from_url(
            f"s3://AKIDEXAMPLE:wJalrXUtnFEMI@{bucket_and_prefix}", storage_options=s3_location.storage_options
        )
    assert "wJalrXUtnFEMI" not in str(info.value) and "AKIDEXAMPLE" not in str(info.value)
    assert "storage_options" in str(info.value)
